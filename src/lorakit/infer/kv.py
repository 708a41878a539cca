"""Per-request keys and values, and attention that reads each row's own.

Greedy output must not depend on who else is in the batch. Attention over a left-padded batch
sums over padding positions, which shifts where the real terms fall in the kernel's vector lanes
and changes rounding (measured: 9e-8). So attention runs per row over that row's own keys
(`row_attention`, registered as a transformers attention implementation), on per-request
key/value buffers (`Slot`), with no padding anywhere.

The slots of a forward (`Rows`: which queries go to which slot) reach the attention function as
an explicit keyword argument of the model call (`lorakit_parts=`; transformers hands unknown
keywords down to the attention interface), never through module or thread state.
"""

from __future__ import annotations

import contextlib

import torch

ATTENTION = "lorakit_rows"
SLOTS = "lorakit_parts"  # the keyword a decoder forward passes its `Rows` under


class Slot:
    """One request's keys and values, per layer, in buffers that grow by doubling (not a cat per
    token), read back as views of exactly the request's own length."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.n = [0] * layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: (heads, q, head_dim)
        work = attention_dtype(k)
        k, v = k.to(work), v.to(work)
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


class Rows:
    """Where each query of a forward goes: `parts[j] = (batch row, start, end, slot)`. A decode step
    has one part per batch row (the whole row); a packed prefill has several prompts end to end in
    batch row 0, each its own part, at its own positions, attending only to itself."""

    def __init__(self, parts: list[tuple[int, int | None, int | None, Slot]]):
        self.parts = parts

    @classmethod
    def per_row(cls, slots: list[Slot]) -> "Rows":
        return cls([(i, None, None, slot) for i, slot in enumerate(slots)])

    @classmethod
    def packed(cls, slots: list[Slot], lengths: list[int]) -> "Rows":
        parts, at = [], 0
        for slot, n in zip(slots, lengths):
            parts.append((0, at, at + n, slot))
            at += n
        return cls(parts)


class RowCache:
    """What the model's attention layers call `update` on: stores each part's new keys and values
    in its slot; `row_attention` reads them back per part."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        for i, a, b, slot in self.rows.parts:
            slot.append(layer_idx, key_states[i, :, a:b], value_states[i, :, a:b])
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((s.n[layer_idx] for *_, s in self.rows.parts), default=0)


def row_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for each part (infer/kv.Rows) over its own slot (no padding). A forward without
    them (a plain call on a model the decoder is installed on) is transformers' SDPA for one
    unpadded row; no mask function is registered for this implementation, so a padded batch would
    be attended wrongly: refused."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = kwargs.pop(SLOTS, None)
    if rows is None:
        if query.shape[0] > 1:
            raise RuntimeError("a lorakit decoder is installed on this model: batched forwards go through it")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = module.layer_idx
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    b, h, t, d = query.shape
    out = query.new_zeros((b, t, h, d))
    work = attention_dtype(query)
    query = query.to(work)
    gqa = h != key.shape[1]
    # autocast would cast the fp32 operands back to 16 bits: attention is on its lower-precision list
    with torch.autocast(query.device.type, enabled=False) if work != out.dtype else contextlib.nullcontext():
        _attend(query, rows, layer, window, scaling, gqa, out, softcap)
    return out, None


def _attend(query, rows: "Rows", layer: int, window, scaling, gqa: bool, out: torch.Tensor, softcap=None) -> None:
    import torch.nn.functional as F

    for i, start, end, slot in rows.parts:
        q = query[i:i + 1, :, start:end]
        n, m = slot.n[layer], q.shape[2]
        k, v = slot.k[layer][:, :n], slot.v[layer][:, :n]
        mask, causal = None, m > 1  # m > 1 only in a prefill, where the slot holds just these queries
        if window and n > window:  # a sliding-window layer: each query sees its last `window` keys
            at = torch.arange(n - m, n, device=query.device).unsqueeze(1)  # the queries' positions
            keys = torch.arange(n, device=query.device).unsqueeze(0)
            mask, causal = (keys <= at) & (keys > at - window), False
        if softcap:
            o = _capped(q, k.unsqueeze(0), v.unsqueeze(0), mask, causal, scaling, softcap)
        else:
            o = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, is_causal=causal,
                                               scale=scaling, enable_gqa=gqa)
        out[i, start:end] = o[0].transpose(0, 1)


def _capped(q, k, v, mask, causal: bool, scaling, cap: float) -> torch.Tensor:
    """Attention with soft-capped logits, cap · tanh(s / cap) before the softmax (Gemma 2): what
    transformers' eager kernel computes, which SDPA cannot. q: (1, h, m, d), k/v: (1, kv heads, n, d)."""
    h, m, n = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != h:  # grouped-query heads: each k/v head serves h / kv consecutive query heads
        k, v = k.repeat_interleave(h // k.shape[1], dim=1), v.repeat_interleave(h // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    scores = torch.tanh(scores / cap) * cap
    if causal:
        mask = torch.ones(m, n, dtype=torch.bool, device=q.device).tril(n - m)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """What a row's attention runs in: fp32 on the CPU (keys and values are stored so), where
    torch's attention for one query over ~100 keys took 47 us in bf16 and 12 us in fp32 (2 cores,
    AVX512-BF16) — the same choice training's packed attention makes; the input's dtype elsewhere."""
    return torch.float32 if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else x.dtype


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, row_attention)


__all__ = ["ATTENTION", "RowCache", "Rows", "SLOTS", "Slot", "register", "row_attention"]
