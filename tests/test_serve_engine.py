"""The serving engine: continuous batching across adapters whose greedy (and seeded) output does
not depend on which other requests share the batch, plus stop strings, cancellation, timeouts,
queue limits and shutdown. Driven directly (no HTTP) on the tiny random model; the server tests
drive the same engine through the OpenAI client."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from conftest import make_adapter

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.infer import BASE, Sampling, generate, load_session
from lorakit.infer.decoder import RowSizes, gemm_row_sizes
from lorakit.serve.engine import Engine, GenRequest, QueueFull

CONTENTS = ["hi", "Where is my order?", "Explain the return policy in detail, please, step by step.",
            "x " * 30, "What is 2 + 2?", "Tell me a story about a lighthouse keeper."]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """Three adapters (two templates) on one base, and an engine over them."""
    root = tmp_path_factory.mktemp("served")
    ads = [make_adapter(tiny_model_dir, tiny_tokenizer, root / f"a{i}", seed=10 + i,
                        template="chatml" if i == 1 else "alpaca") for i in range(3)]
    session = load_session(ads, log=lambda s: None)
    engine = Engine(session, max_batch=32)
    engine.start()
    yield engine
    engine.shutdown(drain_s=5)


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": CONTENTS[i % len(CONTENTS)] + f" #{i}"}]


def _request(engine: Engine, i: int, **kw) -> GenRequest:
    s = engine.session
    names = list(s.adapters) + [BASE]
    name = kw.pop("adapter", names[i % len(names)])
    template = s.adapter(None if name == BASE else name).template
    args = dict(max_tokens=4 + (i * 7) % 21, temperature=0.0,
                stop_ids=tuple(template.stop_token_ids(s.tokenizer)))
    args.update(kw)
    return GenRequest(adapter=name, prompt_ids=template.encode_prompt(s.tokenizer, _messages(i)), **args)


async def _collect(engine: Engine, req: GenRequest, delay: float = 0.0):
    if delay:
        await asyncio.sleep(delay)
    h = engine.submit(req, asyncio.get_running_loop())
    deltas = []
    async for ev in h:
        if ev.text:
            deltas.append(ev.text)
        if ev.finish_reason:
            return "".join(deltas), ev.finish_reason, ev.completion_tokens, deltas


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_row_sizes_pad_to_a_measured_invariant_count():
    ok = gemm_row_sizes(64, 32, upto=24)
    rows = RowSizes([(64, 32)], upto=24)
    for n in range(1, 25):
        m = rows.pad(n)
        assert m >= n and (not rows.exact or ok[m])
    assert rows.pad(100) == 100  # beyond the measured range nothing is padded


def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch_with_joiners(served):
    """40 requests over three adapters and the base, first one at a time, then all at once with
    staggered arrivals (so rows join and leave a running batch). Token for token identical."""
    n = 40
    alone = [_run(_collect(served, _request(served, i))) for i in range(n)]

    async def together():
        rng = random.Random(0)
        return await asyncio.gather(*[_collect(served, _request(served, i), delay=rng.random() * 0.3)
                                      for i in range(n)])

    mixed = _run(together())
    diff = [(i, alone[i][:3], mixed[i][:3]) for i in range(n) if alone[i][:3] != mixed[i][:3]]
    assert not diff
    assert served.steps > 0 and served.running == 0


def test_engine_answers_equal_infer_generate(served):
    """The engine's prefill/decode path gives what `infer.generate` (transformers' generate) gives."""
    s = served.session
    for i in range(8):
        req = _request(served, i)
        text, reason, count, _ = _run(_collect(served, req))
        name = req.adapter
        c = generate(s, _messages(i), Sampling(max_new_tokens=req.max_tokens, greedy=True),
                     adapter=None if name == BASE else name, use_adapter=name != BASE)
        assert (text.strip(), reason, count) == (c.text, c.finish_reason, c.completion_tokens)


def test_seeded_sampling_does_not_depend_on_the_batch(served):
    reqs = [_request(served, i, temperature=0.9, top_p=0.8, seed=1000 + i, max_tokens=12) for i in range(12)]
    alone = [_run(_collect(served, r))[0] for r in reqs]

    async def together():
        return await asyncio.gather(*[_collect(served, r) for r in reqs])

    assert alone == [m[0] for m in _run(together())]
    # and the seed matters
    other = _run(_collect(served, _request(served, 0, temperature=0.9, top_p=0.8, seed=7, max_tokens=12)))[0]
    unseeded = {_run(_collect(served, _request(served, 0, temperature=0.9, max_tokens=12)))[0] for _ in range(3)}
    assert other != alone[0] or len(unseeded) > 1


def test_stop_strings_cut_the_text_and_are_never_streamed(served):
    # Take a greedy answer, then ask again with a piece of it as a stop string.
    full, reason, _, _ = _run(_collect(served, _request(served, 2, max_tokens=24)))
    stop = full[5:8]
    assert len(full) > 8 and stop
    text, reason, _, deltas = _run(_collect(served, _request(served, 2, max_tokens=24, stop=(stop,))))
    assert reason == "stop" and text == full[:full.index(stop)]
    assert "".join(deltas) == text


def test_cancel_frees_the_slot_and_timeout_ends_with_the_text_so_far(served):
    async def cancel_one():
        loop = asyncio.get_running_loop()
        h = served.submit(_request(served, 3, max_tokens=10_000, stop_ids=()), loop)
        async for ev in h:
            if ev.text:
                h.cancel()
            if ev.finish_reason:
                return ev.finish_reason

    assert _run(cancel_one()) == "cancelled"
    assert served.running == 0
    _, reason, count, _ = _run(_collect(served, _request(served, 3, max_tokens=10_000, stop_ids=(), timeout_s=0.3)))
    assert reason == "timeout" and count > 0


def test_a_full_queue_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    session = load_session([make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "q", seed=3)], log=lambda s: None)
    engine = Engine(session, max_queue=2)  # not started: nothing leaves the queue

    async def burst():
        loop = asyncio.get_running_loop()
        engine.submit(_request(engine, 0), loop)
        engine.submit(_request(engine, 1), loop)
        with pytest.raises(QueueFull):
            engine.submit(_request(engine, 2), loop)

    _run(burst())


def test_shutdown_cancels_what_does_not_finish(tiny_model_dir, tiny_tokenizer, tmp_path):
    session = load_session([make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "s", seed=4)], log=lambda s: None)
    engine = Engine(session)
    engine.start()

    async def go():
        loop = asyncio.get_running_loop()
        h = engine.submit(_request(engine, 0, adapter="s", max_tokens=100_000, stop_ids=()), loop)
        await asyncio.sleep(0.2)
        await loop.run_in_executor(None, lambda: engine.shutdown(drain_s=0.2))
        reasons = [ev.finish_reason async for ev in h if ev.finish_reason]
        return reasons

    assert _run(go()) == ["cancelled"]
    with pytest.raises(Exception, match="shutting down"):
        engine.submit(_request(engine, 0, adapter="s"), asyncio.new_event_loop())


def test_dora_adapters_are_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    ad = make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "d", seed=5,
                      lora=LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True))
    with pytest.raises(LorakitError, match="DoRA"):
        Engine(load_session([ad], log=lambda s: None))


def test_a_failing_step_fails_its_rows_and_the_engine_keeps_serving(served, monkeypatch):
    real = served.decoder.forward
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(served.decoder, "forward", flaky)
    first = _run(_collect(served, _request(served, 0)))
    assert first[1] == "error"
    assert _run(_collect(served, _request(served, 0)))[1] in ("stop", "length")


def test_a_rows_logits_are_bit_identical_whatever_shares_its_step(served):
    """The property the greedy tests rest on, at the level where it can break: a row's next-token
    logits from one decode step, alone and inside batches of other rows and adapters, are equal
    bit for bit (torch.equal, no tolerance). Without the row-count padding they differ in the last
    bits on this CPU's BLAS, which greedy text on a tiny model rarely shows."""
    import copy

    from lorakit.infer.decoder import Row

    engine = Engine(served.session)  # not started: this test drives the steps itself
    decoder = engine.decoder
    rows = []
    for i in range(13):
        r = Row(_request(engine, i).decoder_request(), decoder.layers, engine.session.tokenizer)
        ids = torch.tensor([r.req.prompt_ids])
        with torch.inference_mode():
            lg = decoder.forward(ids, torch.arange(ids.shape[1]).unsqueeze(0), [r.slot], [r.req.adapter])
        r.last = int(lg[0].argmax())
        r.ids.append(r.last)
        rows.append(r)

    def clone(r):
        c = copy.copy(r)
        c.slot = r.slot.copy()
        return c

    with torch.inference_mode():
        alone = [decoder.step_logits([clone(r)])[0] for r in rows]
        for k in (2, 5, 13):
            batch = decoder.step_logits([clone(r) for r in rows[:k]])
            for i in range(k):
                assert torch.equal(batch[i], alone[i]), (k, i, (batch[i] - alone[i]).abs().max())


