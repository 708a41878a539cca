"""Base model loading (hub / folder / GGUF / embedded default) and LoRA wrapping.

Names are re-exported lazily so that `import lorakit.model.embedded` (e.g. by `lorakit doctor`)
does not pay for importing torch, transformers and PEFT.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "embedded_model_dir": "embedded",
    "gguf_model_dir": "embedded",
    "ModelInfo": "load",
    "load_model": "load",
    "load_tokenizer": "load",
    "resolve_dtype": "load",
    "apply_lora": "lora",
    "count_parameters": "lora",
    "describe_parameters": "lora",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lorakit.model.{_EXPORTS[name]}"), name)
