"""`lorakit export RUN --gguf TYPE [--adapter-only] [--ollama] [--out DIR] [--no-verify]`.

The order is the contract, as in training: every check that can fail on bad input (the toolchain,
the type, the adapter's shape for llama.cpp's LoRA format, the Ollama template) runs before
anything is converted; a merged export goes through `lorakit.merge` (the full-precision base
reloaded from disk, parity-checked); each GGUF is verified in llama.cpp against transformers
before it keeps its name — a file that failed is renamed `<file>.failed`, so nothing that looks
finished is left behind.

Layout of `--out` (default `runs/<name>/export/`):
  <name>-<type>.gguf              merged model            + .verify.json
  <base>-<type>.gguf, <name>-lora.gguf   with --adapter-only (base + llama.cpp LoRA adapter)
  ollama/                          with --ollama: the GGUF(s) and a Modelfile
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorakit.artifacts import RunPaths, find_adapter_dir, read_meta
from lorakit.errors import LorakitError


@dataclass
class ExportResult:
    files: list[Path]
    verifications: list = field(default_factory=list)  # lorakit.export.verify.Verification
    ollama_dir: Path | None = None
    ollama_command: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def _partial(final: Path) -> Path:
    """Where a GGUF is written until it has been verified: a name no tool takes for a model."""
    return final.with_name(f".{final.name}.partial")


def export(run: str | Path, *, gguf: str, adapter_only: bool = False, ollama: bool = False,
           out: str | Path | None = None, verify: bool = True, log: Callable[[str], None] = print) -> ExportResult:
    from lorakit.export import require_toolchain
    from lorakit.export import gguf as G

    if gguf not in G.TYPES:
        raise LorakitError(f"--gguf {gguf!r} is not one of {', '.join(G.TYPES)}",
                           hint="q4_k_m is the usual choice for llama.cpp / Ollama; f16 keeps full quality")
    require_toolchain(runtime=verify)
    adapter_dir = find_adapter_dir(run)
    paths = RunPaths.of(adapter_dir)
    meta = read_meta(adapter_dir)
    name = _slug(paths.root.name if adapter_dir.name == "adapter" else adapter_dir.name)
    out_dir = Path(out) if out is not None else paths.root / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    if adapter_only:  # DoRA / modules_to_save / rank patterns: refused before any work
        import json

        G.adapter_alpha(json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")), adapter_dir)
    template = meta.template_object()
    if ollama:
        from lorakit.export import ollama as O

        O.turn_texts(template)  # a template Ollama cannot express: refused before any work

    result = ExportResult(files=[])
    with tempfile.TemporaryDirectory(prefix=".lorakit-export-", dir=out_dir) as tmp:
        merged = Path(tmp) / "merged"
        if verify or not adapter_only:
            from lorakit.merge import merge

            log("merging into the full-precision base (reloaded from disk) ...")
            merge(adapter_dir, merged, dtype="fp32", log=log)
        if adapter_only:
            base_dir = Path(meta.base.path)
            model_file = out_dir / f"{_slug(Path(meta.base.name).name)}-{gguf}.gguf"
            lora_file = out_dir / f"{name}-lora.gguf"
            log(f"converting the base to {gguf} (with the trained template) ...")
            G.convert_merged(base_dir, _partial(model_file), gguf, template_meta=meta, log=log)
            log("converting the adapter to llama.cpp's LoRA format ...")
            G.convert_adapter(adapter_dir, base_dir, _partial(lora_file), log=log)
        else:
            model_file, lora_file = out_dir / f"{name}-{gguf}.gguf", None
            log(f"converting to {gguf} ...")
            G.convert_merged(merged, _partial(model_file), gguf, log=log)
        files = [f for f in (model_file, lora_file) if f is not None]
        try:
            if verify:
                from lorakit.export.verify import publish_verified

                # Adapter-only: the base GGUF with the LoRA GGUF applied must answer as the merged model.
                result.verifications.append(publish_verified(
                    _partial(model_file), model_file, merged, gguf,
                    adapter_gguf=_partial(lora_file) if lora_file else None, adapter_final=lora_file, log=log))
            else:
                os.replace(_partial(model_file), model_file)
            if lora_file is not None:
                os.replace(_partial(lora_file), lora_file)
        finally:
            for f in files:
                _partial(f).unlink(missing_ok=True)
    result.files = files
    if ollama:  # O was imported for the check above
        from lorakit.infer import base_model_config
        from lorakit.model.load import load_tokenizer

        tokenizer = load_tokenizer(base_model_config(meta))
        folder = O.write_ollama_folder(out_dir / "ollama", model_file, template, tokenizer, adapter_gguf=lora_file,
                                       max_length=meta.max_length, name=name)
        result.ollama_dir, result.ollama_command = folder, O.create_command(folder, name)
    return result
