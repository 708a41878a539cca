"""`lorakit train`: from a config to a run folder with a published adapter.

The order is the contract: everything that can fail on bad input (config decisions, data, model,
LoRA targets, the run folder's state) runs before the run folder is touched; then the folder is
claimed, the Trainer runs, and the adapter is published in one rename. `fit` is the loop proper
and is shared with `lorakit plan`'s calibration, so the plan times the code that trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PrinterCallback, TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback

from lorakit import artifacts
from lorakit import config as config_mod
from lorakit.artifacts import AdapterMeta, RunPaths, compat, lock
from lorakit.config import Config
from lorakit.data.collate import Collator, PackedCollator
from lorakit.data.dataset import Prepared
from lorakit.data.preference import prepare_method
from lorakit.errors import LorakitError
from lorakit.model.load import TORCH_DTYPES, load_model, load_tokenizer
from lorakit.model.lora import apply_lora, continue_adapter, count_parameters, describe_parameters
from lorakit.resolve import Machine, Resolved, resolve
from lorakit.train import distributed, speed
from lorakit.train import trainer as trainer_mod
from lorakit.train.callbacks import KeepBest, MetricsLogger, Progress, StopOnSignal, TokenCounter
from lorakit.train.checkpoint import check_resumable, checkpoints, trim_metrics
from lorakit.train.diagnostics import (DiagnosticLog, Diagnostics, Health, busy_cpu, nonfinite_error, oom_error,
                                       preflight)

ProbeFactory = Callable[[Config, Any, Prepared], Any]
"""(config, tokenizer, prepared data) -> the generation probe of each evaluation, or None."""

def train(cfg: Config, *, resume: bool = False, log: Callable[[str], None] = print, progress: bool = True,
          machine: Machine | None = None, probe: ProbeFactory | None = None,
          callbacks: list[TrainerCallback] = ()) -> Path:
    """Fine-tune per `cfg`; return the run folder with `adapter/` ready for every later stage.

    With `resume`, continue the run in `cfg.run_dir` from its newest complete checkpoint:
    adapter, optimizer, scheduler, RNG states and data position are restored by the Trainer,
    so the result equals an uninterrupted run's.

    `probe(cfg, tokenizer, prepared)` makes the generation probe run at each evaluation (or
    None): generation scoring belongs to the eval stage, above this one, so it is handed in
    (lorakit.pipeline does), never imported. The report is drawn by whoever runs the stage.
    `callbacks` join the Trainer's (a sweep's trial reports its evaluations through one).
    """
    speed.bound_kernel_caches()  # before the first 16-bit matmul of this process
    machine = machine or Machine.detect()
    world = distributed.start(machine.device)  # under torchrun / accelerate launch: join the group
    if world > 1:
        print(f"lorakit: process {distributed.rank()} of {world}", flush=True)
        if not distributed.is_main():
            log = _quiet  # one voice: the main process's
    warn = DiagnosticLog(log)
    resolve(cfg, machine)  # a config this machine cannot run fails before any data is read
    if world == 1:
        busy_cpu(machine.device, log)
    if world > 1:
        distributed.check_strategy(cfg, machine.device)
    if distributed.is_main() and lock.held(RunPaths(cfg.run_dir).writing):
        raise LorakitError(f"another `lorakit train` is writing {cfg.run_dir}", where="output.name",
                           hint="wait for it to finish, or train into another folder: --output.name NAME")
    if not resume:
        artifacts.check_free(cfg.run_dir, cfg.output.overwrite)
    set_seed(cfg.train.seed)

    if world > 1 and cfg.train.method != "sft":
        from lorakit.errors import ConfigError

        raise ConfigError([f"train.method: {cfg.train.method} runs in one process for now; launch it without "
                           "torchrun / accelerate launch"])
    tokenizer = load_tokenizer(cfg.model)
    if cfg.model.adapter:
        _adapter_template(cfg, log)
    prepared = prepare_method(cfg, tokenizer)
    log(f"data: {len(prepared.train)} train / {len(prepared.validation)} validation examples, "
        f"template '{prepared.template.name}'")
    resolved = resolve(cfg, machine, len(prepared.train))
    for note in resolved.notes:  # written into the run's config.yaml
        log(note)
    cfg = resolved.cfg
    if cfg.train.method != "sft" and cfg.lora.dropout:
        log(f"lora.dropout {cfg.lora.dropout} -> 0 for {cfg.train.method}: the policy must equal the reference "
            "at the first step, and the compared log-probs must not be noisy")
        cfg.lora.dropout = 0.0
    checkpoint = check_resumable(cfg, cfg.run_dir) if resume else None

    model, info = build_model(resolved, tokenizer, prepared, log, warn)
    backup = None
    with distributed.main_first() as main:  # the run folder is claimed once; the others then use it
        if main and resume:
            for log_file in (RunPaths(cfg.run_dir).metrics, RunPaths(cfg.run_dir).rollouts):
                trim_metrics(log_file, int(checkpoint.name.split("-")[1]))
        elif main:
            backup = artifacts.claim(cfg.run_dir)
    if resume:
        log(f"resuming from {checkpoint}")
    writing = lock.hold(RunPaths(cfg.run_dir).writing) if distributed.is_main() else contextlib.nullcontext()
    try:
        with writing:
            fit(resolved, cfg.run_dir, model, tokenizer, prepared, info, checkpoint=checkpoint, log=log,
                progress=progress, warn=warn, probe=probe(cfg, tokenizer, prepared) if probe else None,
                callbacks=list(callbacks))
    except BaseException:
        if distributed.is_main():
            artifacts.restore(cfg.run_dir, backup, log)
        raise
    if distributed.is_main():
        artifacts.release(backup)
    return cfg.run_dir


def _adapter_template(cfg: Config, log: Callable[[str], None]) -> None:
    """Continuing an adapter renders its data with the template it was trained with: data.template
    auto means that one; another template is allowed (the user asked) but said."""
    from lorakit.artifacts import find_adapter_dir, read_meta

    trained = read_meta(find_adapter_dir(cfg.model.adapter)).template
    name = trained.name if trained.name in ("alpaca", "chatml", "model") else trained.source
    if cfg.data.template == "auto":
        cfg.data.template = name
    elif cfg.data.template != name:
        log(f"warning: data.template {cfg.data.template!r} is not the template the adapter in {cfg.model.adapter} "
            f"was trained with ({trained.name!r}); its answers were learned in that format")


def _quiet(message: str) -> None:
    """The log of a process other than the main one (whose log already says it all)."""


def build_model(resolved: Resolved, tokenizer, prepared: Prepared, log: Callable[[str], None],
                warn: Callable[..., None] | None = None):
    """The base with LoRA attached, checked before training (`preflight`); returns (model, ModelInfo)."""
    cfg = resolved.cfg
    model, info = load_model(cfg.model, training=True, tokenizer=tokenizer, machine=resolved.machine)
    if cfg.model.adapter:
        keep_dropout = None if cfg.train.method == "sft" else cfg.lora.dropout
        model, cfg.lora, _ = continue_adapter(model, cfg.model.adapter, info, dropout=keep_dropout)
        log(f"starting from the adapter in {cfg.model.adapter} (r {cfg.lora.r}, alpha {cfg.lora.alpha})")
    else:
        model = apply_lora(model, cfg.lora, log=log)
    trainable, _ = count_parameters(model)
    log(describe_parameters(model))
    if cfg.train.method == "sft":
        preflight(cfg, prepared, tokenizer, trainable, warn or log)
    return model, info


@dataclasses.dataclass
class TrainSetup:
    """What `fit` hands the Trainer, derived from the resolved config alone (tests compare it with
    `lorakit plan`'s setup for the same config and machine)."""

    args: dict[str, Any]  # TrainingArguments keywords
    tokens_per_pass: int | None
    checkpoint_oversize: bool  # checkpointing only for passes longer than tokens_per_pass
    fast_half: torch.dtype | None  # the fast path's 16-bit dtype for frozen LoRA bases


def training_setup(resolved: Resolved, run_dir: Path, n_train: int, has_eval: bool) -> TrainSetup:
    """Map lorakit's schema onto TrainingArguments (names changed in transformers 5.x).

    With packing the Trainer gets a whole optimizer step's examples as one batch
    (batch_size × grad_accum rows, the same rows it would have accumulated) and
    `LorakitTrainer` runs it as the passes the collator grouped, by tokens instead of by rows.
    """
    cfg = resolved.cfg
    t = cfg.train
    mp = resolved.mixed_precision
    total = total_steps(cfg, n_train)
    eval_every = t.eval_steps if t.eval_steps > 0 else total
    rows, accum = (t.batch_size * t.grad_accum, 1) if cfg.data.packing else (t.batch_size, t.grad_accum)
    if t.method == "grpo":  # a step is one batch of prompts and their rollouts; evaluations are the probe's
        rows, accum, has_eval = cfg.grpo.prompts_per_step, 1, has_eval and t.eval_generate_rows > 0
    args = dict(
        output_dir=str(RunPaths(run_dir).checkpoints),
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
        report_to=[name for name in t.report_to if name != "tensorboard"] or "none",  # see fit: TensorBoard
        run_name=cfg.output.name,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=t.num_workers,
        use_cpu=resolved.machine.device == "cpu",
        # Our collator already sets the right padding; the model needs no cache while training.
        use_cache=False,
    )
    if distributed.launcher_world_size() > 1:  # a single process ignores train.distributed (checked in train)
        args.update(distributed.trainer_arguments(cfg))
    return TrainSetup(args, resolved.tokens_per_pass, resolved.checkpointing == "oversize",
                      TORCH_DTYPES.get(resolved.fast_half))


def _warmup_steps(cfg: Config, total: int) -> int:
    w = cfg.train.warmup
    return int(math.ceil(w * total)) if w < 1 else int(w)


def total_steps(cfg: Config, n_train: int) -> int:
    """Optimizer steps of the run: train.max_steps, or the epochs' worth."""
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    if t.method == "grpo":
        per_epoch = max(1, math.ceil(n_train / cfg.grpo.prompts_per_step)) * cfg.grpo.updates_per_batch
    else:
        per_epoch = max(1, math.ceil(math.ceil(n_train / t.batch_size) / t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


def fit(resolved: Resolved, run_dir: Path, model, tokenizer, prepared: Prepared, info, *,
        checkpoint: Path | None = None, log: Callable[[str], None] = print, progress: bool = True,
        counter: TokenCounter | None = None, callbacks: list[TrainerCallback] = (),
        warn: DiagnosticLog | None = None, probe=None) -> dict[str, Any]:
    """The training loop proper, into a claimed run folder; ends with the published adapter.
    Returns the run's final metrics. `probe`: scores greedy answers at each evaluation (the eval
    stage's GenerationProbe, made by `train`'s probe factory)."""
    fitting = build(resolved, run_dir, model, tokenizer, prepared, log=log, progress=progress, counter=counter,
                    callbacks=callbacks, warn=warn, probe=probe)
    metrics = run_steps(fitting, checkpoint=checkpoint)
    publish(fitting, info, metrics, log)
    return metrics


@dataclasses.dataclass
class Fitting:
    """A built training run: the Trainer and what watches it (`build`), run by `run_steps`."""

    resolved: Resolved
    prepared: Prepared
    paths: RunPaths
    model: Any  # the PEFT model being trained (what is saved, whatever the Trainer wraps it in)
    tokenizer: Any
    trainer: Any  # trainer_mod.LorakitTrainer
    counter: TokenCounter
    health: Health
    diagnostics: Diagnostics
    warn: DiagnosticLog
    stopper: StopOnSignal | None = None


def build(resolved: Resolved, run_dir: Path, model, tokenizer, prepared: Prepared, *,
          log: Callable[[str], None] = print, progress: bool = True, counter: TokenCounter | None = None,
          callbacks: list[TrainerCallback] = (), warn: DiagnosticLog | None = None, probe=None) -> Fitting:
    """The run folder's first files (config.yaml, data.json, diagnostics), the fast path switched
    on, and the Trainer with lorakit's callbacks."""
    from transformers import TrainingArguments

    cfg = resolved.cfg
    paths = RunPaths(run_dir)
    main = distributed.is_main()
    if main:  # the run folder's files: written once, by the main process
        artifacts.atomic_write_text(paths.config, config_mod.dump(cfg))
        artifacts.atomic_write_json(paths.data, {"template": prepared.template.name, **prepared.stats.to_dict()})
        paths.logs.mkdir(exist_ok=True)
    warn = warn or DiagnosticLog(log)
    if main:
        warn.attach(paths.diagnostics)
    counter, health = counter or TokenCounter(), Health()
    diagnostics = Diagnostics(cfg, health, warn)
    setup = training_setup(resolved, run_dir, len(prepared.train), bool(prepared.validation))
    # one process only: ranks that saw the signal at different steps would wait for each other
    stopper = StopOnSignal() if distributed.launcher_world_size() == 1 else None
    all_callbacks = [
        stopper,
        MetricsLogger(paths.metrics, counter),
        Progress(counter, enabled=progress),
        diagnostics,
        KeepBest(paths, cfg.train.best_by, model) if cfg.train.best_by and main else None,
        # Our own TensorBoard callback, so events land in runs/<name>/logs whatever the Trainer's default.
        _tensorboard(paths.logs) if "tensorboard" in cfg.train.report_to and main else None,
        *callbacks,
    ]
    for note in apply_fast_path(resolved, model, setup.fast_half):
        log(note)
    method = cfg.train.method
    if method == "sft":
        # Looked up at call time: benchmarks/compare.py substitutes a counting subclass.
        make, extra = trainer_mod.LorakitTrainer, {}
        collator = PackedCollator(tokens_per_pass=setup.tokens_per_pass) if cfg.data.packing \
            else Collator(tokenizer.pad_token_id)
    elif method == "grpo":
        from lorakit.rewards import load_rewards
        from lorakit.train import grpo

        rewards = load_rewards(cfg.grpo.rewards, Path.cwd())
        rewards.check([dict(it["columns"]) for it in prepared.train[:4]])  # a broken reward fails now
        make, collator = grpo.GrpoTrainer, grpo.collate_prompts
        extra = {"settings": cfg.grpo, "rewards": rewards, "template": prepared.template, "samples_to": paths.rollouts,
                 "continued": bool(cfg.model.adapter)}
    else:
        from lorakit.train import preference

        make, extra = preference.PreferenceTrainer, {"method": method, "settings": getattr(cfg, method)}
        collator, probe = preference.collator_for(method, setup.tokens_per_pass, prepared), None
    trainer = make(
        model=model,
        args=TrainingArguments(**setup.args),
        data_collator=collator,
        tokens_per_pass=setup.tokens_per_pass,
        fast_path=cfg.train.fast_path,
        train_dataset=prepared.train,
        eval_dataset=(prepared.validation or None) if method != "grpo" or probe is not None else None,
        processing_class=tokenizer,
        callbacks=[c for c in all_callbacks if c is not None],
        token_counter=counter,
        health=health,
        generation_probe=probe,
        **extra,
    )
    if method not in ("sft", "grpo"):
        for note in preference.attach_reference(trainer, paths, prepared):
            log(note)
    trainer.remove_callback(PrinterCallback)  # Progress shows the same records, readably
    if setup.checkpoint_oversize and trainer.checkpoint_oversize_passes():
        log(f"gradient checkpointing: only for passes over {trainer.tokens_per_pass:,} tokens (one long example)")
    if trainer.processes > 1:
        log(f"distributed: {trainer.processes} processes ({trainer.accelerator.distributed_type}), "
            f"{trainer.args.per_device_train_batch_size} rows per process and step")
    return Fitting(resolved, prepared, paths, model, tokenizer, trainer, counter, health, diagnostics, warn, stopper)


def run_steps(f: Fitting, *, checkpoint: Path | None = None) -> dict[str, Any]:
    """Train (from `checkpoint` when resuming); the run's final metrics. A run that runs out of
    memory or whose loss stops being finite raises TrainingStopped, with the advice recorded."""
    trainer, cfg = f.trainer, f.resolved.cfg
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        _finish_trackers(cfg)
    except (torch.OutOfMemoryError, MemoryError) as e:
        error = oom_error(f.resolved, f.prepared.stats.length_percentiles.get("p99"))
        f.warn.record(error.render(), kind="oom")
        raise error from e
    seconds = time.perf_counter() - start
    if f.stopper is not None and f.stopper.stopped_at is not None:
        raise f.stopper.interrupted(f.paths)
    if f.diagnostics.stopped == "nonfinite":
        error = nonfinite_error(f.health, checkpoints(f.paths.checkpoints))
        f.warn.record(error.render(), kind="nonfinite", step=f.health.nonfinite_step)
        raise error
    if trainer.processes > 1:
        f.counter.sync(distributed.sum_ranks)
        # One line from every process: each says it trained as one of N, in the wrapper DDP gave it.
        print(f"lorakit: process {distributed.rank()} of {trainer.processes} trained "
              f"({trainer.accelerator.distributed_type}, model in {trainer.wrapped})", flush=True)
    return _final_metrics(trainer, f.counter, seconds, f.resolved.machine.device)


def publish(f: Fitting, info, metrics: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """The adapter, its tokenizer and lorakit.json into the run folder, by the main process; the
    others leave once it is published."""
    with distributed.main_first() as main:
        if main:
            best = _best(f, info, metrics, log)
            artifacts.save_adapter(f.model, f.tokenizer, f.paths.adapter,
                                   AdapterMeta.build(f.resolved.cfg, f.prepared, info, metrics))
            log(f"adapter saved to {f.paths.adapter}" + (f" (the step-{best['step']} evaluation's)" if best else ""))
            log(compat.format_table(compat.for_adapter(f.paths.adapter)))


def _best(f: Fitting, info, metrics: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """train.best_by: when an evaluation before the last step was the best, the last step's adapter
    goes to last/ and the best one's weights are loaded back for adapter/; `metrics["best"]` says
    which step won, by what value. None when the last step is the best (or nothing was kept)."""
    import json

    if not f.resolved.cfg.train.best_by or not f.paths.best_record.is_file():
        return None
    best = json.loads(f.paths.best_record.read_text(encoding="utf-8"))
    metrics["best"] = {**best, "last_step": metrics["steps"]}
    if best["step"] == metrics["steps"]:
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lorakit.artifacts import PEFT_WEIGHTS

    last_meta = AdapterMeta.build(f.resolved.cfg, f.prepared, info, {**metrics, "best": None})
    artifacts.save_adapter(f.model, f.tokenizer, f.paths.last, last_meta)
    set_peft_model_state_dict(f.model, load_file(f.paths.best / PEFT_WEIGHTS))
    log(f"train.best_by {best['metric']}: step {best['step']} scored {best['value']:.4g}, the best evaluation; "
        f"its adapter is published, the last step's is in {f.paths.last}")
    return best


def apply_fast_path(resolved: Resolved, model, half: torch.dtype | None) -> list[str]:
    """Switch on lorakit's training kernels (train.fast_path); `half` is `TrainSetup.fast_half`.
    Returns what was done, for the log."""
    if not resolved.cfg.train.fast_path:
        return []
    done = speed.apply(model, half, resolved.cfg.data.packing)
    notes = []
    if done["saved"]:
        notes.append(f"fast path: frozen weights stored in {resolved.mixed_precision} "
                     f"({done['saved'] / 2**20:,.0f} MiB saved)")
    if done["fused"]:
        notes.append(f"fast path: {done['fused']} LoRA linears fused"
                     + ("" if half is not None else " (fp32)"))
    if done["dropouts"]:
        notes.append(f"fast path: {done['dropouts']} LoRA dropouts draw masks from 16-bit lanes")
    if done["segments"]:
        notes.append("fast path: attention per packed example")
    elif done["segments_declined"]:
        notes.append(f"fast path: no attention per packed example ({done['segments_declined']}); packed "
                     "examples attend through transformers' own kernel, kept apart by a block-diagonal mask")
    return notes


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak on a GPU, the process's peak resident
    set on CPU (weights, activations and the Python process together: what the machine must have)."""
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def _final_metrics(trainer, counter: TokenCounter, seconds: float, device: str = "cpu") -> dict[str, Any]:
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
        "trained_tokens": counter.totals()[0],
        "processes": trainer.processes,
        "trained_tokens_per_s": round(trained_tps, 1),
        "real_tokens_per_s": round(real_tps, 1),
        "train_seconds": round(seconds, 1),
        **dict(zip(("peak_memory_bytes", "peak_memory_kind"), peak_memory(device))),
    }


def _finish_trackers(cfg: Config) -> None:
    """Close the wandb run when training ends (its Trainer callback leaves it open until the process
    exits, so an offline run file would stay empty for a notebook or a later stage in the same process).
    The mlflow and trackio callbacks close their runs themselves."""
    if "wandb" in cfg.train.report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; keep training if it is broken
        return None
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))
