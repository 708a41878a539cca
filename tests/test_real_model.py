"""Slow: the real embedded SmolLM2-135M-Instruct fine-tunes and its loss falls (run with -m slow)."""

import json

import pytest

from lorakit import config
from lorakit.demo.run import DEMO_CONFIG

pytestmark = pytest.mark.slow


def test_smollm2_few_steps_loss_falls(tmp_path):
    from lorakit.infer import Sampling, generate, load_session, messages_from_instruction
    from lorakit.train.run import train

    cfg = config.load(DEMO_CONFIG, [
        f"--output.dir={tmp_path}", "--data.limit=64", "--train.max_steps=8", "--train.lr=1e-3",
        "--train.logging_steps=1",
    ])
    run = train(cfg, log=lambda s: None, progress=False)
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    m = meta["metrics"]
    assert meta["template"]["name"] == "model" and "<|im_start|>" in meta["template"]["source"]
    assert m["eval_loss"] < m["eval_loss_start"] - 0.3, m
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0]

    session = load_session(run)
    out = generate(session, messages_from_instruction(
        "Classify this customer message into one of: shipping, returns, billing, account, product. "
        "Answer with the category only.", "My package has not arrived after 10 days."),
        Sampling(max_new_tokens=12, greedy=True))
    assert out.text and out.finish_reason == "stop", f"the tuned model answers and stops within 12 tokens: {out}"
    assert out.completion_tokens < 12
