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


def test_gemma3_270m_trains_merges_exports_and_serves(tmp_path):
    """The second real model (model.name: gemma-3-270m, Google's Gemma 3 270M base, from the
    package index): a few steps lower its held-out loss; merged, it keeps its logits; its f16 GGUF
    answers as transformers in llama.cpp (same tokens, BOS included; same greedy answers); and
    `lorakit serve` answers the `openai` client the same alone and several at once."""
    import concurrent.futures

    import openai

    from lorakit import infer
    from lorakit.cli import main
    from lorakit.demo.run import DEMO_DIR
    from lorakit.merge import merge
    from lorakit.serve.app import Limits, create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import Registry
    from lorakit.train.run import train
    from test_serve_app import running

    # alpaca, the guide's template: an answer ends with Gemma's <eos>, a stop token (chatml's
    # <|im_end|> is not a token of Gemma's vocabulary: answers would end with it as text)
    cfg = config.from_dict({
        "model": {"name": "gemma-3-270m"},
        "data": {"train": [str(DEMO_DIR / "data" / "train.jsonl")], "limit": 64, "template": "alpaca",
                 "max_length": 160,
                 "val_fraction": 0.125},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "eval_steps": 6, "report_to": []},
        "output": {"dir": str(tmp_path / "runs"), "name": "gemma"},
    })
    run = train(cfg, log=lambda s: None, progress=False)
    m = json.loads((run / "adapter" / "lorakit.json").read_text())["metrics"]
    assert m["eval_loss"] < m["eval_loss_start"] - 0.3, m

    report = merge(run, tmp_path / "merged", log=lambda s: None)
    assert report.passed and report.parity.greedy_identical

    assert main(["export", str(run), "--gguf", "f16", "--max-new-tokens", "8", "--imatrix", "off"]) == 0
    verdict = json.loads((run / "export" / "gemma-f16.gguf.verify.json").read_text())
    assert verdict["passed"] and verdict["tokens_equal"] is True
    assert verdict["greedy_identical"] == len(verdict["prompts"])

    session = infer.load_session([run / "adapter"], log=lambda *_: None)
    name = next(iter(session.adapters))
    engine = Engine(session, log=lambda *_: None)
    app = create_app(engine, Registry(engine), api_key=None, limits=Limits(max_tokens_cap=64, timeout_s=120))
    questions = ["Where is my order 74178?", "Classify: my card was charged twice.", "Hi"]
    with running(app, engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(q):
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}],
                                               max_tokens=16, temperature=0)
            return r.choices[0].message.content

        alone = [ask(q) for q in questions]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(ask, questions))
    assert all(alone) and together == alone
    assert not any("<" in a for a in alone), alone  # the turn's end is a stop token, never text
