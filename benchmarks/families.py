"""The fast path against the plain path, family by family: trained tokens/s at equal loss.

    python benchmarks/families.py [--steps 20] [--hidden 256] [--layers 4] [--families llama gemma3 ...]

For every family of tests/conftest.py (tiny random models from each family's own transformers
configuration class, `--hidden` wide and `--layers` deep, the tests' small BPE tokenizer), the
demo's support data is trained for `--steps` optimizer steps, packed, fp32, twice in this process:
with lorakit's fast path (fused LoRA linears, attention per packed example, the loss head on
labelled positions) and with `train.fast_path: false` (PEFT + transformers' own forward). Figures:
trained tokens/s of each (the run's own count, the training loop only), their ratio, and the
largest difference between the two runs' logged losses (equal work: the same examples in the same
order). A regression in one family shows as its ratio falling. Run it on an otherwise idle
machine. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

DEMO = ROOT / "src" / "lorakit" / "demo" / "data"


def run(folder: Path, model: Path, name: str, steps: int, fast: bool) -> dict:
    from conftest import tiny_config

    from lorakit import config
    from lorakit.train.run import train

    raw = tiny_config(folder, model, name, data={"train": [str(DEMO / "train.jsonl")], "template": "chatml",
                                                 "max_length": 256, "packing": True, "val_fraction": 0.0},
                      lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                      train={"max_steps": steps, "batch_size": 8, "eval_steps": 0, "fast_path": fast, "lr": 2e-4})
    run_dir = train(config.from_dict(raw), log=lambda s: None, progress=False)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    meta = json.loads((run_dir / "adapter" / "lorakit.json").read_text())
    return {"tokens_per_s": meta["metrics"]["trained_tokens_per_s"], "losses": losses}


def main(argv: list[str] | None = None) -> int:
    from conftest import FAMILIES, build_tiny_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    out: dict = {"cores": os.cpu_count(), "steps": a.steps, "hidden": a.hidden, "layers": a.layers, "families": {}}
    with tempfile.TemporaryDirectory(prefix="lorakit-families-") as tmp:
        folder = Path(a.out or tmp)
        for fam in a.families:
            model = build_tiny_model(folder / fam / "model", family=fam, hidden=a.hidden, layers=a.layers)
            fast = run(folder / fam, model, "fast", a.steps, True)
            plain = run(folder / fam, model, "plain", a.steps, False)
            diff = max(abs(x - y) for x, y in zip(fast["losses"], plain["losses"]))
            row = {"fast_tps": fast["tokens_per_s"], "plain_tps": plain["tokens_per_s"],
                   "speedup": round(fast["tokens_per_s"] / plain["tokens_per_s"], 2),
                   "max_loss_diff": diff, "last_loss": fast["losses"][-1]}
            out["families"][fam] = row
            print(f"{fam:10} fast {row['fast_tps']:8.0f} tok/s  plain {row['plain_tps']:8.0f} tok/s  "
                  f"{row['speedup']:.2f}x  max |loss diff| {diff:.1e}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
