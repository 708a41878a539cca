"""Training-time changes to a PEFT LoRA model that make the same work cheaper.

Each one leaves the maths of a training step as it was (tests/test_speed.py checks that), and
each was kept because it measured faster on the benchmark (BENCHMARKS.md):

- `fast_lora_dropout`: LoRA's dropout as `model.dropout.FastDropout`, which draws its keep-mask
  from 16-bit lanes of one 64-bit random word instead of `bernoulli_` per element (4× faster on
  CPU, where dropout was a fifth of the step), and hands the 16-bit copy that autocast's matmul
  needs straight to `lora_A`.
- `fuse_lora_linears` (model/lora_runtime.py, with the decoder's LoRA forwards): each plain LoRA
  linear as one autograd node instead of PEFT's eight, under autocast or in an fp32 run.
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

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.collate import SEGMENTS
from lorakit.errors import LorakitError
from lorakit.model.dropout import FastDropout
from lorakit.model import lora_runtime
from lorakit.model.lora_runtime import lora_linears, unfusable

log = logging.getLogger(__name__)

ATTENTION = SEGMENTS
"""Name of the attention implementation registered with transformers; the packing code
(`lorakit.data.collate.segment_kwargs`) passes example bounds under the same name."""

# --------------------------------------------------------------------------- dropout


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


def fuse_lora_linears(model: nn.Module) -> int:
    """model/lora_runtime.py's fused forward on every LoRA linear (each call it cannot take runs
    PEFT's forward), marked as a training change; returns the count."""
    count = lora_runtime.fuse_lora_linears(model)
    if count:
        _mark(model, "LoRA forwards fused")
    return count


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
    """Causal SDPA per example of a packed row, windowed on a sliding-window layer (Mistral,
    Gemma 3, Qwen2 with use_sliding_window) where an example is longer than the window; the stock
    SDPA path for everything else."""
    bounds = kwargs.pop(SEGMENTS, None)
    if bounds is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if kwargs.get("softcap"):  # use_segment_attention declines such models; never compute them uncapped
        raise RuntimeError("segment attention cannot soft-cap attention logits")
    bounds = tuple(int(i) for i in bounds)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    windowed = bool(window) and max(e - s for s, e in zip(bounds[:-1], bounds[1:])) > window
    if query.device.type == "cpu" and value.dtype != CPU_ATTENTION_DTYPE and dropout == 0 and not windowed:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        with torch.autocast("cpu", enabled=False):
            return _SegmentAttention.apply(query, key, value, bounds, scaling), None
    gqa = query.shape[1] != key.shape[1]  # grouped-query heads: SDPA reads the shared k/v, no copies
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        mask = None
        if window and e - s > window:  # query i sees keys i - window < j <= i, as transformers' sliding mask
            i = torch.arange(e - s, device=query.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                                   scale=scaling, enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def segment_attention_declined(model: nn.Module) -> str | None:
    """Why `segment_attention` cannot stand in for this model's attention (None: it can)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    if cfg is None:
        return "the model has no transformers config"
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "attn_logit_softcapping", None):
        return "its attention logits are soft-capped (attn_logit_softcapping), which SDPA cannot compute"
    kernel = getattr(cfg, "_attn_implementation", None)
    if kernel not in ("sdpa", ATTENTION):
        return f"it is loaded with {kernel!r} attention (model.attn_implementation), not SDPA"
    return None


def use_segment_attention(model: nn.Module) -> bool:
    """Switch an SDPA model to `segment_attention`; False (and unchanged) where it is declined."""
    if segment_attention_declined(model) is not None:
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
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
    replaced dropouts, per-example attention (or `segments_declined`: why not), and `unfused`:
    LoRA linears that will never run fused, by reason (both also logged at INFO)."""
    linears = lora_linears(model)
    fp32 = half is None and bool(linears) and all(
        type(m.base_layer) is nn.Linear and m.base_layer.weight.dtype == torch.float32 for _, m in linears)
    saved = freeze_in_half(model, half) if half is not None else 0
    fused = fuse_lora_linears(model) if half is not None or fp32 else 0
    done = {"saved": saved, "fused": fused, "dropouts": fast_lora_dropout(model),
            "segments": packing and use_segment_attention(model)}
    done["segments_declined"] = segment_attention_declined(model) if packing and not done["segments"] else None
    if done["segments_declined"]:
        log.info("fast path: packed examples attend through transformers' own attention (a block-diagonal "
                 "mask): attention per example declined, %s", done["segments_declined"])
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
