"""The text `lorakit plan` prints."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lorakit.plan.batches import micro_batches_in_run
from lorakit.plan.estimate import Estimate
from lorakit.plan.shape import fmt_bytes
from lorakit.resolve import AUTO_KEYS

if TYPE_CHECKING:
    from lorakit.plan import Plan

def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    cpu = _fmt_memory(plan.cpu, "on this CPU") if plan.cpu is not None else ""
    return "\n\n".join(s for s in (_fmt_header(plan), cpu, _fmt_gpu(plan), _fmt_processes(plan),
                                    _fmt_time(plan), _fmt_guide(plan), _fmt_fit(plan),
                                    "\n".join(f"note: {n}" for n in plan.notes)) if s)


def _fmt_header(plan: Plan) -> str:
    s, c = plan.shape, plan.cfg
    pct = 100 * s.trainable / s.total
    rows = f"{plan.n_train:,} train rows" if plan.n_train is not None else "dataset size unknown"
    p = plan.batches.percentiles
    lengths = (f"tokens per example p50 {p['p50']}, p99 {p['p99']}, max {p['max']}" if p
               else f"every example assumed {c.data.max_length} tokens")
    mb = plan.target.batch
    per_pass = plan.target.setup.tokens_per_pass
    if per_pass:
        batch = (f"pass         each step's {c.train.batch_size * c.train.grad_accum} examples packed first-fit "
                 f"into passes of ≤ {per_pass:,} tokens: the largest of the run ≈ {mb.tokens:,} tokens")
    else:
        batch = (f"micro-batch  {c.train.batch_size} examples, padded, {mb.rows} rows × {mb.seq}: the largest of "
                 f"the run ≈ {mb.tokens:,} tokens")
    return (f"plan for {c.model.name} on {plan.device}: {rows}; {lengths}\n"
            f"parameters   total {s.total:,}   trainable {s.trainable:,} ({pct:.2f}%)   "
            f"{s.layers} layers, hidden {s.hidden}, vocab {s.vocab:,}\n"
            f"{batch} ({mb.labelled:,} labelled)")


def _fmt_memory(est: Estimate, where: str) -> str:
    s = est.setup
    mode = f"{s.weights} weights" + (", bf16 autocast" if s.autocast else "") + \
        f", gradient checkpointing {'on' if s.checkpointing else 'off'}"
    lines = [f"peak memory {where} ({mode})"]
    for name, value in est.parts.items():
        lines.append(f"  {name:<15}{fmt_bytes(value):>11}   {est.notes.get(name, '')}")
    lines.append(f"  {'peak':<15}{fmt_bytes(est.peak):>11}")
    return "\n".join(lines)


def _fmt_gpu(plan: Plan) -> str:
    cols = plan.gpu
    head = "peak memory on a GPU (bf16 compute" + \
        f", gradient checkpointing {'on' if next(iter(cols.values())).setup.checkpointing else 'off'})"
    names = {"fp32": "fp32", "bf16": "bf16", "8bit": "8-bit", "4bit": "4-bit NF4"}
    lines = [head, "  " + " " * 15 + "".join(f"{names[w]:>11}" for w in cols)]
    keys = list(next(iter(cols.values())).parts)
    for key in keys:
        lines.append(f"  {key:<15}" + "".join(f"{fmt_bytes(e.parts[key]):>11}" for e in cols.values()))
    lines.append(f"  {'peak':<15}" + "".join(f"{fmt_bytes(e.peak):>11}" for e in cols.values()))
    if plan.device == "cuda":
        w = plan.target.setup.weights
        lines.append(f"  this config on a GPU: the {names.get(w, w)} column")
    return "\n".join(lines)


def per_process(est, processes: int, strategy: str, deepspeed: str = "zero2") -> dict[str, int]:
    """One process's parts of `est` when `processes` share the run. DDP keeps a whole replica per
    process plus its gradient buckets (a second copy of the trainable gradients, fp32); FSDP
    ('full_shard') and ZeRO-3 split weights, adapter, gradients and optimizer states over the
    processes; ZeRO-2 and FSDP 'shard_grad_op' split gradients and optimizer states only.
    Activations and logits depend on the per-process batch, which is the config's batch_size."""
    parts = dict(est.parts)
    if processes <= 1:
        return parts
    if strategy == "ddp":
        parts["ddp buckets"] = parts["gradients"]
        return parts
    split = ["gradients", "optimizer"]
    if (strategy == "fsdp" and deepspeed != "shard_grad_op") or (strategy == "deepspeed" and deepspeed == "zero3"):
        split += ["weights", "adapter"]
    for k in split:
        parts[k] = -(-parts[k] // processes)
    return parts


def _fmt_processes(plan: Plan) -> str:
    n = plan.processes
    if n <= 1:
        return ""
    t = plan.cfg.train
    strategy = t.distributed
    mode = t.fsdp.split()[0] if strategy == "fsdp" else t.deepspeed
    parts = per_process(plan.target, n, strategy, mode)
    per_step = t.batch_size * t.grad_accum
    rows = len(plan.batches.lengths)
    steps_one = math.ceil(math.ceil(rows / t.batch_size) / t.grad_accum)
    steps_n = math.ceil(math.ceil(rows / (t.batch_size * n)) / t.grad_accum)
    how = {"ddp": "each holds the whole model and its gradients are averaged once per step",
           "fsdp": f"FSDP {t.fsdp}: parameters and states sharded over the processes",
           "deepspeed": f"DeepSpeed {t.deepspeed}"}[strategy]
    lines = [f"processes    {n} ({how}); on {plan.device} per process:"]
    for name, value in parts.items():
        lines.append(f"  {name:<15}{fmt_bytes(value):>11}")
    lines.append(f"  {'peak':<15}{fmt_bytes(sum(parts.values())):>11}   per process; {fmt_bytes(sum(parts.values()) * n)} "
                 f"for all {n} on one machine")
    lines.append(f"  effective batch {per_step} × {n} = {per_step * n} examples per optimizer step "
                 f"(batch_size {t.batch_size} × grad_accum {t.grad_accum} × {n} processes); "
                 f"{steps_n} steps per epoch instead of {steps_one}")
    if t.max_steps > 0:
        lines.append(f"  train.max_steps {t.max_steps}: the same number of steps, each over {n}× the examples")
    return "\n".join(lines)


def _fmt_time(plan: Plan) -> str:
    cal = plan.calibration
    if cal is None:
        return ""
    t = plan.cfg.train
    epoch_s = cal.seconds_per_token * plan.epoch_tokens
    steps = micro_batches_in_run(plan.cfg, len(plan.batches.lengths))
    per_epoch = math.ceil(len(plan.batches.lengths) / t.batch_size)
    run_s = epoch_s * steps / per_epoch
    timed = ", ".join(f"{s:.2f} s / {n:,} tok" for s, n in zip(cal.seconds[1:], cal.tokens[1:]))
    measure = "peak RSS" if plan.device == "cpu" else "torch peak allocation"
    return (f"time         calibration: {cal.steps} training steps on real batches (first = warm-up; {timed})\n"
            f"             {1 / cal.seconds_per_token:,.0f} tokens/s → one epoch ({plan.epoch_tokens:,} tokens, "
            f"{per_epoch} micro-batches) ≈ {_duration(epoch_s)}; this run ({steps} micro-batches) ≈ "
            f"{_duration(run_s)}, evaluation not included\n"
            f"             calibration {measure}: +{fmt_bytes(cal.peak_bytes - cal.start_bytes)} over this process before "
            f"loading the model, predicted +{fmt_bytes(cal.predicted)} for its largest pass "
            f"({cal.largest.tokens:,} tokens, no evaluation)")


def _fmt_guide(plan: Plan) -> str:
    row = plan.row
    if row is None:
        return "guide        dataset size unknown: the guide's table needs readable data"
    lines = [f"guide        {row.name} dataset ({row.rows}): the guide's table, low end of each range"]
    c = plan.cfg
    for key in AUTO_KEYS:
        section, name = key.split(".")
        rng = row.ranges.get(name, f"{getattr(row, name):g}")
        lines.append(f"  {key:<18} guide {rng:<8} config {getattr(getattr(c, section), name):g}")
    lines.extend(f"  {n}" for n in plan.auto_notes)
    if not plan.auto_notes:
        lines.append("  no 'auto' values in the config (lora.r: auto, train.lr: auto, ... take the guide's)")
    return "\n".join(lines)


def _fmt_fit(plan: Plan) -> str:
    if plan.limit is None:
        return f"fit          {plan.limit_source}"
    if plan.target.peak <= plan.limit:
        return f"fit          fits: {fmt_bytes(plan.target.peak)} of {fmt_bytes(plan.limit)} ({plan.limit_source})"
    head = f"fit          does not fit: {fmt_bytes(plan.target.peak)} > {fmt_bytes(plan.limit)} ({plan.limit_source})"
    if plan.fit is None:
        return head + "\n             no change tried here fits; use a smaller model or a larger machine"
    args = " ".join(plan.fit.setup.overrides(plan.target.setup))
    return f"{head}\n             this fits ({fmt_bytes(plan.fit.peak)}): lorakit train CONFIG {args}"

