"""What the studio costs: a long run's page, its idle CPU, and a training watched live.

    python benchmarks/studio.py [--steps 10000] [--train-steps 12] [--skip-train] [--out DIR]

1. A run folder with `--steps` logged steps (train loss, learning rate, gradient norm and tokens/s
   every step, an evaluation every 100) is written, `lorakit studio` is started on it, and headless
   Chromium (Playwright, Debian's executable) opens the run's page: the time to the page's first
   drawn curve (navigation to the loss chart in the DOM), and the JSON API's time for the same
   page. Three loads, the median.
2. Idle CPU: the studio process's CPU seconds over 30 s with that page open (its event stream
   polling the run folder), as a share of one core.
3. Training with the studio watching: the demo config (SmolLM2-135M, support data) for
   `--train-steps` steps, trained three times alternately alone and with the studio's page open on
   the run (the studio and Chromium in the same machine), tokens/s from the run's own metrics.
   Run it on an otherwise idle machine. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"


def fake_run(folder: Path, steps: int) -> None:
    """metrics.jsonl of a `steps`-step run as MetricsLogger writes it, and its config and data files."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        loss = 2.0 * (1 + s / 500) ** -0.5 + rng.gauss(0, 0.03)
        lines.append(json.dumps({"step": s, "epoch": s / 1000, "loss": round(loss, 4), "grad_norm": 0.5 + rng.random(),
                                 "learning_rate": 2e-4 * (1 - s / steps), "trained_tokens": 900 * s,
                                 "trained_tokens_per_s": 300 + rng.random() * 20, "real_tokens_per_s": 400.0}))
        if s % 100 == 0:
            lines.append(json.dumps({"step": s, "epoch": s / 1000, "eval_loss": round(loss + 0.1, 4)}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "smollm2-135m-instruct"},
                                                        "train": {"method": "sft", "max_steps": steps}}))
    (folder / "data.json").write_text(json.dumps({"template": "chatml", "counts": {"train": 1000}}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(runs: Path):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "studio", "--runs", str(runs), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/static/studio.css", timeout=2)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the studio did not start")


def page_times(url: str, run: str, browser) -> dict:
    import httpx

    loads, apis = [], []
    for _ in range(3):
        page = browser.new_page()
        start = time.perf_counter()
        page.goto(f"{url}/#/run/{run}")
        page.wait_for_selector("#chart-loss svg", timeout=120_000)
        loads.append(time.perf_counter() - start)
        page.close()
        start = time.perf_counter()
        httpx.get(f"{url}/api/run", params={"id": run}, timeout=120).raise_for_status()
        apis.append(time.perf_counter() - start)
    return {"first_curve_s": round(statistics.median(loads), 3), "api_run_s": round(statistics.median(apis), 3)}


def idle_cpu(proc, url: str, run: str, browser, seconds: float = 30.0) -> float:
    import psutil

    page = browser.new_page()
    page.goto(f"{url}/#/run/{run}")
    page.wait_for_selector("#chart-loss svg", timeout=120_000)
    p = psutil.Process(proc.pid)
    before = sum(p.cpu_times()[:2])
    time.sleep(seconds)
    used = sum(p.cpu_times()[:2]) - before
    page.close()
    return round(100 * used / seconds, 2)


def train_tps(folder: Path, name: str, steps: int, watch=None) -> float:
    """Tokens/s of a demo-config training of `steps` steps; `watch(run_name)` opens its page."""
    demo = yaml.safe_load((HERE.parent / "src/lorakit/demo/demo.yaml").read_text(encoding="utf-8"))
    data = HERE.parent / "src/lorakit/demo/data"
    demo["data"].update(train=str(data / "train.jsonl"), validation=str(data / "val.jsonl"))
    demo["data"].pop("test", None)
    demo["train"].update(max_steps=steps, eval_steps=0, report_to=[], logging_steps=1)
    demo["output"] = {"dir": str(folder / "runs"), "name": name, "overwrite": True}
    cfg = folder / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(demo), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    page = None
    if watch is not None:
        while not (folder / "runs" / name / "metrics.jsonl").is_file() and proc.poll() is None:
            time.sleep(0.2)
        page = watch(name)
    assert proc.wait() == 0
    if page is not None:
        page.close()
    records = [json.loads(line) for line in (folder / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return float([r for r in records if "trained_tokens_per_s" in r][-1]["trained_tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out: dict = {"cores": os.cpu_count(), "logged_steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="lorakit-studio-bench-") as tmp, sync_playwright() as pw:
        folder = Path(args.out or tmp)
        runs = folder / "runs"
        fake_run(runs / "long", args.steps)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        proc, url = start_studio(runs)
        try:
            out.update(page_times(url, "long", browser))
            print(f"{args.steps:,} logged steps: first curve in {out['first_curve_s']} s "
                  f"(GET /api/run {out['api_run_s']} s)", flush=True)
            out["idle_cpu_pct"] = idle_cpu(proc, url, "long", browser)
            print(f"studio CPU with the page open, idle: {out['idle_cpu_pct']} % of one core", flush=True)
            if not args.skip_train:
                def watch(name):
                    page = browser.new_page()
                    page.goto(f"{url}/#/run/{name}")
                    return page

                alone, watched = [], []
                for i in range(3):
                    alone.append(train_tps(folder, f"alone-{i}", args.train_steps))
                    watched.append(train_tps(folder, f"watched-{i}", args.train_steps, watch))
                    print(f"round {i + 1}: alone {alone[-1]:.1f} tok/s, watched {watched[-1]:.1f} tok/s", flush=True)
                out.update(alone_tps=alone, watched_tps=watched,
                           watched_over_alone=round(statistics.median(watched) / statistics.median(alone), 3))
                print(f"watched / alone (medians): {out['watched_over_alone']}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            browser.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
