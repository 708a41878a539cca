"""The `lorakit` flags keep their names and defaults while their source moves into the schema.

tests/fixtures/cli_flags.json is the parser as it was before the flags were generated from
`lorakit.config` (scripts/cli_flags.py wrote it): every option string, dest, default, type,
choices and nargs/action of every subcommand.  The parser may gain flags; it may not lose or
change one that users already type.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORDED = json.loads((ROOT / "tests" / "fixtures" / "cli_flags.json").read_text(encoding="utf-8"))


def _current() -> dict[str, list[dict]]:
    spec = importlib.util.spec_from_file_location("cli_flags", ROOT / "scripts" / "cli_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flags()


CURRENT = _current()


def _key(action: dict) -> tuple:
    return tuple(action["option_strings"]) or ("<positional>", action["dest"])


def test_same_subcommands():
    assert sorted(CURRENT) == sorted(RECORDED)


@pytest.mark.parametrize("command", sorted(RECORDED))
def test_every_recorded_flag_is_unchanged(command):
    now = {_key(a): a for a in CURRENT[command]}
    for old in RECORDED[command]:
        assert _key(old) in now, f"lorakit {command}: {_key(old)} is gone"
        assert now[_key(old)] == old, f"lorakit {command} {_key(old)} changed"
