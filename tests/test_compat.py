"""Where an adapter loads (lorakit.artifacts.compat): each rule from the adapter's own config, the
command that works instead for every 'no', the table `lorakit train` prints, and the adapter-only
GGUF export refusing by the same rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.artifacts.compat import VLLM_RANKS, format_table, llama_cpp_refusal, where_it_loads
from lorakit.errors import LorakitError

PLAIN = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def _by_name(cfg: dict) -> dict[str, object]:
    return {t.name.split(" (")[0]: t for t in where_it_loads(cfg)}


def test_a_plain_adapter_loads_everywhere():
    rows = _by_name(PLAIN)
    assert {k: t.loads for k, t in rows.items()} == {"PEFT / transformers": "yes", "vLLM": "yes",
                                                     "llama.cpp LoRA GGUF": "yes", "Ollama ADAPTER": "yes"}
    assert all(not t.instead for t in rows.values())


@pytest.mark.parametrize("r, want", [(16, "yes"), (17, "with --max-lora-rank 32"), (64, "with --max-lora-rank 64"),
                                     (320, "with --max-lora-rank 320"), (600, "no")])
def test_vllm_ranks_need_its_flag_above_16_and_stop_at_its_largest(r, want):
    vllm = _by_name({**PLAIN, "r": r})["vLLM"]
    assert vllm.loads == want
    if r > VLLM_RANKS[-1]:
        assert "lorakit merge" in vllm.instead


@pytest.mark.parametrize("key, value, vllm, gguf", [
    ("use_dora", True, "no", "no"),
    ("modules_to_save", ["lm_head"], "no", "no"),
    ("bias", "all", "no", "no"),
    ("rank_pattern", {"q_proj": 8}, "yes", "no"),
    ("target_parameters", ["experts.gate_up_proj"], "unknown", "no"),
    ("use_rslora", True, "yes", "yes"),
])
def test_each_feature_says_where_it_does_not_load_and_what_works_instead(key, value, vllm, gguf):
    rows = _by_name({**PLAIN, key: value})
    assert rows["vLLM"].loads == vllm and rows["llama.cpp LoRA GGUF"].loads == gguf
    assert rows["Ollama ADAPTER"].loads == gguf  # Ollama takes exactly llama.cpp's LoRA GGUF
    for t in rows.values():
        if t.loads in ("no", "unknown"):
            assert t.why and t.instead.startswith("lorakit "), t
    if gguf == "no":
        assert llama_cpp_refusal({**PLAIN, key: value})[0] == key
        assert "--adapter-only" not in rows["llama.cpp LoRA GGUF"].instead.split("(")[0]
    if key == "use_rslora":
        assert "rescaled" in rows["llama.cpp LoRA GGUF"].why


def test_the_adapter_only_export_refuses_by_the_same_rule():
    from lorakit.export.gguf import adapter_alpha

    with pytest.raises(LorakitError, match="target_parameters"):
        adapter_alpha({**PLAIN, "target_parameters": ["experts.down_proj"]}, Path("run/adapter"))


def test_lorakit_train_prints_the_table_for_the_adapter_it_saved(tmp_path, tiny_model_dir):
    from conftest import tiny_config

    from lorakit import config
    from lorakit.train.run import train

    said: list[str] = []
    cfg = tiny_config(tmp_path, tiny_model_dir, "r32", lora={"r": 32, "alpha": 64}, train={"max_steps": 1})
    train(config.from_dict(cfg), log=said.append, progress=False)
    text = "\n".join(said)
    assert format_table(where_it_loads({**PLAIN, "r": 32})).splitlines()[2] in text  # the vLLM line
    assert "with --max-lora-rank 32" in text and text.index("adapter saved") < text.index("where this adapter loads")
