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


# --------------------------------------------------------------------------- generated from the schema

STAGES = {"generate": "GenerateConfig", "chat": "ChatConfig", "eval": "EvalConfig", "pairs": "PairsConfig",
          "merge": "MergeConfig", "export": "ExportConfig", "serve": "ServeConfig"}
BORN_GENERATED = {"pairs"}  # recorded when first added, flags (and --config) generated from its section already


def _actions(command: str):
    import argparse

    from lorakit.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]._actions


@pytest.mark.parametrize("command", sorted(STAGES))
def test_stage_flags_take_help_and_default_from_the_schema(command):
    import dataclasses

    from lorakit import config
    from lorakit.config.flags import default_of

    fields = {f.name: f for f in dataclasses.fields(getattr(config, STAGES[command]))}
    generated = [a for a in _actions(command) if a.dest in fields]
    assert generated, f"lorakit {command} has no flag from its section"
    for a in generated:
        f = fields[a.dest]
        assert a.help.replace("%%", "%").startswith(f.metadata["help"]), a.dest
        if a.option_strings and a.default is not None:  # None: the run's config (export) or "not given" decides
            assert a.default == default_of(f), a.dest


@pytest.mark.parametrize("command", sorted(set(STAGES) - BORN_GENERATED))
def test_the_only_new_flag_is_config(command):
    recorded = {_key(a) for a in RECORDED[command]}
    added = {_key(a) for a in CURRENT[command]} - recorded
    assert added <= {("--config",)}
    assert (("--config",) in added) == (command != "export")  # export reads the run's config.yaml


def test_build_parser_and_every_cli_function_is_short():
    import ast

    tree = ast.parse((ROOT / "src" / "lorakit" / "cli.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            assert node.end_lineno - node.lineno + 1 <= 60, node.name


# --------------------------------------------------------------------------- a config file holds the sections


def _settings(argv: list[str], section: str):
    from lorakit import cli, config

    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    return cli._settings(args, getattr(config, STAGES[section]))


def test_serve_section_of_a_file_works_like_the_flags(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("serve:\n  port: 9001\n  max_batch: 4\n  adapter_root: [/srv/adapters]\n"
                 "data:\n  train: other.jsonl\n", encoding="utf-8")  # other sections are not this command's
    s = _settings(["serve", "runs/a", "--config", str(f)], "serve")
    assert (s.port, s.max_batch, s.adapter_root, s.adapters) == (9001, 4, ["/srv/adapters"], ["runs/a"])
    assert s.host == "127.0.0.1" and s.max_queue == 256  # the schema's defaults for keys the file leaves out


def test_a_flag_given_wins_over_the_file_even_at_its_default(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("serve:\n  port: 9001\n  host: 0.0.0.0\n", encoding="utf-8")
    s = _settings(["serve", "runs/a", "--config", str(f), "--port", "8000"], "serve")
    assert (s.port, s.host) == (8000, "0.0.0.0")


def test_without_a_file_the_flags_are_the_section():
    from lorakit.config import EvalConfig

    assert _settings(["eval", "runs/a"], "eval") == EvalConfig()
    s = _settings(["eval", "runs/a", "--data", "x.jsonl", "--base", "--limit", "5"], "eval")
    assert (s.data, s.base, s.limit, s.split) == (["x.jsonl"], True, 5, "validation")


def test_eval_and_generate_sections_from_a_file(tmp_path):
    f = tmp_path / "stages.yaml"
    f.write_text("eval:\n  split: test\n  batch_size: 4\ngenerate:\n  temperature: 0.2\n  system: Be brief.\n",
                 encoding="utf-8")
    e = _settings(["eval", "runs/a", "--config", str(f)], "eval")
    assert (e.split, e.batch_size) == ("test", 4)
    g = _settings(["generate", "runs/a", "--config", str(f), "--greedy"], "generate")
    assert (g.temperature, g.system, g.greedy, g.max_new_tokens) == (0.2, "Be brief.", True, 256)


def test_a_bad_section_is_reported_with_every_problem(tmp_path):
    from lorakit.errors import ConfigError

    f = tmp_path / "serve.yaml"
    f.write_text("serve:\n  prot: 9001\n  max_batch: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        _settings(["serve", "runs/a", "--config", str(f)], "serve")
    assert "serve.prot" in str(e.value) and "did you mean 'serve.port'" in str(e.value)
    f.write_text("serve:\n  port: 70000\n  max_batch: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        _settings(["serve", "runs/a", "--config", str(f)], "serve")
    assert "serve.port" in str(e.value) and "serve.max_batch" in str(e.value)


def test_lorakit_config_lists_the_stage_sections():
    from lorakit import config

    text = config.describe()
    for key in ("generate.temperature", "chat.max_context", "eval.batch_size", "merge.dtype", "export.gguf",
                "serve.port"):
        assert f"\n{key}  (default:" in text


def test_lorakit_config_shows_a_file_of_stage_sections_without_asking_for_training_data(tmp_path, capsys):
    import yaml

    from lorakit.cli import main

    f = tmp_path / "serve.yaml"
    f.write_text("serve:\n  port: 9000\neval:\n  limit: 5\n", encoding="utf-8")
    assert main(["config", str(f)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert set(shown) == {"serve", "eval"}  # only the file's sections, at their values
    assert shown["serve"]["port"] == 9000 and shown["eval"]["limit"] == 5 and shown["serve"]["host"] == "127.0.0.1"
    f.write_text("serve:\n  port: 70000\n", encoding="utf-8")
    assert main(["config", str(f)]) != 0  # still checked: a bad value is an error, not shown
    assert "serve.port" in capsys.readouterr().err


def test_the_commands_hand_their_section_to_the_stage(monkeypatch, tmp_path):
    import lorakit.merge
    import lorakit.serve.run
    from lorakit.cli import main
    from lorakit.config import MergeConfig, ServeConfig

    seen = {}
    monkeypatch.setattr(lorakit.serve.run, "serve", lambda s: seen.setdefault("serve", s) and 0)
    monkeypatch.setattr(lorakit.merge, "merge", lambda run, out, s: seen.setdefault("merge", (run, out, s)))
    f = tmp_path / "stages.yaml"
    f.write_text("serve:\n  port: 9001\n  host: 0.0.0.0\nmerge:\n  dtype: bf16\n", encoding="utf-8")
    assert main(["serve", "runs/a", "--adapter", "b=runs/b", "--config", str(f), "--max-batch", "8"]) == 0
    assert seen["serve"] == ServeConfig(adapters=["runs/a"], adapter=["b=runs/b"], host="0.0.0.0", port=9001,
                                        max_batch=8)
    assert main(["merge", "runs/a", "--out", "m", "--config", str(f), "--overwrite"]) == 0
    assert seen["merge"] == ("runs/a", "m", MergeConfig(dtype="bf16", overwrite=True))
