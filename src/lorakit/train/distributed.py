"""Multi-process training: what the launcher started, and the one place lorakit asks "am I the
main process?" or waits for the others.

`torchrun` / `accelerate launch` start N copies of `lorakit train`; the Trainer (through
accelerate) wraps the model in DDP and shards the batches. lorakit's own code must then keep
three rules, all owned here:
- the run folder, checkpoints, the adapter, metrics and the report are written once, by the main
  process, while the others wait (`main_first` / `barrier`);
- a decision one process takes alone (a NaN loss stops the run) is taken by all (`any_rank`),
  or the others block forever in their next all-reduce;
- counts meant for the user (tokens/s) are summed over processes (`sum_ranks`).

The silent trap: a launcher that starts N processes which the Trainer does not see as N (checked
in accelerate 1.15-1.16 / transformers 5.24: torchrun on a CPU-only machine without `use_cpu`
makes accelerate report one process) trains N independent copies on all the data. `start` compares
the launcher's WORLD_SIZE with accelerate's process count and stops with an error before any work.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from lorakit.errors import LorakitError


def launcher_world_size() -> int:
    """Processes the launcher started (torchrun, accelerate launch and mpirun-style launchers set
    WORLD_SIZE); 1 without a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def start(device: str) -> int:
    """Join the launcher's process group (gloo on CPU, NCCL on GPU, as accelerate picks) and check
    that the Trainer will see every process. Returns the world size; 1 without a launcher."""
    world = launcher_world_size()
    if world == 1:
        return 1
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    check_world(world, state.num_processes, str(state.distributed_type))
    return world


def check_world(launched: int, seen: int, kind: str = "") -> None:
    """A launcher world the Trainer does not see would train `launched` separate copies."""
    if launched != seen:
        raise LorakitError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but the Trainer sees {seen} "
            f"({kind or 'no distributed backend'}): every process would train alone on all the data",
            hint="on a CPU-only machine launch with torchrun / accelerate launch as usual (lorakit sets use_cpu); "
                 "elsewhere check that torch.distributed can initialise (MASTER_ADDR, MASTER_PORT, the backend)")


def barrier() -> None:
    if active():
        torch.distributed.barrier()


@contextmanager
def main_first():
    """The body runs on the main process only; every process leaves together, after it."""
    try:
        yield is_main()
    finally:
        barrier()


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is True on any."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    t = t.to(_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def sum_ranks(values: list[int]) -> list[int]:
    """Element-wise sum of `values` over every process (each passes the same length)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64).to(_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return [int(x) for x in t.tolist()]


def _device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo, CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
