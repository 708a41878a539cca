"""How the next token is chosen, per row: every row its own settings and its own random stream.

The order is transformers' (`generate` with the same settings gives the same distribution):
repetition penalty on the raw logits, then temperature, top-k, top-p, and a draw. Greedy is the
argmax after the penalty. A row draws from its own `torch.Generator`, seeded by its request (or
from the OS), so rows never share a stream, a seed means the same answer whatever else runs,
and torch's global RNG is never touched (training in the same process keeps its sequence).
"""

from __future__ import annotations

import os

import torch

from lorakit.config import SamplingConfig


Sampling = SamplingConfig
"""How an answer is decoded: the schema's section (`generate:` and `chat:` extend it), so the
command's defaults and a library caller's are the same ones."""


class Sampler:
    """One row's choice of tokens under `Sampling` (max_new_tokens is the decoder's business)."""

    def __init__(self, s: Sampling, seed: int | None = None):
        self.s = s
        self.gen = None
        if not s.is_greedy:
            seed = seed if seed is not None else s.seed
            self.gen = torch.Generator()
            self.gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def __call__(self, logits: torch.Tensor, seen: list[int]) -> int:
        """The next token from one row's next-token `logits`; `seen`: the prompt and answer so far."""
        s = self.s
        logits = logits.float()
        if s.repetition_penalty != 1.0 and seen:
            ids = torch.tensor(sorted(set(seen)), device=logits.device)
            got = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(got < 0, got * s.repetition_penalty, got / s.repetition_penalty)
        if s.is_greedy:
            return int(torch.argmax(logits))
        logits = logits / s.temperature
        if s.top_k and s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if s.top_p < 1.0:
            probs = nucleus(probs, s.top_p)
        return draw(probs, self.gen)


NUCLEUS_CANDIDATES = 256
"""Top-p looks at the most likely tokens first: a sort of the whole vocabulary (49k tokens) took
3.5 ms a row on the 2-core CPU, a top-256 0.2 ms, and after a fine-tune the nucleus almost always
lies inside the first 256. When it does not, the whole vocabulary is sorted."""


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` with every token outside the top-p nucleus set to 0 (not renormalised: `draw` scales).
    The nucleus: the most likely tokens whose probabilities before them add up to less than top_p
    (so the most likely token is always kept) — transformers' TopPLogitsWarper keeps the same set."""
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    sp, si = torch.topk(probs, k)
    if k < probs.shape[-1] and float(sp.sum()) < top_p:  # the nucleus reaches past the candidates
        sp, si = torch.sort(probs, descending=True)
    keep = torch.cumsum(sp, 0) - sp < top_p
    return torch.zeros_like(probs).index_put_((si[keep],), sp[keep])


def draw(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    """One token with probability proportional to `probs`, by inverse CDF: one uniform from the
    row's own stream and a search in the cumulative sum. torch.multinomial draws an exponential per
    vocabulary entry for a single sample (1 ms a row at 49k tokens, 16 ms of every 16-row decode
    step); this is 20 times cheaper and draws from the same distribution."""
    cdf = torch.cumsum(probs, 0)
    u = float(torch.rand((), generator=gen, dtype=torch.float64)) * float(cdf[-1])  # the generator lives on the CPU
    i = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype, device=cdf.device), right=True))
    if i >= probs.shape[-1]:  # u rounded up to the total: the last token that can be drawn
        i = int(torch.nonzero(probs).max())
    return i


__all__ = ["Sampler", "Sampling", "draw", "nucleus"]
