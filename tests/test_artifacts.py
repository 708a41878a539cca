"""lorakit.json as a typed, versioned contract, and the adapter's tokenizer carrying the trained template."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lorakit.artifacts import (META_FILE, SCHEMA_VERSION, AdapterMeta, BaseModelRef, DataRef, read_meta,
                               save_adapter)
from lorakit.config import LoraConfig, ModelConfig, TrainConfig
from lorakit.data.templates import resolve_template
from lorakit.errors import LorakitError


def meta_for(template) -> AdapterMeta:
    return AdapterMeta(
        base=BaseModelRef("tiny", "/models/tiny", "ab" * 32, "float32", "none"),
        template=template,
        data=DataRef(["train.jsonl"], [], "cd" * 32, 12, 4),
        max_length=96, lora=LoraConfig(r=4), train=TrainConfig(lr=1e-3), versions={"lorakit": "0.1.0"},
        metrics={"eval_loss": 1.5},
    )


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from lorakit.model.load import load_model
    from lorakit.model.lora import apply_lora

    model, _ = load_model(ModelConfig(name=str(tiny_model_dir)), training=False)
    return apply_lora(model, LoraConfig(r=4, alpha=8))


# --------------------------------------------------------------------------- the schema


def test_meta_round_trips_through_the_file(tmp_path, tiny_tokenizer):
    meta = meta_for(resolve_template("chatml", tiny_tokenizer))
    (tmp_path / META_FILE).write_text(meta.to_json())
    assert read_meta(tmp_path) == meta
    raw = json.loads((tmp_path / META_FILE).read_text())
    assert raw["schema"] == SCHEMA_VERSION and raw["base_model"]["sha256"] == "ab" * 32


def test_a_newer_schema_is_refused_with_the_upgrade(tmp_path, tiny_tokenizer):
    raw = json.loads(meta_for(resolve_template("chatml", tiny_tokenizer)).to_json())
    raw["schema"] = SCHEMA_VERSION + 1
    (tmp_path / META_FILE).write_text(json.dumps(raw))
    with pytest.raises(LorakitError, match="newer lorakit") as e:
        read_meta(tmp_path)
    assert e.value.where == str(tmp_path / META_FILE) and "pip install -U lorakit" in e.value.hint


def test_schema_1_files_are_read(tmp_path, tiny_tokenizer):
    """What lorakit wrote before the typed contract: same fields, 'format': 1."""
    meta = meta_for(resolve_template("alpaca", tiny_tokenizer))
    raw = json.loads(meta.to_json())
    raw["format"] = raw.pop("schema") - 1
    (tmp_path / META_FILE).write_text(json.dumps(raw))
    assert read_meta(tmp_path) == meta


@pytest.mark.parametrize("break_it,expect", [
    (lambda raw: raw.pop("template"), "missing key 'template'"),
    (lambda raw: raw["base_model"].pop("sha256"), "missing key 'sha256'"),
    (lambda raw: raw.__setitem__("max_length", "long"), "malformed field"),
    (lambda raw: raw.pop("schema"), "no schema version"),
])
def test_a_malformed_file_names_the_file_and_key(tmp_path, tiny_tokenizer, break_it, expect):
    raw = json.loads(meta_for(resolve_template("chatml", tiny_tokenizer)).to_json())
    break_it(raw)
    (tmp_path / META_FILE).write_text(json.dumps(raw))
    with pytest.raises(LorakitError, match=expect) as e:
        read_meta(tmp_path)
    assert e.value.where == str(tmp_path / META_FILE) and e.value.hint


def test_not_json_at_all(tmp_path):
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(LorakitError, match="not valid JSON"):
        read_meta(tmp_path)


# --------------------------------------------------------------------------- the template in the tokenizer

CUSTOM = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}"
          "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Where is my order #12345?"}],
    "with input": [{"role": "user", "content": "Classify this message.", "input": "My order #555 is late."}],
    "system": [{"role": "system", "content": "You are a support agent."},
               {"role": "user", "content": "Say hello."}],
    "multi-turn": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello world!"},
                   {"role": "user", "content": "Explain the return policy to a customer."}],
    "system multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
                          {"role": "assistant", "content": "Hello world!"},
                          {"role": "user", "content": "Extract the order number.", "input": "Order #555"}],
}


def _hf_ids(tok, msgs):
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("spec", ["alpaca", "chatml", "model", CUSTOM], ids=["alpaca", "chatml", "model", "custom"])
@pytest.mark.parametrize("system_prompt", [None, "Answer as Northwind support."], ids=["no-default-system", "default-system"])
def test_outside_engines_render_the_trained_template(spec, system_prompt, tmp_path, tiny_tokenizer, peft_model):
    template = resolve_template(spec, tiny_tokenizer, system_prompt)
    save_adapter(peft_model, tiny_tokenizer, tmp_path / "adapter", meta_for(template))
    outside = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert outside.chat_template != tiny_tokenizer.chat_template or spec in ("model", "chatml")
    for name, msgs in CONVERSATIONS.items():
        want = template.encode_prompt(tiny_tokenizer, msgs)
        assert _hf_ids(outside, msgs) == want, name
    assert read_meta(tmp_path / "adapter").template_object() == template


def test_saving_leaves_the_callers_tokenizer_alone(tmp_path, tiny_tokenizer, peft_model):
    before = tiny_tokenizer.chat_template
    save_adapter(peft_model, tiny_tokenizer, tmp_path / "a", meta_for(resolve_template("alpaca", tiny_tokenizer)))
    assert tiny_tokenizer.chat_template == before


def test_a_bos_adding_tokenizer_gets_its_bos_in_the_template(tmp_path, tiny_tokenizer, peft_model):
    """lorakit prepends BOS when the tokenizer adds one the template does not render; so must the export."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_bos_token = True
    template = resolve_template("alpaca", tok)
    msgs = CONVERSATIONS["single"]
    assert template.encode_prompt(tok, msgs)[0] == tok.bos_token_id
    save_adapter(peft_model, tok, tmp_path / "adapter", meta_for(template))
    outside = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    outside.add_bos_token = False  # the ids must come from the template, not from tokenization
    assert _hf_ids(outside, msgs) == template.encode_prompt(tok, msgs)
