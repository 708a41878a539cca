"""Write tests/fixtures/cli_flags.json: every subcommand's flags as `lorakit`'s parser defines them.

`python scripts/cli_flags.py` records the parser's option strings, dests, defaults, types, choices
and nargs/actions; tests/test_cli_schema.py holds the parser to that record, so flags generated
from the schema keep the names and defaults users already type.  Regenerate it only when a flag
is meant to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "cli_flags.json"

sys.path.insert(0, str(ROOT / "src"))


def _plain(value):
    """A default or choice as JSON holds it (a type by its name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return getattr(value, "__name__", repr(value))


def describe(action: argparse.Action) -> dict:
    return {
        "option_strings": list(action.option_strings),
        "dest": action.dest,
        "default": _plain(action.default),
        "type": _plain(action.type),
        "choices": _plain(action.choices),
        "nargs": _plain(action.nargs),
        "action": type(action).__name__,
        "required": action.required,
    }


def flags(parser: argparse.ArgumentParser | None = None) -> dict[str, list[dict]]:
    """{subcommand: [action, ...]} for every subcommand of the `lorakit` parser."""
    if parser is None:
        from lorakit.cli import build_parser

        parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: [describe(a) for a in sp._actions if not isinstance(a, argparse._HelpAction)]
            for name, sp in sub.choices.items()}


def main() -> int:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(flags(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
