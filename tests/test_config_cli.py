"""`lorakit config`: every schema field shown with its type, default and help; `--yaml` is a
complete config that loads back to the defaults; README's config block is generated from it.

The expectations are read from the dataclasses themselves (fields, annotations, metadata), not
from `config.field_docs`, so a field the renderer skips or mis-renders fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml

from lorakit import config
from lorakit.cli import main

ROOT = Path(__file__).resolve().parent.parent


def schema() -> list[tuple[str, str, Any, dataclasses.Field, Any]]:
    """(section, key, default, field, annotation) for every field, straight from the dataclasses."""
    out = []
    defaults = config.Config()
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((section.name, f.name, getattr(getattr(defaults, section.name), f.name), f, hints[f.name]))
    return out


def leaves(tp: Any) -> list[str]:
    """The words a type must show: each literal choice quoted, each plain type by name, None as null."""
    if get_origin(tp) in (Union, typing.get_origin(int | None)):
        return [w for a in get_args(tp) for w in leaves(a)]
    if get_origin(tp) is Literal:
        return [repr(a) for a in get_args(tp)]
    if get_origin(tp) is list:
        return ["list"] + leaves(get_args(tp)[0])
    return ["null" if tp is type(None) else tp.__name__]


def squash(text: str) -> str:
    return " ".join(text.split())


def test_schema_has_fields_and_every_one_has_help():
    fields = schema()
    assert len(fields) > 40  # five sections' worth; guards the walk itself
    for section, key, _, f, _ in fields:
        assert f.metadata.get("help", "").strip(), f"{section}.{key} has no help text"


def test_reference_shows_every_key_with_type_default_and_help(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    blocks = dict(re.findall(r"^(\w+\.\w+)  (.*\n(?:    .*\n)+)", out, re.M))
    keys = [f"{section}.{key}" for section, key, *_ in schema()]
    assert list(blocks) == keys  # every key, once, in schema order, nothing else
    for section, key, default, f, tp in schema():
        head, type_line, *help_lines = blocks[f"{section}.{key}"].splitlines()
        while type_line.endswith("|"):  # a long list of choices wraps onto the next lines
            type_line += " " + help_lines.pop(0).strip()
        if "example" in f.metadata:  # a required key: no default shown, an example instead
            assert head.startswith("(required, no default; e.g. ")
            assert yaml.safe_load(head.removeprefix("(required, no default; e.g. ").removesuffix(")")) \
                == f.metadata["example"]
        else:
            assert head.startswith("(default: ") and head.endswith(")"), head
            assert yaml.safe_load(head[len("(default: "):-1]) == default, f"{section}.{key}: {head}"
        assert type_line.startswith("    type: ")
        shown = squash(type_line)
        for word in leaves(tp):
            assert word in shown, f"{section}.{key}: {word} missing from {type_line!r}"
        assert squash(" ".join(help_lines)) == squash(f.metadata["help"]), f"{section}.{key}"


def _comment_blocks(text: str) -> dict[str, tuple[str, str]]:
    """'section.key' -> (the comment lines just above the key joined, the key's YAML line(s))."""
    out, section, comments = {}, None, []
    for line in text.splitlines():
        if re.fullmatch(r"\w+:", line):
            section, comments = line[:-1], []
        elif line.startswith("  # "):
            comments.append(line[4:])
        elif m := re.match(r"  (\w+):", line):
            out[f"{section}.{m[1]}"] = (" ".join(comments), line)
            comments = []
    return out


def test_yaml_is_a_complete_commented_config_equal_to_the_defaults(tmp_path, capsys):
    assert main(["config", "--yaml"]) == 0
    text = capsys.readouterr().out
    blocks = _comment_blocks(text)
    assert list(blocks) == [f"{section}.{key}" for section, key, *_ in schema()]
    for section, key, _, f, tp in schema():
        comment, _ = blocks[f"{section}.{key}"]
        assert squash(comment).startswith(squash(f.metadata["help"])), f"{section}.{key}"
        for word in leaves(tp):
            assert word in comment.rsplit("type: ", 1)[1], f"{section}.{key}: type misses {word}"

    path = tmp_path / "defaults.yaml"
    path.write_text(text, encoding="utf-8")
    loaded = config.load(path)
    # data.train is required: the text carries its example value, the only difference from Config().
    required = {(s, k): f.metadata["example"] for s, k, _, f, _ in schema() if "example" in f.metadata}
    assert required == {("data", "train"): loaded.data.train[0]}
    assert loaded.data.train == [required["data", "train"]]
    loaded.data.train = []
    assert loaded == config.Config()


def test_config_file_values_round_trip_through_yaml(tmp_path, capsys):
    template = "{% for m in messages %}\n{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    src = tmp_path / "mine.yaml"
    src.write_text(yaml.safe_dump({"data": {"train": ["a.jsonl", "b.jsonl"], "template": template},
                                   "lora": {"r": "auto", "init": "true"}, "output": {"name": None}}))
    overrides = ["--train.lr", "1e-3", "--lora.target_modules", "all-linear"]
    assert main(["config", str(src), *overrides]) == 0
    shown = tmp_path / "shown.yaml"
    shown.write_text(capsys.readouterr().out, encoding="utf-8")
    expected = config.load(src, overrides)
    assert expected.data.template == template and expected.train.lr == 1e-3  # the case is the one meant
    assert config.load(shown) == expected


def _readme_script():
    spec = importlib.util.spec_from_file_location("readme_config", ROOT / "scripts" / "readme_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_readme_config_block_is_generated_from_the_schema():
    script = _readme_script()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config.to_yaml() in readme
    assert script.updated(readme) == readme, (
        "README.md's config block differs from the schema in src/lorakit/config/; "
        "run `python scripts/readme_config.py` and commit README.md")


def test_readme_generator_replaces_a_stale_block():
    script = _readme_script()
    stale = f"intro\n{script.BEGIN}\n```yaml\nmodel:\n  name: old\n```\n{script.END}\noutro\n"
    new = script.updated(stale)
    assert new.startswith(f"intro\n{script.BEGIN}") and new.endswith(f"{script.END}\noutro\n")
    assert config.to_yaml() in new and "name: old" not in new
    with pytest.raises(SystemExit):
        script.updated("no markers here")
