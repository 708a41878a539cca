"""LoRA at run time: the forwards lorakit installs on PEFT's LoRA linears, for training (one
adapter as one fused autograd node) and for decoding (several adapters in one batch, each row
with its own). Both compute plain LoRA, y = base(x) + lora_B(lora_A(dropout(x))) · scaling, and
`plain_lora` is the one rule for which layers that is; anything else keeps PEFT's forward.

Training (`fuse_lora_linears`, switched on by the training fast path, train/speed.py): PEFT runs
a LoRA linear as eight autograd nodes (cast, base matmul, dropout, cast, A, B, scale, add), each
keeping its own copy of what it needs; `_LoraLinear` is one node that keeps the input once in the
compute dtype (shared by every projection that reads the same hidden state), the keep-mask and
the rank-r intermediate. A call it cannot take (eval mode, several adapters, DoRA, ...) runs
PEFT's forward and is logged once with the reason.

Decoding (`StackedLora`, installed by infer/decoder.py):
Rows of different adapters share every product. Each plain LoRA linear holds its adapters side by
side (`Stack`: A of all adapters stacked, B of all adapters joined), so a forward costs one A and
one B product per layer whatever the mix, and a 0/1 mask keeps each row to its own adapter's
columns (the other adapters' terms are exact zeros). PEFT's `adapter_names` path instead gathers
and multiplies each adapter's rows separately: measured on SmolLM2 at 32 rows, that made a
3-adapter step 1.8x a 1-adapter step. Layers this cannot express (LoRA embeddings, a LoRA variant,
lora_bias, modules_to_save copies) keep PEFT's path, handed the rows' adapter names by a
pre-forward hook.

Which adapter each row uses reaches the layers through the `StackedLora` object installed on the
model (its `plan`, set by the decoder around one forward): an explicit context object, not a
thread-local. Installing is reversible: `uninstall` (or leaving the `with` block) gives every
module back the very forward it had (the class's, or the training fast path's fused one), so a
model the decoder has served trains again in the same process.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.model.dropout import FastDropout, keep_mask, kept_fraction

log = logging.getLogger(__name__)

_MISSING = object()


def plain_lora(module, name: str) -> str | None:
    """None when adapter `name` of the PEFT LoRA layer `module` is plain LoRA on a plain linear —
    y = base(x) + lora_B(lora_A(dropout(x))) · scaling, which both the decoder's stacks and the
    training fast path's fused node compute; else why not. The one owner of that rule."""
    if name not in getattr(module, "lora_A", {}):
        return f"the adapter {name!r} has no weights in this module"
    variant = getattr(module, "lora_variant", {}).get(name)
    if variant is not None or module.use_dora.get(name, False):
        return f"LoRA variant {type(variant).__name__}" + (" (DoRA, use_dora)" if module.use_dora.get(name) else "")
    if getattr(module, "lora_bias", {}).get(name) or module.lora_A[name].bias is not None \
            or getattr(module.lora_B[name], "bias", None) is not None:
        return "the adapter has a bias (lora_bias)"
    base = module.base_layer
    if not isinstance(base, torch.nn.Linear) or type(base).forward is not torch.nn.Linear.forward:
        return f"the base layer is {type(base).__name__}, not a plain nn.Linear"
    return None


