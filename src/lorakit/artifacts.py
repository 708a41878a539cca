"""The run directory: how stages hand work to each other.

`runs/<name>/` holds `config.yaml` (resolved), `adapter/` (PEFT files plus `lorakit.json`),
`checkpoints/`, `logs/` (TensorBoard), `metrics.jsonl` (every train/eval log record),
`diagnostics.jsonl` (every warning raised), `data.json` (what the data looked like),
`eval/` (per-example results and summaries of `lorakit eval`), `merge.json` (the last merge's
parity check) and `report.html`. `RunPaths` is the one place these names are spelled. Every
later stage needs only the run or adapter folder, so `lorakit.json` carries everything needed
to use the adapter again: template, base model and its hash, data fingerprint, versions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from lorakit.errors import LorakitError

META_FILE = "lorakit.json"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class RunPaths:
    """The files of one run folder, by what they hold."""

    root: Path

    @classmethod
    def of(cls, path: str | Path) -> "RunPaths":
        """A run folder, or its adapter folder (runs/<name>/adapter -> runs/<name>)."""
        p = Path(path)
        if p.name == ADAPTER_DIR and (p / META_FILE).exists():
            p = p.parent
        return cls(p)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        """metrics.jsonl: one JSON object per Trainer log record (see train.callbacks.MetricsLogger)."""
        return self.root / "metrics.jsonl"

    @property
    def diagnostics(self) -> Path:
        """diagnostics.jsonl: one `Diagnostic` per line, in the order raised."""
        return self.root / "diagnostics.jsonl"

    @property
    def data(self) -> Path:
        """data.json: `lorakit.data.dataset.DataStats.to_dict()` plus the template name."""
        return self.root / "data.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_records(self, name: str) -> Path:
        """eval/<name>.jsonl: one `EvalRecord` per example."""
        return self.eval_dir / f"{name}.jsonl"

    def eval_summary(self, name: str) -> Path:
        return self.eval_dir / f"{name}.summary.json"

    @property
    def export_dir(self) -> Path:
        """export/: `lorakit export`'s default output (GGUFs, their .verify.json, ollama/)."""
        return self.root / "export"

    def verifications(self) -> list[Path]:
        """export/*.verify.json: one per exported GGUF (lorakit.export.verify.Verification), by name."""
        return sorted(self.export_dir.glob("*.verify.json")) if self.export_dir.is_dir() else []

    def eval_summaries(self) -> list["EvalSummary"]:
        """Every summary in eval/, oldest first."""
        if not self.eval_dir.is_dir():
            return []
        out = [EvalSummary.read(p) for p in self.eval_dir.glob("*.summary.json")]
        return sorted(out, key=lambda s: s.created)

    @property
    def merge(self) -> Path:
        """merge.json: the last `lorakit merge`'s parity check (also written into the merged folder)."""
        return self.root / "merge.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


def fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_mode(*, folder: bool = False) -> int:
    """The mode `open()` / `mkdir()` would give under the process umask (0644 / 0755 usually).

    `tempfile.mkstemp` / `mkdtemp` create 0600 / 0700 entries on purpose; an artifact staged in
    one and renamed into place would keep that, and another user (the Ollama service, a web
    server) could not read it. Staged artifacts are set to this mode before they are published."""
    current = os.umask(0)
    os.umask(current)
    return (0o777 if folder else 0o666) & ~current


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    A crash inside the block leaves `target` as it was (old or absent), never half written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, umask_mode(folder=True))
        yield tmp
        # libraries stage files through mkstemp too (safetensors' model file is 0600): the whole tree
        # gets the umask's modes, so what is published is readable as any file the user writes
        for p in tmp.rglob("*"):
            if not p.is_symlink():
                os.chmod(p, umask_mode(folder=p.is_dir()))
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("lorakit", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def find_adapter_dir(path: str | Path) -> Path:
    """Accept a run folder or an adapter folder and return the adapter folder."""
    p = Path(path)
    if not p.exists():
        raise LorakitError(f"no such folder: {p}", hint="pass a run folder (runs/<name>) or its adapter/ folder")
    for candidate in (p, p / ADAPTER_DIR):
        if (candidate / "adapter_config.json").is_file():
            if not (candidate / META_FILE).is_file():
                raise LorakitError(
                    f"{candidate} is a PEFT adapter without {META_FILE}, so its template and base model are unknown",
                    hint="use an adapter trained by `lorakit train`, or add lorakit.json from a run that used the same base",
                )
            return candidate
    raise LorakitError(
        f"{p} holds no adapter (no adapter_config.json in it or in {p / ADAPTER_DIR})",
        hint="train first with `lorakit train CONFIG`, or point at runs/<name>",
    )


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
    template: dict[str, Any]  # lorakit.data.templates.Template.to_dict()
    data: DataRef
    max_length: int
    lora: dict[str, Any]  # the run's resolved lora section
    train: dict[str, Any]  # the run's resolved train section
    versions: dict[str, str]
    metrics: dict[str, Any]
    schema: int = SCHEMA_VERSION

    @classmethod
    def build(cls, cfg, prepared, info, metrics: dict[str, Any]) -> "AdapterMeta":
        """The metadata of a finished run: resolved config, prepared data, loaded base (ModelInfo)."""
        d = cfg.to_dict()
        return cls(
            base=BaseModelRef(cfg.model.name, str(info.path), info.sha256, info.dtype, info.quantization,
                              cfg.model.gguf_file, cfg.model.revision),
            template=prepared.template.to_dict(),
            data=DataRef(list(cfg.data.train), list(cfg.data.validation), prepared.fingerprint,
                         len(prepared.train), len(prepared.validation)),
            max_length=cfg.data.max_length, lora=d["lora"], train=d["train"], versions=library_versions(),
            metrics=dict(metrics),
        )

    def template_object(self):
        from lorakit.data.templates import Template

        return Template.from_dict(self.template)

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
                template=dict(raw["template"]),
                data=DataRef(**{f.name: data[f.name] for f in dataclasses.fields(DataRef)}),
                max_length=int(raw["max_length"]), lora=dict(raw["lora"]), train=dict(raw["train"]),
                versions=dict(raw.get("versions") or {}), metrics=dict(raw.get("metrics") or {}),
                schema=SCHEMA_VERSION,
            )
        except KeyError as e:
            raise bad(f"missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise bad(f"malformed field: {e}") from None


def read_meta(adapter_dir: Path) -> AdapterMeta:
    path = Path(adapter_dir) / META_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LorakitError(f"cannot read {path}: {e}", hint="re-run `lorakit train` to write a fresh adapter") from None
    return AdapterMeta.from_json(text, str(path))


def write_meta(folder: Path, meta: AdapterMeta) -> None:
    (Path(folder) / META_FILE).write_text(meta.to_json(), encoding="utf-8")


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


def save_adapter(model, tokenizer, target: Path, meta: AdapterMeta) -> None:
    """PEFT files + tokenizer (with the trained chat template) + lorakit.json into `target`, atomically."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp, meta.template_object())
        write_meta(tmp, meta)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file lorakit wrote; a torn last line (a killed run) is skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def atomic_write_json(path: Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def now_iso() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- diagnostics and eval records


@dataclass(frozen=True)
class Diagnostic:
    """A problem raised during a run (lorakit.train.diagnostics): its key ('lr_high', 'flat', 'nan', ...),
    the optimizer step (None before training), the message shown to the user, and when."""

    kind: str
    message: str
    step: int | None = None
    time: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Diagnostic":
        return cls(str(d.get("kind", "")), str(d.get("message", "")), d.get("step"), str(d.get("time", "")))


def read_diagnostics(paths: RunPaths) -> list[Diagnostic]:
    return [Diagnostic.from_dict(d) for d in read_jsonl(paths.diagnostics)]


EVAL_SCHEMA = 1


@dataclass(frozen=True)
class EvalSummary:
    """eval/<data>.summary.json: what `lorakit eval` measured on one dataset.

    `models` are the columns of the table: "tuned" always, "base" with --base (the base prompted
    with the adapter's template). `loss` / `perplexity` map a model to its token-weighted held-out
    loss (None without labelled tokens); `scores` map a model to its generation metrics
    (lorakit.metrics.SCORES, plus json_valid / json_field_accuracy when every reference is JSON)."""

    data: str  # 'validation', 'test', or the file stem
    sources: list[str]
    count: int
    adapter: str
    models: list[str]
    loss: dict[str, float | None]
    perplexity: dict[str, float | None]
    scores: dict[str, dict[str, float]]
    generation: dict[str, Any]  # max_new_tokens, batch_size, seconds, answers_per_s
    created: str = ""
    schema: int = EVAL_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, path: Path) -> "EvalSummary":
        where = str(path)
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LorakitError(f"cannot read the eval summary: {e}", where=where,
                               hint="re-run `lorakit eval RUN` to write it again") from None
        if not isinstance(raw, dict) or raw.get("schema", 0) > EVAL_SCHEMA:
            raise LorakitError("not an eval summary this lorakit can read", where=where,
                               hint="re-run `lorakit eval RUN`, or upgrade lorakit")
        try:
            return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
        except TypeError as e:
            raise LorakitError(f"malformed eval summary: {e}", where=where,
                               hint="re-run `lorakit eval RUN` to write it again") from None

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())


@dataclass(frozen=True)
class EvalRecord:
    """One line of eval/<data>.jsonl: the prompt (messages), the reference, each model's answer and
    its per-example scores ({model: {metric: value}})."""

    index: int
    prompt: list[dict[str, Any]]
    reference: str
    answers: dict[str, str]
    scores: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalRecord":
        return cls(int(d["index"]), list(d["prompt"]), str(d["reference"]), dict(d["answers"]), dict(d["scores"]))


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --------------------------------------------------------------------------- claiming a run folder


def has_work(run_dir: Path) -> bool:
    """A trained adapter or a checkpoint: something a new run must not silently destroy."""
    return (run_dir / ADAPTER_DIR).exists() or any((run_dir / "checkpoints").glob("checkpoint-*"))


def check_free(run_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace a finished or resumable run unless told to."""
    if run_dir.exists() and has_work(run_dir) and not overwrite:
        raise LorakitError(
            f"run folder {run_dir} already exists and holds a trained adapter or checkpoints",
            hint="continue it with `lorakit train CONFIG --resume`, choose another name (--output.name NEW), "
            "or replace it with --output.overwrite true",
        )


def claim(run_dir: Path) -> Path | None:
    """Create the run folder once everything before training has succeeded; returns the backup.

    A folder left by a run that failed before its first checkpoint holds nothing worth
    keeping and is cleared. A finished run being overwritten is moved aside, not deleted,
    and only removed once the new adapter is published (`release`), so a failed or killed
    replacement never costs the old run (`restore`).
    """
    backup = None
    if run_dir.exists() and any(run_dir.iterdir()):
        if has_work(run_dir):
            backup = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
            os.replace(run_dir, backup)
        else:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return backup


def restore(run_dir: Path, backup: Path | None, log) -> None:
    """The replacement failed: put the previous run back, unless the new one left checkpoints to resume."""
    if backup is None or not backup.exists():
        return
    if has_work(run_dir):
        log(f"the previous run in {run_dir} was kept at {backup}")
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    os.replace(backup, run_dir)


def release(backup: Path | None) -> None:
    """The replacement succeeded: the previous run can go."""
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
