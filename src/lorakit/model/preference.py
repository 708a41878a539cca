"""Preference losses from sequence log-probabilities, and those log-probabilities from one packed pass.

Every preference method compares answers through log p(answer | prompt), summed over the answer's
tokens. `sequence_logps` gets them for every sequence of a packed row in one forward: the LM head
runs only at answer positions (as `labelled_loss` does for SFT) and the token log-probs are added
up per sequence, so a pair's chosen and rejected answers share one pass with no padding. The loss
functions below take those sums (and token counts) and nothing else, so a test can check each
against the paper's formula on numbers it chose itself.

Conventions: sums `pc`, `pr` (policy, chosen / rejected), `rc`, `rr` (reference), counts `nc`,
`nr`; every function returns (per-pair losses, per-pair chosen rewards, rejected rewards), the
rewards being what the method's implicit reward is (β × log-ratio to the reference for DPO, β ×
average log-prob for SimPO and ORPO), so margins and preference accuracy read the same everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.model.loss import sequence_ids, token_logps

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def sequence_logps(body, head, inputs: dict[str, torch.Tensor], head_weight: torch.Tensor | None = None,
                   model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each sequence's labelled tokens, their count), one entry per sequence
    (`model` / `head_weight` as in `loss.token_logps`, which makes the token log-probs)."""
    logp, seq = token_logps(body, head, inputs, head_weight, model=model)
    n = int(sequence_ids(inputs).max()) + 1
    sums = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add(0, seq, logp.float())
    counts = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add(0, seq, torch.ones_like(logp.float()))
    return sums, counts


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-ε)·log σ(x) - ε·log σ(-x): the logistic loss when a fraction ε of the labels is flipped."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def dpo(pc, pr, rc, rr, nc, nr, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> Losses:
    """DPO and its variants on the log-ratio margin Δ = (pc - rc) - (pr - rr).

    sigmoid: -log σ(βΔ) (with ε: conservative DPO); robust: rDPO's unbiased estimate under a flip
    rate ε; hinge: max(0, 1 - βΔ) (SLiC); ipo: (Δ̄ - 1/(2β))² with Δ̄ the margin of the per-token
    averaged log-ratios (IPO's regression target; TRL normalises by length the same way)."""
    chosen, rejected = pc - rc, pr - rr
    margin = chosen - rejected
    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(beta * margin, label_smoothing)
    elif loss_type == "robust":
        eps = label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(beta * margin) + eps * F.logsigmoid(-beta * margin)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        loss = (chosen / nc.clamp(min=1) - rejected / nr.clamp(min=1) - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return loss, beta * chosen.detach(), beta * rejected.detach()


def simpo(pc, pr, nc, nr, *, beta: float, gamma: float, label_smoothing: float = 0.0) -> Losses:
    """SimPO: -log σ(β·(avg logp chosen - avg logp rejected) - γ); no reference model."""
    ac, ar = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
    loss = _smoothed_sigmoid(beta * (ac - ar) - gamma, label_smoothing)
    return loss, beta * ac.detach(), beta * ar.detach()


def orpo(pc, pr, nc, nr, *, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO: the chosen answer's mean token NLL plus β × -log σ(log odds ratio), where the odds of an
    answer are p/(1-p) with p its per-token average probability. Also returns the log odds ratio."""
    ac, ar = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
    # log(1 - exp(a)) for a < 0, written to stay finite when a is near 0 (an almost certain answer).
    log1m = lambda a: torch.log(-torch.expm1(a.clamp(max=-1e-6)))  # noqa: E731
    log_odds = (ac - ar) - (log1m(ac) - log1m(ar))
    loss = -ac - beta * F.logsigmoid(log_odds)
    return loss, beta * ac.detach(), beta * ar.detach(), log_odds.detach()


def kto(p, r, desirable: torch.Tensor, kl: torch.Tensor, *, beta: float, desirable_weight: float,
        undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO per answer: desirable w_d·(1 - σ(β(log-ratio - z₀))), undesirable w_u·(1 - σ(β(z₀ - log-ratio))),
    with z₀ = max(0, kl) the batch's reference point (no gradient). Returns (losses, rewards)."""
    ratio = p - r
    z0 = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, good, bad), beta * ratio.detach()
