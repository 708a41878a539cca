"""DPO with lorakit against TRL's DPOTrainer + PEFT at its defaults: same model, pairs, steps.

    python benchmarks/dpo.py                 # 8 steps of 8 pairs, 60 held-out pairs
    python benchmarks/dpo.py --steps 4 --eval-pairs 20 --out DIR

The pairs come from the demo's support data (src/lorakit/demo/data): the prompt is a row's
instruction and input, `chosen` its reference answer, `rejected` the reference answer of the next
row with the same instruction whose answer differs (a plausible wrong answer of the same style:
a wrong order number, a wrong category). Training pairs from train.jsonl, held-out pairs from test.jsonl.

Both sides start from SmolLM2-135M-Instruct (fp32 weights) with a new LoRA adapter (r 16, alpha 32,
dropout 0, the guide's seven projections), sigmoid DPO with beta 0.1, lr 5e-5 constant, batch 4
pairs × accumulation 2, each at its own default precision (TRL's DPOConfig: bf16 autocast;
lorakit's mixed_precision auto: bf16 autocast on a CPU with native bf16, fp32 without), each in
its own process:

- TRL: `DPOTrainer(model, args=DPOConfig(...), train_dataset, peft_config)` with everything else
  at TRL's defaults (padded chosen/rejected batches, the reference by switching the adapter off at
  every step, gradient checkpointing on); prompts are the alpaca template's text, so both sides
  see the same tokens.
- lorakit: `train.method: dpo` on the same rows, every other key at lorakit's defaults (packed
  pairs, reference log-probs computed once before the first step, LM head at answer positions).

Measured the same way on both sides: pairs trained per second of the training loop (the Trainer's
on_train_begin to on_train_end, plus, for lorakit, its reference pass, which runs once before the
Trainer starts and is timed on its own), peak RSS of the process, and afterwards, in this process,
each adapter's held-out preference accuracy: the share of held-out pairs whose implicit reward
margin (log-ratio to the base, chosen minus rejected) is positive, from plain transformers logits.

Prints a table and, last, one JSON line with the ratios (lorakit / TRL).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "src" / "lorakit" / "demo" / "data"
BATCH, ACCUM, LR, BETA = 4, 2, 5e-5, 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_pairs(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = []
    for i, row in enumerate(rows):
        after = [rows[(i + k) % len(rows)] for k in range(1, len(rows))]
        differs = [r for r in after if r["output"].strip() != row["output"].strip()]
        other = next((r for r in differs if r["instruction"] == row["instruction"]), differs[0])["output"]
        pairs.append({"instruction": row["instruction"], "input": row.get("input", ""),
                      "chosen": row["output"], "rejected": other})
    return pairs[:limit]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MODEL: str | None = None  # --model: another base (tests use a tiny one)


def model_dir() -> str:
    from common import embedded_model

    return MODEL or embedded_model()


# --------------------------------------------------------------------------- the two sides


def side_trl(train_file: Path, out: Path, steps: int) -> dict:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from common import peak_rss_bytes
    from lorakit.data.templates import ALPACA, Template

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    template = Template(name="alpaca", source=ALPACA, eos_token=tok.eos_token, bos_token=tok.bos_token or "")
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    data = datasets.Dataset.from_list([{
        "prompt": template.render([{"role": "user", "content": r["instruction"], "input": r["input"]}],
                                  add_generation_prompt=True),
        "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from common import loop_timer

    timer = loop_timer()

    args = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                     max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=BETA,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                     disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer],
                         peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                     task_type="CAUSAL_LM"))
    trainer.train()
    trainer.model.save_pretrained(str(out / "trl" / "adapter"))
    return {"side": "trl", "loop_s": timer.seconds, "pairs": steps * BATCH * ACCUM, "peak_rss": peak_rss_bytes(),
            "adapter": str(out / "trl" / "adapter"),
            "last_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}


def side_lorakit(train_file: Path, out: Path, steps: int) -> dict:
    from common import peak_rss_bytes
    from lorakit import config
    from lorakit.train import preference
    from lorakit.train import run as lk_run

    from common import loop_timer

    timer = loop_timer()
    ref_seconds = {}
    attach = preference.attach_reference

    def timed_attach(*a, **k):
        start = time.perf_counter()
        notes = attach(*a, **k)
        ref_seconds["s"] = time.perf_counter() - start
        return notes

    class Timed(preference.PreferenceTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(timer)

    preference.PreferenceTrainer, preference.attach_reference = Timed, timed_attach
    cfg = config.from_dict({
        "model": {"name": model_dir()},
        "data": {"train": [str(train_file)], "val_fraction": 0.0, "template": "alpaca"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "train": {"method": "dpo", "max_steps": steps, "batch_size": BATCH, "grad_accum": ACCUM, "lr": LR,
                  "scheduler": "constant", "warmup": 0, "seed": 0, "logging_steps": 1, "save_steps": 0,
                  "report_to": []},
        "dpo": {"beta": BETA},
        "output": {"dir": str(out), "name": "lorakit", "overwrite": True},
    })
    run = lk_run.train(cfg, progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"side": "lorakit", "loop_s": timer.seconds + ref_seconds.get("s", 0.0), "reference_s": ref_seconds.get("s"),
            "pairs": steps * BATCH * ACCUM, "peak_rss": peak_rss_bytes(), "adapter": str(run / "adapter"),
            "last_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None)}


# --------------------------------------------------------------------------- held-out accuracy


def preference_accuracy(adapter: str, pairs: list[dict]) -> dict:
    """Share of pairs whose implicit reward margin is positive (policy vs base, plain logits)."""
    import peft
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data.templates import ALPACA, Template

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    template = Template(name="alpaca", source=ALPACA, eos_token=tok.eos_token, bos_token=tok.bos_token or "")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter)
    model.eval()

    def logp(prompt_ids: list[int], answer_ids: list[int]) -> float:
        ids = torch.tensor([prompt_ids + answer_ids])
        lp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = torch.tensor(answer_ids)
        return float(lp[len(prompt_ids) - 1:].gather(1, targets[:, None]).sum())

    right, margins = 0, []
    with torch.no_grad():
        for p in pairs:
            prompt = template.encode_prompt(tok, [{"role": "user", "content": p["instruction"], "input": p["input"]}])
            c = tok(p["chosen"] + tok.eos_token, add_special_tokens=False).input_ids
            r = tok(p["rejected"] + tok.eos_token, add_special_tokens=False).input_ids
            policy = logp(prompt, c) - logp(prompt, r)
            with model.disable_adapter():
                base = logp(prompt, c) - logp(prompt, r)
            margins.append(policy - base)
            right += policy - base > 0
    return {"accuracy": right / len(pairs), "mean_margin": sum(margins) / len(margins)}


# --------------------------------------------------------------------------- orchestration


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-pairs", type=int, default=60)
    p.add_argument("--out", default=str(HERE / "runs" / "dpo"))
    p.add_argument("--side", choices=["trl", "lorakit"])
    p.add_argument("--train-file")
    p.add_argument("--result")
    p.add_argument("--model", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    a = p.parse_args(argv)
    global MODEL
    MODEL = a.model
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    if a.side:
        fn = side_trl if a.side == "trl" else side_lorakit
        Path(a.result).write_text(json.dumps(fn(Path(a.train_file), out, a.steps)))
        return
    train_file = write_jsonl(out / "pairs.jsonl", make_pairs(DATA / "train.jsonl", a.steps * BATCH * ACCUM))
    held_out = make_pairs(DATA / "test.jsonl", a.eval_pairs)
    from common import run_side

    sides = {name: run_side(__file__, name, out, ["--train-file", str(train_file), "--steps", str(a.steps)], MODEL)
             for name in ("trl", "lorakit")}
    for s in sides.values():
        s.update(preference_accuracy(s["adapter"], held_out))
        s["pairs_per_s"] = s["pairs"] / s["loop_s"]
    t, k = sides["trl"], sides["lorakit"]
    print("| side | loop s | pairs/s | peak RSS MiB | last loss | held-out pref. accuracy | mean margin |")
    print("|---|---|---|---|---|---|---|")
    for s in (t, k):
        print(f"| {s['side']} | {s['loop_s']:.1f} | {s['pairs_per_s']:.2f} | {s['peak_rss'] / 2**20:,.0f} | "
              f"{s['last_loss']:.4f} | {s['accuracy']:.3f} | {s['mean_margin']:.3f} |")
    summary = {"pairs_per_s_ratio": round(k["pairs_per_s"] / t["pairs_per_s"], 3),
               "peak_rss_ratio": round(k["peak_rss"] / t["peak_rss"], 3),
               "accuracy": {"trl": t["accuracy"], "lorakit": k["accuracy"]},
               "reference_s": k.get("reference_s"), "sides": sides}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
