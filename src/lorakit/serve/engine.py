"""The continuous-batching scheduler of `lorakit serve`: every running request advances one token
per step, in one forward pass, whatever adapter it uses.

One thread owns the model. Each loop it admits waiting requests (the decoder prefills each prompt
on its own, so a joiner never changes another row's numbers), runs one decode step over every
running row, and lets finished, cancelled and timed-out rows leave. Handlers only submit and
read events. Decoding itself — per-row attention and adapters, sampling, stop tokens and strings,
streamed text, and why greedy output does not depend on who shares a step — is the decoder's
(infer/decoder.py), the same one every other stage generates through; this module only
schedules it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass

import torch

from lorakit.config import ServeConfig
from lorakit.infer.decoder import Decoder, Request, Row
from lorakit.infer.sampling import Sampling


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
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0

    def decoder_request(self) -> Request:
        sampling = Sampling(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                            top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed)
        return Request(self.prompt_ids, self.max_tokens, sampling, tuple(self.stop_ids), tuple(self.stop),
                       adapter=self.adapter)


@dataclass
class Event:
    """What a request's stream yields: text deltas, then one final event (`finish_reason` set)."""

    text: str = ""
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled' | 'timeout' | 'error'
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


# --------------------------------------------------------------------------- requests in flight


class Handle:
    """The caller's side of one request: an async iterator of Events, and `cancel`."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req = req
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the loop is gone (client and server shut down): nobody is listening
            pass

    def __aiter__(self):
        return self._events()

    async def _events(self):
        while True:
            ev = await self.queue.get()
            yield ev
            if ev.finish_reason is not None:
                return


class _Running:
    """A request in the engine: the caller's handle and the decoder's row."""

    def __init__(self, handle: Handle, row: Row | None = None):
        self.h, self.row = handle, row

    @property
    def req(self) -> GenRequest:
        return self.h.req

    def emit(self, text: str) -> None:
        if text:
            self.h._put(Event(text=text))

    def finish(self, reason: str | None = None, error: str | None = None) -> None:
        """Send the final event: the row's own reason, or an outside one (cancelled, timeout, error)
        after the text that can still be shown."""
        if self.row is not None and reason is not None:
            self.emit(self.row.end(reason))
        reason = reason or self.row.finish_reason
        # Like infer.Completion: the stop token counts as generated.
        self.h._put(Event(finish_reason=reason, prompt_tokens=len(self.req.prompt_ids),
                          completion_tokens=self.row.completion_tokens if self.row is not None else 0, error=error))


# --------------------------------------------------------------------------- the engine


class Engine:
    """Owns the session's model on one thread, with the decoder installed on it for the engine's
    life (`shutdown` gives the model back); see the module docstring."""

    def __init__(self, session, *, max_batch: int = ServeConfig.max_batch, max_queue: int = ServeConfig.max_queue,
                 log=print):
        from lorakit.errors import LorakitError

        bad = [a.name for a in session.adapters.values() if not a.mixable]
        if bad:
            raise LorakitError(f"adapter(s) {', '.join(bad)} cannot share a batch with other adapters "
                               "(DoRA, or LoRA on expert tensors: PEFT runs those one adapter at a time)",
                               hint="merge them (lorakit merge) and serve the merged model on its own")
        self.session = session
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.log = log
        self.decoder = Decoder(session.model, session.tokenizer, adapters=list(session.adapters))
        self.device = self.decoder.device
        self._waiting: collections.deque[Handle] = collections.deque()
        self._running: list[_Running] = []
        self._calls: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def steps(self) -> int:
        return self.decoder.steps

    # ---- the caller's side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> Handle:
        with self._cv:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            h = Handle(req, loop)
            self._waiting.append(h)
            self._cv.notify()
        return h

    def call_between_steps(self, fn) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between two steps (an adapter load or unload); the decoder
        then rebuilds its stacks for the adapters loaded."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def in_use(self, adapter: str) -> int:
        with self._cv:
            return sum(h.req.adapter == adapter for h in self._waiting) + \
                sum(r.req.adapter == adapter for r in self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def shutdown(self, drain_s: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        end = time.monotonic() + drain_s
        while (self._running or self._waiting) and time.monotonic() < end and self._alive():
            time.sleep(0.02)
        with self._cv:
            for h in self._waiting:
                h.cancel()
            for r in self._running:
                r.h.cancel()
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not self._alive():
            self.decoder.close()

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stop or self._calls or self._running or self._waiting):
                        self._cv.wait(timeout=0.5)
                    stop_now = self._stop and not self._waiting
                    calls = list(self._calls)
                    self._calls.clear()
                self._run_calls(calls)
                if stop_now:
                    rows, self._running = self._running, []
                    for r in rows:
                        r.finish("cancelled")
                    return
                try:
                    self._admit()
                    if self._running:
                        self._decode()
                except Exception as e:  # a fault of the model or of one step: fail the rows, keep serving
                    self.log(f"lorakit serve: step failed: {type(e).__name__}: {e}")
                    rows, self._running = self._running, []
                    for r in rows:
                        r.finish("error", error=f"{type(e).__name__}: {e}")

    def _run_calls(self, calls) -> None:
        for fn, fut in calls:
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, who reports it
                fut.set_exception(e)
            self.decoder.refresh(list(self.session.adapters))

    def _expired(self, h: Handle) -> str | None:
        if h.cancelled.is_set():
            return "cancelled"
        t = h.req.timeout_s
        if t is not None and time.monotonic() - h.submitted > t:
            return "timeout"
        return None

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    return
                h = self._waiting.popleft()
            why = self._expired(h)
            if why:
                _Running(h).finish(why)
                continue
            try:
                row, text = self.decoder.start(h.req.decoder_request())
            except Exception as e:  # this prompt's fault (or the model's): fail it alone, keep serving
                self.log(f"lorakit serve: prefill failed: {type(e).__name__}: {e}")
                _Running(h).finish("error", error=f"{type(e).__name__}: {e}")
                continue
            r = _Running(h, row)
            r.emit(text)
            if row.done:
                r.finish()
            else:
                self._running.append(r)

    def _decode(self) -> None:
        self._leave([self._expired(r.h) for r in self._running])
        live = self._running
        if not live:
            return
        for r, text in zip(live, self.decoder.step([r.row for r in live])):
            r.emit(text)
        self._leave([r.row.finish_reason for r in live], own=True)

    def _leave(self, why: list[str | None], own: bool = False) -> None:
        """Finish the running rows with a reason (one entry per row, in order) after taking them
        out of `_running`, so whoever reads a row's last event already sees its slot free.
        `own`: the reasons are the rows' own (stop, length), not set from outside."""
        if not any(why):
            return
        ended = [(r, w) for r, w in zip(self._running, why) if w]
        self._running = [r for r, w in zip(self._running, why) if not w]
        for r, w in ended:
            r.finish(None if own else w)
