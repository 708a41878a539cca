"""GRPO's loss against the formulas written out token by token in plain Python (no shared code).

Tolerances: float32 sums of a few dozen terms of order 1, so 1e-5 relative.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lorakit.model import policy as P

REWARDS = [1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 0.0, 1.0]  # 2 prompts x group 4; the second has spread, so does the first
GROUP = 4


def test_advantages_are_group_relative():
    adv = P.advantages(torch.tensor(REWARDS), GROUP, "group").tolist()
    for g in range(2):
        r = REWARDS[g * GROUP:(g + 1) * GROUP]
        mean, std = statistics.mean(r), statistics.stdev(r)  # unbiased, as TRL
        assert adv[g * GROUP:(g + 1) * GROUP] == pytest.approx([(x - mean) / (std + 1e-4) for x in r], rel=1e-5)
    none = P.advantages(torch.tensor(REWARDS), GROUP, "none").tolist()
    assert none[:GROUP] == pytest.approx([x - 0.5 for x in REWARDS[:GROUP]])
    batch = P.advantages(torch.tensor(REWARDS), GROUP, "batch").tolist()
    assert batch[0] == pytest.approx((1.0 - 0.5) / (statistics.stdev(REWARDS) + 1e-4), rel=1e-5)
    same = P.advantages(torch.tensor([1.0] * 4), 4, "group").tolist()
    assert same == [0.0] * 4  # a group with no spread teaches nothing


def _tokens():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2, 4]
    seq = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
    logp = -torch.rand(len(seq), generator=g) * 3
    old = logp + (torch.rand(len(seq), generator=g) - 0.5) * 0.6  # ratios around 1, some past the clip range
    ref = logp + (torch.rand(len(seq), generator=g) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.3, -1.2])
    return lengths, seq, logp, old, ref, adv


def _by_hand(lengths, seq, logp, old, ref, adv, *, eps, eps_high, beta):
    out = []
    for t in range(len(seq)):
        a = float(adv[int(seq[t])])
        ratio = math.exp(float(logp[t] - old[t]))
        term = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps_high) * a)
        d = float(ref[t] - logp[t])
        out.append(term + beta * (math.exp(d) - d - 1))
    return out


@pytest.mark.parametrize("loss_type", P.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_each_aggregation_equals_its_formula(loss_type, beta):
    lengths, seq, logp, old, ref, adv = _tokens()
    per_token, figures = P.clipped_token_loss(logp, old, adv[seq], epsilon=0.2, epsilon_high=0.28, beta=beta,
                                              ref=ref if beta else None)
    hand = _by_hand(lengths, seq, logp, old, ref, adv, eps=0.2, eps_high=0.28, beta=beta)
    assert per_token.tolist() == pytest.approx(hand, rel=1e-5)
    w = P.token_weights(seq, torch.tensor(lengths), loss_type, completions=4, tokens=sum(lengths), max_tokens=8)
    got = float((w * per_token).sum())
    by_seq = [[hand[t] for t in range(len(seq)) if int(seq[t]) == i] for i in range(4)]
    want = {"grpo": sum(sum(s) / len(s) for s in by_seq) / 4,
            "dapo": sum(hand) / sum(lengths),
            "dr_grpo": sum(hand) / (4 * 8)}[loss_type]
    assert got == pytest.approx(want, rel=1e-5)
    assert ("kl" in figures) == bool(beta)


def test_passes_add_up_to_the_step():
    lengths, seq, logp, old, _, adv = _tokens()
    per_token, _ = P.clipped_token_loss(logp, old, adv[seq], epsilon=0.2, epsilon_high=0.2)
    for loss_type in P.LOSS_TYPES:
        whole = P.token_weights(seq, torch.tensor(lengths), loss_type, completions=4, tokens=14, max_tokens=8)
        cut = 8  # the first two sequences in one pass, the other two in the next
        parts = sum(float((P.token_weights(seq[a:b], torch.tensor(lengths), loss_type, completions=4, tokens=14,
                                           max_tokens=8) * per_token[a:b]).sum()) for a, b in ((0, cut), (cut, 14)))
        assert parts == pytest.approx(float((whole * per_token).sum()), rel=1e-5)


def test_on_policy_gradient_is_minus_the_advantage_and_clipping_stops_it():
    # on-policy (old = logp, detached): ratio 1, d loss / d logp_t = -A_t (times the token's weight)
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, _ = P.clipped_token_loss(logp, logp.detach(), adv, epsilon=0.2, epsilon_high=0.2)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-0.5, 1.0, -2.0])
    # a ratio already past 1 + ε with a positive advantage: the clipped term wins, no gradient
    logp = torch.tensor([-1.0], requires_grad=True)
    loss, figures = P.clipped_token_loss(logp, torch.tensor([-1.5]), torch.tensor([1.0]), epsilon=0.2,
                                         epsilon_high=0.2)
    loss.sum().backward()
    assert logp.grad.tolist() == [0.0] and figures["clip_ratio"].tolist() == [1.0]
