"""Text metrics for `lorakit eval` and the demo: exact match, ROUGE-L and sentence BLEU.

Pure Python, no dependencies.  Every metric compares `normalize`d strings and, where it needs
tokens, splits them on whitespace, so "Shipping." and " shipping" are the same answer.
"""

from __future__ import annotations

import math
from collections import Counter


def normalize(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, drop trailing periods, casefold.

    "  30   Days. " -> "30 days".  Only periods at the very end are dropped ("$5.99" keeps its).
    """
    return " ".join(text.split()).rstrip(".").rstrip().casefold()


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(pred: str, ref: str) -> bool:
    """normalize(pred) == normalize(ref)."""
    return normalize(pred) == normalize(ref)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a)·len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on whitespace tokens of the normalized strings.

    With L = LCS(pred, ref), P = L / |pred|, R = L / |ref|:  F1 = 2·P·R / (P + R) = 2L / (|pred| + |ref|).
    Two empty strings score 1.0; one empty string scores 0.0.
    """
    p, r = _tokens(pred), _tokens(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    return 2 * _lcs_length(p, r) / (len(p) + len(r))


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(pred: str, ref: str, max_n: int = 4) -> float:
    """Sentence BLEU of `pred` against one reference, on whitespace tokens of normalized strings.

    p_n = clipped n-gram matches / n-grams in pred, with add-one smoothing for n > 1
    (p_n = (m_n + 1) / (c_n + 1), Lin & Och 2004) so one missing 4-gram does not zero the score;
    p_1 is unsmoothed, so a prediction sharing no word with the reference scores 0.
    BP = 1 if c > r else exp(1 - r / c), with c = |pred|, r = |ref|.
    BLEU = BP · exp( (1 / max_n) · Σ_{n=1..max_n} log p_n ).
    Two empty strings score 1.0; one empty string scores 0.0 (as in `rouge_l`).
    """
    p, r = _tokens(pred), _tokens(ref)
    if not p or not r:
        return 1.0 if not p and not r else 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        pred_ngrams, ref_ngrams = _ngrams(p, n), _ngrams(r, n)
        matches = sum(min(count, ref_ngrams[g]) for g, count in pred_ngrams.items())
        total = sum(pred_ngrams.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_sum += math.log(matches / total)
        else:
            log_sum += math.log((matches + 1) / (total + 1))
    bp = 1.0 if len(p) > len(r) else math.exp(1 - len(r) / len(p))
    return bp * math.exp(log_sum / max_n)


def aggregate(preds: list[str], refs: list[str]) -> dict[str, float | int]:
    """Means over pairs: {"exact_match", "rouge_l", "bleu"} in [0, 1], plus "count".

    An empty list gives count 0 and means 0.0.  Lists of different lengths are a caller bug
    and raise ValueError.
    """
    if len(preds) != len(refs):
        raise ValueError(f"aggregate: {len(preds)} predictions but {len(refs)} references; pass one of each per row")
    n = len(preds)
    if n == 0:
        return {"exact_match": 0.0, "rouge_l": 0.0, "bleu": 0.0, "count": 0}
    pairs = list(zip(preds, refs))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n,
        "bleu": sum(bleu(p, r) for p, r in pairs) / n,
        "count": n,
    }
