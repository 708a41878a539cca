"""Does GRPO with a JSON-fields reward help after SFT? Against the same time in more SFT, held out.

    python benchmarks/grpo_quality.py                      # data, SFT (1 epoch), GRPO, control, scores
    python benchmarks/grpo_quality.py --out DIR --steps 15

The checkable task of `benchmarks/json_task.py` (customer order messages -> one JSON line with
intent, order, item, quantity; 400 train / 60 test rows). Each step is a `lorakit` command as a user
types it, in its own process:

1. SFT for one epoch on the first `--sft-rows` rows (the task's config, `--train.epochs 1
   --data.limit 48`: on all 400 rows one epoch already answers every test row exactly).
2. GRPO from that adapter: `lorakit train examples/grpo.yaml --model.adapter SFT` (json_fields +
   0.2 × json_valid, 4 prompts × 4 answers a step).
3. The control: more SFT from the same adapter on the same 48 rows for as many optimizer steps
   as fit in GRPO's seconds (GRPO's prompts come from all 400 rows, but it sees their answers only
   through the reward).
4. `lorakit eval RUN --data test.jsonl` for the three: exact match and JSON field accuracy.

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


def lorakit(*args: str) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"lorakit {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def scores(run: Path, test: Path) -> dict:
    lorakit("eval", str(run), "--data", str(test))
    s = json.loads((run / "eval" / "test.summary.json").read_text())["scores"]["tuned"]
    return {"exact_match": s["exact_match"], "json_field_accuracy": s.get("json_field_accuracy")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "runs" / "grpo-quality"))
    p.add_argument("--steps", type=int, default=15, help="GRPO steps")
    p.add_argument("--sft-rows", type=int, default=48,
                   help="rows the SFT epoch sees (all 400 reach 100 %% in one epoch: nothing left to improve)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    data = out / "data"
    subprocess.run([sys.executable, str(HERE / "json_task.py"), str(data)], check=True, capture_output=True)
    common = ["--output.dir", str(out), "--output.overwrite", "true"]
    sft_s = lorakit("train", str(data / "json_task.yaml"), "--train.epochs", "1", "--data.limit", str(a.sft_rows),
                    "--output.name", "sft", *common)
    sft = out / "sft"
    grpo_s = lorakit("train", str(ROOT / "examples" / "grpo.yaml"), "--model.adapter", str(sft), "--data.train",
                     str(data / "train.jsonl"), "--train.max_steps", str(a.steps), "--train.save_steps", "0",
                     "--output.name", "grpo", *common)
    m = json.loads((sft / "adapter" / "lorakit.json").read_text())["metrics"]
    steps = max(1, math.floor(grpo_s / (m["train_seconds"] / max(1, m["steps"]))))
    more_s = lorakit("train", str(sft / "config.yaml"), "--model.adapter", str(sft), "--train.max_steps", str(steps),
                     "--train.eval_steps", "0", "--output.name", "sft-more", *common)
    test = data / "test.jsonl"
    got = {name: scores(out / name, test) for name in ("sft", "grpo", "sft-more")}
    print(f"SFT 1 epoch {sft_s:.0f} s; GRPO {a.steps} steps {grpo_s:.0f} s; control {steps} more SFT steps {more_s:.0f} s")
    print("| run | added seconds | test exact match | JSON field accuracy |")
    print("|---|---|---|---|")
    for name, label, secs in (("sft", "SFT, 1 epoch", 0), ("grpo", "SFT + GRPO", grpo_s),
                              ("sft-more", "SFT + more SFT (control)", more_s)):
        g = got[name]
        print(f"| {label} | {secs:.0f} | {g['exact_match']:.1%} | {g['json_field_accuracy']:.1%} |")
    print(json.dumps({"scores": got, "seconds": {"sft": sft_s, "grpo": grpo_s, "control": more_s},
                      "control_steps": steps}))


if __name__ == "__main__":
    main()
