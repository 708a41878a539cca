"""`lorakit runs`: the run folders in a directory, one line each, newest first.

The one reader of "what is this run and how far is it": `lorakit runs` prints these rows and the
studio's runs table shows them, so the terminal and the page never disagree. Read from the files
each stage leaves (lorakit.json, metrics.jsonl, diagnostics, eval summaries) and from the lock a
training holds, so a run that is training, was stopped or killed, or failed is listed as such.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from lorakit.artifacts import ENDING_KINDS, RunPaths, SweepPaths, lock, read_jsonl, read_meta
from lorakit.errors import LorakitError
from lorakit.metrics import text_columns

STATES = ("running", "done", "failed", "interrupted", "unreadable")


@dataclass(frozen=True)
class RunRow:
    """A run (or a sweep's trial): what it trains, how far it got and its newest scores."""

    path: Path
    name: str  # its folder's name ('trial-003' for a trial)
    state: str  # one of STATES
    base: str | None = None
    method: str = "sft"
    template: str | None = None  # resolved once trained ('chatml'), as configured before ('auto')
    steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # the tuned model's, on the newest eval set that has any
    scored_on: str | None = None
    modified: float = 0.0  # seconds since the epoch
    sweep: str | None = None  # the sweep folder's name, for a trial


@dataclass(frozen=True)
class SweepRow:
    """A `lorakit sweep` folder: how many trials and the best so far."""

    path: Path
    name: str
    state: str  # 'running' while its driver holds the lock, else 'done'
    objective: str | None
    direction: str | None
    trials: int
    best: dict[str, Any] | None  # {'trial': number, 'value': objective}
    modified: float
    unreadable: bool = False


def run_state(paths: RunPaths) -> str:
    """'running' while a `lorakit train` holds the run's lock; then 'done' (an adapter), 'failed'
    (a diagnostic that ended training: NaN, out of memory) or 'interrupted' (stopped or killed)."""
    if lock.held(paths.writing):
        return "running"
    if paths.meta.is_file():
        return "done"
    if any(r.get("kind") in ENDING_KINDS for r in read_jsonl(paths.diagnostics)):
        return "failed"
    return "interrupted"


def _config(paths: RunPaths) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _scores(paths: RunPaths) -> tuple[dict[str, float], str | None]:
    """The tuned model's scores on the newest eval set that has any, and that set's name."""
    try:
        summaries = paths.eval_summaries()
    except LorakitError:
        return {}, None
    for s in reversed(summaries):
        tuned = {k: v for k, v in s.scores.get("tuned", {}).items() if v is not None}
        if tuned:
            return tuned, s.data
    return {}, None


def run_row(folder: Path, sweep: str | None = None) -> RunRow | None:
    """`folder`'s row, or None when it is not a run folder."""
    paths = RunPaths(folder)
    records = read_jsonl(paths.metrics)
    if not paths.meta.is_file() and not records and not paths.config.is_file():
        return None
    cfg = _config(paths)
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    scores, scored_on = _scores(paths)
    files = [p for p in (paths.metrics, paths.config, paths.meta) if p.exists()]
    row = RunRow(
        folder, folder.name, run_state(paths), base=cfg.get("model", {}).get("name"),
        method=cfg.get("train", {}).get("method", "sft"), template=cfg.get("data", {}).get("template"),
        steps=max((r.get("step", 0) for r in records), default=None), train_loss=train[-1] if train else None,
        eval_loss=evals[-1] if evals else None, scores=scores, scored_on=scored_on,
        modified=max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime), sweep=sweep)
    if row.state != "done":
        return row
    try:  # a finished run: what it actually trained, from lorakit.json
        meta = read_meta(paths.adapter)
    except LorakitError:
        return replace(row, state="unreadable")
    m = meta.metrics
    return replace(row, base=meta.base.name, method=meta.train.method, template=meta.template.name,
                   steps=m.get("steps", row.steps), train_loss=m.get("train_loss_last", row.train_loss),
                   eval_loss=m.get("eval_loss", row.eval_loss))


