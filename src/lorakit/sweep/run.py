"""`lorakit sweep CONFIG [--trials N] [--time 45m] [--workers K] [--storage URL]`.

The order is the contract, as in training: the section, the space and every value it can give
are checked before the sweep folder is touched; then the folder is claimed (its lock: one driver
per folder on this machine), trials that a killed sweep left running are failed and queued again,
and workers run trials until `sweep.trials` have finished, `sweep.time` is spent or a trial reaches
`sweep.target`. With `--workers K` the K workers are processes of their own, each with cores / K
threads: two trainings on one CPU with a thread each per core spin at each other's OpenMP barriers
(measured in BENCHMARKS.md). The sweep's result is written after every trial, so a killed sweep
leaves its table too.

Layout of runs/<name>/ (artifacts.SweepPaths): sweep.json, study.db, trials/trial-<n>/ (ordinary
run folders), logs/trial-<n>.log, trials.json, best.yaml, report.html.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lorakit import artifacts
from lorakit.artifacts import RunPaths, SweepPaths, lock
from lorakit.config.sweep import SweepConfig, check_objective, check_sweep, objective_direction, parse_space, parse_time
from lorakit.errors import ConfigError, LorakitError
from lorakit.sweep import study as St
from lorakit.sweep.trial import Context

POLL_S = 2.0
"""How often the driver of several workers reads the study to print progress."""


def settings(cfg, **flags: Any) -> SweepConfig:
    """The config's `sweep:` section with every given flag (not None) in its place, checked."""
    s = dataclasses.replace(cfg.sweep, **{k: v for k, v in flags.items() if v is not None})
    problems: list[str] = []
    check_sweep(s, problems)
    if problems:
        raise ConfigError(problems, "sweep")
    return s


def prepare(config_path: str | Path, overrides: list[str], s: SweepConfig, cfg, log) -> Context:
    """The checks before any trial: a space to search, values the schema takes, a folder that is
    not a training run's and holds this sweep (or none yet)."""
    from lorakit.sweep.space import check_values, grid_size

    problems: list[str] = []
    params = parse_space(s.space, problems)
    check_objective(s, cfg.train.method, cfg.grpo.rewards, problems)
    if problems:
        raise ConfigError(problems, str(config_path))
    if not params:
        raise LorakitError("sweep.space is empty: nothing to search", where=str(config_path),
                           hint="add keys to search, e.g. sweep: {space: {train.lr: {low: 1.0e-5, high: 1.0e-3, "
                           "log: true}, lora.r: [8, 16, 32]}}")
    base = cfg.to_dict()
    check_values(base, params, str(config_path))
    if s.sampler == "grid" and grid_size(params) < s.trials:
        log(f"sweep: the grid has {grid_size(params)} points; sweep.trials {s.trials} stops there")
    paths = SweepPaths(cfg.run_dir)
    run = RunPaths(paths.root)
    if paths.root.is_dir() and not paths.marker.is_file() and (run.config.is_file() or run.adapter.is_dir()):
        raise LorakitError(f"{paths.root} holds a training run, not a sweep", where="output.name",
                           hint="give the sweep another name: --output.name NAME")
    return Context(base, params, s, paths, log)


def _identity(ctx: Context, config_path: str | Path) -> dict[str, Any]:
    s = ctx.settings
    return {"objective": s.objective, "direction": objective_direction(s), "space": s.space,
            "storage": St.storage_url(s, ctx.paths), "config": str(Path(config_path).resolve()),
            "created": artifacts.now_iso()}


def _claim(ctx: Context, config_path: str | Path) -> None:
    """Write sweep.json, or check that the folder's sweep is this one (the study's direction and
    parameters cannot change under it)."""
    new = _identity(ctx, config_path)
    if ctx.paths.marker.is_file():
        old = json.loads(ctx.paths.marker.read_text(encoding="utf-8"))
        changed = [k for k in ("objective", "direction", "space") if old.get(k) != new[k]]
        if changed:
            raise LorakitError(f"{ctx.paths.root} holds a sweep with another {', '.join(changed)}",
                               where=str(ctx.paths.marker), hint="continue it with its own settings, or start "
                               "a new sweep under another name: --output.name NAME")
        return
    ctx.paths.root.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_json(ctx.paths.marker, new)


