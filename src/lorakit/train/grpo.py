"""GRPO (train.method grpo): rollouts on lorakit's decoder from the live policy, rewards by code.

Each optimizer step takes `grpo.prompts_per_step` prompts, samples `grpo.generations` completions
of each from the adapter being trained — the same model object, switched to eval mode and run by
`lorakit.infer.Decoder` (batched, KV-cached, each row with its own seed), no copy of the weights —
scores them with the reward functions, and takes one policy-gradient step on them
(`lorakit.model.policy`): the completions, packed behind their prompts into padding-free rows,
are passes like SFT's, each token weighted so that the passes add up to the step's loss.

The rollouts' seeds are derived from train.seed, the step and the row, so a run is reproducible
and a resumed one samples what the uninterrupted one would have. A batch of rollouts is learnt
from for `grpo.updates_per_batch` optimizer steps (the sampler repeats its prompts). At the first,
the policy is the one that sampled, so the old log-probs are the new ones, detached (ratio 1, the
plain policy gradient), and they are kept for the later updates, where the clip takes effect.
Checkpoints fall between batches (train.save_steps is a multiple), so resume needs no rollouts. With
grpo.beta > 0 the reference is the model as training started: the base with the adapter switched
off (a new adapter), or the continued adapter's starting weights (model.adapter).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.artifacts.records import append_jsonl
from lorakit.data.collate import IGNORE_INDEX, pack_bins
from lorakit.data.prompts import WHERE
from lorakit.model import policy as P
from lorakit.model.loss import body_of, split_head, token_logps
from lorakit.train.distributed import epoch_order
from lorakit.train.trainer import LorakitTrainer

SEED_STRIDE = 1_000_003
"""Rollout seeds: train.seed + step × SEED_STRIDE + row, distinct for every (step, row) of a run."""


def collate_prompts(features: list[dict]) -> dict[str, Any]:
    """A batch of prompts stays a list: the rollouts make the tensors."""
    return {"prompts": list(features)}


class GrpoTrainer(LorakitTrainer):
    """LorakitTrainer whose step samples, scores and learns from its own completions."""

    def __init__(self, *args, settings, rewards, template, samples_to: Path | None = None, continued: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.settings, self.rewards, self.template = settings, rewards, template
        # The KL reference when continuing an adapter (model.adapter): its weights as training starts.
        # The Trainer loads a checkpoint's weights only later, in train(), so on resume too this is
        # the adapter the run started from. A new adapter's reference is the base (adapter off).
        self.reference = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad} \
            if continued and settings.beta else None
        self.samples_to = samples_to  # rollouts.jsonl; None: not recorded
        self._batch: _Batch | None = None  # the rollouts the next grpo.updates_per_batch steps learn from
        self.loss_is_scaled_for_ga = True
        self.head = split_head(self.model)
        self._figures: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------ rollouts

    @torch.no_grad()
    def rollouts(self, prompts: list[dict], step: int) -> list[dict]:
        """`generations` completions of every prompt from the model as it is now."""
        from lorakit.infer.decoder import Decoder, Request
        from lorakit.infer.sampling import Sampling

        s, tok = self.settings, self.processing_class
        sampling = Sampling(max_new_tokens=s.max_completion_tokens, temperature=s.temperature, top_p=s.top_p)
        stop = tuple(self.template.stop_token_ids(tok))
        base_seed = self.args.seed + step * SEED_STRIDE
        adapter = self.model.active_adapter  # the one being trained, run by the decoder's LoRA stacks
        reqs, owners = [], []
        for i, p in enumerate(prompts):
            for g in range(s.generations):
                row = i * s.generations + g
                reqs.append(Request(p["prompt_ids"], s.max_completion_tokens, sampling, stop, seed=base_seed + row,
                                    adapter=adapter))
                owners.append(i)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with self.accelerator.autocast(), Decoder(model, tok, adapters=[adapter], head_weight=self._half_head()) as decoder:
                rows = decoder.run(reqs)
        finally:
            model.train(was_training)
        out = []
        for r, i in zip(rows, owners):
            ids = list(r.ids) + ([r.stop_token] if r.stop_token is not None else [])
            out.append({"prompt": i, "prompt_ids": prompts[i]["prompt_ids"], "completion_ids": ids,
                        "text": tok.decode(r.ids, skip_special_tokens=True).strip(),
                        "finished": r.finish_reason == "stop"})
        return out

    # ------------------------------------------------------------------ one step

    def training_step(self, model, inputs, num_items_in_batch=None):
        s = self.settings
        step = self.state.global_step
        if step % s.updates_per_batch == 0 or self._batch is None:
            self._batch = self._sample_batch(inputs["prompts"], step)
        elif [p["prompt_ids"] for p in inputs["prompts"]] != self._batch.prompt_ids:
            raise RuntimeError("GRPO: a repeated batch of prompts changed between its updates")  # RepeatedBatches
        b = self._batch
        start = time.perf_counter()
        loss_total = torch.zeros(())
        for j, group in enumerate(b.passes):
            batch = _packed([b.done[k] for k in group])
            batch = {k: v.to(self.args.device) for k, v in batch.items()}
            sync = self.accelerator.no_sync(model) if j < len(b.passes) - 1 else contextlib.nullcontext()
            with sync, self.compute_loss_context_manager():
                loss, logp = self._pass_loss(model, batch, b.adv[group], b.lengths[group], len(b.done), b.tokens,
                                             old=b.old[j] if j < len(b.old) else None)
                self.accelerator.backward(loss)
            if j >= len(b.old):  # the first update: the policy is the one that sampled, so these are the old log-probs
                b.old.append(logp)
            loss_total += loss.detach().float().cpu()
        self.token_counter.add(b.tokens, b.tokens + sum(len(d["prompt_ids"]) for d in b.done), b.tokens)
        self._figures["update_s"].append(time.perf_counter() - start)
        return loss_total.to(self.args.device)

    def _sample_batch(self, prompts: list[dict], step: int) -> "_Batch":
        """Sample, score and pack one batch of rollouts (the first of its grpo.updates_per_batch steps)."""
        s = self.settings
        start = time.perf_counter()
        done = self.rollouts(prompts, step)
        self._figures["rollout_s"].append(time.perf_counter() - start)
        texts = [self.processing_class.decode(p["prompt_ids"]) for p in prompts]  # the prompt as rendered
        rows = [{**prompts[d["prompt"]]["columns"], "finished": d["finished"]} for d in done]
        total, per_reward = self.rewards.score([texts[d["prompt"]] for d in done], [d["text"] for d in done], rows)
        rewards = torch.tensor(total, dtype=torch.float32)
        self._record(rewards, per_reward, done)
        self._keep_samples(texts[0], done, rewards, per_reward)
        lengths = torch.tensor([float(len(d["completion_ids"])) for d in done])
        passes = pack_bins([len(d["prompt_ids"]) + len(d["completion_ids"]) for d in done],
                           self.tokens_per_pass or 10**9)
        return _Batch([p["prompt_ids"] for p in prompts], done, P.advantages(rewards, s.generations, s.scale_rewards),
                      lengths, int(lengths.sum()), passes)

    def _pass_loss(self, model, batch, adv, lengths, completions: int, tokens: int,
                   old: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass's share of the step's loss, and its tokens' log-probs (detached). `old`: the
        sampling policy's log-probs of these tokens; None on a batch's first update, where the
        policy is the sampling one and its own log-probs, detached, are the old ones."""
        s = self.settings
        with self.accelerator.autocast():
            if self.head is None or self.processes > 1:
                logp, seq = token_logps(body_of(model), None, batch, model=model)
            else:
                logp, seq = token_logps(*self.head, batch, head_weight=self._half_head())
            ref = None
            if s.beta:
                with torch.no_grad(), self._reference_weights(model):
                    ref, _ = token_logps(*self.head, batch) if self.head else \
                        token_logps(body_of(model), None, batch, model=model)
        old = logp.detach() if old is None else old
        per_token, figures = P.clipped_token_loss(logp, old, adv.to(logp.device)[seq],
                                                  epsilon=s.epsilon, epsilon_high=s.epsilon_high or s.epsilon,
                                                  beta=s.beta, ref=ref)
        for name, values in figures.items():
            self._figures[name].append(float(values.mean()))
        w = P.token_weights(seq, lengths.to(seq.device), s.loss_type, completions=completions, tokens=tokens,
                            max_tokens=s.max_completion_tokens)
        return (w * per_token).sum(), old

    @contextlib.contextmanager
    def _reference_weights(self, model):
        """The KL reference's forward: the base with the adapter off, or, continuing an adapter, the
        trainable weights swapped for their values at the start (tensor handles only, no copy) and
        swapped back before anything else reads them. (Autocast's cache of 16-bit weights is keyed by
        parameter, but it is neither filled nor read under no_grad, where this forward runs: the
        test under bf16 autocast shows the two forwards apart.)"""
        if self.reference is None:
            with model.disable_adapter():
                yield
            return
        live = {}
        try:
            for n, p in model.named_parameters():
                if n in self.reference:
                    live[n], p.data = p.data, self.reference[n]
            yield
        finally:
            for n, p in model.named_parameters():
                if n in live:
                    p.data = live[n]

    def _get_train_sampler(self, train_dataset=None):
        times = self.settings.updates_per_batch
        if times == 1:
            return super()._get_train_sampler(train_dataset)
        data = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return RepeatedBatches(len(data), self._train_batch_size, times, seed)

    # ------------------------------------------------------------------ what is logged

    def _record(self, rewards: torch.Tensor, per_reward: dict[str, list[float]], done: list[dict]) -> None:
        g = self.settings.generations
        f = self._figures
        f["reward"].append(float(rewards.mean()))
        f["reward_std"].append(float(rewards.view(-1, g).std(dim=1).mean()) if g > 1 else 0.0)
        f["zero_spread_groups"].append(float((rewards.view(-1, g).std(dim=1) == 0).float().mean()) if g > 1 else 1.0)
        for name, values in per_reward.items():
            f[f"rewards/{name}"].append(sum(values) / len(values))
        f["completion_length"].append(sum(len(d["completion_ids"]) for d in done) / len(done))
        f["truncated"].append(sum(not d["finished"] for d in done) / len(done))

    def _keep_samples(self, prompt: str, done: list[dict], rewards: torch.Tensor,
                      per_reward: dict[str, list[float]]) -> None:
        """The first prompt's group, with each answer's rewards, to rollouts.jsonl at the first and
        last batch and every grpo.log_samples_steps steps (the report shows them)."""
        every, step = self.settings.log_samples_steps, self.state.global_step + 1  # the step being taken
        if self.samples_to is None or not every or not self.is_world_process_zero():
            return
        updates = self.settings.updates_per_batch  # this batch serves steps step .. step + updates - 1
        due = (step - 1 + updates) // every > (step - 1) // every  # a multiple of `every` among them
        if step != 1 and not due and step + updates <= self.state.max_steps:  # nor the run's last batch
            return
        g = self.settings.generations
        samples = [{"completion": d["text"], "reward": round(float(r), 4), "finished": d["finished"],
                    "rewards": {name: round(float(v[k]), 4) for name, v in per_reward.items()}}
                   for k, (d, r) in enumerate(zip(done[:g], rewards[:g]))]
        append_jsonl(self.samples_to, {"step": step, "prompt": prompt, "samples": samples})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._figures.items() if v}}
            self._figures.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """An evaluation is the generation probe alone (greedy answers to validation prompts, scored
        by the rewards and, where rows have references, as `lorakit eval` scores them): a GRPO run
        has no loss on held-out rows to compute."""
        metrics = self.generation_probe(self.model) if self.generation_probe is not None else {}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return torch.zeros((), device=self.args.device), None, None  # evaluation is the generation probe


