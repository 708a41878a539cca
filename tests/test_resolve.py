"""lorakit.resolve: the one owner of `auto` and device rules, and plan and train agreeing on them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorakit import config, plan
from lorakit.errors import ConfigError, LorakitError
from lorakit.model.load import resolve_dtype
from lorakit.resolve import Machine, checkpoints_every_pass, guide_row, resolve
from lorakit.train.run import training_setup

CPU = Machine("cpu", bf16=True)


@pytest.mark.parametrize("rows,name", [(1, "small"), (999, "small"), (1000, "medium"), (10_000, "medium"),
                                       (10_001, "large"), (250_000, "large")])
def test_guide_row_by_dataset_size(rows, name):
    assert guide_row(rows).name == name


def test_guide_values_are_the_tables():
    small, medium, large = (guide_row(n) for n in (500, 5000, 50_000))
    assert (small.r, small.alpha, small.dropout, small.lr, small.epochs, small.batch_size) == (8, 16, 0.1, 1e-4, 5, 4)
    assert (medium.r, medium.alpha, medium.dropout, medium.lr, medium.epochs, medium.batch_size) == \
        (16, 32, 0.05, 2e-4, 3, 8)
    assert (large.r, large.alpha, large.dropout, large.lr, large.epochs, large.batch_size) == \
        (32, 64, 0.05, 3e-4, 1, 16)


def _auto_cfg(*extra):
    return config.load(None, ["--data.train=x.jsonl", "--lora.r=auto", "--lora.alpha=auto", "--lora.dropout=auto",
                              "--train.lr=auto", "--train.epochs=auto", "--train.batch_size=auto", *extra])


def test_config_accepts_auto_and_still_checks_numbers():
    cfg = _auto_cfg()
    assert cfg.lora.r == "auto" and cfg.train.lr == "auto"
    assert config.load(None, ["--data.train=x.jsonl"]).lora.r == 16, "defaults stay numbers"
    with pytest.raises(ConfigError) as e:
        config.load(None, ["--data.train=x.jsonl", "--lora.r=many"])
    assert "'auto'" in str(e.value) and "integer" in str(e.value)
    with pytest.raises(ConfigError):
        config.load(None, ["--data.train=x.jsonl", "--train.lr=-1"])


@pytest.mark.parametrize("rows,expect", [(320, (8, 16, 0.1, 1e-4, 5, 4)), (4000, (16, 32, 0.05, 2e-4, 3, 8)),
                                         (20_000, (32, 64, 0.05, 3e-4, 1, 16))])
def test_resolve_auto_uses_the_row_for_the_size(rows, expect):
    cfg = _auto_cfg()
    resolved = resolve(cfg, CPU, rows)
    notes, c = resolved.notes, resolved.cfg
    got = (c.lora.r, c.lora.alpha, c.lora.dropout, c.train.lr, c.train.epochs, c.train.batch_size)
    assert got == expect
    assert len(notes) == 6 and all("auto →" in n for n in notes)
    assert cfg.lora.r == "auto" and cfg.train.lr == "auto", "the caller's config is not modified"


def test_resolve_auto_leaves_explicit_values_and_scales_alpha_with_r():
    resolved = resolve(_auto_cfg("--lora.r=64", "--train.lr=5e-4"), CPU, 320)
    cfg, notes = resolved.cfg, resolved.notes
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr) == (64, 128, 5e-4)
    assert len(notes) == 4 and any("2 × lora.r" in n for n in notes)
    resolved = resolve(config.load(None, ["--data.train=x.jsonl"]), CPU, 320)
    assert resolved.notes == () and resolved.cfg.lora.r == 16




def test_without_a_dataset_size_auto_takes_the_schema_defaults():
    resolved = resolve(_auto_cfg(), CPU, None)
    assert (resolved.cfg.lora.r, resolved.cfg.train.lr) == (16, 2e-4) and resolved.guide is None
    assert all("schema default" in n for n in resolved.notes) and len(resolved.notes) == 6


def test_resolved_is_frozen():
    resolved = resolve(config.load(None, ["--data.train=x.jsonl"]), CPU, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.tokens_per_pass = 7


# --------------------------------------------------------------------------- plan and train agree

MACHINES = {
    "cpu-bf16": Machine("cpu", True),
    "cpu-emulated": Machine("cpu", False),
    "cuda-bf16": Machine("cuda", True, "H100"),
    "cuda-fp16": Machine("cuda", False, "Tesla T4"),
}

# overrides -> machine -> (weights, mixed precision, checkpointing, tokens per pass), decided by hand
# from the rules: dtype auto = fp32 on CPU / the GPU's best 16-bit type; autocast bf16 where native;
# checkpointing all passes on GPUs, only over-long packed passes on CPU; 512 / 8192 tokens per pass.
TABLE = [
    ([], {"cpu-bf16": ("fp32", "bf16", "oversize", 512), "cpu-emulated": ("fp32", "no", "oversize", 512),
          "cuda-bf16": ("bf16", "bf16", "all", 8192), "cuda-fp16": ("fp16", "fp16", "all", 8192)}),
    (["--data.packing=false"], {"cpu-bf16": ("fp32", "bf16", "none", None), "cpu-emulated": ("fp32", "no", "none", None),
                                "cuda-bf16": ("bf16", "bf16", "all", None), "cuda-fp16": ("fp16", "fp16", "all", None)}),
    (["--model.gradient_checkpointing=off", "--train.tokens_per_pass=256"],
     {"cpu-bf16": ("fp32", "bf16", "none", 256), "cuda-bf16": ("bf16", "bf16", "none", 256)}),
    (["--model.gradient_checkpointing=on"], {"cpu-emulated": ("fp32", "no", "all", 512),
                                             "cuda-fp16": ("fp16", "fp16", "all", 8192)}),
    (["--model.quantization=4bit"], {"cpu-bf16": ("4bit", "bf16", "oversize", 512),
                                     "cuda-bf16": ("4bit", "bf16", "all", 8192)}),
    (["--model.dtype=fp32", "--train.mixed_precision=no"], {"cuda-bf16": ("fp32", "no", "all", 8192),
                                                            "cpu-bf16": ("fp32", "no", "oversize", 512)}),
    (["--model.dtype=fp32"], {"cuda-bf16": ("fp32", "bf16", "all", 8192)}),
    (["--train.fast_path=false"], {"cpu-bf16": ("fp32", "bf16", "oversize", 512)}),
]
CASES = [(extra, m, want) for extra, by_machine in TABLE for m, want in by_machine.items()]


@pytest.mark.parametrize("extra,machine,want", CASES, ids=[f"{' '.join(e) or 'defaults'}@{m}" for e, m, _ in CASES])
def test_plan_and_train_take_the_same_decisions(extra, machine, want, tmp_path):
    cfg = config.load(None, ["--data.train=x.jsonl", *extra])
    m = MACHINES[machine]
    weights, mp, ckpt, per_pass = want
    s = plan.setup_for(cfg, m)  # what lorakit plan estimates
    resolved = resolve(cfg, m, 100)
    t = training_setup(resolved, tmp_path, 100, has_eval=True)  # what lorakit train hands the Trainer
    load_dtype = resolve_dtype(cfg.model, m)  # what load_model loads the base in
    every_pass = checkpoints_every_pass(cfg.model, m)  # what load_model switches on
    autocast = "bf16" if t.args["bf16"] else "fp16" if t.args["fp16"] else "no"

    assert (s.weights, autocast, t.tokens_per_pass, s.tokens_per_pass) == (weights, mp, per_pass, per_pass)
    assert resolved.weights == weights and resolved.mixed_precision == mp and resolved.checkpointing == ckpt
    q = cfg.model.quantization
    compute = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "4bit": "bfloat16"}[weights]
    assert str(load_dtype).removeprefix("torch.") == compute
    assert s.autocast == (autocast != "no" and load_dtype == torch.float32 and q == "none")
    assert s.checkpointing == every_pass == (ckpt == "all")
    assert s.oversize_checkpointing == t.checkpoint_oversize == (ckpt == "oversize")
    fast_half_fp32 = t.fast_half is not None and load_dtype == torch.float32 and q == "none"
    assert (s.fast and s.autocast) == fast_half_fp32, "plan's 16-bit LoRA bases are the fast path's"
    rows = t.args["per_device_train_batch_size"] * t.args["gradient_accumulation_steps"]
    assert rows == s.batch_size * s.grad_accum
    assert t.args["use_cpu"] == (m.device == "cpu")


@pytest.mark.parametrize("extra,machine,message", [
    (["--model.dtype=bf16"], "cuda-fp16", "no native bf16"),
    (["--model.dtype=fp16"], "cpu-bf16", "fp16 is not supported on CPU"),
    (["--train.mixed_precision=fp16"], "cpu-emulated", "needs a CUDA GPU"),
])
def test_a_config_the_machine_cannot_run_fails_in_plan_and_train_alike(extra, machine, message):
    cfg = config.load(None, ["--data.train=x.jsonl", *extra])
    with pytest.raises(LorakitError, match=message) as planned:
        plan.setup_for(cfg, MACHINES[machine])
    with pytest.raises(LorakitError, match=message) as trained:
        resolve(cfg, MACHINES[machine], 100)
    assert planned.value.where == trained.value.where and planned.value.where.startswith("config ")


def test_diagnostics_and_doctor_read_the_resolver():
    """No module keeps a rule of its own: the OOM advice halves the resolved pass, doctor reports the
    resolver's CPU bf16 fact."""
    from lorakit import doctor
    from lorakit.resolve import cpu_has_native_bf16
    from lorakit.train.diagnostics import oom_error

    cfg = config.load(None, ["--data.train=x.jsonl"])
    for m, per_pass in ((MACHINES["cpu-bf16"], 512), (MACHINES["cuda-bf16"], 8192)):
        assert f"--train.tokens_per_pass {per_pass // 2} " in oom_error(resolve(cfg, m), 40).hint
    cpu = next(c for c in doctor.check_accelerator() if c.name == "cpu bf16")
    assert cpu.detail.startswith("native") == cpu_has_native_bf16()
    here = resolve(config.Config(), Machine.detect())
    auto = doctor.check_auto().detail
    assert f"model.dtype {here.dtype}," in auto and f"train.mixed_precision {here.mixed_precision}," in auto
    assert f"tokens_per_pass {here.tokens_per_pass}" in auto and f"checkpointing {here.checkpointing} " in auto


def test_attention_auto_lets_transformers_pick_per_family(tmp_path):
    """'auto' loads SDPA where the architecture supports it and eager where it does not (Gemma 2's
    soft-capped attention logits); a kernel named in the config is passed through."""
    from conftest import build_tiny_model

    from lorakit.config import ModelConfig
    from lorakit.model.load import load_model

    for family, kernel in (("llama", "sdpa"), ("gemma2", "eager"), ("gemma3", "sdpa"), ("mistral", "sdpa")):
        folder = build_tiny_model(tmp_path / family, family=family)
        model, _ = load_model(ModelConfig(name=str(folder)), training=False)
        assert model.config._attn_implementation == kernel, family
    model, _ = load_model(ModelConfig(name=str(tmp_path / "llama"), attn_implementation="eager"), training=False)
    assert model.config._attn_implementation == "eager"
