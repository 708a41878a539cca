"""The `grpo:` section: GRPO (train.method: grpo), RL on answers the adapter samples itself, each
scored by reward functions (`lorakit.rewards`).

Defaults follow the papers (DeepSeekMath's GRPO, DAPO, Dr. GRPO) and TRL's GRPOConfig where they
agree; where TRL's default differs, the help says so, so a TRL recipe can be carried over key by key.
The names of the built-in rewards are kept here, beside the schema, so a misspelt one is reported
with every other config problem; `lorakit.rewards` implements them under the same names.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from lorakit.config.declare import _help

BUILTIN_REWARDS = ("exact_match", "json_valid", "json_fields", "regex", "length", "format")

_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


@dataclass
class RewardConfig:
    """One entry of grpo.rewards: which function scores an answer, how much it counts, its arguments."""

    name: str = _help(
        "A built-in reward (" + ", ".join(BUILTIN_REWARDS) + ") or 'path/to/file.py:function', a "
        "function in your own file (a relative path is read from the config file's folder).")
    weight: float = _help(
        "Multiplies this reward in the sum the advantages are computed from; negative makes it a "
        "penalty, 0 logs it without training on it.", 1.0)
    args: dict[str, Any] = _help(
        "Keyword arguments for the function, e.g. {pattern: '^[0-9]+$'} for regex.", factory=dict)


@dataclass
class GrpoConfig:
    """train.method: grpo — Group Relative Policy Optimization with verifiable rewards."""

    rewards: list[RewardConfig] = _help(
        "Reward functions that score each sampled answer; their weighted sum is the answer's reward. "
        "Each entry is {name, weight (1.0), args ({})}: name is a built-in (" + ", ".join(BUILTIN_REWARDS)
        + ") or 'path/to/file.py:function' (README, 'Rewards'). train.method grpo needs at least one.",
        factory=list)
    prompts_per_step: int = _help(
        "Prompts per optimizer step; each gets `generations` sampled answers, so a step trains on "
        "prompts_per_step × generations answers (TRL sets this through its generation batch size).", 4)
    generations: int = _help(
        "Answers sampled per prompt: the group each answer's reward is compared with (G in the paper). "
        "At least 2; DeepSeekMath samples 64, TRL's num_generations defaults to 8.", 4)
    max_completion_tokens: int = _help(
        "Most tokens sampled per answer; an answer cut here is not finished (the format reward gives "
        "it 0). TRL's max_completion_length defaults to 512.", 64)
    temperature: float = _help(
        "Sampling temperature of the answers; above 0, or every answer of a group is the same and the "
        "group teaches nothing. TRL's default is 1.0.", 0.9)
    top_p: float = _help("Nucleus sampling of the answers, in (0, 1]; 1.0 (TRL's default) keeps every token.", 1.0)
    beta: float = _help(
        "KL coefficient: how strongly the policy is held near the reference (the model as the run "
        "starts: the base with the adapter off, or the model.adapter it continues). 0.0, TRL's default and DAPO's, drops the KL term and the reference "
        "pass with it; DeepSeekMath's GRPO used 0.04.", 0.0)
    epsilon: float = _help(
        "Clip of the policy ratio, low side: the ratio is clipped to [1 - epsilon, 1 + epsilon_high] "
        "(PPO's clip; 0.2 in DeepSeekMath, DAPO and TRL).", 0.2)
    epsilon_high: float | None = _help(
        "Clip of the policy ratio, high side; null: the same as epsilon. DAPO's clip-higher uses 0.28, "
        "so unlikely tokens can still gain probability and the answers stay diverse.", None)
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = _help(
        "How token losses are averaged. 'grpo': over each answer's tokens, then over answers (the "
        "paper; favours short right answers and long wrong ones); 'dr_grpo': summed and divided by a "
        "constant, max_completion_tokens × answers (Dr. GRPO); 'dapo': over all answer tokens of the "
        "step (DAPO's token-level loss; TRL's default).", "dapo")
    updates_per_batch: int = _help(
        "Optimizer steps on each batch of sampled answers (μ in the GRPO paper, TRL's num_iterations, "
        "default 1). Above 1 the clip takes effect: later steps learn from answers of an older policy; "
        "train.save_steps must then be a multiple.", 1)
    scale_rewards: Literal["group", "batch", "none"] = _help(
        "What the advantage (reward minus its group's mean) is divided by. 'group': the group's "
        "standard deviation (GRPO; TRL's default); 'batch': the whole batch's (Lite PPO); 'none': "
        "nothing (Dr. GRPO: the group's std gives too easy and too hard prompts more weight).", "group")
    log_samples_steps: int = _help(
        "Every this many steps (and at the first and the last) the first prompt's sampled answers and "
        "their rewards go to rollouts.jsonl and the report; 0: never.", 10)


def split_user_reward(name: str) -> tuple[str, str] | None:
    """(path, function) of a 'path/to/file.py:function' name; None for a built-in name.

    Split at the last colon so a Windows drive letter ('C:\\r.py:f') stays in the path."""
    if ":" not in name:
        return None
    path, _, function = name.rpartition(":")
    return path, function


def reward_name_problem(name: str) -> str | None:
    """What is wrong with a reward's name, or None: a built-in spelt right, or a .py file and a
    function name. A dotted module name is refused: only the file a user names is ever loaded."""
    user = split_user_reward(name)
    if user is None:
        if name in BUILTIN_REWARDS:
            return None
        if name.endswith(".py"):
            return f"{name!r} names a file but not its function; write it as '{name}:function_name'"
        close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return (f"{name!r} is not a built-in reward; {hint}use one of {', '.join(BUILTIN_REWARDS)} "
                "or 'path/to/file.py:function' for your own")
    path, function = user
    if not path.endswith(".py"):
        return (f"{name!r}: {path!r} is not a .py file; name your reward as 'path/to/file.py:function' "
                "(modules are not imported by dotted name, only the file you name is loaded)")
    if not _IDENTIFIER.fullmatch(function):
        return f"{name!r}: {function!r} is not a Python function name; write it as 'path/to/file.py:function'"
    return None


def check_grpo(cfg, problems: list[str]) -> None:
    """The grpo: section's rules, checked when train.method is grpo (another method ignores it)."""
    g = cfg.grpo
    if not g.rewards:
        problems.append("grpo.rewards: empty; GRPO learns only from rewards, so list at least one, e.g. "
                        "[{name: exact_match}] (built-ins: " + ", ".join(BUILTIN_REWARDS) + ")")
    for i, r in enumerate(g.rewards):
        if (problem := reward_name_problem(r.name)) is not None:
            problems.append(f"grpo.rewards[{i}].name: {problem}")
        if not math.isfinite(r.weight):
            problems.append(f"grpo.rewards[{i}].weight: {r.weight} must be a finite number")
        bad = [k for k in r.args if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            problems.append(f"grpo.rewards[{i}].args: {bad[0]!r} cannot be a keyword argument; "
                            "use names like 'pattern' or 'column'")
    for key in ("prompts_per_step", "max_completion_tokens", "updates_per_batch"):
        if getattr(g, key) < 1:
            problems.append(f"grpo.{key}: {getattr(g, key)} must be at least 1")
    if g.updates_per_batch > 1 and cfg.train.save_steps % g.updates_per_batch:
        problems.append(f"train.save_steps: {cfg.train.save_steps} is not a multiple of grpo.updates_per_batch "
                        f"({g.updates_per_batch}): a checkpoint inside a batch's updates could not resume it "
                        f"(its rollouts are not saved); use a multiple, e.g. "
                        f"{max(g.updates_per_batch, cfg.train.save_steps // g.updates_per_batch * g.updates_per_batch)}")
    if g.log_samples_steps < 0:
        problems.append(f"grpo.log_samples_steps: {g.log_samples_steps} must be 0 (never) or more")
    if g.generations < 2:
        problems.append(f"grpo.generations: {g.generations} must be at least 2: an answer's advantage is "
                        "its reward against the others of its group")
    if g.temperature <= 0:
        problems.append(f"grpo.temperature: {g.temperature} must be above 0 (at 0 every answer of a group "
                        "is the same, and the group teaches nothing)")
    if not 0 < g.top_p <= 1:
        problems.append(f"grpo.top_p: {g.top_p} must be in (0, 1]")
    if g.beta < 0:
        problems.append(f"grpo.beta: {g.beta} must be 0 (no KL term) or more")
    if not 0 < g.epsilon < 1:
        problems.append(f"grpo.epsilon: {g.epsilon} must be in (0, 1): the ratio is clipped at 1 - epsilon")
    if g.epsilon_high is not None and g.epsilon_high <= 0:
        problems.append(f"grpo.epsilon_high: {g.epsilon_high} must be above 0, or null (= epsilon)")
