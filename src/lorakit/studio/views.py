"""The studio's pages as data: a run's sections (report.html's own, drawn by the same functions),
what changes while it trains, its eval answers one by one, and several runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit import artifacts
from lorakit.artifacts import EvalRecord, RunPaths
from lorakit.errors import LorakitError
from lorakit.report.charts import COLORS, Series, line_chart
from lorakit.report.format import esc, num, table, value_text
from lorakit.runs import run_state
from lorakit.studio.read import NotFound, locate, run_json

SECTIONS = ("summary", "charts", "rollouts", "diagnostics", "evals", "data", "config", "merge", "exports")
LIVE = ("summary", "charts", "diagnostics")
"""The sections that change while a run trains: sent again whenever its logs grow."""


def _files(root: Path, ident: str):
    from lorakit.report.read import read_run

    folder = locate(root, ident)
    try:
        return read_run(folder)
    except Exception as e:  # noqa: BLE001 - a folder that is not a run, or one no reader can make sense of
        raise NotFound(f"{ident!r} is not a readable run: {e}") from None


def sections(root: Path, ident: str, names: tuple[str, ...] = SECTIONS) -> dict[str, str]:
    """{section: its report.html HTML}; a section that cannot be drawn says so in its place."""
    from lorakit import report
    from lorakit.report import sections as S

    f = _files(root, ident)
    return {name: report._drawn(getattr(S, f"_{name}"), f) for name in names}


def version(root: Path, ident: str) -> tuple[tuple, tuple]:
    """(what LIVE shows: the logs' sizes, the adapter, the state; what the later stages leave: eval/,
    export/ and merge.json's times). A change of the first redraws LIVE, of the second every section."""
    paths = RunPaths(locate(root, ident))
    sizes = tuple(p.stat().st_size if p.exists() else -1 for p in (paths.metrics, paths.diagnostics))
    stages = tuple(p.stat().st_mtime_ns if p.exists() else -1 for p in (paths.eval_dir, paths.export_dir, paths.merge))
    return sizes + (paths.meta.is_file(), run_state(paths)), stages


def run_page(root: Path, ident: str) -> dict[str, Any]:
    folder = locate(root, ident)
    paths = RunPaths(folder)
    row = run_json(root, folder) or {"id": ident, "name": folder.name, "state": run_state(paths)}
    sets = [p.name.removesuffix(".jsonl") for p in sorted(paths.eval_dir.glob("*.jsonl"))] \
        if paths.eval_dir.is_dir() else []
    ggufs = sorted(p.name for p in paths.export_dir.glob("*.gguf")) if paths.export_dir.is_dir() else []
    return {"run": row, "sections": sections(root, ident), "eval_sets": sets, "ggufs": ggufs}


def plan(root: Path, ident: str) -> dict[str, Any]:
    """What `lorakit plan` says of the run's own config.yaml (without its timing calibration:
    seconds, for the tokenizer, the data and a two-layer probe), and beside it the peak memory the
    training measured once it has finished, so the estimate can be checked against the run."""
    from lorakit import config as config_mod
    from lorakit.plan import format_plan, make_plan

    paths = RunPaths(locate(root, ident))
    if not paths.config.is_file():
        raise NotFound(f"run {ident!r} has no config.yaml to plan", hint="`lorakit train` writes it when it starts")
    measured, kind = None, "process_peak_rss"
    if paths.meta.is_file():
        try:
            metrics = artifacts.read_meta(paths.adapter).metrics
            measured, kind = metrics.get("peak_memory_bytes"), metrics.get("peak_memory_kind", kind)
        except LorakitError:
            pass
    device = "cpu" if kind == "process_peak_rss" else "cuda"
    made = make_plan(config_mod.load(paths.config), device=device, calibrate_steps=0)
    return {"plan": format_plan(made), "device": device, "planned_peak_bytes": made.target.peak,
            "measured_peak_bytes": measured, "measured_kind": kind}


def eval_examples(root: Path, ident: str, name: str) -> dict[str, Any]:
    """Every example of eval set `name`: prompt, reference, each model's answer and scores."""
    from lorakit.studio.read import _PART

    paths = RunPaths(locate(root, ident))
    if not _PART.fullmatch(name) or not paths.eval_records(name).is_file():
        raise NotFound(f"run {ident!r} has no eval set {name!r}", hint="`lorakit eval RUN` writes eval/<set>.jsonl")
    records = [EvalRecord.from_dict(r).to_dict() for r in artifacts.read_jsonl(paths.eval_records(name))]
    return {"run": ident, "set": name, "examples": records}


# --------------------------------------------------------------------------- compare


def compare(root: Path, ids: list[str]) -> dict[str, Any]:
    """Curves overlaid (one colour a run), the config keys whose values differ, and each run's
    eval scores on the sets they share."""
    import yaml

    from lorakit.report.read import _flatten

    if len(ids) < 2:
        raise NotFound("pick at least two runs to compare")
    files = [_files(root, i) for i in ids]
    names = [i.rsplit("/", 1)[-1] for i in ids]

    def curve(records: list[dict], key: str) -> list[tuple[float, Any]]:
        return [(r["step"], r[key]) for r in records if key in r and "step" in r]

    charts = []
    for ident, title, key, label in (("cmp-loss", "Train loss", "loss", "loss"),
                                     ("cmp-eval", "Eval loss", "eval_loss", "loss"),
                                     ("cmp-lr", "Learning rate", "learning_rate", "learning rate")):
        series = [Series(n, curve(f.metrics, key), markers=key.startswith("eval")) for n, f in zip(names, files)]
        if any(s.points for s in series):
            charts.append(line_chart(ident, title, series, label))
    configs = []
    for f in files:
        try:
            configs.append(_flatten(yaml.safe_load(f.paths.config.read_text(encoding="utf-8")) or {}))
        except (OSError, yaml.YAMLError):
            configs.append({})
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1 and not k.startswith("output.")]
    config_rows = [[f"<code>{esc(k)}</code>", *(esc(value_text(c[k])) if k in c else "—" for c in configs)]
                   for k in differ]
    metric_rows = []
    sets = [{s.data: s for s, _ in f.evals} for f in files]
    for name in sorted(set.intersection(*(set(s) for s in sets))) if sets else []:
        metrics = sorted({m for s in sets for m in s[name].scores.get("tuned", {})})
        for m in metrics:
            metric_rows.append([f"{esc(name)}: {esc(m)}", *(num(s[name].scores.get("tuned", {}).get(m)) for s in sets)])
        metric_rows.append([f"{esc(name)}: loss", *(num(s[name].loss.get("tuned")) for s in sets)])
    head = ["", *(f'<span style="color:{COLORS[i % len(COLORS)]}">■</span> {esc(n)}' for i, n in enumerate(names))]
    return {
        "runs": ids,
        "charts": f'<div class="charts">{"".join(charts)}</div>' if charts else '<p class="missing">No curves.</p>',
        "config": table(head, config_rows, cls="config") if config_rows else "<p>The configs are the same.</p>",
        "metrics": table(head, metric_rows, cls="num") if metric_rows else
        '<p class="missing">No eval set scored in every one of these runs.</p>',
    }


__all__ = ["LIVE", "SECTIONS", "compare", "eval_examples", "plan", "run_page", "sections", "version"]
