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
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lorakit import artifacts
from lorakit.artifacts import AdapterMeta, Diagnostic, EvalRecord, EvalSummary, RunPaths
from lorakit.metrics import LABELS, PERCENT, fmt_value, table_rows
from lorakit.errors import LorakitError

SAMPLES = 3  # sample answers shown per eval dataset
LISTED_ROWS = 5  # dropped / truncated rows named one by one
ERROR_KINDS = {"nonfinite", "oom", "nan"}  # diagnostics that ended the run, drawn in red


# --------------------------------------------------------------------------- reading the run folder


@dataclass
class RunFiles:
    """What the run folder holds; each part None (or empty) when its file is missing or unreadable,
    with the reason in `missing` ({file: what its absence means})."""

    paths: RunPaths
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: Any = None  # lorakit.config.Config
    config_diff: list[tuple[str, Any, Any]] = field(default_factory=list)  # (dotted key, default, value)
    meta: AdapterMeta | None = None
    data: dict[str, Any] | None = None
    diagnostics: list[Diagnostic] | None = None
    evals: list[tuple[EvalSummary, list[EvalRecord] | None]] = field(default_factory=list)
    merge: dict[str, Any] | None = None
    exports: list[dict[str, Any]] = field(default_factory=list)  # export/*.verify.json
    missing: dict[str, str] = field(default_factory=dict)


def read_run(run: str | Path) -> RunFiles:
    """Read every file the report draws from. Refuses only a folder that is not a run at all."""
    paths = RunPaths.of(run)
    root = paths.root
    if not root.is_dir():
        raise LorakitError(f"no such folder: {root}",
                           hint="pass a run folder (runs/<name>) written by `lorakit train`")
    if not paths.adapter.is_dir() and not paths.metrics.is_file():
        raise LorakitError(f"{root} is not a run folder: it holds neither adapter/ nor metrics.jsonl",
                           where=str(root), hint="pass runs/<name> of a `lorakit train` run")
    f = RunFiles(paths)
    f.metrics = artifacts.read_jsonl(paths.metrics)
    if not paths.metrics.is_file():
        f.missing[paths.label(paths.metrics)] = "no training log, so no curves"
    _read_config(f)
    if paths.adapter.is_dir():
        try:
            f.meta = artifacts.read_meta(paths.adapter)
        except LorakitError as e:
            f.missing[paths.label(paths.meta)] = f"unreadable ({e.message})"
    else:
        f.missing[paths.label(paths.adapter)] = "no trained adapter: the run did not finish (killed, failed or stopped on NaN)"
    f.data = _read_json(paths.data, paths.label(paths.data), "no data statistics", f.missing)
    if paths.diagnostics.is_file():
        try:
            f.diagnostics = artifacts.read_diagnostics(paths)
        except (AttributeError, TypeError) as e:  # a line that is not an object
            f.missing[paths.label(paths.diagnostics)] = f"unreadable ({e})"
    else:
        f.missing[paths.label(paths.diagnostics)] = "the run's warnings were not recorded"
    _read_evals(f)
    if paths.merge.is_file():
        f.merge = _read_json(paths.merge, paths.label(paths.merge), "unreadable", f.missing)
    for p in paths.verifications():
        v = _read_json(p, paths.label(p), "unreadable", f.missing)
        if v is not None:
            f.exports.append(v)
    return f


def _read_json(path: Path, name: str, absent: str, missing: dict[str, str]) -> dict[str, Any] | None:
    if not path.is_file():
        missing[name] = absent
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        missing[name] = f"unreadable ({e})"
        return None
    if not isinstance(raw, dict):
        missing[name] = f"unreadable (a JSON {type(raw).__name__}, not an object)"
        return None
    return raw


