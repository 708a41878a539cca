"""Rendering and the loss mask: exactly the responses and their end-of-turn/EOS tokens are trained."""

from __future__ import annotations

import json

import pytest

from lorakit.data.collate import Collator
from lorakit.data.formats import to_example
from lorakit.data.templates import Template, resolve_template
from lorakit.errors import ConfigError, DataError, ModelError

EOS = "<|im_end|>"  # the conftest tokenizer's EOS, which is also its pad token
# A custom template that closes turns with a special token other than EOS, and starts with BOS.
CUSTOM = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}assistant: {% endif %}")
# What each template trains after a response: its end-of-turn text, then EOS if that was not it.
END = {"alpaca": EOS, "chatml": EOS, "model": EOS, CUSTOM: "<|endoftext|>" + EOS}
TEMPLATES = list(END)
TEMPLATE_IDS = ["alpaca", "chatml", "model", "custom"]

RESPONSE = "Our standard return policy covers items within 30 days of purchase."
ROWS = {
    "alpaca": {"instruction": "Explain the return policy.", "input": "Can I return an item after 45 days?",
               "output": RESPONSE},
    "prompt_completion": {"prompt": "Explain the return policy.", "completion": RESPONSE},
    "messages": {"messages": [{"role": "system", "content": "You are a support agent."},
                              {"role": "user", "content": "Explain the return policy."},
                              {"role": "assistant", "content": RESPONSE}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Explain the return policy."},
                                   {"from": "gpt", "value": RESPONSE}]},
}


def trained_runs(tokenizer, ids, labels) -> list[str]:
    """Decoded runs of consecutive trained positions; checks labels equal ids where trained."""
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label == -100:
            if run:
                runs.append(run)
            run = []
        else:
            assert label == token
            run.append(token)
    if run:
        runs.append(run)
    return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("spec", TEMPLATES, ids=TEMPLATE_IDS)
def test_mask_covers_exactly_response_and_end_of_turn(tiny_tokenizer, fmt, spec):
    tok = tiny_tokenizer
    template = resolve_template(spec, tok)
    example = to_example(ROWS[fmt], "auto", "t.jsonl line 1")
    ids, labels = template.encode(tok, example)
    assert len(ids) == len(labels)
    runs = trained_runs(tok, ids, labels)
    assert "".join(runs) == RESPONSE + END[spec]
    appended = EOS if spec == CUSTOM else ""
    # CUSTOM: "<|endoftext|>" ends the turn, its "\n" is untrained, then the appended EOS is trained.
    assert runs == ([RESPONSE + "<|endoftext|>", EOS] if appended else [RESPONSE + EOS])
    # The ids are the rendered text (plus the appended EOS), nothing lost between spans.
    assert decode(tok, ids) == template.render(example["messages"]) + appended
    # The prompt (instruction, and the alpaca input folded or in its block) is present but untrained.
    assert "Explain the return policy." in decode(tok, ids)
    if fmt == "alpaca":
        assert "Can I return an item after 45 days?" in decode(tok, [i for i, lab in zip(ids, labels) if lab == -100])


@pytest.mark.parametrize("spec", TEMPLATES, ids=TEMPLATE_IDS)
def test_multi_turn_trains_every_assistant_turn_and_no_user_turn(tiny_tokenizer, spec):
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "Where is my order #12345?"},
                {"role": "assistant", "content": "Category: shipping"},
                {"role": "user", "content": "Can I return it?"},
                {"role": "assistant", "content": "Hello world!"}]
    template = resolve_template(spec, tok)
    ids, labels = template.encode(tok, {"messages": messages})
    runs = trained_runs(tok, ids, labels)
    eot = END[spec].removesuffix(EOS) or EOS  # between turns: the end-of-turn text; EOS only at the very end
    assert "".join(runs) == "Category: shipping" + eot + "Hello world!" + END[spec]
    assert not any("order" in r or "return" in r for r in runs)


def test_alpaca_is_the_guides_format(tiny_tokenizer):
    t = resolve_template("alpaca", tiny_tokenizer)
    with_input = [{"role": "user", "content": "Classify.", "input": "Where is my order?"},
                  {"role": "assistant", "content": "shipping"}]
    assert t.render(with_input) == ("### Instruction:\nClassify.\n\n### Input:\nWhere is my order?\n\n"
                                    f"### Response:\nshipping{EOS}")
    no_input = [{"role": "user", "content": "Say hello.", "input": ""}]
    # The guide's inference prompt, exactly.
    assert t.render(no_input, add_generation_prompt=True) == "### Instruction:\nSay hello.\n\n### Response:\n"
    system = [{"role": "system", "content": "Be brief."}] + no_input
    assert t.render(system, add_generation_prompt=True).startswith("Be brief.\n\n### Instruction:\n")


