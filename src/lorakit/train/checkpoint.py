"""Checkpoints that are either complete or absent, and resuming from the newest one.

The Trainer writes a checkpoint file by file into `checkpoints/checkpoint-N`; a crash
half-way leaves a folder that looks resumable but is not. lorakit has the Trainer write into
`checkpoints/.staging/` instead, fsyncs it, and renames it into place, so every
`checkpoint-N` that exists is complete. Resume picks the newest one and refuses to continue
a run whose model, data or LoRA settings changed since it started.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from lorakit import artifacts
from lorakit.artifacts import CHECKPOINT_STAGING, RunPaths, fsync_tree
from lorakit.config import Config
from lorakit.errors import LorakitError

STAGING = CHECKPOINT_STAGING
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# Keys a resumed run may change: how long to train and how often to log, eval and save (and the
# sweep section, which training never reads).
_MAY_CHANGE = {"output", "sweep", "train.max_steps", "train.epochs", "train.logging_steps", "train.eval_steps",
               "train.save_steps", "train.save_total_limit", "train.num_workers", "train.eval_batch_size"}


def publish(staging_root: Path, final_root: Path, name: str) -> Path:
    """Move a fully written `staging_root/name` to `final_root/name` in one rename."""
    src, dst = staging_root / name, final_root / name
    fsync_tree(src)
    artifacts.publish(src, dst)  # a re-save of the same step after resume replaces the old folder whole
    shutil.rmtree(staging_root, ignore_errors=True)
    return dst


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (staging leftovers are never listed)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resumable(cfg: Config, run_dir: Path) -> Path:
    """The checkpoint to resume from; a LorakitError when there is none or the config changed."""
    paths = RunPaths(run_dir)
    ckpts = checkpoints(paths.checkpoints)
    if not ckpts:
        raise LorakitError(
            f"nothing to resume in {run_dir}: no complete checkpoint in {paths.checkpoints}",
            hint="start the run without --resume (set train.save_steps so the next run leaves checkpoints)",
        )
    saved_path = paths.config
    if saved_path.is_file():
        saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
        now = _flatten(cfg.to_dict())
        changed = [k for k in sorted(set(saved) | set(now))
                   if saved.get(k) != now.get(k) and k not in _MAY_CHANGE and k.split(".")[0] not in _MAY_CHANGE]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
            raise LorakitError(
                f"cannot resume {run_dir}: the config changed since the run started ({diffs})",
                hint="resume with the run's own config (runs/<name>/config.yaml), or start a new run "
                     "with another --output.name",
            )
    return ckpts[-1]


def trim_metrics(path: Path, step: int) -> None:
    """Drop a step log's records (metrics.jsonl, rollouts.jsonl) after `step`: the resumed run logs
    those steps again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    artifacts.atomic_write_text(path, "".join(line + "\n" for line in kept))
