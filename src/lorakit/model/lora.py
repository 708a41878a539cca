"""Wrap a base model with LoRA adapters through PEFT, after checking the targets exist.

LoRA freezes each targeted weight W₀ and learns a low-rank update:
    h = W₀x + (α/r)·B·A·x      (α/√r with rsLoRA),  A: r×in, B: out×r, B = 0 at init,
so only A and B (and `modules_to_save`) train and the adapter starts as a no-op.

PEFT raises a bare "Target modules {...} not found in the base model" for a wrong name and
silently ignores a `modules_to_save` entry that matches nothing, so both are checked here first
with an error that lists the names the model actually has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import peft
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ModelError

_EXAMPLE = ("lora.target_modules: [q_proj, v_proj]   (or a preset: 'all-linear', 'attention', 'mlp'; or a regex such "
            "as '.*\\.(q|v)_proj')")


PRESETS = {
    "all-linear": "every linear layer of the decoder layers: attention and MLP, fused projections too",
    "attention": "the attention projections (q/k/v/o, or a fused qkv_proj)",
    "mlp": "the MLP projections (gate/up/down, or a fused gate_up_proj; a mixture-of-experts' shared MLP)",
}
"""`lora.target_modules` presets, resolved against the model's own layers by `targets`. None of
them adapts the LM head or a mixture-of-experts router: a LoRA on the head trains the whole
vocabulary's projection (the job of modules_to_save), and one on the router changes which experts
see which token, which destabilises the experts' training (Unsloth and the Qwen MoE notes advise
against it). Experts' weights (3-D tensors, one slice per expert) are adapted only with
`lora.experts`."""


@dataclass(frozen=True)
class Targets:
    """What LoRA adapts in a given model: PEFT's `target_modules` and `target_parameters`, and what a
    preset left out on purpose (for the log)."""

    modules: list[str] | str
    parameters: list[str]
    left_out: list[str]

    def describe(self, spec: list[str] | str) -> str:
        named = ", ".join(self.modules) if isinstance(self.modules, list) else f"regex {self.modules!r}"
        text = f"LoRA targets ({spec if isinstance(spec, str) else 'as listed'}): {named}"
        if self.parameters:
            text += f"; expert tensors: {', '.join(self.parameters)}"
        if self.left_out:
            text += f"; not adapted: {'; '.join(self.left_out)}"
        return text


def _experts_count(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(text, key, None)
        if isinstance(n, int) and n > 1:
            return n
    return None


def _in_layer(name: str) -> bool:
    """A module of a numbered decoder layer (model.layers.3...), not the embedding, the final norm
    or the LM head."""
    return any(part.isdigit() for part in name.split("."))


def _is_router(name: str, module: nn.Module, experts: int | None) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if "router" in type(module).__name__.lower() or leaf == "router":
        return True
    return experts is not None and leaf == "gate" and getattr(module, "out_features", None) == experts


def targets(model: nn.Module, lcfg: LoraConfig) -> Targets:
    """`lcfg.target_modules` resolved on `model`: a preset becomes the names of the model's own
    layers (`PRESETS`); names and regexes are checked and passed through."""
    spec = lcfg.target_modules
    if not (isinstance(spec, str) and spec in PRESETS):
        _check_targets(model, spec)
        if lcfg.experts:
            raise ModelError("lora.experts needs a preset in lora.target_modules (all-linear or mlp)",
                             hint="lora.target_modules: all-linear", where="config lora.experts")
        return Targets(list(spec) if isinstance(spec, list) else spec, [], [])
    experts = _experts_count(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep: dict[str, None] = {}
    left_out: dict[str, None] = {}
    for name, module in model.named_modules():
        if not name or not _in_layer(name):
            continue
        if _is_router(name, module, experts):
            left_out[f"router {_pattern(name)} (never adapted)"] = None
            continue
        if not _is_linear(module) or module is head:
            continue
        attention = any("attn" in part or "attention" in part for part in name.split("."))
        if spec == "all-linear" or (spec == "attention") == attention:
            keep[name.rsplit(".", 1)[-1]] = None
    params: dict[str, None] = {}
    if spec != "attention":
        for name, p in model.named_parameters():
            if p.dim() != 3 or not _in_layer(name) or ".experts." not in f".{name}":
                continue
            if lcfg.experts:
                params[".".join(name.rsplit(".", 2)[-2:])] = None  # 'experts.gate_up_proj'
            else:
                left_out[f"expert tensors {_pattern(name)} (lora.experts: true adapts them)"] = None
    elif lcfg.experts:
        raise ModelError("lora.experts with the 'attention' preset: experts are MLP weights",
                         hint="lora.target_modules: all-linear (or mlp)", where="config lora.experts")
    if params and lcfg.dropout:
        raise ModelError(f"lora.experts with lora.dropout {lcfg.dropout}: PEFT's LoRA on expert tensors has no dropout",
                         hint="set lora.dropout: 0", where="config lora.dropout")
    if lcfg.experts and not params:
        raise ModelError("lora.experts: this model has no experts' weights (it is not a mixture of experts)",
                         hint="remove lora.experts", where="config lora.experts")
    if not keep and not params:
        raise ModelError(f"lora.target_modules: {spec!r} names no layer of this model "
                         f"({PRESETS[spec]}); its linear layers are: {', '.join(linear_layer_names(model))}",
                         hint=_EXAMPLE, where="config lora.target_modules")
    return Targets(list(keep), list(params), list(left_out))


def _pattern(name: str) -> str:
    """'model.layers.3.mlp.gate' -> 'model.layers.*.mlp.gate': one entry for every layer."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def apply_lora(model: nn.Module, lcfg: LoraConfig, *, log=None) -> peft.PeftModel:
    """Freeze `model` and add LoRA adapters as `lcfg` describes; returns the PeftModel. `log`
    receives what was adapted (and what a preset left out)."""
    chosen = targets(model, lcfg)
    if log is not None:
        log(chosen.describe(lcfg.target_modules))
    _check_modules_to_save(model, lcfg.modules_to_save)
    init = lcfg.init.lower()
    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=chosen.modules,
        target_parameters=chosen.parameters or None,
        bias=lcfg.bias,
        modules_to_save=list(lcfg.modules_to_save) or None,
        use_rslora=lcfg.use_rslora,
        use_dora=lcfg.use_dora,
        init_lora_weights={"true": True, "false": False}.get(init, lcfg.init),
    )
    return peft.get_peft_model(model, config)


