"""What the studio shows of the runs under its folder, read from the files each stage leaves.

The same readers as `lorakit runs` and report.html (`lorakit.runs`, `lorakit.report.read`), so the
studio never disagrees with the terminal or the report; and the same HTML sections as the report
for a run's page, so a chart is drawn by one piece of code wherever it appears. A run is named by
its path under the folder ('demo', 'search/trials/trial-003'); `locate` is the only way a name
becomes a path, and it refuses anything that would leave the folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from lorakit.artifacts import SweepPaths
from lorakit.errors import LorakitError
from lorakit.runs import RunRow, SweepRow, date_text, list_runs, run_row

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


def _inside(root: Path) -> Callable[[Path], bool]:
    base = root.resolve()
    return lambda p: bool(_PART.fullmatch(p.name)) and p.resolve().is_relative_to(base)


def as_json(root: Path, row: RunRow | SweepRow) -> dict[str, Any]:
    """A row of `lorakit.runs` as the page takes it: named by its path under the folder."""
    base = root.resolve()
    ident = row.path.resolve().relative_to(base).as_posix()
    if isinstance(row, SweepRow):
        return {"id": ident, "name": row.name, "kind": "sweep", "parent": None, "state": row.state,
                "objective": row.objective, "trials": row.trials, "best": row.best, "scores": {},
                "modified": row.modified, "date": date_text(row.modified)}
    parent = row.path.resolve().parent.parent.relative_to(base).as_posix() if row.sweep else None
    return {"id": ident, "name": row.name, "kind": "trial" if row.sweep else "run", "parent": parent,
            "state": row.state, "base": row.base, "method": row.method, "template": row.template,
            "steps": row.steps, "train_loss": row.train_loss, "eval_loss": row.eval_loss, "scores": row.scores,
            "scored_on": row.scored_on, "modified": row.modified, "date": date_text(row.modified)}


def run_json(root: Path, folder: Path) -> dict[str, Any] | None:
    """The row of the run in `folder` (a trial's when its folder is in a sweep), or None."""
    sweep = folder.parent.parent
    row = run_row(folder, sweep=sweep.name if SweepPaths.is_sweep(sweep) and folder.parent == SweepPaths(sweep).trials
                  else None)
    return None if row is None else as_json(root, row)


def runs_table(root: Path) -> list[dict[str, Any]]:
    """Every run and sweep directly under `root` (`lorakit.runs.list_runs`), newest first, a
    sweep's trials right after it; hidden folders, odd names and links out of the folder left out."""
    if not root.is_dir():
        raise LorakitError(f"no such folder: {root}", hint="pass the folder that holds your runs: --runs DIR")
    return [as_json(root, r) for r in list_runs(root, inside=_inside(root))]


__all__ = ["NotFound", "as_json", "locate", "run_json", "runs_table"]
