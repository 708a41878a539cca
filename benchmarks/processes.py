"""One process against two (torchrun, DDP over gloo) on the demo's model and data, same work.

    python benchmarks/processes.py [--steps 12] [--out DIR]

The demo config (SmolLM2-135M-Instruct, LoRA r=16 on seven projections, the bundled support
data) for `--steps` optimizer steps of 8 examples: one process with batch_size 8 (torch's
threads over every core), then `torchrun --nproc_per_node 2` with batch_size 4 per process (one
thread each, torchrun's default). Both train the same examples per step; the figures are wall
time, trained tokens/s over all processes (from each run's lorakit.json), the peak resident
memory per process, and how far the two adapters and loss curves are apart. Run it on an
otherwise idle machine. Last line: JSON.
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

DEMO = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "demo"


def write_config(folder: Path, name: str, batch: int, steps: int) -> Path:
    import yaml

    cfg = yaml.safe_load((DEMO / "demo.yaml").read_text(encoding="utf-8"))
    for split in ("train", "validation", "test"):
        cfg["data"][split] = str(DEMO / cfg["data"][split])
    cfg["data"].pop("test")
    cfg["lora"]["dropout"] = 0.0  # the two runs draw dropout masks per process: off, so they can be compared
    cfg["train"].update(batch_size=batch, max_steps=steps, logging_steps=1, eval_steps=0, save_steps=0)
    cfg["output"] = {"dir": str(folder / "runs"), "name": name, "overwrite": True}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout + proc.stderr


def summary(run_dir: Path, wall: float) -> dict:
    meta = json.loads((run_dir / "adapter" / "lorakit.json").read_text(encoding="utf-8"))
    m = meta["metrics"]
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"wall_s": round(wall, 1), "train_s": m["train_seconds"], "processes": m["processes"],
            "trained_tokens": m["trained_tokens"], "trained_tokens_per_s": m["trained_tokens_per_s"],
            "peak_rss_mib_main_process": round(m["peak_memory_bytes"] / 2**20), "losses": losses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="lorakit-processes-") as tmp:
        folder = Path(args.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        one = write_config(folder, "one", 8, args.steps)
        two = write_config(folder, "two", 4, args.steps)
        result: dict = {"steps": args.steps, "examples_per_step": 8, "cpus": os.cpu_count()}
        wall, _ = run([sys.executable, "-m", "lorakit", "train", str(one)], folder)
        result["one_process"] = summary(folder / "runs" / "one", wall)
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        wall, _ = run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lorakit", "train", str(two)], folder)
        result["two_processes"] = summary(folder / "runs" / "two", wall)
        a, b = (load_file(folder / "runs" / n / "adapter" / "adapter_model.safetensors") for n in ("one", "two"))
        result["adapter_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        result["adapter_max_abs"] = max(float(a[k].abs().max()) for k in a)
        la, lb = result["one_process"]["losses"], result["two_processes"]["losses"]
        result["loss_max_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
        result["speedup_tokens_per_s"] = round(result["two_processes"]["trained_tokens_per_s"]
                                               / result["one_process"]["trained_tokens_per_s"], 3)
    for name in ("one_process", "two_processes"):
        r = result[name]
        print(f"{name:14} wall {r['wall_s']:6.1f} s  train {r['train_s']:6.1f} s  {r['trained_tokens_per_s']:8.1f} "
              f"trained tok/s  peak RSS (main process) {r['peak_rss_mib_main_process']} MiB")
    print(f"2 processes / 1: {result['speedup_tokens_per_s']}x trained tokens/s; adapters differ by "
          f"{result['adapter_max_abs_diff']:.2e} (largest value {result['adapter_max_abs']:.3f}); losses by "
          f"{result['loss_max_rel_diff']:.1e} relative at most")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