def _read_config(f: RunFiles) -> None:
    from lorakit import config as config_mod

    if not f.paths.config.is_file():
        f.missing[f.paths.label(f.paths.config)] = "the run's settings are unknown"
        return
    try:
        f.config = config_mod.load(f.paths.config)
    except LorakitError as e:
        f.missing[f.paths.label(f.paths.config)] = f"unreadable ({e.message})"
        return
    defaults = _flatten(config_mod.Config().to_dict())
    for key, value in _flatten(f.config.to_dict()).items():
        if key not in defaults or defaults[key] != value:
            f.config_diff.append((key, defaults.get(key), value))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_evals(f: RunFiles) -> None:
    label = f.paths.label
    if not f.paths.eval_dir.is_dir():
        f.missing[label(f.paths.eval_dir)] = "not evaluated yet: `lorakit eval RUN` writes it and this report shows base vs tuned"
        return
    summaries = []
    for p in f.paths.eval_summary_files():
        try:
            summaries.append(EvalSummary.read(p))
        except LorakitError as e:
            f.missing[label(p)] = f"unreadable ({e.message})"
    for s in sorted(summaries, key=lambda s: s.created):
        path = f.paths.eval_records(s.data)
        try:
            records = [EvalRecord.from_dict(r) for r in artifacts.read_jsonl(path)] if path.is_file() else None
        except (KeyError, TypeError, ValueError) as e:
            f.missing[label(path)] = f"unreadable ({e!r})"
            records = None
        if records is None and label(path) not in f.missing:
            f.missing[label(path)] = "no per-example answers, so no samples"
        f.evals.append((s, records))


# --------------------------------------------------------------------------- formatting


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def prose(text: str) -> str:
    """lorakit's own sentences: escaped, with `command` spans set as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def num(v: Any, digits: int = 4) -> str:
    """A number as a person reads it: thousands separated, `digits` significant figures."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return esc(v)
    if not math.isfinite(v):
        return "NaN" if v != v else ("∞" if v > 0 else "−∞")
    if isinstance(v, int) or (abs(v) >= 1000 and float(v).is_integer()):
        return f"{int(v):,}"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def duration(seconds: Any) -> str:
    if not finite(seconds):
        return "—"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def size(n: Any) -> str:
    if not finite(n):
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def value_text(v: Any) -> str:
    """A config value as YAML would spell it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def table(head: list[str], rows: Iterable[list[str]], cls: str = "", ident: str = "") -> str:
    """Cells are HTML already (escaped by the caller); numeric columns are right-aligned by CSS."""
    attrs = (f' class="{cls}"' if cls else "") + (f' id="{ident}"' if ident else "")
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{attrs}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def kv_table(rows: list[tuple[str, str]], ident: str = "") -> str:
    ident_attr = f' id="{ident}"' if ident else ""
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"{ident_attr}><tbody>{body}</tbody></table>'


# --------------------------------------------------------------------------- SVG line charts

COLORS = ["#1f6fb4", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c"]
W, H = 560, 250  # viewBox; the CSS scales it to the column
LEFT, RIGHT, TOP, BOTTOM = 62, 24, 12, 40  # RIGHT: room for half of a '20,000' tick label


@dataclass
class Series:
    name: str
    points: list[tuple[float, Any]]  # (step, value); non-finite values are marked, not drawn
    markers: bool = False  # a circle at each point (sparse series such as eval loss)


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten (2.5 would need
    one more decimal in every label)."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * 0.999)
    if integer:
        step = max(1.0, round(step))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def tick_labels(ticks: list[float]) -> list[str]:
    """One style per axis: as many decimals as the tick step needs (0.2 steps: one, 0.05: two),
    small steps (learning rates) as 5e-5, large axes (tokens/s on a GPU) in k or M."""
    step = ticks[1] - ticks[0]
    top = max(abs(t) for t in ticks)
    out = []
    for v in ticks:
        if abs(v) < step * 1e-6:
            out.append("0")
        elif step < 1e-3:
            mantissa, exponent = f"{v:.3e}".split("e")
            out.append(f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}")
        elif top >= 1e6:
            out.append(f"{v / 1e6:.4g}M")
        elif top >= 1e5:
            out.append(f"{v / 1e3:.4g}k")
        else:
            e = math.floor(math.log10(step) + 1e-9)
            out.append(f"{v:,.{max(0, -e)}f}")
    return out


def envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Long runs drawn at screen resolution: within each pixel column keep only the lowest and
    highest point (in step order), so the line looks the same and a 100k-step run stays a small file."""
    if len(points) <= 2 * W:
        return points
    columns: dict[int, list[tuple[float, float]]] = {}
    for p in points:  # x grows with the step, so columns fill in order
        columns.setdefault(round(p[0]), []).append(p)
    out: list[tuple[float, float]] = []
    for column in columns.values():
        lo, hi = min(column, key=lambda q: q[1]), max(column, key=lambda q: q[1])
        out.extend(sorted({lo, hi}, key=column.index))
    return out


