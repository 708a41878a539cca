"""Export's task-level check: the run's held-out rows answered by llama.cpp (GGUF) and transformers
(merged), the drop that fails an export, the settings' owner (the run's `export:` section), and
the modes of what is published."""

from __future__ import annotations

import json
import os
import stat

import pytest
import yaml
from conftest import EVAL_ROWS, eval_rows_file, make_adapter

from lorakit.cli import main

pytest.importorskip("xllamacpp")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """As tests/test_export_cli.py: a tiny random Llama with SmolLM2's tokenizer (llama.cpp knows it)."""
    from test_export_gguf import build
    from transformers import AutoTokenizer

    from lorakit.model.embedded import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    return build(tmp_path_factory.mktemp("base") / "model", tok, layers=2, template=None), tok


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


NEW_TOKENS = 12


def _answers_of_merged(run, rows_file):
    """The merged model's own greedy answers to the rows (what transformers says), independently of
    export/task.py: lorakit eval on the unmerged adapter gives them (merge parity is tested elsewhere)."""
    from lorakit.config import EvalConfig
    from lorakit.evaluate import evaluate_run

    (summary,) = evaluate_run(run, EvalConfig(data=[str(rows_file)], max_new_tokens=NEW_TOKENS), log=lambda s: None)
    from lorakit.artifacts import RunPaths, read_jsonl

    return [r["answers"]["tuned"] for r in read_jsonl(RunPaths.of(run).eval_records(summary.data))]


def test_f32_task_check_same_answers_and_report(base, tmp_path, capsys):
    """f32 answers exactly as transformers: nothing changed, drop 0, stored and shown in the report."""
    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / "r", 11, template="chatml", scale=0.05)
    rows = eval_rows_file(tmp_path)
    assert main(["export", str(run), "--gguf", "f32", "--eval-data", str(rows)]) == 0
    out = capsys.readouterr().out
    v = json.loads((run / "export" / "r-f32.gguf.verify.json").read_text())
    t = v["task"]
    assert t["rows"] == len(EVAL_ROWS) and t["metric"] == "exact_match" and t["changed"] == 0
    assert t["drop"] == 0 and t["passed"] and t["reference"] == t["gguf"]
    assert t["reference_scores"] == t["gguf_scores"]
    assert "task check on 'heldout'" in out and "0/4 answers changed" in out
    from lorakit.report import render_report

    page = render_report(run)
    assert "r-f32.gguf" in page and "answers changed" in page


def test_a_drop_beyond_max_drop_publishes_nothing(base, tmp_path, monkeypatch, capsys):
    """The references are the model's own answers (100 %); llama.cpp's answer to row 0 is made wrong
    (its tokens dropped) after the real engine ran: 25 points lost > 3 allowed -> exit 2, no file."""
    from lorakit.export import llama as V

    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / "d", 12, template="chatml", scale=0.05)
    prompts = eval_rows_file(tmp_path / "p")
    own = _answers_of_merged(run, prompts)
    assert len(set(own)) > 1 and all(own), own  # distinct, non-empty answers: a dropped one is a loss
    rows = eval_rows_file(tmp_path / "own", [(q, a) for (q, _), a in zip(EVAL_ROWS, own)])
    real = V.answer_with_gguf

    def one_wrong(*args, **kwargs):
        got = real(*args, **kwargs)
        return [[], *got[1:]]

    monkeypatch.setattr(V, "answer_with_gguf", one_wrong)
    budget = ["--max-new-tokens", str(NEW_TOKENS)]
    assert main(["export", str(run), "--gguf", "f32", "--eval-data", str(rows), *budget]) == 2
    err = capsys.readouterr().err
    assert "loses too much of what the fine-tune learned" in err and "25.0 points" in err
    assert "--max-drop" in err and "verify.json" in err
    export = run / "export"
    v = json.loads((export / "d-f32.gguf.verify.json").read_text())
    assert v["passed"] is False and v["task"]["drop"] == 25.0 and v["task"]["lost"] == 1
    assert v["task"]["reference"] == 1.0 and v["task"]["examples"][0]["row"] == 0
    assert not [p for p in export.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")]
    # the same drop with a wider allowance (from the run's config, the flag absent) publishes
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train": [str(rows)]},
                                                      "export": {"max_drop": 30, "eval_data": [str(rows)],
                                                                 "max_new_tokens": NEW_TOKENS}}))
    assert main(["export", str(run), "--gguf", "f32"]) == 0
    assert json.loads((export / "d-f32.gguf.verify.json").read_text())["task"]["max_drop"] == 30
    assert main(["export", str(run), "--gguf", "f32", "--max-drop", "5"]) == 2  # the flag wins over the config


def test_nothing_to_answer_is_told_before_any_work(base, tmp_path, capsys):
    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / "n", 13, scale=0.05)
    assert main(["export", str(run), "--gguf", "f32"]) == 2  # no config.yaml: no validation split known
    assert "--eval-data" in capsys.readouterr().err
    train = eval_rows_file(tmp_path / "t")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train": [str(train)], "val_fraction": 0.0}}))
    assert main(["export", str(run), "--gguf", "f32"]) == 2
    err = capsys.readouterr().err
    assert "no validation split" in err and "--eval-data FILE" in err and "--no-verify" in err
    assert not (run / "export").exists() or not any((run / "export").iterdir())


