"""`lorakit train`: glue between the config and the transformers Trainer.

The Trainer runs the loop (it brings accelerate, DDP/FSDP, checkpoints and callbacks);
lorakit supplies the data (its own tokenization, masks and collator), the LoRA model, the
callbacks that make a run readable, and the self-describing adapter folder at the end.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lorakit import config as config_mod
from lorakit.artifacts import ADAPTER_DIR, atomic_dir, library_versions, write_meta
from lorakit.config import Config
from lorakit.data.collate import Collator, PackedCollator
from lorakit.data.dataset import Prepared, prepare
from lorakit.errors import LorakitError
from lorakit.model.load import enable_checkpointing, load_model, load_tokenizer
from lorakit.model.lora import apply_lora, count_parameters, describe_parameters
from lorakit.train.callbacks import MetricsLogger, Progress, TokenCounter
from lorakit.train.checkpoint import STAGING, check_resumable, checkpoints, publish, trim_metrics
from lorakit.train.diagnostics import Diagnostics, Health, nonfinite_error, oom_error, preflight
from lorakit.train.loss import labelled_loss, split_head
from lorakit.train.speed import segment_bounds


class LorakitTrainer(Trainer):
    """The stock Trainer plus a token count per step and the labelled-positions-only loss."""

    def __init__(self, *args, token_counter: TokenCounter, health: Health, tokens_per_pass: int | None = None,
                 fast_path: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast_path = fast_path
        self.oversize_layers: list = []  # see checkpoint_oversize_passes
        self.token_counter = token_counter
        self.health = health
        self.tokens_per_pass = tokens_per_pass
        # Calling the body directly would bypass DDP's gradient hooks: single process only.
        self.fast_head = split_head(self.model) if self.accelerator.num_processes == 1 else None
        if self.fast_head is not None:
            self.loss_is_scaled_for_ga = True  # labelled_loss divides by the whole step's token count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fast_head is None or return_outputs or num_items_in_batch is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # accelerate applies mixed precision by wrapping model.forward, which this path skips.
        with self.accelerator.autocast():
            return labelled_loss(*self.fast_head, inputs, num_items_in_batch, head_weight=self._half_head())

    _head_cache: torch.Tensor | None = None

    def _half_head(self) -> torch.Tensor | None:
        """The frozen LM head's weight in the autocast dtype, cast once (fast path only)."""
        head = self.fast_head[1]
        if not self.fast_path or head.weight.requires_grad or head.bias is not None:
            return None
        dev = head.weight.device.type
        if not torch.is_autocast_enabled(dev):
            return None
        dtype = torch.get_autocast_dtype(dev)
        if self._head_cache is None or self._head_cache.dtype != dtype:
            self._head_cache = head.weight.detach().to(dtype)
        return self._head_cache

    # ---- atomic checkpoints: the Trainer writes into checkpoints/.staging, we rename into place
    _staging = False

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging else out

    def _save_checkpoint(self, model, trial):
        final_root = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        shutil.rmtree(final_root / STAGING, ignore_errors=True)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        publish(final_root / STAGING, final_root, name)
        rotate_checkpoints(str(final_root), self.args.save_total_limit, self.state.best_model_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels = inputs["labels"]
        # Labels are shifted inside the model: the first position of each row never counts.
        trained = int((labels[:, 1:] != -100).sum())
        mask = inputs.get("attention_mask")  # absent in packed (padding-free) batches
        real = int(mask.sum()) if mask is not None else labels.numel()
        self.token_counter.add(trained, real, labels.numel())
        loss = None
        for part in self._passes(inputs):
            # Every pass divides by the whole step's token count, so the gradients add up to the step's.
            oversize = self.oversize_layers if part["input_ids"].shape[1] > (self.tokens_per_pass or 0) else []
            try:
                for layer in oversize:
                    layer.gradient_checkpointing = True
                part_loss = super().training_step(model, part, num_items_in_batch)
            finally:
                for layer in oversize:
                    layer.gradient_checkpointing = False
            loss = part_loss if loss is None else loss + part_loss
        if self.health.nonfinite_step is None and not torch.isfinite(loss).all():
            self.health.nonfinite_step, self.health.nonfinite_value = self.state.global_step + 1, float(loss)
        return loss

    def checkpoint_oversize_passes(self) -> int:
        """Recompute activations only in passes longer than tokens_per_pass (one long example each).

        Such a pass would hold activations for its whole length; with checkpointing it keeps each
        layer's input and recomputes the rest, so peak memory stays near a normal pass's. Returns
        the number of layers that switch."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if self.tokens_per_pass is None or any(getattr(m, "gradient_checkpointing", False) is True
                                               for m in inner.modules()):
            return 0
        enable_checkpointing(inner)
        self.oversize_layers = [m for m in inner.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in self.oversize_layers:
            layer.gradient_checkpointing = False
        return len(self.oversize_layers)

    def _passes(self, inputs: dict) -> list[dict]:
        """A packed step split at example boundaries into passes of at most `tokens_per_pass` tokens."""
        positions = inputs.get("position_ids")
        budget = self.tokens_per_pass
        if budget is None or positions is None or inputs.get("attention_mask") is not None \
                or positions.shape[0] != 1 or positions.shape[1] <= budget:
            return [inputs]
        return _slice_row(inputs, pass_cuts(segment_bounds(positions), budget))


def pass_cuts(bounds: list[int], budget: int) -> list[int]:
    """Start offsets of passes over examples at `bounds`, grouped in order while they fit in `budget`."""
    cuts = [0]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end - cuts[-1] > budget and start > cuts[-1]:
            cuts.append(start)
    return cuts


def _slice_row(inputs: dict, cuts: list[int]) -> list[dict]:
    length = inputs["input_ids"].shape[1]
    edges = [*cuts, length]
    return [{k: v[:, a:b] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length else v
             for k, v in inputs.items()} for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _warmup_steps(cfg: Config, total_steps: int) -> int:
    w = cfg.train.warmup
    return int(math.ceil(w * total_steps)) if w < 1 else int(w)


def _total_steps(cfg: Config, n_train: int) -> int:
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_train / t.batch_size) / t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


def resolve_mixed_precision(cfg: Config) -> str:
    """'bf16', 'fp16' or 'no' for this machine; see TrainConfig.mixed_precision."""
    mp = cfg.train.mixed_precision
    if mp != "auto":
        if mp == "fp16" and not torch.cuda.is_available():
            raise LorakitError("train.mixed_precision fp16 needs a CUDA GPU (CPU autocast supports bf16 only)",
                               hint="use --train.mixed_precision bf16 or no", where="config train.mixed_precision")
        return mp
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_native_bf16() else "no"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo: without them CPU bf16 autocast is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


CPU_TOKENS_PER_PASS = 512
"""Fastest of 384 / 512 / 1,024 on the quick benchmark (2 cores), and 20% less peak than 1,024."""
CUDA_TOKENS_PER_PASS = 8192
"""A GPU needs long passes to keep busy; 8k tokens is a common packed micro-batch. Not measured here."""


def resolve_tokens_per_pass(cfg: Config, device: str | None = None) -> int | None:
    """Tokens per forward/backward pass of a packed step on `device` ('cpu' | 'cuda'; default:
    this machine's); None when batches are padded."""
    if not cfg.data.packing:
        return None
    if cfg.train.tokens_per_pass != "auto":
        return int(cfg.train.tokens_per_pass)
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    return CUDA_TOKENS_PER_PASS if cuda else CPU_TOKENS_PER_PASS


def training_arguments(cfg: Config, run_dir: Path, n_train: int, has_eval: bool) -> TrainingArguments:
    """Map lorakit's schema onto TrainingArguments (names changed in transformers 5.x).

    With packing the Trainer gets a whole optimizer step's examples as one batch
    (batch_size × grad_accum rows, the same rows it would have accumulated) and
    `LorakitTrainer` splits it into passes by tokens instead of by rows.
    """
    t = cfg.train
    mp = resolve_mixed_precision(cfg)
    total = _total_steps(cfg, n_train)
    eval_every = t.eval_steps if t.eval_steps > 0 else total
    rows, accum = (t.batch_size * t.grad_accum, 1) if cfg.data.packing else (t.batch_size, t.grad_accum)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=rows,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler),
        warmup_steps=_warmup_steps(cfg, total),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every if has_eval else None,
        eval_on_start=has_eval,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_total_limit=t.save_total_limit,
        bf16=mp == "bf16",
        fp16=mp == "fp16",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=t.num_workers,
        use_cpu=not torch.cuda.is_available(),
        # Our collator already sets the right padding; the model needs no cache while training.
        use_cache=False,
    )


