"""lorakit side by side with the guide's recipe on TRL + PEFT: same model, data and optimizer steps.

    python benchmarks/compare.py            # full: 30 optimizer steps, 200 held-out rows
    python benchmarks/compare.py --quick    # 4 steps, 32 held-out rows (meant for under 10 minutes on 2 idle cores)
    python benchmarks/compare.py --steps 10 --eval-rows 100 --model DIR --data DIR --out DIR

In sequence, on this machine:

1. `make_data.py` writes steps × 16 training rows (so each side runs exactly one epoch over the
   same rows, whatever order its sampler picks) and the held-out rows, into `--data`
   (default benchmarks/data/).
2. torch.matmul of 2048² squares in fp32 and bf16: the machine's matmul rate, the limit to
   compare achieved FLOP/s with (each side against the dtype it computes in, too).
3. `recipe.py` (the guide's configuration on TRL's SFTTrainer) in its own process: with the
   guide's bf16 autocast, or in fp32 on a CPU without native bf16 (AVX512-BF16 / AMX), where
   torch emulates bf16 matmuls ~80× slower than fp32 and lorakit's mixed_precision auto picks
   fp32 too.
4. lorakit in its own process (`compare.py --side lorakit`): a config with data.template alpaca,
   the guide's LoRA settings and effective hyper-parameters (batch 4 × accumulation 4, lr 2e-4
   cosine, warmup 0.03, clip 0.3, weight decay 0.01, max length 2048), everything else lorakit's
   defaults (data.packing, labelled-positions loss, mixed_precision auto, gradient_checkpointing auto),
   except data.val_fraction 0: both sides train on the same rows, and neither evaluates inside
   the timed loop. Run through `lorakit.train.trainer.train(cfg, progress=False)`.
5. The held-out loss of the base model and of each adapter, computed here by one function
   (common.eval_loss): base + PeftModel.from_pretrained, fp32, token-weighted cross-entropy over
   response + EOS tokens, tokenized by lorakit's alpaca Template.encode for both.

Each worker reports its training-loop throughput, peak RSS and losses, measured by the same code
(common.Meter, see common.py for the token and FLOP definitions). The command prints a table and,
as its last line, one JSON object: throughput_ratio and peak_rss_ratio (lorakit / recipe),
eval_loss_lorakit, eval_loss_recipe, eval_loss_base, and the absolute figures.

Run folders and logs go to `--out` (default benchmarks/runs/).

Run it on an otherwise idle machine: the two sides run minutes apart, so other processes on the
same 2 cores skew the ratio as well as the absolute numbers (a --quick run at load average 4-8
took 33 minutes; the quick-mode budget of 10 minutes assumes idle cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402

BATCH, ACCUM = 4, 4  # the guide's batch 4 × accumulation 4; both sides
FULL = {"steps": 30, "eval_rows": 200}
QUICK = {"steps": 4, "eval_rows": 32}


# --------------------------------------------------------------------------- the lorakit side


def lorakit_config(model: str, train_file: str, out: Path, steps: int):
    from lorakit import config
    from lorakit.config import GUIDE_TARGETS

    return config.from_dict({
        "model": {"name": model},
        "data": {"train": [train_file], "val_fraction": 0.0, "template": "alpaca", "max_length": 2048},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": list(GUIDE_TARGETS)},
        "train": {"max_steps": steps, "batch_size": BATCH, "grad_accum": ACCUM, "lr": 2e-4, "scheduler": "cosine",
                  "warmup": 0.03, "max_grad_norm": 0.3, "weight_decay": 0.01},
        "output": {"dir": str(out), "name": "lorakit", "overwrite": True},
    })


def run_lorakit(model: str, train_file: str, out: Path, steps: int, result_path: str | None) -> dict:
    """Train with lorakit in this process, counting its batches with the same Meter as the recipe."""
    from common import Meter, MeteredMixin, emit
    from lorakit.resolve import resolve
    from lorakit.train import run as lk_run
    from lorakit.train import trainer as lk

    meter = Meter()

    class MeteredLorakitTrainer(MeteredMixin, lk.LorakitTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.meter = meter
            self.add_callback(meter)

    # fit() builds its trainer from this module attribute at call time; substituting the subclass
    # is the one way in from outside, and it changes nothing but the counting.
    lk.LorakitTrainer = MeteredLorakitTrainer
    cfg = lorakit_config(model, train_file, out, steps)
    run_dir = lk_run.train(cfg, progress=False)
    resolved = resolve(cfg)
    meta = json.loads((run_dir / "adapter" / "lorakit.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mean_loss = next((r["train_loss"] for r in reversed(records) if "train_loss" in r), None)
    m = meter.result()
    packed = m["fed_tokens"] == m["real_tokens"] and m["examples"] > m["micro_batches"]  # observed, not configured
    result = {
        "side": "lorakit",
        **m,
        "mean_train_loss": mean_loss,
        "adapter": str(run_dir / "adapter"),
        "compute_dtype": resolved.dtype if resolved.mixed_precision == "no" else resolved.mixed_precision,
        "settings": {
            "precision": f"{resolved.dtype} weights"
            + {"bf16": " + bf16 autocast", "fp16": " + fp16 autocast", "no": ""}[resolved.mixed_precision],
            "packing (config)": getattr(cfg.data, "packing", None),
            "batches": "packed, padding-free" if packed else "padded",
            "loss": "labelled positions",
        },
        "lorakit_reported": meta["metrics"],  # lorakit's own TokenCounter, for cross-checking
    }
    emit(result, result_path)
    return result


# --------------------------------------------------------------------------- orchestration


def run_worker(name: str, cmd: list[str], out: Path) -> dict:
    """Run one side in its own process; its output goes to OUT/NAME.log, its result to OUT/NAME.json."""
    log, result = out / f"{name}.log", out / f"{name}.json"
    result.unlink(missing_ok=True)
    print(f"[{name}] running: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd + ["--result", str(result)], stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent)
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"[{name}] failed with exit status {proc.returncode}; last lines of {log}:\n{tail}")
    print(f"[{name}] done in {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads(result.read_text())


def derived(side: dict, rates: dict[str, float]) -> dict:
    """Achieved useful FLOP/s (common.useful_flops), its share of each measured matmul rate, and of
    the rate of the dtype the side computed in (its limit: bf16 under autocast, fp32 without)."""
    from common import useful_flops

    flops = useful_flops(side["params"], side["real_tokens"], side["trained_tokens"])
    per_s = flops / side["train_seconds"]
    return {"useful_flops": flops, "useful_flops_per_s": per_s,
            **{f"fraction_of_{k}_matmul": per_s / v for k, v in rates.items()},
            "fraction_of_own_matmul": per_s / rates[side["compute_dtype"]]}


def recipe_precision() -> str:
    """The guide's bf16 autocast, except on a machine that emulates bf16 (recipe.py's module doc):
    lorakit's own test of native bf16, the one its mixed_precision auto follows."""
    from lorakit.resolve import Machine

    return "bf16" if Machine.detect().bf16 else "fp32"


