"""The one-way rule of the house: every import in src/lorakit (lazy ones inside functions too) goes
from a later layer to an earlier one or within a layer, and no two parts import each other.

The layers, from the ground up (README, "Development"): the shared ground (errors, the config
schema, the `auto` rules, data, the run-folder contract, metrics), then model → infer → train →
the stages that use a trained adapter (eval, pairs, merge, export, serve, chat) → the views over runs
(report, runs, plan, doctor) → the pipeline that chains stages → the sweep → the studio → the front
doors (CLI, demo).
The decoder (infer) sits below training because RL rollouts generate with the adapter being
trained; a stage reaches a later one only through a callback it is handed (pipeline.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

LAYERS: list[set[str]] = [
    {"errors"},
    {"config"},
    {"resolve"},
    {"data"},
    {"artifacts", "metrics", "rewards"},
    {"model"},
    {"infer"},
    {"train"},
    {"evaluate", "pairs", "merge", "export", "serve", "chat"},
    {"report", "runs", "plan", "doctor"},
    {"pipeline"},
    {"sweep"},
    {"studio"},
    {"cli", "demo", "__main__", "__init__"},
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str | None:
    """The part of lorakit a dotted module name belongs to (lorakit.export.gguf -> export)."""
    bits = module.split(".")
    return bits[1] if bits[0] == "lorakit" and len(bits) > 1 else None


def imports() -> list[tuple[str, str, Path, int]]:
    """(importing part, imported part, file, line) for every import of another part of lorakit,
    wherever it stands in the file (module level, function body, TYPE_CHECKING block)."""
    out = []
    for file in sorted(SRC.rglob("*.py")):
        rel = file.relative_to(SRC)
        me = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the file's own package
                    pkg = ["lorakit", *rel.parts[:-1]][: len(rel.parts) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" for a in node.names] if base == "lorakit" else [base]
            else:
                continue
            for name in names:
                part = _part(name)
                if part is not None and part != me:
                    out.append((me, part, rel, node.lineno))
    return out


def test_every_part_has_a_layer():
    parts = {p.name.removesuffix(".py") for p in SRC.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert parts - set(LAYER) == set(), "a new part of lorakit needs its place in LAYERS (and the README)"


def test_the_walk_sees_lazy_imports():
    """The rule is worth only what the walk sees: a function-level import is found."""
    found = {(a, b) for a, b, _, _ in imports()}
    assert ("pipeline", "train") in found and ("pipeline", "report") in found  # both inside functions


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_no_import_reaches_a_later_layer(layer):
    wrong = [f"{file}:{line}: {me} imports {part} (layer {LAYER[part]} > {LAYER[me]})"
             for me, part, file, line in imports() if LAYER.get(me) == layer and LAYER.get(part, -1) > layer]
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for me, part, _, _ in imports():
        graph.setdefault(me, set()).add(part)
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles)))
