"""Turn rows of any supported format into one Example shape: a conversation or raw text.

Everything after this module sees only `{"messages": [{"role", "content", ...}]}` or
`{"text": str}`, so templates and masking have one code path whatever the file looked like.
Validation is strict and happens here, at the row, because this is the last place that
knows the file and line: a null `output` found during tokenization could only say "None".
"""

from __future__ import annotations

import json
import re
from typing import Any

from lorakit.errors import DataError

Example = dict[str, Any]

FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt", "text")
PREFERENCE_FORMATS = ("preference", "kto")
"""Rows that compare or judge responses (lorakit.data.preference reads them): they hold no single
conversation to imitate, so they never become an Example."""
ROLES = ("system", "user", "assistant", "tool")

_KEYS = {
    "alpaca": "instruction, output (optional: input, system)",
    "prompt_completion": "prompt, completion (optional: system)",
    "messages": "messages: a list of {role, content}",
    "sharegpt": "conversations: a list of {from, value}",
    "text": "text",
    "preference": "prompt (text or messages) or instruction (optional: input), chosen, rejected (optional: system)",
    "kto": "prompt (text or messages) or instruction (optional: input), completion, label: true/false "
           "(optional: system)",
}
# Checked in order: the first entry whose keys are all present decides, so a row that is merely
# missing its second field still gets the precise "field 'output' missing" error of its format.
# The preference entries come first: their rows also hold `prompt` / `instruction`, and
# `completion` + `label` is what tells a KTO row from a prompt_completion one.
_DETECT = ((("chosen",), "preference"), (("rejected",), "preference"), (("label", "completion"), "kto"),
           (("messages",), "messages"), (("conversations",), "sharegpt"), (("instruction",), "alpaca"),
           (("output",), "alpaca"), (("prompt",), "prompt_completion"), (("completion",), "prompt_completion"),
           (("text",), "text"))
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                   "function": "tool", "observation": "tool"}


def expected_keys(formats: tuple[str, ...] = FORMATS) -> str:
    return "; ".join(f"{fmt}: {_KEYS[fmt]}" for fmt in formats)


def detect_format(row: dict, where: str) -> str:
    """Name the format of one row from its keys."""
    for keys, fmt in _DETECT:
        if all(key in row for key in keys):
            return fmt
    raise DataError(
        f"cannot tell the row format from its keys ({', '.join(map(repr, row)) or 'no keys'})",
        hint=f"use the keys of one format — {expected_keys()} — or set data.format",
        where=where,
    )


def to_example(row: dict, fmt: str, where: str) -> Example:
    """Validate one row of format `fmt` and convert it to an Example."""
    if fmt == "auto":
        fmt = detect_format(row, where)
    if fmt in PREFERENCE_FORMATS:
        raise DataError(
            f"a {fmt} row ({_KEYS[fmt]}) among supervised rows: it compares answers rather than giving one "
            f"to imitate (row keys: {', '.join(map(repr, row))})",
            hint=f"to train on {fmt} rows set train.method: {'kto' if fmt == 'kto' else 'dpo (or orpo, simpo)'}; "
                 f"supervised fine-tuning (train.method: sft) reads {expected_keys()}",
            where=where,
        )
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)} or 'auto'", where=where)
    return _CONVERT[fmt](row, where)


# --------------------------------------------------------------------------- field checks


def _field(row: dict, key: str, where: str, fmt: str, *, required: bool = True, empty_ok: bool = False) -> str:
    """A string field; None/missing is "" when optional; numbers and the like are refused, not str()-ed."""
    at = f"{where}, field '{key}'"
    if key not in row or row[key] is None:
        if not required:
            return ""
        what = "missing" if key not in row else "null"
        raise DataError(
            f"{what} (format {fmt} needs: {_KEYS[fmt]}; row keys: {', '.join(map(repr, row))})",
            hint=f"give '{key}' a text value",
            where=at,
        )
    value = row[key]
    if not isinstance(value, str):
        raise DataError(
            f"expected text, got {type(value).__name__} {_short(value)}",
            hint=f'write it as a JSON string, e.g. "{key}": "{_short(value, quote=False)}"',
            where=at,
        )
    if required and not empty_ok and not value.strip():
        raise DataError("empty", hint=f"give '{key}' a non-empty text or remove the row", where=at)
    return value


