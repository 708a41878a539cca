"""Held-out evaluation: token-weighted loss and generated-answer metrics, base vs tuned.

The loss is the mean over trained (label) tokens of the whole set, not the mean of batch
means, so padding and batch composition cannot move it. Generated answers are scored by
`lorakit.metrics` against the last assistant turn of each example.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch

from lorakit.data.collate import Collator
from lorakit.infer import Sampling, Session, generate


def _adapter(model, use_adapter: bool):
    if use_adapter or not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    return model.disable_adapter()


@torch.no_grad()
def eval_loss(model, encoded: list[dict], pad_token_id: int, *, batch_size: int = 8,
              use_adapter: bool = True) -> float:
    """Cross-entropy per trained token over `encoded` ({"input_ids","labels"} dicts)."""
    collate = Collator(pad_token_id)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with _adapter(model, use_adapter):
            for i in range(0, len(encoded), batch_size):
                batch = {k: v.to(model.device) for k, v in collate(encoded[i:i + batch_size]).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                logits = logits[:, :-1].float()
                mask = labels != -100
                loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
                total += float(loss)
                count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def split_reference(example: dict[str, Any]) -> tuple[list[dict], str]:
    """Conversation up to the last assistant turn, and that turn's text (the reference)."""
    msgs = example["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def answer(session: Session, examples: list[dict], *, use_adapter: bool = True, max_new_tokens: int = 64,
           on_answer: Callable[[int, str], None] | None = None) -> list[str]:
    """Greedy answers for each example's prompt (deterministic, so base and tuned compare fairly)."""
    outs = []
    sampling = Sampling(max_new_tokens=max_new_tokens, greedy=True)
    for i, ex in enumerate(examples):
        prompt, _ = split_reference(ex)
        out = generate(session, prompt, sampling, use_adapter=use_adapter)
        outs.append(out)
        if on_answer:
            on_answer(i, out)
    return outs
