"""lorakit sweep: the space checked against the schema before any trial, trials judged and pruned
through the Trainer, the study shared by worker processes with no trial run twice, and a
SIGKILLed sweep that resumes to the same number of finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import tiny_config
from lorakit import config
from lorakit.config.sweep import parse_time
from lorakit.errors import ConfigError, LorakitError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_config(tmp: Path, model_dir: Path, name: str, sweep: dict, **train) -> Path:
    raw = tiny_config(tmp, model_dir, name, train=train, sweep=sweep)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


SPACE = {"train.lr": [1.0e-3, 5.0e-3, 2.0e-2], "lora.r": [2, 4]}


# --------------------------------------------------------------------------- checks before any trial


def test_space_errors_name_the_key_and_the_fix(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError) as e:
        config.load(write_config(tmp_path, tiny_model_dir, "bad", {
            "space": {"train.lrr": {"low": 1e-5, "high": 1e-3}, "lora.r": [], "train.warmup": {"low": 0.2, "high": 0.1},
                      "train.scheduler": {"low": 0, "high": 1}}, "time": "soon"}))
    text = str(e.value)
    assert "'train.lrr' is not a config key (did you mean 'train.lr'?)" in text
    assert "sweep.space.lora.r: the list of choices is empty" in text
    assert "sweep.space.train.warmup: the range [0.2, 0.1] is empty" in text
    assert "train.scheduler is not a number, so it takes a list of choices" in text
    assert "sweep.time: 'soon' is not a duration" in text


def test_a_value_the_schema_refuses_stops_the_sweep_before_any_trial(tmp_path, tiny_model_dir):
    from lorakit.cli import main

    cfg = write_config(tmp_path, tiny_model_dir, "refused", {"space": {"lora.dropout": [0.0, 1.5],
                                                                       "train.scheduler": ["cosine", "cosinus"]}})
    code = main(["sweep", str(cfg)])
    assert code == 2
    assert not (tmp_path / "runs" / "refused").exists()  # nothing claimed, nothing trained
    with pytest.raises(ConfigError) as e:
        from lorakit.sweep.run import prepare, settings

        c = config.load(cfg)
        prepare(cfg, [], settings(c), c, print)
    text = str(e.value)
    assert "sweep.space.lora.dropout = 1.5: lora.dropout: 1.5 must be in [0, 1)" in text
    assert "sweep.space.train.scheduler = 'cosinus'" in text and "did you mean 'cosine'" in text
    assert "= 0.0" not in text and "= 'cosine':" not in text  # the values the schema takes are not named


def test_empty_space_alpha_without_r_and_grid_without_step(tmp_path, tiny_model_dir):
    from lorakit.sweep.run import prepare, settings

    def prep(name, sweep, **lora):
        path = write_config(tmp_path, tiny_model_dir, name, sweep)
        c = config.load(path, [f"--lora.{k}={v}" for k, v in lora.items()])
        return prepare(path, [], settings(c), c, print)

    with pytest.raises(LorakitError, match="sweep.space is empty"):
        prep("empty", {})
    with pytest.raises(ConfigError, match="alpha as a multiple of r needs r set"):
        prep("ratio", {"space": {"lora.alpha_per_r": [1, 2]}}, r="auto")
    ctx = prep("ratio-ok", {"space": {"lora.alpha_per_r": [1, 2], "lora.r": [2, 8]}})
    from lorakit.config.sweep import apply

    assert apply(ctx.base, {"lora.r": 8, "lora.alpha_per_r": 2})["lora"]["alpha"] == 16
    with pytest.raises(LorakitError, match="train.lr is a range without a step"):
        from lorakit.sweep.space import grid

        grid(prep("grid", {"sampler": "grid", "space": {"train.lr": {"low": 1e-4, "high": 1e-3}}}).params)


def test_time_budgets():
    assert parse_time("45m") == 2700 and parse_time("2h") == 7200 and parse_time("1h30m") == 5400
    assert parse_time("90s") == 90 and parse_time("10") == 600 and parse_time(None) is None
    with pytest.raises(ValueError):
        parse_time("5 minutes")


# --------------------------------------------------------------------------- the Reporter


class FakeTrial:
    def __init__(self, prune_at: int | None):
        self.prune_at, self.reported, self.attrs = prune_at, [], {}

    def set_user_attr(self, key, value):
        self.attrs[key] = value

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return self.prune_at is not None and self.reported[-1][0] >= self.prune_at


def _drive(reporter, max_steps: int, values: dict[int, float]):
    """The Trainer's calls as a run of `max_steps` makes them; an evaluation logs values[step]."""
    args, state = SimpleNamespace(eval_on_start=True), SimpleNamespace(max_steps=max_steps, global_step=0)
    control = SimpleNamespace(should_evaluate=False, should_training_stop=False)
    reporter.on_train_begin(args, state, control)
    assert args.eval_on_start is False
    for step in range(1, max_steps + 1):
        state.global_step = step
        reporter.on_step_end(args, state, control)
        if control.should_evaluate or step == max_steps:  # the Trainer's own evaluation ends the run
            control.should_evaluate = False
            reporter.on_log(args, state, control, logs={"eval_loss": values[step], "epoch": 1.0})
        if control.should_training_stop:
            return step
    return max_steps


