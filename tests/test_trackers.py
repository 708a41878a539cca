"""train.report_to: the Trainer's own tracker integrations, checked before training."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import ALPACA_ROWS, write_jsonl
from test_train import tiny_config

from lorakit.errors import ConfigError
from lorakit.train.run import train


def test_wandb_offline_gets_the_train_and_eval_logs(tmp_path, tiny_model_dir, monkeypatch):
    # WANDB_MODE=offline is wandb's own switch: nothing leaves the machine, the run is a local file.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    run_dir = train(tiny_config(tmp_path, tiny_model_dir, data, "--train.report_to=[wandb]"), log=lambda s: None,
                    progress=False)
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    content = log.read_bytes()
    assert b"train/loss" in content and b"eval/loss" in content and b"train/learning_rate" in content
    assert not list((run_dir / "logs").glob("events.*")), "TensorBoard was not asked for"


def test_tensorboard_is_the_default(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    run_dir = train(tiny_config(tmp_path, tiny_model_dir, data, "--train.max_steps=2"), log=lambda s: None,
                    progress=False)
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_is_a_config_error_before_training(tmp_path, tiny_model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "trackio")
                        else real(name, *a))
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, "--train.report_to=[tensorboard,mlflow,trackio]")
    with pytest.raises(ConfigError) as e:
        train(cfg, log=lambda s: None, progress=False)
    assert "pip install mlflow" in str(e.value) and "pip install trackio" in str(e.value)
    assert not cfg.run_dir.exists()
