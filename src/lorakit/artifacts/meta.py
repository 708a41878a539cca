"""lorakit.json: what an adapter folder carries so that every later stage can use it on its own
(template, base model and its hash, data fingerprint, hyperparameters, versions)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

from lorakit.artifacts.atomic import atomic_dir, atomic_write_text
from lorakit.artifacts.paths import META_FILE
from lorakit.config import LoraConfig, ModelConfig, TrainConfig
from lorakit.data.templates import Template
from lorakit.errors import LorakitError


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("lorakit", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


SCHEMA_VERSION = 2
"""Version of lorakit.json. 1 (lorakit 0.1 before the typed contract) has the same fields under
`format`, and is read as is; a newer version than this is refused, naming the upgrade."""


@dataclass(frozen=True)
class BaseModelRef:
    """The base an adapter was trained on: enough to load it again and to check it is the same."""

    name: str  # model.name as configured (hub id, folder, .gguf, or the embedded alias)
    path: str  # the folder or hub id actually loaded
    sha256: str | None  # of the weights (lorakit.model.load); None when the files were not found
    dtype: str  # 'float32' | 'bfloat16' | 'float16'
    quantization: str  # 'none' | '4bit' | '8bit'
    gguf_file: str | None = None
    revision: str | None = None

    def model_config(self, **how: Any) -> ModelConfig:
        """The model section that loads this base again; `how` sets the rest (dtype, quantization, ...)."""
        return ModelConfig(name=self.name or self.path, gguf_file=self.gguf_file, revision=self.revision, **how)


BasePolicy = Literal["error", "warn", "quiet"]
Unknown = Literal["same", "different", "by name"]


def same_base(trained: BaseModelRef, held: BaseModelRef, *, unknown: Unknown) -> bool:
    """Whether `held` is the base `trained` names. The weights' hashes decide when both are known;
    otherwise `unknown` does: trust it ('same'), refuse it ('different'), or compare the names
    ('by name': the held name is the trained base's name or the folder it was loaded from)."""
    if trained.sha256 and held.sha256:
        return trained.sha256 == held.sha256
    if unknown == "by name":
        return held.name in (trained.name, trained.path)
    return unknown == "same"


def check_same_base(trained: BaseModelRef, held: BaseModelRef, *, policy: BasePolicy, unknown: Unknown,
                    held_as: str, subject: str = "adapter", consequence: str = "", where: str | None = None,
                    hint: str = "", log: Callable[[str], None] = print) -> bool:
    """The one "same base?" check of every stage that puts an adapter over a base (`held`: a
    BaseModelRef, or the ModelInfo of the base just loaded); returns the verdict.

    On a mismatch `policy` says what happens: 'error' raises (loading the adapter anyway would
    give wrong answers silently), 'warn' logs and goes on (the user asked for this base, the
    outputs are only off), 'quiet' leaves it to the caller."""
    if same_base(trained, held, unknown=unknown):
        return True
    if policy == "error":
        raise LorakitError(f"{subject} was trained on another base ({trained.name}, weights "
                           f"{trained.sha256 or 'unknown'}) than {held_as} ({held.name}, weights "
                           f"{held.sha256 or 'unknown'})", where=where, hint=hint)
    if policy == "warn":
        then = f"; {consequence}" if consequence else ""
        log(f"warning: the base weights {held_as} differ from the ones this {subject} was trained on "
            f"({(held.sha256 or '?')[:12]} != {(trained.sha256 or '?')[:12]}){then}")
    return False


@dataclass(frozen=True)
class DataRef:
    train: list[str]
    validation: list[str]
    fingerprint: str  # sha256 of the token ids and labels of both splits
    train_examples: int
    validation_examples: int


@dataclass(frozen=True)
class AdapterMeta:
    """Everything a later stage needs to use an adapter folder: lorakit.json, typed.

    The only way the file is written (`write_meta`) or read (`read_meta`), so a field renamed or
    added here is renamed or added everywhere."""

    base: BaseModelRef
    template: Template  # what training rendered, so every later stage renders the same
    data: DataRef
    max_length: int
    lora: LoraConfig  # the run's resolved lora section
    train: TrainConfig  # the run's resolved train section
    versions: dict[str, str]
    metrics: dict[str, Any]
    schema: int = SCHEMA_VERSION

    @classmethod
    def build(cls, cfg, prepared, info, metrics: dict[str, Any]) -> "AdapterMeta":
        """The metadata of a finished run: resolved config, prepared data, loaded base (ModelInfo)."""
        return cls(
            base=BaseModelRef(cfg.model.name, str(info.path), info.sha256, info.dtype, info.quantization,
                              cfg.model.gguf_file, cfg.model.revision),
            template=prepared.template,
            data=DataRef(list(cfg.data.train), list(cfg.data.validation), prepared.fingerprint,
                         len(prepared.train), len(prepared.validation)),
            max_length=cfg.data.max_length, lora=copy.deepcopy(cfg.lora), train=copy.deepcopy(cfg.train),
            versions=library_versions(),
            metrics=dict(metrics),
        )

    def template_object(self) -> Template:
        """The template (kept for callers from before `template` was typed)."""
        return self.template

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        out = {"schema": d.pop("schema"), "base_model": d.pop("base")}
        out.update(d)
        return json.dumps(out, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> "AdapterMeta":
        def bad(problem: str) -> LorakitError:
            return LorakitError(f"{problem}", where=where,
                                hint="re-create it with `lorakit train` (or copy lorakit.json from the run "
                                "that trained this adapter)")

        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise bad(f"not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise bad(f"expected a JSON object, got {type(raw).__name__}")
        version = raw.get("schema", raw.get("format"))
        if not isinstance(version, int):
            raise bad("no schema version (key 'schema')")
        if version > SCHEMA_VERSION:
            raise LorakitError(
                f"written by a newer lorakit (schema {version}; this lorakit reads up to {SCHEMA_VERSION})",
                where=where, hint="upgrade lorakit: pip install -U lorakit")
        try:
            base = raw["base_model"]
            data = raw["data"]
            return cls(
                base=BaseModelRef(**{f.name: base[f.name] if f.default is dataclasses.MISSING else
                                     base.get(f.name, f.default) for f in dataclasses.fields(BaseModelRef)}),
                template=Template.from_dict(raw["template"]),
                data=DataRef(**{f.name: data[f.name] for f in dataclasses.fields(DataRef)}),
                max_length=int(raw["max_length"]), lora=_section(LoraConfig, raw["lora"]),
                train=_section(TrainConfig, raw["train"]),
                versions=dict(raw.get("versions") or {}), metrics=dict(raw.get("metrics") or {}),
                schema=SCHEMA_VERSION,
            )
        except KeyError as e:
            raise bad(f"missing key {e.args[0]!r}") from None
        except (AttributeError, TypeError, ValueError) as e:
            raise bad(f"malformed field: {e}") from None


def _section(cls: type, raw: dict[str, Any]):
    """A config section as lorakit.json stores it (`asdict` of the resolved section). A key this
    lorakit does not know (written by a later one) is left out; a key it lacks takes its default."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(raw).items() if k in known})


def read_meta(adapter_dir: Path) -> AdapterMeta:
    path = Path(adapter_dir) / META_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LorakitError(f"cannot read {path}: {e}", hint="re-run `lorakit train` to write a fresh adapter") from None
    return AdapterMeta.from_json(text, str(path))


def write_meta(folder: Path, meta: AdapterMeta) -> None:
    atomic_write_text(Path(folder) / META_FILE, meta.to_json())


def save_tokenizer(tokenizer, folder: Path, template) -> None:
    """Save `tokenizer` into `folder` with `template` (a `Template`) as its chat template.

    The saved `chat_template` is the TRAINED template (not the base tokenizer's), so transformers'
    `apply_chat_template`, vLLM, llama.cpp and Ollama render what training saw. The caller's
    tokenizer object is left as it was."""
    previous = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = template.hf_chat_template(tokenizer)
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = previous
    # transformers 5 saves tokenizer.json only; llama.cpp's converter reads a sentencepiece
    # family's vocabulary (Gemma, Phi-3, Llama 2, Mistral v0.1) from tokenizer.model, so the
    # base's file travels with every adapter and merged folder
    spm = getattr(tokenizer, "vocab_file", None)
    if isinstance(spm, str) and spm.endswith(".model") and Path(spm).is_file():
        dest = Path(folder) / "tokenizer.model"
        if Path(spm).resolve() != dest.resolve():
            shutil.copyfile(spm, dest)


def save_adapter(model, tokenizer, target: Path, meta: AdapterMeta) -> None:
    """PEFT files + tokenizer (with the trained chat template) + lorakit.json into `target`, atomically."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp, meta.template)
        write_meta(tmp, meta)
