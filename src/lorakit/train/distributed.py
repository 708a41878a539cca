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
from transformers.trainer_pt_utils import BatchRebalanceSampler

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


# --------------------------------------------------------------------------- train.distributed

_ZERO = {
    "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
}
DEEPSPEED_PRESETS = {
    "zero2": {**_ZERO, "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}},
    "zero3": {**_ZERO, "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                             "stage3_gather_16bit_weights_on_model_save": True}},
}


def check_strategy(cfg, device: str) -> None:
    """Refuse, with the reason, the combinations of train.distributed that lorakit does not run."""
    from lorakit.errors import ConfigError

    t, q = cfg.train, cfg.model.quantization
    if t.distributed == "ddp":
        return
    name = "FSDP" if t.distributed == "fsdp" else "DeepSpeed"
    problems = []
    if device != "cuda":
        problems.append(f"train.distributed: {t.distributed} needs CUDA GPUs ({name} through accelerate does not run "
                        "on CPU); use 'ddp' here")
    if t.fast_path:
        problems.append(f"train.fast_path: the fast path runs with 'ddp' only (its fused LoRA linears keep their own "
                        f"16-bit copies of the frozen weights, which {name} shards or partitions); set "
                        "train.fast_path: false with train.distributed: " + t.distributed)
    if q != "none":
        problems.append(f"model.quantization: {q} with {name} is not supported (the quantized weights would need "
                        "a storage dtype the sharding can flatten, bnb_4bit_quant_storage); use 'ddp' for QLoRA")
    if t.distributed == "deepspeed":
        import importlib.util

        if t.deepspeed not in DEEPSPEED_PRESETS and not os.path.isfile(t.deepspeed):
            problems.append(f"train.deepspeed: {t.deepspeed!r} is neither 'zero2', 'zero3' nor an existing DeepSpeed "
                            "JSON file")
        if importlib.util.find_spec("deepspeed") is None:
            problems.append("train.distributed: deepspeed needs the deepspeed package: pip install deepspeed")
    if problems:
        raise ConfigError(problems)


def trainer_arguments(cfg) -> dict:
    """The TrainingArguments that select train.distributed (none for DDP: the Trainer's default)."""
    t = cfg.train
    if t.distributed == "fsdp":
        # use_orig_params: LoRA trains a few parameters of modules whose others stay frozen.
        return {"fsdp": t.fsdp, "fsdp_config": {"use_orig_params": True}}
    if t.distributed == "deepspeed":
        return {"deepspeed": DEEPSPEED_PRESETS.get(t.deepspeed, t.deepspeed)}
    return {}


# --------------------------------------------------------------------------- every example once per epoch

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's order of n examples: the permutation accelerate's seedable sampler draws (a
    generator seeded with seed + epoch), so lorakit's own samplers visit the data as one plain
    process would, and a resumed run skips to the same place."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


class RankSteps(BatchRebalanceSampler):
    """This process's share of every micro-step: the epoch's order (the permutation one process
    would draw: seed + epoch, as accelerate's seedable sampler), cut into groups of
    rows x processes examples, process r taking rows [r*rows, (r+1)*rows) of each.

    accelerate's own sharding evens the last group out by repeating examples from the start
    of the epoch, so they would count twice. Here the last group is split as it comes; a
    process left without an example gets the masked copy of one (`WithMaskedCopies`): it
    runs the step, adds nothing to the loss or the gradients, and every process still runs
    the same number of steps (none waits forever in an all-reduce).

    A BatchRebalanceSampler subclass only so that the Trainer treats it as already split by
    rank (it passes it as the batch sampler and turns accelerate's re-sharding off)."""

    def __init__(self, n: int, rows: int, processes: int, rank: int, seed: int):  # noqa: D107
        self.n, self.rows, self.processes, self.rank, self.seed = n, rows, processes, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // (self.rows * self.processes))

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        group = self.rows * self.processes
        for start in range(0, self.n, group):
            chunk = order[start:start + group]
            mine = chunk[self.rank * self.rows:(self.rank + 1) * self.rows]
            yield mine or [self.n + chunk[0]]  # n + i: the masked copy of example i


class WithMaskedCopies:
    """The training examples, plus at index n + i a copy of example i whose labels are all masked
    (what `RankSteps` hands a process that has no example left in the epoch's last step)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        n = len(self.examples)
        if i < n:
            return self.examples[i]
        ex = self.examples[i - n]
        return {**ex, "labels": [-100] * len(ex["labels"])}
