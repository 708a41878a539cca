"""`lorakit pairs` on a real (tiny) run folder: pairs are eval's wrong answers, repeatable, and read
back into the same prompt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ALPACA_ROWS, write_jsonl
from test_train import tiny_config

from lorakit import metrics as M
from lorakit.artifacts import PEFT_WEIGHTS, RunPaths, read_jsonl
from lorakit.cli import main
from lorakit.config import EvalConfig, PairsConfig
from lorakit.evaluate import evaluate_run, split_reference
from lorakit.infer import load_session
from lorakit.pairs import judge, make_pairs, prompt_fields

ROOT = Path(__file__).resolve().parents[1]
ROWS = ALPACA_ROWS[:4]
quiet = lambda s: None  # noqa: E731


def _noisy(adapter_dir: Path, seed: int = 3) -> None:
    """Replace the LoRA weights with seeded noise: the tiny run learns to stop at once, and empty
    answers are skipped, so trained weights would leave nothing to pair."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter_dir / PEFT_WEIGHTS)
    g = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(v.shape, generator=g) * 0.5 for k, v in weights.items()}, adapter_dir / PEFT_WEIGHTS)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    from lorakit.train.run import train

    tmp = tmp_path_factory.mktemp("pairs")
    data = write_jsonl(tmp / "data.jsonl", ALPACA_ROWS)
    test = write_jsonl(tmp / "held.jsonl", ROWS)
    cfg = tiny_config(tmp, tiny_model_dir, data, f"--data.test={test}", "--train.max_steps=1", "--train.eval_steps=0")
    run_dir = train(cfg, log=quiet, progress=False)
    _noisy(run_dir / "adapter")
    return run_dir


@pytest.fixture(scope="module")
def session(run):
    return load_session(run, log=quiet)


def _eval(run, session, **kw) -> list[dict]:
    (summary,) = evaluate_run(run, EvalConfig(**kw), session=session, log=quiet)
    return read_jsonl(RunPaths(run).eval_records(summary.data))


def _pairs(run, session, out: Path, **kw):
    result = make_pairs(run, PairsConfig(out=str(out), **kw), session=session, log=quiet)
    return result, read_jsonl(out)


def _source_row(pair: dict) -> tuple[str, dict]:
    """The file a pair's `lorakit.where` names, and the row on that line."""
    name, line = pair["lorakit"]["where"].rsplit(" line ", 1)
    return name, json.loads(Path(name).read_text(encoding="utf-8").splitlines()[int(line) - 1])


# --------------------------------------------------------------------------- pairs are eval's mistakes


def test_validation_pairs_are_the_wrong_answers_eval_records(run, session, tmp_path):
    records = _eval(run, session)  # the defaults on both sides: validation split, eval's length rule
    result, pairs = _pairs(run, session, tmp_path / "p.jsonl")
    wrong = [r for r in records if not M.exact_match(r["answers"]["tuned"], r["reference"])]
    assert wrong and all(r["answers"]["tuned"].strip() for r in wrong)  # noise answers: long, never empty
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(r["reference"], r["answers"]["tuned"]) for r in wrong]
    assert (result.examples, result.wrong, result.pairs) == (len(records), len(wrong), len(wrong))
    for p in pairs:  # the validation split is drawn from data.train: `where` names its file and line
        assert p["lorakit"]["metric"] == "exact_match" and p["lorakit"]["score"] == 0.0
        name, row = _source_row(p)
        assert name == str(run.parent.parent / "data.jsonl")
        assert (row["output"], row["input"]) == (p["chosen"], p["input"])


def test_right_answers_give_no_pair(run, session, tmp_path):
    # References made of the adapter's own greedy answers for rows 0 and 2: those are right.
    first = _eval(run, session, data=[str(write_jsonl(tmp_path / "rows.jsonl", ROWS))], max_new_tokens=8)
    mixed = [{**row, "output": first[i]["answers"]["tuned"]} if i in (0, 2) else row for i, row in enumerate(ROWS)]
    data = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    records = _eval(run, session, data=[str(data)], max_new_tokens=8)
    result, pairs = _pairs(run, session, tmp_path / "p.jsonl", data=[str(data)], max_new_tokens=8)
    assert [M.exact_match(r["answers"]["tuned"], r["reference"]) for r in records] == [True, False, True, False]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(r["reference"], r["answers"]["tuned"])
                                                              for r in (records[1], records[3])]
    assert (result.examples, result.wrong, result.pairs, sum(result.skipped.values())) == (4, 2, 2, 0)
    assert [_source_row(p) for p in pairs] == [(str(data), mixed[1]), (str(data), mixed[3])]


