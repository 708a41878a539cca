"""How much of the fine-tune a quantized tensor keeps, and the importance matrix held back where
weighting would round the fine-tune away.

The importance matrix makes the quantizer minimise sum_j w_j (W_ij - Q_ij)^2, which assumes the
rounding errors of a row are unrelated to each other, so that they average out in the product.
A fine-tune's change of a weight, D = W - W0, is not like that: it is low-rank and coherent, and
its effect on the output adds up over a whole row. When the base W0 itself lies on a grid the
quantizer can reach (the embedded SmolLM2 is a dequantized Q4_1 model, whose levels Q5_1 and
Q4_K can land on), the weighted search finds that grid: the smallest weighted error, and the
base's weights — the fine-tune is rounded away while every per-weight measure improves.
Measured on the demo: Q5_1 with the importance matrix had a sixth of the plain mix's mean error
and kept 16 % of D (plain: all of it, with noise), and its answers were those of the base
(BENCHMARKS.md, "What the importance matrix rounds away").

`kept` measures it per tensor: the share of D that survives, the projection
<Q - W0, D> / <D, D> (1: all of it; 0: the base's weights). `guard` quantizes each fine-tuned
tensor of a weighted file both ways and withholds the tensor's importance vector when the
weighted rounding keeps less than `floor` (export.imatrix_keep) of D and the plain one keeps
more, for the types in `GUARDED`; the rest stay weighted.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

GUARDED = ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1")
"""The tensor types the guard measures: those of q4_k_m and q5_k_m (with their 32-block fallbacks),
where withholding helped on both measured tasks (demo q4_k_m 15.0 -> 5.0 points, KL 0.055 -> 0.025;
JSON task q4_k_m KL 0.00056 -> 0.00043). Every other type keeps every importance vector, measured:
withholding cost iq4_xs on both tasks (demo KL 0.122 -> 0.186; JSON task 0.0 -> 2.1 points) and
q4_0 on the JSON task (1.2 -> 15.8 points; BENCHMARKS.md). The share-of-D criterion ignores how much
larger plain rounding's error is, which at 4 bits symmetric or non-uniform outweighs the bias."""


def kept(weight: np.ndarray, delta: np.ndarray, qtype: int, importance: np.ndarray | None = None) -> float:
    """The share of `delta` (W - W0) that `weight` (W) keeps once quantized to `qtype` by llama.cpp's
    row code (with `importance`, as llama-quantize --imatrix): <Q - W0, D> / <D, D>."""
    import libgguf

    w = np.ascontiguousarray(weight, dtype=np.float32)
    q = libgguf.dequantize_rows(libgguf.quantize_rows(w, qtype, imatrix=importance), qtype).reshape(w.shape)
    d = np.asarray(delta, dtype=np.float64)
    return float(((q - (w - delta)).astype(np.float64) * d).sum() / (d * d).sum())


def deltas(merged, base, names: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{GGUF name: (W, W - W0)} for every module of `names` (module -> GGUF name) the fine-tune
    changed, from the merged and the base model (transformers, fp32)."""
    merged_modules, base_modules = dict(merged.named_modules()), dict(base.named_modules())
    out = {}
    for module, gname in names.items():
        w = merged_modules[module].weight.detach().float().numpy()
        d = w - base_modules[module].weight.detach().float().numpy()
        if np.any(d):
            out[gname] = (w, d)
    return out


def guard(vectors: dict[str, np.ndarray], changed: dict[str, tuple[np.ndarray, np.ndarray]],
          targets: dict[str, object], floor: float, *,
          log: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], list[dict]]:
    """`vectors` without the tensors whose weighted rounding keeps less than `floor` of the fine-tune
    while plain rounding keeps more; and what was measured for each withheld tensor. Plain rounding
    is unbiased (its kept share scatters around 1), so a weighted tensor far below 1 has been pulled
    towards the base, not merely rounded."""
    from gguf import GGMLQuantizationType as Q

    out, withheld = dict(vectors), []
    for name, (w, d) in changed.items():
        qtype = targets.get(name)
        if name not in vectors or qtype is None or qtype.name not in GUARDED:
            continue
        weighted = kept(w, d, int(qtype), vectors[name])
        if weighted >= floor:
            continue
        plain = kept(w, d, int(qtype))
        if abs(plain - 1) < abs(weighted - 1):
            del out[name]
            withheld.append({"tensor": name, "type": qtype.name, "kept_weighted": round(weighted, 3),
                             "kept_plain": round(plain, 3)})
    if withheld:
        worst = min(withheld, key=lambda r: r["kept_weighted"])
        log(f"importance matrix: {len(withheld)} of {len(changed)} fine-tuned tensors quantized plain, where the "
            f"weighting kept under {floor:.0%} of the fine-tune's change (worst: {worst['tensor']} "
            f"{worst['type']}, {worst['kept_weighted']:.0%} weighted, {worst['kept_plain']:.0%} plain)")
    return out, withheld


def changed_tensors(merged_dir, base_config, arch: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`deltas` of a merged folder against its base (`base_config`: the adapter's
    `meta.base.model_config(dtype="fp32")`), named as in a GGUF of architecture `arch`."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.export.imatrix import tensor_names
    from lorakit.model.load import load_model

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base, _ = load_model(base_config, training=False)
    return deltas(merged, base.float(), tensor_names(merged, arch))


__all__ = ["GUARDED", "changed_tensors", "deltas", "guard", "kept"]
