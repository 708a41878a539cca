"""The step-wise decoder every stage generates through: `generate`, `chat`, eval's answers, the
merge and export checks, the training probe, and the server's scheduler.

A request is prefilled on its own (so a joiner never changes another row's numbers), then each
step runs one forward over every live row, each with its own adapter, and each row chooses its
token with its own sampler. Greedy output does not depend on who else is in the batch:
- attention runs per row over the row's own keys (infer/kv.py);
- matrix products whose kernel depends on the row count are kept to counts that do not: on this
  CPU's BLAS, rows come out bit-identical for M in {4, 8} and M >= 12, but not for M = 1-3, 5-7,
  9-11. `gemm_row_sizes` measures that set (once per process and set of shapes) on the model's own
  shapes, and every step pads the batch up to a size in it with dummy rows (and each adapter's
  group of rows too, when some layer keeps PEFT's per-group path). On CPU the padding is nearly
  free: a small-M product is bound by reading the weights, not by arithmetic.

Installing the decoder on a model (its attention implementation, the LoRA stacks of
model/lora_runtime.py) is undone by `close` or by leaving its `with` block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lorakit.errors import LorakitError
from lorakit.infer import kv
from lorakit.infer.sampling import Sampler, Sampling
from lorakit.infer.text import TextStream

BASE = "__base__"
"""PEFT's name for "no adapter" in `adapter_names`; also how callers ask for the base model."""
PREFILL_TOKENS = 2048
"""Most prompt tokens one packed prefill forward takes (a prompt longer than that goes alone)."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=lambda: Sampling(greedy=True))
    stop_ids: tuple[int, ...] = ()  # end the answer with finish_reason 'stop' (the token not in it)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first, 'stop'
    adapter: str = BASE
    seed: int | None = None  # this row's seed (else sampling.seed, else the OS's)


class Row:
    """A request being decoded: its slot, its sampler, its answer so far."""

    def __init__(self, req: Request, layers: int, tokenizer=None):
        self.req = req
        self.slot = kv.Slot(layers)
        self.sampler = Sampler(req.sampling, req.seed)
        self.ids: list[int] = []  # the answer's tokens, the stop token excluded
        self.last: int | None = None  # the token to feed at the next step
        self.stream = TextStream(tokenizer, req.stop) if tokenizer is not None else None
        self.finish_reason: str | None = None  # 'stop' | 'length' | set by the caller: 'cancelled', ...
        self.by_token = 0  # 1 when a stop token ended it (counted as generated, not part of the text)
        self.stop_token: int | None = None  # which one

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self, logits: torch.Tensor) -> str:
        """Choose and accept the next token; the new text safe to show."""
        token = self.sampler(logits, self.req.prompt_ids + self.ids if self.req.sampling.repetition_penalty != 1.0
                             else self.ids)
        if token in self.req.stop_ids:
            self.by_token, self.stop_token, self.finish_reason = 1, token, "stop"
            return self.stream.rest() if self.stream else ""
        self.ids.append(token)
        self.last = token
        delta, stopped = self.stream.push(token) if self.stream else ("", False)
        if stopped:
            self.finish_reason = "stop"
        elif len(self.ids) >= self.req.max_new_tokens:
            self.finish_reason = "length"
            delta += self.stream.rest() if self.stream else ""
        return delta

    def end(self, reason: str) -> str:
        """End the row from outside ('cancelled', 'timeout', 'error'): the text still to show."""
        if self.done:
            return ""
        self.finish_reason = reason
        return self.stream.rest(complete=False) if self.stream else ""

    @property
    def completion_tokens(self) -> int:
        return len(self.ids) + self.by_token

    @property
    def generated(self) -> list[int]:
        """Every token generated, the stop token included (as `model.generate` returns them)."""
        return self.ids + ([self.stop_token] if self.stop_token is not None else [])


def greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
    """Greedy continuations of `prompts` by `model` (PEFT with its active adapter, or plain), each
    cut after its first stop token (included): the checks of merge and export compare these."""
    reqs = [Request(list(p), max_new_tokens, stop_ids=tuple(stop_ids)) for p in prompts]
    with Decoder(model, stacked=False) as d:
        return [r.generated for r in d.run(reqs)]


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

    _measured: dict = {}  # (shape, dtype, device, upto) -> ok list: a process measures a shape once

    def __init__(self, shapes: list[tuple[int, int]], dtype=None, device="cpu", upto: int = 64):
        oks = []
        for a, b in shapes:
            key = (a, b, str(dtype), str(device), upto)
            if key not in self._measured:
                self._measured[key] = gemm_row_sizes(a, b, upto=upto, dtype=dtype, device=device)
            oks.append(self._measured[key])
        self.ok = [all(o[m] for o in oks) for m in range(upto + 1)]
        self.upto = upto
        self.exact = any(self.ok[1:])  # no invariant size at all (some GPU BLAS): pad nothing, promise nothing

    def pad(self, n: int) -> int:
        if not self.exact or n > self.upto:
            return n
        return next((m for m in range(n, self.upto + 1) if self.ok[m]), n)


# --------------------------------------------------------------------------- the decoder


class Decoder:
    """A model (PEFT or plain) made ready for step-wise decoding; see the module docstring.
    `adapters`: the PEFT adapters rows may name (stacked side by side). `stacked=False`: every LoRA
    layer runs PEFT's own forward with the model's active adapter, and rows' adapter names are
    not used (DoRA, or a model whose layers the training fast path replaced). `head_weight`: the LM
    head's weight already in the dtype autocast would cast it to (training's rollouts hold one):
    logits come from the decoder body and this weight, instead of a cast of the whole head (56 MB
    for SmolLM2) at every step; ignored where body + head is not exactly the model's forward."""

    def __init__(self, model, tokenizer=None, *, adapters: Sequence[str] = (), stacked: bool = True,
                 head_weight: torch.Tensor | None = None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.tokenizer = model, tokenizer
        self.base = base
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.layers = cfg.num_hidden_layers
        self.device = model.device
        self.dtype = next(model.parameters()).dtype
        self.pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0)
        kv.register()
        self._attention = base.config._attn_implementation
        base.set_attn_implementation(kv.ATTENTION)
        self.lora = None
        if stacked and hasattr(model, "peft_config"):
            from lorakit.model.lora_runtime import StackedLora

            self.lora = StackedLora(model, list(adapters))
        self.body = None
        if head_weight is not None:
            from lorakit.model.loss import split_head

            split = split_head(model)
            if split is not None and split[1].bias is None:
                self.body, self.head_weight = split[0], head_weight
        self.rows: RowSizes | None = None
        self._measure()
        self.steps = 0

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the model back as it was: its attention implementation and every LoRA forward."""
        if self.lora is not None:
            self.lora.uninstall()
            self.lora = None
        if self._attention is not None:
            self.base.set_attn_implementation(self._attention)
            self._attention = None

    def refresh(self, adapters: Sequence[str]) -> None:
        """The adapters loaded changed: rebuild the stacks and re-measure the row sizes."""
        if self.lora is not None:
            self.lora.refresh(list(adapters))
        self._measure()

    def _measure(self) -> None:
        if self.lora is not None:
            shapes = self.lora.shapes
        else:
            head = self.model.get_output_embeddings()
            shapes = {(m.in_features, m.out_features) for m in self.model.modules()
                      if isinstance(m, torch.nn.Linear) and m is not head}
        self.rows = RowSizes(sorted(shapes), dtype=self.dtype, device=self.device)

    @property
    def grouped(self) -> bool:
        return self.lora is not None and self.lora.grouped

    # ---- decoding

    def start(self, req: Request) -> tuple[Row, str]:
        """Prefill one request alone and take its first token: (the row, its first text)."""
        return self.start_many([req])[0]

    def start_many(self, reqs: Sequence[Request]) -> list[tuple[Row, str]]:
        """Prefill requests and take each one's first token. Prompts are packed end to end into
        forwards of up to PREFILL_TOKENS tokens, each at its own positions and attending only to
        itself (kv.Rows.packed): on CPU a product over one prompt's ~100 rows runs several times
        slower per row than over a thousand. Rows of different adapters share a packed forward
        unless some layer keeps PEFT's per-adapter path. A prompt asked for several times (GRPO's
        group, n > 1 samples) is prefilled once: the others get a copy of its keys and values and
        choose their first token, each with its own sampler, from the same logits."""
        for req in reqs:
            if not req.prompt_ids:
                raise LorakitError("the prompt is empty", hint="a prompt needs at least one token")
        rows = [Row(req, self.layers, self.tokenizer) for req in reqs]
        first: dict[tuple, Row] = {}  # (prompt, adapter) -> the row that prefills it
        for r in rows:
            first.setdefault((tuple(r.req.prompt_ids), r.req.adapter), r)
        logits_of: dict[int, torch.Tensor] = {}
        for group in self._prefill_groups(list(first.values())):
            lengths = [len(r.req.prompt_ids) for r in group]
            ids = torch.tensor([[t for r in group for t in r.req.prompt_ids]], device=self.device)
            pos = torch.tensor([[p for n in lengths for p in range(n)]], device=self.device)
            ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            names = [r.req.adapter for r, n in zip(group, lengths) for _ in range(n)]
            logits = self.forward(ids, pos, kv.Rows.packed([r.slot for r in group], lengths), names, keep=ends,
                                  row_names=[group[0].req.adapter])
            logits_of.update((id(r), lg) for r, lg in zip(group, logits))
        out: list[tuple[Row, str]] = []
        for r in rows:
            src = first[(tuple(r.req.prompt_ids), r.req.adapter)]
            if src is not r:
                r.slot = src.slot.copy()
            out.append((r, r.take(logits_of[id(src)])))
        return out

    def _prefill_groups(self, rows: list[Row]) -> list[list[Row]]:
        groups: list[list[Row]] = []
        size = 0
        for r in rows:
            n = len(r.req.prompt_ids)
            same = not groups or not self.grouped or groups[-1][0].req.adapter == r.req.adapter
            if groups and same and size + n <= PREFILL_TOKENS:
                groups[-1].append(r)
                size += n
            else:
                groups.append([r])
                size = n
        return groups

    def step(self, rows: list[Row]) -> list[str]:
        """One decode step for `rows` (each feeds its last token): each row's new text."""
        logits = self.step_logits(rows)
        self.steps += 1
        return [r.take(lg) for r, lg in zip(rows, logits)]

    def step_logits(self, rows: list[Row]) -> torch.Tensor:
        """The next-token logits of `rows`, in order, from one forward over the batch padded to a
        row count whose products are row-invariant (per adapter group too, when `grouped`)."""
        order: list[Row | None] = []
        names: list[str] = []
        if self.grouped:
            groups: dict[str, list[Row]] = {}
            for r in rows:
                groups.setdefault(r.req.adapter, []).append(r)
            for name, group in groups.items():
                n = len(group) if name == BASE else self.rows.pad(len(group))  # base rows skip the LoRA products
                order += group + [None] * (n - len(group))
                names += [name] * n
        else:  # every product is shared by all rows: only the whole batch is padded
            order = list(rows)
            names = [r.req.adapter for r in rows]
        total = self.rows.pad(len(order))
        order += [None] * (total - len(order))
        names += [BASE] * (total - len(names))
        at = {id(r): i for i, r in enumerate(order) if r is not None}
        perm = [at[id(r)] for r in rows]
        ids = torch.tensor([[r.last if r is not None else self.pad_id] for r in order], device=self.device)
        pos = torch.tensor([[r.slot.length if r is not None else 0] for r in order], device=self.device)
        slots = [r.slot if r is not None else kv.Slot(self.layers) for r in order]  # dummies attend to themselves
        return self.forward(ids, pos, slots, names)[perm]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: kv.Rows | list[kv.Slot], names: list[str], *,
                keep: torch.Tensor | None = None, row_names: list[str] | None = None) -> torch.Tensor:
        """Next-token logits. With a list of slots: of the last position of each batch row, whose
        keys and values go to slots[i] and which uses adapter names[i]. With packed `rows`: of the
        positions `keep` of batch row 0, `names` one adapter per position (`row_names`: the batch
        row's, for the layers that keep PEFT's path)."""
        rows = rows if isinstance(rows, kv.Rows) else kv.Rows.per_row(rows)
        if self.lora is not None:
            from lorakit.model.lora_runtime import Plan

            self.lora.plan = Plan(names, self.device, per_token=keep is not None, row_names=row_names)
        try:
            if self.body is not None:
                hidden = self.body(input_ids=ids, position_ids=pos, cache=kv.RowCache(rows), use_cache=True,
                                   **{kv.SLOTS: rows}).last_hidden_state
                hidden = hidden[:, -1, :] if keep is None else hidden[0, keep]
                return torch.nn.functional.linear(hidden.to(self.head_weight.dtype), self.head_weight)
            out = self.model(input_ids=ids, position_ids=pos, cache=kv.RowCache(rows), use_cache=True,
                             logits_to_keep=1 if keep is None else keep, **{kv.SLOTS: rows})
        finally:
            if self.lora is not None:
                self.lora.plan = None
        return out.logits[:, -1, :] if keep is None else out.logits[0]

    @torch.inference_mode()
    def run(self, reqs: Sequence[Request], *, on_text: Callable[[int, str], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> list[Row]:
        """Decode every request to its end, all in one batch: the rows, in order. `on_text(i, delta)`
        receives each row's text as it comes; once `cancel()` is true the rows still going end
        'cancelled' with the text so far."""
        rows: list[Row] = []
        for i, (row, delta) in enumerate(self.start_many(reqs)):
            rows.append(row)
            if delta and on_text:
                on_text(i, delta)
        while True:
            live = [(i, r) for i, r in enumerate(rows) if not r.done]
            if not live:
                return rows
            if cancel is not None and cancel():
                for i, r in live:
                    delta = r.end("cancelled")
                    if delta and on_text:
                        on_text(i, delta)
                return rows
            for (i, _), delta in zip(live, self.step([r for _, r in live])):
                if delta and on_text:
                    on_text(i, delta)


__all__ = ["BASE", "Decoder", "Request", "Row", "RowSizes", "gemm_row_sizes", "greedy"]
