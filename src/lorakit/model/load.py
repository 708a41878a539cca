"""Load the base model and tokenizer that `ModelConfig` names, ready for LoRA training.

`model.name` is one of: the alias of the embedded default, a `.gguf` file, a local folder (with
`model.gguf_file` for a GGUF inside it), or a hub id (with `model.gguf_file` for a GGUF in the
repository).  GGUF files of any origin go through `embedded.gguf_model_dir`, so everything that
reaches `from_pretrained` is an ordinary safetensors folder or a hub id.

Safety defaults: only safetensors weights (pickle files can execute code when loaded) and no
model-repository Python code, unless the config asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from lorakit.config import DEFAULT_MODEL, ModelConfig
from lorakit.errors import MissingExtraError, ModelError
from lorakit.model import embedded
from lorakit.resolve import Machine, attention, checkpoints_every_pass, weight_dtype

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelInfo:
    """What was loaded, for run metadata: enough to check later that the same base is used."""

    name: str  # model.name as configured
    path: str  # the local folder loaded, or the hub id
    sha256: str | None  # of the weights (see weights_sha256); None if the files cannot be found
    dtype: str  # "float32", "bfloat16", "float16"
    quantization: str  # "none", "4bit", "8bit"


@dataclass
class _Source:
    path: str  # local folder or hub id
    hub: bool
    revision: str | None


def _from_pretrained(auto_cls, mcfg: ModelConfig, src: "_Source", **kwargs):
    """`auto_cls.from_pretrained` with lorakit's errors for an unreachable source or remote code."""
    try:
        return auto_cls.from_pretrained(src.path, **kwargs)
    except OSError as e:
        raise _unreachable(mcfg, src, e) from e
    except ValueError as e:
        raise _maybe_remote_code(e) from e


# --------------------------------------------------------------------------- public API


def resolve_dtype(mcfg: ModelConfig, machine: Machine | None = None) -> torch.dtype:
    """The torch dtype `lorakit.resolve.weight_dtype` picks for this config on `machine` (default: this one)."""
    return TORCH_DTYPES[weight_dtype(mcfg, machine or Machine.detect())]


def load_config(mcfg: ModelConfig):
    """The base model's transformers config (no weights read), with lorakit's errors for a
    missing folder or an unreachable hub id."""
    src = _resolve_source(mcfg)
    kwargs = {"trust_remote_code": mcfg.trust_remote_code}
    if src.hub and src.revision:
        kwargs["revision"] = src.revision
    return _from_pretrained(transformers.AutoConfig, mcfg, src, **kwargs)


def load_tokenizer(mcfg: ModelConfig):
    """The base model's tokenizer, always with a pad token and right padding.

    Pad repair: when the tokenizer has no pad token it gets its unk token, else its eos token.
    pad == eos is safe here because lorakit never derives labels from pad ids: the data package
    builds labels from loss masks and the collator masks padding by position, so the EOS the
    model must learn to emit stays in the labels.  Right padding keeps the tokens of each
    example at the same positions as at training time without padding.
    """
    src = _resolve_source(mcfg)
    kwargs = {"trust_remote_code": mcfg.trust_remote_code}
    if src.hub and src.revision:
        kwargs["revision"] = src.revision
    tok = _from_pretrained(transformers.AutoTokenizer, mcfg, src, **kwargs)
    _repair_pad(tok, mcfg.name)
    tok.padding_side = "right"
    return tok


