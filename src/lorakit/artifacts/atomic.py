"""Writing an artifact so that it is whole or absent: the one write-beside-then-rename in lorakit.

Every writer stages its file or folder beside the target (same file system, so the final rename
is atomic), fsyncs it, gives it the mode the umask would have given it, and `publish`es it with
one rename. A crash or an exception before that leaves the target as it was (old or absent) and
no temporary behind. Writers that must check a file before publishing it (the GGUF export
verifies a file before it is given its final name) stage it under `partial_path` and call
`publish` themselves once it has passed.

`os.replace` is called here and nowhere else (tests/test_contract.py checks it), so the
guarantees above are kept in one place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def umask_mode(*, folder: bool = False) -> int:
    """The mode `open()` / `mkdir()` would give under the process umask (0644 / 0755 usually).

    `tempfile.mkstemp` / `mkdtemp` create 0600 / 0700 entries on purpose; an artifact staged in
    one and renamed into place would keep that, and another user (the Ollama service, a web
    server) could not read it. Staged artifacts are set to this mode before they are published."""
    current = os.umask(0)
    os.umask(current)
    return (0o777 if folder else 0o666) & ~current


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (the entry lives in the folder, not in the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old-{os.getpid()}")


def partial_path(final: Path) -> Path:
    """Where a file waits to be checked before `publish(partial_path(final), final)`: hidden, and a
    name no tool takes for a finished artifact (a GGUF loader globbing *.gguf never sees it)."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def leftovers(target: Path) -> list[Path]:
    """Temporaries a killed writer of `target` left beside it (staged copies, moved-aside olds)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    return sorted(p for pattern in (f"{_temp_prefix(target)}*", f".{target.name}.old-*")
                  for p in target.parent.glob(pattern))


def move(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` (which must not hold a folder): for moving a whole run folder aside and back."""
    os.replace(src, dst)


def publish(staged: Path, target: Path) -> Path:
    """Give the fully written `staged` (a file or a folder beside `target`) the name `target`.

    A folder already at `target` is moved aside first and deleted after, so a reader sees the old
    complete folder or the new one, never a mix; a file is replaced in the rename itself."""
    staged, target = Path(staged), Path(target)
    if target.is_dir() and not target.is_symlink():
        old = _aside(target)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)
    fsync_dir(target.parent)
    return target


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (an empty file); on success it becomes `target`,
    fsynced, with the umask's mode. On an exception it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, umask_mode())
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    A crash inside the block leaves `target` as it was (old or absent), never half written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        os.chmod(tmp, umask_mode(folder=True))
        yield tmp
        # libraries stage files through mkstemp too (safetensors' model file is 0600): the whole tree
        # gets the umask's modes, so what is published is readable as any file the user writes
        for p in tmp.rglob("*"):
            if not p.is_symlink():
                os.chmod(p, umask_mode(folder=p.is_dir()))
        fsync_tree(tmp)
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
