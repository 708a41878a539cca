"""The playground: one conversation answered by the base and several adapters side by side.

It is `lorakit serve` in-process, not a copy of it: the session is built by `serve.run.build_session`
(the base read from the first adapter's lorakit.json, every adapter loaded once onto it), names and
templates come from `serve.registry.Registry`, and every answer is a request to `serve.engine.Engine`,
so all the models' answers are decoded together in one batch by the decoder the server uses. Each
model renders the conversation with its own trained template, as the server's chat endpoint does.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from lorakit.errors import LorakitError


class Playground:
    """The loaded models (None until `load`), replaced whole when other runs are picked."""

    def __init__(self, log=print):
        self.engine = self.registry = None
        self.runs: list[str] = []
        self.log = log
        self._lock = threading.Lock()

    def load(self, ids: list[str], folders: list[Path]) -> dict[str, Any]:
        """Load these runs' adapters on their base (they must share it); the previous set goes."""
        from lorakit.serve.engine import Engine
        from lorakit.serve.registry import Registry
        from lorakit.serve.run import build_session

        if not ids:
            raise LorakitError("pick at least one run to talk to", where="ids")
        with self._lock:
            if ids == self.runs and self.engine is not None:
                return self.view()
            self.close()
            named = [(i.replace("/", "."), str(f)) for i, f in zip(ids, folders)]
            session = build_session([], named, None, log=self.log)
            engine = Engine(session, log=self.log)
            engine.start()
            self.engine, self.registry, self.runs = engine, Registry(engine), list(ids)
            return self.view()

    def view(self) -> dict[str, Any]:
        if self.registry is None:
            return {"loaded": False, "models": [], "runs": []}
        return {"loaded": True, "base": self.registry.base_id, "models": [self.registry.base_id] + self.registry.adapters(),
                "runs": self.runs}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown(drain_s=1.0)
        self.engine = self.registry = None
        self.runs = []

    def submit(self, messages: list[dict], models: list[str], *, max_tokens: int, temperature: float,
               top_p: float, seed: int | None, loop) -> dict[str, Any]:
        """Every model's request in the engine's queue, {model: handle}; a bad message list or an
        unknown model is a LorakitError here, before any answer streams."""
        from lorakit import infer
        from lorakit.serve.engine import GenRequest

        if self.engine is None:
            raise LorakitError("no models loaded", hint="pick runs and press Load first")
        if not models:
            raise LorakitError("pick at least one model to answer", where="models")
        chat = infer.validate_messages([{"role": m.get("role"), "content": m.get("content")} for m in messages],
                                       "messages")
        tok = self.engine.session.tokenizer
        requests = {}
        for model in models:
            name = self.registry.resolve(model)
            template = self.registry.template(name)
            requests[model] = GenRequest(adapter=name, prompt_ids=template.encode_prompt(tok, chat),
                                         max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                         stop_ids=tuple(template.stop_token_ids(tok)))
        return {model: self.engine.submit(req, loop) for model, req in requests.items()}

    @staticmethod
    async def stream(handles: dict[str, Any]) -> AsyncIterator[str]:
        """Server-sent events: {"model", "text"} deltas of every model as they come, then one
        {"model", "finish_reason"} each, then [DONE]; all the requests decode in the same batches."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(model, handle):
            async for ev in handle:
                await queue.put((model, ev))
                if ev.finish_reason is not None:
                    return

        tasks = [asyncio.create_task(pump(m, h)) for m, h in handles.items()]
        left = len(tasks)
        try:
            while left:
                model, ev = await queue.get()
                if ev.text:
                    yield f"data: {json.dumps({'model': model, 'text': ev.text})}\n\n"
                if ev.finish_reason is not None:
                    left -= 1
                    yield f"data: {json.dumps({'model': model, 'finish_reason': ev.finish_reason})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for h in handles.values():
                h.cancel()


__all__ = ["Playground"]
