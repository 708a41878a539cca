"""`lorakit plan`: what a config will cost before it runs, and a config that fits when it won't.

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
lorakit computes logits only at labelled positions (train/loss.py), so the training logits
term is labelled × vocab × 4 B × 3 (fp32 logits, log-softmax, its gradient); evaluation uses
the stock forward (logits at every position, kept in 16 and 32 bits), see `_eval_logit_bytes`.

On the CPU the peak is resident memory (RSS): glibc keeps freed activation memory in its heap
(chunks under its 32 MiB mmap threshold are not returned), measured as HEAP_RETENTION below.
Larger blocks (logits) are mmapped and returned, so evaluation adds on top of the retained heap.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from lorakit.config import AUTO, Config
from lorakit.errors import LorakitError
from lorakit.train import trainer as trainer_mod  # imported here so the runtime baseline holds the training stack

GiB, MiB = 2**30, 2**20

# --------------------------------------------------------------------------- the guide's table

@dataclass(frozen=True)
class GuideRow:
    """One column of the guide's hyper-parameter table; ranges start at their low end."""

    name: str
    rows: str
    r: int
    alpha: int
    dropout: float
    lr: float
    epochs: int
    batch_size: int
    ranges: dict[str, str] = field(default_factory=dict, compare=False)


GUIDE = (
    GuideRow("small", "<1k rows", 8, 16, 0.1, 1e-4, 5, 4,
             {"r": "8", "alpha": "16", "epochs": "5-10", "batch_size": "4-8"}),
    GuideRow("medium", "1k-10k rows", 16, 32, 0.05, 2e-4, 3, 8,
             {"r": "16-32", "alpha": "32-64", "epochs": "3-5", "batch_size": "8-16"}),
    GuideRow("large", ">10k rows", 32, 64, 0.05, 3e-4, 1, 16,
             {"r": "32-64", "alpha": "64-128", "epochs": "1-3", "batch_size": "16-32"}),
)
"""The guide's "Hyperparameter Tuning Guide" table. Where it gives a range, the low end is
used: the guide's advice is to start small (low rank) and scale up."""

AUTO_KEYS = ("lora.r", "lora.alpha", "lora.dropout", "train.lr", "train.epochs", "train.batch_size")


def guide_row(n_train_rows: int) -> GuideRow:
    """The table column for a dataset of `n_train_rows` training examples."""
    if n_train_rows < 1000:
        return GUIDE[0]
    return GUIDE[1] if n_train_rows <= 10_000 else GUIDE[2]


def resolve_auto(cfg: Config, n_train_rows: int) -> list[str]:
    """Replace every 'auto' among AUTO_KEYS in `cfg` (in place) by the guide's value for the
    dataset size; return one note per replaced key. alpha 'auto' is 2 × r (the guide's rule,
    equal to the table's alpha when r comes from the table too)."""
    row = guide_row(n_train_rows)
    notes = []
    for key in AUTO_KEYS:
        section, name = key.split(".")
        owner = getattr(cfg, section)
        if getattr(owner, name) != AUTO:
            continue
        value = 2 * cfg.lora.r if key == "lora.alpha" and cfg.lora.r != AUTO else getattr(row, name)
        setattr(owner, name, value)
        why = "2 × lora.r" if key == "lora.alpha" and value != row.alpha else f"guide, {row.rows}"
        notes.append(f"{key}: auto → {value:g} ({why}; {n_train_rows:,} train rows)")
    return notes


# --------------------------------------------------------------------------- the model, on meta

@dataclass
class ModelShape:
    hf_config: Any
    layers: int
    hidden: int
    vocab: int
    total: int  # parameters with LoRA, tied weights once (lorakit.model.lora.count_parameters)
    trainable: int
    base: int  # parameters of the base model
    quantizable: int  # weights of the base's nn.Linear layers except the output head
    quantizable_rows: int  # their output features (8-bit keeps one fp32 scale per row)
    labelled_logits: bool = True  # lorakit's loss computes logits at labelled positions only
    lora_base: int = 0  # weights of the nn.Linear layers LoRA wraps (the fast path stores them in 16 bits)


def model_folder(cfg: Config) -> str:
    """The local folder or hub id `lorakit train` would load (GGUF files are converted once)."""
    from lorakit.model.load import _resolve_source

    return _resolve_source(cfg.model).path


