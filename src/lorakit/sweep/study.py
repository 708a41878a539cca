"""The Optuna study a sweep lives in: its storage, sampler and pruner, what it holds, and trials
that died with their worker.

Coordination is Optuna's own: every worker, on this machine or another, asks the study for its
next trial, and the storage hands each trial number out once. lorakit adds two things on top:
a count that stops at `sweep.trials` finished trials however many workers race for the last
ones (`surplus`), and the retry of a trial whose worker was killed — at once for the folder's
own SQLite file (the `lorakit sweep` holding the folder's lock knows no other worker of it is
alive), after the heartbeat's grace period for a shared storage (Optuna's
RetryHeartbeatStaleTrialCallback).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.artifacts import RunPaths, SweepPaths
from lorakit.config.sweep import SweepConfig, objective_direction
from lorakit.errors import LorakitError

HEARTBEAT_S = 30
"""A running trial's heartbeat in an RDB storage; a trial silent for GRACE_S is taken as dead."""
GRACE_S = 120

SURPLUS = "surplus"
"""user attr of a trial asked for after the last one was handed out: it ends at once, as failed,
and counts nowhere."""
RETRY_OF = "retry_of"
INTERRUPTED = "interrupted"
SKIPPED = "skipped"
"""user attr of a trial `lorakit plan` said would not fit in memory (the reason): it ends pruned
before training."""


def storage_url(s: SweepConfig, paths: SweepPaths) -> str:
    return s.storage or f"sqlite:///{paths.study}"


def is_local(s: SweepConfig) -> bool:
    """The study is the sweep folder's own SQLite file: only this machine's workers use it."""
    return s.storage is None


def open_storage(s: SweepConfig, paths: SweepPaths):
    import optuna

    url = storage_url(s, paths)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5 (it has been since 2.8)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=s.retries) if s.retries else None
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, heartbeat_stale_trial_callback=retry)
    except Exception as e:  # noqa: BLE001 - a bad URL or an unreachable server: the user's to fix
        raise LorakitError(f"cannot open the study storage {url}: {type(e).__name__}: {e}",
                           where="--storage / sweep.storage",
                           hint="an SQLAlchemy URL (sqlite:///path, postgresql://user@host/db, mysql://...) with its "
                           "driver installed, or journal:/path/on/a/shared/disk") from None


def sampler(s: SweepConfig, params):
    import optuna

    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":
        from lorakit.sweep.space import grid

        return optuna.samplers.GridSampler(grid(params), seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed)


def pruner(s: SweepConfig):
    """Median: a trial worse than the median of earlier trials at the same step stops, once two
    trials have finished (so the first ones set the bar). ASHA: Optuna's successive halving."""
    import optuna

    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if s.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(s: SweepConfig, storage, name: str, params):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets lorakit's own line (run.trial_line)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler(s, params),
                               pruner=pruner(s), direction=objective_direction(s), load_if_exists=True)


@dataclass(frozen=True)
class Tally:
    complete: int
    pruned: int
    running: int
    waiting: int
    failed: int
    best: Any  # optuna FrozenTrial or None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def tally(study) -> Tally:
    from optuna.trial import TrialState as S

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]
    count = {state: sum(t.state == state for t in trials) for state in S}
    done = [t for t in trials if t.state == S.COMPLETE]
    best = None
    if done:
        pick = min if study.direction.name == "MINIMIZE" else max
        best = pick(done, key=lambda t: t.value)
    return Tally(count[S.COMPLETE], count[S.PRUNED], count[S.RUNNING], count[S.WAITING], count[S.FAIL], best)


def reached(value: float | None, target: float | None, direction: str) -> bool:
    if value is None or target is None:
        return False
    return value <= target if direction == "minimize" else value >= target


def is_surplus(study, trial, wanted: int) -> bool:
    """True when `trial` was handed out after the last of `wanted` trials: the trials before it
    that finished or still run already make the number (trial numbers are given out once, in order,
    by the storage, so two workers racing for the last trial agree on which of them is surplus)."""
    from optuna.trial import TrialState as S

    before = [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING))
              if t.number < trial.number and not t.user_attrs.get(SURPLUS)]
    return len(before) >= wanted


def drop_weights(run_dir: Path) -> None:
    """A pruned, failed or killed trial keeps its logs and report, not its checkpoints or adapter."""
    import shutil

    paths = RunPaths(run_dir)
    for folder in (paths.checkpoints, paths.adapter):
        shutil.rmtree(folder, ignore_errors=True)


def reclaim(study, storage, retries: int, log) -> list[int]:
    """Trials left RUNNING by a sweep that was killed, marked failed, and every killed or
    interrupted trial enqueued again (with its parameters) while it has retries left. Only for the
    folder's own study, whose lock says no worker of it is alive. Returns the numbers re-queued."""
    from optuna.trial import TrialState as S

    study_id = storage.get_study_id_from_name(study.study_name)
    trials = study.get_trials(deepcopy=False)

    for t in trials:
        if t.state == S.RUNNING:
            if t.user_attrs.get("run"):
                drop_weights(Path(t.user_attrs["run"]))
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
            storage.set_trial_state_values(trial_id, S.FAIL)
    trials = study.get_trials(deepcopy=False)
    root = {t.number: t.user_attrs.get(RETRY_OF, t.number) for t in trials}
    queued = []
    for t in trials:
        if t.state != S.FAIL or not t.user_attrs.get(INTERRUPTED):
            continue
        later = [u for u in trials if u.user_attrs.get(RETRY_OF) == root[t.number] and u.number > t.number]
        used = sum(u.user_attrs.get(RETRY_OF) == root[t.number] for u in trials)
        if not later and used < retries:  # not run again yet, and retries left for its parameters
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: root[t.number]}, skip_if_exists=False)
            queued.append(t.number)
    if queued:
        log(f"sweep: trial(s) {', '.join(map(str, queued))} stopped mid-run; running them again")
    return queued


__all__ = ["GRACE_S", "HEARTBEAT_S", "Tally", "drop_weights", "is_local", "is_surplus", "open_storage", "open_study", "pruner",
           "reached", "reclaim", "sampler", "storage_url", "tally"]
