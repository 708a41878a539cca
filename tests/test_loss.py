"""The labelled-positions-only loss equals the model's own loss, value and gradients."""

import torch

from lorakit.config import LoraConfig, ModelConfig
from lorakit.model.load import load_model
from lorakit.model.lora import apply_lora
from lorakit.train.loss import labelled_loss, split_head


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 20), generator=g)
    attn = torch.ones_like(ids)
    attn[2, 15:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :12] = -100  # prompt
    labels[2, 15:] = -100  # padding
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def test_labelled_loss_matches_model_loss_and_grads(tiny_model_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), training=True)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian"))
    batch = _batch(model.config.vocab_size)
    head = split_head(model)
    assert head is not None, "Llama qualifies for the shortcut"

    n = int((batch["labels"][:, 1:] != -100).sum())
    ours = labelled_loss(*head, batch, n)
    ours.backward()
    grads_ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    ref = model(**batch).loss  # transformers' mean over labelled tokens
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert grads_ours
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads_ours[k], p.grad, rtol=1e-4, atol=1e-7), k


def test_shortcut_refused_for_softcapped_heads(tiny_model_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), training=True)
    model.config.final_logit_softcapping = 30.0
    assert split_head(model) is None
    model.config.final_logit_softcapping = None
    model.config.model_type = "some_new_arch"
    assert split_head(model) is None
