"""The continuous-batching engine: every running request advances one token per step, in one
forward pass, whatever adapter it uses.

One thread owns the model. Each loop it admits waiting requests (each prompt is prefilled on its
own, so a joiner never changes another row's numbers), then runs one decode step over every
running row, each with its own adapter, samples each row with its own settings, and lets
finished, cancelled and timed-out rows leave. Handlers only submit and read events.

Rows of different adapters share every product. Each LoRA linear holds its adapters side by side
(`_LoraStack`: A of all adapters stacked, B of all adapters joined), so a step costs one A and one B
product per layer whatever the mix, and a 0/1 mask keeps each row to its own adapter's columns
(the other adapters' terms are exact zeros). PEFT's `adapter_names` path instead gathers and
multiplies each adapter's rows separately: measured on SmolLM2 at 32 rows, that made a 3-adapter
step 1.8x a 1-adapter step. Layers this cannot express (LoRA embeddings, a LoRA variant, lora_bias,
modules_to_save copies) keep PEFT's path, reached through a pre-forward hook.

Greedy output must not depend on who else is in the batch. Two things would make it depend:
- Attention over a left-padded batch: summing over padding positions shifts where the real terms
  fall in the kernel's vector lanes, which changes rounding (measured: 9e-8). So attention runs per
  row over that row's own keys (`_row_attention`, registered as a transformers attention
  implementation), on per-request key/value buffers (`_Slot`), with no padding anywhere.
- Matrix products whose kernel depends on the row count: on this CPU's BLAS, rows come out
  bit-identical for M in {4, 8} and M >= 12, but not for M = 1-3, 5-7, 9-11. `gemm_row_sizes`
  measures that set at start-up (and after an adapter load) on the model's own shapes, and every
  step pads the batch up to a size in it with dummy rows (and each adapter's group of rows too,
  when some layer keeps PEFT's per-group path). On CPU the padding is nearly free: a small-M
  product is bound by reading the weights, not by arithmetic.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.config import ServeConfig


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


# --------------------------------------------------------------------------- row-count invariance


def gemm_row_sizes(d_in: int, d_out: int, *, upto: int = 64, dtype=None, device="cpu") -> list[bool]:
    """ok[m] is True when a product with m rows gives every row bit-identically to the same rows
    inside a larger product (`upto` rows). Measured on the shapes the model uses; index 0 unused."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    dtype = dtype or torch.float32
    x = torch.randn(upto * 2, d_in, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(d_out, d_in, generator=g).to(device=device, dtype=dtype)
    ref = F.linear(x, w)
    ok = [False] * (upto + 1)
    for m in range(1, upto + 1):
        # the same rows at the start and at an offset: position inside the product must not matter either
        ok[m] = bool(torch.equal(F.linear(x[:m], w), ref[:m]) and torch.equal(F.linear(x[m:2 * m], w), ref[m:2 * m]))
    return ok


class RowSizes:
    """The smallest invariant row count >= n (`pad(n)`), from `gemm_row_sizes` over several shapes.
    Above the measured range every size is taken as invariant (it held from 12 to 64 here)."""

    def __init__(self, shapes: list[tuple[int, int]], dtype=None, device="cpu", upto: int = 64):
        oks = [gemm_row_sizes(a, b, upto=upto, dtype=dtype, device=device) for a, b in shapes]
        self.ok = [all(o[m] for o in oks) for m in range(upto + 1)]
        self.upto = upto
        self.exact = any(self.ok[1:])  # no invariant size at all (some GPU BLAS): pad nothing, promise nothing

    def pad(self, n: int) -> int:
        if not self.exact or n > self.upto:
            return n
        return next((m for m in range(n, self.upto + 1) if self.ok[m]), n)


# --------------------------------------------------------------------------- per-row attention

_ATTN = "lorakit_rows"
_step = threading.local()  # .slots: the _Slot of each real row of the forward being run; .names: adapters


class _Slot:
    """One request's keys and values, per layer, in buffers that grow by doubling (not a cat per
    token), read back as views of exactly the request's own length."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.n = [0] * layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (heads, q, head_dim)
        n, q = self.n[layer], k.shape[1]
        buf = self.k[layer]
        if buf is None or n + q > buf.shape[1]:
            cap = max(2 * (n + q), 32)
            nk = k.new_empty((k.shape[0], cap, k.shape[2]))
            nv = v.new_empty((v.shape[0], cap, v.shape[2]))
            if n:
                nk[:, :n] = self.k[layer][:, :n]
                nv[:, :n] = self.v[layer][:, :n]
            self.k[layer], self.v[layer] = nk, nv
        self.k[layer][:, n:n + q] = k
        self.v[layer][:, n:n + q] = v
        self.n[layer] = n + q
        return self.k[layer][:, :n + q], self.v[layer][:, :n + q]

    @property
    def length(self) -> int:
        return self.n[0]

    def copy(self) -> "_Slot":
        c = _Slot(len(self.n))
        c.k = [None if t is None else t.clone() for t in self.k]
        c.v = [None if t is None else t.clone() for t in self.v]
        c.n = list(self.n)
        return c


class _RowCache:
    """What the model's attention layers call `update` on: stores each real row's new keys and
    values in its slot; the attention function below reads them back per row."""

    def __init__(self, slots: list[_Slot]):
        self.slots = slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        for i, slot in enumerate(self.slots):
            slot.append(layer_idx, key_states[i], value_states[i])
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((s.n[layer_idx] for s in self.slots), default=0)


def _row_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for each real row over its own slot (no padding). Outside an engine step (plain
    `generate` on a served session) it is transformers' SDPA for one unpadded row; no mask function
    is registered for this implementation (transformers then builds none), so a padded batch
    would be attended wrongly: refused."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    slots = getattr(_step, "slots", None)
    if slots is None:
        if query.shape[0] > 1:
            raise RuntimeError("this model is being served by a lorakit Engine: batched generate is not "
                               "available on it outside the engine (load another session)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = module.layer_idx
    b, h, q, d = query.shape
    out = query.new_zeros((b, q, h, d))
    gqa = h != key.shape[1]
    for i, slot in enumerate(slots):
        n = slot.n[layer]
        k, v = slot.k[layer][:, :n], slot.v[layer][:, :n]
        o = F.scaled_dot_product_attention(query[i:i + 1], k.unsqueeze(0), v.unsqueeze(0), is_causal=q > 1,
                                           scale=scaling, enable_gqa=gqa)
        out[i] = o[0].transpose(0, 1)
    return out, None


def _inject_adapter_names(module, args, kwargs):
    """A LoRA layer's pre-forward hook: hands it this step's per-row adapter names, which is what
    PEFT's own `adapter_names=` does, but registered once instead of on every module every call
    (that walk cost 20-35 ms per decode step on SmolLM2)."""
    names = getattr(_step, "names", None)
    if names is not None:
        kwargs["adapter_names"] = names
    return args, kwargs


class _LoraStack:
    """One LoRA linear's loaded adapters side by side: A (sum of ranks x in), B (out x sum of ranks),
    and `layout`, each adapter's column span and scale (hashable: layers with the same adapters and
    ranks share one mask per step)."""

    @torch.no_grad()
    def __init__(self, module, names: list[str]):
        self.A = torch.cat([module.lora_A[n].weight for n in names], 0)
        self.B = torch.cat([module.lora_B[n].weight for n in names], 1)
        spans, at = [], 0
        for n in names:
            r = module.lora_A[n].weight.shape[0]
            spans.append((n, at, at + r, float(module.scaling[n])))
            at += r
        self.layout = (tuple(spans), at)


def _stackable(module, name: str) -> bool:
    """Plain LoRA on a linear: no variant (DoRA, aLoRA...), no lora_bias, eval-time dropout only."""
    return (name not in getattr(module, "lora_variant", {}) and not module.use_dora.get(name, False)
            and getattr(module.lora_B[name], "bias", None) is None)


class _Plan:
    """This step's per-row adapter names, and the mask and scales each layout needs (built once per
    step and layout, shared by every layer with that layout)."""

    def __init__(self, names: list[str], device):
        self.names, self.device = names, device
        self._masks: dict = {}

    def mask(self, layout, dtype):
        got = self._masks.get((layout, dtype))
        if got is None:
            spans, width = layout
            sel = torch.zeros((len(self.names), 1, width), dtype=dtype, device=self.device)
            scale = torch.zeros((len(self.names), 1, 1), dtype=dtype, device=self.device)
            where = {n: (a, b, sc) for n, a, b, sc in spans}
            used = False
            for i, n in enumerate(self.names):
                if n in where:
                    a, b, sc = where[n]
                    sel[i, 0, a:b] = 1
                    scale[i, 0, 0] = sc
                    used = True
            got = self._masks[(layout, dtype)] = (sel, scale) if used else (None, None)
        return got


def _stacked_forward(module, peft_forward):
    """The forward an engine installs on a stackable LoRA linear. Inside an engine step: the base
    product plus, for every row, B_row (A_row x) * scale_row in two products for all adapters, as
    PEFT computes it per adapter (`result + lora_B(lora_A(x)) * scaling`). Outside a step (plain
    `generate` on the session): PEFT's own forward."""
    import torch.nn.functional as F

    def forward(x, *args, **kwargs):
        plan = getattr(_step, "plan", None)
        stack = module.__dict__.get("_lorakit_stack")
        if plan is None or stack is None:
            return peft_forward(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        result = module.base_layer(x, *args, **kwargs)
        sel, scale = plan.mask(stack.layout, stack.A.dtype)
        if sel is None:  # no row of this step uses an adapter of this layer
            return result
        z = F.linear(x.to(stack.A.dtype), stack.A) * sel
        return result + (F.linear(z, stack.B) * scale).to(result.dtype)

    return forward


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN, _row_attention)


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


