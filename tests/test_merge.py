"""`lorakit merge`: merged == base + adapter within the dtype's tolerance and != base (PEFT's
merge-parity table as the model), for plain, rsLoRA, DoRA, modules_to_save and 4-bit-trained
adapters; a wrong merge fails the check; a NaN adapter is refused; the folder is a plain
transformers model that renders the trained template.

Adapters are random (conftest.make_adapter) with std 0.05 entries: ΔW = (α/r)·B·A is then a few
per cent of the tiny model's weights, like a trained update. (The default 0.5 gives an update
about fifty times the weights, a chaotic network no training produces; merge.tolerance says why
such a one fails in 16 bits.)
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_adapter
from lorakit import merge as M
from lorakit.artifacts import RunPaths, read_meta
from lorakit.cli import main
from lorakit.config import LoraConfig, MergeConfig
from lorakit.errors import LorakitError

SCALE = 0.05
KINDS = {
    "plain": LoraConfig(r=4, alpha=8, dropout=0.0),
    "rslora": LoraConfig(r=4, alpha=8, dropout=0.0, use_rslora=True),
    "dora": LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True),
    # the tiny model ties lm_head to embed_tokens: the trained copy must be saved untied
    "modules_to_save": LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"]),
}
# A conversation outside merge.PROMPTS, so the tests check more than the module's own prompt set.
MSGS = [{"role": "user", "content": "Classify this message.", "input": "My order #555 is late."}]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-runs")
    return {kind: make_adapter(tiny_model_dir, tiny_tokenizer, root / kind, seed=i + 1, lora=lora, scale=SCALE)
            for i, (kind, lora) in enumerate(KINDS.items())}


def quiet(_):
    pass


def logits_of(model, tokenizer, run: Path) -> torch.Tensor:
    ids = read_meta(run / "adapter").template_object().encode_prompt(tokenizer, MSGS)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def reference(base_dir, run: Path, tokenizer, adapter: bool = True) -> torch.Tensor:
    """base (fp32, from disk) + adapter through PEFT, unmerged; or the base alone."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval() if adapter else base.eval()
    return logits_of(model, tokenizer, run)


def merged_logits(out: Path, tokenizer, run: Path) -> torch.Tensor:
    """The merged folder as stored, run in fp32 arithmetic: what merge.tolerance bounds."""
    return logits_of(AutoModelForCausalLM.from_pretrained(out).float().eval(), tokenizer, run)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", M.DTYPES)
def test_merged_equals_base_plus_adapter_within_the_dtype_tolerance_and_differs_from_base(
        dtype, runs, tiny_model_dir, tiny_tokenizer, tmp_path):
    run, out = runs["plain"], tmp_path / "merged"
    report = M.merge(run, out, MergeConfig(dtype=dtype), log=quiet)
    assert report.passed and report.parity.max_abs_diff <= report.tolerance
    assert AutoModelForCausalLM.from_pretrained(out).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                               "fp16": torch.float16}[dtype]
    # Checked here again on another prompt, not through the report.
    want = reference(tiny_model_dir, run, tiny_tokenizer)
    got = merged_logits(out, tiny_tokenizer, run)
    base = reference(tiny_model_dir, run, tiny_tokenizer, adapter=False)
    assert (got - want).abs().max() <= report.tolerance
    # != base, by more than the tolerance with room to spare (measured 17× in bf16, the loosest),
    # so a merge that lost the adapter cannot pass (the wrong-merge test shows it failing).
    assert (got - base).abs().max() > 5 * report.tolerance
    assert report.adapter_effect > 5 * report.tolerance
    stored = json.loads((out / M.PARITY_FILE).read_text())
    assert stored == json.loads(RunPaths.of(run).merge.read_text())
    assert stored["dtype"] == dtype and stored["passed"] is True and stored["parity"]["max_abs_diff"] == \
        report.parity.max_abs_diff


@pytest.mark.parametrize("kind", ["rslora", "dora", "modules_to_save"])
def test_adapter_variants_merge(kind, runs, tiny_model_dir, tiny_tokenizer, tmp_path):
    run, out = runs[kind], tmp_path / "merged"
    report = M.merge(run, out, MergeConfig(dtype="fp32"), log=quiet)
    want = reference(tiny_model_dir, run, tiny_tokenizer)
    got = merged_logits(out, tiny_tokenizer, run)
    assert report.passed and (got - want).abs().max() <= report.tolerance
    assert (got - reference(tiny_model_dir, run, tiny_tokenizer, adapter=False)).abs().max() > 5 * report.tolerance
    if kind == "modules_to_save":
        weights = load_file(out / "model.safetensors")
        assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"]), \
            "the trained lm_head copy is saved apart from the embedding"
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_4bit_trained_adapter_merges_into_the_full_precision_base(tiny_model_dir, tiny_tokenizer, tmp_path):
    run = make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "q", seed=7, scale=SCALE, quantization="4bit")
    out = tmp_path / "merged"
    lines = []
    report = M.merge(run, out, MergeConfig(dtype="bf16"), log=lines.append)
    assert report.passed, "checked against base + adapter in full precision, not against the 4-bit model"
    q = report.quantized
    assert q is not None and "4bit" in q.reference
    # NF4 keeps ~3.6 bits per weight: its difference from fp32 dwarfs the bf16 storage rounding
    assert q.max_abs_diff > 5 * report.parity.max_abs_diff
    assert "4bit base + adapter" in lines[0] and f"{q.max_abs_diff:.3g}" in lines[0], "the user sees the number"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config, "merged into full-precision weights, not 4-bit ones"
    assert {v.dtype for v in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / M.PARITY_FILE).read_text())["quantized"]["max_abs_diff"] == q.max_abs_diff


