"""LoRA dropout that draws its keep-mask cheaply: the training fast path's (train/speed.py swaps it
in with `fast_lora_dropout`; the fused LoRA node of model/lora_runtime.py draws the same masks).

The keep-mask comes from 16-bit lanes of one 64-bit random word instead of `bernoulli_` per
element (4x faster on CPU, where dropout was a fifth of the step), is made as 0/1 in the type it
multiplies (uint8 bytes for fp32: no widening copy) and is kept for the backward."""

from __future__ import annotations

import math

import torch
from torch import nn

class _MaskedScale(torch.autograd.Function):
    """y = x·keep·scale, saving only the mask (bytes, or 0/1 in a 16-bit output's type) for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float, out_dtype: torch.dtype):
        ctx.save_for_backward(keep)
        ctx.scale, ctx.in_dtype = scale, x.dtype
        y = x.to(out_dtype) if x.dtype != out_dtype else x.clone()
        return y.mul_(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep * ctx.scale).to(ctx.in_dtype), None, None, None


def random_words(count: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` uniform 64-bit words (int64) on `device`.

    On the CPU they come from numpy's SFC64, seeded by one draw from torch's generator (the default
    one unless `generator` is given), so a seeded run draws the same masks and a resumed run, whose
    torch RNG state the Trainer restores, too. torch's CPU generator is a Mersenne Twister behind a
    lock: serial code, 0.60 ms per 196,608 words here against SFC64's 0.30 ms, while the second
    core waits (the dropout draw was 6 % of the main thread's time in a step)."""
    if device.type != "cpu":
        words = torch.empty(count, dtype=torch.int64, device=device)
        return words.random_(-(2**63), 2**63 - 1, generator=generator)
    import numpy as np

    seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))


ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}
"""The bit pattern of 1.0 in each 16-bit float type (0.0 is all zeros in every one)."""


def keep_mask(shape: torch.Size, p: float, device: torch.device, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.bool):
    """Bernoulli(1 - p) keep-mask from 16-bit lanes of full-range 64-bit random words.

    `random_()` with no bounds on int64 leaves the top bit 0, so the range is given explicitly;
    each lane is then uniform over [-32768, 32767] and p is rounded to a multiple of 1/65536.

    `dtype` is the type the mask multiplies. float32 gives the bool mask viewed as uint8 0/1 (the
    same byte): torch multiplies a uint8 into fp32 in vector code and a bool in scalar code, 0.15
    against 0.52 ms at 512 × 1536 here. bfloat16 or float16 gives 0.0 / 1.0 in that type, made in
    place in the random words:
    clamping a lane to [cut - 1, cut] leaves cut exactly where it is kept, so the lane minus
    (cut - 1) is 1 or 0, and times 1.0's bit pattern it *is* that float. A bool mask multiplied
    into a 16-bit tensor costs a widening copy of the mask first, which is scalar code in torch's
    CPU kernels: 16× the time of the product itself at 512 × 1536 (BENCHMARKS.md, Speed II).
    """
    n = math.prod(shape)
    lanes = random_words((n + 3) // 4, device, generator).view(torch.int16)[:n].view(shape)
    cut = -32768 + round(p * 65536)
    if dtype not in ONE_BITS:
        keep = lanes >= cut
        return keep.view(torch.uint8) if dtype == torch.float32 else keep
    if cut == -32768:  # p rounds to 0: every lane is kept (and cut - 1 is no int16)
        return torch.ones(shape, dtype=dtype, device=device)
    return lanes.clamp_(cut - 1, cut).sub_(cut - 1).mul_(ONE_BITS[dtype]).view(dtype)


def kept_fraction(p: float) -> float:
    """The exact keep probability `keep_mask` draws for a dropout p."""
    return 1.0 - round(p * 65536) / 65536


class FastDropout(nn.Module):
    """Drop-in for `nn.Dropout(p)` in front of `lora_A`; same distribution, cheaper draw."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        out_dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        keep = keep_mask(x.shape, self.p, x.device, dtype=out_dtype)
        return _MaskedScale.apply(x, keep, 1.0 / kept_fraction(self.p), out_dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


__all__ = ["FastDropout", "ONE_BITS", "keep_mask", "kept_fraction", "random_words"]
