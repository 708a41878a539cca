"""Preference losses and the packed log-probs they are computed from.

Each loss is checked against its paper's formula written out here in plain Python floats on
numbers chosen in the test (no shared code with lorakit.model.preference), and the packed
chosen+rejected pass against each sequence run alone through the model's own logits.
Tolerances: float32 arithmetic on values of order 1-10, so 1e-5 relative covers rounding; the
packed-vs-alone comparison sums ~10 log-probs of order 6 through different attention kernels
(block-diagonal packed vs one sequence), 1e-4 absolute.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.model import preference as P
from lorakit.train.preference import PairCollator, pair_refs, reference_logps

PC, PR, RC, RR = [-4.0, -9.5, -3.0], [-6.0, -8.0, -7.5], [-5.0, -9.0, -3.5], [-5.5, -8.5, -6.0]
NC, NR = [4.0, 6.0, 2.0], [5.0, 3.0, 8.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float32)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0),
                                           ("ipo", 0.0)])
def test_dpo_losses_equal_the_formulas(loss_type, eps):
    beta = 0.3
    loss, wc, wr = P.dpo(t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), beta=beta, loss_type=loss_type,
                         label_smoothing=eps)
    for i in range(3):
        m = (PC[i] - RC[i]) - (PR[i] - RR[i])
        expected = {
            "sigmoid": -(1 - eps) * logsig(beta * m) - eps * logsig(-beta * m),
            "robust": (-(1 - eps) * logsig(beta * m) + eps * logsig(-beta * m)) / (1 - 2 * eps),
            "hinge": max(0.0, 1 - beta * m),
            "ipo": ((PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i] - 1 / (2 * beta)) ** 2,
        }[loss_type]
        assert float(loss[i]) == pytest.approx(expected, rel=1e-5)
        assert float(wc[i]) == pytest.approx(beta * (PC[i] - RC[i]), rel=1e-5)
        assert float(wr[i]) == pytest.approx(beta * (PR[i] - RR[i]), rel=1e-5)


def test_simpo_and_orpo_equal_the_formulas():
    beta, gamma = 2.0, 1.0
    loss, wc, wr = P.simpo(t(PC), t(PR), t(NC), t(NR), beta=beta, gamma=gamma)
    orpo, _, _, log_odds = P.orpo(t(PC), t(PR), t(NC), t(NR), beta=0.1)
    for i in range(3):
        ac, ar = PC[i] / NC[i], PR[i] / NR[i]
        assert float(loss[i]) == pytest.approx(-logsig(beta * (ac - ar) - gamma), rel=1e-5)
        assert float(wc[i]) == pytest.approx(beta * ac, rel=1e-5)
        odds = lambda a: math.log(math.exp(a) / (1 - math.exp(a)))  # noqa: E731
        assert float(log_odds[i]) == pytest.approx(odds(ac) - odds(ar), rel=1e-5)
        assert float(orpo[i]) == pytest.approx(-ac - 0.1 * logsig(odds(ac) - odds(ar)), rel=1e-5)


def test_kto_equals_the_formula():
    p, r, good = t([-3.0, -6.0, -2.0]), t([-3.5, -5.0, -2.5]), torch.tensor([True, False, True])
    loss, rewards = P.kto(p, r, good, t(0.4), beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    z0 = 0.4
    exp = [1 - sig(0.5 * (0.5 - z0)), 1.5 * (1 - sig(0.5 * (z0 - (-1.0)))), 1 - sig(0.5 * (0.5 - z0))]
    assert [float(x) for x in loss] == pytest.approx(exp, rel=1e-5)
    loss, _ = P.kto(p, r, good, t(-2.0), beta=0.5, desirable_weight=1.0, undesirable_weight=1.0)
    assert float(loss[0]) == pytest.approx(1 - sig(0.5 * 0.5), rel=1e-5)  # a negative KL counts as 0


def _pairs(tok):
    def side(prompt: str, answer: str) -> dict:
        p, a = tok(prompt, add_special_tokens=False).input_ids, tok(answer, add_special_tokens=False).input_ids
        return {"input_ids": p + a, "labels": [-100] * len(p) + a}

    return [{"chosen": side("Say hello.", " Hello world!"), "rejected": side("Say hello.", " Goodbye.")},
            {"chosen": side("Order #555?", " Order number: #555"), "rejected": side("Order #555?", " no idea")}]


def _alone(model, seq: dict) -> float:
    """log p(answer | prompt) of one sequence, from the model's full logits (no lorakit code)."""
    ids = torch.tensor([seq["input_ids"]])
    logits = model(input_ids=ids).logits[0, :-1].float()
    labels = torch.tensor(seq["labels"][1:])
    keep = labels != -100
    return float(F.log_softmax(logits[keep], -1).gather(1, labels[keep][:, None]).sum())


