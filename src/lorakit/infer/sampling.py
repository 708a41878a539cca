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
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < s.top_p  # always keeps the most likely token
            sp = sp * keep
            return int(si[torch.multinomial(sp / sp.sum(), 1, generator=self.gen)])
        return int(torch.multinomial(probs, 1, generator=self.gen))


__all__ = ["Sampler", "Sampling"]