def _one_driver(paths: SweepPaths) -> lock.hold:
    """One driver per sweep folder on this machine: its .lock, taken here (released by the OS when
    the process dies, so a killed sweep never leaves it held)."""
    try:
        return lock.hold(paths.lock).acquire()
    except lock.Busy:
        raise LorakitError(f"another `lorakit sweep` is running this sweep ({paths.root})",
                           hint="wait for it, add workers with --workers, or share a --storage URL between "
                           "machines") from None


def sweep(config_path: str | Path, overrides: list[str] | None = None, *, trials: int | None = None,
          time_budget: str | None = None, workers: int | None = None, storage: str | None = None,
          log: Callable[[str], None] = print) -> SweepPaths:
    """`lorakit sweep`: run (or continue) the sweep of `config_path`; returns its folder."""
    from lorakit import config as config_mod

    cfg = config_mod.load(config_path, overrides)
    s = settings(cfg, trials=trials, time=time_budget, workers=workers, storage=storage)
    ctx = prepare(config_path, overrides or [], s, cfg, log)
    budget = parse_time(s.time)
    deadline = time.time() + budget if budget is not None else None
    with _one_driver(ctx.paths):
        _claim(ctx, config_path)
        storage_ = St.open_storage(s, ctx.paths)
        study = St.open_study(s, storage_, ctx.paths.root.name, ctx.params)
        if St.is_local(s):
            St.reclaim(study, storage_, s.retries, log)
        log(f"sweep {ctx.paths.root}: {s.objective} ({objective_direction(s)}), {s.trials} trials"
            + (f", {s.time}" if s.time else "") + f", {s.workers} worker(s); study {St.storage_url(s, ctx.paths)}")
        try:
            if s.workers == 1:
                work(ctx, study, deadline)
            else:
                _drive(config_path, overrides or [], ctx, study, deadline)
        finally:
            from lorakit.sweep.result import publish

            publish(ctx, study, log)
    return ctx.paths


def _stop_reason(ctx: Context, study, deadline: float | None) -> str | None:
    s = ctx.settings
    t = St.tally(study)
    if t.best is not None and St.reached(t.best.value, s.target, objective_direction(s)):
        return f"trial {t.best.number} reached the target {s.target:g}"
    if t.finished >= s.trials:
        return f"{t.finished} trials finished"
    if t.finished + t.running >= s.trials and not t.waiting:
        return "the last trials are running in other workers"
    if deadline is not None and time.time() >= deadline:
        return "the time budget is spent"
    if s.sampler == "grid" and study.sampler.is_exhausted(study) and not t.waiting:
        return "every point of the grid was tried"
    return None


def work(ctx: Context, study, deadline: float | None, *, quiet: bool = False) -> None:
    """One worker: trials one after another until the sweep is done. A trial that fails before any
    trial has completed stops the sweep with its error (a mistake in the data or config, or a bug,
    would fail every trial), unless training itself stopped (out of memory, a non-finite loss:
    TrainingStopped), which depends on the trial's values."""
    from optuna.trial import TrialState

    from lorakit.sweep import trial as T

    mine: list[int] = []

    def objective(trial):
        mine.append(trial.number)
        if St.is_surplus(study, trial, ctx.settings.trials):
            trial.set_user_attr(St.SURPLUS, True)
            raise _Surplus()
        return T.run(trial, ctx)

    while (reason := _stop_reason(ctx, study, deadline)) is None:
        study.optimize(objective, n_trials=1, catch=(Exception,))
        last = next(t for t in study.get_trials(deepcopy=False) if t.number == mine[-1])
        if last.user_attrs.get(St.SURPLUS):
            break  # the last trials were handed out to other workers
        if not quiet:
            ctx.log(trial_line(last, ctx.settings) + "\n  " + progress_line(study, ctx.settings, deadline))
        t = St.tally(study)
        if last.state == TrialState.FAIL and t.complete == 0 and "error" in last.user_attrs \
                and last.user_attrs.get("error_kind") != "TrainingStopped" and not last.user_attrs.get(St.INTERRUPTED):
            raise LorakitError(f"trial {last.number} failed: {last.user_attrs['error']}",
                               hint=f"its log: {ctx.paths.trial_log(last.number)}")
    if not quiet:
        ctx.log(f"sweep: stopping, {reason}")


class _Surplus(Exception):
    """A trial handed out after the last one was (see study.is_surplus): it ends at once."""


