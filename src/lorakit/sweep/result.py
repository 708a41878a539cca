"""What a sweep leaves for its user, rewritten after every run of `lorakit sweep` (killed or not):
trials.json (every trial), best.yaml (the best trial's complete config, for `lorakit train`),
report.html (history, importances, parallel coordinates, the table) and the table in the terminal.
"""

from __future__ import annotations

from typing import Any, Callable

import yaml

from lorakit import artifacts
from lorakit.config.sweep import apply, objective_direction
from lorakit.metrics import text_columns
from lorakit.sweep import study as St
from lorakit.sweep.space import shown


def trial_rows(study) -> list[dict[str, Any]]:
    """Every trial but the surplus ones, by number: what trials.json, the table and the report show."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        a = t.user_attrs
        if a.get(St.SURPLUS):
            continue
        seconds = a.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        state = "skipped" if a.get(St.SKIPPED) else t.state.name.lower()
        rows.append({"number": t.number, "state": state, "value": t.value,
                     "params": dict(a.get("values", t.params)), "seconds": seconds, "pruned_at": a.get("pruned_at"),
                     "steps": a.get("steps"),
                     "error": a.get("error") or a.get(St.SKIPPED), "interrupted": bool(a.get(St.INTERRUPTED)), "retry_of": a.get(St.RETRY_OF),
                     "run": a.get("run"),
                     "intermediate": sorted((int(k), float(v)) for k, v in t.intermediate_values.items())})
    return rows


def values_of(params, stored: dict[str, Any]) -> dict[str, Any]:
    """The config values of a trial's stored parameters (a list choice is stored as its YAML text)."""
    from lorakit.sweep.space import label

    out = {}
    for p in params:
        if p.key not in stored:
            continue
        if p.choices is not None:
            out[p.key] = next((c for c in p.choices if label(c) == stored[p.key]), stored[p.key])
        else:
            out[p.key] = stored[p.key]
    return out


def best_config(ctx, trial) -> str:
    """best.yaml: the sweep's config with the best trial's values, as `lorakit train` runs it (its
    own run folder beside the sweep's, the sweep section left out)."""
    raw = apply(ctx.base, values_of(ctx.params, trial.params))
    raw.pop("sweep", None)
    raw["output"] = {**raw.get("output", {}), "dir": str(ctx.paths.root.parent), "name": f"{ctx.paths.root.name}-best",
                     "overwrite": False}
    head = (f"# The best trial of sweep {ctx.paths.root} (trial {trial.number}: {ctx.settings.objective} "
            f"{trial.value:.6g}).\n# Train it with: lorakit train {ctx.paths.best}\n")
    return head + yaml.safe_dump(raw, sort_keys=False)


def format_trials(rows: list[dict[str, Any]], objective: str, best: int | None) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = ["trial", "state", objective, *keys, "s"]
    table = [head]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        state = r["state"] + (f" @{r['pruned_at']}" if r["pruned_at"] else "") + (" *" if r["number"] == best else "")
        table.append([str(r["number"]), state, value, *(shown(r["params"].get(k, "-")) for k in keys),
                      "-" if r["seconds"] is None else f"{r['seconds']:.0f}"])
    return "\n".join(text_columns(table))


def publish(ctx, study, log: Callable[[str], None]) -> None:
    """trials.json, best.yaml and report.html of the sweep as it stands, and its table."""
    from lorakit.sweep.report import render

    rows = trial_rows(study)
    artifacts.atomic_write_json(ctx.paths.table, rows)
    best = St.tally(study).best
    if best is not None:
        artifacts.atomic_write_text(ctx.paths.best, best_config(ctx, best))
    importances = importance(study)
    artifacts.atomic_write_text(ctx.paths.report, render(ctx, rows, best, importances))
    if rows:
        log(format_trials(rows, ctx.settings.objective, best.number if best else None))
    if best is not None:
        log(f"best: trial {best.number}, {ctx.settings.objective} {best.value:.4g} "
            f"({objective_direction(ctx.settings)}); config: {ctx.paths.best}")
    log(f"report: {ctx.paths.report}")


def importance(study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA over the completed trials); {} while too few
    trials differ to tell."""
    import optuna

    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


__all__ = ["best_config", "format_trials", "importance", "publish", "trial_rows", "values_of"]
