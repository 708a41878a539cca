"""Chat messages: what the CLI's message files and the server's requests must look like.

Both go through `validate_messages`, so both say the same thing about the same mistake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(obj: Any, where: str) -> list[dict]:
    """`obj` as a list of chat messages, or a LorakitError naming `where` (a file or a request
    field), the message index and key, what is wrong and the fix."""
    example = 'e.g. [{"role": "user", "content": "Where is my order?"}]'
    if isinstance(obj, dict) and "messages" in obj:
        obj = obj["messages"]
    if not isinstance(obj, list):
        raise LorakitError(f"expected a list of messages, got {type(obj).__name__}", where=where, hint=example)
    if not obj:
        raise LorakitError("the list of messages is empty", where=where, hint=example)
    out = []
    for i, m in enumerate(obj):
        at = f"{where} message {i}"
        if not isinstance(m, dict):
            raise LorakitError(f"expected an object with 'role' and 'content', got {type(m).__name__}", where=at,
                               hint=example)
        for key in ("role", "content"):
            if key not in m:
                raise LorakitError(f"missing key '{key}'", where=at, hint=example)
        if m["role"] not in ROLES:
            raise LorakitError(f"'role' is {m['role']!r}, not one of {', '.join(ROLES)}", where=at,
                               hint="use 'user' for the person asking, 'assistant' for the model")
        m = dict(m)
        if m["role"] == "assistant" and m.get("tool_calls"):  # an earlier call of the model, sent back
            from lorakit.data.formats import parse_tool_calls

            m["tool_calls"] = parse_tool_calls(m["tool_calls"], f"{where}, field 'messages[{i}].tool_calls")
            if m["content"] is None:
                m["content"] = ""
        if not isinstance(m["content"], str):
            raise LorakitError(f"'content' must be a string, got {type(m['content']).__name__}", where=at,
                               hint="put the message text in 'content' as one string")
        out.append(m)
    if out[-1]["role"] not in ("user", "tool"):
        raise LorakitError(f"the last message is from '{out[-1]['role']}': there is nothing to answer",
                           where=f"{where} message {len(out) - 1}", hint="end the conversation with a user message")
    return out


def read_messages_file(path: str | Path) -> list[dict]:
    """A JSON file holding a list of messages (or {"messages": [...]})."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorakitError(f"cannot read messages: {e}", where=str(path),
                           hint='write a JSON list like [{"role": "user", "content": "..."}]') from None
    return validate_messages(obj, str(path))


def messages_from_instruction(instruction: str, input_text: str = "", system: str | None = None) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": instruction, "input": input_text or ""})
    return msgs


__all__ = ["ROLES", "messages_from_instruction", "read_messages_file", "validate_messages"]
