"""Which micro-batches and passes a run will see, simulated from the real example lengths: the
largest one sets the activation memory."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lorakit.config import Config


@dataclass
class Batches:
    """Per-example lengths of the training / validation data and how the run batches them."""

    lengths: np.ndarray  # tokens per training example (after truncation)
    labelled: np.ndarray  # positions in the loss per training example
    eval_lengths: np.ndarray
    measured: bool  # False: data unreadable, every example assumed max_length long
    percentiles: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_prepared(cls, prepared) -> "Batches":
        """An example is what the collator keeps together: an SFT example, or a preference pair's two
        sequences (a KTO answer and its KL partner, assumed as long as the answer) as one unit."""
        def units(items):
            return [_sequences(it) for it in items]

        lab = [sum(sum(1 for y in s["labels"][1:] if y != -100) for s in u) for u in units(prepared.train)]
        return cls(np.array([sum(len(s["input_ids"]) for s in u) for u in units(prepared.train)]), np.array(lab),
                   np.array([sum(len(s["input_ids"]) for s in u) for u in units(prepared.validation)]), True,
                   dict(prepared.stats.length_percentiles))

    @classmethod
    def assumed(cls, cfg: Config, rows: int = 1000) -> "Batches":
        n = cfg.data.max_length
        return cls(np.full(rows, n), np.full(rows, n // 2), np.full(0, n), False)

    def truncated(self, max_length: int, drop: bool) -> "Batches":
        """The same data with a shorter data.max_length (truncation cuts responses first)."""
        keep = self.lengths <= max_length if drop else np.ones(len(self.lengths), bool)
        cut = np.maximum(self.lengths - max_length, 0)
        ev = self.eval_lengths[self.eval_lengths <= max_length] if drop else np.minimum(self.eval_lengths, max_length)
        return Batches(np.minimum(self.lengths, max_length)[keep], np.maximum(self.labelled - cut, 0)[keep],
                       ev, self.measured, self.percentiles)


def _sequences(item: dict) -> list[dict]:
    if "chosen" in item:
        return [item["chosen"], item["rejected"]]
    if "completion" in item:
        return [item["completion"], item["completion"]]
    return [item]


@dataclass
class MicroBatch:
    tokens: int  # positions through the model: Σ len (packed) or rows × longest (padded)
    labelled: int
    rows: int
    seq: int


def micro_batches_in_run(cfg: Config, n_train: int) -> int:
    t = cfg.train
    per_epoch = math.ceil(n_train / t.batch_size)
    if t.max_steps > 0:
        return t.max_steps * t.grad_accum
    return max(1, math.ceil(per_epoch * t.epochs))


def _batch_tokens(lengths: np.ndarray, packing: bool) -> int:
    return int(lengths.sum()) if packing else int(len(lengths) * lengths.max())


def _epoch(b: Batches, order: np.ndarray, batch_size: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labelled) of each micro-batch when the examples come in `order`."""
    pad = -len(order) % batch_size  # the last batch is short: zero-length fillers
    lengths = np.concatenate([b.lengths[order], np.zeros(pad, int)]).reshape(-1, batch_size)
    labelled = np.concatenate([b.labelled[order], np.zeros(pad, int)]).reshape(-1, batch_size)
    rows = (lengths > 0).sum(1)
    return (lengths.sum(1) if packing else lengths.max(1) * rows), labelled.sum(1)


def peak_micro_batch(b: Batches, batch_size: int, packing: bool, n_micro: int, seed: int, sims: int = 9) -> MicroBatch:
    """The largest micro-batch (tokens) of a simulated run, median over `sims` shuffles.

    The Trainer shuffles every epoch; which examples meet in a batch is chance, so the run's
    largest batch is a random variable whose median is the best single guess."""
    rng = np.random.default_rng(seed)
    n = len(b.lengths)
    per_epoch = math.ceil(n / batch_size)
    epochs = min(math.ceil(n_micro / per_epoch), 20)  # the maximum saturates long before
    best_tokens, best_labelled = [], []
    for _ in range(sims):
        runs = [_epoch(b, rng.permutation(n), batch_size, packing) for _ in range(epochs)]
        best_tokens.append(np.concatenate([t for t, _ in runs])[:n_micro].max())
        best_labelled.append(np.concatenate([lab for _, lab in runs])[:n_micro].max())
    tokens = int(np.median(best_tokens))
    rows = 1 if packing else min(batch_size, n)
    return MicroBatch(tokens, int(np.median(best_labelled)), rows, tokens // rows)


def _first_fit(lengths: np.ndarray, labelled: np.ndarray, budget: int) -> tuple[int, int]:
    """(tokens, labelled) of the fullest pass the collator makes of one step's examples."""
    from lorakit.data.collate import pack_bins

    bins = [np.array(b) for b in pack_bins(lengths.tolist(), budget)]
    fullest = max(bins, key=lambda b: int(lengths[b].sum()))
    return int(lengths[fullest].sum()), int(labelled[fullest].sum())


def peak_pass(b: Batches, rows_per_step: int, budget: int, n_steps: int, seed: int, sims: int = 5) -> MicroBatch:
    """The largest pass (tokens) of a simulated packed run, median over `sims` shuffles.

    Each optimizer step's examples are packed first-fit into passes of at most `budget` tokens
    (one example longer than that is a pass of its own) by the collator's own `pack_bins`."""
    rng = np.random.default_rng(seed)
    n = len(b.lengths)
    steps_per_epoch = max(1, math.ceil(n / rows_per_step))
    steps = max(1, min(n_steps, 20 * steps_per_epoch))
    best_tokens, best_labelled = [], []
    for _ in range(sims):
        order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps / steps_per_epoch))])
        peak = (0, 0)
        for k in range(steps):
            idx = order[k * rows_per_step:(k + 1) * rows_per_step]
            if len(idx):
                peak = max(peak, _first_fit(b.lengths[idx], b.labelled[idx], budget))
        best_tokens.append(peak[0])
        best_labelled.append(peak[1])
    tokens = int(np.median(best_tokens))
    return MicroBatch(tokens, int(np.median(best_labelled)), 1, tokens)


def peak_eval_batch(b: Batches, eval_batch_size: int, packing: bool) -> int:
    """Tokens of the largest evaluation batch (evaluation batches are taken in order)."""
    ev = b.eval_lengths
    return max((_batch_tokens(ev[i:i + eval_batch_size], packing) for i in range(0, len(ev), eval_batch_size)),
               default=0)


