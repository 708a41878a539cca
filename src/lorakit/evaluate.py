"""Held-out evaluation: answers from the base and the tuned model, scored with `lorakit.metrics`.

Answers are greedy, so base and tuned are compared without sampling noise, and are scored
against the last assistant turn of each example. The base is prompted with the adapter's own
template (what training used), so the comparison measures the adapter, not a template change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lorakit.infer import BASE, Sampling, Session, generate_batch
from lorakit.metrics import aggregate, exact_match


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def split_reference(example: dict[str, Any]) -> tuple[list[dict], str]:
    """Conversation up to the last assistant turn, and that turn's text (the reference)."""
    msgs = example["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def answer(session: Session, examples: list[dict], *, adapter: str | None = None, use_adapter: bool = True,
           max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy answers for each example's prompt (deterministic, so base and tuned compare fairly)."""
    sampling = Sampling(max_new_tokens=max_new_tokens, greedy=True)
    prompts = [split_reference(ex)[0] for ex in examples]
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        outs += [c.text for c in generate_batch(session, prompts[i:i + batch_size], sampling, adapter=adapter,
                                                use_adapter=use_adapter)]
    return outs


@dataclass
class Comparison:
    """Base and tuned answers to the same held-out prompts, with their scores."""

    prompts: list[list[dict]]
    references: list[str]
    base: list[str]
    tuned: list[str]
    base_scores: dict[str, float | int]
    tuned_scores: dict[str, float | int]

    def wins(self, limit: int = 2) -> list[int]:
        """Indices where the tuned answer is exactly right and the base's is not (else the first ones)."""
        won = [i for i, ref in enumerate(self.references)
               if exact_match(self.tuned[i], ref) and not exact_match(self.base[i], ref)]
        return (won or list(range(len(self.references))))[:limit]


def compare(session: Session, examples: list[dict], *, adapter: str | None = None, max_new_tokens: int = 64,
            batch_size: int = 16) -> Comparison:
    """Base vs tuned on `examples` (Examples with a final assistant turn as the reference)."""
    refs = [split_reference(ex)[1] for ex in examples]
    base = answer(session, examples, adapter=adapter, use_adapter=False, max_new_tokens=max_new_tokens,
                  batch_size=batch_size)
    tuned = answer(session, examples, adapter=adapter, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return Comparison([split_reference(ex)[0] for ex in examples], refs, base, tuned, aggregate(base, refs),
                      aggregate(tuned, refs))


__all__ = ["BASE", "Comparison", "answer", "compare", "perplexity", "split_reference"]
