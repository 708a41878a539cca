"""report.html's input: the run folder's files, each read on its own; a missing or unreadable
one becomes a note (`RunFiles.missing`), never an error."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit import artifacts
from lorakit.artifacts import AdapterMeta, Diagnostic, EvalRecord, EvalSummary, RunPaths
from lorakit.errors import LorakitError

SAMPLES = 3  # sample answers shown per eval dataset
ROLLOUT_STEPS = 4  # GRPO steps whose sampled answers are shown: the first and the last three recorded
LISTED_ROWS = 5  # dropped / truncated rows named one by one

@dataclass
class RunFiles:
    """What the run folder holds; each part None (or empty) when its file is missing or unreadable,
    with the reason in `missing` ({file: what its absence means})."""

    paths: RunPaths
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: Any = None  # lorakit.config.Config
    config_diff: list[tuple[str, Any, Any]] = field(default_factory=list)  # (dotted key, default, value)
    meta: AdapterMeta | None = None
    data: dict[str, Any] | None = None
    diagnostics: list[Diagnostic] | None = None
    evals: list[tuple[EvalSummary, list[EvalRecord] | None]] = field(default_factory=list)
    merge: dict[str, Any] | None = None
    exports: list[dict[str, Any]] = field(default_factory=list)  # export/*.verify.json
    rollouts: list[dict[str, Any]] = field(default_factory=list)  # rollouts.jsonl: GRPO's sampled answers
    missing: dict[str, str] = field(default_factory=dict)


def read_run(run: str | Path) -> RunFiles:
    """Read every file the report draws from. Refuses only a folder that is not a run at all."""
    paths = RunPaths.of(run)
    root = paths.root
    if not root.is_dir():
        raise LorakitError(f"no such folder: {root}",
                           hint="pass a run folder (runs/<name>) written by `lorakit train`")
    if not paths.adapter.is_dir() and not paths.metrics.is_file():
        raise LorakitError(f"{root} is not a run folder: it holds neither adapter/ nor metrics.jsonl",
                           where=str(root), hint="pass runs/<name> of a `lorakit train` run")
    f = RunFiles(paths)
    f.metrics = artifacts.read_jsonl(paths.metrics)
    if not paths.metrics.is_file():
        f.missing[paths.label(paths.metrics)] = "no training log, so no curves"
    _read_config(f)
    if paths.adapter.is_dir():
        try:
            f.meta = artifacts.read_meta(paths.adapter)
        except LorakitError as e:
            f.missing[paths.label(paths.meta)] = f"unreadable ({e.message})"
    else:
        f.missing[paths.label(paths.adapter)] = "no trained adapter: the run did not finish (killed, failed or stopped on NaN)"
    f.data = _read_json(paths.data, paths.label(paths.data), "no data statistics", f.missing)
    if paths.diagnostics.is_file():
        try:
            f.diagnostics = artifacts.read_diagnostics(paths)
        except (AttributeError, TypeError) as e:  # a line that is not an object
            f.missing[paths.label(paths.diagnostics)] = f"unreadable ({e})"
    else:
        f.missing[paths.label(paths.diagnostics)] = "the run's warnings were not recorded"
    _read_evals(f)
    f.rollouts = artifacts.read_jsonl(paths.rollouts)
    if paths.merge.is_file():
        f.merge = _read_json(paths.merge, paths.label(paths.merge), "unreadable", f.missing)
    for p in paths.verifications():
        v = _read_json(p, paths.label(p), "unreadable", f.missing)
        if v is not None:
            f.exports.append(v)
    return f


def _read_json(path: Path, name: str, absent: str, missing: dict[str, str]) -> dict[str, Any] | None:
    if not path.is_file():
        missing[name] = absent
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        missing[name] = f"unreadable ({e})"
        return None
    if not isinstance(raw, dict):
        missing[name] = f"unreadable (a JSON {type(raw).__name__}, not an object)"
        return None
    return raw


def _read_config(f: RunFiles) -> None:
    from lorakit import config as config_mod

    if not f.paths.config.is_file():
        f.missing[f.paths.label(f.paths.config)] = "the run's settings are unknown"
        return
    try:
        f.config = config_mod.load(f.paths.config)
    except LorakitError as e:
        f.missing[f.paths.label(f.paths.config)] = f"unreadable ({e.message})"
        return
    defaults = _flatten(config_mod.Config().to_dict())
    for key, value in _flatten(f.config.to_dict()).items():
        if key not in defaults or defaults[key] != value:
            f.config_diff.append((key, defaults.get(key), value))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_evals(f: RunFiles) -> None:
    label = f.paths.label
    if not f.paths.eval_dir.is_dir():
        f.missing[label(f.paths.eval_dir)] = "not evaluated yet: `lorakit eval RUN` writes it and this report shows base vs tuned"
        return
    summaries = []
    for p in f.paths.eval_summary_files():
        try:
            summaries.append(EvalSummary.read(p))
        except LorakitError as e:
            f.missing[label(p)] = f"unreadable ({e.message})"
    for s in sorted(summaries, key=lambda s: s.created):
        path = f.paths.eval_records(s.data)
        try:
            records = [EvalRecord.from_dict(r) for r in artifacts.read_jsonl(path)] if path.is_file() else None
        except (KeyError, TypeError, ValueError) as e:
            f.missing[label(path)] = f"unreadable ({e!r})"
            records = None
        if records is None and label(path) not in f.missing:
            f.missing[label(path)] = "no per-example answers, so no samples"
        f.evals.append((s, records))
