"""`lorakit eval` and `lorakit runs` on a real (tiny) trained run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ALPACA_ROWS, write_jsonl
from test_train import tiny_config

from lorakit import metrics as M
from lorakit.artifacts import EvalSummary, RunPaths, read_jsonl, read_meta
from lorakit.cli import main
from lorakit.config import EvalConfig
from lorakit.evaluate import answer, eval_sets, evaluate_run, held_out_loss, split_reference
from lorakit.infer import load_session
from lorakit.runs import format_runs, list_runs

JSON_ROWS = [{"instruction": "Extract the order as JSON.", "input": f"Order #{n} for {n % 3} items.",
              "output": json.dumps({"order": n, "items": n % 3})} for n in (101, 202, 303)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    from lorakit.pipeline import train

    tmp = tmp_path_factory.mktemp("eval")
    data = write_jsonl(tmp / "data.jsonl", ALPACA_ROWS)
    test = write_jsonl(tmp / "held.jsonl", ALPACA_ROWS[:3])
    cfg = tiny_config(tmp, tiny_model_dir, data, f"--data.test={test}", "--train.eval_batch_size=16",
                      "--train.eval_generate_rows=2")
    return train(cfg, log=lambda s: None, progress=False), tmp


@pytest.fixture(scope="module")
def session(run):
    return load_session(run[0], log=lambda s: None)


def test_eval_loss_is_the_trainers_eval_loss(run, session):
    # Same validation split, same loss code; eval_batch_size 16 holds the whole split in one batch,
    # so the Trainer's mean of batch means is also the token-weighted mean. fp32 on both sides:
    # only summation order may differ (relative 1e-6 is ~10 float32 ulps).
    (s,) = eval_sets(RunPaths(run[0]), session)
    assert held_out_loss(session, s.items) == pytest.approx(read_meta(run[0] / "adapter").metrics["eval_loss"],
                                                            rel=1e-6)


def test_base_loss_equals_a_plain_model_from_disk(run, session, tiny_model_dir):
    # Independent reference: transformers' own logits for the base, cross-entropy at labelled positions.
    from transformers import AutoModelForCausalLM

    (s,) = eval_sets(RunPaths(run[0]), session)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    total = count = 0
    with torch.no_grad():
        for it in s.items:
            ids, labels = torch.tensor([it["input_ids"]]), torch.tensor(it["labels"][1:])
            logits = plain(input_ids=ids).logits[0, :-1]
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    base = held_out_loss(session, s.items, use_adapter=False, batch_size=2)  # padded batches of 2
    assert base == pytest.approx(total / count, rel=1e-5)  # padding changes float order, not the value
    assert base != pytest.approx(held_out_loss(session, s.items), rel=1e-3)  # the adapter is on otherwise


def test_batched_answers_equal_one_at_a_time(tiny_model_dir, tiny_tokenizer, tmp_path):
    # A random adapter (the trained tiny run learned to stop at once: empty answers prove nothing).
    from conftest import make_adapter

    noisy = load_session(make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "noisy", 3), log=lambda s: None)
    prompts = [split_reference(ex)[0] for ex in
               [{"messages": [{"role": "user", "content": r["instruction"], "input": r["input"]},
                              {"role": "assistant", "content": r["output"]}]} for r in ALPACA_ROWS[:4]]]
    batched = answer(noisy, prompts, max_new_tokens=12, batch_size=8)
    alone = answer(noisy, prompts, max_new_tokens=12, batch_size=1)
    assert batched == alone and all(batched) and len(set(batched)) > 1


def test_eval_writes_records_and_a_summary_with_base_beside_tuned(run, session):
    (summary,) = evaluate_run(run[0], EvalConfig(split="test", base=True, max_new_tokens=8), session=session, log=lambda s: None)
    paths = RunPaths(run[0])
    assert summary.models == ["tuned", "base"] and summary.count == 3
    assert EvalSummary.read(paths.eval_summary("test")) == summary
    records = read_jsonl(paths.eval_records("test"))
    assert [r["reference"] for r in records] == [r["output"] for r in ALPACA_ROWS[:3]]
    for model in ("tuned", "base"):
        answers = [r["answers"][model] for r in records]
        refs = [r["reference"] for r in records]
        assert summary.scores[model]["exact_match"] == M.aggregate(answers, refs)["exact_match"]
        assert [r["scores"][model] for r in records] == [M.score(a, b) for a, b in zip(answers, refs)]
    assert summary.loss["tuned"] != summary.loss["base"]
    assert "json_valid" not in summary.scores["tuned"]  # plain-text references


def test_json_references_switch_on_field_accuracy(run, session, tmp_path):
    data = write_jsonl(tmp_path / "orders.jsonl", JSON_ROWS)
    (summary,) = evaluate_run(run[0], EvalConfig(data=[str(data)], max_new_tokens=8), session=session, log=lambda s: None)
    assert summary.data == "orders"
    records = read_jsonl(RunPaths(run[0]).eval_records("orders"))
    answers = [r["answers"]["tuned"] for r in records]
    expected = M.aggregate(answers, [r["output"] for r in JSON_ROWS])
    assert summary.scores["tuned"]["json_valid"] == expected["json_valid"]
    assert summary.scores["tuned"]["json_field_accuracy"] == expected["json_field_accuracy"]


def test_eval_cli(run, tmp_path, capsys):
    assert main(["eval", str(run[0]), "--max-new-tokens", "4", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "eval 'validation' (2 examples" in out and "perplexity" in out and "ROUGE-L" in out
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_missing_test_split_names_the_config_key(tmp_path, tiny_model_dir, capsys):
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    run_dir = train(tiny_config(tmp_path, tiny_model_dir, data, "--train.max_steps=1", "--train.eval_steps=0"),
                    log=lambda s: None, progress=False)
    assert main(["eval", str(run_dir), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "no data.test" in err and "config.yaml" in err and "--data FILE" in err


def test_runs_lists_done_and_unfinished_runs_newest_first(run, tmp_path):
    import os
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(run[0], root / "finished")
    (root / "killed").mkdir()
    shutil.copy(run[0] / "metrics.jsonl", root / "killed" / "metrics.jsonl")
    shutil.copy(run[0] / "config.yaml", root / "killed" / "config.yaml")
    (root / "not-a-run").mkdir()
    os.utime(root / "finished" / "adapter" / "lorakit.json", (1e9, 1e9))  # older than 'killed'
    rows = list_runs(root)
    assert [r.name for r in rows] == ["killed", "finished"]
    done = rows[1]
    meta = read_meta(run[0] / "adapter")
    assert (done.state, done.steps, done.eval_loss) == ("done", meta.metrics["steps"], meta.metrics["eval_loss"])
    assert (done.state, done.template, done.method) == ("done", meta.template.name, meta.train.method)
    assert rows[0].state == "interrupted" and rows[0].steps == meta.metrics["steps"]
    text = format_runs(rows)
    assert text.splitlines()[1].startswith("killed [interrupted]") and "alpaca" in text
    # a training holds the run's lock (its `lorakit train` process: here this test) -> running;
    # an ending diagnostic with no adapter -> failed
    from lorakit.artifacts import RunPaths, append_jsonl, lock

    with lock.hold(RunPaths(root / "killed").writing):
        assert list_runs(root)[0].state == "running"
        assert format_runs(list_runs(root)).splitlines()[1].startswith("killed [running]")
    append_jsonl(RunPaths(root / "killed").diagnostics, {"kind": "nonfinite", "message": "loss is NaN", "step": 1})
    assert list_runs(root)[0].state == "failed"


def test_generation_probe_answers_with_the_training_model_as_eval_does(tiny_model_dir, tiny_tokenizer, tmp_path):
    # The model being trained (PEFT 'default' adapter, fast path on: per-example attention, fast
    # dropouts) must answer exactly as the saved adapter does in a fresh session (fp32 both sides),
    # and must be back in training mode afterwards.
    from conftest import make_adapter
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lorakit.config import LoraConfig, ModelConfig
    from lorakit.evaluate import GenerationProbe
    from lorakit.model.load import load_model
    from lorakit.model.lora import apply_lora
    from lorakit.train import speed

    saved = make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "a", 5)
    reference = load_session(saved, log=lambda s: None)
    examples = [{"messages": [{"role": "user", "content": r["instruction"], "input": r["input"]},
                              {"role": "assistant", "content": r["output"]}]} for r in ALPACA_ROWS[:3]]
    expected = answer(reference, [split_reference(ex)[0] for ex in examples], max_new_tokens=32)

    model, _ = load_model(ModelConfig(name=str(tiny_model_dir)), training=True)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    set_peft_model_state_dict(model, load_file(saved / "adapter" / "adapter_model.safetensors"))
    assert speed.apply(model, None, packing=True)["segments"]
    model.train()
    probe = GenerationProbe(tiny_tokenizer, reference.template, examples, max_new_tokens=32)
    scores = probe(model)
    assert model.training
    assert probe.last_answers == expected and all(expected)
    assert scores["eval_exact_match"] == M.aggregate(expected, [r["output"] for r in ALPACA_ROWS[:3]])["exact_match"]


def test_generation_scores_are_logged_with_every_evaluation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evals = [r for r in read_jsonl(run[0] / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) >= 2 and all({"eval_exact_match", "eval_rouge_l", "eval_bleu"} <= set(r) for r in evals)
    (events,) = (run[0] / "logs").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"eval/exact_match", "eval/rouge_l", "eval/bleu"} <= set(acc.Tags()["scalars"])
