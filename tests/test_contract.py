"""The run-folder contract: a folder written by an earlier lorakit (schema 2) still loads, and
writes back byte for byte (tests/fixtures/run_schema2, written by fixtures/make_run_schema2.py)."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit import config as config_mod
from lorakit.artifacts import META_FILE, RunPaths, find_adapter_dir, read_meta

FIXTURE = Path(__file__).parent / "fixtures" / "run_schema2"


def test_a_schema_2_run_folder_loads():
    paths = RunPaths.of(FIXTURE / "adapter")
    assert paths.root == FIXTURE and find_adapter_dir(FIXTURE) == paths.adapter
    meta = read_meta(paths.adapter)
    assert meta.base.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta.base.sha256 == "ab" * 32
    assert meta.base.gguf_file is None and meta.base.revision is None
    assert meta.template_object().name == "chatml"
    assert meta.template_object().system_prompt == "You are a support agent."
    assert meta.data.fingerprint == "cd" * 32 and meta.data.train_examples == 12
    assert meta.max_length == 512 and meta.metrics == {"eval_loss": 1.25, "steps": 6}
    assert meta.versions["lorakit"] == "0.1.0"
    cfg = config_mod.load(paths.config)
    assert cfg.lora.r == 8 and cfg.train.lr == 2e-4 and cfg.data.template == "chatml"
    [summary] = paths.eval_summaries()
    assert summary.data == "validation" and summary.scores == {"tuned": {"exact_match": 0.5}}


def test_a_schema_2_meta_writes_back_the_same_json():
    """Schema 2 on disk is unchanged: what is read is written back as it was."""
    text = (FIXTURE / "adapter" / META_FILE).read_text(encoding="utf-8")
    assert json.loads(read_meta(FIXTURE / "adapter").to_json()) == json.loads(text)
