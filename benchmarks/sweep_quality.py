"""Does a sweep find a better setting than the default? The default config against a timed sweep's
best trial, both scored on a held-out split the sweep never saw.

    python benchmarks/sweep_quality.py [--time 45m] [--train 160] [--task json|demo] [--out DIR]

--task json: the order-desk task of benchmarks/json_task.py (not the demo's data, written from
its own seeded templates): `--train` training rows, 40 validation rows (the sweep's objective:
exact match of greedy answers), 100 test rows (held out: scored once per side at the end).
--task demo: the demo's support-desk data (its own 40 validation and 60 test rows), the first
`--train` training rows.

The baseline is the config a new user writes: the model and the data, nothing else. On the json
task the hyper-parameters are then the schema's defaults (r 16, lr 2e-4, 3 epochs, batch 4); on
the demo task every one of them is `auto`, the guide's table for the dataset's size, and the sweep
keeps the table's epochs and batch size (the same training budget) and searches the rest. The
sweep starts from the baseline's config and searches the learning rate, rank, alpha per rank,
dropout, epochs (json task) and target modules (TPE, median pruning at two evaluations per trial)
for `--time`. The best trial's adapter is then scored on
the test rows by `lorakit eval`, as the default's is. Figures: both test scores with their sample
size, trials completed / pruned / failed, and the time pruning saved (each pruned trial's
seconds scaled to the steps it would have run). Run it on an otherwise idle machine. Last line:
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEMO_DATA = HERE.parent / "src" / "lorakit" / "demo" / "data"
SPACE = {
    "train.lr": {"low": 5.0e-5, "high": 3.0e-3, "log": True},
    "lora.r": [8, 16, 32],
    "lora.alpha_per_r": [1, 2],
    "lora.dropout": [0.0, 0.05, 0.1],
    "train.epochs": {"low": 1, "high": 5, "step": 1},
    "lora.target_modules": [["q_proj", "v_proj"],
                            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]],
}


def task_data(task: str, folder: Path, n_train: int) -> dict[str, str]:
    """The data section's files: training rows cut to n_train (a file of its own, so the guide's
    table sees that size)."""
    if task == "json":
        sys.path.insert(0, str(HERE))
        from json_task import make

        make(folder / "data", train=n_train, val=40, test=100)
        return {k: str(folder / "data" / f"{v}.jsonl") for k, v in
                (("train", "train"), ("validation", "val"), ("test", "test"))}
    lines = (DEMO_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:n_train]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    return {"train": str(folder / "data" / "train.jsonl"), "validation": str(DEMO_DATA / "val.jsonl"),
            "test": str(DEMO_DATA / "test.jsonl")}


def default_config(folder: Path, data: dict[str, str], table: bool) -> dict:
    auto = {"lr": "auto", "epochs": "auto", "batch_size": "auto"} if table else {}
    return {"model": {"name": "smollm2-135m-instruct", "dtype": "fp32"},
            "data": {**data, "template": "auto", "max_length": 256},
            **({"lora": {"r": "auto", "alpha": "auto", "dropout": "auto"}} if table else {}),
            "train": {**auto, "save_steps": 0, "eval_steps": 0, "report_to": []},
            "output": {"dir": str(folder / "runs"), "name": "default", "overwrite": True}}


def lorakit(*args: str, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        subprocess.run([sys.executable, "-m", "lorakit", *args], check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def test_score(run: Path, log: Path) -> dict:
    lorakit("eval", str(run), "--split", "test", log=log)
    summary = json.loads((run / "eval" / "test.summary.json").read_text(encoding="utf-8"))
    return {"exact_match": summary["scores"]["tuned"]["exact_match"], "n": summary["count"],
            "json_field_accuracy": summary["scores"]["tuned"].get("json_field_accuracy")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--time", default="45m")
    p.add_argument("--train", type=int, default=160)
    p.add_argument("--task", choices=["json", "demo"], default="json")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out: dict = {"task": args.task, "train_rows": args.train, "time": args.time, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="lorakit-sweep-quality-") as tmp:
        folder = Path(args.out or tmp).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "log.txt"
        table = args.task == "demo"
        cfg = default_config(folder, task_data(args.task, folder, args.train), table)
        (folder / "default.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        seconds = lorakit("train", str(folder / "default.yaml"), log=log)
        resolved = yaml.safe_load((folder / "runs" / "default" / "config.yaml").read_text(encoding="utf-8"))
        out["default"] = {"train_seconds": round(seconds, 1), **test_score(folder / "runs" / "default", log),
                          "lr": resolved["train"]["lr"], "r": resolved["lora"]["r"],
                          "epochs": resolved["train"]["epochs"], "batch_size": resolved["train"]["batch_size"]}
        print(f"default: {out['default']}", flush=True)

        sweep = {**cfg, "output": {"dir": str(folder / "runs"), "name": "sweep"},
                 "sweep": {"objective": "exact_match", "eval_rows": 40, "trials": 1000, "time": args.time,
                           "reports": 2, "pruner": "median", "sampler": "tpe", "seed": 0,
                           "space": {k: v for k, v in SPACE.items() if not (table and k == "train.epochs")}}}
        (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False), encoding="utf-8")
        out["sweep_seconds"] = round(lorakit("sweep", str(folder / "sweep.yaml"), log=log), 1)
        rows = json.loads((folder / "runs" / "sweep" / "trials.json").read_text(encoding="utf-8"))
        states = [r["state"] for r in rows]
        out["trials"] = {s: states.count(s) for s in ("complete", "pruned", "fail")}
        pruned = [r for r in rows if r["state"] == "pruned" and r["steps"] and r["pruned_at"]]
        out["pruning_saved_seconds"] = round(sum(r["seconds"] * (r["steps"] / r["pruned_at"] - 1) for r in pruned), 0)
        out["trial_seconds"] = round(sum(r["seconds"] or 0 for r in rows), 0)
        best = max((r for r in rows if r["state"] == "complete"), key=lambda r: r["value"])
        out["best"] = {"trial": best["number"], "validation_exact_match": best["value"], "params": best["params"],
                       **test_score(Path(best["run"]), log)}
        out["rows"] = [{k: r[k] for k in ("number", "state", "value", "params", "seconds", "pruned_at", "steps")}
                       for r in rows]
    d, b = out["default"], out["best"]
    print(f"held-out exact match ({d['n']} rows): default {d['exact_match']:.1%}, sweep best {b['exact_match']:.1%} "
          f"(trial {b['trial']}: {b['params']})")
    print(f"trials: {out['trials']}; pruning saved about {out['pruning_saved_seconds']:.0f} s of "
          f"{out['trial_seconds']:.0f} s spent in trials")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
