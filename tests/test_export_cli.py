"""`lorakit export` end to end, as a user types it: merged + Ollama, adapter-only, refusals."""

from __future__ import annotations

import json

import pytest
from conftest import eval_rows_file, make_adapter

from lorakit.cli import main
from lorakit.config import LoraConfig, MergeConfig
from lorakit.errors import LorakitError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama (hidden 256) with SmolLM2's tokenizer: llama.cpp's converter identifies
    tokenizers by their pre-tokenizer hash and knows SmolLM2's, not the test suite's own BPE."""
    from test_export_gguf import build

    from lorakit.model.embedded import embedded_model_dir
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    except LorakitError as e:
        pytest.fail(f"the embedded SmolLM2 tokenizer is needed (bash scripts/setup.sh installs it): {e}")
    return build(tmp_path_factory.mktemp("base") / "model", tok, layers=2, template=None), tok


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # any hub request fails: export is offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_merged_f32_with_ollama(base, tmp_path, capsys):
    # f32: llama.cpp must agree on every greedy token, so a random model is a fair test here.
    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / "run", 1, template="chatml", scale=0.05)
    assert main(["export", str(run), "--gguf", "f32", "--ollama", "--eval-data", str(eval_rows_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    export = run / "export"
    gguf, verdict = export / "run-f32.gguf", json.loads((export / "run-f32.gguf.verify.json").read_text())
    assert gguf.is_file() and verdict["passed"]
    assert verdict["tokens_equal"] is True, "llama.cpp tokenizes the trained prompt as transformers does"
    assert (export / "ollama" / "model.gguf").stat().st_size == gguf.stat().st_size
    modelfile = (export / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("#") and "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "ollama create run -f" in out
    assert "Ollama TEMPLATE: tools, calls and tool results; reasoning between <think> and </think>" in out
    assert ".Tools" in modelfile and ".ToolCalls" in modelfile
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == model_dir.name  # the base's name, not "Merged"
    assert not [p for p in export.iterdir() if p.name.startswith(".")], "no temporary or partial file left"


def test_adapter_only_is_verified_as_base_plus_lora_against_the_merged_model(base, tmp_path):
    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / "rs", 2, lora=LoraConfig(r=4, alpha=8, dropout=0.0, use_rslora=True),
                       scale=0.05)
    assert main(["export", str(run), "--gguf", "f32", "--adapter-only", "--out", str(tmp_path / "x"),
                 "--eval-data", str(eval_rows_file(tmp_path))]) == 0
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert names == ["model-f32.gguf", "model-f32.gguf.verify.json", "rs-lora.gguf"], names
    verdict = json.loads((tmp_path / "x" / "model-f32.gguf.verify.json").read_text())
    assert verdict["passed"] and verdict["adapter"] == str(tmp_path / "x" / "rs-lora.gguf")  # rsLoRA scale right, or greedy tokens would differ


def test_dora_adapter_only_is_refused_before_any_work(base, tmp_path, capsys):
    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / "d", 3, lora=LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True))
    assert main(["export", str(run), "--gguf", "q8_0", "--adapter-only"]) == 2
    err = capsys.readouterr().err
    assert "use_dora" in err and "adapter_config.json" in err and "without --adapter-only" in err
    assert not (run / "export").exists() or not any((run / "export").iterdir())


def test_a_failed_verification_leaves_no_finished_file(base, tmp_path, monkeypatch, capsys):
    # The verification is the real one; the converted file is replaced by another model's GGUF
    # (a wrong conversion), which must fail it and leave nothing under the final name.
    from lorakit.export import gguf as G

    model_dir, tok = base
    run = make_adapter(model_dir, tok, tmp_path / "w", 4, scale=0.05)
    other = make_adapter(model_dir, tok, tmp_path / "o", 5, scale=0.05)  # another adapter
    real = G.convert_merged

    def wrong(model, out_file, type, **kw):
        from lorakit.merge import merge

        merge(other, tmp_path / "other-merged", MergeConfig(dtype="fp32", overwrite=True), log=lambda s: None)
        return real(tmp_path / "other-merged", out_file, type, **kw)

    monkeypatch.setattr(G, "convert_merged", wrong)
    assert main(["export", str(run), "--gguf", "f32", "--eval-data", str(eval_rows_file(tmp_path))]) == 2
    assert "does not answer as the model" in capsys.readouterr().err
    export = run / "export"
    assert not (export / "w-f32.gguf").exists()
    assert json.loads((export / "w-f32.gguf.verify.json").read_text())["passed"] is False
    assert not [p for p in export.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("type", ["q8_0", "q4_k_m"])
def test_smollm2_exports_and_verifies(type, tmp_path):
    """The real model: SmolLM2-135M with a small random adapter (noise 0.02, as the merge figures use;
    the demo's trained adapter is measured by benchmarks/export.py), exported and verified in llama.cpp."""
    from transformers import AutoTokenizer

    from lorakit.export.run import export, run_settings
    from lorakit.model.embedded import embedded_model_dir

    folder = embedded_model_dir()
    run = make_adapter(folder, AutoTokenizer.from_pretrained(folder), tmp_path / "smol", 7, template="model",
                       scale=0.02)
    settings = run_settings(run, gguf=type, eval_data=[str(eval_rows_file(tmp_path))], imatrix="off")
    result = export(run, settings, ollama=True,
                    log=lambda s: None)  # no run config: no training rows to collect an importance matrix on
    (v,) = result.verifications
    assert v.passed, v.failures
    assert v.tokens_equal is True  # llama.cpp's tokenizer from the GGUF = transformers' (proxy env set: bypassed)
    assert (result.ollama_dir / "Modelfile").is_file()