class _Row:
    """Engine-side state of a running request."""

    def __init__(self, handle: Handle, layers: int, tokenizer):
        self.h = handle
        self.req = handle.req
        self.slot = _Slot(layers)
        self.ids: list[int] = []  # generated, stop token excluded
        self.last: int | None = None  # the token to feed next step
        self.sent = 0  # characters of text already emitted
        self.tok = tokenizer
        self.gen = None
        if self.req.temperature > 0:
            self.gen = torch.Generator()
            self.gen.manual_seed(self.req.seed if self.req.seed is not None else
                                 int.from_bytes(os.urandom(8), "little") >> 1)
        self.stop_ids = set(self.req.stop_ids)
        self.done = False
        self.by_token = 0  # 1 when a stop token ended it
        self.hold = max((len(s) for s in self.req.stop), default=1) - 1

    def sample(self, logits: torch.Tensor) -> int:
        r = self.req
        if r.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < r.top_p  # always keeps the most likely token
            sp = sp * keep
            return int(si[torch.multinomial(sp / sp.sum(), 1, generator=self.gen)])
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def accept(self, token: int) -> str | None:
        """Take the sampled token; emit new text; return a finish reason when the row is done."""
        if token in self.stop_ids:
            self.by_token = 1
            self._emit_rest()
            return "stop"
        self.ids.append(token)
        self.last = token
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.req.stop:
            at = text.find(s)
            if at >= 0:
                self._emit(text[:at])
                return "stop"
        if len(self.ids) >= self.req.max_tokens:
            self._emit(text)
            return "length"
        if not text.endswith("\ufffd"):  # a multi-byte character may be half decoded: wait for the rest
            safe = len(text) - self._held(text)
            if safe > self.sent:
                self._emit(text[:safe])
        return None

    def _held(self, text: str) -> int:
        """How many trailing characters could be the start of a stop string (held back)."""
        for k in range(min(self.hold, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.req.stop):
                return k
        return 0

    def _emit(self, text: str) -> None:
        if len(text) > self.sent:
            self.h._put(Event(text=text[self.sent:]))
            self.sent = len(text)

    def _emit_rest(self) -> None:
        self._emit(self.tok.decode(self.ids, skip_special_tokens=True))

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        if reason in ("cancelled", "timeout", "error"):
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            self._emit(text[:len(text) - self._held(text)])
        # Like infer.Completion: the stop token counts as generated.
        self.h._put(Event(finish_reason=reason, prompt_tokens=len(self.req.prompt_ids),
                          completion_tokens=len(self.ids) + self.by_token, error=error))


# --------------------------------------------------------------------------- the engine


class Engine:
    """Owns the session's model on one thread; see the module docstring."""

    def __init__(self, session, *, max_batch: int = ServeConfig.max_batch, max_queue: int = ServeConfig.max_queue,
                 log=print):
        from lorakit.errors import LorakitError

        bad = [a.name for a in session.adapters.values() if not a.mixable]
        if bad:
            raise LorakitError(f"adapter(s) {', '.join(bad)} cannot share a batch with other adapters (DoRA)",
                               hint="merge them (lorakit merge) and serve the merged model on its own")
        self.session = session
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.log = log
        model = session.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        _register_attention()
        base.set_attn_implementation(_ATTN)
        cfg = base.config
        self.layers = cfg.num_hidden_layers
        self.device = model.device
        dtype = next(model.parameters()).dtype
        self._dtype = dtype
        self._hooked: set[int] = set()
        self._shapes: set[tuple[int, int]] = set()
        self.rows: RowSizes | None = None
        self._grouped = False  # some layer keeps PEFT's per-adapter path: pad each adapter's rows too
        self._prepare_lora()
        self.pad_id = session.tokenizer.pad_token_id if session.tokenizer.pad_token_id is not None else 0
        self._waiting: collections.deque[Handle] = collections.deque()
        self._running: list[_Row] = []
        self._calls: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

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

    def _prepare_lora(self) -> None:
        """(Re)build every LoRA linear's `_LoraStack` from the adapters loaded now, hook the layers
        that keep PEFT's path, and measure the row sizes on every product shape a step will run.
        Called at start and after each call between steps (a load or unload changes the stacks)."""
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear as LoraLinear

        try:
            from peft.utils.other import AuxiliaryTrainingWrapper
        except ImportError:  # pragma: no cover - older PEFT
            AuxiliaryTrainingWrapper = ()
        loaded = set(self.session.adapters)
        shapes, grouped = set(), False
        for m in self.session.model.modules():
            if isinstance(m, torch.nn.Linear) and not isinstance(m, LoraLayer):
                shapes.add((m.in_features, m.out_features))
            names = [n for n in getattr(m, "lora_A", {}) if n in loaded] if isinstance(m, LoraLayer) else []
            if isinstance(m, LoraLinear) and all(_stackable(m, n) for n in names) and not m.merged:
                if "_lorakit_peft_forward" not in m.__dict__:
                    m._lorakit_peft_forward = m.forward
                    m.forward = _stacked_forward(m, m._lorakit_peft_forward)
                m._lorakit_stack = _LoraStack(m, names) if names else None
                if names:
                    width = m._lorakit_stack.layout[1]
                    shapes |= {(m.in_features, width), (width, m.out_features)}
            elif isinstance(m, LoraLayer) or isinstance(m, AuxiliaryTrainingWrapper):
                if isinstance(m, LoraLinear):
                    m._lorakit_stack = None  # a stacked layer that now holds an unstackable adapter
                grouped = True  # its own per-adapter products (an embedding's LoRA lives in other dicts)
                if id(m) not in self._hooked:
                    m.register_forward_pre_hook(_inject_adapter_names, with_kwargs=True)
                    self._hooked.add(id(m))
        self._grouped = grouped
        # lm_head's product (hidden x vocab) is left out: probing it is seconds of work at start-up.
        head = self.session.model.get_output_embeddings()
        if head is not None:
            shapes.discard((head.in_features, head.out_features))
        if shapes != self._shapes or self.rows is None:
            self.rows = RowSizes(sorted(shapes), dtype=self._dtype, device=self.device)
            self._shapes = shapes

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stop or self._calls or self._running or self._waiting):
                        self._cv.wait(timeout=0.5)
                    if self._stop and not self._waiting:
                        stop_now = True
                    else:
                        stop_now = False
                    calls = list(self._calls)
                    self._calls.clear()
                for fn, fut in calls:
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller, who reports it
                        fut.set_exception(e)
                    self._prepare_lora()
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
                finally:
                    _step.slots = None

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
            row = _Row(h, self.layers, self.session.tokenizer)
            why = self._expired(h)
            if why:
                row.finish(why)
                continue
            ids = torch.tensor([h.req.prompt_ids], device=self.device)
            pos = torch.arange(len(h.req.prompt_ids), device=self.device).unsqueeze(0)
            try:
                logits = self._forward(ids, pos, [row], [h.req.adapter])
            except Exception as e:  # this prompt's fault (or the model's): fail it alone, keep serving
                self.log(f"lorakit serve: prefill failed: {type(e).__name__}: {e}")
                row.finish("error", error=f"{type(e).__name__}: {e}")
                continue
            self._take(row, logits[0])

    def _take(self, row: _Row, logits: torch.Tensor) -> None:
        why = row.accept(row.sample(logits))
        if why:
            row.finish(why)
        else:
            self._running.append(row)

    def _decode(self) -> None:
        why = [self._expired(r.h) for r in self._running]
        self._leave(why)
        live = self._running
        if not live:
            return
        logits = self._step_logits(live)
        self.steps += 1
        self._leave([r.accept(r.sample(lg)) for r, lg in zip(live, logits)])

    def _leave(self, why: list[str | None]) -> None:
        """Finish the running rows with a reason (one entry per row, in order) after taking them
        out of `_running`, so whoever reads a row's last event already sees its slot free."""
        if not any(why):
            return
        ended = [(r, w) for r, w in zip(self._running, why) if w]
        self._running = [r for r, w in zip(self._running, why) if not w]
        for r, w in ended:
            r.finish(w)

    def _step_logits(self, live: list[_Row]) -> torch.Tensor:
        """One decode step for `live` (each feeds its last token); their next-token logits, in order.

        The batch is padded to a row count whose products are row-invariant; when some layer keeps
        PEFT's per-adapter path, rows are grouped by adapter and each group is padded too."""
        from lorakit.infer import BASE

        order: list[_Row | None] = []
        names: list[str] = []
        if self._grouped:
            groups: dict[str, list[_Row]] = {}
            for r in live:
                groups.setdefault(r.req.adapter, []).append(r)
            for name, rows in groups.items():
                n = len(rows) if name == BASE else self.rows.pad(len(rows))  # base rows skip the LoRA products
                order += rows + [None] * (n - len(rows))
                names += [name] * n
        else:  # every product is shared by all rows: only the whole batch is padded
            order = list(live)
            names = [r.req.adapter for r in live]
        total = self.rows.pad(len(order))
        order += [None] * (total - len(order))
        names += [BASE] * (total - len(names))
        at = {id(r): i for i, r in enumerate(order) if r is not None}
        perm = [at[id(r)] for r in live]
        ids = torch.tensor([[r.last if r is not None else self.pad_id] for r in order], device=self.device)
        pos = torch.tensor([[r.slot.length if r is not None else 0] for r in order], device=self.device)
        return self._forward(ids, pos, live, names, rows_at=perm)

    def _forward(self, ids, pos, rows: list[_Row], names: list[str], rows_at: list[int] | None = None):
        """Logits of the last position for each real row (in `rows` order)."""
        rows_at = rows_at if rows_at is not None else list(range(len(rows)))
        # _RowCache.update stores row i of the batch into slots[i]: map batch positions to slots.
        slots = [_Slot(self.layers) for _ in range(ids.shape[0])]  # dummy rows attend to themselves
        for r, i in zip(rows, rows_at):
            slots[i] = r.slot
        _step.slots, _step.names, _step.plan = slots, names, _Plan(names, self.device)
        try:
            out = self.session.model(input_ids=ids, position_ids=pos, cache=_RowCache(slots), use_cache=True,
                                     logits_to_keep=1)
        finally:
            _step.slots = _step.names = _step.plan = None
        return out.logits[rows_at, -1, :]
