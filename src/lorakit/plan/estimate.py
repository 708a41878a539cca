"""Peak memory of a training run, part by part, for one setup; and the first change that fits.

See `lorakit.plan` for the sum and how each part is obtained."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from lorakit.config import Config
from lorakit.plan.activations import ActivationProfile, probe_activations
from lorakit.plan.batches import (Batches, MicroBatch, micro_batches_in_run, peak_eval_batch, peak_micro_batch,
                                  peak_pass)
from lorakit.plan.shape import MiB, ModelShape, fmt_bytes, optimizer_state_bytes, weight_bytes
from lorakit.resolve import Machine, Resolved, resolve
from lorakit.model.loss import HEAD_CHUNK

HEAP_RETENTION = 0.35
"""CPU only: resident memory above the live tensors at the training peak, as a fraction of the
activations the step would save without checkpointing. glibc serves blocks under its mmap
threshold (raised up to 32 MiB as blocks are freed) from its heap and keeps freed ones there;
each layer's temporaries (dropout products, autocast copies, attention buffers) leave holes that
the kept tensors (saved activations, or with checkpointing the layer outputs) pin in place, so
the heap grows by a share of every layer's work in both modes: with checkpointing the live
memory after the forward pass was 126 MiB and the RSS peak +1.0 GiB (SmolLM2, 1,353 tokens).
Measured with `lorakit train` on SmolLM2-135M (tests/test_plan.py, slow): 0.32-0.36 for batch
4/8/16, r 8/16/64, max_length 64/256, packed and padded, bf16 autocast and fp32; 0.45 with
checkpointing; bare training loops repeating one batch reach 0.35-0.43 after 8 steps."""

CUDA_CONTEXT = 512 * MiB
"""CUDA context and kernels of a torch process on a recent GPU, outside the caching allocator."""


@dataclass
class Setup:
    """What decides memory, resolved for one device."""

    device: str  # "cpu" | "cuda"
    weights: str  # "fp32" | "bf16" | "fp16" | "8bit" | "4bit"
    autocast: bool  # bf16/fp16 autocast over fp32 weights
    checkpointing: bool
    batch_size: int
    grad_accum: int
    eval_batch_size: int
    max_length: int
    r: int
    optimizer: str
    fast: bool = False  # train.fast_path: fused LoRA linears, 16-bit frozen bases under autocast
    tokens_per_pass: int | None = None  # packing: tokens per forward/backward pass; None = padded batches
    oversize_checkpointing: bool = False  # checkpointing 'auto' + packing: only passes over tokens_per_pass

    def overrides(self, base: "Setup") -> list[str]:
        """The `--key value` overrides that turn `base` into this setup."""
        out = []
        if self.checkpointing != base.checkpointing:
            out += ["--model.gradient_checkpointing", "on" if self.checkpointing else "off"]
        for key, section in (("batch_size", "train"), ("grad_accum", "train"), ("tokens_per_pass", "train"),
                             ("eval_batch_size", "train"), ("max_length", "data"), ("r", "lora")):
            if getattr(self, key) != getattr(base, key):
                out += [f"--{section}.{key}", str(getattr(self, key))]
        if self.weights != base.weights and self.weights in ("4bit", "8bit"):
            out += ["--model.quantization", self.weights]
            if base.weights == "fp32":  # quantized layers compute in 16 bits
                out += ["--model.dtype", "auto"]
        return out


@dataclass
class Estimate:
    setup: Setup
    parts: dict[str, int]  # name → bytes; the peak is their sum
    notes: dict[str, str]  # name → how it was obtained
    batch: MicroBatch
    eval_tokens: int

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


@dataclass
class Context:
    """Everything an estimate needs that does not change with the setup."""

    cfg: Config
    shape: ModelShape
    batches: Batches
    runtime: int  # bytes of an idle process with lorakit's stack imported (CPU)
    data: int  # bytes the tokenizer and the encoded data added
    profiles: dict[tuple[str, bool], ActivationProfile] = field(default_factory=dict)

    def profile(self, setup: Setup, mb: MicroBatch) -> ActivationProfile:
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(setup.weights, torch.bfloat16)
        key = (str(dtype), setup.autocast, setup.fast)
        if key not in self.profiles:
            self.profiles[key] = probe_activations(self.shape, self.cfg.lora, dtype, setup.autocast,
                                                   mb.rows, mb.seq, self.cfg.data.packing, setup.fast)
        return self.profiles[key]


def _chunked_head(shape: ModelShape, setup: Setup) -> bool:
    """Whether training's loss runs the frozen head in chunks (lorakit.model.loss.head_cross_entropy):
    the labelled-positions loss on the fast path under autocast."""
    return shape.labelled_logits and setup.fast and setup.autocast


def _train_logit_bytes(shape: ModelShape, setup: Setup, rows: int) -> int:
    """Training's logits for `rows` positions: one chunk's 16-bit and fp32 logits plus the rows' fp32
    gradient when chunked, else fp32 logits, their log-softmax and its gradient for every row."""
    if _chunked_head(shape, setup):
        return min(rows, HEAD_CHUNK) * shape.vocab * (2 + 4) + rows * shape.hidden * 4
    return rows * shape.vocab * 4 * 3


def _eval_logit_bytes(setup: Setup) -> int:
    """Bytes per logit in the stock evaluation forward: the head's output (16-bit under autocast)
    plus the loss's fp32 copy and its log-softmax."""
    return 2 + 4 + 4 if setup.autocast or setup.weights not in ("fp32",) else 4 + 4


