"""`lorakit export --max-size`: per-tensor sensitivity (export/sensitivity.py), the budget fill, and
the file it writes (the plain mix with its most sensitive tensors one type wider, within the size)."""

from __future__ import annotations

import json

import pytest
import yaml
from test_export_task import _offline, _run_with_config, base  # noqa: F401 - fixtures

from lorakit.cli import main

pytest.importorskip("xllamacpp")


@pytest.fixture(scope="module")
def f32(base, tmp_path_factory):  # noqa: F811
    from lorakit.export.gguf import convert_raw

    model_dir, _ = base
    return convert_raw(model_dir, tmp_path_factory.mktemp("f32") / "model-f32.gguf", log=lambda s: None)


def test_a_tensor_quantization_leaves_exact_scores_zero(base, f32, tmp_path):  # noqa: F811
    """A weight of zeros is exact in every quantized type, so its KL must be exactly 0 — and so must
    its MLP's gate and down projections, whose contribution it multiplies by zero — while every
    other weight (random, so rounded) scores above 0; the list covers every widenable weight."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.export.sensitivity import rank

    model_dir, tok = base
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.zero_()
    model.save_pretrained(tmp_path / "zeroed")
    rows = [tok("The cat sat on the mat.")["input_ids"], tok("A longer row, so that the batch is padded.")["input_ids"]]
    ranked = rank(tmp_path / "zeroed", f32, "q4_k_m", rows, log=lambda s: None)
    scores = dict(ranked)
    assert len(scores) == 2 * 7  # two layers of seven projections; the tied output is not a tensor of its own
    silent = {f"blk.1.ffn_{role}.weight" for role in ("up", "gate", "down")}
    assert {n for n, v in scores.items() if v == 0.0} == silent
    assert [v for _, v in ranked] == sorted(scores.values(), reverse=True)


def test_the_budget_is_filled_in_rank_order_and_never_exceeded(f32):
    """Tensors are raised most sensitive first; one that does not fit is passed over for a smaller one."""
    from libgguf.inspect import inspect_gguf

    from lorakit.export.gguf import planned_size, tensor_bytes
    from lorakit.export.sensitivity import within

    info = inspect_gguf(f32)
    names = ["blk.0.ffn_up.weight", "blk.0.attn_q.weight", "blk.1.ffn_up.weight", "blk.1.attn_q.weight"]
    plain = tensor_bytes(info, "q4_k_m")
    up = tensor_bytes(info, "q4_k_m", raised=frozenset(names))
    extra = {n: up[n] - plain[n] for n in names}
    assert extra["blk.0.ffn_up.weight"] > extra["blk.0.attn_q.weight"] > 0  # ffn_up has twice the rows
    budget = sum(plain.values()) + extra["blk.0.ffn_up.weight"] + extra["blk.0.attn_q.weight"] + \
        extra["blk.1.attn_q.weight"] * 3 // 2  # blk.1.ffn_up (twice attn_q's extra) does not fit, attn_q does
    ranked = [(n, 1.0 - i / 10) for i, n in enumerate(names)]
    raised = within(f32, "q4_k_m", ranked, budget)
    assert raised == {"blk.0.ffn_up.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight"}
    assert planned_size(f32, "q4_k_m", raised=raised) <= budget < planned_size(f32, "q4_k_m", raised=frozenset(names))
    assert within(f32, "q4_k_m", ranked, sum(plain.values())) == frozenset()


@pytest.mark.slow  # several quantized exports, each verified in llama.cpp: about a minute on 2 cores
def test_max_size_writes_the_widest_mix_that_fits(base, tmp_path, capsys):  # noqa: F811
    """--gguf q4_k_m --max-size: a `-dynamic` file within the size, holding the plain mix with some
    tensors one type wider, checked in llama.cpp (the raised names in .verify.json); a size below
    the smallest file is refused before anything is written."""
    from libgguf.inspect import inspect_gguf

    run, train = _run_with_config(base, tmp_path, "ms", 17)
    assert main(["export", str(run), "--gguf", "q4_k_m", "--imatrix", "off", "--no-verify",
                 "--out", str(tmp_path / "plain")]) == 0
    plain_file = tmp_path / "plain" / "ms-q4_k_m.gguf"
    limit = plain_file.stat().st_size / 2**20 + 0.05  # room for a few 256x256 tensors one type wider (8 KiB each)
    capsys.readouterr()
    assert main(["export", str(run), "--gguf", "q4_k_m", "--imatrix", "off", "--max-size", f"{limit:.4f}",
                 "--eval-data", str(train), "--eval-limit", "4", "--max-drop", "-1"]) == 0
    out = capsys.readouterr().out
    assert "one type wider" in out
    dynamic = run / "export" / "ms-q4_k_m-dynamic.gguf"
    assert dynamic.stat().st_size <= limit * 2**20
    v = json.loads((run / "export" / "ms-q4_k_m-dynamic.gguf.verify.json").read_text())
    plain_types = {t.name: t.qtype for t in inspect_gguf(plain_file).tensors}
    wider = {t.name for t in inspect_gguf(dynamic).tensors if t.qtype != plain_types[t.name]}
    assert v["raised"] and set(v["raised"]) == wider
    assert v["task"] is not None and v["passed"]

    assert main(["export", str(run), "--gguf", "q4_k_m", "--max-size", "1", "--no-verify",
                 "--out", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert "over --max-size 1" in err and "--max-size" in err
    assert not list((tmp_path / "small").glob("*.gguf"))


@pytest.mark.slow  # the candidates and a dynamic mix, each exported and verified: about a minute on 2 cores
def test_auto_within_max_size_tries_the_dynamic_mix_last(base, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--gguf auto --max-size between q4_k_m and q8_0: q8_0 is never written, the plain mixes that fit
    come first, the dynamic q4_k_m last (the checks are faked to pass only it; the real ones run in
    the test above), and the table marks how many tensors it raised."""
    import dataclasses

    from lorakit.export import gguf as G
    from lorakit.export import verify as V

    run, train = _run_with_config(base, tmp_path, "ad", 18)
    tried = []

    def fake_check(tmp_gguf, final, reference_dir, type, **kwargs):
        tried.append(final.name)
        ok = "-dynamic" in final.name
        fields = {f.name: None for f in dataclasses.fields(V.Verification)}
        return V.Verification(**{**fields, "gguf": str(final), "type": type, "prompts": [], "top1_agreement": 1.0,
                                 "passed": ok, "failures": [] if ok else ["drop"], "task": {"drop": 0.0 if ok else 9.0}})

    real_convert = G.convert_merged
    sizes = {}

    def convert(merged, out, type, **kw):  # the q4_k_m / q8_0 sizes, to put the budget between them
        path = real_convert(merged, out, type, **kw)
        sizes.setdefault(type, path.stat().st_size)
        return path

    monkeypatch.setattr(V, "check_file", fake_check)
    monkeypatch.setattr(G, "convert_merged", convert)
    for t in ("q4_k_m", "q8_0"):
        assert main(["export", str(run), "--gguf", t, "--imatrix", "off", "--no-verify",
                     "--out", str(tmp_path / t)]) == 0
    limit = (sizes["q4_k_m"] + 0.1 * 2**20) / 2**20
    assert limit * 2**20 < sizes["q8_0"]
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + yaml.safe_dump(
        {"export": {"auto_types": ["q8_0", "q4_k_m", "q4_0"], "eval_data": [str(train)], "imatrix": "off"}}))
    tried.clear()
    assert main(["export", str(run), "--gguf", "auto", "--max-size", f"{limit:.4f}"]) == 0
    assert tried == ["ad-q4_0.gguf", "ad-q4_k_m.gguf", "ad-q4_k_m-dynamic.gguf"]
    v = json.loads((run / "export" / "ad-q4_k_m-dynamic.gguf.verify.json").read_text())
    assert [(r["type"], r["raised"] > 0) for r in v["auto"]] == [("q4_0", False), ("q4_k_m", False), ("q4_k_m", True)]
    assert "q4_k_m +" in capsys.readouterr().out
