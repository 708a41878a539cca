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
