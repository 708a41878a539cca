"""`lorakit demo`: the whole job on the embedded model, offline, in a few CPU minutes.

Fine-tunes SmolLM2-135M-Instruct on the bundled support data, then puts base and tuned
side by side on held-out rows: loss on the validation split and exact match on the test
split, whose answers (a routing category, an order number, a policy fact) can be checked.
"""

from __future__ import annotations

import time
from pathlib import Path

from lorakit import config as config_mod
from lorakit.data.formats import detect_format, to_example
from lorakit.data.sources import read_rows

DEMO_DIR = Path(__file__).resolve().parent
DEMO_CONFIG = DEMO_DIR / "demo.yaml"


def load_test_examples() -> list[dict]:
    examples = []
    for row, where in read_rows(str(DEMO_DIR / "data" / "test.jsonl")):
        row = {k: v for k, v in row.items() if k != "check"}
        examples.append(to_example(row, detect_format(row, where), where))
    return examples


def run_demo(output_dir: str = "runs", overrides: list[str] | None = None, *, test_limit: int | None = None) -> int:
    from lorakit.evaluate import compare, perplexity
    from lorakit.infer import load_session
    from lorakit.train.run import train

    t0 = time.perf_counter()
    cfg = config_mod.load(DEMO_CONFIG, [f"--output.dir={output_dir}", *(overrides or [])])
    run_dir = train(cfg)
    t_train = time.perf_counter() - t0

    session = load_session(run_dir)
    metrics = session.meta.metrics
    examples = load_test_examples()[:test_limit]
    print(f"\nanswering {len(examples)} held-out test prompts with the base model and the tuned model ...")
    c = compare(session, examples, max_new_tokens=20)
    b, t = c.base_scores, c.tuned_scores

    print("\n=== lorakit demo: SmolLM2-135M-Instruct, base vs LoRA-tuned ===")
    print(f"{'':28}{'base':>10}{'tuned':>10}")
    if metrics.get("eval_loss_start") is not None:
        ls, le = metrics["eval_loss_start"], metrics["eval_loss"]
        print(f"{'validation loss':28}{ls:>10.3f}{le:>10.3f}")
        print(f"{'validation perplexity':28}{perplexity(ls):>10.2f}{perplexity(le):>10.2f}")
    print(f"{'test exact match':28}{b['exact_match']:>10.1%}{t['exact_match']:>10.1%}")
    print(f"{'test ROUGE-L':28}{b['rouge_l']:>10.3f}{t['rouge_l']:>10.3f}")
    for i in c.wins(2):
        prompt = c.prompts[i][-1]
        text = prompt["content"] + (f"\n{prompt['input']}" if prompt.get("input") else "")
        print(f"\n--- prompt ---\n{text}\n--- expected: {c.references[i]}\n--- base:  {c.base[i][:200]}"
              f"\n--- tuned: {c.tuned[i][:200]}")
    total = time.perf_counter() - t0
    print(f"\ntrained in {t_train:.0f} s ({metrics.get('trained_tokens_per_s')} trained tokens/s); demo total {total:.0f} s")
    print(f"adapter: {run_dir / 'adapter'}\ntry: lorakit generate {run_dir} --instruction \"Explain the return policy.\"")
    return 0
