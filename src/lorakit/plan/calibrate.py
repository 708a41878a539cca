"""Calibration: a few steps of the real trainer, timed and measured.

`lorakit.train.run.fit` runs them, in a temporary run folder, with the run's own collator, passes,
loss, fast path and optimizer, so the time per token and the memory peak are those of the code that
will train (a second loop here would drift from it). Evaluation and checkpoints are left out: the
plan accounts for evaluation separately. The first step is the warm-up (allocator, kernels, lazy
imports) and is not timed.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import TrainerCallback

from lorakit.plan.batches import MicroBatch
from lorakit.resolve import Resolved, resolve
from lorakit.train import run as run_mod  # at import: the plan's runtime baseline holds the training stack
from lorakit.train.callbacks import TokenCounter


@dataclass
class Calibration:
    seconds_per_token: float
    steps: int
    tokens: list[int]  # positions through the model per optimizer step
    seconds: list[float]
    start_bytes: int  # RSS (cpu) or torch's allocation (cuda) before the model was loaded
    peak_bytes: int  # peak RSS of this process (cpu) or torch's peak allocation (cuda)
    largest: MicroBatch  # the longest pass the steps ran: what set the peak
    predicted: int = 0  # the plan's estimate for `largest` without evaluation, less runtime and data


class _RssPeak:
    """Poll this process's RSS every few milliseconds in a thread and keep the maximum."""

    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class _StepTimer(TrainerCallback):
    """Seconds and positions of every optimizer step."""

    def __init__(self, counter: TokenCounter):
        self.counter = counter
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._began = self._seen = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._began, self._seen = time.perf_counter(), self.counter.padded

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._began)
        self.tokens.append(self.counter.padded - self._seen)


def calibrate(resolved: Resolved, prepared, tokenizer, steps: int = 3) -> Calibration:
    """Run `steps` optimizer steps of `resolved`'s training on the prepared data; time all but the
    first and record the process's memory peak and the pass that set it."""
    cfg = resolved.cfg
    quiet = lambda _msg: None  # noqa: E731 - the plan prints its own summary
    cuda = resolved.machine.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="lorakit-calibrate-") as tmp:
        short = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, max_steps=steps, save_steps=0, eval_steps=0, logging_steps=max(1, steps),
            early_stopping_patience=0), output=dataclasses.replace(cfg.output, dir=tmp, name="calibration"))
        run_resolved = resolve(short, resolved.machine, len(prepared.train))
        no_eval = dataclasses.replace(prepared, validation=[])
        counter = TokenCounter()
        timer = _StepTimer(counter)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss
        with _RssPeak() as rss:
            model, _ = run_mod.build_model(run_resolved, tokenizer, no_eval, quiet)
            if cuda and cfg.model.quantization == "none":
                model.to("cuda")
            run_dir = Path(tmp) / "calibration"
            run_dir.mkdir()
            # build and run only: a calibration publishes no adapter (and draws no report)
            run_mod.run_steps(run_mod.build(run_resolved, run_dir, model, tokenizer, no_eval, log=quiet,
                                            progress=False, counter=counter, callbacks=[timer]))
        peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    del model
    timed_t, timed_s = (timer.tokens[1:], timer.seconds[1:]) if len(timer.tokens) > 1 else (timer.tokens, timer.seconds)
    positions, labelled, rows, seq = counter.largest_pass
    return Calibration(sum(timed_s) / max(1, sum(timed_t)), len(timer.tokens), timer.tokens, timer.seconds, start,
                       peak, MicroBatch(positions, labelled, rows, seq))
