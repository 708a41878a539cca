"""Preference data (DPO / ORPO / SimPO pairs, KTO completions): rows, encoding, the length rule,
drop accounting, errors that name file, line and field, and what `lorakit data` prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit
from conftest import write_jsonl
from lorakit.config import from_dict
from lorakit.data.dataset import prepare
from lorakit.data.formats import detect_format, to_example
from lorakit.data.preference import (data_kind, encode_example, preference_kind, prepare_preference,
                                     to_preference_example)
from lorakit.data.report import CLOSE, OPEN, format_preference_report
from lorakit.data.templates import resolve_template
from lorakit.errors import DataError

W = "p.jsonl line 1"
ROWS = {
    "string-prompt": {"prompt": "Say hello.", "system": "Be brief.", "chosen": "Hello world!", "rejected": "Go away."},
    "messages-prompt": {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Order?"}],
                        "chosen": "Order number: #555", "rejected": "No."},
    "alpaca-prompt": {"instruction": "Classify this message.", "input": "Where is my order #12345?",
                      "chosen": "Category: shipping", "rejected": "Category: billing"},
    "conversational": {"prompt": [{"role": "user", "content": "Say hello."}],
                       "chosen": [{"role": "assistant", "content": "Hello world!"}],
                       "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Bye."}]}]},
    "kto": {"instruction": "Say hello.", "completion": [{"role": "assistant", "content": "Hello world!"}],
            "label": False},
}
SIDES = {"chosen", "rejected", "completion"}


def cfg_for(path, **data):
    return from_dict({"data": {"train": [str(path)], "template": "chatml", "val_fraction": 0, **data}})


def prompt_len(seq: dict) -> int:
    return next(i for i, x in enumerate(seq["labels"]) if x != -100)


# --------------------------------------------------------------------------- rows and encoding


@pytest.mark.parametrize("template_name", ["chatml", "alpaca"])
@pytest.mark.parametrize("form", list(ROWS))
def test_each_row_form_encodes_the_prompt_masked_and_the_response_trained(tiny_tokenizer, template_name, form):
    template = resolve_template(template_name, tiny_tokenizer)
    kind = detect_format(ROWS[form], W)
    assert kind == ("kto" if form == "kto" else "preference")
    example = to_preference_example(ROWS[form], kind, W)
    prompt_ids = template.encode_prompt(tiny_tokenizer, example["prompt"])
    item = encode_example(example, template, tiny_tokenizer, max_length=1024).item
    assert set(item) == ({"completion", "label"} if kind == "kto" else {"chosen", "rejected"})
    for side in SIDES & set(item):
        seq = item[side]
        assert seq["input_ids"][: len(prompt_ids)] == prompt_ids
        assert seq["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert prompt_len(seq) == len(prompt_ids), "the first response token is trained"
        response = tiny_tokenizer.decode(seq["input_ids"][len(prompt_ids):])
        assert response.startswith(example[side]) and tiny_tokenizer.eos_token in response
    if kind == "kto":
        assert item["label"] is False


def test_row_forms_become_one_example_shape():
    assert to_preference_example(ROWS["string-prompt"], "preference", W) == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
        "chosen": "Hello world!", "rejected": "Go away."}
    alpaca = to_preference_example(ROWS["alpaca-prompt"], "preference", W)
    same_as_sft = to_example({**ROWS["alpaca-prompt"], "output": "x"}, "alpaca", W)["messages"][:-1]
    assert alpaca["prompt"] == same_as_sft == [
        {"role": "user", "content": "Classify this message.", "input": "Where is my order #12345?"}]
    assert to_preference_example(ROWS["conversational"], "preference", W)["rejected"] == "Bye."
    assert to_preference_example(ROWS["kto"], "kto", W) == {
        "prompt": [{"role": "user", "content": "Say hello.", "input": ""}], "completion": "Hello world!",
        "label": False}


@pytest.mark.parametrize("form", ["string-prompt", "alpaca-prompt", "messages-prompt"])
def test_chosen_trains_exactly_what_sft_trains_on_that_answer(tiny_tokenizer, form):
    template = resolve_template("alpaca" if form == "alpaca-prompt" else "chatml", tiny_tokenizer)
    example = to_preference_example(ROWS[form], "preference", W)
    item = encode_example(example, template, tiny_tokenizer, max_length=1024).item
    conversation = {"messages": [*example["prompt"], {"role": "assistant", "content": example["chosen"]}]}
    ids, labels = template.encode(tiny_tokenizer, conversation)
    assert item["chosen"]["input_ids"] == ids
    n = prompt_len(item["chosen"])
    assert item["chosen"]["labels"][n:] == labels[n:], "response, end-of-turn and EOS trained as SFT trains them"
    if form == "messages-prompt":  # SFT also trains the earlier assistant turn; a preference prompt never is
        assert any(x != -100 for x in labels[:n])


LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.mark.parametrize("template_name", ["chatml", "alpaca"])
def test_left_truncation_keeps_responses_whole_and_the_prompt_tail(tiny_tokenizer, tmp_path, template_name):
    row = {"prompt": LONG_PROMPT, "chosen": "Our standard return policy covers items within 30 days.",
           "rejected": "No."}
    path = write_jsonl(tmp_path / "p.jsonl", [row, {"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}])
    template = resolve_template(template_name, tiny_tokenizer)
    example = to_preference_example(row, "preference", W)
    whole = encode_example(example, template, tiny_tokenizer, max_length=1024).item
    prompt_ids = template.encode_prompt(tiny_tokenizer, example["prompt"])
    chosen_part = whole["chosen"]["input_ids"][len(prompt_ids):]
    max_length = len(chosen_part) + 20
    assert len(prompt_ids) > 20

    p = prepare_preference(cfg_for(path, template=template_name, max_length=max_length), tiny_tokenizer)
    item = p.train[0]
    starts_with_bos = prompt_ids[0] == tiny_tokenizer.bos_token_id
    assert starts_with_bos == (template_name == "chatml")  # this tokenizer's BOS opens chatml turns
    kept = prompt_ids[:1] + prompt_ids[-19:] if starts_with_bos else prompt_ids[-20:]
    assert item["chosen"]["input_ids"] == kept + chosen_part
    assert len(item["chosen"]["input_ids"]) == max_length
    assert item["rejected"]["input_ids"] == kept + whole["rejected"]["input_ids"][len(prompt_ids):]
    for side in ("chosen", "rejected"):
        n_response = len(whole[side]["labels"]) - len(prompt_ids)
        assert item[side]["labels"] == [-100] * 20 + whole[side]["labels"][len(prompt_ids):]
        assert len(item[side]["labels"]) == 20 + n_response
    assert p.stats.truncated == 1 and [n.where for n in p.stats.truncated_rows] == [f"{path} line 1"]
    assert "prompt cut from" in p.stats.truncated_rows[0].reason
    assert p.stats.length_percentiles["max"] == len(whole["chosen"]["input_ids"]), "lengths are before the cut"


def test_identical_pair_and_unfittable_response_are_dropped_and_counted(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "Say hello.", "chosen": "Hello world!", "rejected": "Go away."},
            {"prompt": "Say hello.", "chosen": "Same.", "rejected": "Same."},
            {"prompt": "Hi", "chosen": "No.", "rejected": "Hello world! " * 30}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    p = prepare_preference(cfg_for(path, max_length=40), tiny_tokenizer)
    assert p.stats.rows == {"train": 3, "validation": 0} and p.stats.counts == {"train": 1, "validation": 0}
    notes = {n.where: n.reason for n in p.stats.dropped}
    assert set(notes) == {f"{path} line 2", f"{path} line 3"}
    assert "same text" in notes[f"{path} line 2"]
    assert "rejected" in notes[f"{path} line 3"] and "never cut" in notes[f"{path} line 3"]
    assert p.train_where == [f"{path} line 1"] and p.train_examples[0]["chosen"] == "Hello world!"
    # With data.overlong: drop, an overlong pair is left out rather than its prompt cut.
    long_prompt = write_jsonl(tmp_path / "l.jsonl", [rows[0], {"prompt": LONG_PROMPT, "chosen": "A", "rejected": "B"}])
    dropped = prepare_preference(cfg_for(long_prompt, max_length=40, overlong="drop"), tiny_tokenizer)
    assert dropped.stats.truncated == 0 and "data.overlong: drop" in dropped.stats.dropped[0].reason
    cut = prepare_preference(cfg_for(long_prompt, max_length=40), tiny_tokenizer)
    assert cut.stats.truncated == 1 and cut.stats.counts["train"] == 2


def test_all_rows_dropped_is_an_error_naming_them(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}])
    with pytest.raises(DataError) as info:
        prepare_preference(cfg_for(path), tiny_tokenizer)
    assert "all 1 training rows were dropped" in str(info.value) and f"{path} line 1" in str(info.value)


def test_prepare_counts_split_limit_stats_and_fingerprint(tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"Say {i}.", "chosen": f"Number {i}", "rejected": "No."} for i in range(10)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    p = prepare_preference(cfg_for(path, val_fraction=0.25, limit=8), tiny_tokenizer)
    assert p.kind == "preference" and p.template.name == "chatml"
    assert p.stats.counts == {"train": 6, "validation": 2} and p.stats.formats == {"preference": 8}
    seqs = [item[side] for item in p.train for side in ("chosen", "rejected")]
    assert p.stats.tokens["train"] == sum(len(s["input_ids"]) for s in seqs)
    assert p.stats.trained_tokens["train"] == sum(x != -100 for s in seqs for x in s["labels"])
    assert len(p.train_examples) == len(p.train_where) == 6
    again = prepare_preference(cfg_for(path, val_fraction=0.25, limit=8), tiny_tokenizer)
    assert again.fingerprint == p.fingerprint and again.validation_where == p.validation_where

    kto = [{"prompt": "Say hello.", "completion": "Hello world!", "label": True},
           {"prompt": "Say hello.", "completion": "Go away.", "label": False}]
    a = prepare_preference(cfg_for(write_jsonl(tmp_path / "a.jsonl", kto)), tiny_tokenizer)
    flipped = [{**row, "label": not row["label"]} for row in kto]
    b = prepare_preference(cfg_for(write_jsonl(tmp_path / "b.jsonl", flipped)), tiny_tokenizer)
    assert a.kind == "kto" and [item["label"] for item in a.train] == [True, False]
    assert a.fingerprint != b.fingerprint, "a flipped KTO label is different training data"


# --------------------------------------------------------------------------- errors


BAD_ROWS = {
    "missing-rejected": ({"prompt": "Hi", "chosen": "Hello"}, "field 'rejected'", "missing"),
    "kto-label-not-bool": ({"prompt": "Hi", "completion": "Hello", "label": 1}, "field 'label'",
                           "expected true or false, got int 1"),
    "kto-label-string": ({"prompt": "Hi", "completion": "Hello", "label": "true"}, "field 'label'", "got str"),
    "empty-chosen": ({"prompt": "Hi", "chosen": " ", "rejected": "Bye"}, "field 'chosen'", "empty"),
    "user-in-chosen": ({"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello"}], "rejected": "Bye"},
                       "field 'chosen[0].role'", "a user turn in the answer"),
    "null-prompt": ({"prompt": None, "chosen": "Hello", "rejected": "Bye"}, "field 'prompt'", "null"),
    "number-rejected": ({"prompt": "Hi", "chosen": "Hello", "rejected": 3}, "field 'rejected'", "got int 3"),
    "sft-row": ({"prompt": "Hi", "completion": "Hello"}, "line 2: a supervised (prompt_completion) row",
                "no 'chosen' and 'rejected'"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_line_field_and_fix(tiny_tokenizer, tmp_path, case):
    row, field, what = BAD_ROWS[case]
    first = {"prompt": "Say hello.", "completion": "Hello", "label": True} if "label" in row else \
        {"prompt": "Say hello.", "chosen": "Hello", "rejected": "Bye"}
    path = write_jsonl(tmp_path / "bad.jsonl", [first, row])
    with pytest.raises(DataError) as info:
        prepare_preference(cfg_for(path), tiny_tokenizer)
    msg = str(info.value)
    assert f"{path} line 2" in msg and field in msg and what in msg, msg
    assert "fix:" in msg
    if case == "sft-row":
        assert "chosen, rejected" in msg, "the hint lists the keys a pair needs"


def test_an_sft_run_refuses_a_preference_row_by_line(tiny_tokenizer, tmp_path):
    rows = [{"instruction": "Say hello.", "output": "Hello"}, {"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare(cfg_for(path), tiny_tokenizer)
    msg = str(info.value)
    assert f"{path} line 2" in msg and "a preference row" in msg and "instruction, output" in msg, msg


# --------------------------------------------------------------------------- detection


def test_auto_detection(tmp_path):
    assert detect_format({"prompt": "q", "chosen": "a", "rejected": "b"}, W) == "preference"
    assert detect_format({"instruction": "q", "rejected": "b"}, W) == "preference"  # then: 'chosen' missing
    assert detect_format({"messages": [], "chosen": "a"}, W) == "preference"
    assert detect_format({"instruction": "q", "completion": "a", "label": True}, W) == "kto"
    assert detect_format({"prompt": "q", "completion": "a"}, W) == "prompt_completion"  # SFT as before
    assert detect_format({"prompt": "q", "label": True}, W) == "prompt_completion"
    assert detect_format({"instruction": "q", "output": "a"}, W) == "alpaca"

    def kind(rows, fmt="auto"):
        return preference_kind(from_dict({"data": {"train": [str(write_jsonl(tmp_path / "d.jsonl", rows))],
                                                   "format": fmt}}).data)

    assert kind([{"prompt": "q", "chosen": "a", "rejected": "b"}]) == "preference"
    assert kind([{"prompt": "q", "completion": "a", "label": False}]) == "kto"
    assert kind([{"prompt": "q", "completion": "a"}]) is None
    assert kind([{"question": "q"}]) is None, "undetectable rows are left to the SFT path's error"
    assert kind([{"prompt": "q", "completion": "a"}], fmt="kto") == "kto"
    with pytest.raises(DataError) as info:
        data_kind(from_dict({"data": {"train": [str(tmp_path / "d.jsonl")]}}).data)
    assert "supervised (prompt_completion) row" in str(info.value) and f"{tmp_path / 'd.jsonl'} line 1" in str(
        info.value)


# --------------------------------------------------------------------------- lorakit data


def test_report_shows_the_prompt_once_and_both_responses_marked(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "Say hello.", "chosen": "Hello world!", "rejected": "Go away."},
            {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}]
    p = prepare_preference(cfg_for(write_jsonl(tmp_path / "p.jsonl", rows)), tiny_tokenizer)
    text = format_preference_report(p, tiny_tokenizer)
    assert "train         1 pairs  (1 of 2 rows dropped)" in text and "Dropped rows (1)" in text
    assert text.count("Say hello.") == 1
    assert f"prompt: {prompt_len(p.train[0]['chosen'])} tokens\n<|im_start|>user\nSay hello.<|im_end|>" in text
    assert f"chosen: 7 of 8 tokens trained\n{OPEN}Hello world!<|im_end|>{CLOSE}\n" in text
    assert f"rejected: 7 of 8 tokens trained\n{OPEN}Go away.<|im_end|>{CLOSE}\n" in text


def test_lorakit_data_command_on_a_preference_config(tiny_model_dir, tmp_path):
    rows = [{"prompt": "Say hello.", "chosen": "Hello world!", "rejected": "Go away."}] * 4 + [
        {"instruction": "Classify.", "input": "Where is my order?", "chosen": "shipping", "rejected": "shipping"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\n  template: chatml\n"
                   "  val_fraction: 0\n")
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "lorakit", "data", str(cfg)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Data (preference: prompt, chosen, rejected)" in text
    assert "train         4 pairs  (1 of 5 rows dropped)" in text and "validation    0 pairs" in text
    assert "formats       preference 5" in text
    assert f"{data} line 5: chosen and rejected are the same text" in text
    assert f"Pair ({data} line 1)" in text
    assert f"{OPEN}Hello world!<|im_end|>{CLOSE}" in text and f"{OPEN}Go away.<|im_end|>{CLOSE}" in text


def test_a_template_whose_prompt_is_not_the_conversation_start_is_named_with_the_row(tiny_tokenizer, tmp_path):
    odd = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'answer: ' }}{% endif %}")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}])
    with pytest.raises(DataError) as info:
        prepare_preference(cfg_for(path, template=odd), tiny_tokenizer)
    msg = str(info.value)
    assert f"{path} line 1" in msg and "template 'custom'" in msg and "fix:" in msg, msg


def test_kto_report_counts_labels(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "Say hello.", "completion": "Hello world!", "label": True},
            {"prompt": "Say hello.", "completion": "Go away.", "label": False},
            {"prompt": "Hi", "completion": "Bye.", "label": False}]
    p = prepare_preference(cfg_for(write_jsonl(tmp_path / "k.jsonl", rows)), tiny_tokenizer)
    text = format_preference_report(p, tiny_tokenizer)
    assert "Data (kto: prompt, completion, label)" in text and "train         3 completions" in text
    assert "labels        1 desirable, 2 undesirable (train)" in text
    assert "label true (desirable)" in text and f"completion: 7 of 8 tokens trained\n{OPEN}Hello world!" in text
