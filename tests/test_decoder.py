"""The one decoder (infer/decoder.py) and the runtime LoRA it installs (model/lora_runtime.py):
installing is undone bit for bit, a served model trains again, per-row sampling keeps to its
settings and its own random stream, and `generate` and `lorakit serve`'s engine give the same
greedy text for the same request."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch
from conftest import make_adapter

from lorakit.infer import BASE, Decoder, Request, Sampler, Sampling, generate, load_session, messages_from_instruction


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    ads = [make_adapter(tiny_model_dir, tiny_tokenizer, root / f"d{i}", seed=40 + i) for i in range(2)]
    return load_session(ads, log=lambda s: None)


def _forwards(model) -> dict[str, object]:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_installing_is_undone_bit_for_bit(pair):
    model = pair.model
    ids = torch.tensor([[5, 9, 14, 3, 7], [2, 8, 8, 4, 1]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    own, attention = _forwards(model), model.get_base_model().config._attn_implementation
    with Decoder(model, pair.tokenizer, adapters=list(pair.adapters)) as d:
        assert d.lora is not None and _forwards(model) != own  # the stacks are in place
        d.run([Request([5, 9, 14], 4, adapter=name) for name in (*pair.adapters, BASE)])
    assert _forwards(model) == own and model.get_base_model().config._attn_implementation == attention
    with torch.no_grad():
        after = model(input_ids=ids).logits  # a padded-free batch of two: the stock attention again
    assert torch.equal(before, after)


def test_a_model_the_decoder_served_trains_again(tiny_model_dir):
    """The training fast path's fused forwards survive a decoder on the same model: installed
    over them, and given back, they run the fused node again in the next training step."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.model import lora_runtime
    from lorakit.train import speed

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert speed.fuse_lora_linears(model) > 0
    fused = _forwards(model)
    model.eval()
    with Decoder(model, adapters=["default"]) as d:
        d.run([Request([5, 9, 14], 3, adapter="default")])
    assert _forwards(model) == fused
    model.train()
    calls = {"n": 0}
    real = lora_runtime._LoraLinear.apply

    def counting(*a):
        calls["n"] += 1
        return real(*a)

    lora_runtime._LoraLinear.apply = counting
    try:
        loss = model(input_ids=torch.tensor([[5, 9, 14, 3]]), labels=torch.tensor([[5, 9, 14, 3]])).loss
        loss.backward()
    finally:
        lora_runtime._LoraLinear.apply = real
    assert calls["n"] > 0 and all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_generate_and_the_server_give_the_same_greedy_text(pair):
    """The same request through `generate` and through `lorakit serve`'s engine (three at once, so
    the engine batches them): the same tokens and text."""
    from lorakit.serve.engine import Engine, GenRequest

    msgs = [messages_from_instruction(q) for q in ("Say hello.", "Where is my order?", "Return policy?")]
    greedy = Sampling(max_new_tokens=10, greedy=True)
    names = list(pair.adapters)
    want = [generate(pair, m, greedy, adapter=names[i % 2]) for i, m in enumerate(msgs)]
    engine = Engine(pair)
    engine.start()
    try:
        template = pair.adapter(names[0]).template

        async def one(i, m):
            req = GenRequest(adapter=names[i % 2], prompt_ids=template.encode_prompt(pair.tokenizer, m),
                             max_tokens=10, temperature=0.0,
                             stop_ids=tuple(template.stop_token_ids(pair.tokenizer)))
            h = engine.submit(req, asyncio.get_running_loop())
            return "".join([ev.text async for ev in h])

        async def all_at_once():
            return await asyncio.gather(*[one(i, m) for i, m in enumerate(msgs)])

        got = asyncio.run(all_at_once())
    finally:
        engine.shutdown(drain_s=5)
    assert [g.strip() for g in got] == [w.text for w in want]


def test_sampling_keeps_its_settings_and_its_own_stream():
    logits = torch.tensor([0.0, 3.0, 2.5, -1.0, 1.0, 2.9])
    before = torch.get_rng_state()
    draws = [Sampler(Sampling(temperature=5.0, top_k=2, top_p=1.0), seed=s)(logits, []) for s in range(64)]
    assert set(draws) == {1, 5}  # top-2 only, and both of them
    same = [Sampler(Sampling(temperature=1.0, top_p=0.95), seed=7)(logits, []) for _ in range(5)]
    assert len(set(same)) == 1  # a seed is a stream of its own
    assert torch.equal(torch.get_rng_state(), before)  # torch's global stream untouched
    # repetition penalty as transformers applies it: divide a positive logit, multiply a negative one
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    seen = [1, 3]
    greedy = Sampling(greedy=True, repetition_penalty=4.0)
    want = RepetitionPenaltyLogitsProcessor(4.0)(torch.tensor([seen]), logits.clone().unsqueeze(0))[0]
    assert Sampler(greedy)(logits, seen) == int(want.argmax()) == 5


def test_no_thread_local_state_in_src():
    src = Path(__file__).resolve().parents[1] / "src" / "lorakit"
    found = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"threading\.local\(", line)]
    assert not found, found


