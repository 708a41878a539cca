"""prepare(): reading, splitting, overlong policy, drop accounting, fingerprint, and the report."""

from __future__ import annotations

import json

import pytest

from conftest import ALPACA_ROWS, write_jsonl
from lorakit.config import from_dict
from lorakit.data.collate import Collator
from lorakit.data.dataset import percentiles, prepare
from lorakit.data.report import format_report
from lorakit.errors import DataError

# With the conftest tokenizer and the alpaca template: ALPACA_ROWS are 30-87 tokens, LONG is
# 385 (a 23-token prompt), LONG_PROMPT 419 (a 416-token prompt); MAX sits between.
LONG = {"instruction": "Say hello.", "output": "Hello world! " * 60}
LONG_PROMPT = {"instruction": "The quick brown fox jumps over the lazy dog. " * 20, "output": "Hi"}
MAX = 100


def cfg_for(train, **data):
    data = {"train": [str(p) for p in (train if isinstance(train, list) else [train])], "template": "alpaca", **data}
    return from_dict({"data": data})


def test_prepare_alpaca_file(tiny_tokenizer, alpaca_file):
    p = prepare(cfg_for(alpaca_file, val_fraction=0.25), tiny_tokenizer)
    assert p.stats.counts == {"train": 12, "validation": 4}
    assert len(p.train) == len(p.train_examples) == len(p.train_where) == 12
    assert p.stats.formats == {"alpaca": 16}
    assert p.template.name == "alpaca"
    trained = sum(1 for item in p.train for x in item["labels"] if x != -100)
    assert p.stats.trained_tokens["train"] == trained > 0
    assert p.stats.tokens["train"] == sum(len(item["input_ids"]) for item in p.train)
    assert p.stats.dropped == [] and p.stats.truncated == 0
    # Example order follows the file; every item ends with a trained EOS.
    assert all(item["labels"][-1] == tiny_tokenizer.eos_token_id for item in p.train + p.validation)


def test_seeded_split_is_reproducible_and_seed_dependent(tiny_tokenizer, tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": f"Number {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "n.jsonl", rows)
    def split(seed):
        cfg = from_dict({"data": {"train": [str(path)], "template": "alpaca"}, "train": {"seed": seed}})
        return prepare(cfg, tiny_tokenizer).validation_where

    first = split(42)
    assert len(first) == 4
    assert split(42) == first
    assert split(7) != first


def test_truncate_vs_drop_counts(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", ALPACA_ROWS[:4] + [LONG, LONG_PROMPT])
    common = dict(max_length=MAX, val_fraction=0)
    cut = prepare(cfg_for(path, overlong="truncate", **common), tiny_tokenizer)
    assert cut.stats.truncated == 1 and [n.where for n in cut.stats.truncated_rows] == [f"{path} line 5"]
    # The long prompt leaves no response token inside MAX tokens: dropped even under truncate.
    assert [(n.where, "no trained token left" in n.reason) for n in cut.stats.dropped] == [(f"{path} line 6", True)]
    assert all(len(item["input_ids"]) <= MAX for item in cut.train)
    assert len(cut.train[-1]["input_ids"]) == MAX
    assert cut.stats.counts["train"] == 5

    drop = prepare(cfg_for(path, overlong="drop", **common), tiny_tokenizer)
    assert drop.stats.truncated == 0
    assert [n.where for n in drop.stats.dropped] == [f"{path} line 5", f"{path} line 6"]
    assert "data.overlong: drop" in drop.stats.dropped[0].reason
    assert drop.stats.counts["train"] == 4
    assert drop.stats.length_percentiles["max"] == 419  # lengths are measured before truncation


def test_every_row_dropped_is_an_error(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [LONG, LONG])
    with pytest.raises(DataError) as info:
        prepare(cfg_for(path, max_length=16, overlong="drop", val_fraction=0), tiny_tokenizer)
    msg = str(info.value)
    assert "all 2 training rows were dropped" in msg and "long.jsonl line 1" in msg and "data.max_length" in msg


def test_limit_validation_file_and_mixed_sources(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS[:3])
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2=", "completion": "4"}] * 3), tmp_path / "b.parquet")
    chat = tmp_path / "c.json"
    chat.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello world!"}]}]))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "Hello world!"}])
    cfg = cfg_for([jsonl, tmp_path / "b.parquet", chat], validation=[str(val)], limit=5)
    p = prepare(cfg, tiny_tokenizer)
    assert p.stats.counts == {"train": 5, "validation": 1}
    assert p.stats.formats == {"alpaca": 3, "prompt_completion": 2, "text": 1}
    assert p.train_where[-1] == f"{tmp_path / 'b.parquet'} row 1"
    assert p.validation_examples == [{"text": "Hello world!"}]


def test_bad_row_through_prepare_names_file_and_line(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS[:2] + [{"instruction": "Add.", "output": None}])
    with pytest.raises(DataError) as info:
        prepare(cfg_for(path), tiny_tokenizer)
    assert f"{path} line 3, field 'output'" in str(info.value)


def test_template_failure_names_the_row(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Yo"}]}])
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
             "{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError) as info:
        prepare(cfg_for(path, template=strict, val_fraction=0), tiny_tokenizer)
    assert f"{path} line 2" in str(info.value) and "no system" in str(info.value)


def test_fingerprint_is_stable_and_tracks_the_tokens(tiny_tokenizer, alpaca_file):
    a = prepare(cfg_for(alpaca_file), tiny_tokenizer)
    b = prepare(cfg_for(alpaca_file), tiny_tokenizer)
    c = prepare(cfg_for(alpaca_file, template="chatml"), tiny_tokenizer)
    d = prepare(cfg_for(alpaca_file, train_on_inputs=True), tiny_tokenizer)
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def test_collator_pads_right_to_multiple(tiny_tokenizer, alpaca_file):
    p = prepare(cfg_for(alpaca_file), tiny_tokenizer)
    feats = p.train[:3]
    batch = Collator(tiny_tokenizer.pad_token_id, pad_to_multiple_of=8)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= longest
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert batch["labels"][row, :n].tolist() == f["labels"]
        assert batch["attention_mask"][row].sum().item() == n
        assert (batch["labels"][row, n:] == -100).all()


def test_percentiles_nearest_rank():
    assert percentiles(range(1, 101)) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


def test_report_shows_counts_drops_and_the_loss_mask(tiny_tokenizer, tmp_path):
    rows = ALPACA_ROWS[:2] + [LONG] * 12
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    p = prepare(cfg_for(path, max_length=MAX, overlong="drop", val_fraction=0), tiny_tokenizer)
    text = format_report(p, tiny_tokenizer)
    assert "train         2 examples  (12 of 14 rows dropped)" in text
    assert "Dropped rows (12)" in text and f"{path} line 3:" in text and "... and 2 more" in text
    assert f"{path} line 12:" in text and f"{path} line 13:" not in text  # only the first 10 are listed
    assert "p50" in text and "p99" in text
    assert f"({p.stats.trained_tokens['train'] / p.stats.tokens['train'] * 100:.1f}%)" in text
    # The example: prompt plain, the response and its EOS inside the markers, with the token count.
    example_items = p.train[0]
    n_trained = sum(1 for x in example_items["labels"] if x != -100)
    assert f"{n_trained:,} of {len(example_items['input_ids']):,} tokens" in text
    assert "### Instruction:\nExplain the return policy to a customer.\n\n### Input:\n" in text
    assert "### Response:\n\u27e6Our standard return policy covers items within 30 days of purchase.<|im_end|>\u27e7" \
        in text
