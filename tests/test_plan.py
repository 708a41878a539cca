"""`lorakit plan`: exact parameter counts, a breakdown that adds up, the guide's table and
'auto', fitting suggestions that fit; slow: predicted vs measured peak RSS of real runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit import config, plan
from lorakit.cli import main
from lorakit.model.load import load_model, load_tokenizer
from lorakit.model.lora import apply_lora, count_parameters


def tiny_cfg(model_dir, data_file, *extra):
    return config.load(None, [
        f"--model.name={model_dir}", f"--data.train={data_file}", "--data.val_fraction=0.25",
        "--data.template=chatml", "--data.max_length=96", "--lora.r=4", "--lora.alpha=8",
        "--train.batch_size=2", "--train.grad_accum=2", "--train.max_steps=4", *extra,
    ])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """(cfg, Context) for the tiny model, built once: probes are cached in the context."""
    from conftest import ALPACA_ROWS, write_jsonl

    data = write_jsonl(tmp_path_factory.mktemp("plan") / "alpaca.jsonl", ALPACA_ROWS * 4)
    cfg = tiny_cfg(tiny_model_dir, data)
    tok = load_tokenizer(cfg.model)
    from lorakit.data.dataset import prepare

    prepared = prepare(cfg, tok)
    ctx = plan.Context(cfg, plan.describe_model(cfg), plan.Batches.from_prepared(prepared), runtime=400 * 2**20,
                       data=10 * 2**20)
    return cfg, ctx


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("lora", [["--lora.r=4"], ["--lora.r=8", "--lora.target_modules=all-linear"],
                                  ["--lora.modules_to_save=[lm_head]"]])
def test_parameter_counts_equal_the_real_peft_model(tiny_model_dir, alpaca_file, lora):
    cfg = tiny_cfg(tiny_model_dir, alpaca_file, *lora)
    shape = plan.describe_model(cfg)
    model, _ = load_model(cfg.model)
    trainable, total = count_parameters(apply_lora(model, cfg.lora))
    assert (shape.trainable, shape.total) == (trainable, total)
    assert shape.layers == 2 and shape.hidden == 64


def test_meta_model_keeps_tied_embeddings_tied(tiny):
    _, ctx = tiny
    model, _ = load_model(ctx.cfg.model)
    assert ctx.shape.base == count_parameters(model)[1], "the tied head is counted once, as in the real model"


# --------------------------------------------------------------------------- memory


def test_probe_equals_the_real_models_saved_activations(tiny):
    """The two-layer probe predicts exactly what the full model's forward saves for backward."""
    cfg, ctx = tiny
    model, _ = load_model(cfg.model)
    model = apply_lora(model, cfg.lora)
    body = model.get_base_model().model
    for rows, seq, packing in ((1, 150, True), (3, 40, False)):
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st._cdata not in params:
                seen[st._cdata] = st.nbytes()
            return t

        inputs = {"input_ids": torch.randint(0, 300, (rows, seq))}
        if packing:
            inputs["position_ids"] = (torch.arange(seq) % 100).unsqueeze(0)
        else:
            inputs["attention_mask"] = torch.ones(rows, seq, dtype=torch.long)
            inputs["attention_mask"][-1, seq // 2:] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = body(**inputs).last_hidden_state
        del out
        prof = plan.probe_activations(ctx.shape, cfg.lora, torch.float32, False, rows, seq, packing)
        assert prof.total(ctx.shape, rows * seq, False) == pytest.approx(sum(seen.values()), rel=1e-6)


def test_breakdown_adds_up(tiny):
    _, ctx = tiny
    for device in ("cpu", "cuda"):
        est = plan.estimate(ctx, plan.setup_for(ctx.cfg, device))
        assert est.peak == sum(est.parts.values())
        assert all(v >= 0 for v in est.parts.values())
        assert {"weights", "adapter", "gradients", "optimizer", "activations", "logits", "runtime"} <= set(est.parts)
    s = ctx.shape
    setup = plan.setup_for(ctx.cfg, "cpu")
    est = plan.estimate(ctx, setup)
    if setup.autocast and setup.fast:  # the fast path stores the LoRA-wrapped linears in bf16
        assert 0 < s.lora_base < s.base
        assert est.parts["weights"] == s.lora_base * 2 + (s.base - s.lora_base) * 4
    else:
        assert est.parts["weights"] == s.base * 4
    stock = plan.estimate(ctx, dataclasses.replace(setup, fast=False))
    assert stock.parts["weights"] == s.base * 4
    assert est.parts["adapter"] == est.parts["gradients"] == s.trainable * 4
    assert est.parts["optimizer"] == s.trainable * 8, "AdamW: two fp32 states per trainable parameter"


def test_checkpointing_lowers_activations(tiny):
    _, ctx = tiny
    off = plan.setup_for(ctx.cfg, "cpu")
    on = dataclasses.replace(off, checkpointing=True)
    assert not off.checkpointing
    assert plan.estimate(ctx, on).parts["activations"] < plan.estimate(ctx, off).parts["activations"]


def test_quantized_weights_are_smaller(tiny):
    _, ctx = tiny
    b = {w: plan.weight_bytes(ctx.shape, w) for w in ("fp32", "bf16", "8bit", "4bit")}
    assert b["4bit"] < b["8bit"] < b["fp32"] and b["bf16"] < b["fp32"]
    s = ctx.shape
    assert b["4bit"] == int(s.quantizable * plan.NF4_BYTES) + (s.base - s.quantizable) * 4
    gpu = {w: plan.estimate(ctx, plan.setup_for(ctx.cfg, "cuda", w)) for w in ("bf16", "4bit")}
    assert gpu["4bit"].parts["weights"] < gpu["bf16"].parts["weights"]


def test_eight_bit_optimizer_states():
    assert plan.optimizer_state_bytes("adamw_torch") == 8
    assert plan.optimizer_state_bytes("paged_adamw_8bit") == 2
    assert plan.optimizer_state_bytes("adamw_8bit") == 2


def test_micro_batch_tokens_packed_and_padded():
    b = plan.Batches(np.array([10, 20, 30, 40]), np.array([1, 2, 3, 4]), np.array([5, 50]), True)
    packed = plan.peak_micro_batch(b, 4, packing=True, n_micro=1, seed=0)
    padded = plan.peak_micro_batch(b, 4, packing=False, n_micro=1, seed=0)
    assert (packed.tokens, packed.rows, packed.labelled) == (100, 1, 10)
    assert (padded.tokens, padded.rows, padded.seq) == (160, 4, 40), "padded rows are as long as the longest"
    assert plan.peak_eval_batch(b, 1, packing=True) == 50
    assert plan.peak_eval_batch(b, 2, packing=False) == 100


def test_truncation_shortens_examples_and_their_labels():
    b = plan.Batches(np.array([10, 100]), np.array([5, 60]), np.array([100]), True)
    t = b.truncated(50, drop=False)
    assert list(t.lengths) == [10, 50] and list(t.labelled) == [5, 10] and list(t.eval_lengths) == [50]
    assert list(b.truncated(50, drop=True).lengths) == [10]


# --------------------------------------------------------------------------- fitting


def test_suggested_config_fits_by_the_plans_own_estimate(tiny):
    _, ctx = tiny
    setup = plan.setup_for(ctx.cfg, "cpu")
    full = plan.estimate(ctx, setup)
    fixed = full.parts["runtime"] + full.parts["data"] + full.parts["weights"]
    limit = fixed + (full.peak - fixed) // 2
    fit = plan.fitting_setup(ctx, setup, limit)
    assert fit is not None and fit.peak <= limit < full.peak
    args = fit.setup.overrides(setup)
    assert args[:2] == ["--model.gradient_checkpointing", "on"], "checkpointing is tried first"
    # the overrides are valid config keys that produce the setup that was estimated
    cfg2 = config.load(None, [f"--model.name={ctx.cfg.model.name}", f"--data.train={ctx.cfg.data.train[0]}", *args])
    assert cfg2.model.gradient_checkpointing == "on"
    assert plan.fitting_setup(ctx, setup, fixed // 2) is None, "nothing fits below the fixed part"


def test_batch_halving_keeps_the_effective_batch(tiny):
    _, ctx = tiny
    s = dataclasses.replace(plan.setup_for(ctx.cfg, "cpu"), checkpointing=True, tokens_per_pass=None)
    first = next(c for c in plan._candidates(ctx, s) if c.batch_size != s.batch_size)
    assert first.batch_size * first.grad_accum == s.batch_size * s.grad_accum


def test_packed_runs_shrink_the_pass_not_the_batch(tiny):
    _, ctx = tiny
    s = dataclasses.replace(plan.setup_for(ctx.cfg, "cpu"), checkpointing=True)
    assert s.tokens_per_pass == 512
    first = next(plan._candidates(ctx, s))
    assert first.tokens_per_pass == 256 and (first.batch_size, first.grad_accum) == (s.batch_size, s.grad_accum)
    assert first.overrides(s)[:2] == ["--train.tokens_per_pass", "256"]


# --------------------------------------------------------------------------- end to end


def test_make_plan_with_calibration(tiny):
    cfg, _ = tiny
    p = plan.make_plan(cfg, device="cpu", memory_gb=64, calibrate_steps=2)
    assert p.calibration is not None and p.calibration.seconds_per_token > 0 and p.calibration.peak_bytes > 0
    text = plan.format_plan(p)
    for part in ("parameters", "weights", "activations", "peak memory on a GPU", "4-bit NF4", "tokens/s",
                 "guide", "fits"):
        assert part in text, part


def test_cli_plan_suggests_overrides_when_it_does_not_fit(tiny, tmp_path, capsys):
    cfg, _ = tiny
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    assert main(["plan", str(path), "--no-calibrate", "--memory-gb", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out


def test_plan_with_unreadable_data_assumes_max_length(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "missing.jsonl", "--lora.r=auto")
    p = plan.make_plan(cfg, memory_gb=64, calibrate_steps=0)
    assert p.n_train is None and any("data not readable" in n for n in p.notes)
    assert p.cfg.lora.r == 16
    # packed: a step's 2 × 2 examples of 96 tokens fit one 512-token pass
    assert p.target.batch.tokens == 4 * 96 and p.target.setup.tokens_per_pass == 512
    padded = plan.make_plan(tiny_cfg(tiny_model_dir, tmp_path / "missing.jsonl", "--data.packing=false"),
                            memory_gb=64, calibrate_steps=0)
    assert padded.target.batch.tokens == 2 * 96


# --------------------------------------------------------------------------- slow: predicted vs measured


REAL_CONFIGS = [  # packing pinned: its default changed while these were measured
    ["--train.max_steps=4", "--data.packing=true"],
    ["--train.max_steps=3", "--data.packing=true", "--train.batch_size=4", "--train.grad_accum=2", "--lora.r=64",
     "--lora.alpha=128"],
    ["--train.max_steps=3", "--data.packing=true", "--train.batch_size=16", "--data.max_length=64", "--lora.r=8",
     "--lora.alpha=16"],
    ["--train.max_steps=3", "--data.packing=false", "--train.mixed_precision=no"],
    # the run that showed checkpointing keeps the temporaries' heap (HEAP_RETENTION's docstring)
    ["--train.max_steps=3", "--data.packing=false", "--train.batch_size=16", "--model.gradient_checkpointing=on"],
    # not used to build the model: checks on other settings
    ["--train.max_steps=3", "--data.packing=false", "--train.batch_size=2", "--train.mixed_precision=no",
     "--lora.dropout=0", "--lora.r=32", "--lora.alpha=64"],
    ["--train.max_steps=3", "--data.packing=true", "--train.batch_size=8", "--model.gradient_checkpointing=on",
     "--lora.r=8", "--lora.alpha=16"],
    ["--train.max_steps=3", "--data.packing=false", "--train.batch_size=12", "--data.max_length=128"],
    # long runs: the peak must not grow with the number of steps (speed.KERNEL_CACHES)
    ["--train.max_steps=30", "--data.packing=true"],
    ["--train.max_steps=30", "--data.packing=false"],
]

_MAXRSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(r.stderr[-3000:], file=sys.stderr); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 if r.returncode == 0 else -1)")


def measured_peak_rss(args: list[str], cwd: Path) -> int:
    """Peak RSS in bytes of `lorakit train ARGS` in a fresh process (ru_maxrss of its own parent)."""
    lorakit = Path(sys.executable).with_name("lorakit")
    out = subprocess.run([sys.executable, "-c", _MAXRSS, str(lorakit), "train", *args], capture_output=True,
                         text=True, cwd=cwd, check=True)
    value = int(out.stdout.strip().splitlines()[-1])
    assert value > 0, out.stderr
    return value


@pytest.mark.slow
@pytest.mark.parametrize("overrides", REAL_CONFIGS, ids=["demo", "bs4-r64", "bs16-len64-r8", "padded-fp32",
                                                       "checkpointing-bs16", "bs2-fp32-r32",
                                                       "checkpointing-packed-r8", "padded-bs12-len128",
                                                       "30-steps-packed", "30-steps-padded"])
def test_predicted_peak_within_15_percent_of_a_real_run(overrides, tmp_path):
    from lorakit.demo.run import DEMO_CONFIG

    args = [str(DEMO_CONFIG), f"--output.dir={tmp_path}", "--train.save_steps=0", *overrides]
    predicted = planned_peak(args, tmp_path)
    measured = measured_peak_rss(args, tmp_path)
    err = predicted["peak"] / measured - 1
    parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in predicted["parts"].items())
    print(f"\nplan-vs-measured {' '.join(overrides)}: tokens {predicted['tokens']}, predicted "
          f"{predicted['peak'] / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, error {err:+.1%} ({parts})")
    assert abs(err) <= 0.15


_PLAN = ("import json, sys; from lorakit import config, plan; "
         "cfg = config.load(sys.argv[1], sys.argv[2:]); t = plan.make_plan(cfg, calibrate_steps=0).target; "
         "print(json.dumps({'peak': t.peak, 'parts': t.parts, 'tokens': t.batch.tokens}))")


def planned_peak(args: list[str], cwd: Path) -> dict:
    """The plan's estimate, made in a fresh process as `lorakit plan` does (its runtime baseline
    is the RSS of the process that makes it)."""
    out = subprocess.run([sys.executable, "-c", _PLAN, *args], capture_output=True, text=True, cwd=cwd, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_pass_is_the_fullest_first_fit_pass():
    from lorakit.data.collate import PackedCollator, split_passes

    lengths = np.array([300, 20, 250, 40, 60, 500, 90, 100])
    b = plan.Batches(lengths, lengths // 2, np.array([], int), True)
    mb = plan.peak_pass(b, rows_per_step=8, budget=512, n_steps=1, seed=0, sims=1)
    feats = [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]
    passes = split_passes(PackedCollator(tokens_per_pass=512)(feats))  # what the trainer runs
    assert mb.tokens == max(p["input_ids"].shape[1] for p in passes)
    assert mb.tokens <= 512 and mb.rows == 1
    long = plan.Batches(np.array([900, 10]), np.array([400, 5]), np.array([], int), True)
    assert plan.peak_pass(long, 2, 512, 1, 0, 1).tokens == 900  # an example longer than a pass is its own pass


def test_an_example_longer_than_a_pass_is_planned_with_checkpointing(tiny):
    _, ctx = tiny
    s = plan.setup_for(ctx.cfg, "cpu")
    assert s.oversize_checkpointing and not s.checkpointing
    long = dataclasses.replace(ctx, batches=plan.Batches(np.array([2000, 40, 40, 40, 40]), np.array([900, 20, 20, 20, 20]),
                                                          np.array([], int), True))
    auto = plan.estimate(long, s)
    never = plan.estimate(long, dataclasses.replace(s, oversize_checkpointing=False))
    assert auto.batch.tokens == never.batch.tokens == 2000
    assert auto.parts["activations"] < 0.75 * never.parts["activations"]  # 2 layers: inputs kept + 1 recomputed
    assert "checkpointed" in auto.notes["activations"]


def test_a_wrong_model_name_is_a_model_problem(tmp_path, alpaca_file):
    """Not 'data not readable': the plan names model.name and says how to fix it."""
    from lorakit.errors import ModelError

    cfg = config.load(None, [f"--model.name={tmp_path / 'no-such-model'}", f"--data.train={alpaca_file}"])
    with pytest.raises(ModelError) as e:
        plan.make_plan(cfg, calibrate_steps=0)
    assert e.value.where == "config model.name" and "no-such-model" in e.value.message


def test_an_unreachable_hub_id_is_a_clear_error_not_a_traceback(tmp_path, alpaca_file):
    """Offline, a hub id that is not in the cache: exit 2 with the fix, no traceback."""
    import os

    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"model:\n  name: someorg/not-a-cached-model\ndata:\n  train: {alpaca_file}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", "plan", str(cfg), "--no-calibrate"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "config model.name" in out.stderr and "someorg/not-a-cached-model" in out.stderr
    assert "fix:" in out.stderr


# --------------------------------------------------------------------------- --processes


def test_per_process_memory_by_strategy(tiny):
    from lorakit.plan.report import per_process
    from lorakit.resolve import resolve

    cfg, ctx = tiny
    est = plan.estimate(ctx, plan.setup_from(resolve(cfg)))
    one = per_process(est, 1, "ddp")
    assert one == est.parts
    ddp = per_process(est, 4, "ddp")  # a whole replica each, plus DDP's bucket copy of the gradients
    assert ddp["ddp buckets"] == est.parts["gradients"] and ddp["weights"] == est.parts["weights"]
    full = per_process(est, 4, "fsdp", "full_shard")
    for k in ("weights", "adapter", "gradients", "optimizer"):
        assert full[k] == -(-est.parts[k] // 4)
    assert full["activations"] == est.parts["activations"]  # the per-process batch is unchanged
    z2 = per_process(est, 4, "deepspeed", "zero2")
    assert z2["weights"] == est.parts["weights"] and z2["optimizer"] == -(-est.parts["optimizer"] // 4)


def test_plan_processes_prints_the_effective_batch_and_refuses_what_training_would(tiny_model_dir, tmp_path, capsys):
    from conftest import ALPACA_ROWS, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS * 4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {data}, template: alpaca, val_fraction: 0.25}}\n"
                   "train: {batch_size: 2, grad_accum: 2}\n")
    assert main(["plan", str(cfg), "--processes", "2", "--no-calibrate"]) == 0
    out = capsys.readouterr().out
    # 48 train rows: 12 steps per epoch with one process (2 x 2 rows), 6 with two (ceil(48 / 4) / 2)
    assert "effective batch 4 × 2 = 8 examples per optimizer step" in out and "6 steps per epoch instead of 12" in out
    assert "ddp buckets" in out
    assert main(["plan", str(cfg), "--processes", "2", "--no-calibrate", "--train.distributed", "fsdp"]) == 2
    assert "needs CUDA GPUs" in capsys.readouterr().err
