"""Exact resume after SIGKILL, and checkpoints that are complete or absent."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALPACA_ROWS, kill_at_checkpoint, write_jsonl
from lorakit import config
from lorakit.errors import LorakitError

STEPS = 6


def write_config(tmp_path: Path, model_dir: Path, data: Path, name: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        f"model:\n  name: {model_dir}\n"
        f"data:\n  train: {data}\n  template: alpaca\n  max_length: 96\n  val_fraction: 0.2\n"
        "lora:\n  r: 4\n  alpha: 8\n  dropout: 0.1\n"  # dropout: the RNG state must be restored too
        f"train:\n  max_steps: {STEPS}\n  batch_size: 2\n  grad_accum: 2\n  lr: 5.0e-3\n  logging_steps: 1\n"
        "  eval_steps: 3\n  save_steps: 1\n  save_total_limit: 2\n  mixed_precision: 'no'\n"
        f"output:\n  dir: {tmp_path / 'runs'}\n  name: {name}\n"
    )
    return p


def adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit.cli", *args]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("resume")
    data = write_jsonl(tmp / "data.jsonl", ALPACA_ROWS)
    ref_cfg = write_config(tmp, tiny_model_dir, data, "reference")
    subprocess.run(cli("train", str(ref_cfg)), check=True, capture_output=True, timeout=300)
    return tmp, data, adapter(tmp / "runs" / "reference")


def test_sigkill_then_resume_equals_uninterrupted(setup, tiny_model_dir):
    tmp, data, reference = setup
    cfg = write_config(tmp, tiny_model_dir, data, "killed")
    kill_after = random.Random().randint(1, STEPS - 2)  # any step with a later one to redo
    ckpts = tmp / "runs" / "killed" / "checkpoints"
    kill_at_checkpoint(cli("train", str(cfg)), ckpts, kill_after)
    assert not (tmp / "runs" / "killed" / "adapter").exists()
    out = subprocess.run(cli("train", str(cfg), "--resume"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert_same(adapter(tmp / "runs" / "killed"), reference)
    steps = [line for line in (tmp / "runs" / "killed" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == STEPS, "each step logged once, none twice after resume"


def test_crash_while_saving_leaves_no_checkpoint_resume_would_use(setup, tiny_model_dir, monkeypatch):
    """A save that dies between files leaves only .staging; resume takes the previous checkpoint."""
    from transformers import Trainer

    from lorakit.train.checkpoint import checkpoints
    from lorakit.train.run import train

    tmp, data, reference = setup
    cfg = config.load(write_config(tmp, tiny_model_dir, data, "crashed"))
    real = Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated crash between checkpoint files")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda s: None, progress=False)
    ckpt_dir = tmp / "runs" / "crashed" / "checkpoints"
    assert [p.name for p in checkpoints(ckpt_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert (ckpt_dir / ".staging" / "checkpoint-4").is_dir(), "the half-written save stayed in staging"
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    train(cfg, resume=True, log=lambda s: None, progress=False)
    assert_same(adapter(tmp / "runs" / "crashed"), reference)
    assert not (ckpt_dir / ".staging").exists()
    logged = [line for line in (tmp / "runs" / "crashed" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == STEPS, "resumed at step 3, not restarted from step 0"


def test_resume_refuses_a_changed_config(setup, tiny_model_dir):
    from lorakit.train.run import train

    tmp, data, _ = setup
    cfg = config.load(write_config(tmp, tiny_model_dir, data, "reference"), ["--lora.r", "8"])
    with pytest.raises(LorakitError, match="lora.r: 4 -> 8"):
        train(cfg, resume=True, log=lambda s: None, progress=False)


def test_resume_without_checkpoints_is_a_clear_error(tmp_path, tiny_model_dir):
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    cfg = config.load(write_config(tmp_path, tiny_model_dir, data, "never"))
    with pytest.raises(LorakitError, match="nothing to resume"):
        train(cfg, resume=True, log=lambda s: None, progress=False)


def test_resume_of_a_run_with_auto_values(tmp_path, tiny_model_dir):
    """'auto' hyper-parameters are resolved the same way on resume, so the saved (resolved) config
    matches: the run continues instead of being refused as changed."""
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    path = write_config(tmp_path, tiny_model_dir, data, "auto")
    auto = ["--lora.r=auto", "--lora.alpha=auto", "--train.lr=auto", "--train.max_steps=2"]
    run = train(config.load(path, auto), log=lambda s: None, progress=False)
    saved = config.load(run / "config.yaml")
    assert (saved.lora.r, saved.lora.alpha, saved.train.lr) == (8, 16, 1e-4), "the guide's small-data row"
    said: list[str] = []
    train(config.load(path, [*auto[:-1], "--train.max_steps=3"]), resume=True, log=said.append, progress=False)
    assert any(line.startswith("resuming from") and line.endswith("checkpoint-2") for line in said), said


def test_sigterm_saves_a_checkpoint_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    """A signal (Ctrl-C, or SIGTERM as a scheduler or the studio's Stop sends it) ends the run after
    the step under way with a checkpoint, although train.save_steps is 0; --resume then finishes it
    exactly as an uninterrupted run."""
    import json
    import os
    import signal
    import time

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    steps = 30

    def config(name: str) -> Path:
        p = write_config(tmp_path, tiny_model_dir, data, name)
        text = p.read_text().replace(f"max_steps: {STEPS}", f"max_steps: {steps}").replace("save_steps: 1", "save_steps: 0")
        p.write_text(text.replace("eval_steps: 3", "eval_steps: 10"))
        return p

    subprocess.run(cli("train", str(config("whole"))), check=True, capture_output=True, timeout=300)
    cfg = config("stopped")
    run = tmp_path / "runs" / "stopped"
    proc = subprocess.Popen(cli("train", str(cfg)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not any('"loss"' in line and json.loads(line)["step"] >= 2
                  for line in ((run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else [])):
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be stopped"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    stopped_at = int(err.split("after step ")[1].split(",")[0])
    assert 2 <= stopped_at < steps and "--resume" in err
    assert (run / "checkpoints" / f"checkpoint-{stopped_at}").is_dir() and not (run / "adapter").exists()
    assert (run / "report.html").is_file()  # a stopped run gets its report too
    out = subprocess.run(cli("train", str(cfg), "--resume"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert_same(adapter(run), adapter(tmp_path / "runs" / "whole"))
