"""The continuous-batching engine: every running request advances one token per step, in one
forward pass, whatever adapter it uses.

(Interface first; the implementation follows in this module.)
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More requests are waiting than `max_queue`: the caller answers 429 with Retry-After."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests (503)."""


@dataclass
class GenRequest:
    adapter: str  # an adapter name, or infer.BASE
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # <= 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # the template's stop tokens: end with finish_reason 'stop'
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before the first match, 'stop'
    timeout_s: float | None = None  # then finish_reason 'timeout' with the text so far


@dataclass
class Event:
    """What a request's stream yields: text deltas, then one final event (`finish_reason` set)."""

    text: str = ""
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled' | 'timeout' | 'error'
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
