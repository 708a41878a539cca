"""The `sweep:` section: what `lorakit sweep` searches, by which measure, for how long.

The search space names ordinary config keys, so a space is checked against the same schema a
config is: an unknown key gets the schema's did-you-mean, and every value a range or a list can
produce (its ends, each choice) is put into the config and loaded, so a value `lorakit train`
would refuse is refused here, before any trial starts. The search itself is Optuna's
(lorakit.sweep); this module only says what the user asked for.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

from lorakit.config.declare import _help

EVAL_METRICS = ("eval_loss", "exact_match", "exact_match_strict", "rouge_l", "bleu", "json_field_accuracy",
                "json_valid", "reward")
"""What an evaluation during training measures, and so what a sweep's trial or train.best_by can be
judged by: the validation loss, or a score of greedy answers to validation rows (the eval stage's
scorers, through training's generation probe, train.eval_generate_rows), or `reward`: the mean
weighted sum of the config's grpo.rewards over those answers (lorakit.rewards; any train.method)."""


def lower_is_better(metric: str) -> bool:
    return metric == "eval_loss"


def logged_as(metric: str) -> str:
    """The metrics.jsonl key of an EVAL_METRICS name."""
    return metric if metric == "eval_loss" else f"eval_{metric}"

ALPHA_PER_R = "lora.alpha_per_r"
"""A space-only key: lora.alpha as a multiple of lora.r (alpha = value × r), the way the guide
states alpha ("alpha = 2 × r")."""

_NOT_SEARCHED = ("output.", "sweep.", "generate.", "chat.", "eval.", "pairs.", "merge.", "export.", "serve.")


@dataclass
class SweepConfig:
    """`lorakit sweep`: a search over config keys, judged on the validation split."""

    space: dict = _help(
        "The keys to search and their values: `train.lr: {low: 1e-5, high: 1e-3, log: true}` (a range; "
        "integers for an integer key, `step` optional), `lora.r: [8, 16, 32]` (choices, any value the key "
        "takes, lists too), and `lora.alpha_per_r: [1, 2]` for alpha as a multiple of r.", factory=dict)
    objective: Literal[EVAL_METRICS] = _help(  # type: ignore[valid-type]
        "What a trial is judged by: 'eval_loss', or a score of greedy answers to sweep.eval_rows validation "
        "rows ('exact_match', 'json_field_accuracy', 'rouge_l', ... as `lorakit eval` scores them), or "
        "'reward': those answers scored by the config's grpo.rewards (mean weighted sum; any train.method, "
        "and the only measure of a GRPO trial).", "eval_loss")
    direction: Literal["auto", "minimize", "maximize"] = _help(
        "'auto': minimize eval_loss, maximize the scores.", "auto")
    trials: int = _help("Trials to finish (completed or pruned); failed ones do not count.", 20)
    time: str | None = _help(
        "Wall-clock budget of one `lorakit sweep` command: '45m', '2h', '90s'. No trial starts after it; "
        "the one running finishes. null: no limit.", None)
    target: float | None = _help(
        "Stop as soon as a trial's objective reaches this value (the guide's 'meets the quality bar'). "
        "null: run every trial.", None)
    sampler: Literal["tpe", "random", "grid"] = _help(
        "Optuna's sampler: 'tpe' (learns from finished trials), 'random', or 'grid' (every combination "
        "of choices; ranges need a step).", "tpe")
    pruner: Literal["median", "asha", "none"] = _help(
        "Stop weak trials early at their evaluations: 'median' (worse than the median of earlier trials at "
        "the same step), 'asha' (successive halving), 'none'.", "median")
    reports: int = _help(
        "Evaluations per trial, evenly spaced: the points where a trial reports its objective and may "
        "be pruned (the last one is its result).", 4)
    eval_rows: int = _help(
        "Validation rows answered at each evaluation when the objective is a score (ignored for eval_loss).",
        50)
    seed: int = _help("Seed of the sampler (each trial trains with train.seed).", 0)
    workers: int = _help(
        "Worker processes on this machine; the CPU cores are split between them (threads per worker = "
        "cores / workers), so they never oversubscribe the machine.", 1)
    storage: str | None = _help(
        "Where the study lives: null is runs/<name>/study.db (SQLite). An Optuna storage URL "
        "(postgresql://..., mysql://...) or a journal file on a shared disk (journal:/shared/study.log) "
        "lets workers on several machines join the same study.", None)
    retries: int = _help("Times a trial killed mid-run (the sweep was stopped or its worker died) is run again.",
                         1)
    memory_gb: float | None = _help(
        "Memory one trial may take, in GB: a trial that `lorakit plan` says needs more is skipped before it "
        "starts, with the reason recorded. null: what plan reads here (the available RAM; on a GPU its "
        "memory divided among sweep.workers).", None)


def objective_direction(s: SweepConfig) -> str:
    """'minimize' or 'maximize': what `direction: auto` means for the objective."""
    if s.direction != "auto":
        return s.direction
    return "minimize" if lower_is_better(s.objective) else "maximize"


def parse_time(text: str | None) -> float | None:
    """Seconds of a budget like '45m', '2h', '1h30m', '90s' or '90' (minutes); None for no limit."""
    if text is None or str(text).strip() == "":
        return None
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t) * 60
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != t.replace(" ", ""):
        raise ValueError(text)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@dataclass(frozen=True)