def test_sampled_pairs_are_repeatable_and_independent_of_the_batch_size(run, session, tmp_path):
    data = str(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    settings = dict(data=[data], samples=2, seed=7, temperature=1.0, max_new_tokens=8)
    result, pairs = _pairs(run, session, tmp_path / "a.jsonl", **settings)
    _pairs(run, session, tmp_path / "b.jsonl", **settings, batch_size=1)
    _pairs(run, session, tmp_path / "c.jsonl", **{**settings, "seed": 8})
    text = (tmp_path / "a.jsonl").read_bytes()
    assert text == (tmp_path / "b.jsonl").read_bytes() and text != (tmp_path / "c.jsonl").read_bytes()
    assert result.sampled == 8 and {p["lorakit"]["answer"] for p in pairs} >= {"greedy", "sample 1"}
    assert result.pairs == len(pairs) == 12 - result.skipped["repeats an answer already paired"]
    for row in ROWS:  # every pair of a row is a distinct answer
        mine = [M.normalize(p["rejected"]) for p in pairs if p["instruction"] == row["instruction"]]
        assert len(mine) == len(set(mine))


# --------------------------------------------------------------------------- rows read back as the same prompt


def _rendered(session, messages: list[dict]) -> str:
    return session.template.render(messages, add_generation_prompt=True)


def test_pairs_render_the_prompt_eval_answered(run, session, tmp_path):
    from lorakit.data.formats import to_example

    alpaca = [{**ROWS[0], "system": "Answer in one line."}, ROWS[1]]  # a system key, an empty input
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello world!"}, {"role": "user", "content": "Again?"},
                          {"role": "assistant", "content": "Category: shipping"}]}]
    for name, rows, fmt in (("alpaca", alpaca, "alpaca"), ("chat", chat, "messages")):
        data = str(write_jsonl(tmp_path / f"{name}.jsonl", rows))
        records = _eval(run, session, data=[data], max_new_tokens=8)
        _, pairs = _pairs(run, session, tmp_path / f"{name}.pairs.jsonl", data=[data], max_new_tokens=8)
        assert len(pairs) == len(records)  # every noise answer is wrong
        for p, r in zip(pairs, records):
            back = {k: v for k, v in p.items() if k not in ("chosen", "rejected", "lorakit")}
            if fmt == "alpaca":
                assert set(back) == ({"instruction", "input", "system"} if r["prompt"][0]["role"] == "system"
                                     else {"instruction", "input"})
                example = to_example({**back, "output": p["chosen"]}, "alpaca", "pair")
            else:
                assert set(back) == {"prompt"}
                example = to_example({"messages": back["prompt"] + [{"role": "assistant", "content": p["chosen"]}]},
                                     "messages", "pair")
            prompt, reference = split_reference(example)
            assert reference == r["reference"]
            assert _rendered(session, prompt) == _rendered(session, r["prompt"])
            assert session.template.encode_prompt(session.tokenizer, prompt) == \
                session.template.encode_prompt(session.tokenizer, r["prompt"])


def test_prompt_fields_pick_the_form_of_the_source_row():
    user = {"role": "user", "content": "Classify.", "input": "Where is my order?"}
    assert prompt_fields([user]) == {"instruction": "Classify.", "input": "Where is my order?"}
    assert prompt_fields([{"role": "system", "content": "S"}, user]) == \
        {"instruction": "Classify.", "input": "Where is my order?", "system": "S"}
    plain = [{"role": "user", "content": "Hi"}]
    assert prompt_fields(plain) == {"prompt": plain}


