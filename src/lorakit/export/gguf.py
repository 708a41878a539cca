"""Write GGUF files: a merged model (f32 / f16 / bf16, or a quantized type of export/quantize.py) or an
adapter alone.

Conversion is llama.cpp's own `convert_hf_to_gguf.py` (a subprocess, offline, with the gguf-py
of the same llama.cpp commit first on its path).  We then rewrite the file once with gguf's
reader/writer, to

- carry the TRAINED chat template (`tokenizer.chat_template`) and its stop tokens as
  `tokenizer.ggml.eos_token_id` / `tokenizer.ggml.eot_token_id`, from the folder's lorakit.json,
  so llama.cpp / Ollama render prompts as training did and stop where the model learned to stop;
- quantize (q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs) with llama.cpp's row quantizers (libgguf),
  llama-quantize's per-tensor mix (export/quantize.py) and, optionally, an importance matrix
  (export/imatrix.py), from the f32 conversion.

q8_0 goes through the same path rather than the converter's `--outtype q8_0`: one rule, one
quantizer for every quantized type, and the same types as `llama-quantize ... Q8_0` (the
converter would choose per tensor on its own; its numpy Q8_0 is byte-identical to libgguf's on
the rows it quantizes, which tests/test_export_gguf.py checks).

Every output is written through `lorakit.artifacts.atomic_file` (beside the target, fsynced,
renamed): a failed or interrupted export leaves no file that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lorakit.artifacts import PEFT_CONFIG, PEFT_WEIGHTS, atomic_file
from lorakit.errors import LorakitError
from lorakit.export.quantize import FTYPES  # the quantized types: one owner

TYPES = ("f32", "f16", "bf16", *FTYPES)
_FLOAT_FTYPE = {"f32": 0, "f16": 1, "bf16": 32}  # LlamaFileType ALL_F32, MOSTLY_F16, MOSTLY_BF16


def _check_type(type: str) -> None:
    if type not in TYPES:
        raise LorakitError(f"GGUF type {type!r} is not one of {', '.join(TYPES)}",
                           hint=f"use --gguf one of {', '.join(TYPES)} (q4_k_m is the usual choice, iq4_xs the "
                           "smallest)")


def _run_converter(script: Path, args: list[str]) -> None:
    """Run a vendored llama.cpp converter offline; its failure becomes a LorakitError with its tail."""
    from lorakit.export import require_toolchain

    tc = require_toolchain()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(tc.gguf_py)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        hint = ("llama.cpp does not know this tokenizer's pre-tokenizer; export a model whose tokenizer llama.cpp "
                "supports, or use the merged safetensors folder" if "pre-tokenizer was not recognized" in tail
                else "see the converter's message above; `lorakit merge` output folders convert as they are")
        raise LorakitError(f"llama.cpp's {script.name} failed:\n{tail}", hint=hint)


def trained_metadata(model_dir: Path, template_meta) -> dict[str, object]:
    """{gguf key: value} for the trained template and its stop ids, from `template_meta` (an
    `AdapterMeta`) or the folder's lorakit.json; {} when there is neither (a plain base folder
    keeps the converter's template and EOS)."""
    from transformers import AutoTokenizer

    from lorakit.artifacts import META_FILE, read_meta

    if template_meta is None:
        if not (model_dir / META_FILE).is_file():
            return {}
        template_meta = read_meta(model_dir)
    template = template_meta.template
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    stop = template.stop_token_ids(tokenizer)
    if not stop:
        raise LorakitError("the tokenizer has no EOS token and the template no end-of-turn token", where=str(model_dir),
                           hint="set eos_token in tokenizer_config.json of the merged folder")
    # llama.cpp stops at every end-of-generation token: EOS is the tokenizer's, EOT the template's end of turn
    return {"tokenizer.chat_template": template.hf_chat_template(tokenizer),
            "tokenizer.ggml.eos_token_id": int(stop[0]), "tokenizer.ggml.eot_token_id": int(stop[-1])}


def rewrite_gguf(src: str | Path, out_file: str | Path, type: str, *, metadata: dict[str, object] | None = None,
                 imatrix: dict[str, np.ndarray] | None = None, raised: frozenset[str] = frozenset(),
                 log: Callable[[str], None] = print) -> Path:
    """Copy the GGUF `src` to `out_file` (atomically) with `metadata` overriding KV keys and, for
    a quantized type, its tensors quantized by llama-quantize's mix; `src` must then be an f32 file.

    `imatrix` ({GGUF tensor name: importance per input column}, as `libgguf.load_imatrix` returns
    it) weights each quantized tensor's rounding error, as `llama-quantize --imatrix` does; a
    tensor without an entry is quantized unweighted, as there.

    One f32 conversion can so give several types without running the converter again."""
    _check_type(type)
    out_file = Path(out_file)
    with atomic_file(out_file) as tmp:
        _rewrite(Path(src), tmp, dict(metadata or {}), type, dict(imatrix or {}), frozenset(raised), log)
    return out_file