def _has_work(run_dir: Path) -> bool:
    return (run_dir / ADAPTER_DIR).exists() or any((run_dir / "checkpoints").glob("checkpoint-*"))


def _check_run_dir(cfg: Config) -> None:
    """Refuse, before any work, to replace a finished or resumable run unless told to."""
    run_dir = cfg.run_dir
    if run_dir.exists() and _has_work(run_dir) and not cfg.output.overwrite:
        raise LorakitError(
            f"run folder {run_dir} already exists and holds a trained adapter or checkpoints",
            hint="continue it with `lorakit train CONFIG --resume`, choose another name (--output.name NEW), "
            "or replace it with --output.overwrite true",
        )


def _claim_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """Create the run folder once everything before training has succeeded.

    A folder left by a run that failed before its first checkpoint holds nothing worth
    keeping and is cleared. A finished run being overwritten is moved aside, not deleted,
    and only removed once the new adapter is published (`_release`), so a failed or killed
    replacement never costs the old run.
    """
    run_dir = cfg.run_dir
    backup = None
    if run_dir.exists() and any(run_dir.iterdir()):
        if _has_work(run_dir):
            backup = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
            os.replace(run_dir, backup)
        else:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, backup


def _restore(run_dir: Path, backup: Path | None, log: Callable[[str], None]) -> None:
    """The replacement failed: put the previous run back, unless the new one left checkpoints to resume."""
    if backup is None or not backup.exists():
        return
    if _has_work(run_dir):
        log(f"the previous run in {run_dir} was kept at {backup}")
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    os.replace(backup, run_dir)