def describe_model(cfg: Config) -> ModelShape:
    """Count parameters exactly on a meta-device model: accelerate's init_empty_weights +
    from_config, then lorakit's own apply_lora (PEFT), so nothing is read or allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.model.lora import apply_lora, count_parameters
    from lorakit.train.loss import split_head

    m = cfg.model
    kwargs = {"trust_remote_code": m.trust_remote_code, **({"revision": m.revision} if m.revision else {})}
    hf = AutoConfig.from_pretrained(model_folder(cfg), **kwargs)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=m.trust_remote_code)
    # Tie outside the context: init_empty_weights re-creates every registered parameter, which
    # would give the head its own copy of the embedding.
    model.tie_weights()
    head = model.get_output_embeddings()
    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear) and mod is not head]
    _, base = count_parameters(model)
    with init_empty_weights():
        peft_model = apply_lora(model, dataclasses.replace(cfg.lora, init="true"))  # data-driven inits need weights
    trainable, total = count_parameters(peft_model)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return ModelShape(
        hf_config=hf, layers=text.num_hidden_layers, hidden=text.hidden_size, vocab=text.vocab_size,
        total=total, trainable=trainable, base=base,
        quantizable=sum(lin.weight.numel() for lin in linears),
        quantizable_rows=sum(lin.out_features for lin in linears),
        labelled_logits=split_head(peft_model) is not None,
        lora_base=sum(mod.base_layer.weight.numel() for mod in peft_model.modules()
                      if hasattr(mod, "lora_A") and isinstance(getattr(mod, "base_layer", None), nn.Linear)),
    )


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""NF4 with double quantization: 4 bits per weight, one 8-bit absmax per block of 64 and one fp32
scale per 256 absmax blocks (bitsandbytes' defaults)."""


def weight_bytes(shape: ModelShape, weights: str, half_lora_bases: bool = False) -> int:
    """Frozen base weights in memory for 'fp32' | 'bf16' | 'fp16' | '8bit' | '4bit'.

    With 8/4-bit, every nn.Linear but the head is quantized; PEFT's prepare_model_for_kbit_training
    then casts all remaining 16-bit parameters (embeddings, norms, head) to fp32. `half_lora_bases`:
    fp32 weights under autocast on the fast path, whose LoRA-wrapped linears are stored in 16 bits
    (lorakit.train.speed.freeze_in_half)."""
    if weights == "fp32" and half_lora_bases:
        return shape.lora_base * 2 + (shape.base - shape.lora_base) * 4
    if weights in ("fp32", "bf16", "fp16"):
        return shape.base * (4 if weights == "fp32" else 2)
    rest = (shape.base - shape.quantizable) * 4
    if weights == "8bit":
        return shape.quantizable + 4 * shape.quantizable_rows + rest
    return int(shape.quantizable * NF4_BYTES) + rest


def optimizer_state_bytes(name: str) -> int:
    """Bytes of optimizer state per trainable parameter: AdamW keeps two fp32 moments."""
    name = name.lower()
    if "8bit" in name:
        return 2
    if name.startswith("sgd") or name == "adafactor":  # no momentum / factored second moment
        return 0 if name.startswith("sgd") else 4
    return 8


# --------------------------------------------------------------------------- micro-batches

