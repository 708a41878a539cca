"""`lorakit plan`: what a config will cost before it runs, and a config that fits when it won't.

One module per job: `shape` (parameters on the meta device, weight bytes), `batches` (the
largest micro-batch or pass of a simulated run), `activations` (measured on a two-layer probe),
`estimate` (the sum below, and the first change that fits), `calibrate` (a few steps of the real
trainer), `report` (the text). Every `auto` and device decision comes from `lorakit.resolve`.

Parameters are counted exactly on a model built on the meta device (no weights read). Peak
memory is the sum of

    runtime + data + weights + adapter + gradients + optimizer + activations (+ heap retention)
    + max(training logits, evaluation logits)

where activations are *measured*, not guessed: a two-layer copy of the model (real widths, a
tiny vocabulary) runs one forward pass with LoRA attached under the run's precision, and every
tensor autograd saves for the backward pass is counted once per storage (parameters excluded).
Layer 1's share is the cost of one decoder layer; layer 0's difference and everything outside
the layers (embedding output, masks, rotary tables) is the shared part. Two token counts give
bytes = a + b·T per layer, so

    activations(T) = L·(a + b·T) + shared(T)                      (no checkpointing)
    activations(T) = L·T·hidden·bytes + (a + b·T) + shared(T)     (checkpointing: layer inputs
                                                                   kept, one layer recomputed)

T is the largest micro-batch the run will see (simulated from the real example lengths and the
run's number of micro-batches: packed rows hold Σ len tokens, padded rows rows × longest).
lorakit computes logits only at labelled positions (model/loss.py). On the fast path under
autocast a frozen head runs in chunks of HEAD_CHUNK positions and keeps only the rows' gradient,
so the training logits term is one chunk × vocab × 6 B + labelled × hidden × 4 B; otherwise it is
labelled × vocab × 4 B × 3 (fp32 logits, log-softmax, its gradient). Evaluation uses
the stock forward (logits at every position, kept in 16 and 32 bits), see `_eval_logit_bytes`.

On the CPU the peak is resident memory (RSS): glibc keeps freed activation memory in its heap
(chunks under its 32 MiB mmap threshold are not returned), measured as HEAP_RETENTION below.
Larger blocks (logits) are mmapped and returned, so evaluation adds on top of the retained heap.
"""


from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psutil
import torch

from lorakit.config import Config
from lorakit.errors import LorakitError
from lorakit.plan.activations import ActivationProfile, probe_activations
from lorakit.plan.batches import (Batches, MicroBatch, micro_batches_in_run, peak_eval_batch, peak_micro_batch,
                                  peak_pass, _epoch)
from lorakit.plan.calibrate import Calibration, calibrate
from lorakit.plan.estimate import (CUDA_CONTEXT, HEAP_RETENTION, Context, Estimate, Setup, _candidates, estimate,
                                   fitting_setup, setup_for, setup_from)
from lorakit.plan.shape import GiB, NF4_BYTES, ModelShape, describe_model, optimizer_state_bytes, weight_bytes
from lorakit.resolve import GuideRow, Machine, resolve

__all__ = [
    "ActivationProfile", "Batches", "CUDA_CONTEXT", "Calibration", "Context", "Estimate", "HEAP_RETENTION",
    "MicroBatch", "ModelShape", "NF4_BYTES", "Plan", "Setup", "calibrate", "describe_model", "estimate",
    "fitting_setup", "format_plan", "make_plan", "micro_batches_in_run", "optimizer_state_bytes",
    "peak_eval_batch", "peak_micro_batch", "peak_pass", "probe_activations", "setup_for", "setup_from",
    "weight_bytes",
]


@dataclass
class Plan:
    cfg: Config
    device: str
    shape: ModelShape
    batches: Batches
    n_train: int | None
    row: GuideRow | None
    auto_notes: list[str]
    target: Estimate
    cpu: Estimate | None  # None when the config cannot train on a CPU (fp16)
    gpu: dict[str, Estimate]
    limit: int | None
    limit_source: str
    fit: Estimate | None
    calibration: Calibration | None
    epoch_tokens: int
    notes: list[str]
    processes: int = 1