def test_published_files_follow_the_umask(base, tmp_path):
    """GGUF, .verify.json, Ollama folder and merged model readable by other users (the Ollama service)."""
    from lorakit.merge import merge

    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / "m", 14, template="chatml", scale=0.05)
    old = os.umask(0o022)
    try:
        assert main(["export", str(run), "--gguf", "f32", "--ollama", "--no-verify"]) == 0
        merge(run, tmp_path / "merged", log=lambda s: None)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(run / "export" / "m-f32.gguf") == 0o644
    assert mode(run / "export" / "ollama") == 0o755 and mode(run / "export" / "ollama" / "Modelfile") == 0o644
    assert mode(run / "export" / "ollama" / "model.gguf") == 0o644
    assert mode(tmp_path / "merged") == 0o755
    assert all(mode(p) == 0o644 for p in (tmp_path / "merged").iterdir())


def _run_with_config(base, tmp_path, name, seed):
    """A run folder as `lorakit train` leaves one for export: adapter + config.yaml naming its data."""
    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / name, seed, template="chatml", scale=0.05)
    train = eval_rows_file(tmp_path / f"{name}-data", EVAL_ROWS * 5)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(model_dir)},
                                                      "data": {"train": [str(train)], "template": "chatml"}}))
    return run, train


def test_importance_matrix_is_used_and_written(base, tmp_path):
    """q4_k_m with --imatrix auto (on for 4-bit): the matrix beside the file in llama.cpp's format,
    one entry per blk.* weight, and the quantized bytes differ from the unweighted file's."""
    import libgguf
    from libgguf.inspect import inspect_gguf

    run, _ = _run_with_config(base, tmp_path, "im", 15)
    assert main(["export", str(run), "--gguf", "q4_k_m", "--no-verify", "--out", str(tmp_path / "w")]) == 0
    assert main(["export", str(run), "--gguf", "q4_k_m", "--no-verify", "--imatrix", "off",
                 "--out", str(tmp_path / "plain")]) == 0
    weighted, plain = tmp_path / "w" / "im-q4_k_m.gguf", tmp_path / "plain" / "im-q4_k_m.gguf"
    matrix = libgguf.load_imatrix(tmp_path / "w" / "im-q4_k_m.imatrix.gguf")
    assert not (tmp_path / "plain" / "im-q4_k_m.imatrix.gguf").exists()
    a, b = inspect_gguf(weighted), inspect_gguf(plain)
    blk = {t.name for t in a.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert set(matrix) == blk and all((v > 0).all() for v in matrix.values())
    assert [(t.name, t.qtype) for t in a.tensors] == [(t.name, t.qtype) for t in b.tensors]  # same mix
    changed = [t.name for t in a.tensors if a.read_tensor_bytes(t) != b.read_tensor_bytes(b.get_tensor(t.name))]
    assert changed and set(changed) <= blk  # the weighting moved blk.* tensors only (token_embd is not recorded)


def test_auto_keeps_the_smallest_candidate_that_passes(base, tmp_path, monkeypatch, capsys):
    """--gguf auto over three candidates: tried smallest first, 4-bit ones with and without the
    importance matrix; the checks (faked here: the real ones are tested above) fail q4_0, pass
    q4_k_m; q8_0 is never written; the table is kept."""
    import dataclasses

    from lorakit.export import verify as V

    run, _ = _run_with_config(base, tmp_path, "au", 16)
    tried = []

    def fake_check(tmp_gguf, final, reference_dir, type, **kwargs):
        tried.append(type)
        ok = type != "q4_0"
        task = {"metric": "exact_match", "reference": 0.5, "gguf": 0.5 if ok else 0.25, "drop": 0.0 if ok else 25.0,
                "changed": 0 if ok else 1, "passed": ok, "max_drop": 3.0}
        fields = {f.name: None for f in dataclasses.fields(V.Verification)}
        return V.Verification(**{**fields, "gguf": str(final), "type": type, "prompts": [], "top1_agreement": 1.0,
                                 "passed": ok, "failures": [] if ok else ["drop"], "task": task})

    monkeypatch.setattr(V, "check_file", fake_check)
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + yaml.safe_dump(
        {"export": {"auto_types": ["q8_0", "q4_k_m", "q4_0"], "eval_data": [str(eval_rows_file(tmp_path))]}}))
    assert main(["export", str(run), "--gguf", "auto"]) == 0
    assert tried == ["q4_0", "q4_0", "q4_k_m"]  # 4-bit: with the importance matrix, then without
    out = capsys.readouterr().out
    assert "too lossy" in out and "kept" in out
    export = run / "export"
    assert sorted(p.name for p in export.iterdir() if p.suffix == ".gguf") == ["au-q4_k_m.gguf",
                                                                                "au-q4_k_m.imatrix.gguf"]
    v = json.loads((export / "au-q4_k_m.gguf.verify.json").read_text())
    assert [(r["type"], r["imatrix"], r["passed"]) for r in v["auto"]] == \
        [("q4_0", True, False), ("q4_0", False, False), ("q4_k_m", True, True)]


def test_failure_advice_names_the_next_wider_types():
    from lorakit.export.task import failure_hint

    hint = failure_hint("q4_k_m")
    assert "--gguf q5_k_m, --gguf q6_k" in hint and "--imatrix" in hint and "--gguf auto" in hint
    assert "--gguf f16" in failure_hint("q8_0")  # nothing quantized is wider than q8_0
