"""What the studio starts and stops: the CLI a user would type, as child processes.

A training is `lorakit train CONFIG [--resume]`, a later stage `lorakit eval|merge|export RUN`,
each in a session of its own with its output in the run's logs/ folder. So a run goes on when
the page is closed or the studio is stopped, a crashing run cannot take the studio down, and
nothing here is a second implementation of a stage. Whether a run is training is read from the
run folder (the lock its `lorakit train` holds, `artifacts.lock`), not from this list, so a Stop
works on a run started in a terminal too: it sends SIGTERM to the lock's holder, and training
stops after the step under way with a checkpoint (`train.callbacks.StopOnSignal`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.artifacts import RunPaths, StudioPaths, lock
from lorakit.errors import LorakitError

STAGES = ("eval", "merge", "export")


@dataclass
class Job:
    """One child process the studio started."""

    number: int
    run: str  # the run's name under the studio's folder
    kind: str  # 'train', 'resume', or one of STAGES
    argv: list[str]
    log: Path
    proc: subprocess.Popen = field(repr=False)
    started: float = field(default_factory=time.time)
    _tail: tuple[int, str] = field(default=(-1, ""), repr=False)  # (the log's size when read, its tail)

    def view(self) -> dict[str, Any]:
        code = self.proc.poll()
        state = "running" if code is None else "done" if code == 0 else "stopped" if code == 130 else \
            f"failed (exit {code})"  # 130: `lorakit train` stopped by a signal, its checkpoint saved
        return {"number": self.number, "run": self.run, "kind": self.kind, "command": " ".join(self.argv[3:]),
                "state": state, "started": self.started, "log": self.log_tail()}

    def log_tail(self) -> str:
        """`tail` of the log, read again only when the log has grown (every open page asks twice a second)."""
        try:
            size = self.log.stat().st_size
        except OSError:
            return ""
        if size != self._tail[0]:
            self._tail = (size, tail(self.log))
        return self._tail[1]


def tail(path: Path, lines: int = 12, limit: int = 64_000) -> str:
    """The last lines of a log (progress bars' carriage returns folded to their last state)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    rows = [row.rsplit("\r", 1)[-1] for row in text.split("\n")]
    return "\n".join([r for r in rows if r.strip()][-lines:])


class Jobs:
    """The studio's children, numbered in the order they started."""

    def __init__(self, runs: Path):
        self.runs = runs
        self.jobs: list[Job] = []
        self._lock = threading.Lock()

    def _start(self, run: str, kind: str, args: list[str], log: Path) -> Job:
        argv = [sys.executable, "-m", "lorakit", *args]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"$ lorakit {' '.join(args)}\n".encode())
            out.flush()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.runs.resolve().parent)
        with self._lock:
            job = Job(len(self.jobs) + 1, run, kind, argv, log, proc)
            self.jobs.append(job)
        return job

    def busy(self, run: str) -> Job | None:
        """The stage job still running on `run` (a training is the lock's business: a finished one
        may still be writing its report while its process exits)."""
        return next((j for j in self.jobs if j.run == run and j.kind in STAGES and j.proc.poll() is None), None)

    def train(self, config: Path, run: str, *, resume: bool = False) -> Job:
        """`lorakit train CONFIG --output.dir RUNS --output.name RUN [--resume]`: a new run from the
        form's config, or a stopped one continued from its own config.yaml."""
        folder = self.runs / run
        if lock.held(RunPaths(folder).writing):
            raise LorakitError(f"run {run!r} is training already", hint="stop it first, or wait for it to finish")
        args = ["train", str(config.resolve()), "--output.dir", str(self.runs.resolve()), "--output.name", run]
        args += ["--resume"] if resume else []
        return self._start(run, "resume" if resume else "train", args, StudioPaths(self.runs).train_log(run))

    def stage(self, run: str, kind: str, options: list[str]) -> Job:
        """`lorakit eval|merge|export RUN OPTIONS...`; one job at a time per run."""
        if kind not in STAGES:
            raise LorakitError(f"unknown stage {kind!r}", hint="one of " + ", ".join(STAGES))
        running = self.busy(run)
        if running is not None:
            raise LorakitError(f"run {run!r} is busy with its {running.kind}", hint="wait for it to finish")
        folder = (self.runs / run).resolve()
        return self._start(run, kind, [kind, str(folder), *options], RunPaths(folder).stage_log(kind))

    def stop(self, run: str) -> int:
        """SIGTERM to the `lorakit train` writing `run` (started here or anywhere); its pid."""
        pid = lock.holder(RunPaths(self.runs / run).writing)
        if pid is None:
            raise LorakitError(f"run {run!r} is not training", hint="only a running training can be stopped")
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        if cmdline and not any(b"lorakit" in part for part in cmdline):
            raise LorakitError(f"the process holding run {run!r} (pid {pid}) is not a lorakit training",
                               hint="stop it yourself")
        os.kill(pid, signal.SIGTERM)
        return pid

    def views(self, run: str | None = None) -> list[dict[str, Any]]:
        return [j.view() for j in self.jobs if run is None or j.run == run]


__all__ = ["Job", "Jobs", "STAGES", "tail"]
