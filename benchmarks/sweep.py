"""One sweep worker against two on this machine: the same trials, wall time and trials per hour.

    python benchmarks/sweep.py [--trials 4] [--steps 10] [--model NAME] [--out DIR]

The demo config (SmolLM2-135M-Instruct and the bundled support data unless --model) for
`--steps` optimizer steps per trial, a space of learning rates and ranks drawn by the random
sampler with a fixed seed (so both sweeps train the same trials), the validation loss as the
objective and no pruning (so each trial does the same work). `lorakit sweep --workers 1` uses
torch's threads over every core; `--workers 2` starts two worker processes with cores / 2
threads each. Figures: wall time of the command, finished trials, and the objective of each
trial (equal values mean the same work was done). Run it on an otherwise idle machine. Last line:
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

from processes import write_config


def sweep_config(folder: Path, name: str, steps: int, trials: int, model: str | None) -> Path:
    import yaml

    path = write_config(folder, name, 8, steps)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if model:
        cfg["model"] = {"name": model}
    cfg["train"]["report_to"] = []
    cfg["sweep"] = {"objective": "eval_loss", "trials": trials, "sampler": "random", "seed": 7, "pruner": "none",
                    "reports": 1, "space": {"train.lr": [1.0e-4, 3.0e-4, 1.0e-3], "lora.r": [8, 16]}}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", help="a base model other than the embedded SmolLM2 (the tests' tiny one)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out: dict = {"cores": os.cpu_count(), "trials": args.trials, "steps": args.steps, "sweeps": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-sweep-bench-") as tmp:
        folder = Path(args.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for workers in (1, 2):
            cfg = sweep_config(folder, f"workers-{workers}", args.steps, args.trials, args.model)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lorakit", "sweep", str(cfg), "--workers", str(workers)], env=env,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            rows = json.loads((folder / "runs" / f"workers-{workers}" / "trials.json").read_text(encoding="utf-8"))
            done = [r for r in rows if r["state"] == "complete"]
            out["sweeps"].append({"workers": workers, "seconds": round(seconds, 1), "finished": len(done),
                                  "trials_per_hour": round(3600 * len(done) / seconds, 1),
                                  "values": sorted(round(r["value"], 4) for r in done)})
            print(f"{workers} worker(s): {len(done)} trials in {seconds:.0f} s "
                  f"({3600 * len(done) / seconds:.1f} trials/hour)", flush=True)
    one, two = out["sweeps"]
    out["speedup"] = round(one["seconds"] / two["seconds"], 2)
    print(f"two workers: {out['speedup']}x one worker's speed")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