def _targets(info, type: str, *, has_imatrix: bool = False, raised: frozenset[str] = frozenset()) -> dict[str, object]:
    """{tensor name: GGML type} of a `type` file made from the GGUF `info` (libgguf's inspect_gguf):
    llama-quantize's mix for a quantized type, the source's own types otherwise."""
    import gguf

    from lorakit.export.quantize import TensorInfo, n_gqa_from_heads, tensor_types

    Q = gguf.GGMLQuantizationType
    arch = info.metadata[gguf.Keys.General.ARCHITECTURE].value
    tensors = [TensorInfo(t.name, int(t.shape[0]), len(t.shape), Q(t.qtype_value)) for t in info.tensors]
    if type not in FTYPES:
        return {t.name: t.type for t in tensors}
    experts = info.metadata.get(f"{arch}.expert_count")
    heads, heads_kv = (info.metadata.get(f"{arch}.attention.{k}") for k in ("head_count", "head_count_kv"))
    targets = tensor_types(tensors, type, int(info.metadata[f"{arch}.block_count"].value), arch=arch,
                           n_expert=int(experts.value) if experts else 0,
                           n_gqa=n_gqa_from_heads(heads.value if heads else None, heads_kv.value if heads_kv else None),
                           has_imatrix=has_imatrix, raised=raised)
    if any(t.type != Q.F32 for t in tensors if targets[t.name] != t.type):
        raise AssertionError("quantization expects an f32 conversion")  # a bug, not a user mistake
    return targets


def planned_size(f32: str | Path, type: str, *, has_imatrix: bool = False, raised: frozenset[str] = frozenset()) -> int:
    """Bytes of tensor data a `type` file made from the f32 conversion `f32` will hold (for ordering
    candidates by size before writing any); f16 / bf16 as the converter writes them (2-D weights in
    16 bits, norms f32)."""
    from libgguf.inspect import inspect_gguf

    return sum(tensor_bytes(inspect_gguf(f32), type, has_imatrix=has_imatrix, raised=raised).values())


def header_bytes(f32: str | Path) -> int:
    """What a file holds besides tensor data (metadata, vocabulary, tensor infos, alignment): that of
    the f32 conversion, which every file made from it shares up to a few alignment bytes a tensor."""
    from libgguf.inspect import inspect_gguf

    return Path(f32).stat().st_size - planned_size(f32, "f32") + 32 * len(inspect_gguf(f32).tensors)


def tensor_bytes(info, type: str, *, has_imatrix: bool = False, raised: frozenset[str] = frozenset()) -> dict[str, int]:
    """{tensor name: bytes} in a `type` file made from the f32 conversion `info` (inspect_gguf)."""
    import libgguf

    targets = _targets(info, type, has_imatrix=has_imatrix, raised=raised)
    out = {}
    for t in info.tensors:
        n_rows = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1
        if type in _FLOAT_FTYPE and type != "f32":
            out[t.name] = (2 if len(t.shape) >= 2 else 4) * math.prod(t.shape)
        else:
            out[t.name] = n_rows * libgguf.row_size(int(targets[t.name]), int(t.shape[0]))
    return out


