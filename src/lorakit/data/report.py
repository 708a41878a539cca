"""The text `lorakit data` prints: what will be trained on, and exactly which tokens are in the loss.

Showing one example with its loss mask is the cheapest check there is for the most common
silent failure of fine-tuning: a template or mask that trains the wrong tokens (or none).
"""

from __future__ import annotations

from typing import Any

from lorakit.data.dataset import Prepared

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around trained text
SHOW_DROPPED = 10


def format_report(prepared: Prepared, tokenizer: Any) -> str:
    s = prepared.stats
    lines = [
        "Data",
        f"  template      {prepared.template.name}",
        f"  formats       {', '.join(f'{k} {v:,}' for k, v in sorted(s.formats.items())) or '-'}",
    ]
    for split in ("train", "validation"):
        kept, read = s.counts.get(split, 0), s.rows.get(split, 0)
        extra = f"  ({read - kept:,} of {read:,} rows dropped)" if read != kept else ""
        lines.append(f"  {split:<13} {kept:,} examples{extra}")
    p = s.length_percentiles
    lines.append(f"  tokens/row    p50 {p['p50']:,}  p90 {p['p90']:,}  p99 {p['p99']:,}  max {p['max']:,}"
                 f"   (before truncation; data.max_length {s.max_length:,})")
    total, trained = s.tokens.get("train", 0), s.trained_tokens.get("train", 0)
    lines.append(f"  trained       {trained:,} of {total:,} train tokens ({_pct(trained, total)}) are in the loss")
    lines.append(f"  truncated     {s.truncated:,} rows cut to {s.max_length:,} tokens (data.overlong: {s.overlong})")
    lines.append(f"  fingerprint   {prepared.fingerprint[:16]}")
    if s.dropped:
        lines += ["", f"Dropped rows ({len(s.dropped):,})"]
        lines += [f"  {note.where}: {note.reason}" for note in s.dropped[:SHOW_DROPPED]]
        if len(s.dropped) > SHOW_DROPPED:
            lines.append(f"  ... and {len(s.dropped) - SHOW_DROPPED:,} more")
    if prepared.train:
        where = prepared.train_where[0] if prepared.train_where else ""
        lines += ["", *format_example(prepared.train[0], tokenizer, where)]
    return "\n".join(lines)


def format_example(item: dict, tokenizer: Any, where: str = "") -> list[str]:
    """One encoded example as text, trained runs wrapped in ⟦ ⟧."""
    ids, labels = item["input_ids"], item["labels"]
    n_trained = sum(1 for x in labels if x != -100)
    head = f"Example{f' ({where})' if where else ''}: text in {OPEN} {CLOSE} is trained, " \
           f"{n_trained:,} of {len(ids):,} tokens ({_pct(n_trained, len(ids))})"
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
    rule = "-" * 60
    return [head, rule, "".join(parts), rule]


def _show(tokenizer: Any, tokens: list[int], trained: bool | None) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{OPEN}{text}{CLOSE}" if trained else text


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"
