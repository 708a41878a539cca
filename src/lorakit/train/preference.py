"""Preference tuning (train.method dpo / orpo / simpo) on the SFT machinery: packing, passes, fast path.

A pair's chosen and rejected answers are two sequences of one packed row (`PairCollator`), so
both go through one forward with attention kept inside each sequence, and a step's pairs are
grouped into passes by tokens like SFT examples. The loss of a pass is the sum of its pairs'
losses divided by the step's pair count (`_get_num_items_in_batch`), so passes and accumulation
add up to the step's mean, as the token count does for SFT.

The reference of DPO is the model as training starts (base + the new adapter, which starts at
zero, or base + `model.adapter`). Its log-probs are computed once, before the first step, in
eval mode (`reference_logps`), stored in the run folder for resume, and carried into every batch;
no second model and no adapter switching during training. TRL's DPOTrainer computes the same
quantity with the adapter switched off at every step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Sequence

import torch

from lorakit.config.preference import WITH_REFERENCE
from lorakit.data.collate import IGNORE_INDEX, PASSES, pack_bins
from lorakit.model import preference as P
from lorakit.model.loss import body_of, split_head
from lorakit.train.trainer import LorakitTrainer

REF = "lorakit_ref"
"""Batch key: the reference log-prob of each sequence, at the sequence's first position of the row
(0 elsewhere), so that cutting a row into passes cuts it with the sequences."""


DESIRABLE = "lorakit_desirable"
"""Batch key of KTO: 1.0 at the first position of an answer labelled good, else 0 (as `REF`)."""

PAIR = ("chosen", "rejected")
KTO = ("completion", "kl")
"""The two sequences of a KTO item: the labelled answer, and the next item's answer to this prompt
(the mismatched pair whose log-ratio estimates the KL reference point z0, as in the KTO paper)."""


class PairCollator:
    """Items into one padding-free row: the two sequences of each item (chosen then rejected, or a
    KTO answer then its KL partner) one after the other, passes of whole items."""

    def __init__(self, tokens_per_pass: int | None = None, sides: tuple[str, str] = PAIR):
        self.tokens_per_pass, self.sides = tokens_per_pass, sides

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        a, b = self.sides
        lengths = [len(f[a]["input_ids"]) + len(f[b]["input_ids"]) for f in features]
        bins = pack_bins(lengths, self.tokens_per_pass) if self.tokens_per_pass else [list(range(len(features)))]
        ids, labels, positions, refs, good, starts = [], [], [], [], [], []
        for group in bins:
            starts.append(len(ids))
            for i in group:
                f = features[i]
                for side, ref in zip(self.sides, f.get("ref") or (0.0, 0.0)):
                    seq = f[side]
                    rest = [0.0] * (len(seq["input_ids"]) - 1)
                    refs.extend([ref, *rest])
                    good.extend([float(bool(f.get("label")) and side == a), *rest])
                    ids.extend(seq["input_ids"])
                    labels.extend([IGNORE_INDEX, *seq["labels"][1:]])  # nothing predicts a sequence's first token
                    positions.extend(range(len(seq["input_ids"])))
        row = lambda xs, dtype=torch.long: torch.tensor([xs], dtype=dtype)  # noqa: E731
        out = {"input_ids": row(ids), "labels": row(labels), "position_ids": row(positions),
               REF: row(refs, torch.float32)}
        if "label" in features[0]:
            out[DESIRABLE] = row(good, torch.float32)
        if self.tokens_per_pass:
            out[PASSES] = starts
        return out


def pair_refs(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference chosen, reference rejected) per pair of a packed row, from `REF`."""
    starts = inputs["position_ids"][0] == 0
    ref = inputs[REF][0][starts]
    return ref[0::2], ref[1::2]


