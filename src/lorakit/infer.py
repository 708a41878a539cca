"""Generation: one base model, any number of named adapters, each with the template it was trained on.

The prompt is built by the same `Template.encode_prompt` that produced the training tokens, and
generation stops on the template's stop tokens, so the model sees at inference exactly the format
it learned (the guide's most common failure is a mismatch here).

A `Session` loads the base once. Adapters are added by name (PEFT `load_adapter`); which one
answers is chosen per call with PEFT's `adapter_names` (one name per row, "__base__" for the base
model), never by switching global model state, so rows for different adapters can share a batch
and the base is selected, not reloaded. DoRA adapters cannot be mixed that way in PEFT; a session
falls back to `set_adapter` for them (one adapter per call).

Generation can be cancelled from outside (`stop`: a `threading.Event` or a callable, checked after
every token by a transformers `StoppingCriteria`): `lorakit chat` sets it from Ctrl-C, and a server can
set it when a client goes away. The rows then end with finish reason 'cancelled'.

Message validation lives here too: the CLI's message files and the server's requests go through
`validate_messages`, so both say the same thing about the same mistake.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lorakit.artifacts import META_FILE, AdapterMeta, check_same_base, find_adapter_dir, is_run_adapter, read_meta
from lorakit.data.templates import Template
from lorakit.errors import LorakitError

BASE = "__base__"
"""PEFT's name for "no adapter" in `adapter_names`; also how callers ask for the base model."""

ROLES = ("system", "user", "assistant", "tool")


# --------------------------------------------------------------------------- messages


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
        if not isinstance(m["content"], str):
            raise LorakitError(f"'content' must be a string, got {type(m['content']).__name__}", where=at,
                               hint="put the message text in 'content' as one string")
        out.append(dict(m))
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


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    meta: AdapterMeta | None  # None for the model being trained (generation checks during training)
    template: Template
    mixable: bool = True
    """PEFT can mix it with other adapters per row (`adapter_names`): plain LoRA, not DoRA, and not a
    model whose LoRA layers the training fast path replaced."""

    @classmethod
    def from_meta(cls, name: str, path: Path, meta: AdapterMeta) -> "Adapter":
        return cls(name, path, meta, meta.template, mixable=not meta.lora.use_dora)


@dataclass
class Session:
    """A loaded base, its tokenizer, and the adapters attached to it by name."""

    model: Any
    tokenizer: Any
    adapters: dict[str, Adapter] = field(default_factory=dict)
    base_sha256: str | None = None  # of the base weights loaded (lorakit.model.load)

    @property
    def default(self) -> Adapter:
        return next(iter(self.adapters.values()))

    @property
    def meta(self) -> AdapterMeta:  # the first adapter's: the single-adapter case
        return self.default.meta

    @property
    def template(self) -> Template:
        return self.default.template

    def adapter(self, name: str | None) -> Adapter:
        if name is None or name == BASE:
            return self.default
        if name not in self.adapters:
            raise LorakitError(f"no adapter named {name!r} in this session; loaded: {', '.join(self.adapters)}",
                               hint=f"use one of them, or {BASE!r} for the base model")
        return self.adapters[name]

    def add_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Attach another adapter trained on the same base; returns its name."""
        adapter_dir = find_adapter_dir(path)
        meta = read_meta(adapter_dir)
        name = name or adapter_name(adapter_dir)
        if name in self.adapters or name == BASE:
            raise LorakitError(f"an adapter named {name!r} is already loaded", where=str(path),
                               hint="give it another name")
        first = self.default.meta.base
        # the weights actually in memory, else what the first adapter recorded
        held = dataclasses.replace(first, sha256=self.base_sha256 or first.sha256)
        check_same_base(meta.base, held, policy="error", unknown="by name", subject=f"adapter {name!r}",
                        held_as="this session's", where=str(adapter_dir / META_FILE),
                        hint="serve it over its own base in another session")
        self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        self.adapters[name] = Adapter.from_meta(name, adapter_dir, meta)
        self.model.eval()
        return name


def adapter_name(adapter_dir: Path) -> str:
    """runs/<name>/adapter -> <name>; any other adapter folder -> its own name."""
    return adapter_dir.parent.name if is_run_adapter(adapter_dir) else adapter_dir.name


def load_session(paths: str | Path | Sequence[str | Path], *, dtype: str = "auto",
                 trust_remote_code: bool = False, log: Callable[[str], None] = print) -> Session:
    """Load the base named in the (first) adapter's lorakit.json once and attach every adapter."""
    from peft import PeftModel

    from lorakit.model.load import load_model, load_tokenizer

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise LorakitError("no adapter given", hint="pass a run folder (runs/<name>) or an adapter folder")
    first_dir = find_adapter_dir(paths[0])
    meta = read_meta(first_dir)
    mcfg = meta.base.model_config(dtype=dtype, trust_remote_code=trust_remote_code, gradient_checkpointing="off")
    tokenizer = load_tokenizer(mcfg)
    model, info = load_model(mcfg, training=False, tokenizer=tokenizer)
    check_same_base(meta.base, info, policy="warn", unknown="same", held_as="on disk",
                    consequence="outputs may be off", log=log)
    name = adapter_name(first_dir)
    model = PeftModel.from_pretrained(model, str(first_dir), adapter_name=name, is_trainable=False)
    model.eval()
    session = Session(model, tokenizer, {name: Adapter.from_meta(name, first_dir, meta)}, info.sha256)
    for p in paths[1:]:
        session.add_adapter(p)
    return session


