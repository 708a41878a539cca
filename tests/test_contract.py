"""The run-folder contract: a folder written by an earlier lorakit (schema 2) still loads, and
writes back byte for byte (tests/fixtures/run_schema2, written by fixtures/make_run_schema2.py)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from lorakit import config as config_mod
from lorakit.artifacts import META_FILE, RunPaths, find_adapter_dir, read_meta

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
    cfg = config_mod.load(paths.config)
    assert cfg.lora.r == 8 and cfg.train.lr == 2e-4 and cfg.data.template == "chatml"
    [summary] = paths.eval_summaries()
    assert summary.data == "validation" and summary.scores == {"tuned": {"exact_match": 0.5}}


def test_a_schema_2_meta_writes_back_the_same_json():
    """Schema 2 on disk is unchanged: what is read is written back as it was."""
    text = (FIXTURE / "adapter" / META_FILE).read_text(encoding="utf-8")
    assert json.loads(read_meta(FIXTURE / "adapter").to_json()) == json.loads(text)


# --------------------------------------------------------------------------- one owner for names and renames

SRC = Path(__file__).parents[1] / "src" / "lorakit"
OWNER = SRC / "artifacts"
FILES = {"lorakit.json", "adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
         "diagnostics.jsonl", "data.json", "merge.json", "merge_parity.json", "report.html"}
SUFFIXES = (".verify.json", ".summary.json", ".partial")
STEMS = ("adapter_model.", "lorakit.json")
FOLDERS = {"adapter", "checkpoints", ".staging", "logs", "eval", "export", "ollama"}


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
