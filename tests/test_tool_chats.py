"""Chats that users actually have: tools, tool calls, tool results and reasoning.

The loss trains what the assistant produces (its reasoning, text and tool calls) and nothing it
is given (the tools' descriptions, the user, the tools' results); `data.reasoning: drop` removes
the reasoning; the built-in ChatML renders the Hermes tool conventions and is unchanged for plain
chats; a template of another family's shape (tools described as JSON in the user turn, calls as
bare JSON, as Llama 3.1 does) masks the same way; bad rows name their field."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config, write_jsonl
from test_templates import decode, trained_runs

from lorakit.data.formats import drop_reasoning, to_example
from lorakit.data.templates import resolve_template
from lorakit.errors import DataError

TOOLS = [{"type": "function", "function": {"name": "get_order", "description": "Look an order up.",
                                           "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}}}}]
ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "You are the order desk."},
        {"role": "user", "content": "Where is order 12345?"},
        {"role": "assistant", "content": None, "reasoning_content": "I must look it up first.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_order", "arguments": "{\"id\": 12345}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"status\": \"shipped\"}"},
        {"role": "assistant", "content": "Order 12345 has shipped."},
    ],
}

# Llama 3.1's shape: the tools as JSON in the first user turn, a call as a bare JSON object with
# "parameters", a result in an "ipython" turn (written here for the test, not copied).
LLAMA31_SHAPE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' and tools and loop.index0 == (1 if messages[0]['role'] == 'system' else 0) -%}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nFunctions:\\n' -}}"
    "{%- for t in tools -%}{{- (t | tojson) + '\\n' -}}{%- endfor -%}{{- m['content'] + '<|eot_id|>' -}}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- for c in m['tool_calls'] -%}{{- ({'name': c['function']['name'], 'parameters': c['function']['arguments']}"
    " | tojson) -}}{%- endfor -%}{{- '<|eot_id|>' -}}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


def _trained_and_not(tokenizer, spec, example):
    ids, labels = resolve_template(spec, tokenizer).encode(tokenizer, example)
    trained = "".join(trained_runs(tokenizer, ids, labels))
    return trained, decode(tokenizer, ids)


def test_chatml_trains_the_reasoning_and_the_call_and_not_the_tools_or_results(tiny_tokenizer):
    example = to_example(ROW, "messages", "data.jsonl:1")
    assert example["tools"] == TOOLS
    call = example["messages"][2]
    assert call["reasoning"] == "I must look it up first."
    assert call["tool_calls"][0]["function"]["arguments"] == {"id": 12345}  # the JSON string, parsed
    trained, full = _trained_and_not(tiny_tokenizer, "chatml", example)
    assert '<tool_call>\n{"name": "get_order", "arguments": {"id": 12345}}\n</tool_call>' in trained
    assert "<think>\nI must look it up first.\n</think>" in trained and "Order 12345 has shipped." in trained
    for given in ("Look an order up.", "<tools>", "Where is order 12345?", '{"status": "shipped"}', "order desk"):
        assert given in full and given not in trained, given
    assert full.index("<tools>") < full.index("You are the order desk.") + 200  # one system turn holds both


def test_reasoning_dropped_is_neither_shown_nor_trained(tiny_tokenizer):
    inline = json.loads(json.dumps(ROW))
    inline["messages"][4]["content"] = "<think>\nIt said shipped.\n</think>\n\nOrder 12345 has shipped."
    example = drop_reasoning(to_example(inline, "messages", "data.jsonl:1"))
    trained, full = _trained_and_not(tiny_tokenizer, "chatml", example)
    assert "think" not in full and "look it up" not in full and "It said shipped" not in full
    assert "Order 12345 has shipped." in trained and "<tool_call>" in trained


def test_a_plain_chat_renders_as_plain_chatml(tiny_tokenizer):
    plain = ("{%- for message in messages -%}"
             "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
             "{%- endfor -%}"
             "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ours, theirs = resolve_template("chatml", tiny_tokenizer), resolve_template(plain, tiny_tokenizer)
    for n in (2, 3):
        assert ours.render(msgs[:n], add_generation_prompt=n == 2) == theirs.render(msgs[:n], add_generation_prompt=n == 2)


def test_a_template_of_another_shape_gets_the_tools_and_masks_the_same_way(tiny_tokenizer):
    example = to_example(ROW, "messages", "data.jsonl:1")
    trained, full = _trained_and_not(tiny_tokenizer, LLAMA31_SHAPE, drop_reasoning(example))
    assert '{"name": "get_order", "parameters": {"id": 12345}}' in trained
    assert "Functions:" in full and "Functions:" not in trained
    assert "ipython" in full and '{"status": "shipped"}' not in trained
    assert "Order 12345 has shipped." in trained


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{id: 5"), "messages[2].tool_calls[0]"
     ".function.arguments", "not JSON"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].pop("name"), "messages[2].tool_calls[0]", "function.name"),
    (lambda r: r.update(tools={"name": "x"}), "'tools'", "list of tools"),
    (lambda r: r["messages"][2].pop("tool_calls"), "messages[2].content", "expected text, got NoneType"),
])
def test_bad_tool_rows_name_file_line_and_field(change, field, words):
    row = json.loads(json.dumps(ROW))
    change(row)
    with pytest.raises(DataError) as e:
        to_example(row, "messages", "data.jsonl:7")
    text = str(e.value)
    assert "data.jsonl:7" in text and field in text and words in text, text


def test_lorakit_data_shows_the_masked_tool_call(tmp_path, tiny_model_dir):
    from lorakit import config
    from lorakit.pipeline import data_report

    data = write_jsonl(tmp_path / "tools.jsonl", [ROW] * 4)
    cfg = tiny_config(tmp_path, tiny_model_dir, "tools", data={"train": [str(data)], "template": "chatml",
                                                                "max_length": 512, "val_fraction": 0.0})
    text = data_report(config.from_dict(cfg))
    assert "get_order" in text and "tool_call" in text and "4" in text


# --------------------------------------------------------------------------- served

SHORT_TOOLS = [{"type": "function", "function": {"name": "get_order"}}]
SERVED = {"tools": SHORT_TOOLS, "messages": ROW["messages"][1:]}
"""ROW without its system turn and with a one-line tool: short enough for a tiny model to learn
to write the call, and its stop, in a few hundred steps."""


def test_parse_calls_reads_hermes_calls_and_leaves_anything_else_as_text():
    from lorakit.infer.tools import held_back, parse_calls, tool_format
    from lorakit.data.templates import CHATML

    assert tool_format(CHATML) == "hermes" and tool_format("{{ messages }}") is None
    text, calls = parse_calls('Let me look.\n<tool_call>\n{"name": "get_order", "arguments": {"id": 5}}\n</tool_call>')
    assert text == "Let me look." and [c["function"] for c in calls] == [{"name": "get_order", "arguments": '{"id": 5}'}]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    two = parse_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b"}</tool_call>')
    assert two[0] is None and [c["function"]["name"] for c in two[1]] == ["a", "b"]
    for not_a_call in ("no call here", "<tool_call>{not json}</tool_call>", '<tool_call>["a"]</tool_call>'):
        assert parse_calls(not_a_call) == (not_a_call, [])
    assert [held_back(t) for t in ("abc", "abc<", "abc<tool_c", "<tool_call")] == [0, 1, 7, 10]


def test_streamed_reasoning_splits_as_the_whole_answer_does():
    """However an answer is cut into streamed pieces, the reasoning and content deltas add up to
    split_reasoning's parts of the whole: whitespace around the block, markers cut mid-way, a
    block never closed (all reasoning), a block not at the start (content)."""
    import random

    from lorakit.infer.tools import ReasoningStream, split_reasoning

    answers = ["<think>\nabc </think>\n\nhello", "  <think> x</think>", "plain <think>a</think>", "<think>unclosed  ",
               "<thi", "\n\n<think>\n\n</think>\n\nans  ", "</think> x", "<think>a</thinkb</think>c", " answer",
               '<think> a \n b </think> c <tool_call>{"name": "f"}</tool_call>']
    rng = random.Random(0)
    for text in answers:
        for _ in range(200):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
            stream, got = ReasoningStream(), ["", ""]
            for piece in [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])] + [None]:
                parts = stream.end() if piece is None else stream.feed(piece)
                got = [got[0] + parts[0], got[1] + parts[1]]
            want = split_reasoning(text)
            assert (got[0] or None, got[1] or None) == (want[0] or None, want[1] or None), (text, cuts)
    assert split_reasoning("<think> still thinking") == ("still thinking", None)


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """A run trained until it answers ROW's question with ROW's tool call (and, given the result,
    with its answer): a model that really writes calls, for the server to read back. Its context is
    1,024 positions (the tests' 400-token vocabulary spends many tokens on JSON), and its tokenizer
    has no pad token: the shared tiny model's pad is its EOS, and transformers zeroes the padding
    row of the (tied) embedding, so that model's EOS logit is stuck at 0, which a LoRA cannot move
    and a call's end needs to win."""
    from conftest import build_tiny_model

    from lorakit import config
    from lorakit.train.run import train

    tmp = tmp_path_factory.mktemp("caller")
    model = build_tiny_model(tmp / "model", max_position_embeddings=1024, pad_is_eos=False)
    data = write_jsonl(tmp / "calls.jsonl", [SERVED] * 8)
    cfg = tiny_config(tmp, model, "caller", data={"train": [str(data)], "template": "chatml",
                                                            "max_length": 1024, "val_fraction": 0.0},
                      lora={"r": 16, "alpha": 32, "dropout": 0.0}, train={"max_steps": 150, "lr": 1e-2})
    return train(config.from_dict(cfg), log=lambda s: None, progress=False)


def test_the_server_reads_the_models_tool_call_back_into_tool_calls(caller):
    """/v1/chat/completions with `tools`, through the real `openai` client: the tools reach the
    prompt, the trained model's call comes back in `tool_calls` (finish_reason tool_calls), streamed
    or not; sent back with the tool's result, the next answer is text."""
    import openai
    from test_serve_app import running

    from lorakit import infer
    from lorakit.serve.app import Limits, create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import Registry

    session = infer.load_session([caller / "adapter"], log=lambda *_: None)
    name = next(iter(session.adapters))
    engine = Engine(session, log=lambda *_: None)
    app = create_app(engine, Registry(engine), api_key=None, limits=Limits(max_tokens_cap=400, timeout_s=120))
    question = SERVED["messages"][:1]
    with running(app, engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=name, messages=question, tools=SHORT_TOOLS, max_tokens=200, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_order" and json.loads(call.function.arguments) == {"id": 12345}
        assert choice.message.reasoning_content == "I must look it up first." and choice.message.content is None
        # streamed: the same call, as one tool_calls delta, and no <tool_call> text leaked as content
        chunks = list(client.chat.completions.create(model=name, messages=question, tools=SHORT_TOOLS, max_tokens=200,
                                                     temperature=0, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        assert "<tool_call>" not in content and [d.function.name for d in deltas] == ["get_order"]
        said = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        assert said == choice.message.reasoning_content and "think>" not in content  # streamed as answered whole
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the call and its result sent back: the model answers in text
        follow = question + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()],
                              "reasoning_content": choice.message.reasoning_content},
                             {"role": "tool", "tool_call_id": call.id, "content": ROW["messages"][3]["content"]}]
        r = client.chat.completions.create(model=name, messages=follow, tools=SHORT_TOOLS, max_tokens=100, temperature=0)
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        assert r.choices[0].message.content == "Order 12345 has shipped."
        # without tools the same model's answer is plain text, unparsed
        r = client.chat.completions.create(model=name, messages=question, max_tokens=200, temperature=0)
        assert not r.choices[0].message.tool_calls