def _data_for(ctx: Context, setup: Setup) -> Batches:
    if setup.max_length >= ctx.cfg.data.max_length:
        return ctx.batches
    return ctx.batches.truncated(setup.max_length, ctx.cfg.data.overlong == "drop")


def estimate(ctx: Context, setup: Setup, batch: MicroBatch | None = None, evaluation: bool = True) -> Estimate:
    """Peak memory of `lorakit train` under `setup`, broken down (see the module docstring).

    `batch` replaces the run's simulated largest micro-batch; without `evaluation` the
    evaluation logits are left out (what a few bare training steps use)."""
    cfg, shape = ctx.cfg, ctx.shape
    b = _data_for(ctx, setup)
    mb = batch if batch is not None else _largest_batch(ctx, setup, b)
    prof = ctx.profile(setup, mb)
    trainable = int(shape.trainable * setup.r / cfg.lora.r)
    head_cast = shape.vocab * shape.hidden * 2 if setup.autocast else 0  # the head's 16-bit copy, saved
    ckpt = setup.checkpointing
    oversize = (batch is None and setup.oversize_checkpointing and not ckpt and setup.tokens_per_pass
                and mb.tokens > setup.tokens_per_pass)
    if oversize:  # the longest example is a checkpointed pass of its own; a normal pass may still be larger
        regular = _regular_pass(b, setup, cfg)
        per_pass = lambda m, c: (prof.total(shape, m.tokens, c) + prof.total(shape, m.tokens, False)  # noqa: E731
                                 * (HEAP_RETENTION if setup.device == "cpu" else 0)
                                 + _train_logit_bytes(shape, setup, m.labelled))
        if regular is not None and per_pass(regular, False) >= per_pass(mb, True):
            mb = regular
        else:
            ckpt = True
    parts, notes = _fixed_parts(ctx, setup, trainable)
    act = prof.total(shape, mb.tokens, ckpt)
    parts["activations"] = act
    other = prof.total(shape, mb.tokens, not ckpt)
    notes["activations"] = (f"{shape.layers} layers × {prof.b / 1024:.1f} KiB per token × {mb.tokens:,} tokens"
                            + (" (checkpointing: layer inputs + one layer)" if ckpt else "")
                            + (" (one example longer than a pass: checkpointed)" if oversize and ckpt else "")
                            + f"; {'without' if ckpt else 'with'} checkpointing {fmt_bytes(other)}")
    if setup.device == "cpu":
        # Temporaries are made layer by layer with or without checkpointing: scale by the full activations.
        parts["heap retention"] = int(prof.total(shape, mb.tokens, False) * HEAP_RETENTION)
        notes["heap retention"] = (f"freed temporaries glibc keeps resident: {HEAP_RETENTION:.0%} of the "
                                   "activations without checkpointing (measured)")
    logit_rows = mb.labelled if shape.labelled_logits else mb.tokens  # other heads: the stock loss
    train_logits = _train_logit_bytes(shape, setup, logit_rows) + head_cast
    eval_tokens = peak_eval_batch(b, setup.eval_batch_size, cfg.data.packing) if evaluation else 0
    eval_logits = eval_tokens * shape.vocab * _eval_logit_bytes(setup)
    parts["logits"] = max(train_logits, eval_logits)
    rows_are = "labelled" if shape.labelled_logits else "positions"
    how = (f"chunks of {HEAD_CHUNK} of {logit_rows:,} {rows_are} × {shape.vocab:,} × 6 B, their gradient kept"
           if _chunked_head(shape, setup) else f"{logit_rows:,} {rows_are} × {shape.vocab:,} × 4 B × 3")
    notes["logits"] = (f"training {fmt_bytes(train_logits)} ({how}), "
                       f"evaluation {fmt_bytes(eval_logits)} ({eval_tokens:,} tokens × {shape.vocab:,}"
                       f" × {_eval_logit_bytes(setup)} B); the larger counts")
    return Estimate(setup, parts, notes, mb, eval_tokens)