def test_a_mixed_step_runs_one_product_pair_per_layer_not_pefts_groups(served, monkeypatch):
    """Plain LoRA adapters are stacked: a step over three adapters and the base never enters PEFT's
    per-adapter gather path, and its logits equal PEFT's own mixed-batch forward (its `adapter_names`),
    up to the rounding of summing in a different order."""
    from peft.tuners.lora.layer import Linear

    assert not served.decoder.grouped
    s = served.session
    names = list(s.adapters) + [BASE]
    ids = torch.tensor([[5, 9, 14, 3]] * len(names))
    with torch.inference_mode():  # PEFT's path, outside a step (one row at a time there)
        ref = torch.cat([s.model(input_ids=ids[:1], adapter_names=[n]).logits[:, -1] for n in names])

    def refuse(*a, **k):
        raise AssertionError("PEFT's per-adapter path ran inside an engine step")

    monkeypatch.setattr(Linear, "_mixed_batch_forward", refuse)
    done = {}
    fut = served.call_between_steps(lambda: done.setdefault("ok", True))  # the engine thread is between steps
    fut.result(timeout=30)
    from lorakit.infer.decoder import Row

    rows = [Row(GenRequest(adapter=n, prompt_ids=[5, 9, 14, 3], max_tokens=2).decoder_request(),
                served.decoder.layers, s.tokenizer) for n in names]
    pos = torch.arange(4).unsqueeze(0).expand(len(names), 4)
    with torch.inference_mode():
        got = served.decoder.forward(ids, pos, [r.slot for r in rows], names)
    # The products sum the same terms (plus exact zeros) in another order: measured 4-5 fp32 ulps of
    # the logits' scale here; 64 ulps leaves room for other BLAS blockings, far below a real error
    # (a wrong adapter's row, or a missing scale, moves logits by ~1e-1).
    atol = 64 * torch.finfo(torch.float32).eps * float(ref.abs().max())
    assert torch.allclose(got, ref, rtol=0, atol=atol), float((got - ref).abs().max())
    # and the adapters really differ from each other and from the base in that step
    assert all(not torch.equal(got[i], got[j]) for i in range(len(names)) for j in range(i))


def test_layers_that_cannot_be_stacked_keep_pefts_path_and_stay_identical(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A LoRA on the embedding cannot join the stacked products: those layers keep PEFT's per-adapter
    path, every adapter's group of rows is padded too, and greedy output is still the same alone and
    batched."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "embed_tokens"])
    ads = [make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / f"e{i}", seed=30 + i, lora=lora) for i in range(2)]
    engine = Engine(load_session(ads, log=lambda s: None))
    assert engine.decoder.grouped
    engine.start()
    try:
        reqs = [_request(engine, i) for i in range(9)]
        alone = [_run(_collect(engine, r))[:3] for r in reqs]

        async def together():
            return await asyncio.gather(*[_collect(engine, r) for r in reqs])

        assert [x[:3] for x in _run(together())] == alone
    finally:
        engine.shutdown(drain_s=5)
