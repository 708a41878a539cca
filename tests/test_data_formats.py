"""Each row format becomes one Example shape; every bad row names file, line and field."""

from __future__ import annotations

import json

import pytest

from lorakit.data.formats import detect_format, to_example
from lorakit.data.sources import read_rows
from lorakit.errors import DataError

W = "t.jsonl line 1"


def test_alpaca_with_input_and_system():
    row = {"instruction": "Classify.", "input": "Where is my order?", "output": "shipping", "system": "Be brief."}
    assert to_example(row, "auto", W) == {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Classify.", "input": "Where is my order?"},
        {"role": "assistant", "content": "shipping"},
    ]}


def test_alpaca_missing_or_null_input_is_empty():
    for row in ({"instruction": "Hi.", "output": "Hello"}, {"instruction": "Hi.", "input": None, "output": "Hello"}):
        assert to_example(row, "alpaca", W)["messages"][0] == {"role": "user", "content": "Hi.", "input": ""}


def test_prompt_completion():
    row = {"prompt": "2+2=", "completion": "4"}
    assert detect_format(row, W) == "prompt_completion"
    assert to_example(row, "auto", W) == {"messages": [{"role": "user", "content": "2+2="},
                                                       {"role": "assistant", "content": "4"}]}


def test_messages_keeps_openai_roles_and_text_parts():
    row = {"messages": [{"role": "developer", "content": "Be kind."},
                        {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                     {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": "Hello!"},
                        {"role": "tool", "content": "42"},
                        {"role": "assistant", "content": "It is 42."}]}
    assert [(m["role"], m["content"]) for m in to_example(row, "auto", W)["messages"]] == [
        ("system", "Be kind."), ("user", "Hi there"), ("assistant", "Hello!"), ("tool", "42"), ("assistant", "It is 42.")]


def test_sharegpt_roles_are_mapped():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}]}
    assert detect_format(row, W) == "sharegpt"
    assert to_example(row, "auto", W)["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_text():
    assert to_example({"text": "raw words"}, "auto", W) == {"text": "raw words"}


def test_undetectable_row_lists_expected_keys():
    with pytest.raises(DataError) as info:
        detect_format({"question": "q", "answer": "a"}, W)
    msg = str(info.value)
    assert W in msg and "'question'" in msg and "instruction, output" in msg and "data.format" in msg


def test_explicit_format_with_wrong_keys_names_the_missing_field():
    with pytest.raises(DataError) as info:
        to_example({"text": "x"}, "prompt_completion", W)
    assert "field 'prompt'" in str(info.value) and "missing" in str(info.value)


BAD_ROWS = {
    "output-number": ({"instruction": "Add.", "output": 42}, "field 'output'", "got int 42"),
    "output-null": ({"instruction": "Add.", "output": None}, "field 'output'", "null"),
    "output-missing": ({"instruction": "Add."}, "field 'output'", "missing"),
    "output-empty": ({"instruction": "Add.", "output": "  "}, "field 'output'", "empty"),
    "instruction-list": ({"instruction": ["a"], "output": "b"}, "field 'instruction'", "got list"),
    "messages-not-list": ({"messages": "hi"}, "field 'messages'", "expected a list"),
    "turn-not-object": ({"messages": ["hi"]}, "field 'messages[0]'", "expected an object"),
    "role-unknown": ({"messages": [{"role": "bot", "content": "x"}]}, "field 'messages[0].role'", "unknown role"),
    "content-null": ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
                     "field 'messages[0].content'", "got NoneType"),
    "no-assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages'", "no assistant turn"),
    "sharegpt-speaker": ({"conversations": [{"from": "robot", "value": "x"}]}, "field 'conversations[0].from'",
                         "unknown speaker"),
    "text-number": ({"text": 3.5}, "field 'text'", "got float"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_in_a_file_names_file_line_field_and_fix(tmp_path, case):
    row, field, what = BAD_ROWS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "Say hello.", "output": "Hello"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        for r, where in read_rows(str(path)):
            to_example(r, "auto", where)
    msg = str(info.value)
    assert f"{path} line 2, {field}" in msg, msg
    assert what in msg, msg
    assert "fix:" in msg


def test_csv_chat_cell_hint(tmp_path):
    with pytest.raises(DataError) as info:
        to_example({"messages": '[{"role": "user"}]'}, "auto", "chat.csv line 2")
    assert "chat.csv line 2" in str(info.value) and "JSONL" in str(info.value)
