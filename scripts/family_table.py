"""Write the README's family table from a run of tests/test_families.py (the slow GGUF checks too).

    .venv/bin/python scripts/family_table.py            # runs the tests, then rewrites the table

Each cell is the outcome of one (family, stage) test on this machine, with the reason where a
stage is declined or refused (the tests' own constants say which, and assert it), so the table
cannot claim more than the tests showed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- family-table:begin -->", "<!-- family-table:end -->"

STAGES = [  # (test function, column title)
    ("test_fast_path_equals_transformers_own_path", "fast path = transformers (loss, LoRA grads)"),
    ("test_packed_rows_train_as_padded_ones_without_the_fast_path", "packed = padded"),
    ("test_presets_name_each_familys_own_layers_never_the_head_or_router", "LoRA presets"),
    ("test_decoding_agrees_with_transformers_alone_and_batched", "decoding alone = batched = transformers"),
    ("test_merge_keeps_the_logits_and_the_greedy_answers", "merge parity"),
    ("test_resume_from_a_checkpoint_equals_the_uninterrupted_run", "resume = uninterrupted"),
    ("test_gguf_export_answers_as_transformers_in_llama_cpp", "GGUF f16 in llama.cpp"),
    ("test_the_ollama_template_renders_the_familys_chat_as_trained", "Ollama TEMPLATE (the family's template shape)"),
    ("test_a_dpo_step_starts_at_ln2_and_moves_the_adapter", "DPO step"),
    ("test_a_grpo_step_samples_from_the_family_and_learns", "GRPO step"),
]
NAMES = {"llama": "Llama (tied, SmolLM2-shaped)", "llama3": "Llama 3 (untied, rope scaling)",
         "qwen2": "Qwen2.5 (q/k/v bias)", "qwen3": "Qwen3 (q/k norm)", "gemma2": "Gemma 2 (soft-capping)",
         "gemma3": "Gemma 3 (sliding window, q/k norm)", "mistral": "Mistral (sliding window)",
         "phi3": "Phi-3 / Phi-4 (fused qkv, gate_up)", "olmo2": "OLMo 2", "qwen3_moe": "Qwen3-MoE (router, experts)"}


def outcomes(xml: Path) -> dict[tuple[str, str], str]:
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        m = re.fullmatch(r"(test_\w+)\[(\w+)\]", case.get("name", ""))
        if not m:
            continue
        state = "pass"
        for child in case:
            state = {"failure": "FAIL", "error": "ERROR", "skipped": "skipped"}.get(child.tag, state)
        out[(m.group(1), m.group(2))] = state
    return out


def table(results: dict[tuple[str, str], str]) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_families as tf
    from conftest import FAMILIES

    gguf = "test_gguf_export_answers_as_transformers_in_llama_cpp"
    ollama = "test_the_ollama_template_renders_the_familys_chat_as_trained"
    notes = {("test_fast_path_equals_transformers_own_path", "gemma2"):
             "✓ (per-example attention declined, soft-capped logits: transformers' eager kernel)",
             (gguf, "mistral"): "✓ (without a sliding window: llama.cpp runs Mistral without one)",
             **{(gguf, f): f"✓ (with {why})" for f, why in tf.OWN_TOKENIZER.items()},
             **{(ollama, f): f"refused, named: {why} (`data.template: chatml` exports)"
                for f, why in tf.OLLAMA_REFUSED.items()},
             **{(ollama, f): "✓ with tools, calls, results" + (" and reasoning" if tf.TEMPLATE_OF[f] == "chatml" else "")
                for f in tf.OLLAMA_TOOLS}}
    head = "| family | " + " | ".join(title for _, title in STAGES) + " |"
    rows = [head, "|" + "---|" * (len(STAGES) + 1)]
    for fam in FAMILIES:
        cells = []
        for test, _ in STAGES:
            state = results.get((test, fam), "not run")
            mark = "✓" if state == "pass" else state
            note = notes.get((test, fam))
            cells.append(note if note and state == "pass" else mark)
        rows.append(f"| {NAMES.get(fam, fam)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "families.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow or not slow", str(ROOT / "tests/test_families.py"),
                        f"--junitxml={xml}", "-p", "no:cacheprovider"], cwd=ROOT)
        text = table(outcomes(xml))
    readme = README.read_text(encoding="utf-8")
    if BEGIN not in readme:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    before, rest = readme.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    README.write_text(f"{before}{BEGIN}\n{text}\n{END}{after}", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