def line_chart(ident: str, title: str, series: list[Series], y_label: str, *, note: str = "",
               log_y: bool | None = None) -> str:
    """A <figure> with an inline SVG line chart: axes, ticks, grid, labels and an HTML legend.

    Points whose value is None/NaN/inf break the line and get a red cross on the top edge (a NaN
    loss must show); a series with one point is a dot. `log_y` None: log scale when every value is
    positive and they span more than two decades (gradient norms)."""
    good = [(x, float(y)) for s in series for x, y in s.points if finite(y) and finite(x)]
    bad = sorted({x for s in series for x, y in s.points if finite(x) and not finite(y)})
    legend = "" if len(series) == 1 else "".join(
        f'<span class="key"><svg width="22" height="10" aria-hidden="true"><line x1="1" y1="5" x2="21" y2="5" '
        f'stroke="{COLORS[i % len(COLORS)]}" stroke-width="2.5"/>'
        + (f'<circle cx="11" cy="5" r="3" fill="{COLORS[i % len(COLORS)]}"/>' if s.markers else "")
        + f"</svg>{esc(s.name)}</span>" for i, s in enumerate(series))
    if bad:
        legend += f'<span class="key bad">✕ not finite at step {esc(", ".join(num(x) for x in bad[:5]))}' \
                  f'{" …" if len(bad) > 5 else ""}</span>'
    caption = f'<figcaption><b>{esc(title)}</b>{legend}</figcaption>'
    if not good and not bad:
        return f'<figure class="chart empty" id="{esc(ident)}">{caption}<p class="missing">not recorded</p></figure>'
    xs = [x for x, _ in good] + bad
    ys = [y for _, y in good]
    if log_y is None:
        log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 100
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xt = nice_ticks(min(xs), max(xs), 6, integer=all(float(x).is_integer() for x in xs))
    if ys:
        lo_y, hi_y = ty(min(ys)), ty(max(ys))
        yt = list(range(math.floor(lo_y), math.ceil(hi_y) + 1)) if log_y else nice_ticks(lo_y, hi_y, 5)
        if not log_y:  # one more tick where a line would run along the frame (never below 0 for >= 0 data)
            step, pad = yt[1] - yt[0], (yt[-1] - yt[0]) * 0.03
            if yt[-1] - hi_y < pad:
                yt.append(yt[-1] + step)
            if lo_y - yt[0] < pad and not (lo_y >= 0 and abs(yt[0]) < step * 1e-6):
                yt.insert(0, yt[0] - step)
        if log_y and len(yt) < 2:
            yt = [yt[0], yt[0] + 1]
    else:
        yt = [0.0, 1.0]
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + ph - (ty(y) - y0) / (y1 - y0) * ph

    out = [f'<svg class="plot" viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">']
    y_labels = [f"1e{int(v)}" if not 0 <= v <= 3 else f"{10 ** v:g}" for v in yt] if log_y else tick_labels(yt)
    for v, label in zip(yt, y_labels):
        y = TOP + ph - (v - y0) / (y1 - y0) * ph
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{LEFT - 6}" y="{y + 3.5:.1f}" text-anchor="end">{esc(label)}</text>')
    for v, label in zip(xt, tick_labels(xt)):
        x = px(v)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}"/>'
                   f'<text class="tick" x="{x:.1f}" y="{TOP + ph + 15}" text-anchor="middle">'
                   f'{esc(label)}</text>')
    out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/>')
    out.append(f'<text class="label" x="{LEFT + pw / 2:.1f}" y="{H - 6}" text-anchor="middle">step</text>')
    out.append(f'<text class="label" transform="translate(14 {TOP + ph / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{esc(y_label + (" (log scale)" if log_y else ""))}</text>')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in s.points:
            if finite(x) and finite(y):
                runs[-1].append((px(x), py(float(y))))
            elif runs[-1]:
                runs.append([])
        name = esc(s.name)
        for run in runs:
            if len(run) > 1:
                pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in envelope(run))
                out.append(f'<polyline class="series" data-series="{name}" points="{pts}" stroke="{color}"/>')
            if s.markers or len(run) == 1:
                out.extend(f'<circle class="point" data-series="{name}" cx="{x:.1f}" cy="{y:.1f}" r="3" '
                           f'fill="{color}"/>' for x, y in run)
    for x in bad:
        cx = px(x)
        out.append(f'<line class="nonfinite" x1="{cx:.1f}" y1="{TOP}" x2="{cx:.1f}" y2="{TOP + ph}"/>')
        out.append(f'<text class="nonfinite" x="{cx:.1f}" y="{TOP + 11}" text-anchor="middle">✕'
                   f'<title>not finite at step {esc(num(x))}</title></text>')
    out.append("</svg>")
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<figure class="chart" id="{esc(ident)}">{caption}{"".join(out)}{note_html}</figure>'


