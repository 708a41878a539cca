"""From `cfg.data` to encoded train/validation examples, with the numbers `lorakit data` shows.

Order matters for reproducibility: rows are read and `data.limit` applied first, then the
validation split is drawn (seeded by `train.seed`, on row indices, so it does not move when
max_length or the template change), then rows are encoded, truncated or dropped.  Nothing is
dropped silently: every dropped or truncated row is recorded with where it came from and why.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import sys
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

from lorakit.config import Config, DataConfig
from lorakit.data.formats import detect_format, drop_reasoning, to_example
from lorakit.data.sources import read_rows
from lorakit.data.templates import Template, resolve_template
from lorakit.errors import DataError

Located = tuple[dict, str]  # (Example, where)


@dataclass
class RowNote:
    where: str
    reason: str


@dataclass
class DataStats:
    counts: dict[str, int] = field(default_factory=dict)
    """Examples kept per split ('train', 'validation')."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows read per split, before dropping."""
    dropped: list[RowNote] = field(default_factory=list)
    truncated: int = 0
    truncated_rows: list[RowNote] = field(default_factory=list)
    length_percentiles: dict[str, int] = field(default_factory=dict)
    """p50 / p90 / p99 / max tokens per example over both splits, before truncation (what
    max_length would have to be to keep them whole)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Tokens per split after truncation."""
    trained_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens with a label (in the loss) per split."""
    formats: dict[str, int] = field(default_factory=dict)
    max_length: int = 0
    overlong: str = "truncate"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    train: list[dict]
    validation: list[dict]
    train_examples: list[dict]
    validation_examples: list[dict]
    template: Template
    stats: DataStats
    fingerprint: str
    """sha256 over the token ids and labels of both splits: equal fingerprints, equal training data."""
    train_where: list[str] = field(default_factory=list)
    validation_where: list[str] = field(default_factory=list)


def prepare(cfg: Config, tokenizer: Any) -> Prepared:
    d = cfg.data
    template = resolve_template(d.template, tokenizer, d.system_prompt)
    stats = DataStats(max_length=d.max_length, overlong=d.overlong)
    formats: Counter[str] = Counter()
    train_rows, val_rows = read_splits(cfg, lambda specs, split: _examples(specs, d.format, split, formats))
    stats.formats = dict(formats)
    lengths: list[int] = []
    train = _encode_split("train", train_rows, template, tokenizer, d, stats, lengths)
    validation = _encode_split("validation", val_rows, template, tokenizer, d, stats, lengths)
    stats.length_percentiles = percentiles(lengths)
    if not train[0]:
        raise _all_dropped(stats, len(train_rows), lengths)
    return Prepared(
        train=train[0], validation=validation[0], train_examples=train[1], validation_examples=validation[1],
        template=template, stats=stats, fingerprint=fingerprint([train[0], validation[0]]),
        train_where=train[2], validation_where=validation[2],
    )


@dataclass
class Encoded:
    """One held-out set encoded like training data: token items, the Examples they came from, where."""

    items: list[dict]
    examples: list[dict]
    wheres: list[str]
    stats: DataStats


def encode_sources(specs: list[str], template: Template, tokenizer: Any, d: DataConfig, split: str = "test") -> Encoded:
    """Read and encode `specs` with a run's template and data rules (format, max_length, overlong,
    train_on_inputs), so an eval set is tokenized exactly as training tokenized its data."""
    stats = DataStats(max_length=d.max_length, overlong=d.overlong)
    formats: Counter[str] = Counter()
    rows = list(_examples(_as_list(specs), d.format, split, formats))
    lengths: list[int] = []
    items, examples, wheres = _encode_split(split, rows, template, tokenizer, d, stats, lengths)
    stats.formats, stats.length_percentiles = dict(formats), percentiles(lengths)
    return Encoded(items, examples, wheres, stats)


def _as_list(specs: str | list[str]) -> list[str]:
    return [specs] if isinstance(specs, str) else list(specs)


def _examples(specs: list[str], fmt: str, split: str, formats: Counter[str]) -> Iterator[Located]:
    for spec in specs:
        for row, where in read_rows(spec, split):
            row_fmt = detect_format(row, where) if fmt == "auto" else fmt
            formats[row_fmt] += 1
            yield to_example(row, row_fmt, where), where


def read_splits(cfg: Config, read: Callable[[list, str], Iterable]) -> tuple[list, list]:
    """The rows of data.train (at most data.limit) and of data.validation, or else the seeded split
    of data.train: the reading every kind of data (SFT, preference, prompts) shares. `read(specs,
    split)` yields one split's rows from its sources."""
    d = cfg.data
    train = list(itertools.islice(read(_as_list(d.train), d.split), d.limit))
    if d.validation:
        return train, list(read(_as_list(d.validation), "validation"))
    return split_rows(train, d.val_fraction, cfg.train.seed)


