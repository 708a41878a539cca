"""report.html's text: every run text escaped, every number formatted, tables; in one place."""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any, Iterable

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