def make_plan(cfg: Config, *, device: str = "cpu", memory_gb: float | None = None, calibrate_steps: int = 3,
              processes: int = 1) -> Plan:
    """Everything `lorakit plan` prints, for `cfg` (not modified) on `device` ('cpu' | 'cuda'), run
    as `processes` processes (torchrun --nproc_per_node N)."""
    from lorakit.data.preference import prepare_method
    from lorakit.model.load import load_tokenizer

    if device not in ("cpu", "cuda"):
        raise LorakitError(f"unknown device {device!r}", hint="use --device cpu or --device cuda")
    if processes < 1:
        raise LorakitError(f"--processes {processes}: need at least 1", hint="e.g. --processes 2")
    if processes > 1:
        from lorakit.train.distributed import check_strategy

        check_strategy(cfg, device)  # the combinations training would refuse, refused here too
    if cfg.train.method == "grpo":
        raise LorakitError("lorakit plan does not model GRPO runs yet (rollouts, group size and completion "
                           "length set its memory and time)",
                           hint="try a few steps with --train.max_steps 2 and read the run's peak memory in "
                                "adapter/lorakit.json")
    runtime = psutil.Process().memory_info().rss
    notes: list[str] = []
    tokenizer = load_tokenizer(cfg.model)  # a wrong model.name is a model error, not unreadable data
    prepared = None
    try:
        prepared = prepare_method(cfg, tokenizer)
    except LorakitError as e:
        notes.append(f"data not readable ({e.message.splitlines()[0]}): every example assumed "
                     f"{cfg.data.max_length} tokens long")
    data = max(0, psutil.Process().memory_info().rss - runtime)
    n_train = len(prepared.train) if prepared else None
    machine = Machine.for_device(device)
    resolved = resolve(cfg, machine, n_train)
    cfg = resolved.cfg
    if cfg.train.method != "sft":
        notes.append(f"train.method {cfg.train.method}: an example is a pair's two sequences (KTO: an answer and "
                     "its KL partner), packed together" + (
                         "; the reference log-probs take one forward pass over every example before the first "
                         "step (about a third of an epoch's training compute)" if cfg.train.method in ("dpo", "kto")
                         else ""))
    if resolved.notes and n_train is None:
        notes.append("auto values need a readable dataset; planned with the schema's defaults")
    batches = Batches.from_prepared(prepared) if prepared else Batches.assumed(cfg)
    ctx = Context(cfg, describe_model(cfg), batches, runtime, data)
    target = estimate(ctx, setup_from(resolved))
    try:
        cpu = target if device == "cpu" else estimate(ctx, setup_for(cfg, "cpu"))
    except LorakitError as e:
        cpu = None
        notes.append(f"not estimated on this CPU: {e.message}")
    gpu = {w: estimate(ctx, setup_for(cfg, "cuda", w)) for w in ("fp32", "bf16", "8bit", "4bit")}
    limit, source = _memory_limit(device, memory_gb)
    fit = fitting_setup(ctx, target.setup, limit) if limit is not None and target.peak > limit else None
    calib = None
    here = Machine.detect().device
    if calibrate_steps and prepared is not None and device == here:
        calib = calibrate(resolved, prepared, tokenizer, calibrate_steps)
        same = estimate(ctx, target.setup, batch=calib.largest, evaluation=False)
        calib.predicted = same.peak - same.parts["runtime"] - same.parts.get("data", 0)
    elif calibrate_steps:
        notes.append(f"no calibration: it runs where training would ({here}), not on {device}"
                     if prepared is not None else "no calibration without readable data")
    epoch = int(_epoch(batches, np.arange(len(batches.lengths)), cfg.train.batch_size, cfg.data.packing)[0].sum())
    return Plan(cfg, device, ctx.shape, batches, n_train, resolved.guide, list(resolved.notes), target, cpu, gpu,
                limit, source, fit, calib, epoch, notes, processes)


def _memory_limit(device: str, memory_gb: float | None) -> tuple[int | None, str]:
    if memory_gb is not None:
        return int(memory_gb * GiB), "--memory-gb"
    if device == "cpu":
        return psutil.virtual_memory().available, "available RAM"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return None, "no GPU here; pass --memory-gb to check the fit"




from lorakit.plan.report import format_plan  # noqa: E402 - report reads Plan
