"""From a `sweep.space` to Optuna's suggestions and back to config values.

Optuna's categorical parameters hold plain scalars; a choice that is a list (a
`lora.target_modules` preset) is stored under its YAML text and mapped back here, so the study's
records read like the config a user writes.
"""

from __future__ import annotations

import itertools
from typing import Any

from lorakit.config.sweep import ALPHA_PER_R, Param, apply
from lorakit.errors import ConfigError, LorakitError

_SCALARS = (type(None), bool, int, float, str)


def shown(value: Any) -> str:
    """A parameter's value in a table or a log line: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def label(value: Any) -> Any:
    """The value Optuna stores for a choice: itself, or a list's YAML flow text."""
    if isinstance(value, _SCALARS):
        return value
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip()


def suggest(trial, params: list[Param]) -> dict[str, Any]:
    """The trial's value of every key (a fixed trial, enqueued or retried, gets its own values)."""
    out: dict[str, Any] = {}
    for p in params:
        if p.choices is not None:
            labels = [label(c) for c in p.choices]
            out[p.key] = p.choices[labels.index(trial.suggest_categorical(p.key, labels))]
        elif p.integer:
            out[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return out


def grid(params: list[Param]) -> dict[str, list]:
    """The grid sampler's search space: every choice, every step of a range (a range needs a step)."""
    out: dict[str, list] = {}
    for p in params:
        if p.choices is not None:
            out[p.key] = [label(c) for c in p.choices]
        elif p.step is None and not p.integer:
            raise LorakitError(f"sweep.sampler grid: sweep.space.{p.key} is a range without a step",
                               where="sweep.space", hint=f"add step: to {p.key}, list its values, or use sampler tpe")
        else:
            step = p.step or 1
            n = int(round((p.high - p.low) / step))
            out[p.key] = [p.low + i * step for i in range(n + 1) if p.low + i * step <= p.high + 1e-12]
    return out


def grid_size(params: list[Param]) -> int:
    return len(list(itertools.product(*grid(params).values())))


def check_values(base: dict[str, Any], params: list[Param], source: str | None) -> None:
    """Every value the space can give (each choice, both ends of a range) put into the config and
    loaded as `lorakit train` would load it: a value the schema refuses is refused before any trial."""
    from lorakit import config as config_mod

    problems: list[str] = []
    for p in params:
        for value in p.ends():
            values = {p.key: value}
            if p.key == ALPHA_PER_R:
                r = base.get("lora", {}).get("r")
                if not isinstance(r, (int, float)) and not any(q.key == "lora.r" for q in params):
                    problems.append(f"sweep.space.{p.key}: lora.r is {r!r}; alpha as a multiple of r needs r set "
                                    "(in the config or the space)")
                    break
            try:
                config_mod.from_dict(apply(base, values))
            except ConfigError as e:
                problems += [f"sweep.space.{p.key} = {value!r}: {msg}" for msg in e.problems]
    if problems:
        raise ConfigError(problems, source)


__all__ = ["check_values", "grid", "grid_size", "label", "shown", "suggest"]
