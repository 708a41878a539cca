"""Tool calls in a model's answer, read back into OpenAI's `tool_calls`.

Only a format the template itself writes can be read back without guessing: the Hermes convention
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, what lorakit's `chatml` and the Qwen
templates render a call as). A template that writes calls some other way gets its answer back as
text, never a guessed call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from lorakit.data.formats import THINK

HERMES = "hermes"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def tool_format(template_source: str) -> str | None:
    """The call format a template writes (HERMES), or None when lorakit cannot read its calls back."""
    return HERMES if OPEN in template_source and CLOSE in template_source else None


def parse_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the text outside the calls, or None when there is none; the calls, OpenAI-shaped, with the
    arguments as a JSON string). A block whose inside is not a JSON object with a string `name`
    is not a call: the whole answer is returned as text."""
    calls = []
    for body in _CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    if not calls:
        return text, []
    rest = _CALL.sub("", text).strip()
    return rest or None, calls


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def writes_reasoning(template_source: str) -> bool:
    """Whether a template writes an assistant turn's reasoning as a leading <think> block (lorakit's
    chatml, Qwen's and DeepSeek's templates): then an answer's leading block is its reasoning."""
    return THINK_OPEN in template_source and THINK_CLOSE in template_source


def split_reasoning(text: str | None) -> tuple[str | None, str | None]:
    """(the reasoning a <think>...</think> block at the start holds, the rest). A block never closed
    (the answer ran out of tokens while thinking) is all reasoning, as vLLM's reasoning parsers read it."""
    if not text:
        return None, text
    m = THINK.match(text)
    if m is not None:
        return m.group(1), text[m.end():] or None
    lead = text.lstrip()
    if lead.startswith(THINK_OPEN):
        return lead[len(THINK_OPEN):].strip(), None
    return None, text


def _partial(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """`split_reasoning` for a streamed answer: feed the text as it comes, get back (reasoning,
    content) deltas whose concatenations are exactly split_reasoning's parts of the whole answer,
    however the text was cut. What could still turn out to be a marker, or whitespace the whole
    answer's split would strip, is held back until the next piece (or `end`) decides it."""

    def __init__(self) -> None:
        self.buf, self.state = "", "start"  # start -> open -> reasoning -> after -> content

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            lead = self.buf.lstrip()
            if lead.startswith(THINK_OPEN):
                self.state, self.buf = "open", lead[len(THINK_OPEN):]
            elif not THINK_OPEN.startswith(lead):
                self.state = "content"
        if self.state == "open":  # the reasoning's leading whitespace is not part of it
            self.buf = self.buf.lstrip()
            if self.buf:
                self.state = "reasoning"
        if self.state == "reasoning":
            i = self.buf.find(THINK_CLOSE)
            if i >= 0:
                reasoning, self.buf, self.state = self.buf[:i].rstrip(), self.buf[i + len(THINK_CLOSE):], "after"
            else:
                keep = self.buf[:len(self.buf) - _partial(self.buf, THINK_CLOSE)].rstrip()
                reasoning, self.buf = keep, self.buf[len(keep):]
        if self.state == "after":
            self.buf = self.buf.lstrip()
            if self.buf:
                self.state = "content"
        if self.state == "content":
            content, self.buf = self.buf, ""
        return reasoning, content

    def end(self) -> tuple[str, str]:
        """The held-back rest once the answer is complete."""
        if self.state == "start":
            return "", self.buf
        if self.state in ("open", "reasoning"):
            return self.buf.strip(), ""
        return "", self.buf


def held_back(text: str) -> int:
    """How many characters at the end of streamed `text` might begin a call marker (and so must
    not be sent as content yet): the longest suffix that is a prefix of OPEN."""
    return _partial(text, OPEN)


__all__ = ["HERMES", "ReasoningStream", "held_back", "parse_calls", "split_reasoning", "tool_format",
           "writes_reasoning"]
