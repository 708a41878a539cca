"""Text metrics for `lorakit eval`, the demo and generation checks during training.

Everything runs offline: exact match and ROUGE-L are a few lines of Python here (the
`rouge-score` package is sdist-only and its `rougeLsum` needs an nltk download), BLEU is
sacrebleu's (the reference implementation; it needs no download, unlike the `evaluate` package,
which fetches its metric scripts from the hub at load time). All scores are in [0, 1].

- `exact_match_strict`: the answer equals the reference after stripping outer whitespace.
- `exact_match`: equal after `normalize` (whitespace collapsed, trailing periods dropped,
  casefolded), so "Shipping." and " shipping" are the same answer.
- `rouge_l`: LCS F1 on whitespace tokens of the normalized strings.
- `bleu`: sacrebleu BLEU with its defaults (13a tokenizer, case-sensitive): per example the
  sentence BLEU with effective order, over a set the corpus BLEU (not a mean of sentence scores).
- when every reference is a JSON object or array: `json_valid` (the answer parses as JSON) and
  `json_field_accuracy` (share of the reference's leaf fields the answer has with the same value).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from lorakit.artifacts import EvalSummary

SCORES = ("exact_match", "exact_match_strict", "rouge_l", "bleu")
JSON_SCORES = ("json_valid", "json_field_accuracy")


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


def exact_match_strict(pred: str, ref: str) -> bool:
    return pred.strip() == ref.strip()


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


def _bleu(effective_order: bool):
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=effective_order)


def bleu(pred: str, ref: str) -> float:
    """sacrebleu sentence BLEU / 100 (effective order, so a short answer is not zeroed by a missing
    4-gram). Two empty strings score 1.0; one empty string scores 0.0 (as in `rouge_l`)."""
    if not pred.strip() or not ref.strip():
        return 1.0 if not pred.strip() and not ref.strip() else 0.0
    return _bleu(True).sentence_score(pred, [ref]).score / 100


def corpus_bleu(preds: list[str], refs: list[str]) -> float:
    """sacrebleu corpus BLEU / 100 over all pairs (n-gram counts pooled, one brevity penalty)."""
    if not preds:
        return 0.0
    return _bleu(False).corpus_score(preds, [refs]).score / 100


# --------------------------------------------------------------------------- JSON answers


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed, value); a ```json fence around the answer is allowed (models often add one)."""
    t = text.strip()
    if t.startswith("```"):
        t = t.strip("`")
        t = t[4:] if t.lower().startswith("json") else t
    try:
        return True, json.loads(t)
    except (json.JSONDecodeError, ValueError):
        return False, None


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def json_references(refs: list[str]) -> bool:
    """True when every reference is a JSON object or array (a bare "42" or "true" does not count:
    short answers would otherwise switch the JSON metrics on)."""
    return bool(refs) and all(ok and isinstance(v, (dict, list)) for ok, v in map(parse_json, refs))


def json_fields(pred: str, ref: str) -> tuple[int, int]:
    """(fields of the reference the answer matches, fields of the reference), leaves by path."""
    want = dict(_leaves(parse_json(ref)[1]))
    ok, got = parse_json(pred)
    have = dict(_leaves(got)) if ok else {}
    return sum(1 for k, v in want.items() if k in have and have[k] == v), len(want)


# --------------------------------------------------------------------------- per example and per set


def score(pred: str, ref: str, *, as_json: bool = False) -> dict[str, float]:
    """Every metric for one answer (JSON ones when `as_json`)."""
    out = {"exact_match": float(exact_match(pred, ref)), "exact_match_strict": float(exact_match_strict(pred, ref)),
           "rouge_l": rouge_l(pred, ref), "bleu": bleu(pred, ref)}
    if as_json:
        hit, total = json_fields(pred, ref)
        out["json_valid"] = float(parse_json(pred)[0])
        out["json_field_accuracy"] = hit / total if total else 1.0
    return out


def aggregate(preds: list[str], refs: list[str]) -> dict[str, float | int]:
    """Means over pairs (BLEU: corpus BLEU), plus "count"; JSON metrics when every reference is JSON
    (`json_field_accuracy` pooled over all fields of all references).

    An empty list gives count 0 and 0.0 scores. Lists of different lengths are a caller bug and
    raise ValueError."""
    if len(preds) != len(refs):
        raise ValueError(f"aggregate: {len(preds)} predictions but {len(refs)} references; pass one of each per row")
    n = len(preds)
    if n == 0:
        return {**{k: 0.0 for k in SCORES}, "count": 0}
    pairs = list(zip(preds, refs))
    out: dict[str, float | int] = {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "exact_match_strict": sum(exact_match_strict(p, r) for p, r in pairs) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n,
        "bleu": corpus_bleu(preds, refs),
    }
    if json_references(refs):
        fields = [json_fields(p, r) for p, r in pairs]
        total = sum(t for _, t in fields)
        out["json_valid"] = sum(parse_json(p)[0] for p in preds) / n
        out["json_field_accuracy"] = sum(h for h, _ in fields) / total if total else 1.0
    out["count"] = n
    return out


# --------------------------------------------------------------------------- how scores are shown


LABELS = {"loss": "loss", "perplexity": "perplexity", "exact_match": "exact match",
          "exact_match_strict": "exact match (strict)", "rouge_l": "ROUGE-L", "bleu": "BLEU",
          "json_valid": "JSON valid", "json_field_accuracy": "JSON field accuracy"}
PERCENT = {"exact_match", "exact_match_strict", "json_valid", "json_field_accuracy"}


def table_rows(summary: "EvalSummary") -> list[tuple[str, dict[str, float | None]]]:
    """(metric, {model: value}) in display order: loss, perplexity, then the generation scores; the
    one owner of which rows an eval table shows (the eval command, the demo and report.html)."""
    rows = [("loss", summary.loss), ("perplexity", summary.perplexity)]
    keys = [k for k in (*SCORES, *JSON_SCORES) if any(k in summary.scores.get(m, {}) for m in summary.models)]
    rows += [(k, {m: summary.scores.get(m, {}).get(k) for m in summary.models}) for k in keys]
    return rows


def text_columns(rows, indent: str = "  ") -> list[str]:
    """Rows of cells as left-aligned columns two spaces apart, each line after `indent` with its
    trailing spaces cut: the one layout of lorakit's terminal tables (runs, merge parity, the GGUF
    checks, --gguf auto, sweeps)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def fmt_value(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    if key in PERCENT:
        return f"{v:.1%}"
    return f"{v:.3f}" if key != "perplexity" else f"{v:.2f}"
