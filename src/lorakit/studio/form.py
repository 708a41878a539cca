"""The New-run form: generated from the config schema, checked by the config loader.

Each field is a schema key (`lorakit.config.field_docs`: its help, type and default), so the form
can never offer a key `lorakit train` would not take, and never says another default. What the
user typed is read as YAML (`2e-4`, `auto`, `[q_proj, v_proj]`), put into a config mapping and
loaded by `lorakit.config.from_dict`, the loader `lorakit train` uses: its problems come back one
per key, and the page shows each beside its field.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lorakit.errors import ConfigError, LorakitError

SECTIONS = ("model", "data", "lora", "train", "dpo", "kto", "orpo", "simpo", "grpo")
"""The sections a training run reads (output is the form's name field and the studio's folder)."""
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_KEY = re.compile(r"^([a-z_]+\.[a-z_]+)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _choices(tp: Any) -> list[Any] | None:
    """The values of a key that takes only named values (with 'auto' among them), else None."""
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    values: list[Any] = []
    for o in options:
        if get_origin(o) is Literal:
            values += list(get_args(o))
        elif o is type(None):
            values.append(None)
        else:
            return None
    return values


def _plain(value: Any) -> Any:
    """A default as JSON can carry it and YAML can write it back."""
    import dataclasses

    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


def schema() -> list[dict[str, Any]]:
    """[{section, fields: [{key, type, default, text, help, widget, choices}]}] for SECTIONS."""
    import dataclasses

    from lorakit.config import Config, field_docs

    hints = {s.name: typing.get_type_hints(typing.get_type_hints(Config)[s.name]) for s in dataclasses.fields(Config)}
    out: dict[str, list] = {s: [] for s in SECTIONS}
    for doc in field_docs():
        section, name = doc.key.split(".", 1)
        if section not in out:
            continue
        tp = hints[section][name]
        choices = _choices(tp)
        default = _plain(doc.example if doc.example is not None else doc.default)
        widget = "bool" if tp is bool else "choice" if choices else "text"
        out[section].append({"key": doc.key, "type": doc.type, "default": default, "help": doc.help,
                             "widget": widget, "choices": choices, "required": doc.example is not None,
                             "text": text_of(default)})
    return [{"section": s, "fields": fields} for s, fields in out.items()]


def text_of(value: Any) -> str:
    """A value as the form shows it in a text field: YAML flow style ('null', '[a, b]', '2.0e-4')."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def values_to_raw(values: dict[str, Any], problems: dict[str, str]) -> dict[str, Any]:
    """The form's {key: text or value} as a config mapping; a text YAML cannot read is a problem of
    its key. Keys outside SECTIONS are refused (the form cannot set output.*, serve.*, ...)."""
    raw: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = str(key).partition(".")
        if section not in SECTIONS or not name:
            problems[str(key)] = f"{key} is not a key the New-run form sets"
            continue
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError as e:
                problems[key] = f"{key}: not a value YAML can read ({str(e).splitlines()[0]})"
                continue
        raw.setdefault(section, {})[name] = value
    return raw


def check(values: dict[str, Any], name: str, runs: Path, data_roots: list[Path]):
    """(Config, {}) for a valid form, or (None, {key or '': problem}). The run goes to `runs`/`name`;
    every data file must lie inside one of `data_roots`."""
    from lorakit import config as config_mod

    problems: dict[str, str] = {}
    if not _NAME.fullmatch(name or ""):
        problems["name"] = "name: letters, digits, '.', '_' and '-' (up to 64), starting with a letter or digit"
    raw = values_to_raw(values, problems)
    raw["output"] = {"dir": str(runs.resolve()), "name": name or "run", "overwrite": False}
    for key in ("train", "validation", "test"):
        given = raw.get("data", {}).get(key)
        for path in [given] if isinstance(given, str) else given or []:
            if not isinstance(path, str) or not inside(Path(path), data_roots):
                problems[f"data.{key}"] = (f"data.{key}: {path!r} is not a file in the studio's data folders "
                                           f"({', '.join(str(r) for r in data_roots)}); pick one from the list")
    for key in ("name", "adapter"):  # a local folder: inside the data folders or the runs; a hub id: as it is
        given = raw.get("model", {}).get(key)
        if isinstance(given, str) and (Path(given).exists() or given.startswith(("/", ".", "~"))) \
                and not within(Path(given), [*data_roots, runs]):
            problems[f"model.{key}"] = (f"model.{key}: {given!r} is a folder outside the studio's data folders and "
                                        "runs; start the studio with --data naming its folder, or give a hub id")
    try:  # loaded even with problems found above: every key's problem shows at once
        cfg = config_mod.from_dict(raw, "studio form", base_dir=Path.cwd())
    except ConfigError as e:
        for p in e.problems:
            m = _KEY.match(p)
            key = m.group(1) if m else ""
            if key not in problems:  # the form's own finding on a key says more (a path outside the folders)
                problems[key] = p
        return None, problems
    except LorakitError as e:
        return None, {**problems, "": e.render()}
    return (None, problems) if problems else (cfg, {})


def inside(path: Path, roots: list[Path]) -> bool:
    """True when `path` (links resolved) is an existing file under one of `roots`."""
    return path.resolve().is_file() and within(path, roots)


def within(path: Path, roots: list[Path]) -> bool:
    """True when `path`, links resolved, is one of `roots` or lies under one."""
    p = path.expanduser().resolve()
    return any(p.is_relative_to(r.resolve()) for r in roots)


def data_files(roots: list[Path], limit: int = 500) -> list[str]:
    """Data files under the allowed folders (three levels deep, hidden folders skipped), absolute."""
    out: list[str] = []
    for root in roots:
        base = root.resolve()
        for depth in range(4):
            for p in sorted(base.glob("/".join(["*"] * (depth + 1)))):
                rel = p.relative_to(base).parts
                if p.is_file() and p.suffix in DATA_SUFFIXES and not any(part.startswith(".") for part in rel) \
                        and p.resolve().is_relative_to(base):
                    out.append(str(p))
                    if len(out) >= limit:
                        return out
    return out


__all__ = ["SECTIONS", "check", "data_files", "inside", "schema", "text_of", "values_to_raw", "within"]