def _short(value: Any, quote: bool = True) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if quote else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _with_system(messages: list[dict], row: dict, where: str, fmt: str) -> list[dict]:
    system = _field(row, "system", where, fmt, required=False)
    return ([{"role": "system", "content": system}] if system else []) + messages


# --------------------------------------------------------------------------- converters


def _alpaca(row: dict, where: str) -> Example:
    instruction = _field(row, "instruction", where, "alpaca")
    output = _field(row, "output", where, "alpaca")
    inp = _field(row, "input", where, "alpaca", required=False)
    user = {"role": "user", "content": instruction, "input": inp}
    return {"messages": _with_system([user, {"role": "assistant", "content": output}], row, where, "alpaca")}


def _prompt_completion(row: dict, where: str) -> Example:
    prompt = _field(row, "prompt", where, "prompt_completion", empty_ok=True)
    completion = _field(row, "completion", where, "prompt_completion")
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return {"messages": _with_system(turns, row, where, "prompt_completion")}


def _text(row: dict, where: str) -> Example:
    return {"text": _field(row, "text", where, "text")}


def _messages(row: dict, where: str) -> Example:
    example = {"messages": _check_turns(message_list(row, "messages", where, "messages"), where, "messages")}
    if row.get("tools") is not None:
        example["tools"] = tool_list(row["tools"], f"{where}, field 'tools'")
    return example


REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")
"""Where chat data keeps an assistant turn's reasoning: OpenAI-style `reasoning`, DeepSeek's and
vLLM's `reasoning_content`, Anthropic-style `thinking`; lorakit keeps it as `reasoning`."""


def message_list(row: dict, key: str, where: str, fmt: str) -> list[dict]:
    """`row[key]` as validated turns: {role, content}, plus an assistant turn's `tool_calls` and
    `reasoning` and a tool turn's `tool_call_id` / `name`; whether an assistant turn is needed is
    the caller's rule."""
    turns = _turn_list(row, key, where, fmt)
    out = []
    for i, turn in enumerate(turns):
        at = f"{where}, field '{key}[{i}]"
        role = turn.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise DataError(
                f"unknown role {_short(role)}" if "role" in turn else "no 'role'",
                hint=f"use one of {', '.join(ROLES)}",
                where=f"{at}.role'",
            )
        message: dict[str, Any] = {"role": role}
        calls = turn.get("tool_calls") if role == "assistant" else None
        if calls:
            message["tool_calls"] = parse_tool_calls(calls, f"{at}.tool_calls")
        content = turn.get("content")
        message["content"] = "" if calls and content is None else _content(content, f"{at}.content'", role,
                                                                           empty_ok=bool(calls))
        if role == "assistant":
            for k in REASONING_KEYS:
                if turn.get(k) is not None:
                    message["reasoning"] = _content(turn[k], f"{at}.{k}'", "reasoning")
                    break
        if role == "tool":
            for k in ("tool_call_id", "name"):
                if isinstance(turn.get(k), str):
                    message[k] = turn[k]
        out.append(message)
    return out


