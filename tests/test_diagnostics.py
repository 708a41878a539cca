"""The guide's Common Issues table: each check provoked and seen to fire."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from conftest import ALPACA_ROWS, write_jsonl
from lorakit import config
from lorakit.errors import LorakitError
from lorakit.resolve import resolve
from lorakit.train.diagnostics import Diagnostics, Health, oom_error, preflight


def tiny(tmp_path, model_dir, *extra, rows=ALPACA_ROWS):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    return config.load(None, [
        f"--model.name={model_dir}", f"--data.train={data}", "--data.template=alpaca", "--data.max_length=96",
        "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0", "--train.batch_size=2", "--train.grad_accum=1",
        "--train.logging_steps=1", "--train.eval_steps=0", "--train.save_steps=0", "--train.mixed_precision=no",
        f"--output.dir={tmp_path / 'runs'}", "--output.name=d", *extra,
    ])


def run(cfg):
    from lorakit.train.run import train

    said: list[str] = []
    return train(cfg, log=said.append, progress=False), said


class _Tok:
    eos_token, eos_token_id = "<eos>", 2


def _prepared(labels_list):
    return SimpleNamespace(train=[{"input_ids": lab, "labels": lab} for lab in labels_list])


def test_no_trainable_parameters_stops_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(LorakitError, match="no trainable parameters"):
        preflight(tiny(tmp_path, tiny_model_dir), _prepared([[5, 2]]), _Tok(), trainable=0, warn=lambda m, **_: print(m))


def test_all_zero_loss_mask_stops_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(LorakitError, match="loss mask is all zero"):
        preflight(tiny(tmp_path, tiny_model_dir), _prepared([[-100, -100]]), _Tok(), trainable=10, warn=lambda m, **_: print(m))


def test_eos_missing_from_labels_stops_before_training(tmp_path, tiny_model_dir):
    """Truncation that cuts every EOS: found on the real encoded data before a step runs."""
    cfg = tiny(tmp_path, tiny_model_dir, "--data.max_length=24", "--train.max_steps=2")
    with pytest.raises(LorakitError, match="never learn to stop"):
        run(cfg)
    assert not (cfg.run_dir / "adapter").exists()


def test_high_learning_rate_warns(tmp_path, tiny_model_dir):
    _, said = run(tiny(tmp_path, tiny_model_dir, "--train.lr=5e-3", "--train.max_steps=1"))
    assert any("above 0.001" in s for s in said)


def test_flat_loss_warns_about_template_or_mask(tmp_path, tiny_model_dir):
    same_row = [ALPACA_ROWS[0]] * 16  # every batch alike, so only learning could move the loss
    _, said = run(tiny(tmp_path / "flat", tiny_model_dir, "--train.lr=1e-12", "--train.max_steps=6", rows=same_row))
    assert any("nothing is being learned" in s and "lorakit data" in s for s in said)
    _, said = run(tiny(tmp_path / "learns", tiny_model_dir, "--train.lr=1e-2", "--train.max_steps=6", rows=same_row))
    assert not any("nothing is being learned" in s for s in said), "a run that learns is not flagged"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = tiny(tmp_path, tiny_model_dir, "--train.lr=1e4", "--train.max_grad_norm=0", "--train.max_steps=40",
               "--train.save_steps=1", "--train.save_total_limit=2")
    with pytest.raises(LorakitError, match=r"loss became (nan|inf)") as e:
        run(cfg)
    assert "last good checkpoint" in str(e.value) or "no checkpoint" in str(e.value)
    assert not (cfg.run_dir / "adapter").exists(), "a broken adapter is never published"
    for ckpt in (cfg.run_dir / "checkpoints").glob("checkpoint-*"):
        weights = load_file(ckpt / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), f"{ckpt} holds non-finite weights"
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r), "no NaN step was logged as a good one"


def _diag(cfg, logs_seq):
    said: list[str] = []
    d = Diagnostics(cfg, Health(), lambda m, **_: said.append(m))
    state, control = TrainerState(), TrainerControl()
    for i, logs in enumerate(logs_seq, 1):
        state.global_step = i
        d.on_log(None, state, control, logs=logs)
    return d, said, control


def test_gradient_norm_warnings(tmp_path, tiny_model_dir):
    cfg = tiny(tmp_path, tiny_model_dir)
    _, said, _ = _diag(cfg, [{"grad_norm": 50.0}, {"grad_norm": 60.0}, {"grad_norm": 1e-8}])
    assert sum("exploding" in s for s in said) == 1, "warned once, not every step"
    assert sum("vanishing" in s for s in said) == 1


def test_rising_validation_loss_warns_and_early_stops(tmp_path, tiny_model_dir):
    losses = [{"eval_loss": x} for x in (2.0, 1.5, 1.6, 1.7)]
    d, said, control = _diag(tiny(tmp_path, tiny_model_dir), losses)
    assert any("overfitting" in s for s in said) and not control.should_training_stop
    d, said, control = _diag(tiny(tmp_path, tiny_model_dir, "--train.early_stopping_patience=2"), losses)
    assert control.should_training_stop and d.stopped == "early_stopping"


def test_early_stopping_in_a_real_run(tmp_path, tiny_model_dir, monkeypatch):
    """Patience 1 with an lr that makes validation worse: the run ends before max_steps, at the first
    evaluation (one every 2 steps, the first at step 0) whose loss is not below the best before it,
    and says so."""
    made: list[Diagnostics] = []
    real_init = Diagnostics.__init__
    monkeypatch.setattr(Diagnostics, "__init__", lambda self, *a, **k: made.append(self) or real_init(self, *a, **k))
    run_dir, said = run(tiny(tmp_path, tiny_model_dir, "--train.lr=0.5", "--train.max_steps=30",
                             "--train.eval_steps=2", "--train.early_stopping_patience=1"))
    meta = json.loads((run_dir / "adapter" / "lorakit.json").read_text())
    assert meta["metrics"]["steps"] < 30
    (diagnostics,) = made
    assert diagnostics.stopped == "early_stopping"

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [s for s, _ in evals] == list(range(0, 2 * len(evals), 2)), evals
    best, stop = evals[0][1], None
    for step, loss in evals[1:]:
        if loss >= best:
            stop = (step, loss)
            break
        best = loss
    assert stop is not None and stop == evals[-1], f"training went on after the eval that should stop it: {evals}"
    step, loss = stop
    assert meta["metrics"]["steps"] == step
    assert max(r["step"] for r in records) == step, "a step was logged after the stop"
    warning = [s for s in said if "overfitting" in s]
    assert warning == [f"warning: validation loss {loss:.4f} at step {step} is above its best {best:.4f} for 1 "
                       "evaluations: overfitting. Use fewer epochs, more lora.dropout or more data"], said


def test_oom_message_is_computed_from_the_config(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import Trainer

    def boom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Trainer, "train", boom)
    with pytest.raises(LorakitError) as e:
        run(tiny(tmp_path, tiny_model_dir, "--train.batch_size=8", "--train.grad_accum=2", "--lora.r=32",
                 "--train.max_steps=1", "--data.packing=false"))
    hint = e.value.hint
    assert "--train.batch_size 4 --train.grad_accum 4" in hint
    assert "--model.gradient_checkpointing on" in hint and "--lora.r 16" in hint
    assert "--data.max_length" not in hint, "these examples are far shorter than max_length: cutting it saves nothing"


def test_oom_message_with_packing_halves_the_tokens_per_pass():
    cfg = config.load(None, ["--data.train=x.jsonl", "--train.tokens_per_pass=1024"])
    hint = oom_error(resolve(cfg), p99_tokens=40).hint
    assert "--train.tokens_per_pass 512" in hint and "batch_size" not in hint


def test_oom_error_without_room_to_halve():
    cfg = config.load(None, ["--data.train=x.jsonl", "--train.batch_size=1", "--model.gradient_checkpointing=on",
                             "--lora.r=8", "--data.packing=false"])
    hint = oom_error(resolve(cfg), p99_tokens=40).hint
    assert "batch_size" not in hint and "gradient_checkpointing" not in hint and "4bit" in hint
    long_data = oom_error(resolve(config.load(None, ["--data.train=x.jsonl", "--data.max_length=2048"])),
                          p99_tokens=1800).hint
    assert "--data.max_length 1024" in long_data


def test_busy_cpu_warns_beside_a_busy_process(monkeypatch):
    """A Python loop on one core is measured as a busy core, and the warning names both fixes;
    with the threads set by the user (a sweep's workers, torchrun) nothing is measured."""
    import subprocess
    import sys
    import time

    import torch

    from lorakit.train.diagnostics import BUSY_CORES, busy_cpu

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)  # the loop is running
        said: list[str] = []
        others = busy_cpu("cpu", said.append, interval=1.0)
        assert others is not None and others >= BUSY_CORES, others
        assert len(said) == 1 and "OMP_WAIT_POLICY=PASSIVE" in said[0] and "OMP_NUM_THREADS=" in said[0]
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert busy_cpu("cpu", said.append) is None and len(said) == 1
        assert busy_cpu("cuda", said.append) is None
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(threads)
