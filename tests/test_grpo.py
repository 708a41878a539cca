"""`lorakit train` with train.method grpo on a tiny model: rollouts from the live policy on the
decoder, rewards by code, reproducible and exactly resumable."""

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

REWARD = '''
def longer(prompt, completion, **row):
    """More characters, more reward (bounded): varies across a group, so advantages are not zero."""
    return len(completion) / (1 + len(completion))
'''


def _yaml(tmp: Path, model_dir: Path, data: Path, name: str, steps: int = 3, save: int = 0) -> Path:
    (tmp / "reward.py").write_text(REWARD, encoding="utf-8")
    p = tmp / f"{name}.yaml"
    p.write_text(
        f"model: {{name: {model_dir}, dtype: fp32}}\n"
        f"data: {{train: {data}, template: alpaca, max_length: 128, val_fraction: 0}}\n"
        "lora: {r: 4, alpha: 8}\n"
        f"train: {{method: grpo, max_steps: {steps}, lr: 1.0e-2, logging_steps: 1, save_steps: {save},\n"
        "        mixed_precision: 'no', report_to: [], seed: 5}\n"
        "grpo: {prompts_per_step: 2, generations: 4, max_completion_tokens: 8, temperature: 1.0,\n"
        f"       rewards: [{{name: '{tmp / 'reward.py'}:longer'}}, {{name: json_valid, weight: 0.5}}]}}\n"
        f"output: {{dir: {tmp / 'runs'}, name: {name}}}\n", encoding="utf-8")
    return p


def _cli(*args):
    return [sys.executable, "-m", "lorakit.cli", *args]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "prompts.jsonl", ALPACA_ROWS)


def test_grpo_trains_logs_its_rewards_and_repeats_exactly(tmp_path, tiny_model_dir, data):
    from lorakit import config
    from lorakit.pipeline import train

    runs = []
    for name in ("a", "b"):
        cfg = config.load(_yaml(tmp_path, tiny_model_dir, data, name))
        runs.append(train(cfg, progress=False, log=lambda *_: None))
    recs = [r for r in records(runs[0]) if "loss" in r]
    assert len(recs) == 3
    for key in ("reward", "reward_std", "zero_spread_groups", "rewards/longer", "rewards/json_valid",
                "completion_length", "clip_ratio"):
        assert key in recs[0] and math.isfinite(recs[0][key]), key
    assert 0 <= recs[0]["rewards/longer"] < 1
    from lorakit.artifacts import RunPaths

    page = RunPaths(runs[0]).report.read_text(encoding="utf-8")
    assert 'id="chart-reward"' in page and 'id="chart-groups"' in page
    # the first and the last step's sampled answers (log_samples_steps 10), each reward the weighted sum
    kept = [json.loads(line) for line in RunPaths(runs[0]).rollouts.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 3] and all(len(r["samples"]) == 4 for r in kept)
    for s in kept[0]["samples"] + kept[1]["samples"]:
        assert s["reward"] == pytest.approx(s["rewards"]["longer"] + 0.5 * s["rewards"]["json_valid"], abs=2e-4)
    import html

    assert 'id="rollouts"' in page and html.escape(kept[-1]["samples"][0]["completion"]) in page
    # the same seed samples the same rollouts and takes the same steps
    a, b = adapter(runs[0]), adapter(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it learned something
    # later stages read the run like any other: eval scores it against the rows' answers (alpaca output)
    from lorakit.evaluate import evaluate_run
    from lorakit.config import EvalConfig

    [summary] = evaluate_run(runs[0], EvalConfig(data=[str(data)], limit=4), log=lambda *_: None)
    assert summary.scores["tuned"]["exact_match"] is not None


def test_a_broken_reward_fails_before_the_first_step(tmp_path, tiny_model_dir, data):
    from lorakit import config
    from lorakit.errors import LorakitError
    from lorakit.pipeline import train

    cfg_path = _yaml(tmp_path, tiny_model_dir, data, "broken")
    (tmp_path / "reward.py").write_text("def longer(prompt, completion, **row):\n    return 'x'\n")
    with pytest.raises(LorakitError) as e:
        train(config.load(cfg_path), progress=False, log=lambda *_: None)
    assert "longer" in str(e.value)
    assert not (tmp_path / "runs" / "broken" / "metrics.jsonl").exists()


def test_grpo_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data):
    whole = _yaml(tmp_path, tiny_model_dir, data, "whole", steps=4, save=1)
    subprocess.run(_cli("train", str(whole)), check=True, capture_output=True, timeout=300, env=ENV)
    cut = _yaml(tmp_path, tiny_model_dir, data, "cut", steps=4, save=1)
    kill_after = random.Random().randint(1, 2)
    ckpts = tmp_path / "runs" / "cut" / "checkpoints"
    kill_at_checkpoint(_cli("train", str(cut)), ckpts, kill_after, ENV)
    out = subprocess.run(_cli("train", str(cut), "--resume"), capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = adapter(tmp_path / "runs" / "whole"), adapter(tmp_path / "runs" / "cut")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    # the sampled answers recorded: the resumed run logs again what the checkpoint had not seen
    assert [json.loads(x)["samples"] for x in (tmp_path / "runs" / "cut" / "rollouts.jsonl").read_text().splitlines()] \
        == [json.loads(x)["samples"] for x in (tmp_path / "runs" / "whole" / "rollouts.jsonl").read_text().splitlines()]


def test_the_kl_term_is_zero_while_the_policy_is_the_base_and_grows_after(tmp_path, tiny_model_dir, data):
    from lorakit import config
    from lorakit.pipeline import train

    cfg = config.load(_yaml(tmp_path, tiny_model_dir, data, "kl"))
    cfg.grpo.beta = 0.04
    run = train(cfg, progress=False, log=lambda *_: None)
    kl = [r["kl"] for r in records(run) if "loss" in r]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # a new adapter starts at zero: the policy is the reference
    assert kl[-1] > 0  # after two updates (lr 1e-2) it has moved away, and the k3 estimate is positive


def test_prompt_rows_keep_their_columns_and_a_reference_for_eval(tmp_path, tiny_model_dir, tiny_tokenizer):
    from lorakit import config
    from lorakit.data.preference import answers
    from lorakit.data.prompts import WHERE, prepare_prompts
    from lorakit.errors import DataError

    rows = [{"instruction": "Extract the order number.", "input": "Order #555 is late.", "output": "#555",
             "schema": "order"},
            {"prompt": "Say hi.", "tag": 3},
            {"prompt": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]}] * 2
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = config.from_dict({"model": {"name": str(tiny_model_dir)}, "train": {"method": "grpo"},
                            "grpo": {"rewards": [{"name": "exact_match"}]},
                            "data": {"train": [str(f)], "template": "alpaca", "val_fraction": 0.5}})
    p = prepare_prompts(cfg, tiny_tokenizer)
    cols = [it["columns"] for it in p.train + p.validation]
    assert {"reference": "#555", "schema": "order"}.items() <= next(c for c in cols if "schema" in c).items()
    assert all(c[WHERE].startswith(str(f)) for c in cols)
    assert next(c for c in cols if "tag" in c).get("reference") is None  # no answer in that row
    items, examples, _ = answers(p, "validation")  # rows with an answer, SFT-encoded for eval's loss
    assert all(ex["messages"][-1]["role"] == "assistant" for ex in examples)
    assert all(len(it["input_ids"]) == len(it["labels"]) for it in items)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt"}])
    cfg.data.train = [str(bad)]
    with pytest.raises(DataError) as e:
        prepare_prompts(cfg, tiny_tokenizer)
    assert f"{bad} line 1" in str(e.value) and "instruction" in e.value.hint