# --------------------------------------------------------------------------- sections


def _train_records(f: RunFiles) -> list[dict[str, Any]]:
    return [r for r in f.metrics if "loss" in r and "step" in r]


def _eval_records(f: RunFiles) -> list[dict[str, Any]]:
    return [r for r in f.metrics if "eval_loss" in r and "step" in r]


def _final_record(f: RunFiles) -> dict[str, Any]:
    return next((r for r in reversed(f.metrics) if "train_runtime" in r), {})


def _status(f: RunFiles) -> tuple[str, str]:
    """(css class, sentence): how the run ended, as far as the folder tells."""
    stopped = [d for d in f.diagnostics or [] if d.kind in ERROR_KINDS]
    if stopped:
        d = stopped[-1]
        at = f" at step {d.step}" if d.step is not None else ""
        return "bad", f"stopped{at}: {(d.message.splitlines() or [d.kind])[0]}"
    if f.meta is not None:
        return "good", "finished: adapter saved"
    if (f.paths.adapter / artifacts.PEFT_CONFIG).is_file():
        return "good", "finished: adapter saved (its lorakit.json is unreadable)"
    last = max((r["step"] for r in f.metrics if finite(r.get("step"))), default=None)
    return "bad", "not finished: no adapter" + (f" (last log at step {last})" if last is not None else "")