def _drive(config_path, overrides: list[str], ctx: Context, study, deadline: float | None) -> None:
    """K worker processes on this machine (`lorakit sweep --worker`), cores split between them;
    their trials printed as they finish. Ctrl-C reaches them through the terminal's process group;
    the driver then waits for them, so their trials are marked interrupted before it publishes."""
    s = ctx.settings
    threads = max(1, (os.cpu_count() or 1) // s.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "lorakit", "sweep", str(config_path), *overrides, "--worker",
           "--threads", str(threads), "--trials", str(s.trials), "--storage", St.storage_url(s, ctx.paths)]
    if deadline is not None:
        cmd += ["--until", str(deadline)]
    ctx.paths.logs.mkdir(parents=True, exist_ok=True)
    ctx.log(f"sweep: {s.workers} workers, {threads} thread(s) each (logs: {ctx.paths.logs})")
    procs = []
    for i in range(s.workers):
        out = open(ctx.paths.logs / f"worker-{i}.log", "a", encoding="utf-8")
        # each worker's sampler gets its own seed: with one seed they would all draw the same values
        procs.append((subprocess.Popen([*cmd, "--sweep.seed", str(s.seed + i)], stdout=out, stderr=subprocess.STDOUT,
                                       env=env), out))
    seen: set[int] = set()
    try:
        while True:
            running = [p for p, _ in procs if p.poll() is None]
            for t in study.get_trials(deepcopy=False):
                if t.number not in seen and t.state.is_finished() and not t.user_attrs.get(St.SURPLUS):
                    seen.add(t.number)
                    ctx.log(trial_line(t, s) + "\n  " + progress_line(study, s, deadline))
            if not running:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for p, _ in procs:
            p.wait()
        raise
    finally:
        for _, out in procs:
            out.close()
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode not in (0, None)]
    if failed and not St.tally(study).finished:
        tail = (ctx.paths.logs / f"worker-{failed[0]}.log").read_text(encoding="utf-8").strip().splitlines()[-3:]
        raise LorakitError(f"worker {failed[0]} stopped (exit {procs[failed[0]][0].returncode}): " + " | ".join(tail),
                           hint=f"see {ctx.paths.logs}")


def worker_main(config_path, overrides: list[str], *, trials: int | None, storage: str, threads: int,
                until: float | None) -> int:
    """`lorakit sweep --worker`: one worker process started by `_drive`."""
    import torch

    from lorakit import config as config_mod

    torch.set_num_threads(threads)
    cfg = config_mod.load(config_path, overrides)
    s = settings(cfg, trials=trials, storage=storage, workers=1)
    ctx = prepare(config_path, overrides, s, cfg, print)
    study = St.open_study(s, St.open_storage(s, ctx.paths), ctx.paths.root.name, ctx.params)
    work(ctx, study, until, quiet=True)
    return 0


def trial_line(t, s: SweepConfig) -> str:
    """'trial 3 complete: exact_match 0.62 in 95 s (lr=..., r=16)'."""
    from lorakit.sweep.space import shown

    values = ", ".join(f"{k}={shown(v)}" for k, v in t.user_attrs.get("values", {}).items())
    a = t.user_attrs
    if t.value is not None:
        what = f"{s.objective} {t.value:.4g}"
    elif a.get(St.SKIPPED):
        what = f"skipped: {a[St.SKIPPED]}"
    elif "pruned_at" in a:
        what = f"at step {a['pruned_at']}"
    elif a.get("error"):
        what = a["error"].splitlines()[0]
    else:
        what = "interrupted" if a.get(St.INTERRUPTED) else ""
    seconds = a.get("seconds")
    return f"trial {t.number} {t.state.name.lower()}: {what}" + (f" in {seconds:.0f} s" if seconds else "") + f" ({values})"


def progress_line(study, s: SweepConfig, deadline: float | None) -> str:
    t = St.tally(study)
    parts = [f"{t.finished}/{s.trials} finished ({t.complete} complete, {t.pruned} pruned)", f"{t.running} running",
             f"{t.failed} failed"]
    if t.best is not None:
        parts.append(f"best {s.objective} {t.best.value:.4g} (trial {t.best.number})")
    if deadline is not None:
        parts.append(f"{max(0.0, deadline - time.time()) / 60:.0f} min left")
    return "; ".join(parts)


__all__ = ["prepare", "progress_line", "settings", "sweep", "trial_line", "work", "worker_main"]
