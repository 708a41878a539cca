"""A reward as the measure of an evaluation (eval_reward): what the generation probe scores with
grpo.rewards, what a GRPO run evaluates by, and what a sweep or train.best_by can choose by; and a
sweep trial that `lorakit plan` says will not fit is skipped before it trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ALPACA_ROWS, tiny_config
from lorakit import config
from lorakit import metrics as M
from lorakit.errors import ConfigError

CHARS = '''
def chars(prompt, completion, finished, reference=None):
    """The answer's length; the prompt must be the rendered one and `finished` a bool."""
    assert prompt.rstrip().endswith("### Response:") and isinstance(finished, bool)
    return len(completion)
'''


def test_the_probe_scores_answers_with_the_rewards(tiny_model_dir, tiny_tokenizer, tmp_path):
    from lorakit.config import ModelConfig
    from lorakit.config.grpo import RewardConfig
    from lorakit.data.templates import resolve_template
    from lorakit.evaluate import GenerationProbe
    from lorakit.model.load import load_model
    from lorakit.rewards import load_rewards

    (tmp_path / "r.py").write_text(CHARS, encoding="utf-8")
    chars = RewardConfig(f"{tmp_path / 'r.py'}:chars", weight=0.5)
    examples = [{"messages": [{"role": "user", "content": r["instruction"], "input": r["input"]},
                              {"role": "assistant", "content": r["output"]}]} for r in ALPACA_ROWS[:3]]
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir)), training=False)
    template = resolve_template("alpaca", tiny_tokenizer, None)
    # row 1's reference becomes the model's own greedy answer, so exact match is right on one row
    plain = GenerationProbe(tiny_tokenizer, template, examples, max_new_tokens=12)
    assert "eval_reward" not in plain(model)
    examples[1]["messages"][1]["content"] = plain.last_answers[1]
    refs = [ex["messages"][1]["content"] for ex in examples]

    probe = GenerationProbe(tiny_tokenizer, template, examples, max_new_tokens=12,
                            rewards=load_rewards([RewardConfig("exact_match"), chars]))
    scores = probe(model)
    answers = probe.last_answers
    assert answers == plain.last_answers[:1] + [refs[1]] + plain.last_answers[2:]
    assert scores["eval_exact_match"] == pytest.approx(M.aggregate(answers, refs)["exact_match"], abs=1e-4)
    assert scores["eval_exact_match"] >= 1 / 3 - 1e-4
    expected = [float(M.exact_match(a, r)) + 0.5 * len(a) for a, r in zip(answers, refs)]
    assert scores["eval_reward"] == pytest.approx(sum(expected) / 3, abs=1e-4)

    # a row with nothing to compare against is answered for the rewards only
    prompt_only = {"messages": [{"role": "user", "content": "Say hello."}]}
    probe = GenerationProbe(tiny_tokenizer, template, examples + [prompt_only], max_new_tokens=12,
                            rewards=load_rewards([chars]))
    scores = probe(model)
    assert len(probe.last_answers) == 4 and probe.last_answers[:3] == answers
    assert scores["eval_exact_match"] == pytest.approx(M.aggregate(answers, refs)["exact_match"], abs=1e-4)
    assert scores["eval_reward"] == pytest.approx(sum(0.5 * len(a) for a in probe.last_answers) / 4, abs=1e-4)
    without = GenerationProbe(tiny_tokenizer, template, examples + [prompt_only], max_new_tokens=12)
    without(model)
    assert len(without.last_answers) == 3


def test_a_reward_objective_needs_rewards_and_a_grpo_run_has_no_eval_loss(tmp_path, tiny_model_dir):
    from lorakit.sweep.run import prepare, settings

    with pytest.raises(ConfigError) as e:
        config.from_dict(tiny_config(tmp_path, tiny_model_dir, "r", train={"best_by": "reward", "eval_generate_rows": 4}))
    assert "train.best_by: 'reward' scores answers with grpo.rewards, and there are none" in str(e.value)
    grpo = {"method": "grpo", "eval_generate_rows": 4}
    with pytest.raises(ConfigError) as e:
        config.from_dict(tiny_config(tmp_path, tiny_model_dir, "g", train={**grpo, "best_by": "eval_loss"},
                              grpo={"rewards": [{"name": "exact_match"}]}))
    assert "train.best_by: a GRPO run has no validation loss; choose by 'reward'" in str(e.value)
    space = {"space": {"train.lr": [1e-3, 1e-2]}}
    for sections, wanted in (({"sweep": {**space, "objective": "reward"}}, "sweep.objective: 'reward' scores answers"),
                             ({"sweep": space, "train": grpo, "grpo": {"rewards": [{"name": "exact_match"}]}},
                              "sweep.objective: a GRPO trial has no validation loss")):
        cfg = config.from_dict(tiny_config(tmp_path, tiny_model_dir, "s", **sections))
        with pytest.raises(ConfigError) as e:
            prepare(tmp_path / "s.yaml", [], settings(cfg), cfg, print)
        assert wanted in str(e.value)


def test_a_sweep_of_grpo_trials_is_judged_by_the_reward_and_keeps_the_best(tmp_path, tiny_model_dir):
    """Each GRPO trial evaluates by the probe alone (no validation loss); its objective is the last
    eval_reward in its metrics, and train.best_by reward keeps the best evaluation's adapter."""
    from lorakit.artifacts import RunPaths
    from lorakit.sweep import sweep

    (tmp_path / "r.py").write_text("def longer(prompt, completion):\n    return len(completion) / (1 + len(completion))\n",
                                   encoding="utf-8")
    raw = tiny_config(tmp_path, tiny_model_dir, "rl", train={"method": "grpo", "best_by": "reward", "eval_generate_rows": 3},
               grpo={"prompts_per_step": 2, "generations": 2, "max_completion_tokens": 6, "temperature": 1.0,
                     "rewards": [{"name": f"{tmp_path / 'r.py'}:longer"}, {"name": "exact_match", "weight": 2.0}]},
               sweep={"objective": "reward", "space": {"train.lr": [1e-3, 3e-2]}, "trials": 2, "sampler": "grid",
                      "pruner": "none", "reports": 2, "eval_rows": 3})
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    folder = sweep(path, log=lambda *_: None).root
    rows = json.loads((folder / "trials.json").read_text(encoding="utf-8"))
    assert [r["state"] for r in rows] == ["complete", "complete"]
    for r in rows:
        run = RunPaths(Path(r["run"]))
        evals = [rec for rec in map(json.loads, run.metrics.read_text().splitlines()) if "eval_reward" in rec]
        assert [rec["step"] for rec in evals] == [2, 4] and not any("eval_loss" in rec for rec in evals)
        assert r["value"] == pytest.approx(evals[-1]["eval_reward"])
        best = json.loads(run.best_record.read_text(encoding="utf-8"))
        assert best["metric"] == "reward" and best["value"] == pytest.approx(max(e["eval_reward"] for e in evals))
        page = run.report.read_text(encoding="utf-8")  # the evaluations are charted, though no eval_loss came
        assert 'id="chart-eval-metrics"' in page and ">reward<" in page.split('id="chart-eval-metrics"')[1]


def test_a_trial_plan_says_will_not_fit_is_skipped_with_the_reason(tmp_path, tiny_model_dir):
    from lorakit.sweep import sweep

    raw = tiny_config(tmp_path, tiny_model_dir, "big", sweep={"space": {"lora.r": [2, 4]}, "trials": 2, "sampler": "grid",
                                                       "pruner": "none", "reports": 1, "memory_gb": 0.001})
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    said: list[str] = []
    folder = sweep(path, log=said.append).root
    rows = json.loads((folder / "trials.json").read_text(encoding="utf-8"))
    assert [r["state"] for r in rows] == ["skipped", "skipped"]
    for r in rows:
        assert r["error"].startswith("lorakit plan estimates a peak of ") and "; sweep.memory_gb is " in r["error"]
        assert not Path(r["run"]).exists()  # nothing was trained, no folder was made
    assert sum("skipped: lorakit plan estimates" in s for s in said) >= 2
    assert "2 skipped (too big for memory)" in (folder / "report.html").read_text(encoding="utf-8")