def with_kl_partners(items: list[dict]) -> list[dict]:
    """KTO items given their `kl` sequence: this prompt followed by the next item's answer (the last
    takes the first's), so the pairing is fixed and the reference log-probs can be computed once.
    The prompt is cut from the left where the pair would outgrow the longer of the two items."""
    n = len(items)
    for i, item in enumerate(items):
        own, other = item["completion"], items[(i + 1) % n]["completion"]
        prompt = _prompt_len(own)
        answer_at = _prompt_len(other)
        answer = other["input_ids"][answer_at:]
        room = max(len(own["input_ids"]), len(other["input_ids"])) - len(answer)
        head = own["input_ids"][:prompt][-room:] if room > 0 else []
        item["kl"] = {"input_ids": head + answer, "labels": [IGNORE_INDEX] * len(head) + other["labels"][answer_at:]}
    return items


def _prompt_len(seq: dict) -> int:
    return next((i for i, x in enumerate(seq["labels"]) if x != IGNORE_INDEX), len(seq["labels"]))


class PreferenceTrainer(LorakitTrainer):
    """LorakitTrainer whose loss is a preference method's, with its figures in every log record."""

    def __init__(self, *args, method: str, settings, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.settings = method, settings
        self.loss_is_scaled_for_ga = True  # divided by the step's pair count in compute_loss
        self.head = split_head(self.model)
        self._figures: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        pairs = sum(int((b["position_ids"] == 0).sum()) // 2 for b in batch_samples)
        return torch.tensor(pairs, device=device)

    def _logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.head is None or self.processes > 1:
            return P.sequence_logps(body_of(model), None, inputs, model=model)
        with self.accelerator.autocast():
            head_weight = self._half_head() if self.fast_head is not None and model.training else None
            return P.sequence_logps(*self.head, inputs, head_weight=head_weight)

    def pair_losses(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses of a packed batch and the per-pair figures logged beside them."""
        sums, counts = self._logps(model, inputs)
        pc, pr, nc, nr = sums[0::2], sums[1::2], counts[0::2], counts[1::2]
        s, figures = self.settings, {}
        if self.method == "dpo":
            rc, rr = pair_refs(inputs)
            loss, wc, wr = P.dpo(pc, pr, rc, rr, nc, nr, beta=s.beta, loss_type=s.loss_type,
                                 label_smoothing=s.label_smoothing)
        elif self.method == "simpo":
            loss, wc, wr = P.simpo(pc, pr, nc, nr, beta=s.beta, gamma=s.gamma, label_smoothing=s.label_smoothing)
        elif self.method == "orpo":
            loss, wc, wr, log_odds = P.orpo(pc, pr, nc, nr, beta=s.beta)
            figures["log_odds_ratio"] = log_odds
        elif self.method == "kto":
            return self._kto(inputs, pc, pr)
        else:
            raise ValueError(f"train.method {self.method!r} is not a paired method")
        figures.update({"rewards/chosen": wc, "rewards/rejected": wr, "rewards/margins": wc - wr,
                        "rewards/accuracies": (wc > wr).float(), "logps/chosen": pc.detach(),
                        "logps/rejected": pr.detach()})
        return loss, figures

    def _kto(self, inputs, p, p_kl) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r, r_kl = pair_refs(inputs)
        starts = inputs["position_ids"][0] == 0
        good = inputs[DESIRABLE][0][starts][0::2] > 0.5
        kl = (p_kl - r_kl).detach().mean()
        s = self.settings
        loss, rewards = P.kto(p, r, good, kl, beta=s.beta, desirable_weight=s.desirable_weight,
                              undesirable_weight=s.undesirable_weight)
        figures = {"kl": kl.reshape(1), "logps/completion": p.detach()}
        if good.any():
            figures["rewards/chosen"] = rewards[good]
        if (~good).any():
            figures["rewards/rejected"] = rewards[~good]
        return loss, figures

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, figures = self.pair_losses(model, inputs)
        kept = self._figures["train" if model.training else "eval"]
        for name, values in figures.items():
            kept[name].extend(values.float().tolist())
        total = loss.sum() / (num_items_in_batch if num_items_in_batch is not None else max(1, loss.numel()))
        return (total, None) if return_outputs else total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in self._prepare_inputs(inputs).items() if k != PASSES}
        with torch.no_grad():
            loss, figures = self.pair_losses(model, inputs)
        kept = self._figures["eval"]
        for name, values in figures.items():
            kept[name].extend(values.float().tolist())
        return loss.mean().detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        kept = self._figures[mode]
        logs = {**logs, **{prefix + k: sum(v) / len(v) for k, v in kept.items() if v}}
        kept.clear()
        super().log(logs, start_time)


@torch.no_grad()
def reference_logps(model, items: list[dict], tokens_per_pass: int = 2048, autocast=None) -> list[list[float]]:
    """[chosen, rejected] log-probs of every pair under `model` as it is now, in eval mode (dropout
    off): the reference that DPO measures the trained policy against."""
    was_training = model.training
    model.eval()
    head = split_head(model)
    collate = PairCollator(sides=KTO if items and "kl" in items[0] else PAIR)
    out: list[list[float]] = []
    try:
        for group in pack_bins_in_order(items, tokens_per_pass):
            batch = collate([items[i] for i in group])
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast() if autocast else torch.autocast("cpu", enabled=False):
                if head is not None:
                    sums, _ = P.sequence_logps(*head, batch)
                else:
                    sums, _ = P.sequence_logps(body_of(model), None, batch, model=model)
            out.extend([[float(a), float(b)] for a, b in zip(sums[0::2].tolist(), sums[1::2].tolist())])
    finally:
        model.train(was_training)
    return out


def collator_for(method: str, tokens_per_pass: int | None, prepared) -> PairCollator:
    """The batches of `method` (KTO items get their KL partners first, in both splits)."""
    if method != "kto":
        return PairCollator(tokens_per_pass)
    with_kl_partners(prepared.train)
    if prepared.validation:
        with_kl_partners(prepared.validation)
    return PairCollator(tokens_per_pass, sides=KTO)


def attach_reference(trainer, paths, prepared) -> list[str]:
    """Give every training and validation pair its reference log-probs (`ref`), for the methods that
    have a reference: read from the run folder on resume (the model has trained since, so they could
    not be computed again), else computed now, before the first step, and written there."""
    if not needs_reference(trainer.method):
        return []
    from lorakit import artifacts
    from lorakit.train import distributed

    splits = {"train": prepared.train, "validation": prepared.validation}
    stored = _read_reference(paths.reference, prepared.fingerprint)
    notes = []
    if stored is None:
        start = time.perf_counter()
        stored = {name: reference_logps(trainer.model, items, autocast=trainer.accelerator.autocast)
                  for name, items in splits.items()}
        with distributed.main_first() as main:
            if main:
                artifacts.atomic_write_json(paths.reference, {"fingerprint": prepared.fingerprint, **stored})
        what = "answers (and their KL partners)" if trainer.method == "kto" else "pairs"
        notes.append(f"reference log-probs of {sum(map(len, splits.values()))} {what} computed in "
                     f"{time.perf_counter() - start:.1f} s (the model as training starts, dropout off)")
    for name, items in splits.items():
        for item, ref in zip(items, stored[name]):
            item["ref"] = ref
    return notes


def _read_reference(path, fingerprint: str) -> dict | None:
    """The stored reference of this very data (a resumed run), or None."""
    import json

    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored if stored.get("fingerprint") == fingerprint else None


def pack_bins_in_order(items: list[dict], budget: int) -> list[list[int]]:
    """Consecutive groups of pairs of at most `budget` tokens (a longer pair alone): the results come
    back in the items' order."""
    groups, current, used = [], [], 0
    a, b = KTO if items and "kl" in items[0] else PAIR
    for i, it in enumerate(items):
        n = len(it[a]["input_ids"]) + len(it[b]["input_ids"])
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def needs_reference(method: str) -> bool:
    return method in WITH_REFERENCE
