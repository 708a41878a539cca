"""Property-based fuzzing of the data and config loaders: bad input only ever yields LorakitError.

Whatever bytes a data file holds and whatever a config says, the user sees a LorakitError that
names the file (and line where there is one), never a traceback from deep inside a library.
"""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import config
from lorakit.data.formats import detect_format, to_example
from lorakit.data.sources import read_rows
from lorakit.errors import ConfigError, DataError, LorakitError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["instruction", "input", "output", "prompt", "completion", "messages", "conversations",
                        "text", "system", "role", "content", "from", "value", "extra"])
rows = st.dictionaries(keys, json_values, max_size=5)


def read_all(path):
    out = []
    for row, where in read_rows(str(path)):
        fmt = detect_format(row, where)
        out.append(to_example(row, fmt, where))
    return out


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_random_bytes_in_any_data_file(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        read_all(path)
    except DataError as e:
        assert path.name in str(e), str(e)


@FUZZ
@given(lines=st.lists(rows, min_size=1, max_size=5), junk=st.sampled_from(["", "{", "[1, 2]", "null", "\"s\""]))
def test_random_jsonl_rows(tmp_path, lines, junk):
    path = tmp_path / "rows.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in lines) + (junk + "\n" if junk else "")
    path.write_text(text, encoding="utf-8")
    try:
        examples = read_all(path)
    except DataError as e:
        msg = str(e)
        assert "rows.jsonl" in msg and "line" in msg, msg
    else:
        for ex in examples:  # anything accepted is a well-formed Example
            assert ("text" in ex and isinstance(ex["text"], str)) or (
                isinstance(ex["messages"], list) and any(m["role"] == "assistant" for m in ex["messages"]))


@FUZZ
@given(header=st.lists(st.text(alphabet=string.ascii_letters, min_size=1, max_size=6), min_size=1, max_size=4,
                       unique=True),
       cells=st.lists(st.text(max_size=10), max_size=8))
def test_csv_with_arbitrary_columns(tmp_path, header, cells):
    import csv

    path = tmp_path / "t.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(0, len(cells), len(header)):
            w.writerow(cells[i:i + len(header)])
    try:
        read_all(path)
    except DataError as e:
        assert "t.csv" in str(e)


def test_huge_row_is_read_and_counted(tmp_path, tiny_model_dir):
    """A 200k-character answer is no crash: it is truncated and reported."""
    from lorakit.data.dataset import prepare
    from lorakit.model.load import load_tokenizer

    path = tmp_path / "huge.jsonl"
    rows = [{"instruction": "Say a lot.", "output": "word " * 40000}, {"instruction": "Hi", "output": "Hello"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = config.load(None, [f"--data.train={path}", "--data.val_fraction=0", "--data.max_length=64",
                             f"--model.name={tiny_model_dir}"])
    prepared = prepare(cfg, load_tokenizer(cfg.model))
    assert prepared.stats.truncated == 1 and all(len(x["input_ids"]) <= 64 for x in prepared.train)


config_keys = st.sampled_from(["model", "data", "lora", "train", "output", "lora.r", "train.lr", "data.train",
                               "data.format", "train.epochs", "nonsense", "lora.target_modules", "model.dtype"])


@FUZZ
@given(raw=st.dictionaries(config_keys, json_values, max_size=6))
def test_config_from_arbitrary_mappings(raw):
    nested: dict = {}
    for k, v in raw.items():
        section, _, key = k.partition(".")
        if key:
            nested.setdefault(section, {})
            if isinstance(nested[section], dict):
                nested[section][key] = v
        else:
            nested[section] = v
    try:
        config.from_dict(nested)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@FUZZ
@given(text=st.text(max_size=200))
def test_config_from_arbitrary_yaml_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        config.load(path)
    except ConfigError as e:
        assert "c.yaml" in str(e)


@FUZZ
@given(args=st.lists(st.text(max_size=12), max_size=6))
def test_arbitrary_override_arguments(args):
    try:
        config.load(None, ["--data.train=x.jsonl", *args])
    except LorakitError:
        pass


def test_non_utf8_config_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"data:\n  train: \xff\xfe\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        config.load(path)
