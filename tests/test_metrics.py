"""Text metrics against values worked out by hand (the arithmetic is in each test's comment)."""

from __future__ import annotations

import math

import pytest

from lorakit.metrics import aggregate, bleu, corpus_bleu, exact_match, exact_match_strict, normalize, rouge_l, score

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
    assert bleu("red green", "blue yellow") == 0.0
    assert bleu("", "a") == 0.0 and bleu("", "") == 1.0
    assert bleu("shipping", "Shipping.") == 0.0  # sacrebleu's default is case- and punctuation-sensitive


def test_bleu_worked_example():
    # sacrebleu sentence BLEU (13a tokens, 'exp' smoothing): p1 = 5/6 (the x2, cat, on, mat),
    # p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat), p4 = 0/3 -> smoothed 1/(2·3);
    # equal lengths so BP = 1: BLEU = (5/6 · 3/5 · 1/4 · 1/6)^(1/4) = 48^(-1/4) ~ 0.380.
    assert bleu(CAT, REF) == pytest.approx(48 ** -0.25)


def test_bleu_brevity_penalty():
    # "the cat" vs a 6-token reference: effective order uses p1 = p2 = 1 only; BP = exp(1 - 6/2) = e^-2.
    assert bleu("the cat", CAT) == pytest.approx(math.exp(-2))


def test_corpus_bleu_pools_counts():
    # Counts pooled over both pairs: p1 = (5+2)/(6+2), p2 = (3+1)/(5+1), p3 = (1+0)/(4+0),
    # p4 = 0/3 -> 'exp'-smoothed 1/(2·3); total lengths equal, BP = 1:
    # BLEU = (7/8 · 4/6 · 1/4 · 1/6)^(1/4) = (7/288)^(1/4) ~ 0.395 -- not the mean of the sentence scores.
    preds, refs = [CAT, "a b"], [REF, "a b"]
    assert corpus_bleu(preds, refs) == pytest.approx((7 / 288) ** 0.25)
    assert corpus_bleu(preds, refs) != pytest.approx((bleu(CAT, REF) + bleu("a b", "a b")) / 2)
    assert corpus_bleu(["red"], ["blue"]) == 0.0


def test_strict_and_normalized_exact_match():
    assert exact_match_strict(" Shipping ", "Shipping") and not exact_match_strict("shipping.", "Shipping")
    assert exact_match("shipping.", "Shipping")


def test_json_metrics_only_when_every_reference_is_json():
    refs = ['{"order": 555, "items": ["a", "b"]}', '{"order": 7}']
    preds = ['```json\n{"order": 555, "items": ["a", "c"]}\n```', "order 7"]
    out = aggregate(preds, refs)
    # fields: order, items[0], items[1] | order -> matched 2 of 3 in the first, 0 of 1 in the second
    assert out["json_valid"] == 0.5 and out["json_field_accuracy"] == pytest.approx(2 / 4)
    assert "json_valid" not in aggregate(["42"], ["42"])  # a bare number is not a JSON answer set
    assert "json_valid" not in aggregate(preds, [refs[0], "shipping"])
    assert score(preds[0], refs[0], as_json=True)["json_field_accuracy"] == pytest.approx(2 / 3)


def test_aggregate():
    out = aggregate(["Shipping.", "returns", CAT], ["shipping", "billing", REF])
    assert out["count"] == 3
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["exact_match_strict"] == 0.0
    assert out["rouge_l"] == pytest.approx((1.0 + 0.0 + 10 / 12) / 3)
    assert out["bleu"] == pytest.approx(corpus_bleu(["Shipping.", "returns", CAT], ["shipping", "billing", REF]))
    assert aggregate([], []) == {"exact_match": 0.0, "exact_match_strict": 0.0, "rouge_l": 0.0, "bleu": 0.0,
                                 "count": 0}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        aggregate(["a", "b"], ["a"])