def test_diagnostics_name_the_known_grpo_failures():
    from types import SimpleNamespace

    from lorakit import config
    from lorakit.train.diagnostics import Diagnostics, Health

    cfg = config.from_dict({"data": {"train": ["x.jsonl"]}, "train": {"method": "grpo"},
                            "grpo": {"rewards": [{"name": "exact_match"}]}})
    seen = []
    diag = Diagnostics(cfg, Health(), lambda message, kind=None, step=None: seen.append(kind))
    for step in range(1, 7):  # loss near 0 is normal for GRPO: no "flat loss" warning from it
        diag.on_log(None, SimpleNamespace(global_step=step), None,
                    logs={"loss": 0.0, "reward": 0.5, "zero_spread_groups": 1.0, "truncated": 0.75, "kl": 2.0})
    assert seen == ["truncated", "kl_high", "zero_spread", "reward_flat"]


def test_rollouts_sample_the_adapter_being_trained(tiny_model_dir, tiny_tokenizer):
    """The rollouts run the live adapter through the decoder's LoRA stacks: the same completions,
    seed for seed, as the decoder running PEFT's own forward on the same model, and not the base's."""
    import contextlib
    from types import SimpleNamespace

    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.config.grpo import GrpoConfig
    from lorakit.data.templates import ALPACA, Template
    from lorakit.infer.decoder import Decoder, Request
    from lorakit.infer.sampling import Sampling
    from lorakit.train.grpo import SEED_STRIDE, GrpoTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g)  # a trained adapter: it changes the answers
    settings = GrpoConfig(prompts_per_step=2, generations=3, max_completion_tokens=6, temperature=1.0,
                          rewards=[{"name": "json_valid"}])
    template = Template(name="alpaca", source=ALPACA, eos_token=tiny_tokenizer.eos_token, bos_token="")
    fake = SimpleNamespace(settings=settings, processing_class=tiny_tokenizer, template=template, model=model,
                           args=SimpleNamespace(seed=7), accelerator=SimpleNamespace(autocast=contextlib.nullcontext),
                           _half_head=lambda: None)
    prompts = [{"prompt_ids": [5, 9, 14, 3]}, {"prompt_ids": [2, 8, 8]}]
    got = [d["completion_ids"] for d in GrpoTrainer.rollouts(fake, prompts, 2)]

    def decoded(adapter_on: bool) -> list[list[int]]:
        reqs = [Request(p["prompt_ids"], 6, Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0),
                        tuple(template.stop_token_ids(tiny_tokenizer)), seed=7 + 2 * SEED_STRIDE + 3 * i + k)
                for i, p in enumerate(prompts) for k in range(3)]
        with contextlib.ExitStack() as stack:
            if not adapter_on:
                stack.enter_context(model.disable_adapter())
            d = stack.enter_context(Decoder(model, tiny_tokenizer, stacked=False))
            return [r.generated for r in d.run(reqs)]

    assert got == decoded(True)
    assert got != decoded(False)