def _summary(f: RunFiles) -> str:
    m = f.meta.metrics if f.meta else {}
    train, evals, final = _train_records(f), _eval_records(f), _final_record(f)
    steps = m.get("steps", max((r["step"] for r in f.metrics if finite(r.get("step"))), default=None))
    cfg_steps = f.config.train.max_steps if f.config is not None and f.config.train.max_steps > 0 else None
    eval_start = m.get("eval_loss_start", evals[0]["eval_loss"] if evals else None)
    eval_end = m.get("eval_loss", evals[-1]["eval_loss"] if evals else None)
    eval_text = "—"
    if eval_start is not None or eval_end is not None:
        eval_text = f"{num(eval_start)} → {num(eval_end)}"
        if finite(eval_start) and finite(eval_end) and eval_start:
            eval_text += f" ({(eval_end - eval_start) / eval_start:+.1%})"
    tokens = m.get("trained_tokens", train[-1].get("trained_tokens") if train else None)
    tps = m.get("trained_tokens_per_s", train[-1].get("trained_tokens_per_s") if train else None)
    seconds = m.get("train_seconds", final.get("train_runtime"))
    kind = {"cuda_max_allocated": "GPU, CUDA allocator peak",
            "process_peak_rss": "CPU, process peak resident memory"}.get(m.get("peak_memory_kind"),
                                                                            m.get("peak_memory_kind"))
    peak = size(m.get("peak_memory_bytes")) + (f" ({esc(kind)})" if kind and "peak_memory_bytes" in m else "")
    rows = [
        ("steps", num(steps) + (f" of {num(cfg_steps)}" if cfg_steps and cfg_steps != steps else "")),
        ("epochs", num(m.get("epochs", train[-1].get("epoch") if train else None))),
        ("train loss (last log)", num(m.get("train_loss_last", train[-1].get("loss") if train else None))),
        ("eval loss (start → end)", eval_text),
        ("trained tokens", num(tokens) + (f" ({num(tps)} per second)" if tps is not None else "")),
        ("training time", duration(seconds)),
        ("peak memory", peak),
    ]
    if f.meta:
        b = f.meta.base
        base = f"{esc(b.name)}"
        if b.path != b.name:
            base += f' <span class="dim">({esc(b.path)})</span>'
        base += f' <span class="dim">{esc(b.dtype)}, quantization {esc(b.quantization)}' + \
                (f", sha256 {esc(b.sha256[:12])}…" if b.sha256 else "") + "</span>"
        rows.insert(0, ("base model", base))
        rows.insert(1, ("template", esc(f.meta.template.name)))
    elif f.config is not None:
        rows.insert(0, ("base model", esc(f.config.model.name)))
        rows.insert(1, ("template", esc((f.data or {}).get("template", f.config.data.template))))
    cls, sentence = _status(f)
    return (f'<section id="summary"><h2>Summary</h2><p class="status {cls}">{esc(sentence)}</p>'
            f'{kv_table([(esc(k), v) for k, v in rows], "summary-table")}</section>')


EVAL_LOG_SKIP = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def _charts(f: RunFiles) -> str:
    if not f.metrics:
        return '<section id="charts"><h2>Training curves</h2><p class="missing">metrics.jsonl is missing or empty: ' \
               'nothing was logged.</p></section>'
    train, evals = _train_records(f), _eval_records(f)

    def pts(records, key):
        return [(r["step"], r.get(key)) for r in records if key in r]

    charts = [
        line_chart("chart-loss", "Loss", [Series("train loss", pts(train, "loss")),
                                          Series("eval loss", pts(evals, "eval_loss"), markers=True)], "loss",
                   note="Token-weighted mean over the positions with a label."),
        line_chart("chart-lr", "Learning rate", [Series("learning rate", pts(train, "learning_rate"))],
                   "learning rate"),
        line_chart("chart-grad", "Gradient norm", [Series("gradient norm", pts(train, "grad_norm"))], "norm",
                   note="Before clipping (train.max_grad_norm)."),
        line_chart("chart-speed", "Tokens per second",
                   [Series("trained tokens/s", pts(train, "trained_tokens_per_s")),
                    Series("real tokens/s", pts(train, "real_tokens_per_s"))], "tokens/s",
                   note="Running average since training began. Trained: tokens in the loss; real: every "
                        "non-padding token through the model."),
    ]
    extra = sorted({k for r in evals for k, v in r.items() if k.startswith("eval_") and k not in EVAL_LOG_SKIP
                    and (finite(v) or v is None)})
    if extra:
        charts.append(line_chart("chart-eval-metrics", "Eval metrics",
                                 [Series(k.removeprefix("eval_"), pts(evals, k), markers=True) for k in extra],
                                 "score"))
    return f'<section id="charts"><h2>Training curves</h2><div class="charts">{"".join(charts)}</div></section>'


def _config(f: RunFiles) -> str:
    head = "<h2>Configuration</h2>"
    if f.config is None:
        name = f.paths.label(f.paths.config)
        return f'<section id="config">{head}<p class="missing">{esc(name)}: {esc(f.missing.get(name, ""))}</p></section>'
    if not f.config_diff:
        return f'<section id="config">{head}<p>Every setting is at its default.</p></section>'
    rows = [[f"<code>{esc(k)}</code>", f'<code class="dim">{esc(value_text(d))}</code>',
             f"<code>{esc(value_text(v))}</code>"] for k, d, v in f.config_diff]
    return (f'<section id="config">{head}<p>Settings that differ from the defaults, after every <code>auto</code> '
            f'was resolved (the full config is <code>config.yaml</code>).</p>'
            f'{table(["key", "default", "this run"], rows, "config", "config-diff")}</section>')