def _final_metrics(trainer: Trainer, counter: TokenCounter, seconds: float) -> dict[str, Any]:
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    trained_tps, real_tps = counter.rates()
    return {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss_last": train_losses[-1] if train_losses else None,
        "eval_loss_start": eval_losses[0] if eval_losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "trained_tokens": counter.trained,
        "trained_tokens_per_s": round(trained_tps, 1),
        "real_tokens_per_s": round(real_tps, 1),
        "train_seconds": round(seconds, 1),
    }


def train(cfg: Config, *, resume: bool = False, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Fine-tune per `cfg`; return the run folder with `adapter/` ready for every later stage.

    With `resume`, continue the run in `cfg.run_dir` from its newest complete checkpoint:
    adapter, optimizer, scheduler, RNG states and data position are restored by the Trainer,
    so the result equals an uninterrupted run's.
    """
    # Everything that can fail on bad input runs before the run folder is touched.
    resolve_mixed_precision(cfg)
    checkpoint = check_resumable(cfg, cfg.run_dir) if resume else None
    if not resume:
        _check_run_dir(cfg)
    set_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare(cfg, tokenizer)
    log(f"data: {len(prepared.train)} train / {len(prepared.validation)} validation examples, "
        f"template '{prepared.template.name}'")
    from lorakit.plan import resolve_auto  # plan imports this module: import at use

    for note in resolve_auto(cfg, len(prepared.train)):  # written into the run's config.yaml
        log(note)

    model, info = load_model(cfg.model, training=True, tokenizer=tokenizer)
    model = apply_lora(model, cfg.lora)
    trainable, _ = count_parameters(model)
    log(describe_parameters(model))
    preflight(cfg, prepared, tokenizer, trainable, log)

    backup = None
    if resume:
        run_dir = cfg.run_dir
        trim_metrics(run_dir / "metrics.jsonl", int(checkpoint.name.split("-")[1]))
        log(f"resuming from {checkpoint}")
    else:
        run_dir, backup = _claim_run_dir(cfg)
    try:
        _run(cfg, run_dir, model, tokenizer, prepared, info, checkpoint, log, progress)
    except BaseException:
        _restore(run_dir, backup, log)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return run_dir


def _run(cfg: Config, run_dir: Path, model, tokenizer, prepared: Prepared, info, checkpoint: Path | None,
         log: Callable[[str], None], progress: bool) -> None:
    """The training loop proper, into a claimed run folder; ends with the published adapter."""
    config_mod.save(cfg, run_dir / "config.yaml")
    counter, health = TokenCounter(), Health()
    diagnostics = Diagnostics(cfg, health, log)
    args = training_arguments(cfg, run_dir, len(prepared.train), bool(prepared.validation))
    (run_dir / "logs").mkdir(exist_ok=True)
    callbacks = [
        MetricsLogger(run_dir / "metrics.jsonl", counter),
        Progress(counter, enabled=progress),
        diagnostics,
        _tensorboard(run_dir / "logs"),
    ]
    for note in apply_fast_path(cfg, model, info):
        log(note)
    trainer = LorakitTrainer(
        model=model,
        args=args,
        data_collator=PackedCollator(tokens_per_pass=resolve_tokens_per_pass(cfg)) if cfg.data.packing
        else Collator(tokenizer.pad_token_id),
        tokens_per_pass=resolve_tokens_per_pass(cfg),
        fast_path=cfg.train.fast_path,
        train_dataset=prepared.train,
        eval_dataset=prepared.validation or None,
        processing_class=tokenizer,
        callbacks=[c for c in callbacks if c is not None],
        token_counter=counter,
        health=health,
    )
    trainer.remove_callback(PrinterCallback)  # Progress shows the same records, readably
    if cfg.data.packing and cfg.model.gradient_checkpointing == "auto" and trainer.checkpoint_oversize_passes():
        log(f"gradient checkpointing: only for passes over {trainer.tokens_per_pass:,} tokens (one long example)")
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise oom_error(cfg, prepared.stats.length_percentiles.get("p99")) from e
    seconds = time.perf_counter() - start
    if diagnostics.stopped == "nonfinite":
        raise nonfinite_error(health, checkpoints(run_dir / "checkpoints"))
    metrics = _final_metrics(trainer, counter, seconds)
    save_adapter(model, tokenizer, run_dir / ADAPTER_DIR, cfg=cfg, prepared=prepared, info=info, metrics=metrics)
    log(f"adapter saved to {run_dir / ADAPTER_DIR}")


def apply_fast_path(cfg: Config, model, info) -> list[str]:
    """Switch on lorakit's training kernels (train.fast_path); returns what was done, for the log."""
    if not cfg.train.fast_path:
        return []
    from lorakit.train import speed

    mp = resolve_mixed_precision(cfg)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp) if info.quantization == "none" else None
    done = speed.apply(model, half, cfg.data.packing)
    notes = []
    if done["saved"] or done["fused"]:
        notes.append(f"fast path: frozen weights stored in {mp} ({done['saved'] / 2**20:,.0f} MiB saved), "
                     f"{done['fused']} LoRA linears fused")
    if done["dropouts"]:
        notes.append(f"fast path: {done['dropouts']} LoRA dropouts draw 16-bit masks")
    if done["segments"]:
        notes.append("fast path: attention per packed example")
    return notes


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; keep training if it is broken
        return None
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))


def save_adapter(model, tokenizer, target: Path, *, cfg: Config, prepared: Prepared, info, metrics: dict) -> None:
    """Write PEFT files + tokenizer + lorakit.json into `target` atomically."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, {
            "format": 1,
            "base_model": {
                "name": cfg.model.name,
                "path": str(info.path),
                "sha256": info.sha256,
                "dtype": info.dtype,
                "quantization": info.quantization,
                "gguf_file": cfg.model.gguf_file,
                "revision": cfg.model.revision,
            },
            "template": prepared.template.to_dict(),
            "max_length": cfg.data.max_length,
            "data": {
                "train": cfg.data.train,
                "validation": cfg.data.validation,
                "fingerprint": prepared.fingerprint,
                "train_examples": len(prepared.train),
                "validation_examples": len(prepared.validation),
            },
            "lora": cfg.to_dict()["lora"],
            "train": cfg.to_dict()["train"],
            "versions": library_versions(),
            "metrics": metrics,
        })
