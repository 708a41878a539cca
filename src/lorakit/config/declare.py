"""The one way a schema key is declared: its default and the help text every view of it shows.

Kept apart from `lorakit.config` so that both the training sections there and the later stages'
sections in `lorakit.config.stages` declare their keys the same way without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING,
          example: Any = None):
    """A field with its help text; `example` marks a key without a usable default (the value
    `lorakit config --yaml` writes in its place; `_check` reports the key when it is unset)."""
    metadata = {"help": text} if example is None else {"help": text, "example": example}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
