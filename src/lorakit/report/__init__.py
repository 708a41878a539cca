"""report.html: one page a person reads after a run, on screen or printed.

Everything is inline (CSS in a <style>, plots as hand-written SVG; no script, font, image or link),
so the file opens offline, from an archive or an email attachment, and looks the same years later.
Each section is drawn from one file of the run folder (`artifacts.RunPaths`). A missing or
unreadable file becomes a line saying so, never an error: the report is most wanted for runs
that went wrong (killed, stopped on NaN). Every text from the run (answers, prompts, paths,
messages) goes through `html.escape`; numbers are formatted here, in one place.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from lorakit import artifacts
from lorakit.artifacts import RunPaths
from lorakit.report.charts import Series, envelope, line_chart, nice_ticks
from lorakit.report.format import esc
from lorakit.report.read import RunFiles, read_run
from lorakit.report.sections import (_charts, _config, _data, _diagnostics, _evals, _exports, _merge, _missing,
                                     _rollouts, _summary, pick_samples)

CSS = """
:root { --fg: #1d2330; --dim: #5f6b7a; --line: #d5dbe3; --bg2: #f4f6f9; --good: #2b8a3e; --bad: #c92a2a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       max-width: 1140px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { font-size: 24px; margin: 0 0 2px; }
header p { margin: 0; color: var(--dim); }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
h4 { font-size: 14px; margin: 14px 0 6px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
code { overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
thead th { background: var(--bg2); font-weight: 600; }
table.num td:not(:first-child), table.num th:not(:first-child) { text-align: right;
  font-variant-numeric: tabular-nums; }
table.num.all td { text-align: right; }
table.kv th { background: var(--bg2); font-weight: 600; white-space: nowrap; width: 1%; }
table.kv th .dim { font-weight: 400; }
.sample table.kv th { width: 130px; }
table.config td:first-child { white-space: nowrap; }
table.diag { width: 100%; }
table.diag td:first-child { text-align: right; font-variant-numeric: tabular-nums; width: 1%; }
table.diag td:nth-child(2) { width: 1%; }
pre.msg { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.dim { color: var(--dim); }
.good { color: var(--good); }
.bad { color: var(--bad); }
.missing { color: var(--dim); font-style: italic; }
.status { font-weight: 600; font-size: 15px; margin: 4px 0 8px; }
.kind { display: inline-block; padding: 0 6px; border-radius: 3px; background: var(--bg2);
        border: 1px solid var(--line); font-size: 12px; white-space: nowrap; }
.kind.bad { background: #fff0f0; border-color: #f1b0b0; }
aside#missing { border: 1px solid #e8c468; background: #fff9e6; border-radius: 4px; padding: 8px 14px;
                 margin: 16px 0 0; }
aside#missing ul { margin: 4px 0 0; padding-left: 20px; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 14px 22px; }
figure.chart { margin: 0; break-inside: avoid; }
figcaption { margin-bottom: 2px; }
figcaption .key { margin-left: 14px; color: var(--dim); font-size: 12.5px; white-space: nowrap; }
figcaption .key svg { vertical-align: middle; margin-right: 4px; }
figcaption .key.bad { color: var(--bad); }
svg.plot { width: 100%; height: auto; display: block; }
svg.plot .grid { stroke: #e9edf2; stroke-width: 1; }
svg.plot .frame { fill: none; stroke: #9aa5b1; stroke-width: 1; }
svg.plot .tick { font-size: 11px; fill: var(--dim); }
svg.plot .label { font-size: 12px; fill: var(--fg); }
svg.plot .series { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
svg.plot text.nonfinite { font-size: 13px; fill: var(--bad); font-weight: 700; }
svg.plot line.nonfinite { stroke: var(--bad); stroke-width: 1; stroke-dasharray: 4 3; }
figure .note { margin: 0; color: var(--dim); font-size: 12px; }
.sample { border: 1px solid var(--line); border-radius: 4px; padding: 8px 12px; margin: 0 0 12px;
          break-inside: avoid; }
.sample table.kv { width: 100%; margin-bottom: 2px; }
.turn { margin: 4px 0; }
.turn .role { display: inline-block; min-width: 70px; color: var(--dim); font-size: 12px; text-transform: uppercase; }
.turn pre { display: inline; }
ul.rows { margin: 2px 0 8px; }
p.sub { margin: 6px 0 0; font-weight: 600; }
footer { margin-top: 36px; color: var(--dim); font-size: 12px; border-top: 1px solid var(--line); padding-top: 6px; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  h2 { break-after: avoid; }
  table, .sample, figure.chart { break-inside: avoid; }
}
@media (max-width: 760px) { .charts { grid-template-columns: 1fr; } }
"""


SECTION_TITLES = {"_missing": "Missing files", "_summary": "Summary", "_charts": "Training curves", "_rollouts": "Sampled answers",
                  "_diagnostics": "Diagnostics", "_evals": "Evaluation", "_data": "Data", "_config": "Configuration",
                  "_merge": "Merge parity check", "_exports": "GGUF exports"}


def _drawn(section, f: RunFiles) -> str:
    """One section's HTML; a file this lorakit cannot make sense of costs that section, not the report."""
    try:
        return section(f)
    except Exception as e:  # noqa: BLE001 - malformed run files come in every shape
        title = SECTION_TITLES.get(section.__name__, section.__name__.strip("_"))
        return (f'<section class="failed"><h2>{esc(title)}</h2><p class="missing">This section could not be drawn '
                f'({esc(type(e).__name__)}: {esc(e)}); the other sections are complete.</p></section>')


def render_report(run: str | Path) -> str:
    """The whole report.html for `run` (a run folder or its adapter folder) as a string."""
    f = read_run(run)
    name = f.paths.root.resolve().name
    versions = f.meta.versions if f.meta else {}
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    by = "lorakit " + versions.get("lorakit", "") if versions else "lorakit"
    libs = ", ".join(f"{esc(k)} {esc(v)}" for k, v in versions.items() if k != "lorakit")
    sections = [_missing, _summary, _charts, _rollouts, _diagnostics, _evals, _data, _config, _merge, _exports]
    body = "".join([
        f'<header><h1>lorakit run: {esc(name)}</h1><p><code>{esc(f.paths.root.resolve())}</code></p></header>',
        *(_drawn(section, f) for section in sections),
        f"<footer>Written {esc(made)} by {esc(by)}{' (' + libs + ')' if libs else ''}. Regenerate with "
        f"<code>lorakit report {esc(f.paths.root)}</code>.</footer>",
    ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>lorakit report: {esc(name)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Render the report and write it atomically to `out` (default: the run's report.html)."""
    text = render_report(run)
    target = Path(out) if out is not None else RunPaths.of(run).report
    target.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_text(target, text)
    return target


__all__ = ["RunFiles", "Series", "line_chart", "nice_ticks", "pick_samples", "read_run", "render_report",
           "write_report"]


__all__ = ["RunFiles", "Series", "envelope", "line_chart", "nice_ticks", "pick_samples", "read_run", "render_report",
           "write_report"]
