"""Config schema: YAML + dotted overrides, all errors at once, every shipped config valid."""

from pathlib import Path

import pytest

from lorakit import config
from lorakit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.joinpath("examples").rglob("*.yaml")) + sorted(ROOT.joinpath("src/lorakit").rglob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_run_name_from_file_stem(tmp_path):
    cfg = config.load(write(tmp_path, "data:\n  train: x.jsonl\n"))
    assert cfg.model.name == config.DEFAULT_MODEL
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.target_modules == "all-linear"
    assert cfg.train.max_grad_norm == 0.3 and cfg.train.weight_decay == 0.01
    assert cfg.data.train == ["x.jsonl"]  # a single string becomes a list
    assert cfg.output.name == "run"


def test_dotted_overrides_are_typed(tmp_path):
    cfg = config.load(write(tmp_path, "data:\n  train: x.jsonl\n"),
                      ["--lora.r", "8", "--train.lr=1e-4", "--lora.use_dora", "--lora.target_modules", "all-linear"])
    assert cfg.lora.r == 8 and isinstance(cfg.lora.r, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.use_dora is True
    assert cfg.lora.target_modules == "all-linear"


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, "data:\n  train: x.jsonl\nlora:\n  rank: 8\n"))
    msg = str(e.value)
    assert "unknown key 'lora.rank'" in msg and "did you mean 'lora.r'" in msg
    assert "run.yaml" in msg


def test_all_errors_reported_at_once(tmp_path):
    text = "data:\n  train: x.jsonl\n  overlong: cut\nlora:\n  r: many\n  dropuot: 0.1\ntrain:\n  lr: -1\n"
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text))
    problems = e.value.problems
    assert len(problems) == 3, problems  # type errors first; range checks run once types are valid
    joined = "\n".join(problems)
    assert "data.overlong" in joined and "'truncate'" in joined
    assert "lora.r" in joined and "integer" in joined
    assert "lora.dropuot" in joined and "did you mean 'lora.dropout'" in joined


def test_range_checks_collected(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, "data:\n  train: x.jsonl\n  val_fraction: 1.5\ntrain:\n  lr: -1\n  batch_size: 0\n"))
    joined = "\n".join(e.value.problems)
    assert "data.val_fraction" in joined and "train.lr" in joined and "train.batch_size" in joined


def test_missing_train_data_is_an_error():
    with pytest.raises(ConfigError, match="data.train"):
        config.load(None, [])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.yaml")


def test_relative_data_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "x.jsonl").write_text("{}\n")
    cfg = config.load(write(tmp_path, "data:\n  train: x.jsonl\n"))
    assert cfg.data.train == [str((tmp_path / "x.jsonl").resolve())]


def test_saved_config_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, "data:\n  train: x.jsonl\n"), ["--lora.r", "4"])
    (tmp_path / "out.yaml").write_text(config.dump(cfg))
    again = config.load(tmp_path / "out.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path):
    cfg = config.load(path)
    assert cfg.data.train


def test_shipped_configs_were_found():
    names = {p.name for p in SHIPPED}
    assert {"alpaca.yaml", "chat.yaml", "qlora-gpu.yaml", "text.yaml", "demo.yaml"} <= names


def test_yaml_booleans_spell_choice_words(tmp_path):
    cfg = config.load(write(tmp_path, "data:\n  train: x.jsonl\nmodel:\n  gradient_checkpointing: on\n"
                                      "train:\n  mixed_precision: no\n"))
    assert cfg.model.gradient_checkpointing == "on" and cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="data.overlong"):
        config.load(write(tmp_path, "data:\n  train: x.jsonl\n  overlong: yes\n"))