# --------------------------------------------------------------------------- training: one adapter as one node


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
    adapter is plain LoRA (`plain_lora`, the rule the decoder's stacks follow too), and its
    dropout and base weight suit the compute `dtype`."""
    active = module.active_adapters
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused node computes one)"
    name = active[0]
    if name not in module.lora_A:
        return f"the active adapter {name!r} has no weights in this module"
    reason = plain_lora(module, name)
    if reason is not None:
        return reason
    base = module.base_layer
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


def lora_linears(model: nn.Module):
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
    for where, module in lora_linears(model):
        if "forward" not in vars(module):
            module.forward = partial(_fused_forward, module, module.forward, where, logged)
            count += 1
    return count


def unfusable(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """How many LoRA linears `fusable_setup` turns down for compute `dtype`, by reason: these
    never run fused while the model stays as it is (DoRA, a LoRA bias, a base weight in another dtype)."""
    out: dict[str, int] = {}
    for _, module in lora_linears(model):
        reason = fusable_setup(module, dtype)
        if reason is not None:
            out[reason] = out.get(reason, 0) + 1
    return out


# --------------------------------------------------------------------------- decoding: several adapters per batch


class Stack:
    """One LoRA linear's adapters side by side: A (sum of ranks x in), B (out x sum of ranks), and
    `layout`, each adapter's column span and scale (hashable: layers with the same adapters and
    ranks share one mask per forward)."""

    @torch.no_grad()
    def __init__(self, module, names: list[str]):
        self.A = torch.cat([module.lora_A[n].weight for n in names], 0)
        self.B = torch.cat([module.lora_B[n].weight for n in names], 1)
        spans, at = [], 0
        for n in names:
            r = module.lora_A[n].weight.shape[0]
            spans.append((n, at, at + r, float(module.scaling[n])))
            at += r
        self.layout = (tuple(spans), at)


class Plan:
    """One forward's adapters — one name per batch row, or with `per_token` one per position of a
    packed row — and the mask and scales each layout needs (built once per forward and layout,
    shared by every layer with that layout). `row_names`: what PEFT's own `adapter_names` gets (one
    per batch row) in the layers without a stack."""

    def __init__(self, names: list[str], device, *, per_token: bool = False, row_names: list[str] | None = None):
        self.names, self.device, self.per_token = names, device, per_token
        self.row_names = row_names if row_names is not None else names
        self._masks: dict = {}

    def mask(self, layout, dtype):
        got = self._masks.get((layout, dtype))
        if got is None:
            spans, width = layout
            sel = torch.zeros((len(self.names), 1, width), dtype=dtype, device=self.device)
            scale = torch.zeros((len(self.names), 1, 1), dtype=dtype, device=self.device)
            where = {n: (a, b, sc) for n, a, b, sc in spans}
            used = False
            for i, n in enumerate(self.names):
                if n in where:
                    a, b, sc = where[n]
                    sel[i, 0, a:b] = 1
                    scale[i, 0, 0] = sc
                    used = True
            if self.per_token:  # (positions, 1, w) -> (1, positions, w): one packed batch row
                sel, scale = sel.transpose(0, 1), scale.transpose(0, 1)
            got = self._masks[(layout, dtype)] = (sel, scale) if used else (None, None)
        return got


class StackedLora:
    """The stacks installed on a model's LoRA linears (see the module docstring). `plan` is None
    outside a decoder forward: every module then runs the forward it had before."""

    def __init__(self, model, adapters: list[str]):
        self.model = model
        self.plan: Plan | None = None
        self.grouped = False  # some layer keeps PEFT's per-adapter path: the decoder pads each adapter's rows
        self.shapes: set[tuple[int, int]] = set()  # (in, out) of every product a forward runs
        self._saved: dict[int, tuple[Any, Any]] = {}  # id -> (module, its own forward attribute or _MISSING)
        self._stacks: dict[int, Stack | None] = {}
        self._hooks: dict[int, Any] = {}
        self.refresh(adapters)

    def __enter__(self) -> "StackedLora":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def refresh(self, adapters: list[str]) -> None:
        """(Re)build every LoRA linear's stack from `adapters` (after a load or an unload)."""
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear as LoraLinear

        try:
            from peft.utils.other import AuxiliaryTrainingWrapper
        except ImportError:  # pragma: no cover - older PEFT
            AuxiliaryTrainingWrapper = ()
        loaded = set(adapters)
        shapes, grouped = set(), False
        for m in self.model.modules():
            if isinstance(m, torch.nn.Linear) and not isinstance(m, LoraLayer):
                shapes.add((m.in_features, m.out_features))
            names = [n for n in getattr(m, "lora_A", {}) if n in loaded] if isinstance(m, LoraLayer) else []
            if isinstance(m, LoraLinear) and not m.merged and all(plain_lora(m, n) is None for n in names):
                self._install(m)
                self._stacks[id(m)] = stack = Stack(m, names) if names else None
                if stack is not None:
                    width = stack.layout[1]
                    shapes |= {(m.in_features, width), (width, m.out_features)}
            elif isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)):
                self._stacks[id(m)] = None  # a stacked layer that now holds an unstackable adapter
                grouped = True  # its own per-adapter products (an embedding's LoRA lives in other dicts)
                if id(m) not in self._hooks:
                    self._hooks[id(m)] = m.register_forward_pre_hook(self._adapter_names, with_kwargs=True)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is not None:  # lm_head's product is left out: probing it is seconds of work
            shapes.discard((head.in_features, head.out_features))
        self.shapes, self.grouped = shapes, grouped

    def uninstall(self) -> None:
        """Every module's own forward back, exactly as it was (an instance attribute, or none)."""
        for module, own in self._saved.values():
            if own is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        for handle in self._hooks.values():
            handle.remove()
        self._saved.clear(), self._hooks.clear(), self._stacks.clear()
        self.plan = None

    def _install(self, module) -> None:
        if id(module) in self._saved:
            return
        own = module.__dict__.get("forward", _MISSING)
        self._saved[id(module)] = (module, own)
        previous = module.forward  # the bound class forward, or the fast path's fused one
        stacks, runtime = self._stacks, self

        def forward(x, *args, **kwargs):
            plan, stack = runtime.plan, stacks.get(id(module))
            if plan is None or stack is None:
                return previous(x, *args, **kwargs)
            kwargs.pop("adapter_names", None)
            result = module.base_layer(x, *args, **kwargs)
            sel, scale = plan.mask(stack.layout, stack.A.dtype)
            if sel is None:  # no row of this forward uses an adapter of this layer
                return result
            z = F.linear(x.to(stack.A.dtype), stack.A) * sel
            return result + (F.linear(z, stack.B) * scale).to(result.dtype)

        module.forward = forward

    def _adapter_names(self, module, args, kwargs):
        """PEFT's own `adapter_names=` for the layers without a stack, registered once instead of
        walked onto every module each forward (that walk cost 20-35 ms per decode step on SmolLM2)."""
        if self.plan is not None:
            kwargs["adapter_names"] = self.plan.row_names
        return args, kwargs


__all__ = ["EVAL", "EXPECTED", "NO_AUTOCAST", "Plan", "Stack", "StackedLora", "compute_dtype", "fusable",
           "fusable_setup", "fuse_lora_linears", "lora_linears", "plain_lora", "unfusable"]
