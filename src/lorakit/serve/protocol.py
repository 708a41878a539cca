"""The OpenAI protocol as `lorakit serve` speaks it: request bodies, the limits a request is held
to, errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`, so the official
clients raise their typed exceptions with our message in them), and the objects an answer is
sent as (whole, or as server-sent-event chunks). Nothing here touches the model or the engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lorakit import infer
from lorakit.config import ServeConfig
from lorakit.errors import LorakitError


@dataclass
class Limits:
    max_tokens_cap: int = ServeConfig.max_tokens_cap  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none (bounded by the context left)
    max_body_bytes: int = 1 << 20
    timeout_s: float | None = ServeConfig.timeout  # per request, from submission; then finish_reason 'timeout'
    retry_after_s: int = 1  # the Retry-After of a 429


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# --------------------------------------------------------------------------- request bodies

class Body(BaseModel):
    # Unknown keys are ignored (clients send e.g. `user`); the unsupported ones are refused by name below.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # vLLM's extra sampling fields: 0 / 1.0 leave the distribution alone
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1


class ChatBody(Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(Body):
    prompt: str | list[str]


class LoadBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadBody(BaseModel):
    lora_name: str = Field(min_length=1)


def unsupported(body: Body) -> None:
    """Parameters the engine cannot honour are refused by name rather than silently ignored."""
    extra = body.model_extra or {}
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    choice = extra.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, "tool_choice: only 'auto' and 'none' are supported (lorakit does not force a call)",
                       param="tool_choice", code="unsupported_parameter")
    for key in ("functions", "function_call", "suffix", "logit_bias", "top_logprobs",
                "audio", "modalities", "prediction"):
        if extra.get(key) not in (None, [], {}):
            raise ApiError(400, f"'{key}' is not supported by lorakit serve", param=key, code="unsupported_parameter")
    for key in ("logprobs", "echo"):
        if extra.get(key) not in (None, False, 0):
            raise ApiError(400, f"'{key}' is not supported by lorakit serve", param=key, code="unsupported_parameter")
    if extra.get("best_of") not in (None, 1):
        raise ApiError(400, "only best_of=1 is supported", param="best_of", code="unsupported_parameter")
    for key in ("presence_penalty", "frequency_penalty"):
        if extra.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"'{key}' is not supported (only 0)", param=key, code="unsupported_parameter")
    rf = extra.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")


def stops(stop) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"at most 4 stop sequences, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    return tuple(stops)


def chat_messages(raw: list[dict]) -> list[dict]:
    """OpenAI content parts ([{"type": "text", "text": ...}]) joined into one string per message."""
    out = []
    for i, m in enumerate(raw):
        m = dict(m)
        c = m.get("content")
        if isinstance(c, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                raise ApiError(400, f"message {i}: only text content parts are supported",
                               param=f"messages.{i}.content")
            m["content"] = "".join(p["text"] for p in c)
        kept = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        if m.get("role") == "assistant" and isinstance(reasoning, str) and reasoning:
            kept["reasoning"] = reasoning  # an earlier answer's reasoning, sent back: rendered as trained
        out.append(kept)
    try:
        return infer.validate_messages(out, "messages")
    except LorakitError as e:
        raise ApiError(400, e.render(), param="messages") from None


# --------------------------------------------------------------------------- answers


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(ev) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def finished(ev) -> str:
    """The finish_reason of a whole answer; an error or a cancellation is an HTTP error instead."""
    if ev.finish_reason == "error":
        raise ApiError(500, f"generation failed: {ev.error}", type_="server_error")
    if ev.finish_reason == "cancelled":
        raise ApiError(503, "the request was cancelled (server shutting down)", type_="server_error",
                       code="shutting_down")
    return ev.finish_reason  # 'stop' | 'length' | 'timeout' (lorakit's own: the request's time ran out)


def chat_chunk(rid: str, model: str, include_usage: bool):
    """chat.completion.chunk objects: chunk(None, None) opens with the role, then text deltas, then
    the finish reason; empty=True is the choices-less chunk that carries the usage."""
    def chunk(text, reason, empty=False):
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        if empty:
            return {**base, "choices": []}
        if text is None and reason is None:
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {"content": text} if text is not None else {}
        out = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
        if include_usage:
            out["usage"] = None
        return out
    return chunk


def completion_chunk(rid: str, model: str, include_usage: bool):
    """text_completion chunks (no opening chunk: chunk(None, None) is None)."""
    def chunk(text, reason, empty=False):
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
        if empty:
            return {**base, "choices": []}
        if text is None and reason is None:
            return None
        out = {**base, "choices": [{"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}]}
        if include_usage:
            out["usage"] = None
        return out
    return chunk


def request_tools(body) -> list[dict] | None:
    """The request's `tools` (validated), or None when there are none or tool_choice is 'none'."""
    extra = body.model_extra or {}
    tools = extra.get("tools")
    if not tools or extra.get("tool_choice") == "none":
        return None
    from lorakit.data.formats import tool_list

    try:
        return tool_list(tools, "tools")
    except LorakitError as e:
        raise ApiError(400, e.render(), param="tools") from None


def chat_answer(rid: str, model: str, text: str, ev, calls: list[dict] | None = None,
                reasoning: str | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning  # vLLM's and DeepSeek's field
    reason = finished(ev)
    if calls:
        message["tool_calls"] = calls
        reason = "tool_calls" if reason == "stop" else reason
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
            "usage": usage(ev)}


def completion_answer(rid: str, model: str, text: str, ev) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finished(ev), "logprobs": None}],
            "usage": usage(ev)}
