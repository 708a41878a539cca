"""GRPO with lorakit against TRL's GRPOTrainer + PEFT (its own HF-generate rollouts): the same work.

    python benchmarks/grpo.py                     # 6 steps, 4 prompts x 4 answers, 32 new tokens
    python benchmarks/grpo.py --steps 3 --out DIR

Same prompts (the demo's support rows, the alpaca template's prompt text), same group size,
completion budget, temperature 1.0, steps, learning rate 1e-5 constant, LoRA (r 16, alpha 32,
dropout 0, the guide's seven projections), no KL term (beta 0: TRL's default), DAPO's token-level
loss (both defaults), the same reward — lorakit's built-in `exact_match` against the row's answer
plus 0.2 × `format` (the answer ended by itself), called through lorakit's `Rewards` on both sides
so the numbers mean the same — each side in its own process at its default precision (TRL: bf16
autocast; lorakit: bf16 autocast where the CPU has native bf16).

Measured alike: the training loop's seconds (Trainer on_train_begin to on_train_end), optimizer
steps per minute, answer tokens generated per second of the loop (both sides' answers counted
from what they logged: mean completion length × answers), peak RSS of the process, and the mean
reward of every step (the reward curve). Prints a table and, last, one JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "src" / "lorakit" / "demo" / "data" / "train.jsonl"
PROMPTS, GROUP, NEW_TOKENS, LR = 4, 4, 32, 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REWARDS = [{"name": "exact_match"}, {"name": "format", "weight": 0.2}]
MODEL: str | None = None


def model_dir() -> str:
    from common import embedded_model

    return MODEL or embedded_model()


def rows(n: int) -> list[dict]:
    # classification and extraction rows: short checkable answers, as a GRPO task would have
    out = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in out if len(r["output"]) < 20][:n]


def side_trl(data: Path, out: Path, steps: int) -> dict:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from common import peak_rss_bytes
    from lorakit.config.grpo import RewardConfig
    from lorakit.data.templates import ALPACA, Template
    from lorakit.rewards import load_rewards

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    template = Template(name="alpaca", source=ALPACA, eos_token=tok.eos_token, bos_token=tok.bos_token or "")
    source = [json.loads(line) for line in data.read_text().splitlines()]
    ds = datasets.Dataset.from_list([{
        "prompt": template.render([{"role": "user", "content": r["instruction"], "input": r["input"]}],
                                  add_generation_prompt=True), "reference": r["output"]} for r in source])
    scorer = load_rewards([RewardConfig(**r) for r in REWARDS])

    def reward(prompts, completions, reference, completion_ids=None, **kwargs):
        # TRL gives a batch; "finished" = the answer ended with EOS before the budget
        finished = [ids is not None and len(ids) < NEW_TOKENS for ids in (completion_ids or [None] * len(prompts))]
        total, _ = scorer.score(prompts, [c.strip() for c in completions],
                                [{"reference": r, "finished": f} for r, f in zip(reference, finished)])
        return total

    from common import loop_timer

    timer = loop_timer()
    args = GRPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                      max_completion_length=NEW_TOKENS, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                      warmup_steps=0, temperature=1.0, logging_steps=1, save_strategy="no", report_to="none",
                      use_cpu=True, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), reward_funcs=reward,
                          args=args, train_dataset=ds, processing_class=tok, callbacks=[timer],
                          peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                      task_type="CAUSAL_LM"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length", 0.0) for h in logs]
    return {"side": "trl", "loop_s": timer.seconds, "steps": steps, "peak_rss": peak_rss_bytes(),
            "rewards": [h["reward"] for h in logs], "answer_tokens": sum(lengths) * PROMPTS * GROUP}


def side_lorakit(data: Path, out: Path, steps: int) -> dict:
    from common import peak_rss_bytes
    from lorakit import config
    from lorakit.train import grpo
    from lorakit.train import run as lk_run

    from common import loop_timer

    timer = loop_timer()

    class Timed(grpo.GrpoTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(timer)

    grpo.GrpoTrainer = Timed
    cfg = config.from_dict({
        "model": {"name": model_dir()},
        "data": {"train": [str(data)], "val_fraction": 0.0, "template": "alpaca"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "train": {"method": "grpo", "max_steps": steps, "lr": LR, "scheduler": "constant", "warmup": 0, "seed": 0,
                  "logging_steps": 1, "save_steps": 0, "report_to": []},
        "grpo": {"prompts_per_step": PROMPTS, "generations": GROUP, "max_completion_tokens": NEW_TOKENS,
                 "temperature": 1.0, "rewards": REWARDS},
        "output": {"dir": str(out), "name": "lorakit", "overwrite": True},
    })
    run = lk_run.train(cfg, progress=False, log=lambda *_: None)
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in logs if "reward" in r]
    return {"side": "lorakit", "loop_s": timer.seconds, "steps": steps, "peak_rss": peak_rss_bytes(),
            "rewards": [r["reward"] for r in logs], "rollout_s": sum(r["rollout_s"] for r in logs),
            "update_s": sum(r["update_s"] for r in logs),
            "answer_tokens": sum(r["completion_length"] for r in logs) * PROMPTS * GROUP}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=str(HERE / "runs" / "grpo"))
    p.add_argument("--side", choices=["trl", "lorakit"])
    p.add_argument("--data")
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
        Path(a.result).write_text(json.dumps(fn(Path(a.data), out, a.steps)))
        return None
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(a.steps * PROMPTS)), encoding="utf-8")
    from common import run_side

    sides = {name: run_side(__file__, name, out, ["--data", str(data), "--steps", str(a.steps)], MODEL)
             for name in ("trl", "lorakit")}
    for s in sides.values():
        s["steps_per_min"] = 60 * s["steps"] / s["loop_s"]
        s["answer_tokens_per_s"] = s["answer_tokens"] / s["loop_s"]
    t, k = sides["trl"], sides["lorakit"]
    print("| side | loop s | steps/min | answer tokens/s | peak RSS MiB | reward per step |")
    print("|---|---|---|---|---|---|")
    for s in (t, k):
        curve = " ".join(f"{x:.2f}" for x in s["rewards"])
        print(f"| {s['side']} | {s['loop_s']:.1f} | {s['steps_per_min']:.2f} | {s['answer_tokens_per_s']:.1f} | "
              f"{s['peak_rss'] / 2**20:,.0f} | {curve} |")
    summary = {"steps_per_min_ratio": round(k["steps_per_min"] / t["steps_per_min"], 3),
               "answer_tokens_per_s_ratio": round(k["answer_tokens_per_s"] / max(t["answer_tokens_per_s"], 1e-9), 3),
               "peak_rss_ratio": round(k["peak_rss"] / t["peak_rss"], 3), "sides": sides}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