def split_rows(rows: list[Located], fraction: float, seed: int) -> tuple[list[Located], list[Located]]:
    """Hold out round(n * fraction) rows (at least 1, at most n - 1) chosen by `seed`; order is kept."""
    n = len(rows)
    n_val = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    chosen = set(random.Random(seed).sample(range(n), n_val))
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


def _encode_split(split: str, rows: list[Located], template: Template, tokenizer: Any, d: DataConfig,
                  stats: DataStats, lengths: list[int]) -> tuple[list[dict], list[dict], list[str]]:
    items, examples, wheres = [], [], []
    for example, where in rows:
        if d.reasoning == "drop":
            example = drop_reasoning(example)
        try:
            ids, labels = template.encode(tokenizer, example, d.train_on_inputs)
        except DataError as e:
            if e.where:
                raise
            raise DataError(e.message, e.hint, where) from None
        n = len(ids)
        lengths.append(n)
        if n > d.max_length:
            too_long = f"{n} tokens > data.max_length {d.max_length}"
            if d.overlong == "drop":
                stats.dropped.append(RowNote(where, f"{too_long} (data.overlong: drop)"))
                continue
            ids, labels = ids[: d.max_length], labels[: d.max_length]
            if all(label == -100 for label in labels):
                stats.dropped.append(RowNote(where, f"{too_long}: the prompt alone fills it, no trained token left"))
                continue
            stats.truncated += 1
            stats.truncated_rows.append(RowNote(where, f"{n} tokens cut to data.max_length {d.max_length}"))
        elif all(label == -100 for label in labels):
            stats.dropped.append(RowNote(where, "no trained tokens (nothing in the loss)"))
            continue
        items.append({"input_ids": ids, "labels": labels})
        examples.append(example)
        wheres.append(where)
    stats.rows[split] = len(rows)
    stats.counts[split] = len(items)
    stats.tokens[split] = sum(len(it["input_ids"]) for it in items)
    stats.trained_tokens[split] = sum(sum(1 for x in it["labels"] if x != -100) for it in items)
    return items, examples, wheres


def _all_dropped(stats: DataStats, n_rows: int, lengths: list[int]) -> DataError:
    if not n_rows:
        return DataError("no training rows", hint="check data.train and data.limit")
    reasons = "\n".join(f"  {note.where}: {note.reason}" for note in stats.dropped[:3])
    longest = max(lengths) if lengths else 0
    return DataError(
        f"all {n_rows} training rows were dropped, e.g.:\n{reasons}",
        hint=f"raise data.max_length (the longest example has {longest} tokens) or set data.overlong: truncate",
        where="data.train",
    )


def percentiles(lengths: Iterable[int]) -> dict[str, int]:
    """Nearest-rank p50 / p90 / p99 / max (values that occur, no interpolation)."""
    values = sorted(lengths)
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    rank = lambda q: values[min(len(values), max(1, math.ceil(q * len(values)))) - 1]  # noqa: E731
    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": values[-1]}


def fingerprint(splits: list[list[dict]]) -> str:
    h = hashlib.sha256()
    for items in splits:
        h.update(b"split")
        for item in items:
            for key in ("input_ids", "labels"):
                packed = array("q", item[key])
                if sys.byteorder != "little":
                    packed.byteswap()
                h.update(len(packed).to_bytes(8, "little"))
                h.update(packed.tobytes())
    return h.hexdigest()