def _largest_batch(ctx: Context, setup: Setup, b: Batches) -> MicroBatch:
    """The run's simulated largest micro-batch (pass, when steps are split into passes)."""
    cfg = ctx.cfg
    if setup.tokens_per_pass:
        return peak_pass(b, setup.batch_size * setup.grad_accum, setup.tokens_per_pass,
                         _n_micro(cfg, len(b.lengths), setup) // max(1, setup.grad_accum), cfg.train.seed)
    return peak_micro_batch(b, setup.batch_size, cfg.data.packing, _n_micro(cfg, len(b.lengths), setup),
                            cfg.train.seed)


def _fixed_parts(ctx: Context, setup: Setup, trainable: int) -> tuple[dict[str, int], dict[str, str]]:
    """What a run holds whatever its batches: the runtime, the data, the weights, the adapter, its
    gradients and optimizer state (bytes, and how each was counted)."""
    cfg, shape = ctx.cfg, ctx.shape
    parts: dict[str, int] = {}
    notes: dict[str, str] = {}
    if setup.device == "cpu":
        parts["runtime"] = ctx.runtime
        notes["runtime"] = "python, torch and libraries: RSS of this process before loading anything"
        parts["data"] = ctx.data
        notes["data"] = "tokenizer and encoded examples, measured while reading them"
    else:
        parts["runtime"] = CUDA_CONTEXT
        notes["runtime"] = "CUDA context (typical; not in torch.cuda.max_memory_allocated)"
    half = setup.fast and setup.autocast
    parts["weights"] = weight_bytes(shape, setup.weights, half_lora_bases=half)
    notes["weights"] = f"{shape.base:,} frozen parameters, {setup.weights}" + (
        f" ({shape.lora_base:,} under LoRA stored in 16 bits: fast path)" if half else "")
    parts["adapter"] = trainable * 4
    notes["adapter"] = f"{trainable:,} trainable parameters, fp32"
    parts["gradients"] = trainable * 4
    parts["optimizer"] = trainable * optimizer_state_bytes(setup.optimizer)
    notes["optimizer"] = f"{cfg.train.optimizer}: {optimizer_state_bytes(setup.optimizer)} B per trainable parameter"
    return parts, notes


def _regular_pass(b: Batches, setup: Setup, cfg: Config) -> MicroBatch | None:
    """The largest pass made of examples no longer than tokens_per_pass (run without checkpointing)."""
    keep = b.lengths <= setup.tokens_per_pass
    if not keep.any():
        return None
    short = Batches(b.lengths[keep], b.labelled[keep], b.eval_lengths, b.measured, b.percentiles)
    return peak_pass(short, setup.batch_size * setup.grad_accum, setup.tokens_per_pass,
                     _n_micro(cfg, len(short.lengths), setup) // max(1, setup.grad_accum), cfg.train.seed)


def _n_micro(cfg: Config, n_train: int, setup: Setup) -> int:
    t = dataclasses.replace(cfg.train, batch_size=setup.batch_size, grad_accum=setup.grad_accum)
    return micro_batches_in_run(dataclasses.replace(cfg, train=t), n_train)


def setup_for(cfg: Config, machine: Machine | str, weights: str | None = None) -> Setup:
    """The setup `lorakit train` would use for `cfg` on `machine` (a Machine, or 'cpu' / 'cuda' for
    `Machine.for_device`), every decision taken from `lorakit.resolve`. `weights` ('fp32' | 'bf16' |
    'fp16' | '8bit' | '4bit') replaces the config's model.dtype / model.quantization, for the GPU
    columns of the plan."""
    if isinstance(machine, str):
        machine = Machine.for_device(machine)
    if weights is not None:
        quantized = weights in ("8bit", "4bit")
        model = dataclasses.replace(cfg.model, quantization=weights if quantized else "none",
                                    dtype="auto" if quantized else weights)
        cfg = dataclasses.replace(cfg, model=model)
    return setup_from(resolve(cfg, machine))


def setup_from(resolved: Resolved) -> Setup:
    """The memory-relevant part of a resolved config."""
    cfg = resolved.cfg
    t = cfg.train
    return Setup(resolved.machine.device, resolved.weights, autocast=resolved.autocast_over_fp32,
                 checkpointing=resolved.checkpointing == "all",
                 batch_size=t.batch_size, grad_accum=t.grad_accum, eval_batch_size=t.eval_batch_size,
                 max_length=cfg.data.max_length, r=cfg.lora.r, optimizer=t.optimizer, fast=t.fast_path,
                 tokens_per_pass=resolved.tokens_per_pass,
                 oversize_checkpointing=resolved.checkpointing == "oversize")


# --------------------------------------------------------------------------- a config that fits

def fitting_setup(ctx: Context, setup: Setup, limit: int) -> Estimate | None:
    """The first change, in order of preference, whose estimate fits in `limit` bytes: gradient
    checkpointing; halve tokens_per_pass (packing) or batch_size doubling grad_accum (same
    effective batch), and halve eval_batch_size (evaluation computes logits at every position);
    shorter max_length; 4-bit
    weights (GPU); halve r. Changes accumulate. None if nothing fits."""
    for candidate in _candidates(ctx, setup):
        est = estimate(ctx, candidate)
        if est.peak <= limit:
            return est
    return None


def _candidates(ctx: Context, s: Setup):
    if not s.checkpointing:
        s = dataclasses.replace(s, checkpointing=True)
        yield s
    while s.tokens_per_pass and s.tokens_per_pass > 64:
        s = dataclasses.replace(s, tokens_per_pass=s.tokens_per_pass // 2,
                                eval_batch_size=max(1, s.eval_batch_size // 2))
        yield s
    while not s.tokens_per_pass and (s.batch_size > 1 or s.eval_batch_size > 1):
        bs = max(1, s.batch_size // 2)
        s = dataclasses.replace(s, batch_size=bs, grad_accum=s.grad_accum * (s.batch_size // bs),
                                eval_batch_size=max(1, s.eval_batch_size // 2))
        yield s
    for length in _shorter_lengths(ctx, s.max_length):
        s = dataclasses.replace(s, max_length=length)
        yield s
    if s.device == "cuda" and s.weights not in ("4bit",):
        s = dataclasses.replace(s, weights="4bit", autocast=False)
        yield s
    while s.r > 1:
        s = dataclasses.replace(s, r=max(1, s.r // 2))
        yield s


def _shorter_lengths(ctx: Context, current: int) -> list[int]:
    """p99, p90, p50 of the example lengths, then halvings down to 64 tokens."""
    p = ctx.batches.percentiles
    out = sorted({v for v in (p.get("p99"), p.get("p90"), p.get("p50")) if v and v < current}, reverse=True)
    length = min(out[-1] if out else current, current)
    while length > 64:
        length //= 2
        out.append(max(length, 64))
    return [v for v in dict.fromkeys(out) if v >= 8]