def test_each_metric_says_what_is_wrong():
    assert judge("exact_match", " shipping.", "Shipping") == (False, 1.0)
    assert judge("exact_match", "billing", "Shipping") == (True, 0.0)
    assert judge("json_fields", '{"a": 1, "b": 3}', '{"a": 1, "b": 2}') == (True, 0.5)
    assert judge("json_fields", '```json\n{"b": 2, "a": 1}\n```', '{"a": 1, "b": 2}') == (False, 1.0)
    assert judge("rouge_l", "a b", "a b c d", 0.7) == (True, pytest.approx(2 / 3))  # LCS F1 = 2·2 / (2 + 4)
    assert judge("rouge_l", "a b", "a b c d", 2 / 3) == (False, pytest.approx(2 / 3))  # at the threshold: right


# --------------------------------------------------------------------------- the command


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}


def test_the_command_as_typed_writes_pairs_and_names_the_next_one(run, tmp_path):
    cmd = [sys.executable, "-m", "lorakit", "pairs", str(run), "--out", "x.jsonl", "--max-new-tokens", "8"]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    pairs = read_jsonl(tmp_path / "x.jsonl")
    assert pairs and f"pairs written: {len(pairs)} -> x.jsonl" in done.stdout
    assert f"next: lorakit train dpo.yaml --model.adapter {run} --data.train x.jsonl" in done.stdout
    bad = subprocess.run([*cmd[:5], "--out", "nowhere/x.jsonl"], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: --out nowhere/x.jsonl: the folder nowhere does not exist\n")


def _copy_with(run: Path, dst: Path, **data) -> Path:
    """The run folder with its config.yaml's data section changed (a run trained differently)."""
    shutil.copytree(run / "adapter", dst / "adapter")
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"].update(data)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return dst


@pytest.mark.parametrize("case", ["no run", "no adapter", "no --out", "no --out folder", "bad --samples",
                                  "no test split", "no validation split", "json on text"])
def test_mistakes_are_one_error_naming_the_flag(case, run, tmp_path, capsys):
    out = ["--out", str(tmp_path / "p.jsonl")]
    argv = {
        "no run": lambda: [str(tmp_path / "nope"), *out],
        "no adapter": lambda: [str(tmp_path), *out],
        "no --out": lambda: [str(run)],
        "no --out folder": lambda: [str(run), "--out", str(tmp_path / "missing" / "p.jsonl")],
        "bad --samples": lambda: [str(run), *out, "--samples", "-1"],
        "no test split": lambda: [str(_copy_with(run, tmp_path / "r", test=[])), "--split", "test", *out],
        "no validation split": lambda: [str(_copy_with(run, tmp_path / "r", val_fraction=0)), *out],
        "json on text": lambda: [str(run), "--metric", "json_fields", *out],
    }[case]()
    assert main(["pairs", *argv]) == 2
    err = capsys.readouterr().err
    head = err.splitlines()[0]
    expected = {"no run": "no such folder", "no adapter": "holds no adapter", "no --out": "--out FILE",
                "no --out folder": "--out", "bad --samples": "--samples", "no test split": "--split test",
                "no validation split": "--split validation", "json on text": "--metric json_fields"}[case]
    assert head.startswith("error: ") and expected in err and "Traceback" not in err
    assert len(err.splitlines()) <= 2  # the error and its fix
    assert not (tmp_path / "p.jsonl").exists()


def test_a_metric_pairs_does_not_know_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pairs", "runs/a", "--out", "p.jsonl", "--metric", "bleu"])
    assert e.value.code == 2
    assert "argument --metric: invalid choice: 'bleu'" in capsys.readouterr().err


def test_the_pairs_section_of_a_file_works_like_the_flags(tmp_path):
    from lorakit import cli

    f = tmp_path / "pairs.yaml"
    f.write_text("pairs:\n  out: mine.jsonl\n  metric: rouge_l\n  samples: 2\ndata:\n  train: t.jsonl\n",
                 encoding="utf-8")
    argv = ["pairs", "runs/a", "--config", str(f), "--threshold", "0.3"]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    s = cli._settings(args, PairsConfig)
    assert s == PairsConfig(out="mine.jsonl", metric="rouge_l", samples=2, threshold=0.3)