def parse_tool_calls(calls: Any, at: str) -> list[dict]:
    """OpenAI's `tool_calls`, each as {type: function, [id], function: {name, arguments}} with the
    arguments as an object (OpenAI sends them as a JSON string; templates print them as JSON)."""
    if not isinstance(calls, list):
        raise DataError(f"expected a list of tool calls, got {type(calls).__name__} {_short(calls)}",
                        hint='[{"type": "function", "function": {"name": "get_order", "arguments": {"id": 5}}}]',
                        where=f"{at}'")
    out = []
    for j, call in enumerate(calls):
        here = f"{at}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError("a tool call needs function.name", where=f"{here}'",
                            hint='{"type": "function", "function": {"name": "get_order", "arguments": {"id": 5}}}')
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError(f"arguments are not JSON ({e.msg} at character {e.pos})",
                                hint="give the arguments as a JSON object (or a string holding one)",
                                where=f"{here}.function.arguments'") from None
        if not isinstance(args, dict):
            raise DataError(f"arguments must be an object, got {type(args).__name__}", where=f"{here}.function.arguments'",
                            hint='"arguments": {"id": 5}')
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def tool_list(tools: Any, at: str) -> list[dict]:
    """A row's (or request's) `tools`: OpenAI function tools, {type: function, function: {name, ...}}."""
    if not isinstance(tools, list):
        raise DataError(f"expected a list of tools, got {type(tools).__name__} {_short(tools)}", where=at,
                        hint='"tools": [{"type": "function", "function": {"name": "get_order", "parameters": {...}}}]')
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError("a tool needs function.name", where=f"{at[:-1]}[{j}]'" if at.endswith("'") else f"{at}[{j}]",
                            hint='{"type": "function", "function": {"name": "get_order", "description": "...", '
                                 '"parameters": {"type": "object", ...}}}')
    return tools


THINK = re.compile(r"\A\s*<think>\s*(.*?)\s*</think>\s*", re.S)
"""A <think>...</think> block an assistant turn starts with (the reasoning, captured): how chat data,
the built-in chatml and the templates lorakit reads tool calls from write reasoning inline."""


def drop_reasoning(example: Example) -> Example:
    """`example` without its assistant turns' reasoning (data.reasoning: drop): the `reasoning`
    field, and a <think>...</think> block the content starts with."""
    if "messages" not in example:
        return example
    messages = []
    for m in example["messages"]:
        if m["role"] == "assistant":
            m = {k: v for k, v in m.items() if k != "reasoning"}
            m["content"] = THINK.sub("", m["content"], count=1)
        messages.append(m)
    return {**example, "messages": messages}


def _sharegpt(row: dict, where: str) -> Example:
    turns = _turn_list(row, "conversations", where, "sharegpt")
    out = []
    for i, turn in enumerate(turns):
        at = f"{where}, field 'conversations[{i}]"
        speaker = turn.get("from")
        role = _SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(
                f"unknown speaker {_short(speaker)}" if "from" in turn else "no 'from'",
                hint=f"use one of {', '.join(sorted(_SHAREGPT_ROLES))} (human -> user, gpt -> assistant)",
                where=f"{at}.from'",
            )
        out.append({"role": role, "content": _content(turn.get("value"), f"{at}.value'", role)})
    if "system" in row and not any(m["role"] == "system" for m in out):
        out = _with_system(out, row, where, "sharegpt")
    return {"messages": _check_turns(out, where, "sharegpt")}


def _turn_list(row: dict, key: str, where: str, fmt: str) -> list[dict]:
    turns = row.get(key)
    at = f"{where}, field '{key}'"
    if not isinstance(turns, list):
        hint = f"'{key}' must be a JSON list of turn objects ({_KEYS[fmt]})"
        if isinstance(turns, str):
            hint += "; a CSV cell holds only text, so keep chat data in JSONL, JSON or Parquet"
        raise DataError(f"expected a list, got {type(turns).__name__} {_short(turns)}", hint=hint, where=at)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} is {type(turn).__name__}, expected an object", hint=f"use {_KEYS[fmt]}",
                            where=f"{at[:-1]}[{i}]'")
    return turns


def _content(value: Any, at: str, role: str, empty_ok: bool = False) -> str:
    """Turn content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise DataError(
            f"expected text, got {type(value).__name__} {_short(value)}",
            hint="give the turn's content as a string (only text parts are supported)",
            where=at,
        )
    if role == "assistant" and not value.strip() and not empty_ok:
        raise DataError("empty assistant turn", hint="give the assistant turn text (or tool_calls) or remove it",
                        where=at)
    return value


def _check_turns(messages: list[dict], where: str, fmt: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            "no assistant turn: nothing to train on",
            hint="add at least one assistant turn (the response the model should learn)",
            where=f"{where}, field '{'messages' if fmt == 'messages' else 'conversations'}'",
        )
    return messages


_CONVERT = {"alpaca": _alpaca, "prompt_completion": _prompt_completion, "messages": _messages,
            "sharegpt": _sharegpt, "text": _text}
