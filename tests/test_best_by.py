"""train.best_by: the adapter of the best evaluation is published, the last one stays in last/."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALPACA_ROWS, write_jsonl
from lorakit import config
from lorakit.errors import ConfigError


def _cfg(tmp_path, model_dir, name: str, **train):
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    return config.from_dict({
        "model": {"name": str(model_dir)},
        "data": {"train": [str(data)], "template": "alpaca", "max_length": 96, "val_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 8, "batch_size": 2, "grad_accum": 1, "logging_steps": 1, "eval_steps": 2,
                  "save_steps": 0, "warmup": 0, "scheduler": "constant", "mixed_precision": "no", "report_to": [],
                  **train},
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    })


def _weights(folder):
    return load_file(folder / "adapter_model.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_eval_loss_adapter_is_published_and_the_last_kept(tmp_path, tiny_model_dir):
    from lorakit.artifacts import read_meta
    from lorakit.pipeline import train

    # lr 0.03 constant on this tiny model: the validation loss is lowest at step 2 (5.83), then rises (5.93 at 8)
    run = train(_cfg(tmp_path, tiny_model_dir, "best", lr=0.03, best_by="eval_loss"), log=lambda s: None,
                progress=False)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    steps = [r["step"] for r in evals]
    assert steps == [0, 2, 4, 6, 8]
    best_step = min(evals, key=lambda r: r["eval_loss"])["step"]
    record = json.loads((run / "best" / "best.json").read_text())
    assert record == {"metric": "eval_loss", "value": min(r["eval_loss"] for r in evals), "step": best_step}
    assert 0 < best_step < 8, f"this setting must overshoot for the test to mean anything: {evals}"
    assert _same(_weights(run / "adapter"), _weights(run / "best"))  # what was published is the best step's
    assert not _same(_weights(run / "adapter"), _weights(run / "last"))
    meta = read_meta(run / "adapter")
    assert meta.metrics["best"]["step"] == best_step and meta.metrics["best"]["last_step"] == 8
    assert read_meta(run / "last").metrics["best"] is None
    page = (run / "report.html").read_text(encoding="utf-8")
    assert f"step {best_step} of 8 (the last step" in page


def test_best_by_a_score_needs_the_generation_probe():
    with pytest.raises(ConfigError, match="train.eval_generate_rows is 0"):
        config.from_dict({"data": {"train": ["x.jsonl"]}, "train": {"best_by": "exact_match"}})
    with pytest.raises(ConfigError, match="'accuracy' is not a valid 'eval_loss' .* or null"):
        config.from_dict({"data": {"train": ["x.jsonl"]}, "train": {"best_by": "accuracy"}})
    ok = config.from_dict({"data": {"train": ["x.jsonl"]}, "train": {"best_by": "exact_match",
                                                                    "eval_generate_rows": 8}})
    assert ok.train.best_by == "exact_match"