# --------------------------------------------------------------------------- generation


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """One answer: the text, its token ids (without the stop token), the token counts, and why it
    ended: 'stop' (a stop token came), 'length' (max_new_tokens was reached) or 'cancelled' (the
    caller's `stop` was set before either)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the stop token included
    finish_reason: str


class _CallbackStreamer(BaseStreamer):
    """Decode new tokens incrementally and hand each new piece of text to `emit`."""

    def __init__(self, tokenizer, prompt_len: int, emit: Callable[[str], None], stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.emit = emit
        self.skip = prompt_len
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:  # the first call carries the prompt
            n = min(self.skip, len(ids))
            ids, self.skip = ids[n:], self.skip - n
        for i in ids:
            if self.stopped or i in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(i)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # Hold back a trailing replacement char: a multi-byte character may be half decoded.
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


class _StopWhen(StoppingCriteria):
    """Ends every row once `is_set()` is true; transformers checks it after each new token."""

    def __init__(self, is_set: Callable[[], bool]):
        self.is_set = is_set
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.fired = self.fired or bool(self.is_set())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


def _generation_kwargs(tokenizer, template: Template, s: Sampling) -> dict[str, Any]:
    if s.seed is not None:
        torch.manual_seed(s.seed)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=s.max_new_tokens,
        eos_token_id=template.stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        repetition_penalty=s.repetition_penalty,
    )
    if s.greedy or s.temperature <= 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
    return kwargs


def answer_text(tokenizer, ids: list[int]) -> str:
    """The text of an answer's token ids (stop token excluded), as every stage shows and scores it;
    an answer from another engine (llama.cpp) decoded here compares with ours as text."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _completion(tokenizer, generated: list[int], prompt_len: int, stop_ids: list[int],
                cancelled: bool = False) -> Completion:
    stop_at = next((i for i, t in enumerate(generated) if t in stop_ids), None)
    ids = generated if stop_at is None else generated[:stop_at]
    text = answer_text(tokenizer, ids)
    if stop_at is None:
        return Completion(text, ids, prompt_len, len(ids), "cancelled" if cancelled else "length")
    return Completion(text, ids, prompt_len, len(ids) + 1, "stop")


@torch.no_grad()
def generate_batch(session: Session, conversations: list[list[dict]], sampling: Sampling | None = None, *,
                   adapter: str | None = None, use_adapter: bool = True,
                   stream: Callable[[str], None] | None = None,
                   stop: threading.Event | Callable[[], bool] | None = None,
                   template: Template | None = None) -> list[Completion]:
    """Answer several conversations in one left-padded batch with `adapter` (default: the session's
    first; `BASE` or `use_adapter=False`: the base model, prompted with that adapter's template, or
    with `template` when given).

    `stop` (an Event, or a callable returning True to stop) ends generation after the next token;
    rows that had not ended by then are 'cancelled', with the text generated so far."""
    chosen = session.adapter(adapter)
    name = BASE if (adapter == BASE or not use_adapter) else chosen.name
    tok, template = session.tokenizer, template or chosen.template
    for i, msgs in enumerate(conversations):
        if not msgs or msgs[-1].get("role") not in ("user", "tool"):
            raise LorakitError(f"conversation {i} must end with a user message",
                               hint="add a final {'role': 'user', ...}")
    kwargs = _generation_kwargs(tok, template, sampling or Sampling())
    prompts = [template.encode_prompt(tok, msgs) for msgs in conversations]
    width = max(len(p) for p in prompts)
    pad = kwargs["pad_token_id"]
    device = session.model.device
    # Left padding: every prompt ends at the same column, where generation starts.
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    if stream is not None:
        kwargs["streamer"] = _CallbackStreamer(tok, width, stream, set(kwargs["eos_token_id"]))
    stopper = None
    if stop is not None:
        stopper = _StopWhen(stop.is_set if isinstance(stop, threading.Event) else stop)
        kwargs["stopping_criteria"] = StoppingCriteriaList([stopper])
    out = _run_generate(session, name, input_ids, attention_mask, kwargs)
    cancelled = stopper is not None and stopper.fired
    return [_completion(tok, row[width:].tolist(), len(p), kwargs["eos_token_id"], cancelled)
            for row, p in zip(out, prompts)]


def generate(session: Session, messages: list[dict], sampling: Sampling | None = None, *,
             stream: Callable[[str], None] | None = None, adapter: str | None = None,
             use_adapter: bool = True, stop: threading.Event | Callable[[], bool] | None = None,
             template: Template | None = None) -> Completion:
    """The assistant reply to `messages` (see `generate_batch`); `stream` receives text as it comes."""
    return generate_batch(session, [messages], sampling, adapter=adapter, use_adapter=use_adapter, stream=stream,
                          stop=stop, template=template)[0]


def _mixable(session: Session) -> bool:
    """PEFT mixes adapters per row for plain LoRA only, not DoRA."""
    return all(a.mixable for a in session.adapters.values())


def _run_generate(session: Session, name: str, input_ids, attention_mask, kwargs: dict):
    model = session.model
    if not hasattr(model, "peft_config"):  # a plain model (a merged folder): nothing to switch
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if _mixable(session):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              adapter_names=[name] * input_ids.shape[0], **kwargs)
    if name == BASE:
        with model.disable_adapter():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    model.set_adapter(name)  # DoRA: one adapter at a time (see the module docstring)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