@dataclass
class Batches:
    """Per-example lengths of the training / validation data and how the run batches them."""

    lengths: np.ndarray  # tokens per training example (after truncation)
    labelled: np.ndarray  # positions in the loss per training example
    eval_lengths: np.ndarray
    measured: bool  # False: data unreadable, every example assumed max_length long
    percentiles: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_prepared(cls, prepared) -> "Batches":
        lab = [sum(1 for y in it["labels"][1:] if y != -100) for it in prepared.train]
        return cls(np.array([len(it["input_ids"]) for it in prepared.train]), np.array(lab),
                   np.array([len(it["input_ids"]) for it in prepared.validation]), True,
                   dict(prepared.stats.length_percentiles))

    @classmethod
    def assumed(cls, cfg: Config, rows: int = 1000) -> "Batches":
        n = cfg.data.max_length
        return cls(np.full(rows, n), np.full(rows, n // 2), np.full(0, n), False)

    def truncated(self, max_length: int, drop: bool) -> "Batches":
        """The same data with a shorter data.max_length (truncation cuts responses first)."""
        keep = self.lengths <= max_length if drop else np.ones(len(self.lengths), bool)
        cut = np.maximum(self.lengths - max_length, 0)
        ev = self.eval_lengths[self.eval_lengths <= max_length] if drop else np.minimum(self.eval_lengths, max_length)
        return Batches(np.minimum(self.lengths, max_length)[keep], np.maximum(self.labelled - cut, 0)[keep],
                       ev, self.measured, self.percentiles)


@dataclass
class MicroBatch:
    tokens: int  # positions through the model: Σ len (packed) or rows × longest (padded)
    labelled: int
    rows: int
    seq: int


def micro_batches_in_run(cfg: Config, n_train: int) -> int:
    t = cfg.train
    per_epoch = math.ceil(n_train / t.batch_size)
    if t.max_steps > 0:
        return t.max_steps * t.grad_accum
    return max(1, math.ceil(per_epoch * t.epochs))


def _batch_tokens(lengths: np.ndarray, packing: bool) -> int:
    return int(lengths.sum()) if packing else int(len(lengths) * lengths.max())


def _epoch(b: Batches, order: np.ndarray, batch_size: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labelled) of each micro-batch when the examples come in `order`."""
    pad = -len(order) % batch_size  # the last batch is short: zero-length fillers
    lengths = np.concatenate([b.lengths[order], np.zeros(pad, int)]).reshape(-1, batch_size)
    labelled = np.concatenate([b.labelled[order], np.zeros(pad, int)]).reshape(-1, batch_size)
    rows = (lengths > 0).sum(1)
    return (lengths.sum(1) if packing else lengths.max(1) * rows), labelled.sum(1)


def peak_micro_batch(b: Batches, batch_size: int, packing: bool, n_micro: int, seed: int, sims: int = 9) -> MicroBatch:
    """The largest micro-batch (tokens) of a simulated run, median over `sims` shuffles.

    The Trainer shuffles every epoch; which examples meet in a batch is chance, so the run's
    largest batch is a random variable whose median is the best single guess."""
    rng = np.random.default_rng(seed)
    n = len(b.lengths)
    per_epoch = math.ceil(n / batch_size)
    epochs = min(math.ceil(n_micro / per_epoch), 20)  # the maximum saturates long before
    best_tokens, best_labelled = [], []
    for _ in range(sims):
        runs = [_epoch(b, rng.permutation(n), batch_size, packing) for _ in range(epochs)]
        best_tokens.append(np.concatenate([t for t, _ in runs])[:n_micro].max())
        best_labelled.append(np.concatenate([lab for _, lab in runs])[:n_micro].max())
    tokens = int(np.median(best_tokens))
    rows = 1 if packing else min(batch_size, n)
    return MicroBatch(tokens, int(np.median(best_labelled)), rows, tokens // rows)


def _first_fit(lengths: np.ndarray, labelled: np.ndarray, budget: int) -> tuple[int, int]:
    """(tokens, labelled) of the fullest pass PackedCollator's first-fit makes of one step's examples."""
    from lorakit.data.collate import first_fit_bins

    order = np.argsort(-lengths, kind="stable")  # longest first, as PackedCollator sorts
    bins = [order[b] for b in first_fit_bins(lengths[order].tolist(), budget)]
    fullest = max(bins, key=lambda b: int(lengths[b].sum()))
    return int(lengths[fullest].sum()), int(labelled[fullest].sum())


def peak_pass(b: Batches, rows_per_step: int, budget: int, n_steps: int, seed: int, sims: int = 5) -> MicroBatch:
    """The largest pass (tokens) of a simulated packed run, median over `sims` shuffles.

    Each optimizer step's examples are packed first-fit into passes of at most `budget` tokens
    (one example longer than that is a pass of its own), as LorakitTrainer runs them."""
    rng = np.random.default_rng(seed)
    n = len(b.lengths)
    steps_per_epoch = max(1, math.ceil(n / rows_per_step))
    steps = max(1, min(n_steps, 20 * steps_per_epoch))
    best_tokens, best_labelled = [], []
    for _ in range(sims):
        order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps / steps_per_epoch))])
        peak = (0, 0)
        for k in range(steps):
            idx = order[k * rows_per_step:(k + 1) * rows_per_step]
            if len(idx):
                peak = max(peak, _first_fit(b.lengths[idx], b.labelled[idx], budget))
        best_tokens.append(peak[0])
        best_labelled.append(peak[1])
    tokens = int(np.median(best_tokens))
    return MicroBatch(tokens, int(np.median(best_labelled)), 1, tokens)


def peak_eval_batch(b: Batches, eval_batch_size: int, packing: bool) -> int:
    """Tokens of the largest evaluation batch (evaluation batches are taken in order)."""
    ev = b.eval_lengths
    return max((_batch_tokens(ev[i:i + eval_batch_size], packing) for i in range(0, len(ev), eval_batch_size)),
               default=0)


# --------------------------------------------------------------------------- activations, measured

@dataclass
class ActivationProfile:
    """Bytes autograd keeps for the backward pass: per decoder layer a + b·T, shared c + d·T."""

    a: float
    b: float
    c: float
    d: float
    resid_bytes: int  # bytes per element of the hidden states between layers

    def total(self, shape: ModelShape, tokens: int, checkpointing: bool) -> int:
        layer = self.a + self.b * tokens
        if checkpointing:  # each layer's input is kept; one layer at a time is recomputed
            layer_part = shape.layers * tokens * shape.hidden * self.resid_bytes + layer
        else:
            layer_part = shape.layers * layer
        return int(layer_part + self.c + self.d * tokens)


PROBE_VOCAB = 256
PROBE_BUDGET = 2e10
"""Largest (parameters of one layer × tokens) probed directly, a few seconds on two CPU cores;
above it both probe sizes shrink and the per-token rate is extrapolated linearly."""


def _probe_model(hf_config, lcfg, weight_dtype: torch.dtype, fast: bool = False, autocast: bool = False,
                 packing: bool = False):
    from transformers import AutoModelForCausalLM

    from lorakit.model.lora import apply_lora

    small = copy.deepcopy(hf_config)
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    text.num_hidden_layers = 2
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:2]
    text.vocab_size = PROBE_VOCAB
    text.use_cache = False  # as load_model(training=True); with a cache, packed rows are not detected
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(text, key, None)
    model = AutoModelForCausalLM.from_config(small, dtype=weight_dtype, attn_implementation="sdpa")
    model = apply_lora(model, dataclasses.replace(lcfg, init="true"))
    model.train()
    if fast:  # what lorakit.train.trainer.apply_fast_path does to the real model
        from lorakit.train import speed

        speed.apply(model, torch.bfloat16 if autocast else None, packing)
    inner = model.get_base_model()
    body = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model
    layers = getattr(body, "layers", None) or next(
        m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m) == 2)
    return model, body, layers


def _saved_bytes(model, body, layers, autocast: bool, rows: int, seq: int, packing: bool) -> tuple[int, int]:
    """(layer 1's saved bytes, everything else's) for one forward over rows × seq tokens."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    scope = ["outer"]
    by_scope: Counter[str] = Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in seen and st._cdata not in params:
            seen.add(st._cdata)
            by_scope[scope[0]] += st.nbytes()
        return t

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: scope.__setitem__(0, str(i))))
        hooks.append(layer.register_forward_hook(lambda *_: scope.__setitem__(0, "outer")))
    ids = torch.randint(0, PROBE_VOCAB, (rows, seq))
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if packing:  # examples of ~100 tokens restarting positions, as PackedCollator makes them
        inputs["position_ids"] = (torch.arange(seq) % 100).unsqueeze(0)
        from lorakit.train.speed import segment_kwargs

        inputs.update(segment_kwargs(body, inputs))
    elif rows > 1:  # a padded batch: the last row shorter, so the padding mask is in play
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[-1, seq // 2:] = 0
        inputs["attention_mask"] = mask
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = body(**inputs).last_hidden_state
        del out
    finally:
        for h in hooks:
            h.remove()
    return by_scope["1"], by_scope["0"] + by_scope["outer"] - by_scope["1"]


def probe_activations(shape: ModelShape, lcfg, weight_dtype: torch.dtype, autocast: bool,
                      rows: int, seq: int, packing: bool, fast: bool = False) -> ActivationProfile:
    """Measure saved-activation bytes on a two-layer copy of the model at two token counts."""
    model, body, layers = _probe_model(shape.hf_config, lcfg, weight_dtype, fast, autocast, packing)
    layer_params = sum(p.numel() for p in layers[1].parameters())
    scale = min(1.0, PROBE_BUDGET / max(1, layer_params * rows * seq))
    seq1 = max(8, int(seq * scale))
    seq2 = max(4, seq1 // 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread avoids OpenMP waits on a busy machine
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            l1, s1 = _saved_bytes(model, body, layers, autocast, rows, seq1, packing)
            l2, s2 = _saved_bytes(model, body, layers, autocast, rows, seq2, packing)
    finally:
        torch.set_num_threads(threads)
    t1, t2 = rows * seq1, rows * seq2
    b, d = (l1 - l2) / (t1 - t2), (s1 - s2) / (t1 - t2)
    resid = 4 if weight_dtype == torch.float32 else 2
    return ActivationProfile(a=l1 - b * t1, b=b, c=s1 - d * t1, d=d, resid_bytes=resid)


# --------------------------------------------------------------------------- the estimate

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
    if batch is not None:
        mb = batch
    elif setup.tokens_per_pass:
        mb = peak_pass(b, setup.batch_size * setup.grad_accum, setup.tokens_per_pass,
                       _n_micro(cfg, len(b.lengths), setup) // max(1, setup.grad_accum), cfg.train.seed)
    else:
        mb = peak_micro_batch(b, setup.batch_size, cfg.data.packing, _n_micro(cfg, len(b.lengths), setup),
                              cfg.train.seed)
    prof = ctx.profile(setup, mb)
    lora_scale = setup.r / cfg.lora.r
    trainable = int(shape.trainable * lora_scale)
    head_cast = shape.vocab * shape.hidden * 2 if setup.autocast else 0  # the head's 16-bit copy, saved
    ckpt = setup.checkpointing
    oversize = (batch is None and setup.oversize_checkpointing and not ckpt and setup.tokens_per_pass
                and mb.tokens > setup.tokens_per_pass)
    if oversize:  # the longest example is a checkpointed pass of its own; a normal pass may still be larger
        regular = _regular_pass(b, setup, cfg)
        per_pass = lambda m, c: (prof.total(shape, m.tokens, c) + prof.total(shape, m.tokens, False)  # noqa: E731
                                 * (HEAP_RETENTION if setup.device == "cpu" else 0) + m.labelled * shape.vocab * 12)
        if regular is not None and per_pass(regular, False) >= per_pass(mb, True):
            mb = regular
        else:
            ckpt = True
    act = prof.total(shape, mb.tokens, ckpt)
    logit_rows = mb.labelled if shape.labelled_logits else mb.tokens  # other heads: the stock loss
    train_logits = logit_rows * shape.vocab * 4 * 3 + head_cast
    eval_tokens = peak_eval_batch(b, setup.eval_batch_size, cfg.data.packing) if evaluation else 0
    eval_logits = eval_tokens * shape.vocab * _eval_logit_bytes(setup)
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
    parts["activations"] = act
    per_tok = prof.b / 1024
    other = prof.total(shape, mb.tokens, not ckpt)
    notes["activations"] = (f"{shape.layers} layers × {per_tok:.1f} KiB per token × {mb.tokens:,} tokens"
                            + (" (checkpointing: layer inputs + one layer)" if ckpt else "")
                            + (" (one example longer than a pass: checkpointed)" if oversize and ckpt else "")
                            + f"; {'without' if ckpt else 'with'} checkpointing {_fmt(other)}")
    if setup.device == "cpu":
        # Temporaries are made layer by layer with or without checkpointing: scale by the full activations.
        parts["heap retention"] = int(prof.total(shape, mb.tokens, False) * HEAP_RETENTION)
        notes["heap retention"] = (f"freed temporaries glibc keeps resident: {HEAP_RETENTION:.0%} of the "
                                   "activations without checkpointing (measured)")
    parts["logits"] = max(train_logits, eval_logits)
    rows_are = "labelled" if shape.labelled_logits else "positions"
    notes["logits"] = (f"training {_fmt(train_logits)} ({logit_rows:,} {rows_are} × {shape.vocab:,} × 4 B × 3), "
                       f"evaluation {_fmt(eval_logits)} ({eval_tokens:,} tokens × {shape.vocab:,}"
                       f" × {_eval_logit_bytes(setup)} B); the larger counts")
    return Estimate(setup, parts, notes, mb, eval_tokens)


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


def setup_for(cfg: Config, device: str, weights: str | None = None) -> Setup:
    """The setup `lorakit train` would use on `device` ('cpu' here, or a bf16-capable GPU)."""
    m, t = cfg.model, cfg.train
    if weights is None:
        if m.quantization != "none":
            weights = m.quantization
        elif m.dtype == "auto":
            weights = "bf16" if device == "cuda" else "fp32"
        else:
            weights = m.dtype
    mp = t.mixed_precision
    if mp == "auto":
        mp = "bf16" if device == "cuda" or trainer_mod.cpu_has_native_bf16() else "no"
    ckpt = m.gradient_checkpointing == "on" or (m.gradient_checkpointing == "auto" and device == "cuda")
    per_pass = trainer_mod.resolve_tokens_per_pass(cfg, device)
    return Setup(device, weights, autocast=mp != "no" and weights == "fp32", checkpointing=ckpt,
                 batch_size=t.batch_size, grad_accum=t.grad_accum, eval_batch_size=t.eval_batch_size,
                 max_length=cfg.data.max_length,
                 r=cfg.lora.r, optimizer=t.optimizer, fast=t.fast_path, tokens_per_pass=per_pass,
                 oversize_checkpointing=bool(per_pass) and m.gradient_checkpointing == "auto" and not ckpt)


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


# --------------------------------------------------------------------------- calibration

@dataclass
class Calibration:
    seconds_per_token: float
    steps: int
    tokens: list[int]
    seconds: list[float]
    start_bytes: int  # RSS (cpu) or torch's allocation (cuda) before the model was loaded
    peak_bytes: int  # peak RSS of this process (cpu) or torch's peak allocation (cuda)
    first: MicroBatch  # the warm-up micro-batch: the run's longest examples
    predicted: int = 0  # the plan's estimate for `first` without evaluation, less runtime and data


class _RssPeak:
    """Poll this process's RSS every few milliseconds in a thread and keep the maximum."""

    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def calibrate(cfg: Config, prepared, tokenizer, steps: int = 3) -> Calibration:
    """Run `steps` real training steps (forward, backward, AdamW) with lorakit's own model,
    collator and loss on real micro-batches; the first, on the largest micro-batch, is the
    warm-up (and the memory peak), the others time typical ones."""
    from lorakit.data.collate import Collator, PackedCollator
    from lorakit.model.load import load_model
    from lorakit.model.lora import apply_lora
    from lorakit.train.loss import labelled_loss, split_head

    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = trainer_mod.resolve_tokens_per_pass(cfg)
    collate = PackedCollator() if cfg.data.packing else Collator(tokenizer.pad_token_id)
    items = prepared.train
    rng = np.random.default_rng(cfg.train.seed)
    bs = cfg.train.batch_size
    by_length = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
    if budget:  # packed: passes of up to `budget` tokens, the first of the longest examples
        groups = [_fill(by_length, items, budget)] + [
            _fill(list(rng.permutation(len(items))), items, budget) for _ in range(steps - 1)]
    else:
        groups = [by_length[:bs]] + [list(rng.choice(len(items), size=min(bs, len(items)), replace=False))
                                     for _ in range(steps - 1)]
    mp = trainer_mod.resolve_mixed_precision(cfg)
    start = torch.cuda.memory_allocated() if device == "cuda" else psutil.Process().memory_info().rss
    with _RssPeak() as rss:
        model, info = load_model(cfg.model, training=True, tokenizer=tokenizer)
        model = apply_lora(model, cfg.lora)
        if device == "cuda" and cfg.model.quantization == "none":
            model.to(device)
        trainer_mod.apply_fast_path(cfg, model, info)
        fast = split_head(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        tokens, seconds = [], []
        for group in groups:
            batch = {k: v.to(device) for k, v in collate([items[i] for i in group]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            began = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16 if mp == "bf16" else torch.float16, enabled=mp != "no"):
                loss = labelled_loss(*fast, batch, n) if fast else model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - began)
            tokens.append(int(batch["input_ids"].numel()))
            if len(tokens) == 1:
                rows, seq = batch["input_ids"].shape
                first = MicroBatch(tokens[0], n, rows, seq)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    timed_t, timed_s = (tokens[1:], seconds[1:]) if steps > 1 else (tokens, seconds)
    return Calibration(sum(timed_s) / max(1, sum(timed_t)), steps, tokens, seconds, start, peak, first)


def _fill(order: list[int], items, budget: int) -> list[int]:
    """Examples taken in `order` while they fit in one pass of `budget` tokens (at least one)."""
    out, used = [], 0
    for i in order:
        n = len(items[i]["input_ids"])
        if out and used + n > budget:
            continue
        out.append(int(i))
        used += n
    return out


# --------------------------------------------------------------------------- the plan

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
    cpu: Estimate
    gpu: dict[str, Estimate]
    limit: int | None
    limit_source: str
    fit: Estimate | None
    calibration: Calibration | None
    epoch_tokens: int
    notes: list[str]


def make_plan(cfg: Config, *, device: str = "cpu", memory_gb: float | None = None, calibrate_steps: int = 3) -> Plan:
    """Everything `lorakit plan` prints, for `cfg` (not modified) on `device` ('cpu' | 'cuda')."""
    from lorakit.data.dataset import prepare
    from lorakit.model.load import load_tokenizer

    if device not in ("cpu", "cuda"):
        raise LorakitError(f"unknown device {device!r}", hint="use --device cpu or --device cuda")
    cfg = copy.deepcopy(cfg)
    runtime = psutil.Process().memory_info().rss
    notes: list[str] = []
    prepared = tokenizer = None
    try:
        tokenizer = load_tokenizer(cfg.model)
        prepared = prepare(cfg, tokenizer)
    except LorakitError as e:
        notes.append(f"data not readable ({e.message.splitlines()[0]}): every example assumed "
                     f"{cfg.data.max_length} tokens long")
    data = max(0, psutil.Process().memory_info().rss - runtime)
    n_train = len(prepared.train) if prepared else None
    auto_notes = resolve_auto(cfg, n_train) if n_train is not None else _defaults_for_auto(cfg, notes)
    batches = Batches.from_prepared(prepared) if prepared else Batches.assumed(cfg)
    ctx = Context(cfg, describe_model(cfg), batches, runtime, data)
    cpu = estimate(ctx, setup_for(cfg, "cpu"))
    gpu = {w: estimate(ctx, setup_for(cfg, "cuda", w)) for w in ("fp32", "bf16", "8bit", "4bit")}
    target = cpu if device == "cpu" else estimate(ctx, setup_for(cfg, "cuda"))
    limit, source = _memory_limit(device, memory_gb)
    fit = fitting_setup(ctx, target.setup, limit) if limit is not None and target.peak > limit else None
    calib = None
    machine = "cuda" if torch.cuda.is_available() else "cpu"
    if calibrate_steps and prepared is not None and device == machine:
        calib = calibrate(cfg, prepared, tokenizer, calibrate_steps)
        same = estimate(ctx, target.setup, batch=calib.first, evaluation=False)
        calib.predicted = same.peak - same.parts["runtime"] - same.parts.get("data", 0)
    elif calibrate_steps:
        notes.append(f"no calibration: it runs where training would ({machine}), not on {device}"
                     if prepared is not None else "no calibration without readable data")
    epoch = int(_epoch(batches, np.arange(len(batches.lengths)), cfg.train.batch_size, cfg.data.packing)[0].sum())
    return Plan(cfg, device, ctx.shape, batches, n_train, guide_row(n_train) if n_train is not None else None,
                auto_notes, target, cpu, gpu, limit, source, fit, calib, epoch, notes)


def _defaults_for_auto(cfg: Config, notes: list[str]) -> list[str]:
    """Without a dataset size 'auto' cannot be resolved: plan with the schema's defaults."""
    out = []
    for key in AUTO_KEYS:
        section, name = key.split(".")
        owner = getattr(cfg, section)
        if getattr(owner, name) == AUTO:
            default = next(f.default for f in dataclasses.fields(owner) if f.name == name)
            setattr(owner, name, default)
            out.append(f"{key}: auto → {default:g} (schema default; the dataset size is unknown)")
    if out:
        notes.append("auto values need a readable dataset; planned with the schema's defaults")
    return out


def _memory_limit(device: str, memory_gb: float | None) -> tuple[int | None, str]:
    if memory_gb is not None:
        return int(memory_gb * GiB), "--memory-gb"
    if device == "cpu":
        return psutil.virtual_memory().available, "available RAM"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return None, "no GPU here; pass --memory-gb to check the fit"


# --------------------------------------------------------------------------- printing

def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    return "\n\n".join(s for s in (_fmt_header(plan), _fmt_memory(plan.cpu, "on this CPU"), _fmt_gpu(plan),
                                    _fmt_time(plan), _fmt_guide(plan), _fmt_fit(plan),
                                    "\n".join(f"note: {n}" for n in plan.notes)) if s)


def _fmt_header(plan: Plan) -> str:
    s, c = plan.shape, plan.cfg
    pct = 100 * s.trainable / s.total
    rows = f"{plan.n_train:,} train rows" if plan.n_train is not None else "dataset size unknown"
    p = plan.batches.percentiles
    lengths = (f"tokens per example p50 {p['p50']}, p99 {p['p99']}, max {p['max']}" if p
               else f"every example assumed {c.data.max_length} tokens")
    mb = plan.target.batch
    per_pass = plan.target.setup.tokens_per_pass
    if per_pass:
        batch = (f"pass         each step's {c.train.batch_size * c.train.grad_accum} examples packed first-fit "
                 f"into passes of ≤ {per_pass:,} tokens: the largest of the run ≈ {mb.tokens:,} tokens")
    else:
        batch = (f"micro-batch  {c.train.batch_size} examples, padded, {mb.rows} rows × {mb.seq}: the largest of "
                 f"the run ≈ {mb.tokens:,} tokens")
    return (f"plan for {c.model.name} on {plan.device}: {rows}; {lengths}\n"
            f"parameters   total {s.total:,}   trainable {s.trainable:,} ({pct:.2f}%)   "
            f"{s.layers} layers, hidden {s.hidden}, vocab {s.vocab:,}\n"
            f"{batch} ({mb.labelled:,} labelled)")


def _fmt_memory(est: Estimate, where: str) -> str:
    s = est.setup
    mode = f"{s.weights} weights" + (", bf16 autocast" if s.autocast else "") + \
        f", gradient checkpointing {'on' if s.checkpointing else 'off'}"
    lines = [f"peak memory {where} ({mode})"]
    for name, value in est.parts.items():
        lines.append(f"  {name:<15}{_fmt(value):>11}   {est.notes.get(name, '')}")
    lines.append(f"  {'peak':<15}{_fmt(est.peak):>11}")
    return "\n".join(lines)


def _fmt_gpu(plan: Plan) -> str:
    cols = plan.gpu
    head = "peak memory on a GPU (bf16 compute" + \
        f", gradient checkpointing {'on' if next(iter(cols.values())).setup.checkpointing else 'off'})"
    names = {"fp32": "fp32", "bf16": "bf16", "8bit": "8-bit", "4bit": "4-bit NF4"}
    lines = [head, "  " + " " * 15 + "".join(f"{names[w]:>11}" for w in cols)]
    keys = list(next(iter(cols.values())).parts)
    for key in keys:
        lines.append(f"  {key:<15}" + "".join(f"{_fmt(e.parts[key]):>11}" for e in cols.values()))
    lines.append(f"  {'peak':<15}" + "".join(f"{_fmt(e.peak):>11}" for e in cols.values()))
    if plan.device == "cuda":
        w = plan.target.setup.weights
        lines.append(f"  this config on a GPU: the {names.get(w, w)} column")
    return "\n".join(lines)


def _fmt_time(plan: Plan) -> str:
    cal = plan.calibration
    if cal is None:
        return ""
    t = plan.cfg.train
    epoch_s = cal.seconds_per_token * plan.epoch_tokens
    steps = micro_batches_in_run(plan.cfg, len(plan.batches.lengths))
    per_epoch = math.ceil(len(plan.batches.lengths) / t.batch_size)
    run_s = epoch_s * steps / per_epoch
    timed = ", ".join(f"{s:.2f} s / {n:,} tok" for s, n in zip(cal.seconds[1:], cal.tokens[1:]))
    measure = "peak RSS" if plan.device == "cpu" else "torch peak allocation"
    return (f"time         calibration: {cal.steps} training steps on real batches (first = warm-up; {timed})\n"
            f"             {1 / cal.seconds_per_token:,.0f} tokens/s → one epoch ({plan.epoch_tokens:,} tokens, "
            f"{per_epoch} micro-batches) ≈ {_duration(epoch_s)}; this run ({steps} micro-batches) ≈ "
            f"{_duration(run_s)}, evaluation not included\n"
            f"             calibration {measure}: +{_fmt(cal.peak_bytes - cal.start_bytes)} over this process before "
            f"loading the model, predicted +{_fmt(cal.predicted)} for its largest micro-batch "
            f"({cal.first.tokens:,} tokens, no evaluation)")


def _fmt_guide(plan: Plan) -> str:
    row = plan.row
    if row is None:
        return "guide        dataset size unknown: the guide's table needs readable data"
    lines = [f"guide        {row.name} dataset ({row.rows}): the guide's table, low end of each range"]
    c = plan.cfg
    for key in AUTO_KEYS:
        section, name = key.split(".")
        rng = row.ranges.get(name, f"{getattr(row, name):g}")
        lines.append(f"  {key:<18} guide {rng:<8} config {getattr(getattr(c, section), name):g}")
    lines.extend(f"  {n}" for n in plan.auto_notes)
    if not plan.auto_notes:
        lines.append("  no 'auto' values in the config (lora.r: auto, train.lr: auto, ... take the guide's)")
    return "\n".join(lines)


def _fmt_fit(plan: Plan) -> str:
    if plan.limit is None:
        return f"fit          {plan.limit_source}"
    if plan.target.peak <= plan.limit:
        return f"fit          fits: {_fmt(plan.target.peak)} of {_fmt(plan.limit)} ({plan.limit_source})"
    head = f"fit          does not fit: {_fmt(plan.target.peak)} > {_fmt(plan.limit)} ({plan.limit_source})"
    if plan.fit is None:
        return head + "\n             no change tried here fits; use a smaller model or a larger machine"
    args = " ".join(plan.fit.setup.overrides(plan.target.setup))
    return f"{head}\n             this fits ({_fmt(plan.fit.peak)}): lorakit train CONFIG {args}"
