"""Per-request keys and values, and attention that reads each row's own.

Greedy output must not depend on who else is in the batch. Attention over a left-padded batch
sums over padding positions, which shifts where the real terms fall in the kernel's vector lanes
and changes rounding (measured: 9e-8). So attention runs per row over that row's own keys
(`row_attention`, registered as a transformers attention implementation), on per-request
key/value buffers (`Slot`), with no padding anywhere.

The slots of a forward reach the attention function as an explicit keyword argument of the
model call (`lorakit_slots=`; transformers hands unknown keywords down to the attention
interface), never through module or thread state.
"""

from __future__ import annotations

import torch

ATTENTION = "lorakit_rows"
SLOTS = "lorakit_slots"  # the keyword a decoder forward passes the rows' slots under


class Slot:
    """One request's keys and values, per layer, in buffers that grow by doubling (not a cat per
    token), read back as views of exactly the request's own length."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.n = [0] * layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: (heads, q, head_dim)
        n, q = self.n[layer], k.shape[1]
        buf = self.k[layer]
        if buf is None or n + q > buf.shape[1]:
            cap = max(2 * (n + q), 32)
            nk = k.new_empty((k.shape[0], cap, k.shape[2]))
            nv = v.new_empty((v.shape[0], cap, v.shape[2]))
            if n:
                nk[:, :n] = self.k[layer][:, :n]
                nv[:, :n] = self.v[layer][:, :n]
            self.k[layer], self.v[layer] = nk, nv
        self.k[layer][:, n:n + q] = k
        self.v[layer][:, n:n + q] = v
        self.n[layer] = n + q

    @property
    def length(self) -> int:
        return self.n[0]

    def copy(self) -> "Slot":
        c = Slot(len(self.n))
        c.k = [None if t is None else t.clone() for t in self.k]
        c.v = [None if t is None else t.clone() for t in self.v]
        c.n = list(self.n)
        return c


class RowCache:
    """What the model's attention layers call `update` on: stores each real row's new keys and
    values in its slot; `row_attention` reads them back per row."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        for i, slot in enumerate(self.slots):
            slot.append(layer_idx, key_states[i], value_states[i])
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((s.n[layer_idx] for s in self.slots), default=0)


def row_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for each row over its own slot (no padding). A forward without slots (a plain
    call on a model the decoder is installed on) is transformers' SDPA for one unpadded row; no
    mask function is registered for this implementation, so a padded batch would be attended
    wrongly: refused."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    slots = kwargs.pop(SLOTS, None)
    if slots is None:
        if query.shape[0] > 1:
            raise RuntimeError("a lorakit decoder is installed on this model: batched forwards go through it")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = module.layer_idx
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    b, h, q, d = query.shape
    out = query.new_zeros((b, q, h, d))
    gqa = h != key.shape[1]
    for i, slot in enumerate(slots):
        n = slot.n[layer]
        k, v = slot.k[layer][:, :n], slot.v[layer][:, :n]
        mask, causal = None, q > 1
        if window and n > window:  # a sliding-window layer: each query sees its last `window` keys
            at = torch.arange(n - q, n, device=query.device).unsqueeze(1)  # the queries' positions
            keys = torch.arange(n, device=query.device).unsqueeze(0)
            mask, causal = (keys <= at) & (keys > at - window), False
        o = F.scaled_dot_product_attention(query[i:i + 1], k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                           is_causal=causal, scale=scaling, enable_gqa=gqa)
        out[i] = o[0].transpose(0, 1)
    return out, None


def unsupported(config) -> str | None:
    """Why `row_attention` would not compute this model's attention (None: it does). It is causal
    softmax attention, windowed where a layer says so; soft-capped logits need their own kernel."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "attn_logit_softcapping", None):
        return "its attention logits are soft-capped (attn_logit_softcapping)"
    return None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, row_attention)


__all__ = ["ATTENTION", "RowCache", "SLOTS", "Slot", "register", "row_attention", "unsupported"]
