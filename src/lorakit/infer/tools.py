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


def split_reasoning(text: str | None) -> tuple[str | None, str | None]:
    """(the reasoning a <think>...</think> block at the start holds, the rest): how the templates
    lorakit reads calls from render an assistant turn's reasoning (data.reasoning: train)."""
    if not text:
        return None, text
    m = THINK.match(text)
    if m is None:
        return None, text
    return m.group(1), text[m.end():] or None


def held_back(text: str) -> int:
    """How many characters at the end of streamed `text` might begin a call marker (and so must
    not be sent as content yet): the longest suffix that is a prefix of OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


__all__ = ["HERMES", "held_back", "parse_calls", "split_reasoning", "tool_format"]
