"""The schema sections of preference tuning: one per method of `train.method`.

Each holds only its method's own settings; what every method shares (steps, lr, batch, LoRA) stays
in `train:` and `lora:`. Defaults follow the papers and TRL's configs, so a recipe written for TRL
means the same here. The losses themselves are in `lorakit.model.preference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config.declare import _help

METHODS = ("sft", "dpo", "kto", "orpo", "simpo", "grpo")
PAIRED = ("dpo", "orpo", "simpo")
"""Methods that train on {prompt, chosen, rejected} pairs; kto trains on single labelled answers."""
WITH_REFERENCE = ("dpo", "kto")
"""Methods whose loss compares the policy with a frozen reference (the model as training starts)."""


@dataclass
class DpoConfig:
    """train.method: dpo — Direct Preference Optimization against the starting model."""

    beta: float = _help(
        "Strength of the pull towards the reference: the implicit reward is beta × (log-ratio to the "
        "reference). Higher stays closer to the starting model; for loss_type ipo it is IPO's tau.", 0.1)
    loss_type: Literal["sigmoid", "ipo", "robust", "hinge"] = _help(
        "'sigmoid': the DPO paper's -log σ(β·margin); 'ipo': squared distance of the margin averaged "
        "over tokens to 1/(2β) (IPO); 'robust': the sigmoid loss corrected for label_smoothing of flipped "
        "labels (rDPO); 'hinge': max(0, 1 - β·margin) (SLiC).", "sigmoid")
    label_smoothing: float = _help(
        "Assumed fraction of pairs whose preference is wrong, in [0, 0.5) (sigmoid: conservative DPO; "
        "robust: rDPO's noise rate). 0: trust every pair.", 0.0)


@dataclass
class KtoConfig:
    """train.method: kto — Kahneman-Tversky Optimization on single answers labelled good or bad."""

    beta: float = _help("Strength of the pull towards the reference (as DPO's beta).", 0.1)
    desirable_weight: float = _help(
        "Loss weight of answers labelled true. Raise it when they are rarer than the false ones "
        "(the paper keeps desirable × count / (undesirable × count) between 1 and 4/3).", 1.0)
    undesirable_weight: float = _help("Loss weight of answers labelled false.", 1.0)


@dataclass
class OrpoConfig:
    """train.method: orpo — SFT on the chosen answer plus an odds-ratio penalty, no reference model."""

    beta: float = _help(
        "Weight λ of the odds-ratio term beside the chosen answer's NLL (the ORPO paper's lambda).", 0.1)


@dataclass
class SimpoConfig:
    """train.method: simpo — length-normalised margin with a target gap, no reference model."""

    beta: float = _help("Scale of the average log-probability margin (the SimPO paper uses 2.0-2.5).", 2.0)
    gamma: float = _help(
        "Target reward margin γ: the loss is -log σ(β·(avg logp chosen - avg logp rejected) - γ).", 1.0)
    label_smoothing: float = _help("As dpo.label_smoothing, for SimPO's sigmoid loss.", 0.0)


def check_preference(cfg, problems: list[str]) -> None:
    """Cross-field rules of the preference sections (collected with every other problem)."""
    if not 0 <= cfg.dpo.label_smoothing < 0.5:
        problems.append(f"dpo.label_smoothing: {cfg.dpo.label_smoothing} must be in [0, 0.5)")
    if not 0 <= cfg.simpo.label_smoothing < 0.5:
        problems.append(f"simpo.label_smoothing: {cfg.simpo.label_smoothing} must be in [0, 0.5)")
    for name in ("dpo", "kto", "orpo", "simpo"):
        if getattr(cfg, name).beta <= 0:
            problems.append(f"{name}.beta: {getattr(cfg, name).beta} must be > 0")
    if cfg.kto.desirable_weight <= 0 or cfg.kto.undesirable_weight <= 0:
        problems.append("kto.desirable_weight / kto.undesirable_weight: both must be > 0")