class Param:
    """One searched key: `choices`, or a range [low, high] (`log`, `step`), `integer` by the key's type."""

    key: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def ends(self) -> list[Any]:
        """The values to check against the schema: each choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def _field_type(key: str):
    """The annotated type of a config key 'section.name', or None when the schema has no such key."""
    from lorakit.config import Config

    section, _, name = key.partition(".")
    cls = typing.get_type_hints(Config).get(section)
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    return typing.get_type_hints(cls).get(name)


def schema_keys() -> list[str]:
    """Every dotted key of the schema a space may name (the did-you-mean's vocabulary)."""
    from lorakit.config import Config

    out = []
    for section, tp in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(tp):
            out += [f"{section}.{f.name}" for f in dataclasses.fields(tp)]
    return out + [ALPHA_PER_R]


def _numeric_kind(tp) -> str | None:
    """'int' / 'float' for a key a range can set (its number type, 'auto' allowed beside it)."""
    import types

    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if int in options:
        return "int"
    if float in options:
        return "float"
    return None


def parse_space(raw: Any, problems: list[str]) -> list[Param]:
    """The space as Params; every problem (unknown key, bad range, empty choices) appended."""
    import difflib

    if not isinstance(raw, dict):
        problems.append(f"sweep.space: expected a mapping of config keys to ranges or choices, got {raw!r}")
        return []
    params = []
    valid = schema_keys()
    for key, spec in raw.items():
        where = f"sweep.space.{key}"
        key = str(key)
        if key.startswith(_NOT_SEARCHED):
            problems.append(f"{where}: {key.split('.')[0]}.* is not searched (a sweep trains and scores trials; "
                            "its output folders are the sweep's own)")
            continue
        tp = _field_type(key) if key != ALPHA_PER_R else float
        if tp is None:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{where}: '{key}' is not a config key{hint}; `lorakit config` lists them")
            continue
        if isinstance(spec, list):
            if not spec:
                problems.append(f"{where}: the list of choices is empty; give at least one value")
                continue
            params.append(Param(key, choices=tuple(spec)))
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log", "step"}:
            problems.append(f"{where}: expected a list of choices or {{low: A, high: B}} (with log: true and step: S "
                            f"allowed), got {spec!r}")
            continue
        kind = _numeric_kind(tp)
        if kind is None:
            problems.append(f"{where}: {key} is not a number, so it takes a list of choices, not a range")
            continue
        try:
            low, high = float(spec["low"]), float(spec["high"])
            step = None if spec.get("step") is None else float(spec["step"])
        except (TypeError, ValueError):
            problems.append(f"{where}: low, high and step must be numbers, got {spec!r}")
            continue
        log = bool(spec.get("log", False))
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            problems.append(f"{where}: the range [{spec['low']}, {spec['high']}] is empty; low must be below high")
            continue
        if log and low <= 0:
            problems.append(f"{where}: a log range must start above 0, got low {spec['low']}")
            continue
        if log and step is not None:
            problems.append(f"{where}: a range takes log or step, not both (Optuna's rule)")
            continue
        if step is not None and step <= 0:
            problems.append(f"{where}: step {spec['step']} must be positive")
            continue
        integer = kind == "int"
        if integer and (low != int(low) or high != int(high) or (step is not None and step != int(step))):
            problems.append(f"{where}: {key} is an integer key; low, high and step must be whole numbers")
            continue
        params.append(Param(key, low=int(low) if integer else low, high=int(high) if integer else high, log=log,
                            step=(int(step) if integer else step) if step is not None else None, integer=integer))
    if any(p.key == ALPHA_PER_R for p in params) and any(p.key == "lora.alpha" for p in params):
        problems.append("sweep.space: lora.alpha and lora.alpha_per_r both set alpha; keep one")
    return params


def apply(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`raw` (a config as nested mappings) with each dotted key of `values` set; alpha_per_r last,
    times the r the config ends up with (a number: 'auto' is refused when the space is checked)."""
    import copy

    out = copy.deepcopy(raw)
    for key, value in values.items():
        if key == ALPHA_PER_R:
            continue
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    if ALPHA_PER_R in values:
        r = out.get("lora", {}).get("r", 16)
        out.setdefault("lora", {})["alpha"] = values[ALPHA_PER_R] * r if isinstance(r, (int, float)) else r
    return out


def check_objective(s: SweepConfig, method: str, rewards: list, problems: list[str]) -> None:
    """The objective is one the trials will report: a reward needs rewards to score with, and a GRPO
    trial has no validation loss (its evaluations are greedy answers)."""
    if s.objective == "reward" and not rewards:
        problems.append("sweep.objective: 'reward' scores answers with grpo.rewards, and there are none; list "
                        "them (e.g. grpo: {rewards: [{name: exact_match}]}) or choose another objective")
    if method == "grpo" and s.objective == "eval_loss":
        problems.append("sweep.objective: a GRPO trial has no validation loss; judge it by 'reward' (its "
                        "grpo.rewards on greedy answers) or by a score such as 'exact_match'")


def check_sweep(s: SweepConfig, problems: list[str]) -> None:
    """The section's own ranges and its space's shape (values against the schema: `check_space_values`)."""
    parse_space(s.space, problems)
    for key in ("trials", "reports", "workers"):
        if getattr(s, key) < 1:
            problems.append(f"sweep.{key}: {getattr(s, key)} must be at least 1")
    if s.eval_rows < 1:
        problems.append(f"sweep.eval_rows: {s.eval_rows} must be at least 1")
    if s.memory_gb is not None and s.memory_gb <= 0:
        problems.append(f"sweep.memory_gb: {s.memory_gb} must be positive, or null for this machine's memory")
    if s.retries < 0:
        problems.append(f"sweep.retries: {s.retries} must be 0 or more")
    try:
        parse_time(s.time)
    except ValueError:
        problems.append(f"sweep.time: {s.time!r} is not a duration; write it as '45m', '2h', '1h30m' or '90s'")


__all__ = ["ALPHA_PER_R", "EVAL_METRICS", "Param", "SweepConfig", "apply", "check_objective", "check_sweep", "logged_as",
           "lower_is_better", "objective_direction", "parse_space", "parse_time", "schema_keys"]
