"""Callbacks that make a run visible: a progress bar with loss, lr, tokens/s and ETA, and a
metrics JSONL file that later stages (report, plan calibration) read without TensorBoard; and
KeepBest, which keeps the adapter of the best evaluation (train.best_by); StopOnSignal, which
turns Ctrl-C or SIGTERM into a checkpoint and a clean stop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from lorakit.artifacts import RunPaths, append_jsonl


@dataclass
class TokenCounter:
    """Tokens seen by the loss, shared between the trainer (writer) and callbacks (readers).

    `trained` counts positions with a label (what the model learns from); `real` counts
    non-padding positions; `padded` counts every position fed through the model.
    """

    trained: int = 0
    real: int = 0
    padded: int = 0
    started: float = field(default_factory=time.perf_counter)
    largest_pass: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(positions, labelled, rows, seq) of the longest forward/backward pass so far: what sets the
    memory peak (`lorakit plan` compares its estimate for it with the measured peak)."""

    world: tuple[int, int, int] | None = None
    """(trained, real, padded) summed over every training process at the last `sync`; None in a
    single-process run, where the local counts are the totals."""

    def add(self, trained: int, real: int, padded: int) -> None:
        self.trained += trained
        self.real += real
        self.padded += padded

    def sync(self, sum_ranks) -> None:
        """Sum the counts over processes (every process calls this at the same point); until the next
        sync, `totals` and `rates` report these sums."""
        self.world = tuple(sum_ranks([self.trained, self.real, self.padded]))

    def totals(self) -> tuple[int, int, int]:
        return self.world if self.world is not None else (self.trained, self.real, self.padded)

    def saw_pass(self, labels) -> None:
        rows, seq = labels.shape
        if rows * seq > self.largest_pass[0]:
            self.largest_pass = (rows * seq, int((labels[:, 1:] != -100).sum()), rows, seq)

    def rates(self) -> tuple[float, float]:
        """Trained and real tokens per second, over every process."""
        dt = max(time.perf_counter() - self.started, 1e-9)
        trained, real, _ = self.totals()
        return trained / dt, real / dt


class MetricsLogger(TrainerCallback):
    """Append every log record (train and eval) to metrics.jsonl with step, epoch and tokens."""

    def __init__(self, path: Path, counter: TokenCounter):
        self.path = Path(path)
        self.counter = counter

    def on_train_begin(self, args, state, control, **kwargs):
        self.counter.started = time.perf_counter()  # tokens/s counts the loop, not the set-up

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        trained_tps, real_tps = self.counter.rates()
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if "loss" in logs:
            record.update(trained_tokens=self.counter.totals()[0], trained_tokens_per_s=round(trained_tps, 1),
                          real_tokens_per_s=round(real_tps, 1))
        append_jsonl(self.path, record)


class Progress(TrainerCallback):
    """One tqdm bar over optimizer steps; postfix shows the latest loss, lr and tokens/s."""

    def __init__(self, counter: TokenCounter, enabled: bool = True):
        self.counter = counter
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.last: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True,
                            initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        trained_tps, _ = self.counter.rates()
        self.last["tok/s"] = f"{trained_tps:,.0f}"
        self.bar.set_postfix(self.last, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.last["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            self.last["lr"] = f"{logs['learning_rate']:.2e}"
        if "rewards/accuracies" in logs:  # a preference method: how often chosen out-scores rejected
            self.last["acc"] = f"{logs['rewards/accuracies']:.2f}"
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            if "eval_rewards/accuracies" in logs:  # perplexity means nothing for a preference loss
                then = (f"preference accuracy {logs['eval_rewards/accuracies']:.3f}, "
                        f"margin {logs['eval_rewards/margins']:.4f}")
            else:
                then = f"perplexity {math.exp(loss) if loss < 50 else float('inf'):.2f}"
            self.bar.write(f"step {state.global_step}: eval loss {loss:.4f} ({then})")
        self.bar.set_postfix(self.last, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class KeepBest(TrainerCallback):
    """train.best_by: at every evaluation that beats the best so far, the adapter's weights are
    written to best/ (atomically, with best.json: metric, value, step). A resumed run starts from the
    best.json it left, so the choice is the one an uninterrupted run makes."""

    def __init__(self, paths: RunPaths, metric: str, model):
        from lorakit.config.sweep import logged_as, lower_is_better

        self.paths, self.metric, self.key, self.model = paths, metric, logged_as(metric), model
        self.lower = lower_is_better(metric)
        self.value: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        import json

        if self.paths.best_record.is_file():
            self.value = json.loads(self.paths.best_record.read_text(encoding="utf-8"))["value"]

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return self.value is None or (value < self.value if self.lower else value > self.value)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self.key not in logs:
            return
        value = float(logs[self.key])
        if not self._better(value):
            return
        import json

        from lorakit import artifacts

        with artifacts.atomic_dir(self.paths.best) as tmp:  # the folder is published whole, its files with it
            self.model.save_pretrained(tmp, safe_serialization=True)
            (tmp / self.paths.best_record.name).write_text(
                json.dumps({"metric": self.metric, "value": value, "step": state.global_step}), encoding="utf-8")
        self.value = value


class StopOnSignal(TrainerCallback):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop, `lorakit studio`'s Stop button) ends the run
    cleanly: the step under way finishes, a checkpoint is saved whatever train.save_steps says, and
    `lorakit train CONFIG --resume` continues exactly from it. A second signal stops at once, as a
    plain KeyboardInterrupt did before. The handlers are set for the training loop only, and only in
    the main thread (where Python delivers signals)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signal: str | None = None
        self.stopped_at: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signal is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def _restore(self) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = {getattr(signal, s): signal.signal(getattr(signal, s), self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def interrupted(self, paths: RunPaths):
        from lorakit.errors import RunInterrupted

        return RunInterrupted(f"stopped by {self.signal} after step {self.stopped_at}, its checkpoint saved in "
                              f"{paths.checkpoints}; continue with: lorakit train CONFIG --resume")
