"""The CLI as a user types it: train -> generate, data report, and clean errors."""

import json
import subprocess
import sys

import pytest

from lorakit.cli import main


@pytest.fixture
def cfg_file(tmp_path, tiny_model_dir, alpaca_file):
    p = tmp_path / "tiny.yaml"
    p.write_text(
        f"model:\n  name: {tiny_model_dir}\n"
        f"data:\n  train: {alpaca_file}\n  template: chatml\n  max_length: 96\n"
        "lora:\n  r: 4\n  alpha: 8\n"
        "train:\n  max_steps: 2\n  batch_size: 2\n  grad_accum: 1\n  eval_steps: 0\n  save_steps: 0\n"
        f"output:\n  dir: {tmp_path / 'runs'}\n"
    )
    return p


def test_train_then_generate(cfg_file, tmp_path, capsys):
    assert main(["train", str(cfg_file), "--train.lr", "1e-3"]) == 0
    run = tmp_path / "runs" / "tiny"
    assert (run / "adapter" / "lorakit.json").is_file()
    capsys.readouterr()
    assert main(["generate", str(run), "--instruction", "Say hello.", "--greedy", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["template"]["name"] == "chatml"
    assert meta["train"]["lr"] == pytest.approx(1e-3), "the override reached the run"


def test_generate_reads_messages_file(cfg_file, tmp_path, capsys):
    assert main(["train", str(cfg_file)]) == 0
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "Hello"}]))
    run = tmp_path / "runs" / "tiny"
    capsys.readouterr()
    assert main(["generate", str(run), "--messages", str(msgs), "--greedy", "--max-new-tokens", "3", "--no-stream"]) == 0
    printed = capsys.readouterr().out
    from lorakit.infer import Sampling, generate, load_session

    want = generate(load_session(run), [{"role": "user", "content": "Hello"}], Sampling(max_new_tokens=3, greedy=True))
    assert printed == want.text + "\n", "the CLI prints the API's greedy answer to the file's messages"
    msgs.write_text(json.dumps([{"role": "bot", "content": "Hello"}]))
    assert main(["generate", str(run), "--messages", str(msgs)]) == 2
    err = capsys.readouterr().err
    assert f"{msgs} message 0" in err and "'role' is 'bot'" in err and "Traceback" not in err


def test_data_report(cfg_file, capsys):
    assert main(["data", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert "14 examples" in out and "2 examples" in out  # 16 rows, 10% held out, rounded up
    assert "p50" in out and "⟦" in out and "<|im_end|>⟧" in out  # trained span marked, ends with end-of-turn


def test_bad_key_exits_2_without_traceback(cfg_file, capsys):
    assert main(["train", str(cfg_file), "--lora.rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lora.rank'" in err and "did you mean 'lora.r'" in err
    assert "Traceback" not in err


def test_bad_data_row_names_file_and_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n')
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\n")
    assert main(["data", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err
    assert "Traceback" not in err


def test_generate_missing_run_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--instruction", "hi"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("train", "data", "generate", "demo"):
        assert cmd in out.stdout


def test_doctor_command(capsys, monkeypatch):
    """Every check is printed with its status and fix; the exit code is 1 exactly when one fails."""
    from importlib import metadata

    from lorakit import doctor

    expected = doctor.run_checks()
    rc = main(["doctor"])
    out = capsys.readouterr().out
    mark = {doctor.OK: "ok", doctor.WARN: "warn", doctor.FAIL: "FAIL"}
    for c in expected:
        # free disk space moves between the two runs (other processes write): its figure is checked in test_doctor
        detail = "GiB free" if c.name.startswith("disk ") else c.detail
        assert any(line.split()[0] == mark[c.status] and c.name in line and detail in line
                   for line in out.splitlines() if line.strip()), f"{c.name}: {c.status} {c.detail!r} not shown"
        assert not c.fix or f"fix: {c.fix}" in out
    fails = sum(c.status == doctor.FAIL for c in expected)
    warns = sum(c.status == doctor.WARN for c in expected)
    assert f"{len(expected)} checks: {fails} failed, {warns} warnings" in out
    assert rc == (1 if fails else 0)

    real = metadata.version  # one dependency below its range: that check fails, and so does the command
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1" if name == "peft" else real(name))
    rc = main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 1
    (line,) = [x for x in out.splitlines() if x.split()[:2] == ["FAIL", "peft"]]
    assert "0.0.1 is outside the supported range" in line and "fix: pip install 'peft" in out
    assert f"{fails + 1} failed" in out

    passing = [c for c in expected if c.status != doctor.FAIL]  # nothing failing: exit 0
    monkeypatch.setattr(doctor, "run_checks", lambda: passing)
    assert main(["doctor"]) == 0 and "0 failed" in capsys.readouterr().out