def test_input_is_folded_into_content_for_other_templates(tiny_tokenizer):
    t = resolve_template("chatml", tiny_tokenizer)
    text = t.render([{"role": "user", "content": "Classify.", "input": "Where?"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nClassify.\n\nWhere?<|im_end|>\n<|im_start|>assistant\n"


def test_eos_is_trained_although_pad_is_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the SmolLM2 situation this guards
    t = resolve_template("alpaca", tok)
    a = t.encode(tok, to_example(ROWS["alpaca"], "auto", "x"))
    b = t.encode(tok, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    assert a[1][-1] == tok.eos_token_id
    batch = Collator(tok.pad_token_id)([{"input_ids": a[0], "labels": a[1]}, {"input_ids": b[0], "labels": b[1]}])
    n = len(b[0])
    assert batch["labels"][1, n - 1].item() == tok.eos_token_id  # the real EOS of the short row: trained
    assert (batch["input_ids"][1, n:] == tok.pad_token_id).all()  # padding uses the same id ...
    assert (batch["labels"][1, n:] == -100).all()  # ... and is not trained
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(a[0]) - n)


@pytest.mark.parametrize("spec", TEMPLATES, ids=TEMPLATE_IDS)
def test_encode_prompt_is_the_prefix_training_saw(tiny_tokenizer, spec):
    tok = tiny_tokenizer
    t = resolve_template(spec, tok)
    example = to_example(ROWS["alpaca"], "auto", "x")
    ids, labels = t.encode(tok, example)
    prompt = t.encode_prompt(tok, example["messages"][:-1])
    assert ids[: len(prompt)] == prompt
    assert labels[len(prompt)] != -100 and all(x == -100 for x in labels[: len(prompt)])
    # Same for a later turn of a chat: history plus open assistant turn.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world!"},
            {"role": "user", "content": "Order #555?"}, {"role": "assistant", "content": "Order number: #555"}]
    ids, labels = t.encode(tok, {"messages": chat})
    prompt = t.encode_prompt(tok, chat[:3])
    assert ids[: len(prompt)] == prompt and labels[len(prompt)] != -100


def test_train_on_inputs_trains_every_token(tiny_tokenizer):
    t = resolve_template("alpaca", tiny_tokenizer)
    ids, labels = t.encode(tiny_tokenizer, to_example(ROWS["alpaca"], "auto", "x"), train_on_inputs=True)
    assert labels == ids


def test_raw_text_is_all_trained_plus_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = resolve_template("chatml", tok).encode(tok, {"text": "Hello world!"})
    assert labels == ids and ids[-1] == tok.eos_token_id
    assert decode(tok, ids) == "Hello world!" + EOS


class _Tok:
    """The conftest tokenizer with some attributes overridden (BOS adding, no chat template)."""

    def __init__(self, tok, **overrides):
        self._tok, self._overrides = tok, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def test_bos_added_once_when_tokenizer_adds_bos(tiny_tokenizer):
    tok = _Tok(tiny_tokenizer, add_bos_token=True)
    bos = tiny_tokenizer.bos_token_id
    example = to_example(ROWS["prompt_completion"], "auto", "x")
    ids, labels = resolve_template("alpaca", tok).encode(tok, example)
    assert ids[0] == bos and ids[1] != bos and labels[0] == -100
    # CUSTOM renders bos_token itself: no second one.
    ids, _ = resolve_template(CUSTOM, tok).encode(tok, example)
    assert ids[0] == bos and ids[1] != bos
    t = resolve_template("alpaca", tok)
    assert t.encode_prompt(tok, example["messages"][:1])[0] == bos


def test_auto_and_model_without_chat_template(tiny_tokenizer):
    assert resolve_template("auto", tiny_tokenizer).name == "model"
    bare = _Tok(tiny_tokenizer, chat_template=None)
    assert resolve_template("auto", bare).name == "alpaca"
    with pytest.raises(ModelError) as info:
        resolve_template("model", bare)
    assert "no chat template" in str(info.value) and "alpaca" in str(info.value)


def test_unknown_name_and_bad_jinja_are_config_errors(tiny_tokenizer):
    with pytest.raises(ConfigError) as info:
        resolve_template("chatm", tiny_tokenizer)
    assert "data.template" in str(info.value) and "did you mean 'chatml'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        resolve_template("{% for m in messages %}{{ m }}", tiny_tokenizer)
    assert "data.template" in str(info.value) and "not valid Jinja" in str(info.value)


def test_stop_token_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert resolve_template("chatml", tok).stop_token_ids(tok) == [tok.eos_token_id]
    assert resolve_template("alpaca", tok).stop_token_ids(tok) == [tok.eos_token_id]
    assert resolve_template(CUSTOM, tok).stop_token_ids(tok) == [tok.eos_token_id,
                                                                 tok.convert_tokens_to_ids("<|endoftext|>")]


def test_round_trip_through_json_encodes_identically(tiny_tokenizer):
    tok = tiny_tokenizer
    t = resolve_template(CUSTOM, tok, system_prompt="Be brief.")
    back = Template.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t
    example = to_example(ROWS["alpaca"], "auto", "x")
    assert back.encode(tok, example) == t.encode(tok, example)
    assert "Be brief." in back.render(example["messages"])


def test_system_prompt_only_when_conversation_has_none(tiny_tokenizer):
    t = resolve_template("chatml", tiny_tokenizer, system_prompt="Be brief.")
    assert t.render([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]
    assert "Be brief." not in t.render(own)


def test_template_that_is_not_prefix_stable_is_refused(tiny_tokenizer):
    unstable = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}A:{% else %}END{% endif %}")
    t = resolve_template(unstable, tiny_tokenizer)
    with pytest.raises(DataError) as info:
        t.encode(tiny_tokenizer, to_example(ROWS["prompt_completion"], "auto", "x"))
    assert "not prefix-stable" in str(info.value) and "chatml" in str(info.value)


def test_template_exception_becomes_data_error(tiny_tokenizer):
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{{ m['content'] }}{% endfor %}")
    t = resolve_template(strict, tiny_tokenizer)
    with pytest.raises(DataError) as info:
        t.encode(tiny_tokenizer, to_example(ROWS["messages"], "auto", "x"))
    assert "no system role" in str(info.value)


def test_a_tokenizer_json_that_adds_bos_gets_one_bos_and_keeps_its_sentencepiece_model(tmp_path):
    """transformers 5 drops `add_bos_token` when it loads a tokenizer.json whose post-processor
    adds BOS (Gemma, Llama 3): lorakit asks the tokenizer, so encoded rows start with exactly one
    BOS; and saving that tokenizer (adapter, merged folder) carries the base's sentencepiece
    tokenizer.model, which llama.cpp's converter reads for such families."""
    from family_tokenizers import gemma_tokenizer
    from transformers import AutoTokenizer

    from lorakit.artifacts.meta import save_tokenizer
    from lorakit.data.templates import adds_bos

    gemma_tokenizer(tmp_path / "base").save_pretrained(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert not getattr(tok, "add_bos_token", False) and tok("x").input_ids[0] == tok.bos_token_id
    assert adds_bos(tok)
    template = resolve_template("chatml", tok)
    ids, _ = template.encode(tok, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert template.encode_prompt(tok, [{"role": "user", "content": "hi"}])[:1] == [tok.bos_token_id]
    # a template that writes BOS itself (Gemma's do): one BOS in lorakit's ids, and the text an engine
    # that adds BOS (llama.cpp, Ollama) is given leaves it out, so that engine's ids are the same
    from conftest import CHATML
    from lorakit.data.templates import engine_text

    writes_bos = resolve_template("{{ bos_token }}" + CHATML, tok)
    chat = [{"role": "user", "content": "hi"}]
    ids = writes_bos.encode_prompt(tok, chat)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok(engine_text(writes_bos, tok, chat)).input_ids == ids
    assert engine_text(template, tok, chat) == template.render(chat, add_generation_prompt=True)
    save_tokenizer(tok, tmp_path / "saved", template)
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == (tmp_path / "base" / "tokenizer.model").read_bytes()


def test_a_tokenizer_without_bos_gets_none(tiny_tokenizer):
    from lorakit.data.templates import adds_bos

    assert not adds_bos(tiny_tokenizer)
    template = resolve_template("chatml", tiny_tokenizer)
    chat = [{"role": "user", "content": "hi"}]
    text = template.render(chat, add_generation_prompt=True)
    assert template.encode_prompt(tiny_tokenizer, chat) == tiny_tokenizer(text, add_special_tokens=False).input_ids
