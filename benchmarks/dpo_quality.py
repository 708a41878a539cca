"""Does DPO on the adapter's own mistakes help? SFT -> pairs -> DPO against more SFT, on the test split.

    python benchmarks/dpo_quality.py                       # after `lorakit demo` (runs/demo)
    python benchmarks/dpo_quality.py --sft runs/demo --samples 4 --out benchmarks/runs/dpo-quality

The guide's "look at what is wrong, adjust, train again" loop as the user types it, each step a
`lorakit` command in its own process:

1. `lorakit pairs SFT --split validation --samples K`: the validation rows the SFT adapter answers
   wrong (exact match), greedy and K sampled answers, as pairs (reference chosen, answer rejected).
2. `lorakit train examples/dpo.yaml --model.adapter SFT --data.train pairs.jsonl`: DPO from the
   SFT adapter (reference = base + that adapter).
3. The control: the same SFT adapter trained further with SFT on its own training data
   (`train.method sft`, `model.adapter SFT`, the demo's settings) for as many seconds as step 2
   took (pairs + DPO), so both spend the same added time.
4. `lorakit eval RUN --split test` for the SFT run, the DPO run and the control (the test rows
   were never trained on nor used for pairs): exact match before and after.

Prints a table and, last, a JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def lorakit(*args: str, cwd: Path = ROOT) -> tuple[str, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"lorakit {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr, time.perf_counter() - start


TEST = ROOT / "src" / "lorakit" / "demo" / "data" / "test.jsonl"


def exact_match(run: Path, test: Path) -> float:
    lorakit("eval", str(run), "--data", str(test))  # the same file for every run, written as eval/test.*
    summary = json.loads((run / "eval" / "test.summary.json").read_text())
    return summary["scores"]["tuned"]["exact_match"]


def meta(run: Path) -> dict:
    return json.loads((run / "adapter" / "lorakit.json").read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "runs" / "dpo-quality"))
    p.add_argument("--test", default=str(TEST), help="held-out rows scored for every run (default: the demo's)")
    p.add_argument("--reuse", action="store_true", help="keep the pairs and runs of an earlier call in --out "
                                                        "(their seconds from its timings.json); only score again")
    a = p.parse_args(argv)
    sft, out = Path(a.sft).resolve(), Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (sft / "adapter").is_dir():
        raise SystemExit(f"no SFT run in {sft}: run `lorakit demo` first (or pass --sft RUN)")
    pairs, dpo, control, timings = out / "pairs.jsonl", out / "dpo", out / "sft-more", out / "timings.json"
    if a.reuse and timings.is_file():
        pairs_s, dpo_s, control_s, steps = (json.loads(timings.read_text())[k]
                                            for k in ("pairs", "dpo", "control", "control_steps"))
    else:
        _, pairs_s = lorakit("pairs", str(sft), "--split", "validation", "--samples", str(a.samples),
                             "--seed", "0", "--out", str(pairs))
        _, dpo_s = lorakit("train", str(ROOT / "examples" / "dpo.yaml"), "--model.adapter", str(sft),
                           "--data.train", str(pairs), "--output.dir", str(out), "--output.name", "dpo",
                           "--output.overwrite", "true")
        # the control: more SFT from the same adapter, as many optimizer steps as fit in the same seconds
        m = meta(sft)
        per_step = m["metrics"]["train_seconds"] / max(1, m["metrics"]["steps"])
        steps = max(1, math.floor((pairs_s + dpo_s) / per_step))
        _, control_s = lorakit("train", str(sft / "config.yaml"), "--model.adapter", str(sft), "--train.method",
                               "sft", "--train.max_steps", str(steps), "--train.eval_steps", "0", "--output.dir",
                               str(out), "--output.name", "sft-more", "--output.overwrite", "true")
        timings.write_text(json.dumps({"pairs": pairs_s, "dpo": dpo_s, "control": control_s, "control_steps": steps}))
    n_pairs = sum(1 for _ in pairs.open())
    added = pairs_s + dpo_s
    test = Path(a.test).resolve()
    em = {name: exact_match(run, test) for name, run in (("sft", sft), ("dpo", dpo), ("sft-more", control))}
    d = meta(dpo)["metrics"]
    print(f"pairs: {n_pairs} from the validation split ({pairs_s:.0f} s); DPO {d['steps']} steps ({dpo_s:.0f} s); "
          f"control: {steps} more SFT steps ({control_s:.0f} s)")
    print("| run | added seconds | test exact match |")
    print("|---|---|---|")
    print(f"| SFT (runs/demo) | 0 | {em['sft']:.1%} |")
    print(f"| SFT -> pairs -> DPO | {added:.0f} | {em['dpo']:.1%} |")
    print(f"| SFT -> more SFT (control) | {control_s:.0f} | {em['sft-more']:.1%} |")
    print(json.dumps({"pairs": n_pairs, "exact_match": em, "seconds": {"pairs": pairs_s, "dpo": dpo_s,
                                                                      "control": control_s},
                      "control_steps": steps}))


if __name__ == "__main__":
    main()