def continue_adapter(model: nn.Module, adapter: str, info, *, dropout: float | None = None):
    """`model` (the base just loaded, described by `info`) with the trained adapter at `adapter` (a
    run or adapter folder) attached and trainable, as the starting point of another run (SFT then
    DPO). Returns (PeftModel, the adapter's LoRA section, its AdapterMeta). The adapter must have
    been trained on this very base: on another one its update means nothing."""
    import copy

    from lorakit.artifacts import check_same_base, find_adapter_dir, read_meta

    folder = find_adapter_dir(adapter)
    meta = read_meta(folder)
    check_same_base(meta.base, info, policy="error", unknown="by name", held_as="model.name",
                    where="model.adapter", hint="set model.name to the base the adapter was trained on "
                    f"({meta.base.name}) or start a new adapter (remove model.adapter)")
    peft_model = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    lora = copy.deepcopy(meta.lora)
    if dropout is not None:
        lora.dropout = dropout
        for module in peft_model.modules():
            drop = getattr(module, "lora_dropout", None)
            if isinstance(drop, nn.ModuleDict):
                for name in list(drop):
                    drop[name] = nn.Dropout(dropout) if dropout else nn.Identity()
    return peft_model, lora, meta


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once.

    bitsandbytes packs two 4-bit values per byte (per storage element), so a Params4bit's
    numel() undercounts; DeepSpeed ZeRO-3 leaves local params empty with the size in ds_numel.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if n == 0 and hasattr(p, "ds_numel"):
            n = p.ds_numel
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def describe_parameters(model: nn.Module) -> str:
    """PEFT's familiar one-liner, e.g. 'trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330'."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the layers LoRA can adapt as linear maps, in model order."""
    names: dict[str, None] = {}
    for full, module in model.named_modules():
        if _is_linear(module):
            names[full.rsplit(".", 1)[-1]] = None
    return list(names)


# --------------------------------------------------------------------------- checks


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2 style models use Conv1D.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _adaptable(module: nn.Module) -> bool:
    """Layer types PEFT's LoRA accepts besides linear ones (e.g. embed_tokens)."""
    return _is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _check_targets(model: nn.Module, targets: list[str] | str) -> None:
    modules = [(name, m) for name, m in model.named_modules() if name]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ModelError(f"lora.target_modules: {targets!r} is not a valid regex ({e})",
                             hint=_EXAMPLE, where="config lora.target_modules") from None
        if any(pattern.fullmatch(name) and _adaptable(m) for name, m in modules):
            return
        raise ModelError(
            f"lora.target_modules: the regex {targets!r} matches no layer's full name "
            f"(it must match the whole name, e.g. 'model.layers.0.self_attn.q_proj'); "
            f"linear layers of this model: {', '.join(linear_layer_names(model))}",
            hint=_EXAMPLE,
            where="config lora.target_modules",
        )
    unknown = [t for t in targets if not any(_suffix_match(name, t) and _adaptable(m) for name, m in modules)]
    if unknown:
        raise ModelError(
            f"lora.target_modules: {', '.join(map(repr, unknown))} "
            f"{'is not a layer' if len(unknown) == 1 else 'are not layers'} of this model; "
            f"its linear layers are: {', '.join(linear_layer_names(model))}",
            hint=_EXAMPLE,
            where="config lora.target_modules",
        )


def _check_modules_to_save(model: nn.Module, wanted: list[str]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    unknown = [w for w in wanted if not any(_suffix_match(n, w) for n in names)]
    if unknown:
        top = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ModelError(
            f"lora.modules_to_save: {', '.join(map(repr, unknown))} matches no module of this model; "
            f"module names: {', '.join(top)}",
            hint="lora.modules_to_save: [lm_head, embed_tokens]   (names or dotted suffixes of module names)",
            where="config lora.modules_to_save",
        )


def _suffix_match(full: str, name: str) -> bool:
    """PEFT's rule for list entries: the full module name, or a dotted suffix of it."""
    return full == name or full.endswith("." + name)
