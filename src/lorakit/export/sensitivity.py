"""Which tensors a quantized mix hurts most, and the widest mix of that type that fits a size budget.

`lorakit export --max-size MIB` (issue 22, step 4; measured first in benchmarks/sensitivity.py):
the sensitivity of a weight is the mean KL(merged || merged with only that weight quantized) per
token over a few of the run's training rows (the importance matrix's calibration rows, so the
held-out rows of the task check stay unseen by the choice). Each weight is quantized and
dequantized by llama.cpp's own row code at the type its mix gives it — per row, so the q/k row
permutation of the conversion does not matter — and the model runs in transformers, fp32.

The most sensitive weights are then raised one type (`export.quantize.UP`) while the planned
file stays within the budget: the "dynamic quant" idea, spending the bytes between two plain
mixes where they change the output most. Whether that beats the plain mix at the same size is
not assumed: the task check measures each file (BENCHMARKS.md, "Per-tensor sensitivity").
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

MIB = 2**20


def rank(merged: str | Path, f32: str | Path, type: str, rows: Sequence[Sequence[int]], *,
         imatrix: dict | None = None, log: Callable[[str], None] = print) -> list[tuple[str, float]]:
    """[(GGUF tensor name, mean KL per token)] most sensitive first, for every weight that the
    `type` mix quantizes and `UP` can widen; `rows` are token-id lists answered in one padded batch."""
    import libgguf
    import torch
    from libgguf.inspect import inspect_gguf
    from transformers import AutoModelForCausalLM

    from lorakit.export.gguf import _targets
    from lorakit.export.imatrix import tensor_names

    info = inspect_gguf(f32)
    targets = _targets(info, type, has_imatrix=bool(imatrix))
    widened = _targets(info, type, has_imatrix=bool(imatrix), raised=frozenset(targets))
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    names = {m: g for m, g in tensor_names(model, info.metadata["general.architecture"].value).items()
             if g in targets and widened[g] != targets[g]}
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: the positions of real tokens are 0..n-1 as in use
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(list(r)), 1
    real = mask.bool()

    def logprobs():
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)[real]

    reference = logprobs()
    modules = dict(model.named_modules())
    log(f"measuring the sensitivity of {len(names)} tensors to {type} on {len(rows)} training rows "
        f"({int(real.sum())} tokens) ...")
    scores = {}
    for module, gname in names.items():
        weight = modules[module].weight
        keep = weight.data.clone()
        q = int(targets[gname])
        vec = imatrix.get(gname) if imatrix else None
        deq = libgguf.dequantize_rows(libgguf.quantize_rows(keep.numpy(), q, imatrix=vec), q)
        weight.data.copy_(torch.from_numpy(deq.reshape(keep.shape)))
        kl = torch.nn.functional.kl_div(logprobs(), reference, log_target=True, reduction="sum").item()
        weight.data.copy_(keep)
        scores[gname] = kl / int(real.sum())
    return sorted(scores.items(), key=lambda kv: kv[1], reverse=True)


def within(f32: str | Path, type: str, ranked: Sequence[tuple[str, float]], budget_bytes: int, *,
           has_imatrix: bool = False) -> frozenset[str]:
    """The most sensitive tensors of `ranked`, in order, that can be raised one type while the
    tensor data of the `type` file stays within `budget_bytes` (a tensor that does not fit is
    passed over for the next, smaller one)."""
    from libgguf.inspect import inspect_gguf

    from lorakit.export.gguf import tensor_bytes

    info = inspect_gguf(f32)
    plain = tensor_bytes(info, type, has_imatrix=has_imatrix)
    up = tensor_bytes(info, type, has_imatrix=has_imatrix, raised=frozenset(n for n, _ in ranked))
    total, raised = sum(plain.values()), []
    for name, _ in ranked:
        extra = up[name] - plain[name]
        if total + extra <= budget_bytes:
            raised.append(name)
            total += extra
    return frozenset(raised)


__all__ = ["MIB", "rank", "within"]
