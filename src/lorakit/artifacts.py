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
