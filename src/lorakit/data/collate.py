"""Batches of encoded examples: padded rows, or packed padding-free rows cut into passes.

This module owns the packing rules: which examples share a pass (`pack_bins`), where a packed
row's examples start (`segment_bounds`), and how those bounds reach the attention
(`segment_kwargs`). The trainer, the loss and `lorakit plan` call them; none keeps its own copy.

Labels are padded with -100 by position, never recovered from `input_ids == pad_token_id`:
when pad and EOS are the same token (SmolLM2) that comparison would erase every EOS from
the loss and the model would never learn to stop.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


class Collator:
    """Right-pad `input_ids` with `pad_token_id`, labels with -100; build the attention mask."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None):
        # Padded positions are masked out of attention and loss, so any id is correct there;
        # 0 stands in when a tokenizer has no pad token at all.
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = -(-longest // m) * m
        shape = (len(features), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


SEGMENTS = "lorakit_segments"
"""Keyword that carries a packed row's example bounds from the loss to the attention, and the name
of the attention implementation that reads it (registered by `lorakit.train.speed`)."""

PASSES = "lorakit_passes"
"""Batch key of a packed step: the start offset of each pass in the row (see `PackedCollator`)."""


class PackedCollator:
    """Concatenate a micro-batch into one padding-free row.

    Output is `(1, Σ len)` input_ids and labels plus position_ids that restart at 0 for every
    example, and no attention mask: transformers reads each restart as an example boundary and
    builds a block-diagonal causal mask, so examples never attend to each other and the loss
    equals the padded batch's loss while no compute is spent on padding.

    With `tokens_per_pass` the collator is the one owner of which examples share a pass:
    `pack_bins` groups them, the row holds the groups one after another, and `PASSES` lists where
    each starts. `LorakitTrainer` runs one forward/backward per pass (`split_passes`), and
    `lorakit plan` simulates runs with `pack_bins` too.

    The first label of every example is set to -100. In a padded batch that position is never
    a target (nothing precedes it); in a packed row it would be predicted from the previous
    example's last token, which is not something to learn.
    """

    def __init__(self, longest_first: bool = True, tokens_per_pass: int | None = None):
        self.longest_first = longest_first
        self.tokens_per_pass = tokens_per_pass

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(f["input_ids"]) for f in features]
        if self.tokens_per_pass:
            bins = pack_bins(lengths, self.tokens_per_pass)
        elif self.longest_first:  # order within a row does not change the loss
            bins = [sorted(range(len(features)), key=lambda i: -lengths[i])]
        else:
            bins = [list(range(len(features)))]
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        starts: list[int] = []
        for group in bins:
            starts.append(len(ids))
            for i in group:
                f = features[i]
                ids.extend(f["input_ids"])
                labels.append(IGNORE_INDEX)
                labels.extend(f["labels"][1:])
                positions.extend(range(lengths[i]))
        as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
        out: dict[str, Any] = {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}
        if self.tokens_per_pass:
            out[PASSES] = starts
        return out


def pack_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Which examples share a pass: indices of `lengths`, longest first, each put in the first bin
    with room for it (first-fit decreasing; a new bin when none has room, so an example longer
    than `budget` is a pass of its own). Fewer, fuller passes than cutting the examples in order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([i])
            room.append(budget - n)
        else:
            bins[j].append(i)
            room[j] -= n
    return bins


def split_passes(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """A packed step cut into its passes at the `PASSES` offsets (without that key); a batch
    without it is one pass."""
    starts = inputs.get(PASSES)
    rest = {k: v for k, v in inputs.items() if k != PASSES}
    if not starts or len(starts) == 1:
        return [rest]
    length = rest["input_ids"].shape[1]
    edges = [*starts, length]
    return [{k: v[:, a:b] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length else v
             for k, v in rest.items()} for a, b in zip(edges[:-1], edges[1:]) if b > a]


def segment_bounds(position_ids: torch.Tensor) -> list[int]:
    """Example boundaries [0, s1, …, T] of one packed row, from where its positions restart at 0."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, position_ids.shape[1]]


def segment_kwargs(body: Any, inputs: dict) -> dict:
    """Extra keyword for `body(...)`: a packed row's example bounds when `body` attends per example."""
    positions = inputs.get("position_ids")
    if positions is None or inputs.get("attention_mask") is not None:
        return {}
    if getattr(getattr(body, "config", None), "_attn_implementation", None) != SEGMENTS:
        return {}
    return {SEGMENTS: segment_bounds(positions)}
