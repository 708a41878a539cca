"""Data: sources -> formats -> templates (render + loss mask) -> dataset (split, encode) -> collate.

Names are re-exported lazily so `import lorakit.data` stays cheap (torch loads only with Collator).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_rows": "sources",
    "detect_format": "formats",
    "to_example": "formats",
    "Template": "templates",
    "resolve_template": "templates",
    "Collator": "collate",
    "prepare": "dataset",
    "Prepared": "dataset",
    "DataStats": "dataset",
    "format_report": "report",
    "prepare_preference": "preference",
    "PreparedPreference": "preference",
    "format_preference_report": "report",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lorakit.data.{_EXPORTS[name]}"), name)
