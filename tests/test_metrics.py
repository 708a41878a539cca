"""Text metrics against values worked out by hand (the arithmetic is in each test's comment)."""

from __future__ import annotations

import math

import pytest

from lorakit.metrics import aggregate, bleu, exact_match, normalize, rouge_l

CAT = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_normalize():
    assert normalize("  30   Days. ") == "30 days"
    assert normalize("Shipping\n") == "shipping"
    assert normalize("Costs $5.99 each.") == "costs $5.99 each"  # only the trailing period goes
    assert normalize("...") == ""


def test_exact_match():
    assert exact_match("Shipping.", "shipping")
    assert exact_match(" #48213 ", "#48213")
    assert not exact_match("The order number is #48213.", "#48213")
    assert not exact_match("#48213", "#48231")


def test_rouge_l_identical_disjoint_empty():
    assert rouge_l(CAT, CAT) == 1.0
    assert rouge_l("red green", "blue yellow") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "a") == 0.0


def test_rouge_l_worked_example():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens;
    # P = R = 5/6, F1 = 2*5 / (6 + 6) = 10/12.
    assert rouge_l(CAT, REF) == pytest.approx(10 / 12)
    # LCS("a b c d", "a c b d") = 3 ("a b d" or "a c d"); F1 = 6/8.  Unequal lengths: 2*2/(2+4).
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    assert rouge_l("a d", "a b c d") == pytest.approx(4 / 6)


def test_bleu_identical_and_disjoint():
    assert bleu(CAT, CAT) == pytest.approx(1.0)
    assert bleu("shipping", "Shipping.") == pytest.approx(1.0)  # 1 token: p2..p4 smoothed to 1/1
    assert bleu("red green", "blue yellow") == 0.0
    assert bleu("", "a") == 0.0


def test_bleu_worked_example():
    # p1 = 5/6 (the x2, cat, on, mat); p2 = (3+1)/(5+1) (the cat, on the, the mat);
    # p3 = (1+1)/(4+1) (on the mat); p4 = (0+1)/(3+1); equal lengths so BP = 1.
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25  # = (1/18)^(1/4) ~ 0.4855
    assert bleu(CAT, REF) == pytest.approx(expected)
    assert bleu(CAT, REF) == pytest.approx(18 ** -0.25)


def test_bleu_brevity_penalty():
    # "the cat" vs a 6-token reference: every p_n is 1 (p1 = 2/2, p2 = 2/2, p3 = p4 = 1/1),
    # BP = exp(1 - 6/2) = e^-2.
    assert bleu("the cat", CAT) == pytest.approx(math.exp(-2))
    # A longer prediction is not penalized by BP, only by precision: p1 = 6/7, no BP.
    assert bleu(CAT + " today", CAT, max_n=1) == pytest.approx(6 / 7)


def test_aggregate():
    out = aggregate(["Shipping.", "returns", CAT], ["shipping", "billing", REF])
    assert out["count"] == 3
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["rouge_l"] == pytest.approx((1.0 + 0.0 + 10 / 12) / 3)
    assert out["bleu"] == pytest.approx((1.0 + 0.0 + 18 ** -0.25) / 3)
    assert aggregate([], []) == {"exact_match": 0.0, "rouge_l": 0.0, "bleu": 0.0, "count": 0}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        aggregate(["a", "b"], ["a"])
