"""The model's shape, counted exactly on the meta device, and the bytes of what does not change
with the batch: frozen weights, adapter, gradients, optimizer states."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit.config import Config

GiB, MiB = 2**30, 2**20


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


@dataclass
class ModelShape:
    hf_config: Any
    layers: int
    hidden: int
    vocab: int
    total: int  # parameters with LoRA, tied weights once (lorakit.model.lora.count_parameters)
    trainable: int
    base: int  # parameters of the base model
    quantizable: int  # weights of the base's nn.Linear layers except the output head
    quantizable_rows: int  # their output features (8-bit keeps one fp32 scale per row)
    labelled_logits: bool = True  # lorakit's loss computes logits at labelled positions only
    lora_base: int = 0  # weights of the nn.Linear layers LoRA wraps (the fast path stores them in 16 bits)


def describe_model(cfg: Config) -> ModelShape:
    """Count parameters exactly on a meta-device model: accelerate's init_empty_weights +
    from_config, then lorakit's own apply_lora (PEFT), so nothing is read or allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lorakit.model.load import load_config
    from lorakit.model.lora import apply_lora, count_parameters
    from lorakit.model.loss import split_head

    m = cfg.model
    hf = load_config(m)  # a wrong name or an unreachable hub id is a model error, said so
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=m.trust_remote_code)
    # Tie outside the context: init_empty_weights re-creates every registered parameter, which
    # would give the head its own copy of the embedding.
    model.tie_weights()
    head = model.get_output_embeddings()
    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear) and mod is not head]
    _, base = count_parameters(model)
    with init_empty_weights():
        peft_model = apply_lora(model, dataclasses.replace(cfg.lora, init="true"))  # data-driven inits need weights
    trainable, total = count_parameters(peft_model)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return ModelShape(
        hf_config=hf, layers=text.num_hidden_layers, hidden=text.hidden_size, vocab=text.vocab_size,
        total=total, trainable=trainable, base=base,
        quantizable=sum(lin.weight.numel() for lin in linears),
        quantizable_rows=sum(lin.out_features for lin in linears),
        labelled_logits=split_head(peft_model) is not None,
        lora_base=sum(mod.base_layer.weight.numel() for mod in peft_model.modules()
                      if hasattr(mod, "lora_A") and isinstance(getattr(mod, "base_layer", None), nn.Linear)),
    )


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""NF4 with double quantization: 4 bits per weight, one 8-bit absmax per block of 64 and one fp32
scale per 256 absmax blocks (bitsandbytes' defaults)."""


def weight_bytes(shape: ModelShape, weights: str, half_lora_bases: bool = False) -> int:
    """Frozen base weights in memory for 'fp32' | 'bf16' | 'fp16' | '8bit' | '4bit'.

    With 8/4-bit, every nn.Linear but the head is quantized; PEFT's prepare_model_for_kbit_training
    then casts all remaining 16-bit parameters (embeddings, norms, head) to fp32. `half_lora_bases`:
    fp32 weights under autocast on the fast path, whose LoRA-wrapped linears are stored in 16 bits
    (lorakit.train.speed.freeze_in_half)."""
    if weights == "fp32" and half_lora_bases:
        return shape.lora_base * 2 + (shape.base - shape.lora_base) * 4
    if weights in ("fp32", "bf16", "fp16"):
        return shape.base * (4 if weights == "fp32" else 2)
    rest = (shape.base - shape.quantizable) * 4
    if weights == "8bit":
        return shape.quantizable + 4 * shape.quantizable_rows + rest
    return int(shape.quantizable * NF4_BYTES) + rest


def optimizer_state_bytes(name: str) -> int:
    """Bytes of optimizer state per trainable parameter: AdamW keeps two fp32 moments."""
    name = name.lower()
    if "8bit" in name:
        return 2
    if name.startswith("sgd") or name == "adafactor":  # no momentum / factored second moment
        return 0 if name.startswith("sgd") else 4
    return 8


