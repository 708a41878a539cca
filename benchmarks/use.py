"""The use stages on a trained run: eval throughput batched vs one at a time, and merge time + parity.

    python benchmarks/use.py [RUN] [--limit N] [--dtypes fp32 bf16 fp16] [--out DIR]

RUN defaults to runs/demo (make it with `lorakit demo`). Eval: the run's test split (else its
validation split), greedy, the same prompts answered in batches of 16 and one at a time in the
same process; the answers must be identical, the ratio of answers/s is the figure. Merge: one
`lorakit merge` per dtype into a temporary folder, wall time and the parity check it prints.
Run it on an otherwise idle machine. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def eval_throughput(run: Path, limit: int | None, max_new_tokens: int) -> dict:
    from lorakit.artifacts import RunPaths
    from lorakit.evaluate import answer, eval_sets, split_reference
    from lorakit.infer import load_session

    session = load_session(run, log=lambda s: None)
    paths = RunPaths.of(run)
    try:
        (s,) = eval_sets(paths, session, split="test")
    except Exception:  # noqa: BLE001 - no data.test: the validation split
        (s,) = eval_sets(paths, session)
    prompts = [split_reference(ex)[0] for ex in s.examples][:limit]
    out = {"set": s.name, "prompts": len(prompts), "max_new_tokens": max_new_tokens}
    answers = {}
    for batch in (16, 1):
        answer(session, prompts[:2], max_new_tokens=4, batch_size=batch)  # warm-up
        t0 = time.perf_counter()
        answers[batch] = answer(session, prompts, max_new_tokens=max_new_tokens, batch_size=batch)
        out[f"batch_{batch}_s"] = round(time.perf_counter() - t0, 2)
        out[f"batch_{batch}_answers_per_s"] = round(len(prompts) / out[f"batch_{batch}_s"], 2)
    out["identical"] = answers[16] == answers[1]
    out["speedup"] = round(out["batch_16_answers_per_s"] / out["batch_1_answers_per_s"], 2)
    return out


def merge_figures(run: Path, dtypes: list[str], out_root: Path) -> list[dict]:
    from lorakit.config import MergeConfig
    from lorakit.merge import merge

    rows = []
    for dtype in dtypes:
        target = out_root / f"merged-{dtype}"
        t0 = time.perf_counter()
        report = merge(run, target, MergeConfig(dtype=dtype, overwrite=True), log=lambda s: None)
        seconds = time.perf_counter() - t0
        rows.append({"dtype": dtype, "seconds": round(seconds, 1), "report": report.to_dict()})
        shutil.rmtree(target, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="runs/demo")
    p.add_argument("--limit", type=int, help="answer only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=20, help="as the demo (default 20)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"])
    p.add_argument("--no-merge", action="store_true")
    args = p.parse_args(argv)
    from lorakit.cli import _quiet_libraries

    _quiet_libraries()  # no weight-loading bars between the figures
    run = Path(args.run)
    result = {"run": str(run), "eval": eval_throughput(run, args.limit, args.max_new_tokens)}
    e = result["eval"]
    print(f"eval '{e['set']}', {e['prompts']} prompts, greedy, up to {e['max_new_tokens']} new tokens:")
    print(f"  batches of 16: {e['batch_16_s']:.1f} s ({e['batch_16_answers_per_s']} answers/s)")
    print(f"  one at a time: {e['batch_1_s']:.1f} s ({e['batch_1_answers_per_s']} answers/s)")
    print(f"  speed-up {e['speedup']}x, answers identical: {e['identical']}")
    if not args.no_merge:
        with tempfile.TemporaryDirectory(prefix="lorakit-merge-bench-") as tmp:
            result["merge"] = merge_figures(run, args.dtypes, Path(tmp))
        for m in result["merge"]:
            r = m["report"]
            print(f"merge {m['dtype']}: {m['seconds']} s wall; max |dlogit| {r['parity']['max_abs_diff']:.3g}, mean "
                  f"{r['parity']['mean_abs_diff']:.3g}, tolerance {r['tolerance']:.3g}, greedy identical "
                  f"{r['parity']['greedy_identical']}, adapter effect {r['adapter_effect']:.3g}")
    print(json.dumps(result, default=str))
    return 0 if e["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
