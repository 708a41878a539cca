"""The speed targets of issue 13 over compare.py's four comparisons: full and --quick, data seeds 0 and 1.

    python benchmarks/targets.py                     # run what is not measured yet, then judge all four
    python benchmarks/targets.py --judge             # judge what is already measured, run nothing
    python benchmarks/targets.py --runs quick:0 full:1 --rerun

Each comparison is `compare.py` in its own process (data in OUT/data-MODE-SEED, run folders in
OUT/MODE-SEED, its output in OUT/MODE-SEED.log). Its summary, compare.py's last JSON line, is
kept as OUT/MODE-SEED.json, written atomically, so a sitting that ends halfway keeps what was
measured and the next call runs only what is missing (`--rerun` measures again). All four take
about 40 minutes on 2 idle cores with native bf16 and over an hour without; run nothing beside
them (compare.py's docstring says why).

The targets, judged per comparison (TARGETS, the one place they are written down):
- trained tokens/s at least 4× the recipe's;
- lorakit's useful FLOP/s at least 30 % of the bf16 matmul rate measured in the same run. This is
  judged only where the recipe trained in the guide's bf16, i.e. on a CPU with native bf16
  (AVX512-BF16 / AMX). Elsewhere compare.py trains both sides in fp32 and the bf16 rate is an
  emulation's, so the comparison is "not judged" and the verdict cannot be "met";
- peak RSS at most 0.5× the recipe's;
- held-out loss at most the recipe's × 1.005.

The verdict is "met" when all four comparisons are measured and meet every target, "missed" when a
judged target is missed, and "undecided" otherwise. The other targets of the issue have their own
commands: flat memory over run length is `python benchmarks/memory.py`, and plan accuracy is
`pytest -m slow tests/test_plan.py`. The command prints a Markdown table for BENCHMARKS.md and, as
its last line, one JSON object with the verdict and each comparison's figures.
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = ("full:0", "full:1", "quick:0", "quick:1")

# (key, what it measures, comparison, bound); `figures` computes each key from a compare.py summary.
TARGETS = (
    ("throughput_ratio", "trained tokens/s, lorakit / recipe", operator.ge, 4.0),
    ("bf16_share", "lorakit's share of the bf16 matmul rate", operator.ge, 0.30),
    ("peak_rss_ratio", "peak RSS, lorakit / recipe", operator.le, 0.5),
    ("eval_loss_ratio", "held-out loss, lorakit / recipe", operator.le, 1.005),
)


def parse_run(text: str) -> tuple[str, int]:
    mode, _, seed = text.partition(":")
    if mode not in ("full", "quick") or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a run is MODE:SEED with MODE full or quick, e.g. quick:0")
    return mode, int(seed)


def name(mode: str, seed: int) -> str:
    return f"{mode}-{seed}"


RUN_NAMES = tuple(name(*parse_run(r)) for r in RUNS)


def figures(summary: dict) -> dict:
    """The targets' quantities from one compare.py summary. The bf16 share is None where the recipe
    did not train in bf16: there the bf16 rate is torch's emulation, which says nothing about lorakit."""
    native = summary.get("recipe_precision", "bf16") == "bf16"
    return {
        "throughput_ratio": summary["throughput_ratio"],
        "bf16_share": summary["lorakit"]["fraction_of_bf16_matmul"] if native else None,
        "peak_rss_ratio": summary["peak_rss_ratio"],
        "eval_loss_ratio": summary["eval_loss_lorakit"] / summary["eval_loss_recipe"],
    }


def judge_one(summary: dict) -> dict:
    """Per target: True (met), False (missed) or None (not judged); with the figures."""
    values = figures(summary)
    checks = {key: None if values[key] is None else bool(cmp(values[key], bound)) for key, _, cmp, bound in TARGETS}
    return {"figures": values, "checks": checks}


def judge(summaries: dict[str, dict | None], wanted: list[str]) -> dict:
    """The verdict over the `wanted` comparisons (names as `name` makes them); None = not measured."""
    judged = {n: judge_one(s) for n, s in summaries.items() if s is not None}
    missing = [n for n in wanted if summaries.get(n) is None]
    checks = [c for j in judged.values() for c in j["checks"].values()]
    if any(c is False for c in checks):
        verdict = "missed"
    elif missing or any(c is None for c in checks) or set(wanted) != set(RUN_NAMES):
        verdict = "undecided"
    else:
        verdict = "met"
    reasons = []
    if missing:
        reasons.append(f"not measured: {', '.join(missing)}")
    if any(c is None for c in checks):
        reasons.append("the recipe trained in fp32 (this CPU has no native bf16), so the bf16-rate target "
                       "is not judged; run on a CPU with AVX512-BF16 or AMX")
    if set(wanted) != set(RUN_NAMES):
        reasons.append(f"only {', '.join(wanted)} of the four comparisons were asked for")
    return {"verdict": verdict, "reasons": reasons, "runs": judged}


