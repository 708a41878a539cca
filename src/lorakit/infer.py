"""Generation with a trained adapter, through the template stored with it.

The prompt is built by the same `Template.encode_prompt` that produced the training
tokens, and generation stops on the template's stop tokens, so the model sees at inference
exactly the format it learned (the guide's most common failure is a mismatch here).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.generation.streamers import BaseStreamer

from lorakit.artifacts import find_adapter_dir, read_meta
from lorakit.config import ModelConfig
from lorakit.data.templates import Template
from lorakit.errors import LorakitError


@dataclass
class Session:
    """A loaded base + adapter, its tokenizer and template."""

    model: Any
    tokenizer: Any
    template: Template
    meta: dict[str, Any] = field(default_factory=dict)
    adapter_dir: Path | None = None


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int | None = None


def base_model_config(meta: dict[str, Any], **overrides: Any) -> ModelConfig:
    base = meta.get("base_model", {})
    mcfg = ModelConfig(name=base.get("name") or base.get("path"), gguf_file=base.get("gguf_file"),
                       revision=base.get("revision"))
    for k, v in overrides.items():
        setattr(mcfg, k, v)
    return mcfg


def load_session(path: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False) -> Session:
    """Load the base model named in the adapter's lorakit.json and attach the adapter."""
    from peft import PeftModel

    from lorakit.model.load import load_model, load_tokenizer

    adapter_dir = find_adapter_dir(path)
    meta = read_meta(adapter_dir)
    mcfg = base_model_config(meta, dtype=dtype, trust_remote_code=trust_remote_code, gradient_checkpointing="off")
    tokenizer = load_tokenizer(mcfg)
    model, info = load_model(mcfg, training=False, tokenizer=tokenizer)
    expected = meta.get("base_model", {}).get("sha256")
    if expected and info.sha256 and expected != info.sha256:
        print(f"warning: base model weights differ from the ones this adapter was trained on "
              f"({info.sha256[:12]} != {expected[:12]}); outputs may be off")
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    return Session(model, tokenizer, Template.from_dict(meta["template"]), meta, adapter_dir)


class _CallbackStreamer(BaseStreamer):
    """Decode new tokens incrementally and hand each new piece of text to `emit`."""

    def __init__(self, tokenizer, prompt_len: int, emit: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.emit = emit
        self.skip = prompt_len
        self.ids: list[int] = []
        self.sent = 0

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:  # the first call carries the prompt
            n = min(self.skip, len(ids))
            ids, self.skip = ids[n:], self.skip - n
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # Hold back a trailing replacement char: a multi-byte character may be half decoded.
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


def messages_from_instruction(instruction: str, input_text: str = "", system: str | None = None) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": instruction, "input": input_text or ""})
    return msgs


def _generation_kwargs(session: Session, s: Sampling) -> dict[str, Any]:
    tok = session.tokenizer
    if s.seed is not None:
        torch.manual_seed(s.seed)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=s.max_new_tokens,
        eos_token_id=session.template.stop_token_ids(tok),
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        repetition_penalty=s.repetition_penalty,
    )
    if s.greedy or s.temperature <= 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
    return kwargs


def adapter_enabled(model, use_adapter: bool):
    """Context in which `model` answers as the tuned model, or as its base when `use_adapter` is False."""
    if use_adapter or not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    return model.disable_adapter()


@torch.no_grad()
def generate(session: Session, messages: list[dict], sampling: Sampling | None = None, *,
             stream: Callable[[str], None] | None = None, use_adapter: bool = True) -> str:
    """Generate the assistant reply to `messages`; `use_adapter=False` answers with the base."""
    if not messages or messages[-1].get("role") not in ("user", "tool"):
        raise LorakitError("the conversation must end with a user message", hint="add a final {'role': 'user', ...}")
    tok = session.tokenizer
    ids = session.template.encode_prompt(tok, messages)
    input_ids = torch.tensor([ids], device=session.model.device)
    kwargs = _generation_kwargs(session, sampling or Sampling())
    if stream is not None:
        kwargs["streamer"] = _CallbackStreamer(tok, len(ids), stream)
    with adapter_enabled(session.model, use_adapter):
        out = session.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()

@torch.no_grad()
def generate_batch(session: Session, conversations: list[list[dict]], sampling: Sampling | None = None, *,
                   use_adapter: bool = True) -> list[str]:
    """Answer several conversations in one left-padded batch (eval and the demo)."""
    tok = session.tokenizer
    kwargs = _generation_kwargs(session, sampling or Sampling())
    prompts = [session.template.encode_prompt(tok, msgs) for msgs in conversations]
    width = max(len(p) for p in prompts)
    pad = kwargs["pad_token_id"]
    device = session.model.device
    # Left padding: every prompt ends at the same column, where generation starts.
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with adapter_enabled(session.model, use_adapter):
        out = session.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
