"""Which adapters are served, and which folders may be loaded at run time.

The one owner of three rules: a runtime path must lie inside an `--adapter-root` once symlinks and
`..` are resolved (a client must not make the server read arbitrary folders); a folder is loaded
only when it is a safetensors LoRA adapter trained on the very base in memory (pickle files are
never read: loading one runs code); and the model is changed only on the engine thread, between
two decode steps (a handler never touches it), with unload refused while requests use the adapter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from lorakit import infer
from lorakit.artifacts import META_FILE, PEFT_CONFIG, PEFT_WEIGHTS, check_same_base, find_adapter_dir, read_meta
from lorakit.data.templates import resolve_template
from lorakit.errors import LorakitError, ModelError

WEIGHTS = PEFT_WEIGHTS  # safetensors only: loading pickle (.bin) weights can run code


class AdapterNotFound(LorakitError):
    """No adapter of that name (404 model_not_found)."""


class PathRefused(LorakitError):
    """A runtime load path outside every adapter root (403)."""


class AdapterInUse(LorakitError):
    """Unload refused: requests for the adapter are running or queued (409)."""


class Registry:
    """The served names (base id + adapters) over one Engine; runtime load/unload go through here."""

    def __init__(self, engine, *, adapter_roots: list[str | Path] = (), allow_loading: bool = False):
        self.engine = engine
        self.session: infer.Session = engine.session
        self.roots = [Path(r).resolve() for r in adapter_roots]
        self.allow_loading = allow_loading
        # The base's id: the model name the first adapter was trained on.
        self.base_id = self.session.default.meta.base.name or infer.BASE
        self._base_template = self._own_base_template()
        self._locks: dict[str, asyncio.Lock] = {}
        self._leaving: set[str] = set()  # being unloaded: new requests get 404

    # ---- names

    def adapters(self) -> list[str]:
        return [n for n in self.session.adapters if n not in self._leaving]

    def resolve(self, model: str) -> str:
        """A request's `model` -> the engine's adapter name (infer.BASE for the base)."""
        if model in (self.base_id, infer.BASE):
            return infer.BASE
        if model in self.session.adapters and model not in self._leaving:
            return model
        raise AdapterNotFound(f"the model {model!r} does not exist",
                              hint=f"use one of: {', '.join([self.base_id] + self.adapters())} (GET /v1/models)")

    def template(self, name: str):
        """The template that renders chats for `name`: each adapter's own trained one; the base's own."""
        return self._base_template if name == infer.BASE else self.session.adapters[name].template

    def _own_base_template(self):
        """The base model's chat template (its tokenizer's); a base that has none (a pretrained-only
        model) is prompted in the format the first adapter was trained on, the one prompt format
        that base and adapters can then be compared on."""
        try:
            return resolve_template("model", self.session.tokenizer)
        except ModelError:
            return self.session.default.template

    # ---- paths and validation

    def resolve_path(self, path: str | Path) -> Path:
        """`path` with symlinks and `..` resolved, refused unless it lies inside an adapter root."""
        if not self.roots:
            raise PathRefused("loading adapters from a path needs an adapter root",
                              hint="start the server with --adapter-root DIR (folders clients may load from)")
        real = Path(path).expanduser().resolve()
        if not any(real == r or real.is_relative_to(r) for r in self.roots):
            raise PathRefused(f"{path} is outside the adapter roots ({', '.join(map(str, self.roots))})",
                              hint="put the adapter under an --adapter-root folder")
        return real

    def validate(self, path: str | Path):
        """The adapter folder of `path`, checked to be loadable into this session; returns (dir, meta)."""
        adapter_dir = find_adapter_dir(path)
        if not (adapter_dir / WEIGHTS).is_file():
            found = ", ".join(sorted(p.name for p in adapter_dir.glob(f"{Path(WEIGHTS).stem}.*"))) or "none"
            raise LorakitError(f"no {WEIGHTS} in {adapter_dir} (found: {found})", where=str(adapter_dir),
                               hint="save the adapter as safetensors; pickle (.bin) weights are never loaded "
                               "because loading one can run code")
        meta = read_meta(adapter_dir)
        first = self.session.default.meta.base
        held = dataclasses.replace(first, name=self.base_id, sha256=self.session.base_sha256 or first.sha256)
        # strict: a hot-loaded adapter of unknown provenance must not answer over this base
        check_same_base(meta.base, held, policy="error", unknown="different", held_as="this server's",
                        where=str(adapter_dir / META_FILE), hint="serve it in a server started over its own base")
        try:
            cfg = json.loads((adapter_dir / PEFT_CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise LorakitError(f"cannot read {PEFT_CONFIG}: {e}", where=str(adapter_dir)) from None
        # PEFT mixes adapters per row (any rank, any target modules) for plain LoRA only.
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or meta.lora.use_dora:
            raise LorakitError(f"adapter is {'DoRA' if cfg.get('use_dora') else cfg.get('peft_type')}, which cannot "
                               "share a batch with other adapters", where=str(adapter_dir / PEFT_CONFIG),
                               hint="merge it (lorakit merge) and serve the merged model on its own")
        return adapter_dir, meta

    # ---- runtime changes (on the engine thread)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str, path: str | Path) -> None:
        if not name or name in (infer.BASE, self.base_id):
            raise LorakitError(f"{name!r} cannot be an adapter name", where="lora_name", hint="choose another name")
        real = self.resolve_path(path)
        async with self._lock(name):
            if name in self.session.adapters:
                raise LorakitError(f"an adapter named {name!r} is already loaded", where="lora_name",
                                   hint="unload it first, or choose another name")
            adapter_dir, _ = await asyncio.to_thread(self.validate, real)
            await asyncio.wrap_future(self.engine.call_between_steps(
                lambda: self.session.add_adapter(adapter_dir, name)))

    async def unload(self, name: str) -> None:
        if name not in self.session.adapters:
            raise AdapterNotFound(f"no adapter named {name!r} is loaded",
                                  hint=f"loaded: {', '.join(self.adapters()) or 'none'}")
        if name == self.session.default.name:
            raise LorakitError(f"{name!r} is the first adapter: its template prompts the base model",
                               where="lora_name", hint="unload the adapters loaded after it; restart to change it")
        async with self._lock(name):
            if self.engine.in_use(name):
                raise AdapterInUse(f"adapter {name!r} has {self.engine.in_use(name)} request(s) running or queued",
                                   where="lora_name", hint="retry when they have finished")
            self._leaving.add(name)  # from here no handler submits for it; the engine re-checks what is queued
            try:
                await asyncio.wrap_future(self.engine.call_between_steps(lambda: self._delete(name)))
            finally:
                self._leaving.discard(name)

    def _delete(self, name: str) -> None:
        """On the engine thread: no step is running, so in_use cannot change under us."""
        n = self.engine.in_use(name)
        if n:
            raise AdapterInUse(f"adapter {name!r} has {n} request(s) running or queued", where="lora_name",
                               hint="retry when they have finished")
        self.session.model.delete_adapter(name)
        del self.session.adapters[name]
