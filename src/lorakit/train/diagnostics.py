"""The guide's "Common Issues" table as checks that run before and during training.

Before: no trainable parameters, no trained tokens, EOS never in the labels (the model would
never learn to stop), learning rate above 1e-3. During: NaN/inf loss (stop at once, never save
the broken weights, point at the last good checkpoint), gradient norm above 10 or below 1e-6,
loss flat from the start (template or mask problem), validation loss rising (overfitting; early
stopping with patience when configured). After an out-of-memory error: concrete changes
computed from the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from transformers import TrainerCallback

from lorakit.artifacts import Diagnostic, append_jsonl, now_iso
from lorakit.config import Config
from lorakit.errors import LorakitError, TrainingStopped
from lorakit.resolve import Resolved

LR_HIGH = 1e-3
GRAD_HIGH = 10.0
GRAD_LOW = 1e-6
FLAT_WINDOW = 3  # "flat from the start": mean of logs 4-6 not 1% below the mean of logs 1-3
FLAT_REL = 0.01
REFERENCE_DRIFT = 1e-2
"""Largest mean |reward| (beta x log-ratio to the reference) at step 0 that is still rounding: the
policy's fused fast path and the eval-mode reference differ by ~1e-5 relative in a log-prob of a
few hundred nats, beta 0.1 -> ~1e-3; a stale or foreign reference is off by whole nats."""
TRUNCATED_HIGH = 0.5
"""Share of GRPO answers cut at the completion budget that is worth a warning."""
KL_HIGH = 1.0
"""Mean per-token KL estimate (nats) to the base past which a GRPO run is drifting away fast."""
CHOSEN_COLLAPSE = 0.25
"""Fall of the chosen answers' mean log-prob, as a share of its start, that counts as a collapse
(likelihood displacement: the margin grows by pushing both answers down)."""


@dataclass
class Health:
    """Written by the trainer at every step, read by `Diagnostics`."""

    nonfinite_step: int | None = None
    nonfinite_value: float | None = None


class DiagnosticLog:
    """Every warning of a run, shown to the user as it is raised and kept in diagnostics.jsonl (the
    report lists them). Warnings raised before the run folder exists are held until `attach`.

    Called as `warn(message, kind=..., step=...)`; a plain `print` works as a `warn` too."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.raised: list[Diagnostic] = []
        self.path = None

    def __call__(self, message: str, kind: str = "warning", step: int | None = None) -> None:
        self.log(message)
        self.record(message, kind, step)

    def record(self, message: str, kind: str = "warning", step: int | None = None) -> None:
        """Keep without showing (an error the CLI prints itself)."""
        d = Diagnostic(kind, message, step, now_iso())
        self.raised.append(d)
        if self.path is not None:
            append_jsonl(self.path, d.__dict__)

    def attach(self, path) -> None:
        """Write what was raised so far to `path` (replacing an older run's file) and append from now on."""
        self.path = path
        path.write_text("", encoding="utf-8")
        for d in self.raised:
            append_jsonl(path, d.__dict__)


BUSY_CORES = 0.75
"""Cores other processes must keep busy, measured as a training starts, for `busy_cpu` to warn."""


