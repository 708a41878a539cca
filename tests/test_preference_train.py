"""`lorakit train` with train.method dpo / orpo / simpo / kto on a tiny model, end to end.

The sharpest check of DPO's reference: at the first step the policy *is* the reference (a new
adapter starts at zero; a continued one is frozen as the reference), so every margin is 0 and the
sigmoid loss is exactly ln 2 whatever the data. The policy runs the training fast path (fused LoRA
linears) while the reference was computed in eval mode, so the two log-probs agree to float32
rounding of sums of ~30 token log-probs (~1e-5 relative of ~-270, so a few 1e-3 absolute in a
log-prob), times beta 0.1 in the loss: 1e-3 absolute on ln 2 covers it.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALPACA_ROWS, kill_at_checkpoint, write_jsonl
from lorakit import config
from lorakit.artifacts import RunPaths

PAIRS = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
          "rejected": ALPACA_ROWS[(i + 1) % 4]["output"]} for i, r in enumerate(ALPACA_ROWS)]


def cfg_for(tmp: Path, model_dir: Path, data: Path, name: str, method: str = "dpo", **over) -> config.Config:
    train = {"method": method, "max_steps": 3, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "logging_steps": 1,
             "eval_steps": 3, "save_steps": 0, "mixed_precision": "no", "report_to": [], **over.pop("train", {})}
    raw = {"model": {"name": str(model_dir), "dtype": "fp32", **over.pop("model", {})},
           "data": {"train": [str(data)], "template": "alpaca", "max_length": 128, "val_fraction": 0.25},
           "lora": {"r": 4, "alpha": 8}, "train": train,
           "output": {"dir": str(tmp / "runs"), "name": name}, **over}
    return config.from_dict(raw)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", PAIRS * 2)


def test_dpo_starts_at_ln2_logs_its_figures_and_every_later_stage_reads_the_run(tmp_path, tiny_model_dir, pairs):
    from lorakit.evaluate import evaluate_run
    from lorakit.infer import Sampling, generate, load_session
    from lorakit.pipeline import train

    run = train(cfg_for(tmp_path, tiny_model_dir, pairs, "dpo"), progress=False, log=lambda *_: None)
    recs = records(run)
    first = next(r for r in recs if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert recs[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-3)  # step 0: policy = reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert key in first and f"eval_{key}" in [r for r in recs if "eval_loss" in r][-1]
    page = RunPaths(run).report.read_text(encoding="utf-8")
    assert 'id="chart-rewards"' in page and 'id="chart-preference"' in page  # the method's own figures
    stored = json.loads((run / "reference_logps.json").read_text())
    assert len(stored["train"]) + len(stored["validation"]) == len(PAIRS) * 2
    # later stages: the run folder is a normal one
    session = load_session(run)
    assert generate(session, [{"role": "user", "content": "Say hello."}], Sampling(max_new_tokens=4, greedy=True))
    [summary] = evaluate_run(run, log=lambda *_: None)
    answered = [json.loads(line) for line in RunPaths(run).eval_records("validation").read_text().splitlines()]
    assert summary.data == "validation" and len(answered) == len(stored["validation"]) == 8  # scored against the chosen answers
    assert {r["reference"] for r in answered} <= {p["chosen"] for p in PAIRS}
    from lorakit.merge import merge

    merge(run, tmp_path / "merged", log=lambda *_: None)  # its own parity check: merged = base + adapter
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_each_method_trains_and_moves_its_margin(tmp_path, tiny_model_dir, pairs, method):
    from lorakit.pipeline import train

    data = pairs
    if method == "kto":  # the pairs as single answers, the chosen labelled good, the rejected bad
        rows = [{"instruction": p["instruction"], "input": p["input"], "completion": p[side], "label": side == "chosen"}
                for p in PAIRS for side in ("chosen", "rejected")]
        data = write_jsonl(tmp_path / "kto.jsonl", rows)
    # one batch holds the whole training split, so every step descends on the same loss (with batches
    # that differ per step a few Adam steps on 24 examples move it up as often as down)
    run = train(cfg_for(tmp_path, tiny_model_dir, data, method, method,
                        train={"max_steps": 4, "batch_size": 24, "lr": 5e-3, "warmup": 0}),
                progress=False, log=lambda *_: None)
    losses = [r["loss"] for r in records(run) if "loss" in r]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    if method == "kto":  # the policy starts as its reference: every log-ratio and z0 are 0, 1 - σ(0)
        assert losses[0] == pytest.approx(0.5, abs=1e-3)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "reference_logps.json").exists() == (method == "kto")


def test_a_method_and_data_of_another_kind_are_refused_with_the_fix(tmp_path, tiny_model_dir, pairs):
    from lorakit.errors import DataError
    from lorakit.pipeline import train

    with pytest.raises(DataError) as e:
        train(cfg_for(tmp_path, tiny_model_dir, pairs, "kto", "kto"), progress=False, log=lambda *_: None)
    assert "train.method kto" in str(e.value) and "dpo" in e.value.hint


def test_dpo_from_a_trained_adapter_uses_it_as_the_reference(tmp_path, tiny_model_dir, pairs):
    import peft
    from transformers import AutoModelForCausalLM

    from lorakit.pipeline import train

    sft_rows = write_jsonl(tmp_path / "sft.jsonl", ALPACA_ROWS)
    sft = train(cfg_for(tmp_path, tiny_model_dir, sft_rows, "sft", "sft", train={"lr": 5e-2}),
                progress=False, log=lambda *_: None)
    dpo = train(cfg_for(tmp_path, tiny_model_dir, pairs, "dpo-from-sft", model={"adapter": str(sft)}),
                progress=False, log=lambda *_: None)
    first = next(r for r in records(dpo) if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as its reference
    # the reference is base + the SFT adapter, not the base: compare with both, computed by PEFT itself
    stored = json.loads((dpo / "reference_logps.json").read_text())["train"]
    from lorakit.data.preference import prepare_preference

    cfg = config.load(dpo / "config.yaml")
    from transformers import AutoTokenizer

    prepared = prepare_preference(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_sft = peft.PeftModel.from_pretrained(base, str(sft / "adapter")).eval()

    def logp(model, seq):
        ids = torch.tensor([seq["input_ids"]])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        labels = torch.tensor(seq["labels"][1:])
        keep = labels != -100
        return float(lp[keep].gather(1, labels[keep][:, None]).sum())

    with torch.no_grad():
        got = [x for r in stored for x in r]
        want = [logp(with_sft, it[s]) for it in prepared.train for s in ("chosen", "rejected")]
        with with_sft.disable_adapter():
            bare = [logp(with_sft, it[s]) for it in prepared.train for s in ("chosen", "rejected")]
    assert got == pytest.approx(want, abs=1e-3)
    assert max(abs(a - b) for a, b in zip(got, bare)) > 0.05
    meta = json.loads((dpo / "adapter" / "lorakit.json").read_text())
    assert meta["train"]["method"] == "dpo" and meta["lora"]["r"] == 4


def _write_yaml(tmp: Path, model_dir: Path, data: Path, name: str) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(
        f"model: {{name: {model_dir}, dtype: fp32}}\n"
        f"data: {{train: {data}, template: alpaca, max_length: 128, val_fraction: 0.25}}\n"
        "lora: {r: 4, alpha: 8}\n"
        "train: {method: dpo, max_steps: 5, batch_size: 2, grad_accum: 2, lr: 5.0e-3, logging_steps: 1,\n"
        "        eval_steps: 0, save_steps: 1, save_total_limit: 2, mixed_precision: 'no', report_to: []}\n"
        f"output: {{dir: {tmp / 'runs'}, name: {name}}}\n", encoding="utf-8")
    return p


def test_dpo_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, pairs):
    cli = lambda *a: [sys.executable, "-m", "lorakit.cli", *a]  # noqa: E731
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = _write_yaml(tmp_path, tiny_model_dir, pairs, "whole")
    subprocess.run(cli("train", str(ref)), check=True, capture_output=True, timeout=300, env=env)
    cut = _write_yaml(tmp_path, tiny_model_dir, pairs, "cut")
    kill_after = random.Random().randint(1, 3)
    ckpts = tmp_path / "runs" / "cut" / "checkpoints"
    kill_at_checkpoint(cli("train", str(cut)), ckpts, kill_after, env)
    out = subprocess.run(cli("train", str(cut), "--resume"), capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    a = load_file(tmp_path / "runs" / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "runs" / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    losses = [r["loss"] for r in records(tmp_path / "runs" / "cut") if "loss" in r]
    assert len(losses) == 5 and losses == pytest.approx([r["loss"] for r in records(tmp_path / "runs" / "whole")
                                                         if "loss" in r], rel=1e-5)


def _watch(method: str = "dpo"):
    from types import SimpleNamespace

    from lorakit.train.diagnostics import Diagnostics, Health

    cfg = config.from_dict({"data": {"train": ["x.jsonl"]}, "train": {"method": method}})
    seen = []
    diag = Diagnostics(cfg, Health(), lambda message, kind=None, step=None: seen.append(kind))
    log = lambda step, **logs: diag.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)  # noqa: E731
    return log, seen


def test_diagnostics_name_the_known_preference_failures():
    log, seen = _watch()
    log(0, eval_loss=0.6931, **{"eval_rewards/chosen": 1e-4, "eval_rewards/rejected": -2e-4})
    assert seen == []  # rounding between the fused policy and the eval-mode reference
    log(0, eval_loss=0.9, **{"eval_rewards/chosen": 0.8, "eval_rewards/rejected": -0.1})
    assert seen == ["reference"]

    log, seen = _watch()
    for step, margin in enumerate([0.2, 0.1, 0.15, 0.1, 0.12, 0.11], 1):  # never grows
        log(step, loss=0.69, **{"rewards/margins": margin, "logps/chosen": -30.0})
    assert "margin_flat" in seen and "chosen_collapse" not in seen

    log, seen = _watch()
    for step, (margin, chosen) in enumerate([(0.0, -30), (0.5, -33), (1.0, -36), (1.5, -39), (2.0, -42)], 1):
        log(step, loss=0.5, **{"rewards/margins": margin, "logps/chosen": float(chosen)})
    assert seen == ["chosen_collapse"]  # the margin grows by pushing the chosen answers down too


def test_dpo_on_a_4bit_base_starts_at_ln2_and_trains(tmp_path, pairs):
    """QLoRA as for SFT (bitsandbytes runs 4-bit on CPU too): the reference is computed on the same
    4-bit base, so the first loss is still ln 2."""
    from conftest import build_tiny_model

    from lorakit.pipeline import train

    model_dir = build_tiny_model(tmp_path / "q", hidden=128)  # 4-bit blocks need rows of 64+
    run = train(cfg_for(tmp_path, model_dir, pairs, "qdpo", model={"quantization": "4bit", "dtype": "auto"},
                        train={"mixed_precision": "auto"}), progress=False, log=lambda *_: None)
    losses = [r["loss"] for r in records(run) if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3) and all(math.isfinite(x) for x in losses)
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["base_model"]["quantization"] == "4bit"