def _data(f: RunFiles) -> str:
    head = "<h2>Data</h2>"
    d = f.data
    if d is None:
        counts = ""
        if f.meta:
            counts = (f"<p>{num(f.meta.data.train_examples)} train / {num(f.meta.data.validation_examples)} "
                      f"validation examples (from lorakit.json).</p>")
        name = f.paths.label(f.paths.data)
        why = esc(f.missing.get(name, ""))
        return f'<section id="data">{head}{counts}<p class="missing">{esc(name)}: {why}</p></section>'
    splits = [s for s in ("train", "validation") if s in (d.get("counts") or {}) or s in (d.get("rows") or {})]
    rows = [[esc(s), num((d.get("rows") or {}).get(s)), num((d.get("counts") or {}).get(s)),
             num((d.get("tokens") or {}).get(s)), num((d.get("trained_tokens") or {}).get(s))] for s in splits]
    out = [head, table(["split", "rows read", "examples kept", "tokens", "tokens in the loss"], rows, "num",
                       "data-counts")]
    pct = d.get("length_percentiles") or {}
    if pct:
        cells = [[num(pct.get(k)) for k in ("p50", "p90", "p99", "max")] + [num(d.get("max_length"))]]
        out.append("<h3>Example length (tokens, before truncation)</h3>")
        out.append(table(["p50", "p90", "p99", "max", "data.max_length"], cells, "num all", "data-lengths"))
    facts = [f"template <code>{esc(d.get('template', '?'))}</code>"]
    if d.get("formats"):
        facts.append("formats " + ", ".join(f"{esc(k)} ({num(v)})" for k, v in d["formats"].items()))
    dropped, truncated = d.get("dropped") or [], d.get("truncated_rows") or []
    facts.append(f"{num(len(dropped))} dropped, {num(d.get('truncated', len(truncated)))} truncated "
                 f"(data.overlong: {esc(d.get('overlong', '?'))})")
    out.append(f"<p>{'; '.join(facts)}.</p>")
    for label, notes in (("Dropped", dropped), ("Truncated", truncated)):
        if notes:
            items = "".join(f"<li><code>{esc(n.get('where', '?'))}</code>: {esc(n.get('reason', ''))}</li>"
                            for n in notes[:LISTED_ROWS] if isinstance(n, dict))
            more = f"<li>… and {num(len(notes) - LISTED_ROWS)} more</li>" if len(notes) > LISTED_ROWS else ""
            out.append(f'<p class="sub">{label}:</p><ul class="rows">{items}{more}</ul>')
    return f'<section id="data">{"".join(out)}</section>'


def _diagnostics(f: RunFiles) -> str:
    head = "<h2>Diagnostics</h2>"
    if f.diagnostics is None:
        return f'<section id="diagnostics">{head}<p class="missing">diagnostics.jsonl is missing: the run\'s ' \
               f'warnings were not recorded.</p></section>'
    if not f.diagnostics:
        return f'<section id="diagnostics">{head}<p class="good">None raised.</p></section>'
    rows = [[num(d.step) if d.step is not None else "before",
             f'<span class="kind{" bad" if d.kind in ERROR_KINDS else ""}">{esc(d.kind)}</span>',
             f'<pre class="msg">{esc(d.message)}</pre>'] for d in f.diagnostics]
    return (f'<section id="diagnostics">{head}<p>Every warning raised during the run, in order.</p>'
            f'{table(["step", "kind", "message"], rows, "diag", "diagnostics-table")}</section>')


LOWER_IS_BETTER = {"loss", "perplexity"}


def _eval_rows(s: EvalSummary) -> list[tuple[str, dict[str, Any]]]:
    return [(k, v) for k, v in table_rows(s) if any(x is not None for x in v.values())]


