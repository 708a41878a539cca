"""Stages in a row: each stage returns its result and never calls a later one; this layer (and the
CLI, the demo) runs the next. Training gets the eval stage's generation probe handed in, and the
report is drawn after a stage has written its files, never from inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lorakit.errors import RunInterrupted, TrainingStopped


def train(cfg, *, resume: bool = False, log: Callable[[str], None] = print, progress: bool = True,
          machine=None, callbacks=()) -> Path:
    """`lorakit train`: the training stage with the eval stage's probe, then report.html. A run that
    stopped early (out of memory, a non-finite loss, a signal) still gets its report, which says why."""
    from lorakit.evaluate import probe_for
    from lorakit.train import distributed
    from lorakit.train.run import train as train_stage

    try:
        run_dir = train_stage(cfg, resume=resume, log=log, progress=progress, machine=machine, probe=probe_for,
                                callbacks=callbacks)
    except (TrainingStopped, RunInterrupted):
        if distributed.is_main():
            refresh_report(cfg.run_dir, log, verb="written")
        raise
    if distributed.is_main():
        refresh_report(run_dir, log, verb="written")
    return run_dir


def data_report(cfg) -> str:
    """`lorakit data CONFIG`'s text (the studio's data preview is the same): SFT or preference data,
    as the config's data section declares or its first training row shows, read with the model's
    tokenizer."""
    from lorakit.data.dataset import prepare
    from lorakit.data.preference import preference_kind, prepare_preference
    from lorakit.data.report import format_preference_report, format_report
    from lorakit.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if preference_kind(cfg.data):
        return format_preference_report(prepare_preference(cfg, tokenizer), tokenizer)
    return format_report(prepare(cfg, tokenizer), tokenizer)


def evaluate(run, settings=None, **kwargs: Any) -> list:
    """`lorakit eval`: the eval stage (`settings`: its EvalConfig section), then the run's
    report.html with the new tables."""
    from lorakit.artifacts import RunPaths, find_adapter_dir
    from lorakit.evaluate import evaluate_run

    log = kwargs.get("log", print)
    summaries = evaluate_run(run, settings, **kwargs)
    paths = RunPaths.of(find_adapter_dir(run))
    if paths.adapter.is_dir():
        refresh_report(paths.root, log, verb="updated", announce=False)
    return summaries


def refresh_report(run_dir: Path, log: Callable[[str], None], *, verb: str = "updated",
                   announce: bool = True) -> Path | None:
    """report.html for the run as it stands. A report that fails to render must never cost what the
    stage produced (or hide the error that stopped it), so a failure is only logged."""
    from lorakit.report import write_report

    try:
        page = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the report is a view of the run; the run's result stands
        log(f"warning: report.html not {verb} ({type(e).__name__}: {e}); retry with `lorakit report {run_dir}`")
        return None
    if announce:
        log(f"report: {page}")
    return page
