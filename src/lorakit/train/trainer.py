"""`LorakitTrainer`: the transformers Trainer with lorakit's loss, passes and atomic checkpoints.

The Trainer runs the loop (it brings accelerate, DDP/FSDP, checkpoints and callbacks). This
subclass changes only what lorakit measurably does better: a packed step runs as one
forward/backward per pass (the collator decides the passes), the loss computes logits at
labelled positions only, a pass holding one over-long example may recompute its activations, and
checkpoints appear in one rename. `lorakit.train.run` builds it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lorakit.data.collate import PASSES, split_passes
from lorakit.model.load import enable_checkpointing
from lorakit.train.callbacks import TokenCounter
from lorakit.train.checkpoint import STAGING, publish
from lorakit.train import distributed
from lorakit.train.diagnostics import Health
from lorakit.model.loss import labelled_loss, labelled_loss_through, split_head


class LorakitTrainer(Trainer):
    """The stock Trainer plus a token count per step and the labelled-positions-only loss."""

    def __init__(self, *args, token_counter: TokenCounter, health: Health, tokens_per_pass: int | None = None,
                 fast_path: bool = False, generation_probe=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_probe = generation_probe  # lorakit.evaluate.GenerationProbe (train.eval_generate_rows)
        self.fast_path = fast_path
        self.oversize_layers: list = []  # see checkpoint_oversize_passes
        self.token_counter = token_counter
        self.health = health
        self.tokens_per_pass = tokens_per_pass
        # Calling the body directly would bypass DDP's gradient hooks: with several processes the
        # same loss goes through the wrapped model's forward instead (`labelled_loss_through`).
        self.processes = self.accelerator.num_processes
        head = split_head(self.model)
        self.fast_head = head if self.processes == 1 else None
        self.loss_through_model = head is not None and self.processes > 1
        if head is not None:
            self.loss_is_scaled_for_ga = True  # labelled_loss divides by the whole step's token count
        self.wrapped = None  # the type the Trainer wrapped the model in, seen at the first step
        if self.processes > 1 and self.train_dataset is not None:
            self.train_dataset = distributed.WithMaskedCopies(self.train_dataset)

    def _get_train_sampler(self, train_dataset=None):
        if self.processes == 1:
            return super()._get_train_sampler(train_dataset)
        # Every example once per epoch over all processes (see distributed.RankSteps).
        data = train_dataset if train_dataset is not None else self.train_dataset
        return distributed.RankSteps(len(data), self._train_batch_size, self.processes, self.args.process_index,
                                     self.args.data_seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_through_model and not return_outputs and num_items_in_batch is not None and model.training:
            # num_items is the count over every process and DDP averages the gradients over them:
            # times the process count, the gradient is the global sum over trained tokens / count
            # (what the Trainer does for its own loss).
            return labelled_loss_through(model, inputs, num_items_in_batch) * self.processes
        if self.fast_head is None or return_outputs or num_items_in_batch is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # accelerate applies mixed precision by wrapping model.forward, which this path skips.
        with self.accelerator.autocast():
            return labelled_loss(*self.fast_head, inputs, num_items_in_batch, head_weight=self._half_head())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # An evaluation's record gets the generation scores before any callback sees it, so
        # metrics.jsonl, TensorBoard, trackers and the progress bar all have them in one record.
        if self.generation_probe is not None and "eval_loss" in logs:
            with self.accelerator.autocast():
                logs = {**logs, **self.generation_probe(self.model)}
        if self.processes > 1:  # every process logs at the same steps
            self.token_counter.sync(distributed.sum_ranks)
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, *args, **kwargs):
        # Evaluation runs a packed batch as one forward: the pass offsets are training's business.
        return super().prediction_step(model, {k: v for k, v in inputs.items() if k != PASSES}, *args, **kwargs)

    _head_cache: torch.Tensor | None = None

    def _half_head(self) -> torch.Tensor | None:
        """The frozen LM head's weight in the autocast dtype, cast once (fast path only)."""
        if self.fast_head is None:
            return None
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
        with distributed.main_first() as main:
            if main:
                shutil.rmtree(final_root / STAGING, ignore_errors=True)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)  # every process writes its part (its RNG state)
        finally:
            self._staging = False
        with distributed.main_first() as main:  # published once all parts are written
            if main:
                publish(final_root / STAGING, final_root, name)
                rotate_checkpoints(str(final_root), self.args.save_total_limit, self.state.best_model_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels = inputs["labels"]
        # Labels are shifted inside the model: the first position of each row never counts.
        trained = int((labels[:, 1:] != -100).sum())
        mask = inputs.get("attention_mask")  # absent in packed (padding-free) batches
        real = int(mask.sum()) if mask is not None else labels.numel()
        self.token_counter.add(trained, real, labels.numel())
        if self.wrapped is None:
            self.wrapped = type(model).__name__
        loss = None
        passes = self._passes(inputs)
        for i, part in enumerate(passes):
            self.token_counter.saw_pass(part["labels"])
            # Every pass divides by the whole step's token count, so the gradients add up to the step's.
            oversize = self.oversize_layers if part["input_ids"].shape[1] > (self.tokens_per_pass or 0) else []
            # Under DDP the gradients are all-reduced once per step, in the last pass's backward.
            sync = contextlib.nullcontext() if i == len(passes) - 1 else self.accelerator.no_sync(model)
            try:
                for layer in oversize:
                    layer.gradient_checkpointing = True
                with sync:
                    part_loss = super().training_step(model, part, num_items_in_batch)
            finally:
                for layer in oversize:
                    layer.gradient_checkpointing = False
            loss = part_loss if loss is None else loss + part_loss
        bad = not bool(torch.isfinite(loss).all())
        if self.processes > 1:  # a NaN on any process stops them all (else the others wait forever)
            bad = distributed.any_rank(bad)
        if self.health.nonfinite_step is None and bad:
            self.health.nonfinite_step, self.health.nonfinite_value = self.state.global_step + 1, float(loss)
        return loss

    def _passes(self, inputs: dict) -> list[dict]:
        """The forward/backward passes of one step, as the collator grouped them."""
        return split_passes(inputs)

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
