"""The generation layer: one base, named adapters chosen per call, completions with counts and a
finish reason, and message validation shared by the CLI and (later) the server."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_adapter

from lorakit.errors import LorakitError
from lorakit.infer import (BASE, Sampling, generate, generate_batch, load_session, messages_from_instruction,
                           read_messages_file, validate_messages)

GREEDY = Sampling(max_new_tokens=8, greedy=True)
PROMPTS = [messages_from_instruction("Say hello."),
           messages_from_instruction("Explain the return policy to a customer.", "Can I return an item after 45 days?")]


def _adapter(tiny_model_dir, tokenizer, folder, seed: int, *, sha: str | None = None, name: str | None = None):
    return make_adapter(tiny_model_dir, tokenizer, folder, seed, sha=sha, name=name)


@pytest.fixture(scope="module")
def two(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = _adapter(tiny_model_dir, tiny_tokenizer, root / "alpha", 1)
    b = _adapter(tiny_model_dir, tiny_tokenizer, root / "beta", 2)
    return load_session([a, b], log=lambda s: None)


def test_adapters_are_named_and_answer_differently_from_each_other_and_the_base(two):
    assert list(two.adapters) == ["alpha", "beta"]
    out = {name: [c.token_ids for c in generate_batch(two, PROMPTS, GREEDY, adapter=name)]
           for name in ("alpha", "beta", BASE)}
    assert out["alpha"] != out["beta"] and out["alpha"] != out[BASE] and out["beta"] != out[BASE]
    # selecting one adapter leaves no global state behind: the same call again gives the same answer
    assert [c.token_ids for c in generate_batch(two, PROMPTS, GREEDY, adapter="alpha")] == out["alpha"]
    assert generate(two, PROMPTS[0], GREEDY, adapter="beta").token_ids == out["beta"][0]


def test_base_equals_a_plain_transformers_model_from_disk(two, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok, template = two.tokenizer, two.adapter("alpha").template
    for msgs in PROMPTS:
        ids = torch.tensor([template.encode_prompt(tok, msgs)])
        with torch.no_grad():
            ref = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=template.stop_token_ids(tok), pad_token_id=tok.pad_token_id)
        got = generate(two, msgs, GREEDY, adapter=BASE)
        assert got.token_ids == ref[0, ids.shape[1]:].tolist()
        assert got.finish_reason == "length" and len(got.token_ids) == 8
        assert generate(two, msgs, GREEDY, use_adapter=False) == got


def test_counts_and_finish_reasons(two):
    msgs = PROMPTS[1]
    tok = two.tokenizer
    long = generate(two, msgs, GREEDY, adapter="alpha")
    prompt_len = len(two.adapter("alpha").template.encode_prompt(tok, msgs))
    assert (long.finish_reason, long.prompt_tokens, long.completion_tokens) == ("length", prompt_len, 8)
    assert long.completion_tokens == len(long.token_ids)
    # Make the third generated token a stop token: generation must end there, and say so.
    stop = long.token_ids[2]
    k = long.token_ids.index(stop)
    stopping = copy.copy(two)
    stopping.tokenizer = copy.deepcopy(tok)
    stopping.tokenizer.eos_token = tok.convert_ids_to_tokens(stop)
    short = generate(stopping, msgs, GREEDY, adapter="alpha")
    assert short.finish_reason == "stop" and short.token_ids == long.token_ids[:k]
    assert short.completion_tokens == k + 1, "the stop token is generated, and counted, but not returned"
    batched = generate_batch(stopping, [PROMPTS[0], msgs], GREEDY, adapter="alpha")
    assert batched[1] == short, "a row that stops early is not confused by the padding after it"


def test_an_adapter_for_another_base_is_refused(two, tiny_model_dir, tiny_tokenizer, tmp_path):
    other = _adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "other", 3, sha="0" * 64, name="another-model")
    with pytest.raises(LorakitError, match="trained on another base") as e:
        two.add_adapter(other)
    assert e.value.where.endswith("lorakit.json")
    with pytest.raises(LorakitError, match="already loaded"):
        two.add_adapter(two.adapter("alpha").path)
    with pytest.raises(LorakitError, match="no adapter named 'gamma'"):
        generate(two, PROMPTS[0], GREEDY, adapter="gamma")


@pytest.mark.parametrize("obj,where,message", [
    ([], "req.messages", "empty"),
    ({"role": "user"}, "req.messages", "expected a list"),
    ([{"role": "user"}], "req.messages message 0", "missing key 'content'"),
    ([{"role": "human", "content": "hi"}], "req.messages message 0", "'role' is 'human'"),
    ([{"role": "user", "content": ["a"]}], "req.messages message 0", "'content' must be a string"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "req.messages message 1",
     "nothing to answer"),
    (["hello"], "req.messages message 0", "expected an object"),
])
def test_message_errors_name_the_field_and_index(obj, where, message):
    with pytest.raises(LorakitError, match=message) as e:
        validate_messages(obj, "req.messages")
    assert e.value.where == where and e.value.hint


def test_messages_file(tmp_path):
    good = tmp_path / "m.json"
    good.write_text('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}')
    assert [m["role"] for m in read_messages_file(good)] == ["system", "user"]
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(LorakitError, match="cannot read messages") as e:
        read_messages_file(bad)
    assert e.value.where == str(bad)


def test_stop_cancels_after_the_next_token(two):
    """`stop` ends generation between tokens: the ids are a prefix of the uncancelled answer and the
    finish reason says so; an Event already set stops after the first token."""
    import threading

    full = generate(two, PROMPTS[0], GREEDY, adapter="alpha")
    assert len(full.token_ids) > 3  # so that a cut after 3 is a real cut
    calls = []

    def third_token() -> bool:  # transformers asks after each new token
        calls.append(1)
        return len(calls) >= 3

    cut = generate(two, PROMPTS[0], GREEDY, adapter="alpha", stop=third_token)
    assert cut.finish_reason == "cancelled" and cut.token_ids == full.token_ids[:3]
    event = threading.Event()
    event.set()
    rows = generate_batch(two, PROMPTS, GREEDY, adapter="alpha", stop=event)
    assert [c.finish_reason for c in rows] == ["cancelled"] * 2 and [len(c.token_ids) for c in rows] == [1, 1]
    # not set: nothing changes
    assert generate(two, PROMPTS[0], GREEDY, adapter="alpha", stop=threading.Event()) == full
