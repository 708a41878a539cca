"""The policy-gradient loss of GRPO and its variants, from per-token log-probs of a packed pass.

GRPO samples a group of G completions per prompt, scores them with rewards, and pushes each
completion's tokens up or down by its advantage: its reward against its group's,

    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)          (scale_rewards 'group')

(Dr. GRPO drops the division: 'none'; 'batch' divides by the whole batch's spread). Per token, with
the probability ratio ρ = exp(logp - logp_old) to the policy that generated the rollouts,

    ℓ_t = -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A)  +  β·(exp(ref - logp) - (ref - logp) - 1)

the second term being the k3 estimate of KL(policy ‖ reference) (only with β > 0). How the ℓ_t are
averaged is what the variants differ in (`WEIGHTS`): GRPO averages within each completion, then
over completions (a long completion's tokens count less); DAPO averages over every token of the
step; Dr. GRPO divides the sum by completions × the completion-length budget (no length bias at
all). Each is a weight per token, so a step cut into passes adds up to the same loss.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages of `rewards` (prompts × group, flattened in that order)."""
    r = rewards.float().view(-1, group)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (r.std() + 1e-4)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r}")
    return centred.flatten()


def token_weights(seq: torch.Tensor, lengths: torch.Tensor, loss_type: str, *, completions: int, tokens: int,
                  max_tokens: int) -> torch.Tensor:
    """The weight of each token in the step's loss (see the module docstring): `seq` the sequence of
    each token, `lengths` each sequence's labelled tokens, `completions` / `tokens` the whole step's
    counts (so that passes add up), `max_tokens` the completion budget (Dr. GRPO)."""
    if loss_type == "grpo":
        return 1.0 / (lengths[seq].clamp(min=1) * completions)
    if loss_type == "dapo":
        return torch.full_like(seq, 1.0 / max(1, tokens), dtype=torch.float32)
    if loss_type == "dr_grpo":
        return torch.full_like(seq, 1.0 / (completions * max_tokens), dtype=torch.float32)
    raise ValueError(f"unknown GRPO loss type {loss_type!r}")


def clipped_token_loss(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, *, epsilon: float,
                       epsilon_high: float, beta: float = 0.0,
                       ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ℓ_t for each token (adv and ref already per token) and the figures logged beside it: the
    share of tokens whose ratio was clipped, and the mean KL estimate."""
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    figures = {"clip_ratio": ((ratio < 1 - epsilon) & (adv < 0) | (ratio > 1 + epsilon_high) & (adv > 0))
               .float().detach()}
    if beta:
        d = ref - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
        figures["kl"] = kl.detach()
    return loss, figures