@dataclass
class _Batch:
    """One batch of rollouts and what its updates need: advantages, answer lengths, the passes, and
    the sampling policy's log-probs per pass (filled by the first update, read by the later ones)."""

    prompt_ids: list[list[int]]
    done: list[dict]
    adv: torch.Tensor
    lengths: torch.Tensor
    tokens: int
    passes: list[list[int]]
    old: list[torch.Tensor] = field(default_factory=list)


class RepeatedBatches(torch.utils.data.Sampler):
    """The epoch's order of `n` prompts, cut into batches of `size`, each batch `times` times in a
    row: grpo.updates_per_batch optimizer steps on the same prompts (TRL's RepeatSampler does this
    for num_iterations). The order is `distributed.epoch_order`'s, so a resumed run skips to the same
    place, and the first batch is a one-update run's.
    The epoch's last batch, when short, is filled up with the epoch's first prompts, so that the data
    loader's batches of `size` never straddle two repeats."""

    def __init__(self, n: int, size: int, times: int, seed: int):
        self.n, self.size, self.times, self.seed = n, size, times, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for at in range(0, len(order), self.size):
            batch = order[at:at + self.size]
            batch += order[:self.size - len(batch)]
            for _ in range(self.times):
                yield from batch

    def __len__(self) -> int:
        return -(-self.n // self.size) * self.size * self.times


def _packed(done: list[dict]) -> dict[str, torch.Tensor]:
    """Prompt + completion sequences in one padding-free row, labels on the completions only."""
    ids, labels, positions = [], [], []
    for d in done:
        seq = d["prompt_ids"] + d["completion_ids"]
        ids += seq
        labels += [IGNORE_INDEX] * len(d["prompt_ids"]) + d["completion_ids"]
        positions += range(len(seq))
    row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
    return {"input_ids": row(ids), "labels": row(labels), "position_ids": row(positions)}


__all__ = ["GrpoTrainer", "WHERE", "collate_prompts"]