def _ordered(models: Iterable[str]) -> list[str]:
    """Columns left to right: base, tuned, then any other model in its own order."""
    models = list(models)
    return [m for m in ("base", "tuned") if m in models] + [m for m in models if m not in ("base", "tuned")]


def _eval_table(s: EvalSummary) -> str:
    models = _ordered(s.models)
    delta = "base" in models and "tuned" in models
    head = ["metric", *[esc(m) for m in models]] + (["Δ tuned − base"] if delta else [])
    rows = []
    for name, vals in _eval_rows(s):
        cells = [esc(LABELS.get(name, name)), *[esc(fmt_value(name, vals.get(m))) for m in models]]
        if delta:
            b, t = vals.get("base"), vals.get("tuned")
            if finite(b) and finite(t):
                better = (t < b) if name in LOWER_IS_BETTER else (t > b)
                cls = "good" if better else ("bad" if t != b else "")
                diff = f"{(t - b) * 100:+.1f} pt" if name in PERCENT else f"{t - b:+.4g}"
                cells.append(f'<span class="{cls}">{diff}</span>')
            else:
                cells.append("—")
        rows.append(cells)
    return table(head, rows, "num eval", f"eval-{s.data}")


def _prompt_html(messages: list[dict[str, Any]]) -> str:
    def text(m: dict[str, Any]) -> str:  # an Alpaca row's input travels beside the instruction
        return str(m.get("content", "")) + (f"\n\n{m['input']}" if m.get("input") else "")

    return "".join(f'<div class="turn"><span class="role">{esc(m.get("role", "?"))}</span>'
                   f'<pre class="msg">{esc(text(m))}</pre></div>'
                   for m in messages if isinstance(m, dict))


def pick_samples(records: list[EvalRecord], n: int = SAMPLES) -> list[EvalRecord]:
    """Examples where the tuned answer is exactly right and the base's is not come first (what the
    adapter learned), then ones where the two differ, then the rest, in file order."""
    def em(r: EvalRecord, model: str) -> float:
        v = (r.scores.get(model) or {}).get("exact_match")
        return float(v) if finite(v) else 0.0

    def rank(r: EvalRecord) -> int:
        if "base" in r.answers and em(r, "tuned") > em(r, "base"):
            return 0
        if "base" in r.answers and r.answers.get("base") != r.answers.get("tuned"):
            return 1
        return 2

    return sorted(records, key=lambda r: (rank(r), r.index))[:n]


def _sample(r: EvalRecord) -> str:
    rows = [("reference", f'<pre class="msg">{esc(r.reference)}</pre>')]
    for model in _ordered(r.answers):
        scores = r.scores.get(model) or {}
        em = scores.get("exact_match")
        mark = "" if em is None else (' <span class="good">✓</span>' if em else ' <span class="bad">✗</span>')
        extra = ", ".join(f"{esc(k)} {num(v, 3)}" for k, v in scores.items() if k != "exact_match")
        label = f"{esc(model)}{mark}" + (f'<br><span class="dim">{extra}</span>' if extra else "")
        rows.append((label, f'<pre class="msg">{esc(r.answers[model])}</pre>'))
    return (f'<div class="sample"><div class="prompt"><span class="dim">example {num(r.index)}</span>'
            f'{_prompt_html(r.prompt)}</div>{kv_table(rows)}</div>')


def _evals(f: RunFiles) -> str:
    head = "<h2>Evaluation</h2>"
    if not f.evals:
        why = f.missing.get(f.paths.label(f.paths.eval_dir), "no eval summary in eval/")
        return f'<section id="eval">{head}<p class="missing">{prose(why)}</p></section>'
    out = [head]
    for s, records in f.evals:
        g = s.generation or {}
        facts = [f"{num(s.count)} examples"]
        if s.sources:
            facts.append("from " + ", ".join(f"<code>{esc(x)}</code>" for x in s.sources))
        if g:
            facts.append(f"greedy answers of up to {num(g.get('max_new_tokens'))} tokens"
                         + (f", {num(g.get('answers_per_s'), 3)} answers/s" if g.get("answers_per_s") else ""))
        if s.created:
            facts.append(esc(s.created))
        out.append(f'<h3>{esc(s.data)}</h3><p>{"; ".join(facts)}.</p>')
        if "base" not in s.models:
            out.append('<p class="dim">The base model was not evaluated, so there is no comparison '
                       '(<code>lorakit eval RUN --base</code> adds it).</p>')
        out.append(_eval_table(s))
        if records:
            chosen = pick_samples(records)
            out.append(f'<h4>Sample answers ({len(chosen)} of {num(len(records))})</h4>'
                       f'<div class="samples" id="samples-{esc(s.data)}">{"".join(_sample(r) for r in chosen)}</div>')
        else:
            out.append(f'<p class="missing">eval/{esc(s.data)}.jsonl is missing: no sample answers.</p>')
    return f'<section id="eval">{"".join(out)}</section>'


