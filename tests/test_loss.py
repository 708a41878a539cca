"""The labelled-positions-only loss equals the model's own loss, value and gradients."""

import torch

from lorakit.config import LoraConfig, ModelConfig
from lorakit.model.load import load_model
from lorakit.model.lora import apply_lora
from lorakit.model.loss import labelled_loss, split_head


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


def _head_case(vocab: int = 300, hidden: int = 32, n: int = 50):
    g = torch.Generator().manual_seed(1)
    rows = (torch.randn(n, hidden, generator=g) * 2).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return rows, weight, targets


def _unchunked(rows, weight, targets):
    """The loss `labelled_loss` computed before chunking: 16-bit logits, fp32 cross-entropy."""
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(rows.to(weight.dtype), weight).float(),
                                             targets, reduction="sum")


def test_chunked_head_equals_the_unchunked_loss_and_gradient():
    """Chunks of 7 rows over 50 (the last one short) against one matmul over all of them.

    Both round the logits to bf16 from the same products and take the softmax in fp32, so the
    losses agree to fp32 summation order (rtol 1e-5). The gradients differ by where the 16-bit
    rounding falls: the unchunked backward rounds (softmax − onehot)·g, the chunked one rounds
    (softmax − onehot) and scales after the matmul; each element is a sum of such terms through
    the same bf16 weight, so they agree within two bf16 roundings, 2 × 2⁻⁸ of the largest
    element."""
    from lorakit.model.loss import head_cross_entropy

    rows, weight, targets = _head_case()
    ref = _unchunked(rows, weight, targets)
    (g_ref,) = torch.autograd.grad(ref * 0.37, rows)
    ours = head_cross_entropy(rows, weight, targets, chunk=7)
    (g_ours,) = torch.autograd.grad(ours * 0.37, rows)
    assert torch.allclose(ours, ref, rtol=1e-5)
    tol = 2 * 2**-8 * g_ref.abs().max()
    assert (g_ours - g_ref).abs().max() <= tol
    # negative control: one wrong target moves the gradient far outside that tolerance
    wrong = targets.clone()
    wrong[3] = (wrong[3] + 1) % weight.shape[0]
    (g_wrong,) = torch.autograd.grad(head_cross_entropy(rows, weight, wrong, chunk=7) * 0.37, rows)
    assert (g_wrong - g_ref).abs().max() > 10 * tol


def test_chunked_head_without_grad_makes_no_gradient():
    from lorakit.model.loss import head_cross_entropy

    rows, weight, targets = _head_case()
    with torch.no_grad():
        loss = head_cross_entropy(rows, weight, targets, chunk=16)
    assert loss.grad_fn is None
    assert torch.allclose(loss, _unchunked(rows.detach(), weight, targets), rtol=1e-5)