EMULATED_BF16_SIZE = 512
"""Square size of the bf16 rate where bf16 is emulated: one such product is enough to show it; a
2048² one takes about 17 s there, and best-of-5 with a warm-up over a minute."""


def measure_rates(n: int, precision: str) -> dict[str, float]:
    """fp32 and bf16 matmul rates of n² squares (bf16 smaller where it is emulated)."""
    import torch

    from common import matmul_rate

    bf16 = (matmul_rate(n, torch.bfloat16) if precision == "bf16"
            else matmul_rate(min(n, EMULATED_BF16_SIZE), torch.bfloat16, reps=1))
    return {"fp32": matmul_rate(n, torch.float32), "bf16": bf16}


def fmt_int(x) -> str:
    return f"{x:,.0f}"


def table(recipe: dict, lorakit: dict, evals: dict, rates: dict, data_stats: dict, matmul_size: int,
          native_bf16: bool = True) -> str:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    gf = lambda f: f"{f / 1e9:,.1f} GFLOP/s"  # noqa: E731
    loss = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731

    def ratio(key):
        a, b = lorakit[key], recipe[key]
        return f"{a / b:.2f}×" if a is not None and b else ""

    def row(label, key, fmt, compared=True):
        return label, fmt(recipe[key]), fmt(lorakit[key]), ratio(key) if compared else ""

    one = lambda x: f"{x:.1f}"  # noqa: E731
    rate = lambda x: f"{x:,.1f}"  # noqa: E731
    share = lambda x: f"{x:.1%}"  # noqa: E731
    rows = [
        row("optimizer steps", "steps", str, compared=False),
        row("examples fed", "examples", fmt_int, compared=False),
        row("trained (loss) tokens", "trained_tokens", fmt_int),
        row("real (non-pad) tokens", "real_tokens", fmt_int),
        row("fed positions (incl. padding)", "fed_tokens", fmt_int),
        row("training loop seconds", "train_seconds", one),
        row("trained tokens / s", "trained_tokens_per_s", rate),
        row("real tokens / s", "real_tokens_per_s", rate),
        row("peak RSS (whole process)", "peak_rss_bytes", mib),
        row("peak RSS in training loop", "rss_peak_in_loop_bytes", mib),
        row("RSS at train begin", "rss_at_train_begin_bytes", mib),
        row("final step train loss", "final_step_loss", loss, compared=False),
        row("mean train loss", "mean_train_loss", loss, compared=False),
        (f"held-out loss (base {evals['base']['loss']:.4f})", loss(evals["recipe"]["loss"]),
         loss(evals["lorakit"]["loss"]), ""),
        row("useful FLOP/s (common.py formula)", "useful_flops_per_s", gf),
        row("  share of bf16 matmul rate", "fraction_of_bf16_matmul", share, compared=False),
        row("  share of fp32 matmul rate", "fraction_of_fp32_matmul", share, compared=False),
        row("  share of the rate of its compute dtype", "fraction_of_own_matmul", share, compared=False),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':{width}}{'recipe (TRL+PEFT)':>20}{'lorakit':>20}{'lorakit/recipe':>16}"]
    lines += [f"{a:{width}}{b:>20}{c:>20}{d:>16}" for a, b, c, d in rows]
    lines.append("")
    for name, side in (("recipe", recipe), ("lorakit", lorakit)):
        settings = {**side["settings"], "gradient checkpointing (observed)": side["gradient_checkpointing"]}
        lines.append(f"{name + ':':9}" + "; ".join(f"{k}: {v}" for k, v in settings.items()))
    lines.append(f"matmul rate here ({matmul_size}² @ {matmul_size}², best of 5): fp32 {gf(rates['fp32'])}, "
                 + (f"bf16 {gf(rates['bf16'])}" if native_bf16 else
                    f"bf16 {gf(rates['bf16'])} (emulated on this CPU: one {min(matmul_size, EMULATED_BF16_SIZE)}² product)"))
    lines.append(f"train data: {data_stats}")
    lines.append(f"held-out set: {evals['base']['rows']} rows, {evals['base']['tokens']:,} response+EOS tokens")
    rep = lorakit.get("lorakit_reported", {})
    lines.append("lorakit's own metrics (its TokenCounter): "
                 f"trained {rep.get('trained_tokens_per_s')} tok/s, real {rep.get('real_tokens_per_s')} tok/s, "
                 f"train_seconds {rep.get('train_seconds')}, trained_tokens {rep.get('trained_tokens')}")
    lines.append(f"recipe tokenization equal to lorakit's Template.encode on "
                 f"{recipe['tokenization_matches_lorakit']:.1%} of training rows")
    return "\n".join(lines)


def length_stats(model: str, train_file: Path) -> dict:
    from transformers import AutoTokenizer

    from common import encode_rows, read_jsonl

    lengths = sorted(len(ids) for ids, _ in encode_rows(AutoTokenizer.from_pretrained(model), read_jsonl(train_file)))
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {"rows": len(lengths), "tokens_p50": pick(0.5), "tokens_p90": pick(0.9), "tokens_max": lengths[-1]}


def compare(a: argparse.Namespace) -> dict:
    from common import eval_loss, read_jsonl

    wall = time.perf_counter()
    if a.model is None:
        from lorakit.model.embedded import embedded_model_dir

        a.model = str(embedded_model_dir())
    a.out.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = make_data.write(a.data, a.steps * BATCH * ACCUM, a.eval_rows, a.seed)
    print(f"data: {a.steps * BATCH * ACCUM} train rows (one epoch of {a.steps} steps) and {a.eval_rows} "
          f"held-out rows in {a.data}", flush=True)
    precision = recipe_precision()
    if precision != "bf16":
        print("this CPU has no native bf16 (AVX512-BF16 / AMX): the recipe trains in fp32, as lorakit's "
              "mixed_precision auto does here, instead of the guide's emulated bf16", flush=True)
    rates = measure_rates(a.matmul_size, precision)

    common_args = ["--model", a.model, "--train", str(train_file), "--steps", str(a.steps)]
    recipe = run_worker("recipe", [sys.executable, str(HERE / "recipe.py"), *common_args,
                                   "--out", str(a.out / "recipe"), "--precision", precision], a.out)
    lorakit = run_worker("lorakit", [sys.executable, str(HERE / "compare.py"), "--side", "lorakit", *common_args,
                                     "--out", str(a.out)], a.out)
    for side in (recipe, lorakit):
        side.update(derived(side, rates))

    rows = read_jsonl(eval_file)
    evals = {}
    for name, adapter in (("base", None), ("recipe", recipe["adapter"]), ("lorakit", lorakit["adapter"])):
        t = time.perf_counter()
        evals[name] = eval_loss(a.model, adapter, rows)
        print(f"[eval] {name}: {evals[name]['loss']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)

    print()
    print(table(recipe, lorakit, evals, rates, length_stats(a.model, train_file), a.matmul_size,
                native_bf16=precision == "bf16"))
    keep = ("steps", "train_seconds", "trained_tokens", "real_tokens", "fed_tokens", "trained_tokens_per_s",
            "real_tokens_per_s", "peak_rss_bytes", "rss_peak_in_loop_bytes", "final_step_loss", "mean_train_loss",
            "useful_flops_per_s", "fraction_of_bf16_matmul", "fraction_of_fp32_matmul", "fraction_of_own_matmul",
            "compute_dtype", "step_losses")
    summary = {
        "throughput_ratio": lorakit["trained_tokens_per_s"] / recipe["trained_tokens_per_s"],
        "real_throughput_ratio": lorakit["real_tokens_per_s"] / recipe["real_tokens_per_s"],
        "peak_rss_ratio": lorakit["peak_rss_bytes"] / recipe["peak_rss_bytes"],
        "eval_loss_lorakit": evals["lorakit"]["loss"],
        "eval_loss_recipe": evals["recipe"]["loss"],
        "eval_loss_base": evals["base"]["loss"],
        "eval_tokens": evals["base"]["tokens"],
        "recipe": {k: recipe[k] for k in keep},
        "lorakit": {k: lorakit[k] for k in keep},
        "matmul_flops_per_s": rates,
        "recipe_precision": precision,
        "steps": a.steps,
        "mode": "quick" if a.quick else "full",
        "wall_seconds": time.perf_counter() - wall,
    }
    print(f"wall time: {summary['wall_seconds']:.0f} s")
    print(json.dumps(summary))
    return summary


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps, {QUICK['eval_rows']} held-out rows")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {FULL['steps']}, --quick {QUICK['steps']})")
    p.add_argument("--eval-rows", type=int, help=f"held-out rows (default {FULL['eval_rows']}, "
                                                 f"--quick {QUICK['eval_rows']})")
    p.add_argument("--model", help="base model folder (default: lorakit's embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", type=Path, default=make_data.DEFAULT_OUT, help="folder for the generated data")
    p.add_argument("--out", type=Path, default=HERE / "runs", help="folder for run folders, logs and results")
    p.add_argument("--seed", type=int, default=0, help="data generator seed")
    p.add_argument("--matmul-size", type=int, default=2048, help="square size of the matmul rate measurement")
    p.add_argument("--side", choices=["lorakit"], help=argparse.SUPPRESS)  # worker mode, used by compare itself
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    preset = QUICK if a.quick else FULL
    a.steps = a.steps or preset["steps"]
    a.eval_rows = a.eval_rows or preset["eval_rows"]
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.side == "lorakit":
        run_lorakit(a.model, a.train, a.out, a.steps, a.result)
    else:
        compare(a)


if __name__ == "__main__":
    main()