def _rewrite(src: Path, dst: Path, overrides: dict[str, object], type: str, imatrix: dict[str, np.ndarray],
             raised: frozenset[str], log: Callable[[str], None]) -> None:
    """Copy `src` into `dst` with `overrides` for KV keys and, for a quantized type, quantized tensors.

    Metadata is read with libgguf's header parser (0.1 s for a 49k-token vocabulary, where
    gguf.GGUFReader takes 5 s) and tensors are memory-mapped, so a tensor is in memory only
    while it is quantized and written."""
    import gguf
    import libgguf
    from libgguf.inspect import inspect_gguf

    Q, V = gguf.GGMLQuantizationType, gguf.GGUFValueType
    info = inspect_gguf(src)
    arch = info.metadata[gguf.Keys.General.ARCHITECTURE].value
    targets = _targets(info, type, has_imatrix=bool(imatrix), raised=raised)
    if type in FTYPES:
        overrides = {**overrides, gguf.Keys.General.FILE_TYPE: int(FTYPES[type][0])}
    writer = gguf.GGUFWriter(dst, arch)
    pending = dict(overrides)
    for key, v in info.metadata.items():
        if key == gguf.Keys.General.ARCHITECTURE:
            continue
        if key.startswith("tokenizer.chat_template") and "tokenizer.chat_template" in overrides:
            continue  # named templates (chat_template.tool_use ...) of the base would not be the trained one
        value = pending.pop(key) if key in pending else v.value
        writer.add_key_value(key, value, V(v.raw_type), sub_type=V(v.raw_array_type) if v.raw_array_type is not None
                             else None)
    for key, value in pending.items():
        writer.add_key_value(key, value, V.STRING if isinstance(value, str) else V.UINT32)

    def source(t) -> np.ndarray:
        """The stored bytes of `t`, as numpy shape (ne[n-1], ..., ne[0]) for float types."""
        dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(Q(t.qtype_value))
        if dtype is None:  # bf16 / quantized: raw bytes, one row per ne[0]
            return np.memmap(src, np.uint8, "r", t.data_offset, (*t.shape[:0:-1], t.nbytes // math.prod(t.shape[1:])))
        return np.memmap(src, dtype, "r", t.data_offset, tuple(reversed(t.shape)))

    for t in info.tensors:
        new, raw = targets[t.name], source(t)
        if new == t.qtype_value:
            writer.add_tensor_info(t.name, raw.shape, raw.dtype, raw.nbytes, Q(t.qtype_value))
        else:
            row = libgguf.row_size(int(new), int(t.shape[0]))
            n_rows = raw.size // t.shape[0]
            writer.add_tensor_info(t.name, (*raw.shape[:-1], row), np.dtype(np.uint8), n_rows * row, new)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in info.tensors:
        new, raw = targets[t.name], source(t)
        if new == t.qtype_value:
            writer.write_tensor_data(raw)
            continue
        weights = imatrix.get(t.name)
        if weights is not None and len(weights) != t.shape[0]:
            raise LorakitError(f"the importance matrix has {len(weights)} values for {t.name}, whose rows hold "
                               f"{t.shape[0]}", hint="collect the importance matrix on this model")
        writer.write_tensor_data(libgguf.quantize_rows(raw, int(new), imatrix=weights))
    writer.close()
    if type in FTYPES:
        counts: dict[str, int] = {}
        for q in targets.values():
            counts[q.name] = counts.get(q.name, 0) + 1
        log(f"  tensor types: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}")


WINDOW_DROPPED = ("mistral",)
"""Architectures llama.cpp runs without the sliding window their config names (Gemma 2 / 3 keep it)."""


def window_warning(config: dict) -> str | None:
    """What llama.cpp will do differently from transformers with this config's attention window."""
    window, kind = config.get("sliding_window"), config.get("model_type")
    if kind in WINDOW_DROPPED and window:
        return (f"warning: llama.cpp runs {kind} without its sliding window ({window} tokens): with more than "
                f"{window} tokens of context its answers differ from transformers' (the verification's prompts "
                "are shorter, so it cannot see this)")
    return None


def convert_raw(model_dir: str | Path, out_file: str | Path, outtype: str = "f32", *,
                log: Callable[[str], None] = print) -> Path:
    """llama.cpp's converter on a transformers folder, as it writes it (its template and EOS): the
    f32 source that `rewrite_gguf` quantizes, once for any number of types."""
    import json

    from lorakit.export import require_toolchain

    model_dir, out_file = Path(model_dir), Path(out_file)
    if not (model_dir / "config.json").is_file():
        raise LorakitError(f"{model_dir} is not a transformers model folder (no config.json)",
                           hint="pass the folder written by `lorakit merge`")
    warning = window_warning(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    if warning:
        log(warning)
    log(f"converting {model_dir} with llama.cpp's convert_hf_to_gguf.py (--outtype {outtype})")
    args = [str(model_dir), "--outtype", outtype, "--outfile", str(out_file)]
    name = base_name(model_dir)
    _run_converter(require_toolchain().convert_hf, args + (["--model-name", name] if name else []))
    return out_file


def base_name(model_dir: Path) -> str | None:
    """The GGUF's general.name for a merged folder: its base model's name (e.g. Phi-3-mini-4k-instruct),
    not the converter's default, the folder's ("Merged"). It is more than a label: llama.cpp keys
    some tokenizer rules on it (Phi-3's special tokens eat the whitespace after them only when the
    name says phi-3). None: not a lorakit folder, the converter names it."""
    from lorakit.artifacts import META_FILE, read_meta

    if not (model_dir / META_FILE).is_file():
        return None
    return Path(read_meta(model_dir).base.name.rstrip("/")).name.removesuffix(".gguf") or None


def convert_merged(model_dir: str | Path, out_file: str | Path, type: str, *, template_meta=None,
                   imatrix: dict[str, np.ndarray] | None = None, f32: str | Path | None = None,
                   raised: frozenset[str] = frozenset(), log: Callable[[str], None] = print) -> Path:
    """Convert a transformers folder (as `lorakit merge` writes it) to one GGUF file of `type`.

    `template_meta` (an `AdapterMeta`) names the trained template when the folder has no
    lorakit.json of its own; without either, the converter's template and EOS are kept (a base
    model exported for use with an adapter GGUF). `imatrix` weights a quantized type's rounding
    (`rewrite_gguf`); `f32`, an f32 conversion of the same folder (`convert_raw`), is reused
    instead of running the converter again; `raised` names tensors kept one type wider
    (`export.quantize.UP`)."""
    _check_type(type)
    model_dir, out_file = Path(model_dir), Path(out_file)
    start = time.perf_counter()
    overrides = trained_metadata(model_dir, template_meta)
    outtype = type if type in _FLOAT_FTYPE else "f32"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_file.name}.convert-", dir=out_file.parent) as work:
        raw = Path(f32) if f32 is not None and outtype == "f32" else \
            convert_raw(model_dir, Path(work) / f"model-{outtype}.gguf", outtype, log=log)
        if type in _FLOAT_FTYPE and not overrides:
            with atomic_file(out_file) as tmp:
                shutil.copyfile(raw, tmp)
        else:
            log(f"writing {type}" + (" (llama-quantize's per-tensor mix)" if type not in _FLOAT_FTYPE else "")
                + " with the trained template" * bool(overrides) + " and the importance matrix" * bool(imatrix))
            rewrite_gguf(raw, out_file, type, metadata=overrides, imatrix=imatrix, raised=raised, log=log)
    log(f"wrote {out_file} ({out_file.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return out_file


# ---- adapter-only export ---------------------------------------------------------------------

def _refuse(key: str, why: str, adapter_dir: Path) -> LorakitError:
    return LorakitError(f"{key} is set: {why}, which llama.cpp's LoRA format cannot express",
                        where=str(adapter_dir / PEFT_CONFIG),
                        hint="export the merged model instead: lorakit export RUN --gguf TYPE (without --adapter-only)")


def adapter_alpha(cfg: dict, adapter_dir: Path) -> float:
    """The `lora_alpha` to give llama.cpp, which scales every adapter by alpha / r.

    PEFT scales by alpha / r, or alpha / sqrt(r) with rsLoRA; alpha' = alpha * sqrt(r) makes
    alpha' / r = alpha / sqrt(r).  Adapters llama.cpp cannot represent are refused, by the rules
    the compatibility table prints (`lorakit.artifacts.compat`)."""
    from lorakit.artifacts.compat import llama_cpp_refusal

    refusal = llama_cpp_refusal(cfg)
    if refusal is not None:
        raise _refuse(*refusal, adapter_dir)
    alpha, r = float(cfg["lora_alpha"]), int(cfg["r"])
    return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def convert_adapter(adapter_dir: str | Path, base_dir: str | Path, out_file: str | Path, *,
                    log: Callable[[str], None] = print) -> Path:
    """An adapter-only GGUF (llama.cpp LoRA format, f32) for the base model in `base_dir`.

    Runs llama.cpp's convert_lora_to_gguf.py with `--base base_dir` (a local folder, so it never
    asks the hub for the base config) over a copy of adapter_config.json whose lora_alpha makes
    llama.cpp's alpha / r equal to PEFT's scale."""
    adapter_dir, base_dir, out_file = Path(adapter_dir), Path(base_dir), Path(out_file)
    cfg_path = adapter_dir / PEFT_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LorakitError(f"cannot read {cfg_path}: {e}", hint="pass a run or adapter folder written by lorakit train")
    weights = adapter_dir / PEFT_WEIGHTS
    if not weights.is_file():
        raise LorakitError(f"{weights} not found", hint="pass a run or adapter folder written by lorakit train")
    if not (base_dir / "config.json").is_file():
        raise LorakitError(f"base model folder {base_dir} has no config.json",
                           hint="the adapter's base model must be available locally")
    alpha = adapter_alpha(cfg, adapter_dir)
    from lorakit.export import require_toolchain

    tc = require_toolchain()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".lorakit-lora-") as work:
        staged = Path(work)
        (staged / PEFT_CONFIG).write_text(json.dumps({**cfg, "lora_alpha": alpha, "use_rslora": False,
                                                                "base_model_name_or_path": str(base_dir)}))
        (staged / PEFT_WEIGHTS).symlink_to(weights.resolve())
        raw = staged / "adapter.gguf"
        log(f"converting {adapter_dir} with llama.cpp's convert_lora_to_gguf.py (alpha {alpha:g}, r {cfg['r']})")
        _run_converter(tc.convert_lora, ["--base", str(base_dir), "--outtype", "f32", "--outfile", str(raw),
                                         str(staged)])
        with atomic_file(out_file) as tmp:
            shutil.copyfile(raw, tmp)
    log(f"wrote {out_file} ({out_file.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return out_file
