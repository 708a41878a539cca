"""Answers to conversations: the prompt built by the same `Template.encode_prompt` that produced
the training tokens, and generation that stops on the template's stop tokens, so the model sees at
inference exactly the format it learned (the guide's most common failure is a mismatch here).

Generation can be cancelled from outside (`stop`: a `threading.Event` or a callable, checked
before every step): `lorakit chat` sets it from Ctrl-C, and a caller can set it when a client goes
away. The rows then end with finish reason 'cancelled'.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from lorakit.data.templates import Template
from lorakit.errors import LorakitError
from lorakit.infer.decoder import BASE, Request
from lorakit.infer.sampling import Sampling
from lorakit.infer.session import Session


@dataclass(frozen=True)
class Completion:
    """One answer: the text, its token ids (without the stop token), the token counts, and why it
    ended: 'stop' (a stop token came), 'length' (max_new_tokens was reached) or 'cancelled' (the
    caller's `stop` was set before either)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the stop token included
    finish_reason: str


def answer_text(tokenizer, ids: list[int]) -> str:
    """The text of an answer's token ids (stop token excluded), as every stage shows and scores it;
    an answer from another engine (llama.cpp) decoded here compares with ours as text."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def requests(prompts: list[list[int]], sampling: Sampling, stop_ids, adapter: str = BASE) -> list[Request]:
    """One decoder request per prompt; with a seed, row i draws from seed + i (rows never share a
    stream, and the same call gives the same answers)."""
    return [Request(p, sampling.max_new_tokens, sampling, tuple(stop_ids), adapter=adapter,
                    seed=None if sampling.seed is None else sampling.seed + i) for i, p in enumerate(prompts)]


def generate_batch(session: Session, conversations: list[list[dict]], sampling: Sampling | None = None, *,
                   adapter: str | None = None, use_adapter: bool = True,
                   stream: Callable[[str], None] | None = None,
                   stop: threading.Event | Callable[[], bool] | None = None,
                   template: Template | None = None) -> list[Completion]:
    """Answer several conversations in one batch with `adapter` (default: the session's first;
    `BASE` or `use_adapter=False`: the base model, prompted with that adapter's template, or with
    `template` when given). `stream` receives the first conversation's text as it comes.

    `stop` (an Event, or a callable returning True to stop) ends generation before the next step;
    rows that had not ended by then are 'cancelled', with the text generated so far."""
    chosen = session.adapter(adapter)
    name = BASE if (adapter == BASE or not use_adapter) else chosen.name
    tok, template = session.tokenizer, template or chosen.template
    for i, msgs in enumerate(conversations):
        if not msgs or msgs[-1].get("role") not in ("user", "tool"):
            raise LorakitError(f"conversation {i} must end with a user message",
                               hint="add a final {'role': 'user', ...}")
    prompts = [template.encode_prompt(tok, msgs) for msgs in conversations]
    reqs = requests(prompts, sampling or Sampling(), template.stop_token_ids(tok), name)
    cancel = stop.is_set if isinstance(stop, threading.Event) else stop
    on_text = (lambda i, delta: stream(delta) if i == 0 else None) if stream is not None else None
    with session.decoding(name) as decoder:
        rows = decoder.run(reqs, on_text=on_text, cancel=cancel)
    return [Completion(answer_text(tok, r.ids), r.ids, len(r.req.prompt_ids), r.completion_tokens, r.finish_reason)
            for r in rows]


def generate(session: Session, messages: list[dict], sampling: Sampling | None = None, *,
             stream: Callable[[str], None] | None = None, adapter: str | None = None,
             use_adapter: bool = True, stop: threading.Event | Callable[[], bool] | None = None,
             template: Template | None = None) -> Completion:
    """The assistant reply to `messages` (see `generate_batch`); `stream` receives text as it comes."""
    return generate_batch(session, [messages], sampling, adapter=adapter, use_adapter=use_adapter, stream=stream,
                          stop=stop, template=template)[0]


__all__ = ["Completion", "answer_text", "generate", "generate_batch", "requests"]