def load_model(mcfg: ModelConfig, *, training: bool = True, tokenizer=None, machine: Machine | None = None):
    """Load the base causal LM; returns `(model, ModelInfo)`.

    With `training`: `use_cache` off (the KV cache is useless in a training forward and
    conflicts with gradient checkpointing), gradient checkpointing on every layer when
    `lorakit.resolve.checkpoints_every_pass` says so, and for 4/8-bit bases
    PEFT's `prepare_model_for_kbit_training`.  Without it: eval mode.  Device placement is
    left to the caller, except for quantized bases, which bitsandbytes quantizes on the GPU
    of this process (`LOCAL_RANK`).  Passing `tokenizer` sets `generation_config.pad_token_id`
    from it, which silences generate()'s pad warning and pads with the same id as training.
    """
    machine = machine or Machine.detect()
    dtype = resolve_dtype(mcfg, machine)
    src = _resolve_source(mcfg)
    kwargs: dict = {
        "dtype": dtype,
        "attn_implementation": attention(mcfg),
        "trust_remote_code": mcfg.trust_remote_code,
        "use_safetensors": None if mcfg.allow_pickle else True,
    }
    if src.hub:
        if src.revision:
            kwargs["revision"] = src.revision
    else:
        _check_local_weights(Path(src.path), mcfg.allow_pickle)
    if mcfg.quantization != "none":
        kwargs["quantization_config"] = _bnb_config(mcfg.quantization, dtype)
        if machine.device == "cuda":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = _from_pretrained(transformers.AutoModelForCausalLM, mcfg, src, **kwargs)
    _set_pad_id(model, tokenizer)
    if training:
        _prepare_for_training(model, mcfg, checkpoints_every_pass(mcfg, machine))
    else:
        model.eval()
    info = ModelInfo(
        name=mcfg.name,
        path=src.path,
        sha256=_weights_sha256(src, mcfg.allow_pickle),
        dtype=str(dtype).removeprefix("torch."),
        quantization=mcfg.quantization,
    )
    return model, info


def _weights_sha256(src: _Source, allow_pickle: bool = False) -> str | None:
    """sha256 of the weights: of the file itself when there is one (so `sha256sum` agrees),
    else of the sha256sum-style listing "<sha>  <name>" of every shard.  None when the files
    cannot be found (a hub model evicted from the cache)."""
    folder = _local_folder(src)
    if folder is None:
        return None
    files = _weight_files(folder, allow_pickle)
    if not files:
        return None
    sums = [_cached_sha256(f) for f in files]
    if len(sums) == 1:
        return sums[0]
    listing = "".join(f"{s}  {f.name}\n" for s, f in zip(sums, files))
    return hashlib.sha256(listing.encode()).hexdigest()


# --------------------------------------------------------------------------- resolution


def _resolve_source(mcfg: ModelConfig) -> _Source:
    """Map model.name (+ gguf_file) to a local folder or a hub id; GGUF files are converted."""
    name = mcfg.name
    if name in embedded.LOCAL_MODELS and not Path(name).exists():
        return _Source(str(embedded.local_model_dir(name)), False, None)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"{name} is a file but not a .gguf model",
                hint="set model.name to a model folder, a hub id, or a .gguf file",
                where="config model.name",
            )
        return _Source(str(embedded.gguf_model_dir(path)), False, None)
    if path.is_dir():
        if mcfg.gguf_file:
            return _Source(str(embedded.gguf_model_dir(_gguf_in_folder(path, mcfg.gguf_file))), False, None)
        return _Source(str(path.resolve()), False, None)
    if name.lower().endswith(".gguf") or not _HUB_ID.match(name):
        raise ModelError(
            f"'{name}' is not an existing file or folder (nor a valid hub id)",
            hint="check the path (relative paths are resolved against the config file's folder)",
            where="config model.name",
        )
    if mcfg.gguf_file:
        return _Source(str(embedded.gguf_model_dir(_download_gguf(mcfg))), False, None)
    return _Source(name, True, mcfg.revision)


def _gguf_in_folder(folder: Path, gguf_file: str) -> Path:
    path = folder / gguf_file
    if path.is_file():
        return path
    found = sorted(p.name for p in folder.glob("*.gguf")) or ["(none)"]
    raise ModelError(
        f"no file '{gguf_file}' in {folder}; GGUF files there: {', '.join(found)}",
        hint="set model.gguf_file to one of them",
        where="config model.gguf_file",
    )


def _download_gguf(mcfg: ModelConfig) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(mcfg.name, mcfg.gguf_file, revision=mcfg.revision))
    except OSError as e:
        raise _unreachable(mcfg, _Source(mcfg.name, True, mcfg.revision), e) from e


def _unreachable(mcfg: ModelConfig, src: _Source, e: Exception) -> ModelError:
    if not src.hub:
        return ModelError(f"cannot load the model in {src.path}: {e}", where="config model.name",
                          hint="check that the folder holds config.json, weights and tokenizer files")
    rev = f" at revision '{src.revision}'" if src.revision else ""
    return ModelError(
        f"'{mcfg.name}' is neither an existing local path nor a hub id reachable from here{rev} "
        f"(offline, or not in the hub cache): {str(e).splitlines()[0]}",
        hint="fix the path, download the model once with network access "
        "(`huggingface-cli download ORG/NAME`), or use the offline default model.name: " + DEFAULT_MODEL,
        where="config model.name",
    )