def test_reporter_asks_for_evenly_spaced_evaluations_and_stops_a_pruned_trial():
    from lorakit.sweep.trial import Reporter

    values = {s: 10.0 - s for s in range(1, 13)}
    full = Reporter(FakeTrial(None), "eval_loss", 4)
    assert _drive(full, 12, values) == 12
    assert [s for s, _ in full.trial.reported] == [3, 6, 9, 12] and full.pruned_at is None
    assert full.trial.attrs["steps"] == 12  # what a pruned trial would have run: the time pruning saved
    cut = Reporter(FakeTrial(prune_at=6), "eval_loss", 4)
    assert _drive(cut, 12, values) == 6
    assert cut.pruned_at == 6 and [s for s, _ in cut.values] == [3, 6]


# --------------------------------------------------------------------------- whole sweeps


def _rows(folder: Path) -> list[dict]:
    return json.loads((folder / "trials.json").read_text(encoding="utf-8"))


def test_sweep_runs_trials_and_writes_best_yaml_report_and_runs_listing(tmp_path, tiny_model_dir):
    from lorakit.runs import format_runs, list_runs
    from lorakit.sweep import sweep

    cfg = write_config(tmp_path, tiny_model_dir, "search", {"space": SPACE, "trials": 3, "sampler": "random",
                                                            "pruner": "none", "reports": 2, "seed": 1})
    said: list[str] = []
    folder = sweep(cfg, log=said.append).root
    rows = _rows(folder)
    assert [r["state"] for r in rows] == ["complete"] * 3
    for r in rows:
        run = Path(r["run"])
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        losses = [rec["eval_loss"] for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if "eval_loss" in rec]
        assert r["value"] == pytest.approx(losses[-1])  # the objective is the run's last eval loss
        assert [s for s, _ in r["intermediate"]] == [2, 4]  # reports: 2 over 4 steps, no start-of-run eval
        assert len(losses) == 2
    best = min(rows, key=lambda r: r["value"])
    trained = config.load(folder / "best.yaml")
    assert trained.train.lr == best["params"]["train.lr"] and trained.lora.r == best["params"]["lora.r"]
    assert trained.output.name == "search-best" and Path(trained.output.dir) == folder.parent
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "Parallel coordinates" in page and "Optimisation history" in page and f"trial {best['number']}" in page
    assert any("best: trial" in s for s in said)
    # as a reader sees it: drawn offline in Chromium, one line per completed trial in parallel coordinates
    from test_report import Dom, chromium

    dumped, requested = chromium(folder / "report.html", tmp_path / "chromium", "--dump-dom")
    assert requested == []
    dom = Dom(dumped)
    assert not dom.find("script") and not dom.find("link")
    assert len(dom.find("polyline", inside="parallel")) == 3
    assert len(dom.find("circle", inside="history", data_series="trial")) == 3
    # lorakit runs: the sweep is one entry with its trials under it, not three loose runs
    listing = format_runs(list_runs(tmp_path / "runs"))
    assert "search [sweep: 3 trials, best eval_loss" in listing
    assert listing.count("trial-00") == 3
    # run again: the study is complete, nothing more is trained
    again: list[str] = []
    sweep(cfg, log=again.append)
    assert len(_rows(folder)) == 3 and any("3 trials finished" in s for s in again)


def test_two_workers_share_one_study_and_no_trial_runs_twice(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, "pair", {"space": SPACE, "trials": 4, "sampler": "random",
                                                          "pruner": "none", "reports": 1})
    done = subprocess.run(cli("sweep", str(cfg), "--workers", "2"), capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "runs" / "pair"
    rows = _rows(folder)
    finished = [r for r in rows if r["state"] in ("complete", "pruned")]
    assert len(finished) == 4  # exactly the number asked, however the two raced for the last trials
    assert len({r["number"] for r in rows}) == len(rows)
    for r in rows:  # each trial was started once: one start line in its log, one run folder
        log = (folder / "logs" / f"trial-{r['number']:03d}.log").read_text(encoding="utf-8")
        assert log.count(f"trial {r['number']}: ") == 1
    assert sorted(p.name for p in (folder / "trials").iterdir()) == [f"trial-{r['number']:03d}" for r in rows]
    workers = [(folder / "logs" / f"worker-{i}.log").is_file() for i in range(2)]
    assert all(workers)
    assert f"2 workers, {max(1, (os.cpu_count() or 1) // 2)} thread(s) each" in done.stdout


def test_a_sigkilled_sweep_resumes_to_the_same_number_of_trials(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, "killed", {"space": SPACE, "trials": 3, "sampler": "random",
                                                            "pruner": "none", "reports": 1}, max_steps=12)
    folder = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(cli("sweep", str(cfg)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 300
    started = folder / "logs" / "trial-001.log"
    while not started.is_file():  # trial 0 finished, trial 1 is training
        assert proc.poll() is None, "the sweep ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cli("sweep", str(cfg)), capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped mid-run; running them again" in done.stdout
    rows = _rows(folder)
    assert sum(r["state"] == "complete" for r in rows) == 3
    killed = [r for r in rows if r["state"] == "fail"]
    assert len(killed) == 1 and killed[0]["number"] >= 1 and killed[0]["interrupted"]  # trial 0 had finished
    retry = [r for r in rows if r["retry_of"] == killed[0]["number"]]
    assert len(retry) == 1 and retry[0]["state"] == "complete" and retry[0]["params"] == killed[0]["params"]
    assert not (Path(killed[0]["run"]) / "adapter").exists()  # its logs stay, no weights