def _merge(f: RunFiles) -> str:
    if f.merge is None:
        return ""
    rows = [(f"<code>{esc(k)}</code>", num(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
             else esc(value_text(v))) for k, v in _flatten(f.merge).items()]
    return f'<section id="merge"><h2>Merge parity check</h2><p>From <code>merge.json</code>, the last ' \
           f'<code>lorakit merge</code>.</p>{kv_table(rows, "merge-table")}</section>'


def _export_row(v: dict[str, Any]) -> list[str]:
    t = v.get("task") or {}
    passed = '<span class="good">passed</span>' if v.get("passed") else '<span class="bad">FAILED (not published)</span>'
    token = f"top-1 {num(v.get('top1_agreement'), 3)}, greedy {esc(v.get('greedy_identical'))}/{len(v.get('prompts') or [])}"
    if t:
        metric = esc(str(t.get("metric", "")).replace("_", " "))
        task = (f"{metric} {num(100 * t['reference'], 3)} % → {num(100 * t['gguf'], 3)} % (drop {num(t['drop'], 3)} "
                f"points, allowed {num(t['max_drop'], 3)}); {esc(t['changed'])}/{esc(t['rows'])} answers changed "
                f"on <code>{esc(t.get('data'))}</code>")
    else:
        task = '<span class="missing">not run</span>'
    return [f"<code>{esc(Path(str(v.get('gguf', ''))).name)}</code>", esc(v.get("type")), token, task, passed]


def _exports(f: RunFiles) -> str:
    if not f.exports:
        return ""
    rows = [_export_row(v) for v in f.exports]
    auto = "".join(
        f'<h3>--gguf auto for <code>{esc(Path(str(v.get("gguf", ""))).name)}</code></h3>' + table(
            ["type", "MiB", "imatrix", "metric", "drop", "answers changed", "top-1", "seconds", ""],
            [[esc(r["type"]), num(r["mib"], 4), "yes" if r["imatrix"] else "no",
              "-" if r.get("gguf") is None else f"{num(100 * r['gguf'], 3)} %",
              "-" if r.get("drop") is None else num(r["drop"], 3), esc(r.get("changed", "-")),
              num(r["top1_agreement"], 3), num(r["seconds"], 3), "kept" if r["passed"] else "too lossy"]
             for r in v["auto"]], "num")
        for v in f.exports if v.get("auto"))
    return ('<section id="export"><h2>GGUF exports</h2><p>From <code>export/*.verify.json</code>: each file '
            'checked in llama.cpp against the merged model in transformers, token by token on fixed prompts and '
            'on the run\'s own held-out rows (greedy answers scored with the eval metric).</p>'
            + table(["file", "type", "token-level", "task-level", "verdict"], rows, "", "export-table") + auto
            + "</section>")


def _missing(f: RunFiles) -> str:
    if not f.missing:
        return ""
    items = "".join(f"<li><code>{esc(k)}</code>: {prose(v)}</li>" for k, v in f.missing.items())
    return f'<aside id="missing"><b>Not in this run folder</b><ul>{items}</ul></aside>'


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


SECTION_TITLES = {"_missing": "Missing files", "_summary": "Summary", "_charts": "Training curves",
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
    sections = [_missing, _summary, _charts, _diagnostics, _evals, _data, _config, _merge, _exports]
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
