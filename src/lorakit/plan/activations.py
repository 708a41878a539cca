"""Activation memory, measured: a two-layer copy of the model (real widths, a tiny vocabulary) runs
one forward pass with LoRA attached under the run's precision, and every tensor autograd saves for
the backward pass is counted once per storage (parameters excluded). See `lorakit.plan`."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.plan.shape import ModelShape


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
    if fast:  # what lorakit.train.run.apply_fast_path does to the real model
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
        from lorakit.data.collate import segment_kwargs

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


