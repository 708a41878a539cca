"""The run-folder contract, owned by lorakit.artifacts: a folder written by an earlier lorakit
(schema 2) still loads and writes back unchanged (tests/fixtures/run_schema2, written by
fixtures/make_run_schema2.py); run-folder names are spelled, files renamed into place and base
hashes compared only there."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from lorakit import config as config_mod
from lorakit.artifacts import (META_FILE, BaseModelRef, RunPaths, check_same_base, find_adapter_dir, read_meta,
                               same_base)
from lorakit.config import LoraConfig, TrainConfig
from lorakit.data.templates import Template
from lorakit.errors import LorakitError

FIXTURE = Path(__file__).parent / "fixtures" / "run_schema2"


def test_a_schema_2_run_folder_loads():
    paths = RunPaths.of(FIXTURE / "adapter")
    assert paths.root == FIXTURE and find_adapter_dir(FIXTURE) == paths.adapter
    meta = read_meta(paths.adapter)
    assert meta.base.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta.base.sha256 == "ab" * 32
    assert meta.base.gguf_file is None and meta.base.revision is None
    assert meta.template_object().name == "chatml"
    assert meta.template_object().system_prompt == "You are a support agent."
    assert meta.data.fingerprint == "cd" * 32 and meta.data.train_examples == 12
    assert meta.max_length == 512 and meta.metrics == {"eval_loss": 1.25, "steps": 6}
    assert meta.versions["lorakit"] == "0.1.0"
    # typed: the schema's own sections and the Template, not dicts
    assert isinstance(meta.template, Template) and meta.template == meta.template_object()
    assert isinstance(meta.lora, LoraConfig) and meta.lora.r == 8 and meta.lora.alpha == 16 and not meta.lora.use_dora
    assert isinstance(meta.train, TrainConfig) and meta.train.lr == 2e-4 and meta.train.tokens_per_pass == 512
    mcfg = meta.base.model_config(dtype="fp32", gradient_checkpointing="off")
    assert (mcfg.name, mcfg.dtype, mcfg.gguf_file, mcfg.quantization) == (meta.base.name, "fp32", None, "none")
    cfg = config_mod.load(paths.config)
    assert cfg.lora.r == 8 and cfg.train.lr == 2e-4 and cfg.data.template == "chatml"
    [summary] = paths.eval_summaries()
    assert summary.data == "validation" and summary.scores == {"tuned": {"exact_match": 0.5}}


def test_a_schema_2_meta_writes_back_the_same_json():
    """Schema 2 on disk is unchanged: what is read is written back as it was, plus the keys the
    schema gained since the fixture was written, at their defaults (train.method: sft, train.best_by: null,
    lora.experts: false)."""
    text = (FIXTURE / "adapter" / META_FILE).read_text(encoding="utf-8")
    written, old = json.loads(read_meta(FIXTURE / "adapter").to_json()), json.loads(text)
    added = {"train": {"method": "sft", "best_by": None}, "lora": {"experts": False}}
    for section, keys in added.items():
        assert {k: written[section].pop(k) for k in keys} == keys
    assert written == old


# --------------------------------------------------------------------------- one owner for names and renames

SRC = Path(__file__).parents[1] / "src" / "lorakit"
OWNER = SRC / "artifacts"
FILES = {"lorakit.json", "best.json", "sweep.json", "study.db", "trials.json", "best.yaml", "adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
         "diagnostics.jsonl", "data.json", "merge.json", "merge_parity.json", "report.html", "Modelfile"}
SUFFIXES = (".verify.json", ".summary.json", ".partial", ".imatrix.gguf", "-lora.gguf", "-dynamic")
STEMS = ("adapter_model.", "lorakit.json")
FOLDERS = {"adapter", "checkpoints", ".staging", "logs", "eval", "export", "ollama", "best", "last", "trials"}


def _modules():
    """(path, tree, ids of its docstrings) of every module outside lorakit.artifacts."""
    for path in sorted(SRC.rglob("*.py")):
        if OWNER not in path.parents:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            yield path, tree, _docstrings(tree)


def _docstrings(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _spelled(node, docstrings: set[int]) -> str | None:
    """The run-folder name `node` spells, if it does: a string that is one of the names (a path,
    a key, a glob), or a folder name joined onto a path (`x / "eval"`, "eval/...")."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
            and node.right.value in FOLDERS:
        return node.right.value
    if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "name":
        named = [c.value for c in node.comparators if isinstance(c, ast.Constant) and c.value in FOLDERS]
        return named[0] if named else None  # `p.name == "adapter"`
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
        return None
    text = node.value.lstrip("*")
    if text in FILES or text.endswith(SUFFIXES) and " " not in text or text.startswith(STEMS) \
            or text in FOLDERS and text.startswith("."):
        return text
    head = text.split("/", 1)[0]
    return text if "/" in text and head in FOLDERS and " " not in text else None


