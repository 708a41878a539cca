"""Command-line flags generated from the schema: a flag's help, default, type and choices are its
section field's (`lorakit.config.stages`), so a stage's defaults are written once, in the schema.

A command names the fields it exposes and how they are spelled (`flag("max_batch")` is
`--max-batch`); everything else is read from the field:

    bool            store_true (BooleanOptionalAction when the default is true)
    Literal[...]    choices
    int / float     type
    list[...]       append (repeatable), or whatever nargs the command asks for
    X | None        as X

`section_from` turns the parsed flags back into the section object the stage function takes, on top
of the section a `--config FILE` holds: a flag given on the command line wins over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin


@dataclass(frozen=True)
class Flag:
    key: str  # the section's field
    names: tuple[str, ...]  # option strings, or the positional's name
    kwargs: dict[str, Any] = field(default_factory=dict)  # argparse keywords that win over the derived ones


def flag(key: str, *names: str, **kwargs: Any) -> Flag:
    """The field `key` as `--key-with-dashes` (or as `names`), with argparse `kwargs` of its own."""
    return Flag(key, names or ("--" + key.replace("_", "-"),), kwargs)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _plain_type(tp: Any) -> Any:
    """`X | None` as X (a flag that is not given keeps the field's default; it is never set to None)."""
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _derived(tp: Any, default: Any) -> dict[str, Any]:
    """The argparse keywords a field's type implies."""
    tp = _plain_type(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction} if default else {"action": "store_true"}
    if get_origin(tp) is Literal:
        return {"choices": list(get_args(tp))}
    if get_origin(tp) is list:
        return {"action": "append"}
    if tp in (int, float):
        return {"type": tp}
    return {}


def _help(text: str, default: Any, shown: Any, where: str | None) -> str:
    """The schema's help, plus where an unset flag's value comes from (argparse formats %)."""
    if where is not None:
        text = f"{text} (default: {where}, else {default})"
    elif shown is not None and shown is not False and shown != []:  # 0 is shown; an unset flag is not
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")


def add_flags(parser, section: type, *flags: Flag, where: str | None = None) -> None:
    """Add `flags` of the schema `section` to `parser` (a parser or an argument group).

    `where`: the flags default to None and the value then comes from that place, a "{key}" in
    it naming the field (`lorakit export`'s flags fall back on the run's config.yaml)."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(section)
    for fl in flags:
        f = fields[fl.key]
        default = default_of(f)
        kwargs = _derived(hints[fl.key], default)
        kwargs["default"] = None if where is not None else default
        if fl.names[0].startswith("-"):
            kwargs["dest"] = fl.key
        else:  # a positional keeps argparse's own default (and so its required-ness)
            del kwargs["default"]
        kwargs.update(fl.kwargs)
        note = where.format(key=fl.key) if where is not None else None
        kwargs["help"] = _help(f.metadata["help"], default, kwargs.get("default"), note) + kwargs.pop("help_suffix", "")
        parser.add_argument(*fl.names, **kwargs)


def given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options `argv` gives, told apart from defaults by parsing it again with no defaults."""
    actions = list(parser._actions)
    for sub in [a for a in actions if isinstance(a, argparse._SubParsersAction)]:
        for sp in sub.choices.values():
            actions += sp._actions
    saved = [(a, a.default) for a in actions if a.option_strings]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for a, value in saved:
            a.default = value
    return set(vars(namespace))


def section_from(args: argparse.Namespace, section: type, name: str, explicit: set[str] | None = None,
                 base: Any = None) -> Any:
    """The `section` object a stage takes: `base`, else the `name:` section of `args.config` (when
    given), else the schema's defaults, with the flags in its place (those in `explicit` only, when
    a file is read).  A flag left at None, or a list flag never given, leaves the section's value."""
    from lorakit import config

    if base is None:
        base = config.load_section(args.config, name) if getattr(args, "config", None) else section()
    values = {}
    for f in dataclasses.fields(section):
        value = getattr(args, f.name, None)
        if value is None or value == [] or (explicit is not None and f.name not in explicit):
            continue
        values[f.name] = value
    return dataclasses.replace(base, **values)
