"""Causal-LM loss computed only where there are labels.

The stock path materialises logits for every position, `[batch × seq × vocab]` (49k columns
for SmolLM2), although completion-only training needs them only at response tokens, often a
fifth of the sequence. Here the LM head runs on the hidden states of labelled positions only:

    loss = Σ_{i: y_{i+1} ≠ -100} CE(W_head · h_i, y_{i+1}) / N

with N the trained-token count of the whole optimizer step (`num_items_in_batch`), which is
what the Trainer divides by to make gradient accumulation exact. The value equals the model's
own loss; only the work on unlabelled positions is skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.data.collate import segment_kwargs

# Architectures whose logits are exactly `lm_head(final hidden state)` unless their config says
# otherwise (Gemma 2's final soft-capping, Cohere's logit scale, a mixture-of-experts' router loss
# when output_router_logits is on), which `split_head` checks: the shortcut would skip them.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3_text", "olmo", "olmo2", "smollm3",
               "qwen3_moe", "mixtral"}


def split_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder body, lm_head) when the shortcut is exact for this model, else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    body, head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
    if cfg is None or body is None or not isinstance(head, torch.nn.Linear):
        return None
    if getattr(cfg, "model_type", None) not in _PLAIN_HEAD:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    if getattr(cfg, "output_router_logits", False):  # the model's loss adds the router's balancing loss
        return None
    return body, head


def labelled_loss(body, head, inputs: dict[str, torch.Tensor], num_items: torch.Tensor | int,
                  head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of token cross-entropies at labelled positions, divided by `num_items`.

    `head_weight`: a frozen head's weight already in the autocast dtype, so that it is not cast
    again at every pass (the head is as large as the embedding: 56 MB for SmolLM2 in bf16); with it
    the head runs in chunks (`head_cross_entropy`).
    """
    labels = inputs["labels"][:, 1:]
    hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                  position_ids=inputs.get("position_ids"),
                  **segment_kwargs(body, inputs)).last_hidden_state  # (B, T, H)
    keep = labels != -100
    rows = hidden[:, :-1][keep]
    if head_weight is not None:  # a frozen head: chunked, the gradient made in the forward
        return head_cross_entropy(rows, head_weight, labels[keep]) / num_items
    logits = head(rows)
    loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
    return loss / num_items


HEAD_CHUNK = 128
"""Labelled positions per chunk of `head_cross_entropy`: 128 × 49,152 vocab is 24 MiB of fp32
logits for SmolLM2, against N × V × 16 B for the whole pass in the unchunked loss. Chunks of 64,
128 and 256 timed within noise of each other; the smaller memory decided (BENCHMARKS.md)."""


