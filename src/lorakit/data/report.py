"""The text `lorakit data` prints: what will be trained on, and exactly which tokens are in the loss.

Showing one example with its loss mask is the cheapest check there is for the most common
silent failure of fine-tuning: a template or mask that trains the wrong tokens (or none).
"""

from __future__ import annotations

from typing import Any

from lorakit.data.dataset import DataStats, Prepared
from lorakit.data.preference import PreparedPreference, sequences

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around trained text
SHOW_DROPPED = 10


def format_report(prepared: Prepared, tokenizer: Any) -> str:
    s = prepared.stats
    lines = [
        "Data",
        f"  template      {prepared.template.name}",
        f"  formats       {', '.join(f'{k} {v:,}' for k, v in sorted(s.formats.items())) or '-'}",
    ]
    lines += _split_lines(s, "examples")
    p = s.length_percentiles
    lines.append(f"  tokens/row    p50 {p['p50']:,}  p90 {p['p90']:,}  p99 {p['p99']:,}  max {p['max']:,}"
                 f"   (before truncation; data.max_length {s.max_length:,})")
    lines.append(_trained_line(s))
    lines.append(f"  truncated     {s.truncated:,} rows cut to {s.max_length:,} tokens (data.overlong: {s.overlong})")
    lines.append(f"  fingerprint   {prepared.fingerprint[:16]}")
    lines += _dropped_lines(s)
    if prepared.train:
        where = prepared.train_where[0] if prepared.train_where else ""
        lines += ["", *format_example(prepared.train[0], tokenizer, where)]
    return "\n".join(lines)


def format_preference_report(prepared: PreparedPreference, tokenizer: Any) -> str:
    """`format_report` for preference data: the prompt is shown once, each response with its loss mask."""
    s, pairs = prepared.stats, prepared.kind == "preference"
    noun = "pairs" if pairs else "completions"
    shape = "prompt, chosen, rejected" if pairs else "prompt, completion, label"
    lines = [
        f"Data ({prepared.kind}: {shape})",
        f"  template      {prepared.template.name}",
        f"  formats       {', '.join(f'{k} {v:,}' for k, v in sorted(s.formats.items())) or '-'}",
        *_split_lines(s, noun),
    ]
    if not pairs:
        good = sum(1 for item in prepared.train if item["label"])
        lines.append(f"  labels        {good:,} desirable, {len(prepared.train) - good:,} undesirable (train)")
    p = s.length_percentiles
    side = "chosen or rejected" if pairs else "completion"
    lines.append(f"  tokens/seq    p50 {p['p50']:,}  p90 {p['p90']:,}  p99 {p['p99']:,}  max {p['max']:,}"
                 f"   (prompt + {side}, before truncation; data.max_length {s.max_length:,})")
    lines.append(_trained_line(s) + " (responses only)")
    lines.append(f"  truncated     {s.truncated:,} {noun} with the prompt cut from the left to fit {s.max_length:,} "
                 "tokens (responses are never cut)")
    lines.append(f"  fingerprint   {prepared.fingerprint[:16]}")
    lines += _dropped_lines(s)
    if prepared.train:
        where = prepared.train_where[0] if prepared.train_where else ""
        lines += ["", *format_preference_item(prepared.train[0], tokenizer, where)]
    return "\n".join(lines)


def format_preference_item(item: dict, tokenizer: Any, where: str = "") -> list[str]:
    """One encoded pair (or KTO completion): the shared prompt once, then each response, trained runs in ⟦ ⟧."""
    sides = [key for key in ("chosen", "rejected", "completion") if key in item]
    first = sequences(item)[0]
    n_prompt = next((i for i, x in enumerate(first["labels"]) if x != -100), len(first["labels"]))
    label = "" if "label" not in item else f", label {str(item['label']).lower()} " \
        f"({'desirable' if item['label'] else 'undesirable'})"
    rule = "-" * 60
    pair = "rejected" in item
    lines = [f"{'Pair' if pair else 'Example'}{f' ({where})' if where else ''}{label}: text in {OPEN} {CLOSE} is "
             f"trained; the prompt is {'shared and ' if pair else ''}never trained",
             rule, f"prompt: {n_prompt:,} tokens", _marked(first["input_ids"][:n_prompt], first["labels"][:n_prompt],
                                                         tokenizer)]
    for side in sides:
        ids, labels = item[side]["input_ids"][n_prompt:], item[side]["labels"][n_prompt:]
        n_trained = sum(1 for x in labels if x != -100)
        lines += [rule, f"{side}: {n_trained:,} of {len(ids):,} tokens trained", _marked(ids, labels, tokenizer)]
    return lines + [rule]


def _split_lines(s: DataStats, noun: str) -> list[str]:
    lines = []
    for split in ("train", "validation"):
        kept, read = s.counts.get(split, 0), s.rows.get(split, 0)
        extra = f"  ({read - kept:,} of {read:,} rows dropped)" if read != kept else ""
        lines.append(f"  {split:<13} {kept:,} {noun}{extra}")
    return lines


def _trained_line(s: DataStats) -> str:
    total, trained = s.tokens.get("train", 0), s.trained_tokens.get("train", 0)
    return f"  trained       {trained:,} of {total:,} train tokens ({_pct(trained, total)}) are in the loss"


def _dropped_lines(s: DataStats) -> list[str]:
    if not s.dropped:
        return []
    lines = ["", f"Dropped rows ({len(s.dropped):,})"]
    lines += [f"  {note.where}: {note.reason}" for note in s.dropped[:SHOW_DROPPED]]
    if len(s.dropped) > SHOW_DROPPED:
        lines.append(f"  ... and {len(s.dropped) - SHOW_DROPPED:,} more")
    return lines


def format_example(item: dict, tokenizer: Any, where: str = "") -> list[str]:
    """One encoded example as text, trained runs wrapped in ⟦ ⟧."""
    ids, labels = item["input_ids"], item["labels"]
    n_trained = sum(1 for x in labels if x != -100)
    head = f"Example{f' ({where})' if where else ''}: text in {OPEN} {CLOSE} is trained, " \
           f"{n_trained:,} of {len(ids):,} tokens ({_pct(n_trained, len(ids))})"
    rule = "-" * 60
    return [head, rule, _marked(ids, labels, tokenizer), rule]


def _marked(ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """The decoded tokens, each run of trained ones wrapped in ⟦ ⟧ (decoded per run, so the marks sit
    exactly at token boundaries)."""
    parts, run, run_trained = [], [], None
    for token, label in zip(ids, labels):
        trained = label != -100
        if run and trained != run_trained:
            parts.append(_show(tokenizer, run, run_trained))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        parts.append(_show(tokenizer, run, run_trained))
    return "".join(parts)


def _show(tokenizer: Any, tokens: list[int], trained: bool | None) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{OPEN}{text}{CLOSE}" if trained else text


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"
