"""The committed demo dataset: well-formed rows, balanced classes, no leakage, reproducible bytes."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import lorakit.demo

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_demo_data.py"


def _load_generator():
    """The build-time generator lives in scripts/, outside the package: load it by path."""
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing resolve names through sys.modules
    spec.loader.exec_module(module)
    return module


g = _load_generator()

SPLIT_FILES = ["train", "val", "test"]
POLICY_ANSWERS = [answer for answer, _ in g.POLICY_QA.values()]


def _load(split: str) -> list[dict]:
    lines = (g.DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {split: _load(split) for split in SPLIT_FILES}


def test_regenerating_gives_the_committed_bytes(tmp_path):
    # Through the documented command, so the CLI entry point is covered too.
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=True, capture_output=True)
    for split in SPLIT_FILES:
        name = f"{split}.jsonl"
        assert (tmp_path / name).read_bytes() == (g.DATA_DIR / name).read_bytes(), (
            f"{name} differs from the generator's output; rerun `python scripts/make_demo_data.py "
            f"src/lorakit/demo/data` and commit the result")


def test_generator_writes_where_the_package_reads():
    # The script's DATA_DIR and the package's data folder must be one folder, or the byte check
    # above would compare against a copy lorakit never reads.
    assert g.DATA_DIR.resolve() == (Path(lorakit.demo.__file__).resolve().parent / "data")


def test_rows_are_wellformed(data):
    for split, rows in data.items():
        expected = sum(g.SPLITS[split].values())
        assert len(rows) == expected, split
        keys = {"instruction", "input", "output"} | ({"check"} if split == "test" else set())
        for i, row in enumerate(rows, 1):
            where = f"{split}.jsonl line {i}"
            assert set(row) == keys, where  # the extra "check" key lives in test.jsonl only
            assert isinstance(row["input"], str), where
            for field in ("instruction", "output"):
                assert isinstance(row[field], str) and row[field].strip(), f"{where} field {field!r}"
            # Short outputs keep the demo's training cheap: 240 chars is ~60 tokens.
            assert len(row["output"]) <= 240, where


def test_train_and_val_are_half_exact(data):
    for split in ("train", "val"):
        exact = sum(row["instruction"] in g.EXACT_INSTRUCTIONS for row in data[split])
        assert 0.4 <= exact / len(data[split]) <= 0.6, split


def test_test_split_is_all_exactly_checkable(data):
    for row in data["test"]:
        assert row["check"] == "exact"
        if row["instruction"] == g.ROUTE_INSTRUCTION:
            assert row["output"] in g.CATEGORIES
        elif row["instruction"] == g.ORDER_INSTRUCTION:
            assert re.fullmatch(r"#\d{5}", row["output"])
            assert row["output"][1:] in row["input"]
        else:
            assert row["instruction"] == g.POLICY_INSTRUCTION
            assert row["output"] in POLICY_ANSWERS


def test_routing_classes_are_balanced(data):
    for split in ("train", "test"):
        counts = Counter(r["output"] for r in data[split] if r["instruction"] == g.ROUTE_INSTRUCTION)
        assert sorted(counts) == sorted(g.CATEGORIES), split
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)
    policy = Counter(r["output"] for r in data["test"] if r["instruction"] == g.POLICY_INSTRUCTION)
    assert len(policy) == len(POLICY_ANSWERS)


def test_no_leakage_between_splits(data):
    pairs = {split: [(r["instruction"], r["input"]) for r in rows] for split, rows in data.items()}
    for split, keys in pairs.items():
        assert len(set(keys)) == len(keys), f"duplicate (instruction, input) pair inside {split}"
    train = set(pairs["train"])
    assert not train & set(pairs["val"])
    assert not train & set(pairs["test"])
    assert not set(pairs["val"]) & set(pairs["test"])


def test_free_form_replies_agree_with_the_shop_facts(data):
    rows = [r for split in ("train", "val") for r in data[split] if r["instruction"] not in g.EXACT_INSTRUCTIONS]
    assert rows
    for row in rows:
        out = row["output"]
        if "return window" in out:
            assert "30 days" in out, out
        if "support team is available" in out:
            assert "9am-6pm, Monday to Friday" in out, out
        if "Refunds go back" in out:
            assert "5-7 business days" in out, out
        if "ship free" in out or "shipping is free" in out:
            assert "over $50" in out, out
        if "ship only to" in out:
            assert "the US and Canada" in out, out
