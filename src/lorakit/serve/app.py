"""The OpenAI-compatible HTTP layer: parse, validate, authenticate, submit to the engine, stream.

Nothing here touches the model; the protocol's objects are serve/protocol.py's. The body is read
and parsed here (not by FastAPI's parameter machinery) so that the size cap holds before parsing
and a validation error names the field as OpenAI does (400, `param`), not FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import LorakitError
from lorakit.infer.tools import OPEN, ReasoningStream, held_back, parse_calls, split_reasoning, tool_format, writes_reasoning
from lorakit.serve.engine import EngineClosed, GenRequest, QueueFull
from lorakit.serve.protocol import (ApiError, Body, ChatBody, CompletionBody, Limits, LoadBody, UnloadBody,
                                    chat_answer, chat_chunk, chat_messages, completion_answer, completion_chunk,
                                    error_response, request_tools, sse, stops, unsupported, usage)
from lorakit.serve.registry import AdapterInUse, AdapterNotFound, PathRefused


class _Server:
    """What every route needs: the engine, the adapters' registry, the limits, the tokenizer and
    the model's context length."""

    def __init__(self, engine, registry, limits: Limits):
        self.engine, self.registry, self.limits = engine, registry, limits
        self.session = engine.session
        self.tok = self.session.tokenizer
        self.context = int(getattr(self.session.model.config, "max_position_embeddings", 0) or 0) or None
        self.created = int(time.time())

    async def parse(self, request: Request, model: type[BaseModel]):
        cap = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"request body over {cap} bytes", code="request_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise ApiError(413, f"request body over {cap} bytes", code="request_too_large")
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ApiError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None) from None

    def resolve(self, model: str) -> str:
        try:
            return self.registry.resolve(model)
        except AdapterNotFound as e:
            raise ApiError(404, e.render(), param="model", code="model_not_found") from None

    def budget(self, prompt_ids: list[int], asked: int | None) -> int:
        """The max_tokens a request runs with: what it asked (within the cap and the context), else
        the default bounded by the context left."""
        limits, context, n = self.limits, self.context, len(prompt_ids)
        if asked is not None and asked > limits.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {asked}, over this server's cap of {limits.max_tokens_cap}",
                           param="max_tokens")
        room = (context - n) if context else limits.max_tokens_cap
        if asked is not None and context and n + asked > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {n} and max_tokens "
                           f"is {asked}", param="max_tokens", code="context_length_exceeded")
        if room < 1:
            raise ApiError(400, f"the prompt has {n} tokens, the model's context is {context}", param="messages",
                           code="context_length_exceeded")
        return asked if asked is not None else min(limits.default_max_tokens, room, limits.max_tokens_cap)

    def submit(self, name: str, prompt_ids: list[int], body: Body, max_tokens: int, stop_ids):
        req = GenRequest(adapter=name, prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=body.temperature,
                         top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                         seed=body.seed, stop_ids=tuple(stop_ids), stop=stops(body.stop),
                         timeout_s=self.limits.timeout_s)
        try:
            return self.engine.submit(req, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        except EngineClosed as e:
            raise ApiError(503, str(e), type_="server_error", code="shutting_down") from None

    # ---- routes

    async def health(self):
        return {"status": "ok", "running": self.engine.running, "waiting": self.engine.waiting}

    async def models(self):
        base = self.registry.base_id
        data = [{"id": base, "object": "model", "created": self.created, "owned_by": "lorakit", "root": base,
                 "parent": None}]
        for name in self.registry.adapters():
            a = self.session.adapters.get(name)
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "lorakit",
                         "root": str(a.path) if a else name, "parent": base})
        return {"object": "list", "data": data}

    async def chat(self, request: Request):
        body: ChatBody = await self.parse(request, ChatBody)
        unsupported(body)
        name = self.resolve(body.model)
        template = self.registry.template(name)
        tools = request_tools(body)
        prompt_ids = template.encode_prompt(self.tok, chat_messages(body.messages), tools=tools)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        handle = self.submit(name, prompt_ids, body, self.budget(prompt_ids, asked), template.stop_token_ids(self.tok))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        calls = tools is not None and tool_format(template.source) is not None  # read calls back out of the answer
        thinks = writes_reasoning(template.source)  # a leading <think> block is the answer's reasoning
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _stream(handle, chat_chunk(rid, body.model, include_usage), include_usage, calls=calls,
                           reasoning=thinks)
        text, ev = await _collect(request, handle)
        reasoning, found = None, None
        if thinks:
            reasoning, text = split_reasoning(text)
        if calls:
            text, found = parse_calls(text or "")
        return chat_answer(rid, body.model, text, ev, found, reasoning)

    async def completions(self, request: Request):
        body: CompletionBody = await self.parse(request, CompletionBody)
        unsupported(body)
        name = self.resolve(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request (got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        prompt_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        stop_ids = self.registry.template(name).stop_token_ids(self.tok)
        handle = self.submit(name, prompt_ids, body, self.budget(prompt_ids, body.max_tokens), stop_ids)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _stream(handle, completion_chunk(rid, body.model, include_usage), include_usage)
        text, ev = await _collect(request, handle)
        return completion_answer(rid, body.model, text, ev)

    async def load_lora(self, request: Request):
        body: LoadBody = await self.parse(request, LoadBody)
        try:
            await self.registry.load(body.lora_name, body.lora_path)
        except PathRefused as e:
            raise ApiError(403, e.render(), param="lora_path", code="path_not_allowed") from None
        except LorakitError as e:
            raise ApiError(400, e.render(), param="lora_path" if e.where != "lora_name" else "lora_name") from None
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    async def unload_lora(self, request: Request):
        body: UnloadBody = await self.parse(request, UnloadBody)
        try:
            await self.registry.unload(body.lora_name)
        except AdapterNotFound as e:
            raise ApiError(404, e.render(), param="lora_name", code="model_not_found") from None
        except AdapterInUse as e:
            raise ApiError(409, e.render(), param="lora_name", code="adapter_in_use") from None
        except LorakitError as e:
            raise ApiError(400, e.render(), param="lora_name") from None
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")


async def _collect(request: Request, handle):
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


def _stream(handle, chunk, include_usage: bool, *, calls: bool = False, reasoning: bool = False) -> StreamingResponse:
    """SSE: `data: {json}` per delta, `data: [DONE]` at the end, written raw. With `reasoning`, a
    leading <think> block goes out as `reasoning_content` deltas (`ReasoningStream`: the same split
    as the answer's whole). With `calls`, text is streamed until a tool call begins (a possible
    start of its marker is held back); the calls are sent at the end, whole, as one `tool_calls`
    delta (finish_reason 'tool_calls')."""

    async def events():
        done = False
        text, sent = "", 0  # with calls: the whole answer so far, and how much of it went out as content
        thinking = ReasoningStream() if reasoning else None
        try:
            first = chunk(None, None)
            if first is not None:
                yield sse(first)
            async for ev in handle:
                said, piece = "", ev.text or ""
                if thinking is not None:
                    said, piece = thinking.feed(piece)
                    if ev.finish_reason is not None:
                        rest = thinking.end()
                        said, piece = said + rest[0], piece + rest[1]
                if said:
                    yield sse(_with_delta(chunk(None, None), {"reasoning_content": said}))
                if piece and not calls:
                    yield sse(chunk(piece, None))
                elif piece:
                    text += piece
                    if OPEN not in text:
                        upto = len(text) - held_back(text)
                        if upto > sent:
                            yield sse(chunk(text[sent:upto], None))
                            sent = upto
                if ev.finish_reason is not None:
                    done = True
                    if ev.finish_reason == "error":
                        yield sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                             "param": None, "code": None}})
                    else:
                        reason = ev.finish_reason
                        if calls:
                            rest, found = parse_calls(text)
                            if found:
                                deltas = [{"index": i, **c} for i, c in enumerate(found)]
                                yield sse(_with_delta(chunk(None, None), {"tool_calls": deltas}))
                                reason = "tool_calls" if reason == "stop" else reason
                            elif len(text) > sent:
                                yield sse(chunk(text[sent:], None))
                        yield sse(chunk(None, reason))
                        if include_usage:
                            yield sse({**chunk(None, None, empty=True), "usage": usage(ev)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (this generator was cancelled or closed)
                handle.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _with_delta(chunk: dict, delta: dict) -> dict:
    """An opening-shaped chunk turned into one carrying `delta`."""
    chunk["choices"][0]["delta"] = delta
    return chunk


def create_app(engine, registry, *, api_key: str | None, limits: Limits | None = None) -> FastAPI:
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(engine, registry, limits or Limits())
    _errors(app, engine.log)
    _auth(app, api_key)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    if registry.allow_loading:
        app.add_api_route("/v1/load_lora_adapter", server.load_lora, methods=["POST"])
        app.add_api_route("/v1/unload_lora_adapter", server.unload_lora, methods=["POST"])
    return app


def _errors(app: FastAPI, log) -> None:
    """Every error leaves in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ())[1:])
        return error_response(400, f"{loc}: {err.get('msg', 'invalid')}", "invalid_request_error", loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error",
                              code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log(f"lorakit serve: internal error: {type(e).__name__}: {e}")
        return error_response(500, f"internal server error ({type(e).__name__})", "server_error")


def _auth(app: FastAPI, api_key: str | None) -> None:
    """With an API key, every /v1/ request must carry it (Authorization: Bearer KEY)."""

    @app.middleware("http")
    async def _check(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                      "invalid_request_error", code="invalid_api_key")
        return await call_next(request)


__all__ = ["ApiError", "Limits", "create_app"]