def test_repeated_batches_give_every_batch_its_updates_whole():
    from lorakit.train.grpo import RepeatedBatches

    sampler = RepeatedBatches(5, 2, 3, seed=11)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(11)).tolist()  # accelerate's, epoch 0
    got = list(sampler)
    a, b, c, d, e = order
    assert got == [a, b] * 3 + [c, d] * 3 + [e, a] * 3  # the short last batch filled from the epoch's start
    assert len(sampler) == len(got) and list(sampler) == got  # the same order again (a resumed run skips in it)
    sampler.set_epoch(1)
    assert list(sampler) != got


def test_several_updates_per_batch_learn_from_the_old_policy_and_resume_exactly(tmp_path, tiny_model_dir, data):
    """updates_per_batch 2: the first update of a batch is the plain policy gradient (the one-update
    run's first step, exactly); the second reuses the rollouts and their old log-probs, so its ratio
    moves off 1 and the clip engages; a checkpoint between batches resumes exactly."""
    from lorakit import config
    from lorakit.errors import ConfigError
    from lorakit.pipeline import train

    def cfg(name, steps, updates):
        c = config.load(_yaml(tmp_path, tiny_model_dir, data, name, steps=steps))
        c.grpo.updates_per_batch = updates
        c.grpo.epsilon = 0.01  # a narrow clip: lr 1e-2 moves the ratio past it within one update
        c.train.warmup = 0  # (a warmup step would run at lr 0 and change nothing)
        return c

    one = train(cfg("one", 1, 1), progress=False, log=lambda *_: None)
    two = train(cfg("two", 1, 2), progress=False, log=lambda *_: None)
    a, b = adapter(one), adapter(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # the step did learn

    whole = _yaml(tmp_path, tiny_model_dir, data, "whole2", steps=4, save=2)
    text = whole.read_text().replace("temperature: 1.0,", "temperature: 1.0, updates_per_batch: 2, epsilon: 0.01,")
    text = text.replace("seed: 5}", "seed: 5, warmup: 0}")
    whole.write_text(text)
    subprocess.run(_cli("train", str(whole)), check=True, capture_output=True, timeout=300, env=ENV)
    recs = [r for r in records(tmp_path / "runs" / "whole2") if "loss" in r]
    assert ["reward" in r for r in recs] == [True, False, True, False]  # rollouts at steps 1 and 3 only
    assert [r["clip_ratio"] == 0 for r in recs] == [True, False, True, False]  # ratio 1 exactly, then clipped
    kept = (tmp_path / "runs" / "whole2" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in kept] == [1, 3]  # the first batch and the last

    cut = tmp_path / "cut2.yaml"
    cut.write_text(text.replace("name: whole2", "name: cut2"))
    kill_at_checkpoint(_cli("train", str(cut)), tmp_path / "runs" / "cut2" / "checkpoints", 2, ENV)
    out = subprocess.run(_cli("train", str(cut), "--resume"), capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = adapter(tmp_path / "runs" / "whole2"), adapter(tmp_path / "runs" / "cut2")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k

    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("save_steps: 2", "save_steps: 3"))
    with pytest.raises(ConfigError, match="train.save_steps: 3 is not a multiple of grpo.updates_per_batch"):
        config.load(bad)


def test_continuing_an_adapter_the_kl_reference_is_that_adapter(tmp_path, tiny_model_dir, data):
    """model.adapter with grpo.beta: the reference is the continued adapter as the run starts, not the
    base. KL 0 at step 1 (the base would be far: the SFT adapter moved it), then positive once the
    policy has moved (a reference that followed the policy would stay 0), under bf16 autocast, whose
    cache of 16-bit weights is keyed by parameter."""
    from lorakit import config
    from lorakit.pipeline import train

    sft = tmp_path / "sft.yaml"
    sft.write_text(f"model: {{name: {tiny_model_dir}}}\n"
                   f"data: {{train: {data}, template: alpaca, max_length: 128, val_fraction: 0}}\n"
                   "lora: {r: 4, alpha: 8}\ntrain: {max_steps: 3, lr: 5.0e-2, warmup: 0, save_steps: 0, "
                   "report_to: []}\n"
                   f"output: {{dir: {tmp_path / 'runs'}, name: sft}}\n", encoding="utf-8")
    start = train(config.load(sft), progress=False, log=lambda *_: None)
    cfg = config.load(_yaml(tmp_path, tiny_model_dir, data, "kl_adapter"))
    cfg.model.adapter, cfg.grpo.beta, cfg.train.warmup = str(start), 0.04, 0
    cfg.train.mixed_precision = "bf16"
    kl = [r["kl"] for r in records(train(cfg, progress=False, log=lambda *_: None)) if "loss" in r]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4