def sweep_rows(folder: Path, inside: Callable[[Path], bool] = lambda p: True) -> list[SweepRow | RunRow]:
    """A sweep's row, then its trials' rows by number (those `inside` accepts)."""
    import json

    paths = SweepPaths(folder)
    modified = max((p.stat().st_mtime for p in (paths.marker, paths.table) if p.exists()),
                   default=folder.stat().st_mtime)
    try:
        marker = json.loads(paths.marker.read_text(encoding="utf-8"))
        trials = json.loads(paths.table.read_text(encoding="utf-8")) if paths.table.is_file() else []
    except (OSError, ValueError):
        return [SweepRow(folder, folder.name, "done", None, None, 0, None, modified, unreadable=True)]
    done = [t for t in trials if t.get("state") == "complete" and t.get("value") is not None]
    best = None
    if done:
        pick = min if marker.get("direction") == "minimize" else max
        top = pick(done, key=lambda t: t["value"])
        best = {"trial": top["number"], "value": top["value"]}
    rows: list[SweepRow | RunRow] = [SweepRow(folder, folder.name, "running" if lock.held(paths.lock) else "done",
                                              marker.get("objective"), marker.get("direction"), len(trials), best,
                                              modified)]
    if paths.trials.is_dir():
        for p in sorted(paths.trials.iterdir()):
            row = run_row(p, sweep=folder.name) if p.is_dir() and inside(p) else None
            if row is not None:
                rows.append(row)
    return rows


def list_runs(folder: str | Path = "runs", inside: Callable[[Path], bool] = lambda p: True) -> list[SweepRow | RunRow]:
    """Runs and sweeps under `folder` that `inside` accepts (the studio accepts only folders that
    stay in it), newest first; a sweep's trials right under it, wherever its date puts it."""
    root = Path(folder)
    if not root.is_dir():
        raise LorakitError(f"no such folder: {root}", hint="pass the folder that holds your runs (output.dir, default runs)")
    groups = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith(".") or not inside(p):
            continue
        if SweepPaths.is_sweep(p):
            groups.append(sweep_rows(p, inside))
        elif (row := run_row(p)) is not None:
            groups.append([row])
    groups.sort(key=lambda g: g[0].modified, reverse=True)
    return [r for g in groups for r in g]


def date_text(modified: float) -> str:
    """A row's date as `lorakit runs` and the studio show it: local time, to the minute."""
    return datetime.datetime.fromtimestamp(modified).strftime("%Y-%m-%d %H:%M")


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_runs(rows: list[SweepRow | RunRow]) -> str:
    if not rows:
        return "no runs here (train one with `lorakit train CONFIG`)"
    head = ("name", "base", "template", "steps", "train loss", "eval loss", "exact match", "date")
    table = [head]
    for r in rows:
        date = date_text(r.modified)
        if isinstance(r, SweepRow):
            status = "unreadable sweep" if r.unreadable else f"sweep{' running' if r.state == 'running' else ''}: " \
                f"{r.trials} trials"
            if r.best:
                status += f", best {r.objective or 'objective'} {r.best['value']:.4g} (trial {r.best['trial']})"
            table.append((f"{r.name} [{status}]", "-", "-", "-", "-", "-", "-", date))
            continue
        em = r.scores.get("exact_match")
        em = "-" if em is None else f"{em:.1%} ({r.scored_on})"
        name = f"  {r.sweep}/{r.name}" if r.sweep else r.name
        name = name if r.state == "done" else f"{name} [{r.state}]"
        table.append((name, r.base or "?", r.template or "?", _f(r.steps, "d"), _f(r.train_loss, ".4f"),
                      _f(r.eval_loss, ".4f"), em, date))
    return "\n".join(text_columns(table, indent=""))


__all__ = ["RunRow", "STATES", "SweepRow", "date_text", "format_runs", "list_runs", "run_row", "run_state",
           "sweep_rows"]