def test_packed_prefill_answers_as_each_prompt_alone(pair):
    """Prompts of two adapters and the base prefilled end to end in one forward (each at its own
    positions, attending only to itself, with its own adapter per position) answer greedily
    exactly as each does prefilled alone, and the first tokens' logits agree bit for bit where this
    CPU's products are row-invariant (the decoder's own premise, RowSizes)."""
    tok = pair.tokenizer
    template = pair.adapter(None).template
    names = [*pair.adapters, BASE]
    prompts = [template.encode_prompt(tok, messages_from_instruction(q)) for q in
               ("Say hello.", "Where is my order #123?", "What is the return policy for shoes bought online?",
                "Hi", "Tell me about shipping to Canada and how long it takes.")]
    reqs = [Request(p, 6, adapter=names[i % 3]) for i, p in enumerate(prompts)]
    with Decoder(pair.model, tok, adapters=list(pair.adapters)) as d, torch.inference_mode():
        together = [r.ids for r in d.run(reqs)]
        alone = [d.run([r])[0].ids for r in reqs]
        packed = d.start_many(reqs)
        single = [d.start(r) for r in reqs]
        assert d.rows.exact
        first_packed = [d.forward(torch.tensor([[r.last]]), torch.tensor([[r.slot.length]]), [r.slot],
                                  [r.req.adapter])[0] for r, _ in packed]
        first_single = [d.forward(torch.tensor([[r.last]]), torch.tensor([[r.slot.length]]), [r.slot],
                                  [r.req.adapter])[0] for r, _ in single]
    assert together == alone and len({tuple(a) for a in alone}) > 1
    assert [r.last for r, _ in packed] == [r.last for r, _ in single]
    assert all(torch.equal(a, b) for a, b in zip(first_packed, first_single))


def test_draws_follow_the_distribution_and_the_nucleus_is_transformers_set():
    from transformers.generation.logits_process import TopPLogitsWarper

    from lorakit.infer import sampling

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, generator=g) * 2, dim=0)
    n = 20_000
    counts = torch.bincount(torch.tensor([sampling.draw(probs, g) for _ in range(n)]), minlength=50).double()
    # each count is binomial(n, p): 5 standard deviations, at most one false alarm in ~1.7 million per token
    assert ((counts - n * probs).abs() <= 5 * (n * probs * (1 - probs)).sqrt() + 1).all()
    assert sampling.draw(torch.tensor([0.0, 0.0, 1.0, 0.0]), g) == 2  # a zero never comes out
    for top_p in (0.3, 0.9, 0.999):
        for logits in (torch.randn(600, generator=g) * 4, torch.zeros(600)):  # peaked, and flat (past 256 candidates)
            want = TopPLogitsWarper(top_p)(None, logits[None].clone())[0] > float("-inf")
            got = sampling.nucleus(torch.softmax(logits, 0), top_p) > 0
            if logits.eq(0).all():  # all tied: transformers' sort keeps some top_p share of them, any will do
                assert got.sum() == want.sum()
            else:
                assert torch.equal(got, want), top_p


def test_a_head_cast_once_gives_the_logits_autocast_gives(pair):
    """Rollouts hand the decoder the LM head already in bf16 (`head_weight`): under bf16 autocast
    the logits are the ones the model's own forward makes by casting the head at every step (the
    same bf16 operands, the same product), and the keys and values attend in fp32 on the CPU."""
    from lorakit.infer import kv

    model = pair.model
    head = model.get_output_embeddings().weight.detach().to(torch.bfloat16)
    prompts = [[5, 9, 14, 3], [2, 8], [7, 7, 7, 1, 4, 11]]
    got = {}
    for name, weight in (("model", None), ("split", head)):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), \
                Decoder(model, pair.tokenizer, stacked=False, head_weight=weight) as d:
            assert (d.body is not None) == (weight is not None)
            rows = [r for r, _ in d.start_many([Request(p, 3) for p in prompts])]
            assert rows[0].slot.k[0].dtype == kv.attention_dtype(torch.zeros((), dtype=torch.bfloat16))
            first = d.step_logits(rows)
            d.step(rows)
            got[name] = [first, d.step_logits(rows)]
    assert all(torch.equal(a, b) for a, b in zip(got["model"], got["split"]))


def test_a_prompt_asked_several_times_is_prefilled_once_and_samples_as_if_alone(pair):
    """GRPO's group: the same prompt with different seeds. One prefill serves them all (the others
    copy its keys and values), and every row samples exactly what it samples alone."""
    model = pair.model
    a, b = [5, 9, 14, 3, 7, 2], [2, 8, 8, 4]
    sampled = Sampling(temperature=1.0, top_p=1.0)
    reqs = [Request(p, 6, sampled, seed=s) for p, s in ((a, 1), (a, 2), (b, 3), (a, 4))]
    prefills = []
    with Decoder(model, pair.tokenizer, stacked=False) as d:
        forward = d.forward
        d.forward = lambda ids, *args, **kw: prefills.append(ids.shape[1]) or forward(ids, *args, **kw)
        together = [r.generated for r in d.run(reqs)]
        d.forward = forward
        alone = [d.run([r])[0].generated for r in reqs]
    assert prefills[0] == len(a) + len(b)  # the first forward prefilled each distinct prompt once
    assert together == alone
    assert len({tuple(x) for x in together[:2]}) == 2  # different seeds, different answers