@pytest.fixture
def tiny(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), tiny_tokenizer


def test_packed_pairs_give_each_sequence_its_own_log_prob(tiny):
    model, tok = tiny
    pairs = _pairs(tok)
    batch = PairCollator()(pairs)
    with torch.no_grad():
        sums, counts = P.sequence_logps(model.model, model.lm_head, batch)
        alone = [_alone(model, p[side]) for p in pairs for side in ("chosen", "rejected")]
    assert sums.tolist() == pytest.approx(alone, abs=1e-4)
    assert counts.tolist() == [sum(x != -100 for x in p[s]["labels"][1:]) for p in pairs for s in ("chosen", "rejected")]


def test_packed_dpo_loss_and_gradients_equal_each_sequence_alone(tiny):
    model, tok = tiny
    pairs = _pairs(tok)
    for p, ref in zip(pairs, ([-20.0, -25.0], [-30.0, -28.0])):
        p["ref"] = ref
    batch = PairCollator()(pairs)
    rc, rr = pair_refs(batch)
    assert rc.tolist() == [-20.0, -30.0] and rr.tolist() == [-25.0, -28.0]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    sums, counts = P.sequence_logps(model.model, model.lm_head, batch)
    packed, _, _ = P.dpo(sums[0::2], sums[1::2], rc, rr, counts[0::2], counts[1::2], beta=0.1)
    g_packed = grads(packed.mean())

    def one(seq):
        ids = torch.tensor([seq["input_ids"]])
        lp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        labels = torch.tensor(seq["labels"][1:])
        keep = labels != -100
        return lp[keep].gather(1, labels[keep][:, None]).sum()

    alone = torch.stack([-F.logsigmoid(0.1 * ((one(p["chosen"]) - p["ref"][0]) - (one(p["rejected"]) - p["ref"][1])))
                         for p in pairs])
    g_alone = grads(alone.mean())
    assert float(packed.mean()) == pytest.approx(float(alone.mean()), abs=1e-5)
    assert torch.allclose(g_packed, g_alone, atol=1e-5), float((g_packed - g_alone).abs().max())


def test_passes_cut_between_pairs_never_inside_one(tiny):
    _, tok = tiny
    pairs = _pairs(tok) * 3
    budget = len(pairs[0]["chosen"]["input_ids"]) + len(pairs[0]["rejected"]["input_ids"]) + 1
    batch = PairCollator(tokens_per_pass=budget)(pairs)
    from lorakit.data.collate import split_passes

    for part in split_passes(batch):
        assert int((part["position_ids"] == 0).sum()) % 2 == 0  # whole pairs only
        assert part["lorakit_ref"].shape == part["input_ids"].shape


def test_reference_of_a_new_adapter_is_the_base_and_of_a_trained_one_base_plus_it(tiny):
    import peft

    model, tok = tiny
    pairs = _pairs(tok)
    with torch.no_grad():
        base = [_alone(model, p[s]) for p in pairs for s in ("chosen", "rejected")]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    ref = reference_logps(lora, pairs)
    assert [x for r in ref for x in r] == pytest.approx(base, abs=1e-4)
    for name, w in lora.named_parameters():  # a trained adapter: B no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.5)
    trained = reference_logps(lora, pairs)
    with torch.no_grad():
        direct = [_alone(lora, p[s]) for p in pairs for s in ("chosen", "rejected")]
        with lora.disable_adapter():
            off = [_alone(lora, p[s]) for p in pairs for s in ("chosen", "rejected")]
    assert [x for r in trained for x in r] == pytest.approx(direct, abs=1e-4)
    assert off == pytest.approx(base, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(direct, base)) > 1e-2  # the adapter matters here


def test_kto_items_pack_with_their_kl_partner_and_the_label(tiny):
    from lorakit.train.preference import DESIRABLE, KTO, with_kl_partners

    _, tok = tiny
    pairs = _pairs(tok)
    items = with_kl_partners([{"completion": pairs[0]["chosen"], "label": True},
                              {"completion": pairs[1]["rejected"], "label": False}])
    # item 0's KL sequence: its own prompt, then item 1's answer (and the last wraps to the first)
    p0 = pairs[0]["chosen"]["labels"].index(next(x for x in pairs[0]["chosen"]["labels"] if x != -100))
    a1 = [x for x in pairs[1]["rejected"]["labels"] if x != -100]
    assert items[0]["kl"]["input_ids"][-len(a1):] == a1 and items[0]["kl"]["input_ids"][:p0] == \
        pairs[0]["chosen"]["input_ids"][:p0]
    assert [x for x in items[0]["kl"]["labels"] if x != -100] == a1
    batch = PairCollator(sides=KTO)(items)
    starts = batch["position_ids"][0] == 0
    assert batch[DESIRABLE][0][starts].tolist() == [1.0, 0.0, 0.0, 0.0]