def busy_cpu(device: str, log: Callable[[str], None], interval: float = 0.2) -> float | None:
    """Warn when a CPU run starts on a machine other processes keep busy; return the cores they use
    (None when not measured). Measured on 2 cores (benchmarks/busy.py, BENCHMARKS.md): beside one busy
    process, torch's default threads (one per core) trained 2.8-3.6x slower than alone, not the 2x
    of a fair share, because OpenMP threads spin at each barrier waiting for a core the other process
    holds; OMP_WAIT_POLICY=PASSIVE or one thread fewer brought it to 1.4-2.0x. PASSIVE costs 10-20 % on
    an idle machine and fewer threads halve its speed, so neither is made the default: the run says
    what it sees and how to choose. Skipped when the user set the threads or the wait policy (a sweep's
    workers, torchrun), or torch runs one thread."""
    import os
    import time

    import psutil
    import torch

    if device != "cpu" or torch.get_num_threads() < 2 or \
            any(k in os.environ for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")):
        return None
    me = psutil.Process()
    me.cpu_percent(None)
    psutil.cpu_percent(None)
    time.sleep(interval)
    cores = psutil.cpu_count() or 1
    others = max(0.0, psutil.cpu_percent(None) / 100 * cores - me.cpu_percent(None) / 100)
    if others >= BUSY_CORES:
        log(f"warning: other processes keep about {others:.1f} of {cores} cores busy; with {torch.get_num_threads()} "
            "threads this run may slow down far more than its share (OpenMP threads wait for cores by spinning). "
            f"If they stay busy, run it as OMP_WAIT_POLICY=PASSIVE lorakit train ... (or OMP_NUM_THREADS="
            f"{max(1, cores - round(others))})")
    return others


def preflight(cfg: Config, prepared, tokenizer, trainable: int, warn: Callable[..., None]) -> None:
    """Checks that need no training step; errors stop before any compute is spent."""
    if trainable == 0:
        raise LorakitError("the model has no trainable parameters after applying LoRA",
                           hint="check lora.target_modules names the model's linear layers")
    trained = sum(sum(1 for x in ex["labels"] if x != -100) for ex in prepared.train)
    if trained == 0:
        raise LorakitError("no training example has a token in the loss (the loss mask is all zero)",
                           hint="check data.template and the data format with `lorakit data CONFIG`")
    eos = tokenizer.eos_token_id
    if eos is not None:
        with_eos = sum(1 for ex in prepared.train if eos in [x for x in ex["labels"] if x != -100])
        share = with_eos / len(prepared.train)
        if with_eos == 0:
            raise LorakitError(
                f"the EOS token {tokenizer.eos_token!r} is in no example's labels: the model would never learn to stop",
                hint="raise data.max_length if truncation cut it, or check data.template with `lorakit data CONFIG`",
            )
        if share < 0.5:
            warn(f"warning: only {share:.0%} of training examples keep their EOS in the loss (truncated at "
                 f"data.max_length {cfg.data.max_length}); raise data.max_length or set data.overlong: drop",
                 kind="eos_truncated")
    if cfg.train.lr > LR_HIGH:
        warn(f"warning: train.lr {cfg.train.lr:g} is above {LR_HIGH:g}, high for LoRA (the guide uses 1e-4 to "
             "3e-4); expect unstable loss", kind="lr_high")


class Diagnostics(TrainerCallback):
    """Watch the logs and the per-step loss; warn once per problem, stop on NaN or overfitting."""

    def __init__(self, cfg: Config, health: Health, warn: Callable[..., None]):
        self.cfg = cfg
        self.health = health
        self.warn = warn
        self.warned: set[str] = set()
        self.losses: list[float] = []
        self.best_eval: float | None = None
        self.evals_worse = 0
        self.stopped: str | None = None  # why training was stopped early, if it was
        self.margins: list[float] = []  # preference methods: logged reward margins, chosen log-probs
        self.rewards: list[float] = []  # GRPO: mean reward and share of zero-spread groups per log
        self.zero_spread: list[float] = []
        self.chosen: list[float] = []

    def _once(self, key: str, message: str, step: int | None = None) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.warn(message, kind=key, step=step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.health.nonfinite_step is not None and self.stopped is None:
            self.stopped = "nonfinite"
            control.should_training_stop = True
            control.should_save = False  # never checkpoint the broken weights
            control.should_evaluate = False
            control.should_log = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        grad = logs.get("grad_norm")
        if grad is not None and math.isfinite(grad):
            if grad > GRAD_HIGH:
                self._once("grad_high", f"warning: gradient norm {grad:.3g} at step {state.global_step} is above "
                           f"{GRAD_HIGH:g} (exploding); lower train.lr or keep train.max_grad_norm clipping on",
                           state.global_step)
            elif grad < GRAD_LOW:
                self._once("grad_low", f"warning: gradient norm {grad:.3g} at step {state.global_step} is below "
                           f"{GRAD_LOW:g} (vanishing); check that the loss mask covers the responses "
                           "(`lorakit data CONFIG`) and that train.lr is not tiny", state.global_step)
        if "loss" in logs and math.isfinite(logs["loss"]) and self.cfg.train.method != "grpo":
            # (GRPO's loss is centred on 0 by its advantages: its progress is the reward, watched below)
            self.losses.append(logs["loss"])
            if len(self.losses) == 2 * FLAT_WINDOW:  # judged once, early: later plateaus are convergence
                first = sum(self.losses[:FLAT_WINDOW]) / FLAT_WINDOW
                later = sum(self.losses[FLAT_WINDOW:]) / FLAT_WINDOW
                if later > first * (1 - FLAT_REL):
                    self._once("flat", f"warning: the training loss has not fallen in its first {len(self.losses)} "
                               f"logs ({first:.4f} -> {later:.4f}): nothing is being learned. Check the prompt "
                               "template and the loss mask with `lorakit data CONFIG`, and that train.lr is not "
                               "too small", state.global_step)
        if "eval_loss" in logs:
            self._watch_eval(logs["eval_loss"], state, control)
        if self.cfg.train.method == "grpo":
            self._watch_grpo(logs, state.global_step)
        elif self.cfg.train.method != "sft":
            self._watch_preference(logs, state.global_step)

    def _watch_grpo(self, logs: dict, step: int) -> None:
        """GRPO's known failures, from its logged figures."""
        if "reward" not in logs:
            return
        self.rewards.append(logs["reward"])
        self.zero_spread.append(logs.get("zero_spread_groups", 0.0))
        if (flat := _not_grown(self.rewards)) is not None:
            first, later = flat
            self._once("reward_flat", f"warning: the mean reward has not grown in the first {len(self.rewards)} "
                       f"logs ({first:.4f} -> {later:.4f}). Check the rewards on a few answers by hand, and "
                       "that train.lr is not too small", step)
        if len(self.zero_spread) >= FLAT_WINDOW and all(z >= 1.0 for z in self.zero_spread[-FLAT_WINDOW:]):
            self._once("zero_spread", f"warning: in the last {FLAT_WINDOW} logs every group's answers scored the "
                       "same, so there is nothing to learn from (advantages are 0). Raise grpo.temperature or "
                       "grpo.generations, or give a reward that grades partial answers (json_fields, length)", step)
        if logs.get("truncated", 0.0) >= TRUNCATED_HIGH:
            self._once("truncated", f"warning: {logs['truncated']:.0%} of the answers at step {step} were cut at "
                       "grpo.max_completion_tokens: raise it, or reward answers that end (the format reward)", step)
        if logs.get("kl", 0.0) > KL_HIGH:
            self._once("kl_high", f"warning: the KL to the base is {logs['kl']:.3g} per token at step {step}: the "
                       "policy is running away from it. Lower train.lr or raise grpo.beta", step)

    def _watch_preference(self, logs: dict, step: int) -> None:
        """The known ways preference tuning fails, read from the method's own figures."""
        method = self.cfg.train.method
        if method in ("dpo", "kto") and step == 0 and "eval_rewards/chosen" in logs:
            drift = max(abs(logs["eval_rewards/chosen"]), abs(logs.get("eval_rewards/rejected", 0.0)))
            if drift > REFERENCE_DRIFT:
                self._once("reference", f"warning: at step 0 the policy differs from the {method} reference "
                           f"(mean reward {drift:.3g}, should be 0): the stored reference_logps.json belongs to other "
                           "weights or data; delete it and train again", step)
        if "rewards/margins" not in logs:
            return
        self.margins.append(logs["rewards/margins"])
        self.chosen.append(logs.get("logps/chosen", math.nan))
        if (flat := _not_grown(self.margins)) is not None:
            first, later = flat
            self._once("margin_flat", f"warning: the reward margin has not grown in the first {len(self.margins)} "
                       f"logs ({first:.4f} -> {later:.4f}): the pairs are not being told apart. Check that chosen "
                       "and rejected differ where it matters (`lorakit data CONFIG`) and that train.lr is not "
                       f"too small, or raise {method}.beta", step)
        start, now = self.chosen[0], self.chosen[-1]
        if (len(self.chosen) > FLAT_WINDOW and self.margins[-1] > self.margins[0]
                and now < start - CHOSEN_COLLAPSE * abs(start)):
            self._once("chosen_collapse", f"warning: the margin grows while the chosen answers' log-prob falls "
                       f"({start:.2f} -> {now:.2f}): both answers are being pushed down, and generation degrades. "
                       f"Lower train.lr, raise {method}.beta, or use train.method orpo (it keeps an SFT term)", step)

    def _watch_eval(self, loss: float, state, control) -> None:
        patience = self.cfg.train.early_stopping_patience
        if self.best_eval is None or loss < self.best_eval:
            self.best_eval, self.evals_worse = loss, 0
            return
        self.evals_worse += 1
        if self.evals_worse >= max(1, patience or 2):
            self._once("overfit", f"warning: validation loss {loss:.4f} at step {state.global_step} is above its best "
                       f"{self.best_eval:.4f} for {self.evals_worse} evaluations: overfitting. Use fewer epochs, "
                       "more lora.dropout or more data" + ("" if patience else
                                                           "; train.early_stopping_patience stops such runs"),
                       state.global_step)
        if patience and self.evals_worse >= patience:
            self.stopped = "early_stopping"
            control.should_training_stop = True


def _not_grown(values: list[float]) -> tuple[float, float] | None:
    """(mean of the first FLAT_WINDOW logs, mean of the next FLAT_WINDOW) once there are exactly
    two windows and the later mean is not above the first (a figure that should grow, has not);
    else None. Checked once, when the second window fills."""
    if len(values) != 2 * FLAT_WINDOW:
        return None
    first, later = sum(values[:FLAT_WINDOW]) / FLAT_WINDOW, sum(values[FLAT_WINDOW:]) / FLAT_WINDOW
    return (first, later) if later <= first else None


def nonfinite_error(health: Health, checkpoints: list) -> TrainingStopped:
    last = checkpoints[-1] if checkpoints else None
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    return TrainingStopped(
        f"the loss became {health.nonfinite_value} at step {health.nonfinite_step}; training stopped and "
        f"nothing was saved from that step ({where})",
        hint="lower train.lr (e.g. halve it), keep train.max_grad_norm on, use model.dtype fp32 or bf16 instead "
             "of fp16; then start again, or continue from the checkpoint with --resume after fixing the config",
    )


def oom_error(resolved: Resolved, p99_tokens: int | None) -> TrainingStopped:
    """What to change, computed from the resolved config, after an out-of-memory error."""
    cfg = resolved.cfg
    t, d, m = cfg.train, cfg.data, cfg.model
    changes = []
    budget = resolved.tokens_per_pass
    if d.packing:
        if budget and budget >= 128:
            changes.append(f"--train.tokens_per_pass {budget // 2} (same steps, half the activations per pass)")
    elif t.batch_size > 1:
        changes.append(f"--train.batch_size {max(1, t.batch_size // 2)} --train.grad_accum {t.grad_accum * 2} "
                       "(same effective batch, half the activations)")
    if m.gradient_checkpointing != "on":
        changes.append("--model.gradient_checkpointing on (recompute activations: about a third more compute)")
    # Batches hold real lengths, not max_length: shortening helps only when examples are long.
    half = d.max_length // 2
    if half >= 64 and (p99_tokens is None or p99_tokens > half):
        changes.append(f"--data.max_length {half} (activations grow with sequence length)")
    if m.quantization == "none":
        changes.append("--model.quantization 4bit (QLoRA, CUDA only: base weights in 4 bits)")
    if cfg.lora.r > 8:
        changes.append(f"--lora.r {cfg.lora.r // 2} (fewer adapter parameters and optimizer states)")
    return TrainingStopped(
        "out of memory during training",
        hint="try, in this order: " + "; ".join(changes) + ". `lorakit plan CONFIG` estimates what fits.",
    )
