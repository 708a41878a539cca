"""The same benchmarks on two versions of lorakit, in one sitting on one machine: before and after
a change, so the comparison is not blurred by another machine or another hour.

    python benchmarks/before_after.py BEFORE [--after REF] [--bench eval serve compare demo]
                                      [--rounds 2] [--run runs/demo]

BEFORE / --after are git revisions (default after: the working tree as it is). Each is checked out
once into a temporary worktree (the working tree itself for "after" by default), and every
benchmark runs as its own process with that tree's `src` first on PYTHONPATH, alternating
A B B A ... so slow drift of the machine falls on both sides alike. The benchmarks are the
repository's own, each printing JSON as its last line:

- eval:    benchmarks/use.py RUN --no-merge (eval answers/s, batches of 16 and one at a time)
- serve:   benchmarks/serve.py --no-llamacpp (lorakit serve's tokens/s and TTFT at 1, 8, 32 clients)
- compare: benchmarks/compare.py --quick (lorakit against the guide's recipe: the ratios)
- demo:    `lorakit demo` (train + eval on the bundled data; seconds and exact match)

Run it on an otherwise idle machine. Prints a table of the figures per side (median over rounds)
and, last, JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _figures(name: str, out: dict) -> dict[str, float]:
    """The few numbers of each benchmark's JSON that a before/after table compares."""
    if name == "eval":
        e = out["eval"]
        return {"answers/s (batch 16)": e["batch_16_answers_per_s"], "answers/s (one at a time)": e["batch_1_answers_per_s"]}
    if name == "serve":
        rows = {f"tokens/s, {r['scenario']}": r["tokens_per_s"] for r in out["lorakit"]}
        rows.update({f"TTFT p50 s, {r['scenario']}": r["ttft_p50_s"] for r in out["lorakit"]
                     if r.get("ttft_p50_s") is not None})
        return rows
    if name == "compare":
        return {k: round(out[k], 3) for k in ("throughput_ratio", "real_throughput_ratio", "peak_rss_ratio")} | \
            {"lorakit trained tokens/s": out["lorakit"]["trained_tokens_per_s"]}
    if name == "demo":
        return {k: out[k] for k in ("seconds", "train_seconds", "exact_match") if k in out}
    raise ValueError(name)


def _command(name: str, tree: Path, run: Path, work: Path) -> list[str]:
    py = sys.executable
    if name == "eval":
        return [py, str(tree / "benchmarks/use.py"), str(run), "--no-merge"]
    if name == "serve":
        return [py, str(tree / "benchmarks/serve.py"), "--no-llamacpp"]
    if name == "compare":
        return [py, str(tree / "benchmarks/compare.py"), "--quick", "--out", str(work / "compare")]
    if name == "demo":
        return [py, "-c", DEMO, str(work / "demo")]
    raise ValueError(name)


DEMO = """
import json, re, sys, time, contextlib, io
from lorakit.demo.run import run_demo
t0 = time.perf_counter()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    run_demo(sys.argv[1], ["--output.overwrite=true"])
text = buf.getvalue()
trained = re.search(r"trained in (\\d+) s", text)
em = re.search(r"exact match\\s+([\\d.]+)%\\s+([\\d.]+)%", text)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "train_seconds": float(trained.group(1)),
                  "exact_match": float(em.group(2)) if em else None}))
"""


def run_one(name: str, tree: Path, run: Path, work: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src") + os.pathsep + str(tree / "benchmarks")}
    t0 = time.perf_counter()
    proc = subprocess.run(_command(name, tree, run, work), cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} in {tree} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    figures = _figures(name, json.loads(last))
    figures["wall s"] = round(time.perf_counter() - t0, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="git revision of the 'before' side")
    p.add_argument("--after", help="git revision of the 'after' side (default: the working tree)")
    p.add_argument("--bench", nargs="+", default=["eval", "serve", "compare", "demo"],
                   choices=["eval", "serve", "compare", "demo"])
    p.add_argument("--rounds", type=int, default=2, help="runs per side and benchmark (alternating)")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="trained run for the eval benchmark")
    args = p.parse_args(argv)
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-before-after-") as tmp:
        tmp = Path(tmp)
        trees = {}
        for side, rev in (("before", args.before), ("after", args.after)):
            if rev is None:
                trees[side] = ROOT
                continue
            trees[side] = tmp / side
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(trees[side]), rev], check=True,
                           capture_output=True)
        try:
            for name in args.bench:
                results[name] = {"before": [], "after": []}
                order = [("before", "after"), ("after", "before")]
                for i in range(args.rounds):
                    for side in order[i % 2]:
                        work = tmp / f"{name}-{side}-{i}"
                        work.mkdir()
                        got = run_one(name, trees[side], args.run.resolve(), work)
                        results[name][side].append(got)
                        print(f"{name:8} {side:6} round {i + 1}: {got}", flush=True)
        finally:
            for side, rev in (("before", args.before), ("after", args.after)):
                if rev is not None:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[side])],
                                   capture_output=True)
    print(f"\n| benchmark | figure | before ({args.before}) | after ({args.after or 'working tree'}) | after / before |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, sides in results.items():
        for key in sides["before"][0]:
            b = statistics.median(r[key] for r in sides["before"])
            a = statistics.median(r[key] for r in sides["after"])
            summary[f"{name}: {key}"] = {"before": b, "after": a}
            ratio = f"{a / b:.2f}" if b else "-"
            print(f"| {name} | {key} | {b:g} | {a:g} | {ratio} |")
    print(json.dumps({"before": args.before, "after": args.after, "runs": results, "median": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
