"""The records stages append or write beside the adapter: metrics and diagnostics (JSONL), and
`lorakit eval`'s per-example records and summaries."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.artifacts.atomic import atomic_write_json
from lorakit.errors import LorakitError


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


def now_iso() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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


ENDING_KINDS = frozenset({"nonfinite", "oom", "nan"})
"""The diagnostics that end a training (lorakit.train.run writes them): a run folder with one of
them and no adapter failed, rather than being stopped or killed."""


def read_diagnostics(paths) -> list[Diagnostic]:
    """The run's diagnostics.jsonl (`paths`: its RunPaths; paths.py reads records, not the reverse)."""
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
