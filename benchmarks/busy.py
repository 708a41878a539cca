"""A training run beside another CPU-heavy process: how far it slows, and which thread setting
keeps the slowdown in proportion (issue 26: workers must never do this to each other).

    python benchmarks/busy.py [--steps 6] [--out DIR]

The demo config (SmolLM2-135M-Instruct, the bundled support data) for `--steps` optimizer steps,
trained by `lorakit train` in a process of its own: alone, then beside one busy process (a
Python loop on one core, what another worker or a user's job does to a training), with torch's
default threads (one per core), with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep at barriers
instead of spinning), and with one thread per process (what `lorakit sweep --workers` gives each
of its workers on a 2-core machine). Figures: seconds per step from the run's own timing
(lorakit.json's train_seconds / steps). Run it on an otherwise idle machine. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from processes import write_config

HOG = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def train(cfg: Path, env: dict[str, str], hog: bool) -> float:
    busy = subprocess.Popen([sys.executable, "-c", HOG]) if hog else None
    try:
        subprocess.run([sys.executable, "-m", "lorakit", "train", str(cfg)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    meta = json.loads((cfg.parent / "runs" / cfg.stem / "adapter" / "lorakit.json").read_text(encoding="utf-8"))
    m = meta["metrics"]
    return m["train_seconds"] / m["steps"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    cores = os.cpu_count() or 1
    cases = [("alone, default threads", {}, False),
             ("beside a busy process, default threads", {}, True),
             ("beside a busy process, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, True),
             (f"beside a busy process, {max(1, cores // 2)} thread(s)", {"OMP_NUM_THREADS": str(max(1, cores // 2))}, True),
             (f"alone, {max(1, cores // 2)} thread(s)", {"OMP_NUM_THREADS": str(max(1, cores // 2))}, False),
             ("alone, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, False),
             ("alone, OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}, False),
             ("beside a busy process, OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}, True)]
    out: dict = {"cores": cores, "steps": args.steps, "cases": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-busy-") as tmp:
        folder = Path(args.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (name, extra, hog) in enumerate(cases):
            cfg = write_config(folder, f"busy-{i}", 8, args.steps)
            s = train(cfg, {**base, **extra}, hog)
            out["cases"].append({"case": name, "s_per_step": round(s, 2)})
            alone = out["cases"][0]["s_per_step"]
            print(f"{name:50} {s:7.2f} s/step  ({s / alone:.2f}x alone)", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
