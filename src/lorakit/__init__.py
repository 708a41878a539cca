"""lorakit: LoRA / QLoRA fine-tuning of causal language models from one YAML config."""

__version__ = "0.1.0"
