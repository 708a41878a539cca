"""What the studio costs: a long run's page, its idle CPU, and a training watched live.

    python benchmarks/studio.py [--steps 10000] [--train-steps 24] [--rounds 3] [--skip-train] [--out DIR]

1. A run folder with `--steps` logged steps (train loss, learning rate, gradient norm and tokens/s
   every step, an evaluation every 100) is written, `lorakit studio` is started on it, and headless
   Chromium (Playwright, Debian's executable) opens the run's page: the time to the page's first
   drawn curve (navigation to the loss chart in the DOM), and the JSON API's time for the same
   page. Three loads, the median.
2. Idle CPU: the studio process's CPU seconds over 30 s with that page open (its event stream
   polling the run folder), as a share of one core.
3. Training with the studio watching: the demo config (SmolLM2-135M, support data) for
   `--train-steps` steps, trained `--rounds` times alternately alone and with the studio's page
   open on the run (the studio and Chromium on the same machine), tokens/s from the run's own
   metrics: over the whole loop (which includes the page's one-off load), and over the steps after
   the first third (the steady cost of watching: the event stream and its redraws). Run it on an
   otherwise idle machine. Last line: JSON.
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

from processes import DEMO, write_config

CHROMIUM = "/usr/bin/chromium"
DEMO_BATCH = yaml.safe_load((DEMO / "demo.yaml").read_text(encoding="utf-8"))["train"]["batch_size"]


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


def rates(records: list[dict], after: int) -> tuple[float, float]:
    """(tokens/s of the whole training loop, tokens/s over the steps after step `after`). Each
    record's trained_tokens_per_s is cumulative from the loop's start, so a record's time is
    trained_tokens / trained_tokens_per_s and a window's rate is its tokens over its time."""
    logged = [r for r in records if r.get("trained_tokens_per_s")]
    start = max((r for r in logged if r["step"] <= after), key=lambda r: r["step"])
    end = logged[-1]
    seconds = end["trained_tokens"] / end["trained_tokens_per_s"] - start["trained_tokens"] / start["trained_tokens_per_s"]
    return float(end["trained_tokens_per_s"]), (end["trained_tokens"] - start["trained_tokens"]) / seconds


def cpu_seconds(pids: list[int] | None = None) -> dict[str, float]:
    """CPU seconds used so far by the studio (`pids`) and by every Chromium process."""
    import psutil

    out = {"studio": 0.0, "chromium": 0.0}
    for p in psutil.process_iter(["pid", "name", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is None:
            continue
        if pids and p.info["pid"] in pids:
            out["studio"] += t.user + t.system
        elif "chrom" in (p.info["name"] or ""):
            out["chromium"] += t.user + t.system
    return out


def train_tps(folder: Path, name: str, steps: int, watch=None) -> tuple[float, float, int | None]:
    """(whole-loop tokens/s, tokens/s after the first third of the steps, the step logged when the
    watching page had drawn its curve) of a demo-config training; `watch(run_name)` opens its page
    and returns once the page shows the run. The steady window leaves out the page's one-off load,
    which happens while the first steps train."""
    cfg = write_config(folder, name, DEMO_BATCH, steps)
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = folder / "runs" / name / "metrics.jsonl"
    page = loaded_at = None
    if watch is not None:
        while not metrics.is_file() and proc.poll() is None:
            time.sleep(0.2)
        page = watch(name)
        loaded_at = max((json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()), default=0)
    assert proc.wait() == 0
    if page is not None:
        page.close()
    whole, steady = rates([json.loads(line) for line in metrics.read_text().splitlines()], steps // 3)
    return whole, steady, loaded_at


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--train-steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
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
                    page.wait_for_selector("#section-charts", timeout=120_000)
                    return page

                alone, watched, loaded, used = [], [], [], []
                for i in range(args.rounds):
                    alone.append(train_tps(folder, f"alone-{i}", args.train_steps)[:2])
                    before, start = cpu_seconds([proc.pid]), time.perf_counter()
                    *w, at = train_tps(folder, f"watched-{i}", args.train_steps, watch)
                    after, seconds = cpu_seconds([proc.pid]), time.perf_counter() - start
                    used.append({k: round(100 * (after[k] - before[k]) / seconds, 1) for k in after})
                    watched.append(tuple(w))
                    loaded.append(at)
                    print(f"round {i + 1}: alone {alone[-1][0]:.1f} tok/s (after step {args.train_steps // 3}: "
                          f"{alone[-1][1]:.1f}), watched {watched[-1][0]:.1f} ({watched[-1][1]:.1f}; page drawn at "
                          f"step {at}); while watched, % of one core: {used[-1]}", flush=True)
                med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
                out.update(alone_tps=alone, watched_tps=watched, page_drawn_at_step=loaded, watching_cpu_pct=used,
                           watched_over_alone=round(med(watched, 0) / med(alone, 0), 3),
                           steady_watched_over_alone=round(med(watched, 1) / med(alone, 1), 3))
                print(f"watched / alone (medians): whole loop {out['watched_over_alone']}, after step "
                      f"{args.train_steps // 3} {out['steady_watched_over_alone']}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            browser.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