class _HeadCrossEntropy(torch.autograd.Function):
    """Σ CE(h_i · Wᵀ, y_i) over rows h_i of a frozen head W, in chunks of rows.

    The unchunked loss keeps the pass's logits three times over for the backward (16-bit, fp32,
    log-softmax) and makes a fourth, their gradient: N × V × 16 B, which at 500 labelled positions
    is 375 MiB for a 49k vocabulary and grows with the longest pass. With W frozen the only
    gradient needed is the rows', (softmax − onehot) · W, so each chunk computes it right after its
    loss, while its logits are at hand, and only that N × H gradient is kept. The arithmetic is the
    unchunked one: 16-bit logits from the same matmul, softmax in fp32, the gradient cast to 16 bits
    before the matmul with W, so the two agree to 16-bit rounding (tests/test_loss.py).
    """

    @staticmethod
    def forward(ctx, rows, weight, targets, need_grad: bool, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad = torch.empty_like(rows) if need_grad else None
        for s in range(0, rows.shape[0], chunk):
            per_row = _chunk_cross_entropy(rows, weight, targets, s, chunk, grad)
            total += per_row.sum()
        if need_grad:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None, None


def _chunk_cross_entropy(rows, weight, targets, s: int, chunk: int, grad: torch.Tensor | None) -> torch.Tensor:
    """Token cross-entropies of rows[s:s+chunk] through the frozen head; their gradient w.r.t. the
    rows written into grad[s:s+chunk] when `grad` is given (see `_HeadCrossEntropy`)."""
    h = rows[s:s + chunk].to(weight.dtype)
    t = targets[s:s + chunk]
    logits = F.linear(h, weight).float()  # (c, V)
    picked = logits.gather(1, t[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()  # one pass of exp, in place of the logits
    norm = probs.sum(dim=-1, keepdim=True)
    per_row = top.squeeze(1) + norm.log().squeeze(1) - picked  # log-sum-exp − target logit
    if grad is not None:
        probs.div_(norm)  # softmax
        probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
        grad[s:s + chunk] = probs.to(weight.dtype) @ weight
    return per_row


class _HeadTokenCrossEntropy(torch.autograd.Function):
    """`_HeadCrossEntropy` per row: the N token cross-entropies, for losses that weigh tokens
    unequally (preference losses sum them per sequence). Row i's gradient is its saved
    (softmax − onehot) · W times the upstream gradient of its own value."""

    @staticmethod
    def forward(ctx, rows, weight, targets, need_grad: bool, chunk: int):
        grad = torch.empty_like(rows) if need_grad else None
        out = torch.cat([_chunk_cross_entropy(rows, weight, targets, s, chunk, grad)
                         for s in range(0, rows.shape[0], chunk)]) if rows.shape[0] else rows.new_zeros(0).float()
        if need_grad:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad.float() * g[:, None].float()).to(grad.dtype), None, None, None, None


def head_token_cross_entropy(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """The (N,) token cross-entropies of `rows` (N, H) through the frozen head `weight` (V, H)."""
    need_grad = torch.is_grad_enabled() and rows.requires_grad
    return _HeadTokenCrossEntropy.apply(rows, weight.detach(), targets, need_grad, chunk)


def head_cross_entropy(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Sum of token cross-entropies of `rows` (N, H) through the frozen head `weight` (V, H)."""
    need_grad = torch.is_grad_enabled() and rows.requires_grad
    return _HeadCrossEntropy.apply(rows, weight.detach(), targets, need_grad, chunk)


@torch.no_grad()
def summed_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of token cross-entropies, labelled positions) of a batch: held-out loss for `lorakit eval`.

    The same labelled-positions loss as training where the shortcut is exact (`split_head`), else
    the model's own logits; summing lets a caller weight every token equally across batches
    (perplexity = exp(total / count)), which a mean of batch means would not."""
    labels = inputs["labels"][:, 1:]
    count = int((labels != -100).sum())
    if count == 0:
        return 0.0, 0
    parts = split_head(model)
    if parts is not None:
        return float(labelled_loss(*parts, inputs, 1)), count
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits[:, :-1]
    keep = labels != -100
    return float(F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")), count


def labelled_loss_through(model, inputs: dict[str, torch.Tensor], num_items: torch.Tensor | int) -> torch.Tensor:
    """`labelled_loss` computed through the model's own forward, for a model wrapped in DDP.

    DDP all-reduces gradients only after a forward through its wrapper (its reducer arms the
    gradient hooks there), so the body cannot be called directly. The model's `logits_to_keep`
    takes the positions instead: logits are made only at columns where some row has a label
    (all of them in a packed row), and the same sum of cross-entropies divided by `num_items`."""
    labels = inputs["labels"][:, 1:]
    keep = labels != -100
    cols = keep.any(0).nonzero().flatten()
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"), logits_to_keep=cols, use_cache=False,
                **segment_kwargs(body_of(model), inputs))
    picked = keep[:, cols]
    loss = F.cross_entropy(out.logits[picked].float(), labels[:, cols][picked], reduction="sum")
    return loss / num_items


def body_of(model):
    """The decoder body under DDP's and PEFT's wrappers (what `segment_kwargs` reads the attention of)."""
    inner = getattr(model, "module", model)  # DDP keeps the model as .module
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return getattr(inner, "model", inner)


def sequence_ids(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which sequence each position belongs to, numbered in order through the batch: in a packed
    row a new sequence starts where position_ids restart at 0; in a padded batch each row is one."""
    positions = inputs.get("position_ids")
    if positions is not None and inputs.get("attention_mask") is None:
        starts = (positions == 0).long()
        starts[:, 0] = 1
        ids = starts.flatten().cumsum(0).view_as(positions) - 1
        return ids
    b, t = inputs["input_ids"].shape
    return torch.arange(b, device=inputs["input_ids"].device)[:, None].expand(b, t)


def token_logps(body, head, inputs: dict[str, torch.Tensor], head_weight: torch.Tensor | None = None,
                model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every labelled token, the index of the sequence it belongs to), in row order.
    `model`: go through the whole model's forward instead of body + head (a model wrapped in DDP
    must see the forward to all-reduce its gradients); logits are then made at labelled columns.
    `head_weight`: a frozen head in the autocast dtype, run in chunks (`head_token_cross_entropy`).
    The body runs with use_cache=False, which also tells transformers that a packed row's position
    restarts are sequence bounds (with a cache it builds one causal mask over the whole row)."""
    labels = inputs["labels"][:, 1:]
    keep = labels != -100
    seq = sequence_ids(inputs)[:, 1:][keep]
    if model is not None:
        cols = keep.any(0).nonzero().flatten()
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                    position_ids=inputs.get("position_ids"), logits_to_keep=cols, use_cache=False,
                    **segment_kwargs(body, inputs))
        picked = keep[:, cols]
        return -F.cross_entropy(out.logits[picked].float(), labels[:, cols][picked], reduction="none"), seq
    hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                  position_ids=inputs.get("position_ids"), use_cache=False,
                  **segment_kwargs(body, inputs)).last_hidden_state
    rows = hidden[:, :-1][keep]
    if head_weight is not None:
        return -head_token_cross_entropy(rows, head_weight, labels[keep]), seq
    return -F.cross_entropy(head(rows).float(), labels[keep], reduction="none"), seq
