"""export/delta.py: importance-weighted rounding can land on a gridded base and round the fine-tune
away; the guard then quantizes that tensor plain and leaves every other tensor weighted.

The base rows are made on a Q4_1 grid the way the embedded SmolLM2's are (a dequantized Q4_1
model); the fine-tune's change is low-rank and small against the grid's step, as a LoRA's is.
"""

from __future__ import annotations

import numpy as np
import pytest

libgguf = pytest.importorskip("libgguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from lorakit.export.delta import guard, kept  # noqa: E402

ROWS, N = 64, 576


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    free = rng.normal(0, 0.05, (ROWS, N)).astype(np.float32)
    gridded = libgguf.dequantize_rows(libgguf.quantize_rows(free, int(Q.Q4_1)), int(Q.Q4_1)).reshape(ROWS, N)
    # rank 4, |D| ~ 3e-4: about a fortieth of a Q4_1 step here (range ~0.25 over 16 levels)
    delta = (rng.normal(0, 1, (ROWS, 4)) @ rng.normal(0, 1, (4, N))).astype(np.float32) * 2e-4
    importance = rng.uniform(0.5, 2.0, N).astype(np.float32)
    return free, gridded, delta, importance


def test_weighted_rounding_of_a_gridded_base_keeps_almost_none_of_the_fine_tune():
    free, gridded, delta, importance = _case()
    # Plain rounding is unbiased: its share scatters around 1 (the rounding noise projected on D;
    # 0.5-2 leaves room for it at this size). The weighted search finds the Q4_1 levels inside
    # Q5_1's and returns the base: under a fifth of D survives.
    assert kept(gridded + delta, delta, int(Q.Q5_1), importance) < 0.2
    assert 0.5 < kept(gridded + delta, delta, int(Q.Q5_1)) < 2.0
    # The same change on a base off any grid survives weighted rounding whole (within 10 %).
    assert abs(kept(free + delta, delta, int(Q.Q5_1), importance) - 1) < 0.1


def test_guard_withholds_the_vector_of_the_snapped_tensor_only():
    free, gridded, delta, importance = _case()
    changed = {"blk.0.attn_q.weight": (gridded + delta, delta), "blk.0.attn_k.weight": (free + delta, delta)}
    vectors = {name: importance for name in changed} | {"blk.0.ffn_up.weight": importance}  # unchanged by the tune
    targets = {name: Q.Q5_1 for name in vectors}
    said = []
    out, withheld = guard(vectors, changed, targets, 0.8, log=said.append)
    assert set(out) == {"blk.0.attn_k.weight", "blk.0.ffn_up.weight"}
    assert [w["tensor"] for w in withheld] == ["blk.0.attn_q.weight"]
    assert withheld[0]["kept_weighted"] < 0.2 < 0.5 < withheld[0]["kept_plain"]
    assert "1 of 2 fine-tuned tensors quantized plain" in said[0]
    # a floor of 0 keeps every vector
    assert set(guard(vectors, changed, targets, 0.0, log=said.append)[0]) == set(vectors)


def test_guard_leaves_unquantized_tensors_alone():
    _, gridded, delta, importance = _case()
    changed = {"blk.0.attn_q.weight": (gridded + delta, delta)}
    out, withheld = guard({"blk.0.attn_q.weight": importance}, changed, {"blk.0.attn_q.weight": Q.F16}, 0.8,
                          log=lambda s: None)
    assert set(out) == {"blk.0.attn_q.weight"} and withheld == []


def test_guard_leaves_the_i_quants_and_q4_0_weighted():
    """Measured: withholding vectors cost iq4_xs and q4_0 (export/delta.py GUARDED). On these rows
    IQ4_NL weighted keeps 0.71 of D and plain 0.89, so without the rule its vector would go."""
    _, gridded, delta, importance = _case()
    changed = {"blk.0.attn_q.weight": (gridded + delta, delta)}
    for qtype in (Q.IQ4_NL, Q.IQ4_XS, Q.Q4_0):
        out, withheld = guard({"blk.0.attn_q.weight": importance}, changed, {"blk.0.attn_q.weight": qtype}, 0.8,
                              log=lambda s: None)
        assert set(out) == {"blk.0.attn_q.weight"} and withheld == []
