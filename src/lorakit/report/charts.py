"""report.html's plots: line charts as hand-written inline SVG (no script, no font, no image)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lorakit.report.format import esc, finite, num

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
               log_y: bool | None = None, x_label: str = "step") -> str:
    """A <figure> with an inline SVG line chart: axes, ticks, grid, labels and an HTML legend.

    Points whose value is None/NaN/inf break the line and get a red cross on the top edge (a NaN
    loss must show); a series with one point is a dot. `log_y` None: log scale when every value is
    positive and they span more than two decades (gradient norms)."""
    good = [(x, float(y)) for s in series for x, y in s.points if finite(y) and finite(x)]
    bad = sorted({x for s in series for x, y in s.points if finite(x) and not finite(y)})
    caption = f'<figcaption><b>{esc(title)}</b>{_legend(series, bad)}</figcaption>'
    if not good and not bad:
        return f'<figure class="chart empty" id="{esc(ident)}">{caption}<p class="missing">not recorded</p></figure>'
    xs = [x for x, _ in good] + bad
    ys = [y for _, y in good]
    if log_y is None:
        log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 100
    frame = _Frame(nice_ticks(min(xs), max(xs), 6, integer=all(float(x).is_integer() for x in xs)),
                   _y_ticks(ys, log_y), log_y)
    out = [f'<svg class="plot" viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">']
    out += frame.axes(y_label, x_label)
    out += _lines(series, frame)
    for x in bad:
        cx = frame.px(x)
        out.append(f'<line class="nonfinite" x1="{cx:.1f}" y1="{TOP}" x2="{cx:.1f}" y2="{TOP + frame.ph}"/>')
        out.append(f'<text class="nonfinite" x="{cx:.1f}" y="{TOP + 11}" text-anchor="middle">✕'
                   f'<title>not finite at step {esc(num(x))}</title></text>')
    out.append("</svg>")
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<figure class="chart" id="{esc(ident)}">{caption}{"".join(out)}{note_html}</figure>'


def _legend(series: list[Series], bad: list[float]) -> str:
    """One key per series (none for a single one), and the steps whose values are not finite."""
    legend = "" if len(series) == 1 else "".join(
        f'<span class="key"><svg width="22" height="10" aria-hidden="true"><line x1="1" y1="5" x2="21" y2="5" '
        f'stroke="{COLORS[i % len(COLORS)]}" stroke-width="2.5"/>'
        + (f'<circle cx="11" cy="5" r="3" fill="{COLORS[i % len(COLORS)]}"/>' if s.markers else "")
        + f"</svg>{esc(s.name)}</span>" for i, s in enumerate(series))
    if bad:
        legend += f'<span class="key bad">✕ not finite at step {esc(", ".join(num(x) for x in bad[:5]))}' \
                  f'{" …" if len(bad) > 5 else ""}</span>'
    return legend


def _y_ticks(ys: list[float], log_y: bool) -> list[float]:
    """Ticks of the value axis, in plot units (log10 on a log scale): decades, or nice steps with one
    more where a line would run along the frame (never below 0 for data >= 0)."""
    if not ys:
        return [0.0, 1.0]
    ty = math.log10 if log_y else (lambda v: v)
    lo_y, hi_y = ty(min(ys)), ty(max(ys))
    yt = list(range(math.floor(lo_y), math.ceil(hi_y) + 1)) if log_y else nice_ticks(lo_y, hi_y, 5)
    if not log_y:
        step, pad = yt[1] - yt[0], (yt[-1] - yt[0]) * 0.03
        if yt[-1] - hi_y < pad:
            yt.append(yt[-1] + step)
        if lo_y - yt[0] < pad and not (lo_y >= 0 and abs(yt[0]) < step * 1e-6):
            yt.insert(0, yt[0] - step)
    if log_y and len(yt) < 2:
        yt = [yt[0], yt[0] + 1]
    return yt


class _Frame:
    """The plot area: step ticks `xt`, value ticks `yt` (plot units), and the maps into pixels."""

    def __init__(self, xt: list[float], yt: list[float], log_y: bool):
        self.xt, self.yt, self.log_y = xt, yt, log_y
        self.pw, self.ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(self, x: float) -> float:
        x0, x1 = self.xt[0], self.xt[-1]
        return LEFT + (x - x0) / (x1 - x0) * self.pw

    def py(self, y: float) -> float:
        return self._row(math.log10(y) if self.log_y else y)

    def _row(self, v: float) -> float:
        y0, y1 = self.yt[0], self.yt[-1]
        return TOP + self.ph - (v - y0) / (y1 - y0) * self.ph

    def axes(self, y_label: str, x_label: str = "step") -> list[str]:
        """Grid, tick labels, frame and the two axis labels."""
        out = []
        yt, pw, ph = self.yt, self.pw, self.ph
        y_labels = [f"1e{int(v)}" if not 0 <= v <= 3 else f"{10 ** v:g}" for v in yt] if self.log_y \
            else tick_labels(yt)
        for v, label in zip(yt, y_labels):
            y = self._row(v)
            out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}"/>'
                       f'<text class="tick" x="{LEFT - 6}" y="{y + 3.5:.1f}" text-anchor="end">{esc(label)}</text>')
        for v, label in zip(self.xt, tick_labels(self.xt)):
            x = self.px(v)
            out.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}"/>'
                       f'<text class="tick" x="{x:.1f}" y="{TOP + ph + 15}" text-anchor="middle">'
                       f'{esc(label)}</text>')
        out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/>')
        out.append(f'<text class="label" x="{LEFT + pw / 2:.1f}" y="{H - 6}" text-anchor="middle">{esc(x_label)}</text>')
        out.append(f'<text class="label" transform="translate(14 {TOP + ph / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">{esc(y_label + (" (log scale)" if self.log_y else ""))}</text>')
        return out


def _lines(series: list[Series], frame: _Frame) -> list[str]:
    """Each series as polylines broken where a value is not finite (a lone point as a dot)."""
    out = []
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in s.points:
            if finite(x) and finite(y):
                runs[-1].append((frame.px(x), frame.py(float(y))))
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
    return out
