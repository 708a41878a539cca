"""A loaded base with any number of named adapters, each with the template it was trained on.

A `Session` loads the base once. Adapters are added by name (PEFT `load_adapter`); which one
answers is chosen per row by the decoder (infer/decoder.py), never by switching global model
state, so rows for different adapters share a batch and the base is selected, not reloaded.
DoRA adapters cannot be stacked that way; a session holding one decodes one adapter per call
(`set_adapter`, or PEFT's `disable_adapter` for the base).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lorakit.artifacts import META_FILE, AdapterMeta, check_same_base, find_adapter_dir, is_run_adapter, read_meta
from lorakit.config import SessionConfig
from lorakit.data.templates import Template
from lorakit.errors import LorakitError
from lorakit.infer.decoder import BASE, Decoder


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    meta: AdapterMeta | None  # None for the model being trained (generation checks during training)
    template: Template
    mixable: bool = True
    """PEFT can mix it with other adapters per row (`adapter_names`): plain LoRA, not DoRA, not LoRA on
    a mixture of experts' expert tensors (lora.experts), and not a model whose LoRA layers the
    training fast path replaced."""

    @classmethod
    def from_meta(cls, name: str, path: Path, meta: AdapterMeta) -> "Adapter":
        return cls(name, path, meta, meta.template, mixable=not (meta.lora.use_dora or meta.lora.experts))


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

    @property
    def mixable(self) -> bool:
        """Rows of different adapters can share a batch: no DoRA, no layers the fast path replaced."""
        return all(a.mixable for a in self.adapters.values())

    @contextlib.contextmanager
    def decoding(self, adapter: str = BASE) -> Iterator[Decoder]:
        """A decoder installed on this session's model for the duration of the block. `adapter`
        matters only for a session that cannot mix adapters per row: it is made the active one
        (or, for BASE, every adapter is switched off) while the block runs."""
        model = self.model
        if not hasattr(model, "peft_config") or self.mixable:
            with Decoder(model, self.tokenizer, adapters=list(self.adapters)) as d:
                yield d
            return
        with contextlib.ExitStack() as stack:
            if adapter == BASE:
                stack.enter_context(model.disable_adapter())
            else:
                model.set_adapter(adapter)
            yield stack.enter_context(Decoder(model, self.tokenizer, stacked=False))

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


def load_session(paths: str | Path | Sequence[str | Path], settings: SessionConfig | None = None, *,
                 log: Callable[[str], None] = print) -> Session:
    """Load the base named in the (first) adapter's lorakit.json once and attach every adapter
    (`settings`: the precision and remote-code permission it is loaded with)."""
    from peft import PeftModel

    from lorakit.model.load import load_model, load_tokenizer

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise LorakitError("no adapter given", hint="pass a run folder (runs/<name>) or an adapter folder")
    first_dir = find_adapter_dir(paths[0])
    meta = read_meta(first_dir)
    settings = settings or SessionConfig()
    mcfg = meta.base.model_config(dtype=settings.dtype, trust_remote_code=settings.trust_remote_code,
                                  gradient_checkpointing="off")
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


__all__ = ["Adapter", "Session", "adapter_name", "load_session"]
