"""Training-time changes to a PEFT LoRA model that make the same work cheaper.

Each one leaves the maths of a training step as it was (tests/test_speed.py checks that), and
each was kept because it measured faster on the benchmark (BENCHMARKS.md):

- `fast_lora_dropout`: LoRA's dropout draws its keep-mask from 16-bit lanes of one 64-bit
  random word instead of `bernoulli_` per element (4× faster on CPU, where dropout was a fifth
  of the step), makes the mask as 0/1 in the type it multiplies (uint8 bytes for fp32: no
  widening copy) and keeps it for the backward, and hands the 16-bit copy that autocast's
  matmul needs straight to `lora_A`.
- `fuse_lora_linears`: each plain LoRA linear as one autograd node (`_LoraLinear`) instead of
  PEFT's eight, under autocast or in an fp32 run.
- `freeze_in_half`: frozen base `nn.Linear` weights stored in the autocast dtype. Under autocast
  every matmul reads a bf16 copy of them anyway, cast again at every forward; storing that
  copy once halves their memory and drops the cast. Only when training runs under autocast.
- `use_segment_attention`: attention for padding-free packed rows, one causal SDPA call per
  example. transformers turns restarting position ids into a dense block-diagonal mask over the
  whole row, so attention cost grows with the square of the packed length instead of the sum of
  squares of the examples, and CPU SDPA falls back to its masked kernel.

All of them change the model object in place, for training only (16-bit base weights stay
16-bit). Each marks the model; `require_fresh` is how later stages refuse such an object.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.collate import SEGMENTS
from lorakit.errors import LorakitError

log = logging.getLogger(__name__)

ATTENTION = SEGMENTS
"""Name of the attention implementation registered with transformers; the packing code
(`lorakit.data.collate.segment_kwargs`) passes example bounds under the same name."""

# --------------------------------------------------------------------------- dropout


class _MaskedScale(torch.autograd.Function):
    """y = x·keep·scale, saving only the mask (bytes, or 0/1 in a 16-bit output's type) for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float, out_dtype: torch.dtype):
        ctx.save_for_backward(keep)
        ctx.scale, ctx.in_dtype = scale, x.dtype
        y = x.to(out_dtype) if x.dtype != out_dtype else x.clone()
        return y.mul_(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep * ctx.scale).to(ctx.in_dtype), None, None, None


def random_words(count: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` uniform 64-bit words (int64) on `device`.

    On the CPU they come from numpy's SFC64, seeded by one draw from torch's generator (the default
    one unless `generator` is given), so a seeded run draws the same masks and a resumed run, whose
    torch RNG state the Trainer restores, too. torch's CPU generator is a Mersenne Twister behind a
    lock: serial code, 0.60 ms per 196,608 words here against SFC64's 0.30 ms, while the second
    core waits (the dropout draw was 6 % of the main thread's time in a step)."""
    if device.type != "cpu":
        words = torch.empty(count, dtype=torch.int64, device=device)
        return words.random_(-(2**63), 2**63 - 1, generator=generator)
    import numpy as np

    seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))


ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}
"""The bit pattern of 1.0 in each 16-bit float type (0.0 is all zeros in every one)."""


def keep_mask(shape: torch.Size, p: float, device: torch.device, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.bool):
    """Bernoulli(1 - p) keep-mask from 16-bit lanes of full-range 64-bit random words.

    `random_()` with no bounds on int64 leaves the top bit 0, so the range is given explicitly;
    each lane is then uniform over [-32768, 32767] and p is rounded to a multiple of 1/65536.

    `dtype` is the type the mask multiplies. float32 gives the bool mask viewed as uint8 0/1 (the
    same byte): torch multiplies a uint8 into fp32 in vector code and a bool in scalar code, 0.15
    against 0.52 ms at 512 × 1536 here. bfloat16 or float16 gives 0.0 / 1.0 in that type, made in
    place in the random words:
    clamping a lane to [cut - 1, cut] leaves cut exactly where it is kept, so the lane minus
    (cut - 1) is 1 or 0, and times 1.0's bit pattern it *is* that float. A bool mask multiplied
    into a 16-bit tensor costs a widening copy of the mask first, which is scalar code in torch's
    CPU kernels: 16× the time of the product itself at 512 × 1536 (BENCHMARKS.md, Speed II).
    """
    n = math.prod(shape)
    lanes = random_words((n + 3) // 4, device, generator).view(torch.int16)[:n].view(shape)
    cut = -32768 + round(p * 65536)
    if dtype not in ONE_BITS:
        keep = lanes >= cut
        return keep.view(torch.uint8) if dtype == torch.float32 else keep
    if cut == -32768:  # p rounds to 0: every lane is kept (and cut - 1 is no int16)
        return torch.ones(shape, dtype=dtype, device=device)
    return lanes.clamp_(cut - 1, cut).sub_(cut - 1).mul_(ONE_BITS[dtype]).view(dtype)


def kept_fraction(p: float) -> float:
    """The exact keep probability `keep_mask` draws for a dropout p."""
    return 1.0 - round(p * 65536) / 65536


class FastDropout(nn.Module):
    """Drop-in for `nn.Dropout(p)` in front of `lora_A`; same distribution, cheaper draw."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        out_dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        keep = keep_mask(x.shape, self.p, x.device, dtype=out_dtype)
        return _MaskedScale.apply(x, keep, 1.0 / kept_fraction(self.p), out_dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def fast_lora_dropout(model: nn.Module) -> int:
    """Replace every LoRA `nn.Dropout` with `FastDropout`; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is nn.Dropout and drop.p > 0:
                drops[name] = FastDropout(drop.p)
                replaced += 1
    if replaced:
        _mark(model, "LoRA dropouts replaced by FastDropout")
    return replaced


# --------------------------------------------------------------------------- fused LoRA linear


class _LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·((x⊙keep·d)·Aᵀ)·Bᵀ in the autocast dtype (fp32 in an fp32 run), as one
    autograd node.

    PEFT runs this as eight nodes (cast, base matmul, dropout, cast, A, B, scale, add), each
    keeping its own copy of what it needs. This one keeps the input in the compute dtype (shared
    by every projection that reads the same hidden state), the keep-mask and the rank-r
    intermediate (PEFT keeps a dropped copy of the input per projection), and returns the input's
    gradient in the input's dtype, so gradients from several projections still add up in fp32 as
    they do under autocast.
    """

    @staticmethod
    def forward(ctx, x, xh, weight, bias, lora_a, lora_b, keep, drop_scale: float, scale: float):
        # Scalars are applied to the rank-r side, where they cost nothing.
        a, b = lora_a.to(xh.dtype), lora_b.to(xh.dtype)
        xd = xh if keep is None else xh * keep
        h = xd @ a.t()  # (…, r), without the dropout scale
        y = F.linear(xh, weight, None if bias is None else bias.to(xh.dtype))
        y2 = y.view(-1, y.shape[-1])
        y2.addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=scale * drop_scale)
        ctx.save_for_backward(xh, weight, lora_a, lora_b, keep, h)
        ctx.drop_scale, ctx.scale, ctx.x_dtype = drop_scale, scale, x.dtype
        ctx.bias_grad = bias is not None and bias.requires_grad
        return y

    @staticmethod
    def backward(ctx, gy):
        xh, weight, lora_a, lora_b, keep, h = ctx.saved_tensors
        a, b = lora_a.to(xh.dtype), lora_b.to(xh.dtype)
        s = ctx.scale * ctx.drop_scale
        gy2 = gy.reshape(-1, gy.shape[-1])
        grad_b = (gy2.t() @ h.view(-1, h.shape[-1])).mul_(s).to(lora_b.dtype)
        gh = (gy2 @ b).mul_(s)  # (N, r): gradient at A's output, dropout scale included
        xd = xh if keep is None else xh * keep
        grad_a = (gh.t() @ xd.view(-1, xd.shape[-1])).to(lora_a.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gxd = gh @ a
            if keep is not None:
                gxd.mul_(keep.view(-1, keep.shape[-1]))
            grad_x = torch.addmm(gxd, gy2, weight).view(*gy.shape[:-1], -1).to(ctx.x_dtype)
        grad_bias = gy2.sum(0).float() if ctx.bias_grad else None
        return grad_x, None, None, grad_bias, grad_a, grad_b, None, None, None


def _half_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, cast once per tensor: q/k/v (and gate/up) read the same hidden state."""
    if x.dtype == dtype:
        return x
    cached = getattr(x, "_lorakit_half", None)
    if cached is None or cached.dtype != dtype or cached.shape != x.shape:
        with torch.no_grad():
            cached = x.to(dtype)
        x._lorakit_half = cached
    return cached


EVAL = "the module is in eval mode"
NO_AUTOCAST = "autocast is off and the input or the base weight is not fp32"
EXPECTED = frozenset({EVAL, NO_AUTOCAST})
"""Fallbacks that are the normal state outside a training step (evaluation, generation, a run
without mixed precision): logged at DEBUG. Every other reason is logged at INFO, once per model
and reason, naming the first module it was seen on: it means a training step runs slower than
the fast path promised, and says why."""


def compute_dtype(module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused call of `module` on `x` computes in: autocast's, or fp32 for an fp32 input
    over an fp32 base without autocast (an fp32 run, where PEFT's forward is fp32 throughout too);
    None for any other call without autocast, which keeps PEFT's forward."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    weight = getattr(getattr(module, "base_layer", None), "weight", None)
    if x.dtype == torch.float32 and weight is not None and weight.dtype == torch.float32:
        return torch.float32
    return None


def fusable(module, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """None when this call of a PEFT `lora.Linear` can run as one `_LoraLinear` node; else why not.

    The node computes PEFT's vanilla LoRA forward (peft/tuners/lora/layer.py, `Linear.forward`)
        y = base_layer(x) + lora_B(lora_A(dropout(x))) · scaling
    for one adapter, under autocast over a frozen base `nn.Linear` stored in the autocast dtype, or
    in fp32 throughout (`compute_dtype`).
    Anything else PEFT's forward does differently is a reason here; the order puts the
    per-call state first, then the module's set-up (`fusable_setup`).
    """
    if not module.training:
        return EVAL
    dtype = compute_dtype(module, x)
    if dtype is None:
        return NO_AUTOCAST
    if args or kwargs:  # e.g. adapter_names (mixed-adapter batches), or a variant's keywords
        named = ([f"{len(args)} positional"] if args else []) + sorted(kwargs or ())
        return f"called with extra arguments ({', '.join(named)})"
    if module.disable_adapters:
        return "adapters are disabled"
    if module.merged:
        return "the adapter is merged into the base weight"
    return fusable_setup(module, dtype)


def fusable_setup(module, dtype: torch.dtype) -> str | None:
    """The part of `fusable` that holds for every call until the model is changed: the active
    adapter, its kind, its dropout and the base layer, against the compute `dtype`."""
    active = module.active_adapters
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused node computes one)"
    name = active[0]
    if name not in module.lora_A:
        return f"the active adapter {name!r} has no weights in this module"
    variant = module.lora_variant.get(name)
    if variant is not None:
        return f"LoRA variant {type(variant).__name__}" + (" (DoRA, use_dora)" if module.use_dora.get(name) else "")
    if module.lora_bias.get(name) or module.lora_A[name].bias is not None or module.lora_B[name].bias is not None:
        return "the adapter has a bias (lora_bias)"
    base = module.base_layer
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"the base layer is {type(base).__name__}, not a plain nn.Linear"
    if base.weight.dtype != dtype:
        return f"the base weight is {base.weight.dtype}, autocast computes in {dtype}"
    if base.weight.requires_grad:
        return "the base weight is trainable"
    drop = module.lora_dropout[name]
    if type(drop) not in (nn.Dropout, FastDropout, nn.Identity):
        return f"LoRA dropout {type(drop).__name__} (the fused node draws nn.Dropout's mask)"
    return None


def _fused_forward(module, stock_forward, where: str, logged: set, x: torch.Tensor, *args, **kwargs):
    reason = fusable(module, x, args, kwargs)
    if reason is not None:
        if reason not in logged:
            logged.add(reason)
            log.log(logging.DEBUG if reason in EXPECTED else logging.INFO,
                    "fast path: %s (%s) runs PEFT's forward: %s (not repeated for other modules)",
                    where, type(module).__qualname__, reason)
        return stock_forward(x, *args, **kwargs)
    name = module.active_adapters[0]
    base = module.base_layer
    dtype = compute_dtype(module, x)
    drop = module.lora_dropout[name]
    p = drop.p if drop.training and not isinstance(drop, nn.Identity) else 0.0  # Identity: PEFT's lora_dropout 0
    keep = keep_mask(x.shape, p, x.device, dtype=dtype) if p > 0 else None
    drop_scale = 1.0 / kept_fraction(p) if p > 0 else 1.0
    return _LoraLinear.apply(x, _half_input(x, dtype), base.weight, base.bias, module.lora_A[name].weight,
                             module.lora_B[name].weight, keep, drop_scale, module.scaling[name])


def _lora_linears(model: nn.Module):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [(name, m) for name, m in model.named_modules() if type(m) is LoraLinear]


def fuse_lora_linears(model: nn.Module) -> int:
    """Route plain LoRA linears through `_LoraLinear` while training (under autocast, or in fp32);
    returns the count.

    Each call that `fusable` turns down runs PEFT's own forward (eval, several adapters, DoRA,
    merged weights, a 16-bit base without autocast, ...) and is logged with its reason, so saving,
    loading and generation are untouched and a slow step says why.
    """
    from functools import partial

    logged: set[str] = set()  # reasons already logged for this model
    count = 0
    for where, module in _lora_linears(model):
        if "forward" not in vars(module):
            module.forward = partial(_fused_forward, module, module.forward, where, logged)
            count += 1
    if count:
        _mark(model, "LoRA forwards fused")
    return count


def unfusable(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """How many LoRA linears `fusable_setup` turns down for compute `dtype`, by reason: these
    never run fused while the model stays as it is (DoRA, a LoRA bias, a base weight in another dtype)."""
    out: dict[str, int] = {}
    for _, module in _lora_linears(model):
        reason = fusable_setup(module, dtype)
        if reason is not None:
            out[reason] = out.get(reason, 0) + 1
    return out


# --------------------------------------------------------------------------- frozen weights


def freeze_in_half(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen fp32 weights of LoRA-wrapped linears in `dtype`; returns bytes saved.

    Only base layers of LoRA modules: their weights are frozen, and only ever read through
    autocast's matmul. Embeddings, norms and the LM head keep their dtype (the head is often
    tied to the embedding, which is not a matmul input under autocast).
    """
    saved = 0
    cast = set()
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, nn.Linear) or not hasattr(module, "lora_A"):
            continue
        for p in base.parameters(recurse=False):
            if p.requires_grad or p.dtype != torch.float32:
                continue
            saved += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
            p.data = p.data.to(dtype)
            cast.add(id(p))
    if saved:
        # transformers maps safetensors files and its tensors view that mapping: the fp32 pages just
        # read stay resident while any weight still points into the file. Copy the others out so
        # the mapping, and the fp32 copy with it, is released.
        for p in model.parameters():
            if id(p) not in cast and not p.requires_grad:
                p.data = p.data.clone()
        _mark(model, f"LoRA base weights stored in {str(dtype).removeprefix('torch.')}")
    return saved


# --------------------------------------------------------------------------- attention per example

CPU_ATTENTION_DTYPE = torch.float32
"""CPU: packed examples attend in fp32 even under bf16 autocast. torch's CPU flash-attention
backward in bf16 took twice the fp32 time at 64-128 tokens and 12% more at 256 (2 cores,
AVX512-BF16), and the quick benchmark's training loop went 28.3 s → 22.6 s with fp32."""


class _SegmentAttention(torch.autograd.Function):
    """Causal attention per example of a packed row, in fp32 on 16-bit q/k/v, as one autograd node.

    The same kernel calls as SDPA per example (torch's CPU flash attention, forward and backward),
    without what autograd builds around a loop of them: every example's q/k/v slice cast on its
    own (a strided cast, which torch runs as scalar code), and in the backward one zero-filled
    full-length gradient per slice and per tensor, added up (O(examples × length) per layer).
    Here q/k/v are cast once per layer, each example's output and gradients are written into one
    buffer, and the results are cast back once. Grouped-query k/v are passed as they are: the
    kernel reads the shared heads.
    """

    @staticmethod
    def forward(ctx, query, key, value, bounds: tuple[int, ...], scaling):
        up = CPU_ATTENTION_DTYPE
        q, k, v = query.to(up), key.to(up), value.to(up)
        b, h, t, d = q.shape
        out = q.new_empty(b, t, h, d)  # the layout the attention output is returned in
        lse = q.new_empty(b, h, t)
        for s, e in zip(bounds[:-1], bounds[1:]):
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], 0.0, True, scale=scaling)[:2]
            out[:, s:e] = o.transpose(1, 2)
            lse[:, :, s:e] = l
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bounds, ctx.scaling, ctx.dtypes = bounds, scaling, (query.dtype, key.dtype, value.dtype)
        return out.to(query.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        g = grad.to(q.dtype).transpose(1, 2)  # (b, h, t, d) view
        o = out.transpose(1, 2)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for s, e in zip(ctx.bounds[:-1], ctx.bounds[1:]):
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g[:, :, s:e], q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], o[:, :, s:e], lse[:, :, s:e], 0.0, True,
                scale=ctx.scaling)
            dq[:, :, s:e], dk[:, :, s:e], dv[:, :, s:e] = gq, gk, gv
        qt, kt, vt = ctx.dtypes
        return dq.to(qt), dk.to(kt), dv.to(vt), None, None


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """Causal SDPA per example of a packed row; the stock SDPA path for everything else."""
    bounds = kwargs.pop(SEGMENTS, None)
    if bounds is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if query.device.type == "cpu" and value.dtype != CPU_ATTENTION_DTYPE and dropout == 0:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        with torch.autocast("cpu", enabled=False):
            return _SegmentAttention.apply(query, key, value, tuple(int(i) for i in bounds), scaling), None
    gqa = query.shape[1] != key.shape[1]  # grouped-query heads: SDPA reads the shared k/v, no copies
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                   enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def use_segment_attention(model: nn.Module) -> bool:
    """Switch an SDPA model to `segment_attention`; False (and unchanged) for other attention."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return False
    _register()
    for sub in inner.modules():
        c = getattr(sub, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == "sdpa":
            c._attn_implementation = ATTENTION
    _mark(model, "attention per packed example")
    return True


def apply(model: nn.Module, half: torch.dtype | None, packing: bool) -> dict:
    """Everything above, on a PEFT model about to train: `half` is the autocast dtype (None without
    autocast or over quantized weights), `packing` whether rows are packed. Without autocast the
    LoRA linears are fused in fp32 when every one sits on a frozen fp32 `nn.Linear` (an fp32 run;
    a quantized base has none). Returns what changed: bytes saved by 16-bit weights, fused linears,
    replaced dropouts, per-example attention, and `unfused`: LoRA linears that will never run
    fused, by reason (also logged at INFO)."""
    linears = _lora_linears(model)
    fp32 = half is None and bool(linears) and all(
        type(m.base_layer) is nn.Linear and m.base_layer.weight.dtype == torch.float32 for _, m in linears)
    saved = freeze_in_half(model, half) if half is not None else 0
    fused = fuse_lora_linears(model) if half is not None or fp32 else 0
    done = {"saved": saved, "fused": fused, "dropouts": fast_lora_dropout(model),
            "segments": packing and use_segment_attention(model)}
    done["unfused"] = unfusable(model, half or torch.float32) if fused else {}
    for reason, n in done["unfused"].items():
        log.info("fast path: %d of %d LoRA linears keep PEFT's forward: %s", n, fused, reason)
    return done


# --------------------------------------------------------------------------- kernel caches

KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "16"}
"""Capacities for the two caches under torch's 16-bit matmul on the CPU: oneDNN's primitive cache
and ideep's LRU of computations, 1,024 entries each by default. Both key on the shape, and every
packed pass has a length of its own, so they filled with entries that were never used again: heap
in use grew by about 44 MiB a step and levelled off only when both were full, and a 30-step run
peaked at 2,636 MiB against 1,890 MiB for 4 steps. With these capacities the heap in use stayed at
452 MiB from step 1, the peaks were 1,787 and 1,747 MiB, and the time was unchanged (BENCHMARKS.md).
A pass needs about 15 GEMM shapes forward and backward, so 64 still reuses within a pass."""


def bound_kernel_caches() -> dict[str, str]:
    """Set `KERNEL_CACHES` in the environment where the user has not; returns what was set.

    Both libraries read the variable when they make their first entry, so this works when called
    before the process's first 16-bit matmul (train() calls it first) and has no effect after."""
    import os

    done = {}
    for name, value in KERNEL_CACHES.items():
        if name not in os.environ:
            os.environ[name] = done[name] = value
    return done


# --------------------------------------------------------------------------- training-only mark

MARK = "lorakit_training_only"
"""Attribute on a model object changed in place by this module: the list of what was changed."""


def _holders(model: nn.Module) -> list[nn.Module]:
    """The objects a later stage may be handed: the PeftModel, its tuner and the transformers model."""
    out = [model]
    if hasattr(model, "get_base_model"):
        out += [model.base_model, model.get_base_model()]
    return out


def _mark(model: nn.Module, change: str) -> None:
    for holder in _holders(model):
        changes = vars(holder).setdefault(MARK, [])  # vars: PeftModel forwards unknown names to its base
        if change not in changes:
            changes.append(change)


def training_changes(model: nn.Module) -> list[str]:
    """What the fast path changed in place on this model object; [] for a freshly loaded one."""
    out: list[str] = []
    for holder in _holders(model):
        out += [c for c in vars(holder).get(MARK, ()) if c not in out]
    return out


def require_fresh(model: nn.Module, stage: str) -> None:
    """Refuse a model object that trained through the fast path; merge, export and serve call it.

    Such an object keeps bf16 base weights for good (`freeze_in_half`) and forwards and attention
    meant for training, so a merge or export from it would silently lose precision. Those stages
    reload the base from disk instead (DESIGN.md: later stages never reuse a trained model object).
    """
    changes = training_changes(model)
    if changes:
        raise LorakitError(
            f"this model object was changed for training by lorakit's fast path ({'; '.join(changes)}); "
            f"{stage} reloads the base from disk",
            hint=f"give {stage} the run or adapter folder (or a model loaded from disk), not the model object "
                 "that was trained",
        )
