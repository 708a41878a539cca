"""`lorakit runs`: the run folders in a directory, one line each, newest first.

Read from the files each stage leaves (lorakit.json, metrics.jsonl, eval summaries), so a run
that is still training, or was killed before publishing its adapter, is listed too, as such.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from pathlib import Path

from lorakit.artifacts import RunPaths, SweepPaths, read_jsonl, read_meta
from lorakit.errors import LorakitError
from lorakit.metrics import text_columns


@dataclass(frozen=True)
class RunRow:
    name: str
    status: str  # 'done' | 'no adapter' (training, failed or killed) | 'unreadable' | 'sweep: ...'
    base: str
    template: str
    steps: int | None
    train_loss: float | None
    eval_loss: float | None
    exact_match: float | None  # tuned, on the newest eval set that scored it
    exact_match_on: str | None
    modified: float  # seconds since the epoch


def _row(paths: RunPaths) -> RunRow | None:
    meta_file = paths.meta
    records = read_jsonl(paths.metrics)
    if not meta_file.is_file() and not records and not paths.config.is_file():
        return None  # not a run folder
    em = em_on = None
    try:
        for s in reversed(paths.eval_summaries()):
            if "exact_match" in s.scores.get("tuned", {}):
                em, em_on = s.scores["tuned"]["exact_match"], s.data
                break
    except LorakitError:
        pass
    if meta_file.is_file():
        try:
            meta = read_meta(paths.adapter)
        except LorakitError:
            return RunRow(paths.root.name, "unreadable", "?", "?", None, None, None, em, em_on,
                          meta_file.stat().st_mtime)
        m = meta.metrics
        return RunRow(paths.root.name, "done", meta.base.name, meta.template.name, m.get("steps"),
                      m.get("train_loss_last"), m.get("eval_loss"), em, em_on, meta_file.stat().st_mtime)
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    steps = max((r.get("step", 0) for r in records), default=None)
    newest = max((p.stat().st_mtime for p in (paths.metrics, paths.config) if p.exists()), default=0.0)
    base = "?"
    if paths.config.is_file():
        import yaml

        try:
            base = (yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}).get("model", {}).get("name", "?")
        except yaml.YAMLError:
            pass
    return RunRow(paths.root.name, "no adapter", base, "?", steps, train[-1] if train else None,
                  evals[-1] if evals else None, em, em_on, newest)


def _sweep_rows(folder: Path) -> list[RunRow]:
    """A sweep (lorakit sweep): one row saying how far it is, then its trials' runs, by number."""
    import json

    paths = SweepPaths(folder)
    try:
        marker = json.loads(paths.marker.read_text(encoding="utf-8"))
        trials = json.loads(paths.table.read_text(encoding="utf-8")) if paths.table.is_file() else []
    except (OSError, ValueError):
        return [RunRow(folder.name, "unreadable sweep", "?", "?", None, None, None, None, None,
                       paths.marker.stat().st_mtime)]
    objective = marker.get("objective", "objective")
    done = [t for t in trials if t.get("state") == "complete" and t.get("value") is not None]
    status = f"sweep: {len(trials)} trials"
    if done:
        pick = min if marker.get("direction") == "minimize" else max
        best = pick(done, key=lambda t: t["value"])
        status += f", best {objective} {best['value']:.4g} (trial {best['number']})"
    newest = max((p.stat().st_mtime for p in (paths.marker, paths.table) if p.exists()), default=0.0)
    rows = [RunRow(folder.name, status, "-", "-", None, None, None, None, None, newest)]
    if paths.trials.is_dir():
        for p in sorted(paths.trials.iterdir()):
            row = _row(RunPaths(p)) if p.is_dir() else None
            if row is not None:
                rows.append(replace(row, name=f"  {folder.name}/{p.name}"))
    return rows


def list_runs(folder: str | Path = "runs") -> list[RunRow]:
    """Runs newest first; a sweep's trials right under it (`_sweep_rows`), wherever its date puts it."""
    root = Path(folder)
    if not root.is_dir():
        raise LorakitError(f"no such folder: {root}", hint="pass the folder that holds your runs (output.dir, default runs)")
    groups = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if SweepPaths.is_sweep(p):
            groups.append(_sweep_rows(p))
        elif (row := _row(RunPaths(p))) is not None:
            groups.append([row])
    groups.sort(key=lambda g: g[0].modified, reverse=True)
    return [r for g in groups for r in g]


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_runs(rows: list[RunRow]) -> str:
    if not rows:
        return "no runs here (train one with `lorakit train CONFIG`)"
    head = ("name", "base", "template", "steps", "train loss", "eval loss", "exact match", "date")
    table = [head]
    for r in rows:
        date = datetime.datetime.fromtimestamp(r.modified).strftime("%Y-%m-%d %H:%M")
        em = "-" if r.exact_match is None else f"{r.exact_match:.1%} ({r.exact_match_on})"
        name = r.name if r.status == "done" else f"{r.name} [{r.status}]"
        table.append((name, r.base, r.template, _f(r.steps, "d"), _f(r.train_loss, ".4f"), _f(r.eval_loss, ".4f"),
                      em, date))
    return "\n".join(text_columns(table, indent=""))