# --------------------------------------------------------------------------- failures


def _doubled_alpha(model):
    for module in model.modules():
        if isinstance(getattr(module, "scaling", None), dict):
            for name in module.scaling:
                module.scaling[name] *= 2
    return model.merge_and_unload()


def _bf16_arithmetic(model):
    merged = model.merge_and_unload()
    with torch.no_grad():
        for p in merged.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return merged


@pytest.mark.parametrize("wrong, dtype", [(_doubled_alpha, "bf16"), (lambda m: m.unload(), "fp16"),
                                          (_bf16_arithmetic, "fp32")],
                         ids=["alpha-doubled-bf16", "adapter-dropped-fp16", "bf16-arithmetic-stored-fp32"])
def test_a_wrong_merge_fails_the_tolerance_and_writes_nothing(wrong, dtype, runs, tmp_path, monkeypatch):
    run, out = runs["plain"], tmp_path / "merged"
    monkeypatch.setattr(M, "_merged", wrong)
    with pytest.raises(LorakitError, match=f"more than the {dtype} tolerance"):
        M.merge(run, out, MergeConfig(dtype=dtype), log=quiet)
    assert not out.exists() and not list(tmp_path.glob(".merged.tmp-*")), "atomic: nothing half written"
    stored = json.loads(RunPaths.of(run).merge.read_text())
    assert stored["passed"] is False and stored["parity"]["max_abs_diff"] > stored["tolerance"]


def test_a_nan_adapter_is_refused_naming_the_file_and_tensor(runs, tmp_path):
    import shutil

    run = tmp_path / "nan"
    shutil.copytree(runs["plain"], run)
    f = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(f)
    name = next(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, f)
    with pytest.raises(LorakitError) as e:
        M.merge(run, tmp_path / "merged", log=quiet)
    text = e.value.render()
    assert str(f) in text and name in text and "earlier checkpoint" in text
    assert not (tmp_path / "merged").exists()


def test_out_folder_rules(runs, tmp_path):
    run = runs["plain"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(LorakitError, match="not empty") as e:
        M.merge(run, busy, log=quiet)
    assert "--overwrite" in e.value.render()
    for bad in (run / "adapter" / "merged", run / "adapter", run):  # inside, the adapter itself, or above it
        with pytest.raises(LorakitError, match="overlaps the adapter folder"):
            M.merge(run, bad, MergeConfig(overwrite=True), log=quiet)
    M.merge(run, busy, MergeConfig(overwrite=True), log=quiet)
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").is_file()


# --------------------------------------------------------------------------- the merged folder


def test_the_merged_folder_is_a_plain_model_with_the_trained_template(tiny_model_dir, tiny_tokenizer, tmp_path):
    run = make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "chat", seed=3, template="chatml", scale=SCALE)
    out = tmp_path / "merged"
    M.merge(run, out, MergeConfig(dtype="bf16"), log=quiet)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "lorakit.json", M.PARITY_FILE} <= names
    assert "adapter_config.json" not in names and not any(n.endswith((".bin", ".pt")) for n in names)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    template = read_meta(run / "adapter").template_object()
    for msgs in (MSGS, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]):
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == template.render(msgs, True)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == template.encode_prompt(tiny_tokenizer, msgs)
    stops = template.stop_token_ids(tiny_tokenizer)
    eos = model.generation_config.eos_token_id
    assert set(eos if isinstance(eos, list) else [eos]) == set(stops)
    assert read_meta(out) == read_meta(run / "adapter"), "lorakit.json travels with the merged model"


# --------------------------------------------------------------------------- CLI


def test_cli_merge_end_to_end_and_a_missing_run(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(runs["plain"]), "--out", str(out), "--dtype", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert "max |Δlogit|" in printed and "fp16 tolerance" in printed and f"done: {out}" in printed
    assert json.loads((out / M.PARITY_FILE).read_text())["dtype"] == "fp16"

    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and str(tmp_path / "nope") in err and "Traceback" not in err
    assert main(["merge", str(runs["plain"]), "--out", str(out)]) == 2, "an existing --out needs --overwrite"
    assert "--overwrite" in capsys.readouterr().err


def test_a_different_base_on_disk_is_warned_about_and_recorded(tiny_model_dir, tiny_tokenizer, tmp_path):
    run = make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "other", seed=5, scale=SCALE, sha="0" * 64)
    lines = []
    report = M.merge(run, tmp_path / "merged", log=lines.append)
    assert not report.base_matches
    assert any(line.startswith("warning: the base weights on disk differ") for line in lines)
    assert "the base on disk is not the one the adapter was trained on" in lines[-1]