def table(summaries: dict[str, dict | None], result: dict) -> str:
    """Markdown rows for BENCHMARKS.md: a missed target is marked, and a bf16 share not judged says so."""
    head = ("| run | loop s, recipe → lorakit | throughput ratio | lorakit's share of the bf16 rate "
            "| peak RSS recipe → lorakit | RSS ratio | held-out base / recipe / lorakit | recipe precision |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for n, summary in summaries.items():
        if summary is None:
            lines.append(f"| {n} | not measured |" + " |" * (head.count(" | ") - 1))
            continue
        j = result["runs"][n]
        mark = lambda key, text: text + (" (missed)" if j["checks"][key] is False else "")  # noqa: E731
        r, lk = summary["recipe"], summary["lorakit"]
        if j["checks"]["bf16_share"] is not None:
            share_text = f"{lk['fraction_of_bf16_matmul']:.1%}"
        else:  # the bf16 rate is an emulation's: show the share of the rate lorakit computed at
            share_text = f"not judged ({lk['fraction_of_own_matmul']:.1%} of the {lk['compute_dtype']} rate)"
        throughput, rss = f"{summary['throughput_ratio']:.2f}×", f"{summary['peak_rss_ratio']:.2f}×"
        lines.append(
            f"| {n} | {r['train_seconds']:.1f} → {lk['train_seconds']:.1f} "
            f"| {mark('throughput_ratio', throughput)} | {mark('bf16_share', share_text)} "
            f"| {r['peak_rss_bytes'] / 2**20:,.0f} → {lk['peak_rss_bytes'] / 2**20:,.0f} MiB "
            f"| {mark('peak_rss_ratio', rss)} "
            f"| {summary['eval_loss_base']:.4f} / {summary['eval_loss_recipe']:.4f} / "
            f"{mark('eval_loss_ratio', format(summary['eval_loss_lorakit'], '.4f'))} "
            f"| {summary.get('recipe_precision', 'bf16')} |")
    return "\n".join(lines)


def run_compare(mode: str, seed: int, out: Path, model: str | None) -> dict:
    """compare.py for one comparison in its own process; its summary (the last stdout line)."""
    n = name(mode, seed)
    cmd = [sys.executable, str(HERE / "compare.py"), "--seed", str(seed), "--data", str(out / f"data-{n}"),
           "--out", str(out / n)] + (["--quick"] if mode == "quick" else []) + (["--model", model] if model else [])
    log = out / f"{n}.log"
    print(f"[{n}] running: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent)
    lines = log.read_text(errors="replace").splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        sys.exit(f"[{n}] compare.py failed with exit status {proc.returncode}; last lines of {log}:\n"
                 + "\n".join(lines[-30:]))
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    from lorakit.artifacts import atomic_write_json, now_iso

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=parse_run, nargs="+", default=[parse_run(r) for r in RUNS],
                   help="comparisons as MODE:SEED (default: all four)")
    p.add_argument("--judge", action="store_true", help="run nothing; judge the summaries already in --out")
    p.add_argument("--rerun", action="store_true", help="measure again what is already measured")
    p.add_argument("--model", help="base model folder (default: lorakit's embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=HERE / "runs-targets", help="folder for data, runs and summaries")
    a = p.parse_args(argv)
    if a.judge and a.rerun:
        p.error("--judge runs nothing and --rerun measures again: give one of them")
    a.out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict | None] = {}
    for mode, seed in a.runs:
        n = name(mode, seed)
        path = a.out / f"{n}.json"
        if path.is_file() and not a.rerun:
            summaries[n] = json.loads(path.read_text(encoding="utf-8"))
            print(f"[{n}] measured before: {path}", flush=True)
        elif a.judge:
            summaries[n] = None
        else:
            summaries[n] = {**run_compare(mode, seed, a.out, a.model),
                            "measured": now_iso()}
            atomic_write_json(path, summaries[n])
            print(f"[{n}] throughput {summaries[n]['throughput_ratio']:.2f}×, "
                  f"peak RSS {summaries[n]['peak_rss_ratio']:.2f}×", flush=True)
    result = judge(summaries, list(summaries))
    print()
    print(table(summaries, result))
    print()
    for key, what, cmp, bound in TARGETS:
        print(f"target: {what} {'≥' if cmp is operator.ge else '≤'} {bound:g}")
    print(f"verdict: {result['verdict']}" + "".join(f"\n  {r}" for r in result["reasons"]))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
