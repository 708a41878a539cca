"""The run directory: how stages hand work to each other.

`runs/<name>/` holds `config.yaml` (resolved), `adapter/` (PEFT files plus
`lorakit.json`), `checkpoints/`, `logs/` (TensorBoard) and `metrics.jsonl`. Every later
stage needs only the run or adapter folder, so `lorakit.json` carries everything needed to
use the adapter again: template, base model and its hash, data fingerprint, versions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from lorakit.errors import LorakitError

META_FILE = "lorakit.json"
ADAPTER_DIR = "adapter"


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


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    A crash inside the block leaves `target` as it was (old or absent), never half written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
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


def read_meta(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LorakitError(f"cannot read {path}: {e}", hint="re-run `lorakit train` to write a fresh adapter") from None


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False), encoding="utf-8")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
