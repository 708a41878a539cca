"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, built offline.

The tokenizer is trained here on a few sentences so that every test runs without the hub
and without the embedded model; its vocabulary size is the model's vocabulary size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "### Instruction:\nRespond to this customer complaint about shipping delays.\n\n### Input:\n",
    "My order #12345 was supposed to arrive 5 days ago.\n\n### Response:\nI sincerely apologize.",
    "Our standard return policy covers items within 30 days of purchase.",
    "The quick brown fox jumps over the lazy dog. Hello world! 0123456789",
    "Category: shipping returns billing account product. Order number: #",
]


FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "olmo2", "qwen3_moe")
"""The model families the tests build tiny random models of ('llama' is the tests' long-standing
tied-embedding Llama; 'llama3' is Llama 3's shape: untied head, rope scaling, grouped-query)."""

SLIDING = 24
"""The tiny models' sliding window: shorter than the tests' packed rows, so a kernel that ignored
it would change the loss."""


def family_config(family: str, vocab: int, tok, hidden: int = 64, layers: int = 2, **overrides):
    """The transformers configuration of a tiny random model of `family`, from the family's own
    configuration class, with the architecture details that family is known for switched on
    (`overrides`: config keys to set otherwise)."""
    cfg = _family_config(family, vocab, tok, hidden, layers)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _family_config(family: str, vocab: int, tok, hidden: int, layers: int):
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    head = hidden // 4
    if family == "llama":
        return T.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "llama3":  # untied head, rope scaled as Llama 3.1+ ships it
        return T.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    if family == "qwen2":  # Qwen2.5: q/k/v biases, tied embeddings in the small sizes
        return T.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":  # q/k RMS norms
        return T.Qwen3Config(**common, head_dim=head, tie_word_embeddings=True)
    if family == "gemma2":  # attention and final logit soft-capping, sliding window every other layer
        return T.Gemma2Config(**common, head_dim=head, query_pre_attn_scalar=head, sliding_window=SLIDING,
                              layer_types=["sliding_attention", "full_attention"][:layers] * (layers // 2 or 1),
                              tie_word_embeddings=True)
    if family == "gemma3":  # q/k norms, local/global rope, sliding window, (1 + w) norms, scaled embeddings;
        # the layer types are the family's own pattern (five sliding, then one global), as llama.cpp assumes
        return T.Gemma3TextConfig(**common, head_dim=head, query_pre_attn_scalar=head, sliding_window=SLIDING,
                                  tie_word_embeddings=True)
    if family == "mistral":  # sliding window
        return T.MistralConfig(**common, head_dim=head, sliding_window=SLIDING, tie_word_embeddings=False)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return T.Phi3Config(**common, tie_word_embeddings=False)
    if family == "olmo2":  # q/k norms over all heads, norms after attention and MLP
        return T.Olmo2Config(**common, tie_word_embeddings=False)
    if family == "qwen3_moe":  # a router and experts in every layer
        return T.Qwen3MoeConfig(**common, head_dim=head, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=hidden, decoder_sparse_step=1, norm_topk_prob=True,
                                tie_word_embeddings=False)
    raise ValueError(f"no tiny model of family {family!r}: one of {FAMILIES}")


def build_tiny_model(folder: Path, *, hidden: int = 64, layers: int = 2, chat_template: str | None = CHATML,
                     pad_is_eos: bool = True, seed: int = 0, family: str = "llama", tokenizer=None,
                     **overrides) -> Path:
    """Write a random model of `family` (a Llama unless named) + tokenizer to `folder` and return it.
    `tokenizer`: one to save with it instead of the small BPE trained here (llama.cpp's converter
    knows only real tokenizers: the GGUF tests pass the embedded SmolLM2's)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_tok = tokenizer if tokenizer is not None else _small_tokenizer(chat_template, pad_is_eos)
    folder.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, len(hf_tok), hf_tok, hidden, layers, **overrides))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _small_tokenizer(chat_template: str | None, pad_is_eos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>" if pad_is_eos else None,
    )
    if chat_template:
        hf_tok.chat_template = chat_template
    return hf_tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


ALPACA_ROWS = [
    {"instruction": "Explain the return policy to a customer.", "input": "Can I return an item after 45 days?",
     "output": "Our standard return policy covers items within 30 days of purchase."},
    {"instruction": "Say hello.", "input": "", "output": "Hello world!"},
    {"instruction": "Classify this message.", "input": "Where is my order #12345?", "output": "Category: shipping"},
    {"instruction": "Extract the order number.", "input": "My order #555 is late.", "output": "Order number: #555"},
] * 4


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(tmp: Path, model_dir: Path, name: str, **sections: dict) -> dict:
    """A config (as a mapping) that trains the tiny model for 4 steps on ALPACA_ROWS, a quarter of
    them held out; each keyword updates that section."""
    data = write_jsonl(tmp / "data.jsonl", ALPACA_ROWS)
    raw = {
        "model": {"name": str(model_dir)},
        "data": {"train": [str(data)], "template": "alpaca", "max_length": 96, "val_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "lr": 5.0e-3, "logging_steps": 1,
                  "save_steps": 0, "warmup": 0, "mixed_precision": "no", "report_to": []},
        "output": {"dir": str(tmp / "runs"), "name": name},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)


def make_adapter(base_dir: Path, tokenizer, folder: Path, seed: int, *, lora=None, template: str = "alpaca",
                 sha: str | None = None, name: str | None = None, scale: float = 0.5,
                 quantization: str = "none") -> Path:
    """A LoRA adapter over `base_dir` with random (non-zero) LoRA weights, saved as `lorakit train`
    saves one (PEFT files + tokenizer + lorakit.json) into `folder/adapter`; returns `folder`.

    B = 0 at PEFT's init would make adapter and base identical, so every lora_* parameter (and
    DoRA magnitude, modules_to_save copy) gets seeded noise of std `scale` instead."""
    import torch

    from lorakit.artifacts import AdapterMeta, BaseModelRef, DataRef, save_adapter
    from lorakit.config import LoraConfig, ModelConfig, TrainConfig
    from lorakit.data.templates import resolve_template
    from lorakit.model.load import load_model
    from lorakit.model.lora import apply_lora

    lora = lora or LoraConfig(r=4, alpha=8, dropout=0.0)
    model, info = load_model(ModelConfig(name=str(base_dir)), training=False)
    model = apply_lora(model, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale) if "magnitude" in n or "modules_to_save" in n \
                    else p.copy_(torch.randn(p.shape, generator=g) * scale)
    tmpl = resolve_template(template, tokenizer)
    meta = AdapterMeta(BaseModelRef(name or str(base_dir), str(base_dir), sha or info.sha256, info.dtype, quantization),
                       tmpl, DataRef([], [], "", 0, 0), 96, lora, TrainConfig(), {}, {})
    save_adapter(model, tokenizer, folder / "adapter", meta)
    return folder


EVAL_ROWS = [("What is the capital of France?", "Paris"), ("Name a primary colour.", "Red"),
             ("How many days are in a week?", "Seven"), ("Reply with the word yes.", "yes")]


def eval_rows_file(folder: Path, rows: list[tuple[str, str]] | None = None) -> Path:
    """A small Alpaca JSONL with answers, for checks that answer held-out rows (export's task check)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "heldout.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in rows or EVAL_ROWS),
                    encoding="utf-8")
    return path


def kill_at_checkpoint(cmd: list[str], checkpoints: Path, step: int, env: dict | None = None,
                       limit_s: float = 240) -> None:
    """Run `cmd` (a training) and SIGKILL it as soon as checkpoint-`step` exists in `checkpoints`:
    a crash at an unknown point after a complete checkpoint, for the exact-resume tests."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + limit_s
    while not (checkpoints / f"checkpoint-{step}").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
