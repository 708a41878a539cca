"""Advisory locks that say "a process is working in this folder".

flock(2) on a file in the folder: the OS releases it when the process dies, so a killed training
or sweep never leaves one held, and a reader (`lorakit studio`, `lorakit runs`) can ask whether
the folder is being worked on without waiting and without trusting a pid file."""

from __future__ import annotations

import os
from pathlib import Path


class Busy(Exception):
    """The lock is held by another process."""


class hold:
    """An exclusive lock on `path` (created), as a context manager; `acquire()` takes it early so a
    caller can tell Busy (another process has it) apart from errors of the work inside the block."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def acquire(self) -> "hold":
        import fcntl

        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Busy(str(self.path)) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())  # who holds it: `holder` reads it (a Stop button signals it)
            self.fd = fd
        return self

    def __enter__(self) -> "hold":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def held(path: Path) -> bool:
    """True while some process holds `path`'s lock (False when the file does not exist)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def holder(path: Path) -> int | None:
    """The pid of the process holding `path`'s lock, or None when no process holds it."""
    if not held(path):
        return None
    try:
        return int(Path(path).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


__all__ = ["Busy", "held", "hold", "holder"]