def test_run_folder_names_are_spelled_only_in_artifacts():
    found = [f"{path.relative_to(SRC)}:{node.lineno}: {name!r}"
             for path, tree, docstrings in _modules() for node in ast.walk(tree)
             if (name := _spelled(node, docstrings))]
    assert not found, "use lorakit.artifacts (RunPaths, or its name constants) instead:\n" + "\n".join(found)


def test_only_artifacts_renames_into_place():
    """Every write-beside-then-rename goes through lorakit.artifacts.atomic (atomic_file, atomic_dir, publish)."""
    found = [f"{path.relative_to(SRC)}:{node.lineno}"
             for path, tree, _ in _modules() for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "renames")
             and isinstance(node.value, ast.Name) and node.value.id == "os"
             or isinstance(node, ast.Attribute) and node.attr in ("mkstemp", "mkdtemp")]
    assert not found, "publish through lorakit.artifacts.atomic instead:\n" + "\n".join(found)


def test_only_artifacts_compares_base_hashes():
    """"Same base?" has one answer, lorakit.artifacts.same_base; each stage picks its policy there."""
    found = [f"{path.relative_to(SRC)}:{node.lineno}"
             for path, tree, _ in _modules() for node in ast.walk(tree) if isinstance(node, ast.Compare)
             and any(isinstance(x, ast.Attribute) and x.attr in ("sha256", "base_sha256")
                     for x in [node.left, *node.comparators])]
    assert not found, "use lorakit.artifacts.check_same_base instead:\n" + "\n".join(found)


# --------------------------------------------------------------------------- the same-base policies

TRAINED = BaseModelRef("org/model", "/models/model", "ab" * 32, "float32", "none")


@pytest.mark.parametrize("held,unknown,same", [
    (dataclasses.replace(TRAINED, name="elsewhere"), "different", True),  # the hashes decide when both are known
    (dataclasses.replace(TRAINED, name="org/model", sha256="00" * 32), "by name", False),
    (dataclasses.replace(TRAINED, sha256=None), "same", True),
    (dataclasses.replace(TRAINED, sha256=None), "different", False),
    (dataclasses.replace(TRAINED, sha256=None), "by name", True),
    (dataclasses.replace(TRAINED, name="/models/model", sha256=None), "by name", True),  # the folder it was loaded from
    (dataclasses.replace(TRAINED, name="org/other", sha256=None), "by name", False),
])
def test_same_base_decides_by_hash_then_by_the_policy_for_unknown(held, unknown, same):
    assert same_base(TRAINED, held, unknown=unknown) is same


def test_check_same_base_policies():
    other = dataclasses.replace(TRAINED, name="org/other", sha256="00" * 32)
    with pytest.raises(LorakitError, match="trained on another base") as e:
        check_same_base(TRAINED, other, policy="error", unknown="same", held_as="this server's", where="x/lorakit.json",
                        hint="serve it elsewhere")
    assert "ab" * 32 in e.value.message and "00" * 32 in e.value.message and e.value.where == "x/lorakit.json"
    lines: list[str] = []
    assert check_same_base(TRAINED, other, policy="warn", unknown="same", held_as="on disk", consequence="off",
                           log=lines.append) is False
    assert lines == [f"warning: the base weights on disk differ from the ones this adapter was trained on "
                     f"({'00' * 6} != {'ab' * 6}); off"]
    assert check_same_base(TRAINED, other, policy="quiet", unknown="same", held_as="on disk", log=lines.append) is False
    assert len(lines) == 1 and check_same_base(TRAINED, TRAINED, policy="error", unknown="different", held_as="-")


def test_a_section_key_this_lorakit_does_not_know_is_left_out(tmp_path):
    """A later lorakit may add a LoRA or train setting without a new schema; this one still reads the file."""
    raw = json.loads((FIXTURE / "adapter" / META_FILE).read_text(encoding="utf-8"))
    raw["lora"]["a_later_setting"] = 1
    del raw["train"]["fast_path"]
    (tmp_path / META_FILE).write_text(json.dumps(raw), encoding="utf-8")
    meta = read_meta(tmp_path)
    assert meta.lora == read_meta(FIXTURE / "adapter").lora and meta.train.fast_path is TrainConfig().fast_path
