"""Where an adapter will load: PEFT, vLLM, llama.cpp's LoRA GGUF, Ollama's ADAPTER.

Adapters that train fine and then do not load where they are deployed cost users days: vLLM
refuses DoRA, `modules_to_save` and a LoRA bias, and takes ranks up to `--max-lora-rank` (16
unless raised, from a fixed set); llama.cpp's LoRA format has no DoRA magnitudes, no full module
copies, no per-module ranks, and lorakit does not write expert tensors into it. Read from the
adapter's own `adapter_config.json`, so the answer is about the files, whoever trained them.
`lorakit train` prints the table at the end and `lorakit export` before it starts; the adapter-only
GGUF export refuses by the same rules (`llama_cpp_refusal`), so the table and the refusal never
disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's allowed `--max-lora-rank` values (vllm.config.lora.MaxLoRARanks); its default is 16."""
VLLM_DEFAULT_RANK = 16

MERGE_FOR_VLLM = "lorakit merge RUN --out DIR, then serve DIR with vLLM"
MERGED_GGUF = "lorakit export RUN --gguf TYPE (the merged model, without --adapter-only)"


@dataclass(frozen=True)
class Target:
    """One place an adapter may be loaded, and whether this one will."""

    name: str
    loads: str  # 'yes' | 'no' | 'unknown' | a condition ('with --max-lora-rank 32')
    why: str = ""  # the reason for anything but a plain 'yes'
    instead: str = ""  # the command that works instead (for 'no' and 'unknown')


def _experts(cfg: dict[str, Any]) -> list[str]:
    return list(cfg.get("target_parameters") or [])


def _trains_bias(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("lora_bias")) or cfg.get("bias", "none") != "none"


def llama_cpp_refusal(cfg: dict[str, Any]) -> tuple[str, str] | None:
    """(adapter_config.json key, why) when llama.cpp's LoRA GGUF cannot express this adapter."""
    if cfg.get("use_dora"):
        return "use_dora", "a DoRA adapter rescales each weight column by a learned magnitude"
    if cfg.get("modules_to_save"):
        return "modules_to_save", f"full copies of {cfg['modules_to_save']} were trained"
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            return key, f"per-module ranks/alphas {cfg[key]} differ from r / lora_alpha"
    if _experts(cfg):
        return "target_parameters", f"LoRA on expert tensors ({', '.join(_experts(cfg))}) is not a linear layer's"
    if _trains_bias(cfg):
        return "bias", "trained biases are not LoRA matrices"
    return None


def _vllm(cfg: dict[str, Any]) -> Target:
    name = "vLLM (--enable-lora)"
    if cfg.get("use_dora"):
        return Target(name, "no", "vLLM has no DoRA", MERGE_FOR_VLLM)
    if cfg.get("modules_to_save"):
        return Target(name, "no", f"vLLM loads only LoRA matrices, not the full copies of {cfg['modules_to_save']}",
                      MERGE_FOR_VLLM)
    if _trains_bias(cfg):
        return Target(name, "no", "vLLM takes LoRA adapters without trained biases (bias: none)", MERGE_FOR_VLLM)
    if _experts(cfg):
        return Target(name, "unknown", "LoRA on expert tensors (PEFT target_parameters) is not checked against vLLM",
                      MERGE_FOR_VLLM)
    ranks = [int(cfg.get("r", 0)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    r = max(ranks)
    if r > VLLM_RANKS[-1]:
        return Target(name, "no", f"rank {r} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})",
                      MERGE_FOR_VLLM)
    if r > VLLM_DEFAULT_RANK:
        need = next(x for x in VLLM_RANKS if x >= r)
        return Target(name, f"with --max-lora-rank {need}", f"rank {r} is above vLLM's default limit of "
                      f"{VLLM_DEFAULT_RANK}")
    return Target(name, "yes")


def where_it_loads(cfg: dict[str, Any]) -> list[Target]:
    """The table for the adapter whose adapter_config.json is `cfg`."""
    peft = Target("PEFT / transformers (PeftModel.from_pretrained)", "yes",
                  "PEFT 0.17 or later: LoRA on expert tensors (target_parameters)" if _experts(cfg) else "")
    refusal = llama_cpp_refusal(cfg)
    if refusal is None:
        gguf = Target("llama.cpp LoRA GGUF (lorakit export RUN --adapter-only)", "yes",
                      "alpha rescaled for rsLoRA at export" if cfg.get("use_rslora") else "")
        ollama = Target("Ollama ADAPTER", "yes", "that LoRA GGUF, over the same base GGUF as the Modelfile's FROM")
    else:
        key, why = refusal
        gguf = Target("llama.cpp LoRA GGUF (lorakit export RUN --adapter-only)", "no", f"{key}: {why}", MERGED_GGUF)
        ollama = Target("Ollama ADAPTER", "no", "it takes a llama.cpp LoRA GGUF (see above)",
                        "lorakit export RUN --gguf TYPE --ollama (the merged model as the FROM)")
    return [peft, _vllm(cfg), gguf, ollama]


def for_adapter(adapter_dir: Path) -> list[Target]:
    """`where_it_loads` for the adapter folder `adapter_dir` (its adapter_config.json)."""
    import json

    from lorakit.artifacts.paths import PEFT_CONFIG

    return where_it_loads(json.loads((Path(adapter_dir) / PEFT_CONFIG).read_text(encoding="utf-8")))


def format_table(rows: list[Target]) -> str:
    """The table as `lorakit train` and `lorakit export` print it."""
    width = max(len(t.name) for t in rows)
    lines = ["where this adapter loads:"]
    for t in rows:
        line = f"  {t.name:<{width}}  {t.loads}"
        if t.why:
            line += f" ({t.why})"
        if t.instead:
            line += f"; instead: {t.instead}"
        lines.append(line)
    return "\n".join(lines)


__all__ = ["Target", "VLLM_RANKS", "for_adapter", "format_table", "llama_cpp_refusal", "where_it_loads"]
