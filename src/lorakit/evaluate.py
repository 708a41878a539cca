"""Held-out evaluation helpers: base-vs-tuned answers to score with `lorakit.metrics`.

Answers are greedy, so base and tuned are compared without sampling noise, and are scored
against the last assistant turn of each example.
"""

from __future__ import annotations

import math
from typing import Any

from lorakit.infer import Sampling, Session, generate_batch


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def split_reference(example: dict[str, Any]) -> tuple[list[dict], str]:
    """Conversation up to the last assistant turn, and that turn's text (the reference)."""
    msgs = example["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def answer(session: Session, examples: list[dict], *, use_adapter: bool = True, max_new_tokens: int = 64,
           batch_size: int = 16) -> list[str]:
    """Greedy answers for each example's prompt (deterministic, so base and tuned compare fairly)."""
    sampling = Sampling(max_new_tokens=max_new_tokens, greedy=True)
    prompts = [split_reference(ex)[0] for ex in examples]
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        outs += generate_batch(session, prompts[i:i + batch_size], sampling, use_adapter=use_adapter)
    return outs
