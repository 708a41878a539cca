"""One trial: the sweep's config with the trial's values, trained by the ordinary training stage
into `trials/trial-<n>/`, judged at `sweep.reports` evenly spaced evaluations.

The trial is a `lorakit train` run like any other (same folder, same report, same metrics.jsonl);
what the sweep adds is a Trainer callback, `Reporter`, that asks for the evaluations, hands each
value to Optuna and stops the run when the pruner says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from transformers import TrainerCallback

from lorakit.artifacts import SweepPaths
from lorakit.config.sweep import Param, SweepConfig, apply, logged_as
from lorakit.errors import LorakitError
from lorakit.sweep.study import INTERRUPTED, SKIPPED, drop_weights


class Reporter(TrainerCallback):
    """Evaluations at k/`reports` of the run (the Trainer's own end-of-run one is the last), each
    value reported to the Optuna `trial`; a pruned trial stops at that step."""

    def __init__(self, trial, key: str, reports: int):
        self.trial, self.key, self.reports = trial, key, reports
        self.values: list[tuple[int, float]] = []
        self.points: set[int] = set()
        self.pruned_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # The start-of-run evaluation scores the base, the same for every trial: not worth a trial's
        # time (with a generation objective it answers every probe row). Read after this callback.
        args.eval_on_start = False
        n = state.max_steps
        self.trial.set_user_attr("steps", n)  # what a pruned trial would have run: the time pruning saved
        self.points = {round(k * n / self.reports) for k in range(1, self.reports)} - {0, n}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.points:
            control.should_evaluate = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.key not in logs:
            return
        value = float(logs[self.key])
        self.values.append((state.global_step, value))
        self.trial.report(value, state.global_step)
        if state.global_step < state.max_steps and self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True


@dataclass
class Context:
    """What every trial of a sweep shares."""

    base: dict[str, Any]  # the sweep's config as loaded (every key), before the trial's values
    params: list[Param]
    settings: SweepConfig
    paths: SweepPaths
    log: Callable[[str], None]


def trial_config(ctx: Context, number: int, values: dict[str, Any]):
    """The trial's Config: the sweep's, the trial's values, its own run folder, evaluations driven
    by the Reporter (train.eval_steps 0: the Trainer adds the last), and with a score as objective
    the generation probe over sweep.eval_rows validation rows."""
    from lorakit import config as config_mod

    raw = apply(ctx.base, values)
    raw["output"] = {"dir": str(ctx.paths.trials), "name": ctx.paths.trial(number).name, "overwrite": True}
    raw["train"]["eval_steps"] = 0
    if ctx.settings.objective != "eval_loss":
        raw["train"]["eval_generate_rows"] = ctx.settings.eval_rows
    return config_mod.from_dict(raw, f"trial {number}")


def too_big(cfg, settings: SweepConfig) -> str | None:
    """Why `lorakit plan` says the trial's config will not fit in memory here, or None (it fits, or
    plan cannot model it: then training finds out). A trial's values change its memory (rank, batch
    size, length), so each one is planned, without calibration steps: a plan costs seconds, a trial
    that runs out of memory its whole start-up."""
    from lorakit.plan import make_plan
    from lorakit.plan.shape import fmt_bytes
    from lorakit.resolve import Machine

    device = Machine.detect().device
    try:
        plan = make_plan(cfg, device=device, memory_gb=settings.memory_gb, calibrate_steps=0)
    except LorakitError:
        return None
    limit, source = plan.limit, "sweep.memory_gb" if settings.memory_gb is not None else plan.limit_source
    if limit is not None and settings.memory_gb is None and device == "cuda" and settings.workers > 1:
        limit, source = limit // settings.workers, f"{source} / {settings.workers} workers"
    if limit is None or plan.target.peak <= limit:
        return None
    return f"lorakit plan estimates a peak of {fmt_bytes(plan.target.peak)}; {source} is {fmt_bytes(limit)}"


def run(trial, ctx: Context) -> float:
    """Optuna's objective: train the trial, return its last reported value (or raise TrialPruned)."""
    import optuna

    from lorakit import pipeline
    from lorakit.sweep.space import label, suggest

    values = suggest(trial, ctx.params)
    trial.set_user_attr("values", {k: label(v) for k, v in values.items()})
    try:
        cfg = trial_config(ctx, trial.number, values)
    except LorakitError as e:  # a combination of values the schema refuses (each value alone passed)
        trial.set_user_attr("error", e.render())
        raise
    trial.set_user_attr("run", str(cfg.run_dir))
    reason = too_big(cfg, ctx.settings)
    if reason:
        trial.set_user_attr(SKIPPED, reason)
        ctx.log(f"trial {trial.number} skipped: {reason}")
        raise optuna.TrialPruned(reason)  # pruned, so the sampler learns to stay away from these values
    key = logged_as(ctx.settings.objective)
    reporter = Reporter(trial, key, ctx.settings.reports)
    ctx.paths.logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(ctx.paths.trial_log(trial.number), "a", encoding="utf-8") as out:
        def log(line: str) -> None:
            out.write(line + "\n")
            out.flush()

        log(f"trial {trial.number}: " + ", ".join(f"{k}={label(v)}" for k, v in values.items()))
        try:
            pipeline.train(cfg, log=log, progress=False, callbacks=[reporter])
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            drop_weights(cfg.run_dir)
            raise
        except BaseException as e:
            trial.set_user_attr("error", e.render() if isinstance(e, LorakitError) else f"{type(e).__name__}: {e}")
            trial.set_user_attr("error_kind", type(e).__name__)
            log(f"failed: {trial.user_attrs['error']}")
            drop_weights(cfg.run_dir)
            raise
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        if reporter.pruned_at is not None:
            drop_weights(cfg.run_dir)
            log(f"pruned at step {reporter.pruned_at}: {key} {reporter.values[-1][1]:.4g}")
            trial.set_user_attr("pruned_at", reporter.pruned_at)
            raise optuna.TrialPruned(f"step {reporter.pruned_at}")
        if not reporter.values:
            error = LorakitError(f"the objective {key} was never reported: the run has no validation rows"
                                 + (" with answers" if key != "eval_loss" else ""),
                                 where=str(cfg.run_dir), hint="give data.validation, or keep data.val_fraction above 0")
            trial.set_user_attr("error", error.render())
            raise error
        log(f"done: {key} {reporter.values[-1][1]:.4g}")
        return reporter.values[-1][1]


__all__ = ["Context", "Reporter", "run", "too_big", "trial_config"]
