"""What the studio shows of the runs under its folder, read from the files each stage leaves.

The same readers as `lorakit runs` and report.html (`lorakit.runs`, `lorakit.report.read`), so the
studio never disagrees with the terminal or the report; and the same HTML sections as the report
for a run's page, so a chart is drawn by one piece of code wherever it appears. A run is named by
its path under the folder ('demo', 'search/trials/trial-003'); `locate` is the only way a name
becomes a path, and it refuses anything that would leave the folder.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import yaml

from lorakit.artifacts import RunPaths, SweepPaths, lock, read_jsonl
from lorakit.errors import LorakitError

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class NotFound(LorakitError):
    """A run name that is not a run under the studio's folder (or tries to leave it)."""


def locate(root: Path, ident: str) -> Path:
    """The folder of run `ident` under `root`: plain path parts only (no '..', no absolute path,
    no hidden folder), and a folder that stays inside `root` once links are resolved."""
    parts = ident.split("/")
    if not ident or not all(_PART.fullmatch(p) for p in parts):
        raise NotFound(f"{ident!r} is not a run name", hint="names are paths under the studio's runs folder")
    base = root.resolve()
    folder = (base / Path(*parts)).resolve()
    if not folder.is_relative_to(base) or not folder.is_dir():
        raise NotFound(f"no run {ident!r} under {root}")
    return folder


def state(paths: RunPaths) -> str:
    """'running' while a `lorakit train` holds the run's lock; then 'done' (an adapter), 'failed'
    (a diagnostic that ended training: NaN, out of memory) or 'interrupted' (stopped or killed)."""
    from lorakit.report.read import ERROR_KINDS

    if lock.held(paths.writing):
        return "running"
    if paths.meta.is_file():
        return "done"
    if any(r.get("kind") in ERROR_KINDS for r in read_jsonl(paths.diagnostics)):
        return "failed"
    return "interrupted"


def _config(paths: RunPaths) -> dict[str, Any]:
    try:
        return yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _scores(paths: RunPaths) -> tuple[dict[str, float], str | None]:
    """The tuned model's scores on the newest eval set, and that set's name."""
    try:
        summaries = paths.eval_summaries()
    except LorakitError:
        return {}, None
    for s in reversed(summaries):
        tuned = {k: v for k, v in s.scores.get("tuned", {}).items() if v is not None}
        if tuned:
            return tuned, s.data
    return {}, None


def run_row(root: Path, folder: Path, parent: str | None = None) -> dict[str, Any] | None:
    """One run's line of the runs table, or None when `folder` is not a run."""
    paths = RunPaths(folder)
    records = read_jsonl(paths.metrics)
    if not paths.meta.is_file() and not records and not paths.config.is_file():
        return None
    cfg = _config(paths)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    scores, scored_on = _scores(paths)
    files = [p for p in (paths.metrics, paths.config, paths.meta) if p.exists()]
    modified = max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime)
    return {
        "id": folder.relative_to(root.resolve()).as_posix(), "name": folder.name, "kind": "trial" if parent else "run",
        "parent": parent, "state": state(paths), "base": cfg.get("model", {}).get("name"),
        "method": cfg.get("train", {}).get("method", "sft"), "template": cfg.get("data", {}).get("template"),
        "steps": max((r.get("step", 0) for r in records), default=None),
        "train_loss": train[-1]["loss"] if train else None, "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "scores": scores, "scored_on": scored_on, "modified": modified,
        "date": datetime.datetime.fromtimestamp(modified).strftime("%Y-%m-%d %H:%M"),
    }


def sweep_rows(root: Path, folder: Path) -> list[dict[str, Any]]:
    """A sweep's line (its trials' count and best) and its trials' lines under it."""
    import json

    paths = SweepPaths(folder)
    ident = folder.relative_to(root.resolve()).as_posix()
    try:
        marker = json.loads(paths.marker.read_text(encoding="utf-8"))
        trials = json.loads(paths.table.read_text(encoding="utf-8")) if paths.table.is_file() else []
    except (OSError, ValueError):
        marker, trials = {}, []
    done = [t for t in trials if t.get("state") == "complete" and t.get("value") is not None]
    best = None
    if done:
        best = (min if marker.get("direction") == "minimize" else max)(done, key=lambda t: t["value"])
    modified = max((p.stat().st_mtime for p in (paths.marker, paths.table) if p.exists()),
                   default=folder.stat().st_mtime)
    row = {"id": ident, "name": folder.name, "kind": "sweep", "parent": None,
           "state": "running" if lock.held(paths.lock) else "done", "objective": marker.get("objective"),
           "trials": len(trials), "best": best and {"trial": best["number"], "value": best["value"]},
           "scores": {}, "modified": modified,
           "date": datetime.datetime.fromtimestamp(modified).strftime("%Y-%m-%d %H:%M")}
    out = [row]
    if paths.trials.is_dir():
        for p in sorted(paths.trials.iterdir()):
            inside = p.is_dir() and p.resolve().is_relative_to(root.resolve())
            r = run_row(root, p.resolve(), parent=ident) if inside else None
            if r is not None:
                out.append(r)
    return out


def runs_table(root: Path) -> list[dict[str, Any]]:
    """Every run and sweep directly under `root`, newest first, a sweep's trials right after it."""
    if not root.is_dir():
        raise LorakitError(f"no such folder: {root}", hint="pass the folder that holds your runs: --runs DIR")
    groups = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or not _PART.fullmatch(p.name) or not p.resolve().is_relative_to(root.resolve()):
            continue  # hidden folders, odd names and links out of the folder are not runs of this studio
        if SweepPaths.is_sweep(p):
            groups.append(sweep_rows(root, p.resolve()))
        elif (row := run_row(root, p.resolve())) is not None:
            groups.append([row])
    groups.sort(key=lambda g: g[0]["modified"], reverse=True)
    return [r for g in groups for r in g]


__all__ = ["NotFound", "locate", "run_row", "runs_table", "state", "sweep_rows"]
