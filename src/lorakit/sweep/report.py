"""report.html of a sweep: the optimisation history, each trial's reported values (where pruning
cut), Optuna's parameter importances, a parallel-coordinates view and the table of trials.

Drawn like a run's report (lorakit.report: inline CSS and SVG, no script or link), so it opens
offline; every text from the trials goes through `esc`.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from lorakit.config.sweep import objective_direction
from lorakit.report import CSS
from lorakit.report.charts import Series, line_chart
from lorakit.report.format import esc, table
from lorakit.sweep.space import shown

PC_W, PC_H, PC_PAD = 960, 300, 60


def _history(rows: list[dict], minimize: bool) -> str:
    done = [(r["number"], r["value"]) for r in rows if r["state"] == "complete" and r["value"] is not None]
    best, running = [], None
    for n, v in done:
        running = v if running is None else (min(running, v) if minimize else max(running, v))
        best.append((n, running))
    return line_chart("history", "Optimisation history", [Series("trial", done, markers=True),
                                                          Series("best so far", best)], "objective",
                      note="Pruned and failed trials have no final value.", x_label="trial")


def _curves(rows: list[dict], objective: str) -> str:
    series = [Series(f"trial {r['number']}" + (" (pruned)" if r["state"] == "pruned" else ""), r["intermediate"],
                     markers=True) for r in rows if r["intermediate"]][:24]
    return line_chart("curves", "Reported values by step", series, objective,
                      note="Each evaluation a trial reported; a pruned trial's line stops where the pruner cut it.")


def _importances(importances: dict[str, float]) -> str:
    if not importances:
        return '<p class="missing">Not enough completed trials with different values to estimate importances.</p>'
    body = [[esc(k), f'<span style="display:inline-block;background:#4c6ef5;height:10px;width:{200 * v:.0f}px"></span>'
             f" {v:.2f}"] for k, v in sorted(importances.items(), key=lambda kv: -kv[1])]
    return table(["parameter", "importance (fANOVA, sums to 1)"], body)


def _axis_positions(params) -> list[dict[str, Any]]:
    """Per parameter: a function from a trial's stored value to [0, 1], and its tick labels."""
    from lorakit.sweep.space import label

    axes = []
    for p in params:
        if p.choices is not None:
            labels = [label(c) for c in p.choices]
            pos = {lab: (i + 0.5) / len(labels) for i, lab in enumerate(labels)}
            axes.append({"key": p.key, "at": lambda v, pos=pos: pos.get(v),
                         "ticks": [(pos[lab], str(lab)) for lab in labels]})
            continue
        lo, hi = float(p.low), float(p.high)
        f = (lambda x: math.log(x)) if p.log else (lambda x: x)
        span = (f(hi) - f(lo)) or 1.0
        axes.append({"key": p.key, "at": lambda v, lo=lo, f=f, span=span: None if v is None else (f(float(v)) - f(lo)) / span,
                     "ticks": [(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")]})
    return axes


def _parallel(params, rows: list[dict], minimize: bool, objective: str) -> str:
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if not done:
        return '<p class="missing">No completed trial yet.</p>'
    axes = _axis_positions(params)
    values = [r["value"] for r in done]
    lo, hi = min(values), max(values)
    axes.append({"key": objective, "at": lambda v: 0.5 if hi == lo else (v - lo) / (hi - lo),
                 "ticks": [(0.0, f"{lo:.4g}"), (1.0, f"{hi:.4g}")]})
    n = len(axes)
    xs = [PC_PAD + i * (PC_W - 2 * PC_PAD) / max(1, n - 1) for i in range(n)]
    y = lambda u: PC_H - 40 - u * (PC_H - 80)  # noqa: E731
    out = [f'<svg class="plot" viewBox="0 0 {PC_W} {PC_H}" role="img" aria-label="parallel coordinates">']
    for x, ax in zip(xs, axes):
        out.append(f'<line x1="{x:.1f}" y1="{y(0):.1f}" x2="{x:.1f}" y2="{y(1):.1f}" stroke="#8a94a3"/>')
        out.append(f'<text x="{x:.1f}" y="{PC_H - 12}" text-anchor="middle" font-size="12">{esc(ax["key"])}</text>')
        for u, text in ax["ticks"]:
            out.append(f'<text x="{x + 4:.1f}" y="{y(u) + 4:.1f}" font-size="10" fill="#5f6b7a">{esc(text)}</text>')
    for r in sorted(done, key=lambda r: r["value"], reverse=minimize):  # the best drawn last, on top
        share = (r["value"] - lo) / (hi - lo) if hi > lo else 1.0
        good = 1.0 if hi == lo else (1 - share if minimize else share)
        pts = []
        for x, ax in zip(xs, axes[:-1]):
            u = ax["at"](r["params"].get(ax["key"]))
            if u is not None:
                pts.append(f"{x:.1f},{y(u):.1f}")
        pts.append(f"{xs[-1]:.1f},{y(axes[-1]['at'](r['value'])):.1f}")
        shade = int(200 - 170 * good)
        out.append(f'<polyline fill="none" stroke="rgb({shade},{shade},{min(255, shade + 60)})" stroke-width="1.6" '
                   f'points="{" ".join(pts)}"><title>trial {r["number"]}: {r["value"]:.4g}</title></polyline>')
    out.append("</svg>")
    return (f'<figure class="chart" id="parallel"><figcaption><b>Parallel coordinates</b> (completed trials; darker '
            f'is better)</figcaption>{"".join(out)}</figure>')


def _table(rows: list[dict], objective: str, best: int | None) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    body = []
    for r in rows:
        state = r["state"] + (f" at step {r['pruned_at']}" if r["pruned_at"] else "") + \
            (" (interrupted)" if r["interrupted"] else "") + (f" (retry of {r['retry_of']})" if r["retry_of"] is not None else "")
        body.append([esc(r["number"]) + (" ★" if r["number"] == best else ""), esc(state),
                     "-" if r["value"] is None else f"{r['value']:.4g}", *(esc(shown(r["params"].get(k, "-"))) for k in keys),
                     "-" if r["seconds"] is None else f"{r['seconds']:.0f}",
                     esc((r["error"] or "").splitlines()[0] if r["error"] else "")])
    return table(["trial", "state", esc(objective), *map(esc, keys), "seconds", "error"], body)


def render(ctx, rows: list[dict], best, importances: dict[str, float]) -> str:
    s = ctx.settings
    minimize = objective_direction(s) == "minimize"
    counts = {state: sum(r["state"] == state for r in rows) for state in ("complete", "pruned", "skipped", "fail", "running")}
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    best_text = f"best: trial {best.number}, {esc(s.objective)} {best.value:.4g}; " \
        f"train it with <code>lorakit train {esc(ctx.paths.best)}</code>" if best is not None else "no completed trial yet"
    body = "".join([
        f"<header><h1>lorakit sweep: {esc(ctx.paths.root.name)}</h1><p><code>{esc(ctx.paths.root.resolve())}</code>"
        f"</p></header><h2>Summary</h2><p>{esc(s.objective)} ({'minimized' if minimize else 'maximized'}), sampler "
        f"{esc(s.sampler)}, pruner {esc(s.pruner)}: {counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['skipped']} skipped (too big for memory), {counts['fail']} failed, {counts['running']} running. {best_text}.</p>",
        "<h2>History</h2>", _history(rows, minimize), _curves(rows, s.objective),
        "<h2>Parameter importances</h2>", _importances(importances),
        "<h2>Parallel coordinates</h2>", _parallel(ctx.params, rows, minimize, s.objective),
        "<h2>Trials</h2>", _table(rows, s.objective, best.number if best is not None else None),
        f"<footer>Written {esc(made)} by lorakit sweep; each trial's own report is in "
        f"<code>{esc(ctx.paths.trials)}/trial-NNN/report.html</code>.</footer>",
    ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>lorakit sweep: {esc(ctx.paths.root.name)}</title><style>{CSS}</style></head><body>{body}"
            "</body></html>\n")


__all__ = ["render"]
