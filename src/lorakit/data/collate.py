"""Pad a batch of encoded examples into tensors.

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


class PackedCollator:
    """Concatenate a micro-batch into one padding-free row.

    Output is `(1, Σ len)` input_ids and labels plus position_ids that restart at 0 for every
    example, and no attention mask: transformers reads each restart as an example boundary and
    builds a block-diagonal causal mask, so examples never attend to each other and the loss
    equals the padded batch's loss while no compute is spent on padding.

    Examples go longest first and, given `tokens_per_pass`, grouped first-fit into bins of at
    most that many tokens, bin after bin: `LorakitTrainer` cuts the row greedily at example
    boundaries into passes of bounded length, and on this order the greedy cut finds exactly
    those bins (an example opened a new bin only because no earlier bin had room for it, and
    bins only fill up afterwards).

    The first label of every example is set to -100. In a padded batch that position is never
    a target (nothing precedes it); in a packed row it would be predicted from the previous
    example's last token, which is not something to learn.
    """

    def __init__(self, longest_first: bool = True, tokens_per_pass: int | None = None):
        self.longest_first = longest_first
        self.tokens_per_pass = tokens_per_pass

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        if self.longest_first:  # order within a row does not change the loss; it makes passes fill evenly
            features = sorted(features, key=lambda f: -len(f["input_ids"]))
            if self.tokens_per_pass:
                features = first_fit(features, self.tokens_per_pass)
        for f in features:
            n = len(f["input_ids"])
            ids.extend(f["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(f["labels"][1:])
            positions.extend(range(n))
        as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def first_fit(features: Sequence[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Examples (longest first) reordered bin by bin, first-fit: fewer, fuller passes than in order."""
    return [features[i] for b in first_fit_bins([len(f["input_ids"]) for f in features], budget) for i in b]


def first_fit_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of `lengths`, taken in order, each put in the first bin with room for it (a new bin
    when none has): the passes of a packed step. `lorakit.plan` simulates runs with it."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([i])
            room.append(budget - n)
        else:
            bins[j].append(i)
            room[j] -= n
    return bins
