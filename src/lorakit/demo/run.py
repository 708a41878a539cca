"""`lorakit demo`: the whole job on the embedded model, offline, in a few CPU minutes.

Fine-tunes SmolLM2-135M-Instruct on the bundled support data, then puts base and tuned
side by side on held-out rows: loss on the validation split and exact match on the test
split, whose answers (a routing category, an order number, a policy fact) can be checked.
"""

from __future__ import annotations

import time
from pathlib import Path

from lorakit import config as config_mod

DEMO_DIR = Path(__file__).resolve().parent
DEMO_CONFIG = DEMO_DIR / "demo.yaml"


def run_demo(output_dir: str = "runs", overrides: list[str] | None = None, *, test_limit: int | None = None) -> int:
    from lorakit.artifacts import RunPaths, read_jsonl
    from lorakit.config import EvalConfig
    from lorakit.evaluate import format_summary, perplexity, wins
    from lorakit.infer import load_session
    from lorakit.pipeline import evaluate, train

    t0 = time.perf_counter()
    cfg = config_mod.load(DEMO_CONFIG, [f"--output.dir={output_dir}", *(overrides or [])])
    run_dir = train(cfg)
    t_train = time.perf_counter() - t0

    session = load_session(run_dir)
    metrics = session.meta.metrics
    print("\nscoring the held-out test split with the base model and the tuned model ...")
    (summary,) = evaluate(run_dir, EvalConfig(split="test", base=True, max_new_tokens=20, limit=test_limit),
                              session=session, log=lambda s: None)

    print("\n=== lorakit demo: SmolLM2-135M-Instruct, base vs LoRA-tuned ===")
    if metrics.get("eval_loss_start") is not None:
        ls, le = metrics["eval_loss_start"], metrics["eval_loss"]
        print(f"{'validation loss':24}{ls:>12.3f}{le:>12.3f}")
        print(f"{'validation perplexity':24}{perplexity(ls):>12.2f}{perplexity(le):>12.2f}")
    print(format_summary(summary))
    paths = RunPaths(run_dir)
    records = read_jsonl(paths.eval_records("test"))
    refs = [r["reference"] for r in records]
    for i in wins([r["answers"]["tuned"] for r in records], [r["answers"]["base"] for r in records], refs, 2):
        prompt = records[i]["prompt"][-1]
        text = prompt["content"] + (f"\n{prompt['input']}" if prompt.get("input") else "")
        print(f"\n--- prompt ---\n{text}\n--- expected: {refs[i]}\n--- base:  {records[i]['answers']['base'][:200]}"
              f"\n--- tuned: {records[i]['answers']['tuned'][:200]}")
    total = time.perf_counter() - t0
    print(f"\ntrained in {t_train:.0f} s ({metrics.get('trained_tokens_per_s')} trained tokens/s); demo total {total:.0f} s")
    print(f"adapter: {paths.adapter}   per-example results: {paths.eval_dir}")
    print(f"try: lorakit generate {run_dir} --instruction \"Explain the return policy.\"")
    return 0
