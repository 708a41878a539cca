"""Every source yields the same rows, each tagged with file and line/row; bad files fail with where + fix."""

from __future__ import annotations

import json
import pytest

from lorakit.data.sources import read_rows
from lorakit.errors import DataError

ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello world!"},
    {"instruction": "Classify this message.", "input": "Where is my order?", "output": "Category: shipping"},
    {"instruction": "Extract the order number.", "input": "Order #555, late.", "output": "Order number: #555"},
]


def _read(spec, split="train"):
    return list(read_rows(str(spec), split))


def _error(spec, split="train") -> str:
    with pytest.raises(DataError) as info:
        _read(spec, split)
    return str(info.value)


# --------------------------------------------------------------------------- good sources


def test_jsonl_rows_and_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    # A blank line is skipped but still counted, so line numbers match an editor's.
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    got = _read(path)
    assert [r for r, _ in got] == ROWS
    assert [w for _, w in got] == [f"{path} line 1", f"{path} line 3", f"{path} line 4"]


@pytest.mark.parametrize("wrap", [False, True], ids=["array", "data-key"])
def test_json_array_and_data_key_name_item_lines(tmp_path, wrap):
    path = tmp_path / "train.json"
    body = json.dumps({"version": 1, "data": ROWS} if wrap else ROWS, indent=2)
    path.write_text(body)
    got = _read(path)
    assert [r for r, _ in got] == ROWS
    # Each row is named by the line its '{' is on.
    lines = body.splitlines()
    for (row, where), _ in zip(got, ROWS):
        lineno = int(where.rsplit(" ", 1)[1])
        assert lines[lineno - 1].strip() == "{"
        assert json.dumps(row["instruction"]) in lines[lineno]


def test_csv_rows_with_multiline_field_keep_true_line_numbers(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,input,output\n"Say\nhello.",,Hello world!\n"Classify, please",x,Category: shipping\n',
                    encoding="utf-8")
    got = _read(path)
    assert got == [
        ({"instruction": "Say\nhello.", "input": "", "output": "Hello world!"}, f"{path} line 2"),
        ({"instruction": "Classify, please", "input": "x", "output": "Category: shipping"}, f"{path} line 4"),
    ]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    got = _read(path)
    assert [r for r, _ in got] == ROWS
    assert got[2][1] == f"{path} row 2"


def test_datasets_folder_with_splits(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "validation": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(folder))
    assert [r for r, _ in _read(folder)] == ROWS
    val = _read(folder, "validation")
    assert val == [(ROWS[0], f"{folder}[validation] row 0")]
    msg = _error(folder, "test")
    assert "no split 'test'" in msg and "train, validation" in msg and "data.split" in msg
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert _read(single, "validation")[1] == (ROWS[1], f"{single} row 1")  # one split: `split` does not apply


def test_folder_of_files_reads_every_supported_file_in_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([ROWS[0]]))
    (tmp_path / "notes.txt").write_text("not data")
    got = _read(tmp_path)
    assert [r for r, _ in got] == [ROWS[0], ROWS[1]]
    assert got[1][1] == f"{tmp_path / 'b.jsonl'} line 1"


def test_hub_id_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(repo_id, split=None):
        calls.append((repo_id, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = _read("org/support-chats", "train")
    assert calls == [("org/support-chats", "train")]
    assert [r for r, _ in got] == ROWS
    assert got[1][1] == "hub:org/support-chats row 1"


def test_hub_failure_is_a_data_error_with_offline_fix(monkeypatch):
    import datasets

    def offline(repo_id, split=None):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = _error("org/missing")
    assert "org/missing" in msg and "Couldn't reach" in msg and "save_to_disk" in msg


# --------------------------------------------------------------------------- bad sources


def test_missing_file_names_path_and_fix(tmp_path):
    msg = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg and "fix:" in msg


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    msg = _error(path)
    assert "data.txt" in msg and "'.txt'" in msg and ".jsonl" in msg


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("")
    msg = _error(path)
    assert name in msg and "empty" in msg


def test_jsonl_of_blank_lines_has_no_rows(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n \n")
    assert "no rows" in _error(path)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    latin1 = '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + latin1)
    msg = _error(path)
    assert f"{path} line 2" in msg and "UTF-8" in msg and "0xe9" in msg and "iconv" in msg


def test_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"instruction,output\nok,fine\nok,caf\xe9\n")
    assert f"{path} line 3" in _error(path)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "Say hello.", "output": "Hi"\n')
    msg = _error(path)
    assert f"{path} line 2" in msg and "not valid JSON" in msg and "fix:" in msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '["a", "b"]\n')
    msg = _error(path)
    assert f"{path} line 2" in msg and "JSON object" in msg


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    msg = _error(path)
    assert f"{path} line 3" in msg and "not valid JSON" in msg


def test_json_object_without_data_array(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"rows": []}')
    msg = _error(path)
    assert "obj.json" in msg and "'rows'" in msg and '"data"' in msg


def test_csv_row_with_extra_field(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,output\nSay hello.,Hello\nClassify, this,Category\n")
    msg = _error(path)
    assert f"{path} line 3" in msg and "3 fields" in msg and "quote" in msg


def test_broken_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 definitely not parquet")
    msg = _error(path)
    assert "broken.parquet" in msg and "Parquet" in msg


def test_empty_folder(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    msg = _error(tmp_path)
    assert str(tmp_path) in msg and "no data files" in msg
