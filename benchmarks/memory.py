"""Peak memory over a short and a long lorakit run on the same data: does it grow with run length?

    python benchmarks/memory.py              # 4 and 30 optimizer steps on compare.py's full-mode data
    python benchmarks/memory.py --seed 1 --steps 4 30 60

Each run is compare.py's lorakit side (the guide's settings, lorakit's defaults) in its own
process, on the same train file: compare.py's full mode writes 480 rows (30 steps × 16), and a
shorter run trains on the first steps' worth of its one shuffled epoch. A run's peak is the RSS
high-water mark of its process (common.emit) and the highest RSS sampled inside the training loop
(common.Meter). The last line is a JSON object with both per run and the ratio of the longest run's
loop peak to the shortest's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import make_data  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[4, compare.FULL["steps"]])
    p.add_argument("--seed", type=int, default=0, help="data generator seed")
    p.add_argument("--model", help="base model folder (default: lorakit's embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", type=Path, default=HERE / "data-memory")
    p.add_argument("--out", type=Path, default=HERE / "runs-memory")
    a = p.parse_args(argv)
    if a.model is None:
        from lorakit.model.embedded import embedded_model_dir

        a.model = str(embedded_model_dir())
    a.out.mkdir(parents=True, exist_ok=True)
    rows = max(a.steps) * compare.BATCH * compare.ACCUM
    train_file, _ = make_data.write(a.data, rows, 1, a.seed)
    runs = {}
    for steps in sorted(set(a.steps)):
        r = compare.run_worker(f"lorakit-{steps}", [sys.executable, str(HERE / "compare.py"), "--side", "lorakit",
                                                    "--model", a.model, "--train", str(train_file),
                                                    "--steps", str(steps), "--out", str(a.out)], a.out)
        runs[steps] = {k: r[k] for k in ("peak_rss_bytes", "rss_peak_in_loop_bytes", "train_seconds",
                                         "trained_tokens_per_s")}
        print(f"{steps:>4} steps: peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB, in the loop "
              f"{r['rss_peak_in_loop_bytes'] / 2**20:,.0f} MiB, {r['trained_tokens_per_s']:.1f} trained tokens/s",
              flush=True)
    short, long = runs[min(runs)], runs[max(runs)]
    summary = {"seed": a.seed, "rows": rows, "runs": runs,
               "long_over_short_peak": long["peak_rss_bytes"] / short["peak_rss_bytes"],
               "long_over_short_loop_peak": long["rss_peak_in_loop_bytes"] / short["rss_peak_in_loop_bytes"]}
    print(f"longest / shortest run: peak {summary['long_over_short_peak']:.3f}, "
          f"in the loop {summary['long_over_short_loop_peak']:.3f}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
