"""The OpenAI-compatible HTTP layer: parse, validate, authenticate, submit to the engine, stream.

Nothing here touches the model. Every error leaves as OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so the official clients raise their typed
exceptions (NotFoundError, BadRequestError, RateLimitError...) with our message in them.

The body is read and parsed here (not by FastAPI's parameter machinery) so that the size cap holds
before parsing and a validation error names the field as OpenAI does (400, `param`), not FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit import infer
from lorakit.config import ServeConfig
from lorakit.errors import LorakitError
from lorakit.serve.engine import EngineClosed, GenRequest, QueueFull
from lorakit.serve.registry import AdapterInUse, AdapterNotFound, PathRefused


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


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# --------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
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


class ChatBody(_Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: str | list[str]


class LoadBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadBody(BaseModel):
    lora_name: str = Field(min_length=1)


def _unsupported(body: _Body) -> None:
    """Parameters the engine cannot honour are refused by name rather than silently ignored."""
    extra = body.model_extra or {}
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    for key in ("tools", "tool_choice", "functions", "function_call", "suffix", "logit_bias", "top_logprobs",
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


def _stops(stop) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"at most 4 stop sequences, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    return tuple(stops)


def _chat_messages(raw: list[dict]) -> list[dict]:
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
        out.append({k: v for k, v in m.items() if k in ("role", "content")})
    try:
        return infer.validate_messages(out, "messages")
    except LorakitError as e:
        raise ApiError(400, e.render(), param="messages") from None


# --------------------------------------------------------------------------- the app


def create_app(engine, registry, *, api_key: str | None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    session = engine.session
    tok = session.tokenizer
    mcfg = session.model.config
    context = int(getattr(mcfg, "max_position_embeddings", 0) or 0) or None
    created = int(time.time())

    # ---- errors, all in OpenAI's shape

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ())[1:])
        return _error_response(400, f"{loc}: {err.get('msg', 'invalid')}", "invalid_request_error", loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), "invalid_request_error",
                               code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        engine.log(f"lorakit serve: internal error: {type(e).__name__}: {e}")
        return _error_response(500, f"internal server error ({type(e).__name__})", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return _error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                       "invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    async def parse(request: Request, model: type[BaseModel]):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ApiError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None) from None

    def resolve(model: str) -> str:
        try:
            return registry.resolve(model)
        except AdapterNotFound as e:
            raise ApiError(404, e.render(), param="model", code="model_not_found") from None

    def budget(prompt_ids: list[int], asked: int | None) -> int:
        if asked is not None and asked > limits.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {asked}, over this server's cap of {limits.max_tokens_cap}",
                           param="max_tokens")
        n = len(prompt_ids)
        room = (context - n) if context else limits.max_tokens_cap
        if asked is not None and context and n + asked > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {n} and max_tokens "
                           f"is {asked}", param="max_tokens", code="context_length_exceeded")
        if room < 1:
            raise ApiError(400, f"the prompt has {n} tokens, the model's context is {context}", param="messages",
                           code="context_length_exceeded")
        return asked if asked is not None else min(limits.default_max_tokens, room, limits.max_tokens_cap)

    def submit(name: str, prompt_ids: list[int], body: _Body, max_tokens: int, stop_ids):
        req = GenRequest(adapter=name, prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=body.temperature,
                         top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                         seed=body.seed, stop_ids=tuple(stop_ids), stop=_stops(body.stop), timeout_s=limits.timeout_s)
        try:
            return engine.submit(req, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        except EngineClosed as e:
            raise ApiError(503, str(e), type_="server_error", code="shutting_down") from None

    async def collect(request: Request, handle):
        """All the text and the final event; cancels the request if the client goes away."""
        parts: list[str] = []

        async def watch():
            while True:
                await asyncio.sleep(0.25)
                if await request.is_disconnected():
                    handle.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            async for ev in handle:
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    return "".join(parts), ev
        finally:
            watcher.cancel()
            handle.cancel()  # a no-op once finished; frees the slot when this handler is cancelled
        raise RuntimeError("the engine's stream ended without a final event")

    def finished(ev) -> str:
        if ev.finish_reason == "error":
            raise ApiError(500, f"generation failed: {ev.error}", type_="server_error")
        if ev.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled (server shutting down)", type_="server_error",
                           code="shutting_down")
        return ev.finish_reason  # 'stop' | 'length' | 'timeout' (lorakit's own: the request's time ran out)

    def usage(ev) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    def stream(request: Request, handle, chunk, include_usage: bool) -> StreamingResponse:
        """SSE: `data: {json}` per delta, `data: [DONE]` at the end, written raw."""

        async def events():
            done = False
            try:
                first = chunk(None, None)
                if first is not None:
                    yield _sse(first)
                async for ev in handle:
                    if ev.text:
                        yield _sse(chunk(ev.text, None))
                    if ev.finish_reason is not None:
                        done = True
                        if ev.finish_reason == "error":
                            yield _sse({"error": {"message": f"generation failed: {ev.error}",
                                                  "type": "server_error", "param": None, "code": None}})
                        else:
                            yield _sse(chunk(None, ev.finish_reason))
                            if include_usage:
                                yield _sse({**chunk(None, None, empty=True), "usage": usage(ev)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not done:  # the client went away (this generator was cancelled or closed)
                    handle.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models():
        data = [{"id": registry.base_id, "object": "model", "created": created, "owned_by": "lorakit",
                 "root": registry.base_id, "parent": None}]
        for name in registry.adapters():
            a = session.adapters.get(name)
            data.append({"id": name, "object": "model", "created": created, "owned_by": "lorakit",
                         "root": str(a.path) if a else name, "parent": registry.base_id})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body: ChatBody = await parse(request, ChatBody)
        _unsupported(body)
        name = resolve(body.model)
        msgs = _chat_messages(body.messages)
        template = registry.template(name)
        prompt_ids = template.encode_prompt(tok, msgs)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        handle = submit(name, prompt_ids, body, budget(prompt_ids, asked), template.stop_token_ids(tok))
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", body.model
        if body.stream:
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

            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return stream(request, handle, chunk, include_usage)
        text, ev = await collect(request, handle)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finished(ev), "logprobs": None}],
                "usage": usage(ev)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionBody = await parse(request, CompletionBody)
        _unsupported(body)
        name = resolve(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request (got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        template = registry.template(name)
        handle = submit(name, prompt_ids, body, budget(prompt_ids, body.max_tokens), template.stop_token_ids(tok))
        rid, model = f"cmpl-{uuid.uuid4().hex}", body.model
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(text, reason, empty=False):
                base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
                if empty:
                    return {**base, "choices": []}
                if text is None and reason is None:
                    return None
                out = {**base, "choices": [{"index": 0, "text": text or "", "finish_reason": reason,
                                            "logprobs": None}]}
                if include_usage:
                    out["usage"] = None
                return out

            return stream(request, handle, chunk, include_usage)
        text, ev = await collect(request, handle)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finished(ev), "logprobs": None}],
                "usage": usage(ev)}

    if registry.allow_loading:
        @app.post("/v1/load_lora_adapter")
        async def load_lora(request: Request):
            body: LoadBody = await parse(request, LoadBody)
            try:
                await registry.load(body.lora_name, body.lora_path)
            except PathRefused as e:
                raise ApiError(403, e.render(), param="lora_path", code="path_not_allowed") from None
            except LorakitError as e:
                raise ApiError(400, e.render(), param="lora_path" if e.where != "lora_name" else "lora_name") \
                    from None
            return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora(request: Request):
            body: UnloadBody = await parse(request, UnloadBody)
            try:
                await registry.unload(body.lora_name)
            except AdapterNotFound as e:
                raise ApiError(404, e.render(), param="lora_name", code="model_not_found") from None
            except AdapterInUse as e:
                raise ApiError(409, e.render(), param="lora_name", code="adapter_in_use") from None
            except LorakitError as e:
                raise ApiError(400, e.render(), param="lora_name") from None
            return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                            media_type="text/plain")

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