def _maybe_remote_code(e: ValueError) -> Exception:
    """transformers says 'trust_remote_code' when the architecture's code lives in the repo."""
    if "trust_remote_code" in str(e):
        return ModelError(
            f"this model needs Python code from its repository: {str(e).splitlines()[0]}",
            hint="set model.trust_remote_code: true, only if you trust the model's author "
            "(it runs their code on this machine)",
            where="config model.trust_remote_code",
        )
    return e


# --------------------------------------------------------------------------- weights


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The files transformers would load: the index's shards, else model.safetensors, else
    every *.safetensors; pickle files only when allowed and no safetensors exist."""
    for index_name, suffix in (("model.safetensors.index.json", ".safetensors"),
                               ("pytorch_model.bin.index.json", ".bin")):
        index = folder / index_name
        if index.is_file() and (suffix == ".safetensors" or allow_pickle):
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files and allow_pickle:
        files = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return files


def _check_local_weights(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is not a transformers model folder (no config.json)",
            hint="point model.name at the folder that holds config.json and the weights, or at a .gguf file",
            where="config model.name",
        )
    if _weight_files(folder, allow_pickle=False):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelError(
            f"{folder} has only pickle weights ({', '.join(pickles[:3])}); loading a pickle file can "
            "run arbitrary code, so lorakit loads safetensors only",
            hint="convert the weights to safetensors (model.save_pretrained(folder)), or set "
            "model.allow_pickle: true if you trust where the files came from",
            where="config model.allow_pickle",
        )
    if not pickles:
        raise ModelError(f"{folder} has no weight files (*.safetensors)", where="config model.name",
                         hint="copy the model's weights into the folder")


def _local_folder(src: _Source) -> Path | None:
    if not src.hub:
        return Path(src.path)
    from huggingface_hub import snapshot_download

    try:  # the snapshot from_pretrained just used; never touches the network
        return Path(snapshot_download(src.path, revision=src.revision, local_files_only=True))
    except (OSError, ValueError):
        return None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    """Hash a file once per process; size + mtime changes invalidate the entry."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = embedded.file_sha256(path)
    return _SHA_CACHE[key]


# --------------------------------------------------------------------------- setup


def _repair_pad(tok, name: str) -> None:
    if tok.pad_token is not None:
        return
    if tok.unk_token is not None:
        tok.pad_token = tok.unk_token
    elif tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    else:
        raise ModelError(
            f"the tokenizer of '{name}' has no pad, unk or eos token; without an EOS token a "
            "fine-tuned model cannot learn where to stop",
            hint="use a model whose tokenizer defines eos_token (most chat/instruct models do)",
            where="config model.name",
        )


def _set_pad_id(model, tokenizer) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    if tokenizer is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    elif gen.pad_token_id is None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, list) else eos


NON_REENTRANT = {"use_reentrant": False}
"""Checkpointing kwargs: the reentrant variant drops gradients of inputs that do not require
grad, which with a frozen base means no LoRA gradients."""


def _prepare_for_training(model, mcfg: ModelConfig, checkpointing: bool) -> None:
    model.config.use_cache = False
    if mcfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        _disable_bnb_cpu_repack(model)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                        gradient_checkpointing_kwargs=dict(NON_REENTRANT))
    elif checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()  # the frozen embedding's output must carry grad
    model.train()


def enable_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing on every layer of a transformers model
    (transformers 5.24 renamed gradient_checkpointing_enable; the old name is an alias)."""
    gc_kwargs = dict(NON_REENTRANT)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)


def _disable_bnb_cpu_repack(model) -> None:
    """bitsandbytes 0.50 on CPU repacks Linear4bit weights during an eval forward, after which
    the backward silently gives wrong LoRA gradients; its avx512-bf16 path is what repacks."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _bnb_config(quantization: str, dtype: torch.dtype):
    """QLoRA's recipe: NF4 with double quantization, compute in bf16 (fp16 on GPUs without it)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingExtraError("bitsandbytes", "qlora", f"model.quantization '{quantization}' (QLoRA)")
    if quantization == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16 if dtype == torch.float16 else torch.bfloat16,
    )
