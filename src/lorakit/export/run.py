"""`lorakit export RUN --gguf TYPE|auto [--adapter-only] [--ollama] [--out DIR] [--no-verify] ...`.

The order is the contract, as in training: every check that can fail on bad input (the settings,
the toolchain, the type, the adapter's shape for llama.cpp's LoRA format, the Ollama template,
the rows the task check will answer) runs before anything is converted; a merged export goes
through `lorakit.merge` (the full-precision base reloaded from disk, parity-checked); each GGUF
is checked in llama.cpp — token by token against transformers (export/verify.py), then on the
run's own task (export/task.py) — before it keeps its name. A file that fails is removed and its
`.verify.json` (passed: false) says why, so nothing that looks finished is left behind.

Settings are the schema's `export:` section (`lorakit.config.ExportConfig`, one owner for every
default): the run's config.yaml's, the command's flags overriding it (`run_settings`).

Layout of `--out` (default `runs/<name>/export/`):
  <name>-<type>.gguf              merged model            + .verify.json
  <name>-<type>-dynamic.gguf      with --max-size: the mix with its most sensitive tensors one type wider
  <name>-<type>[-dynamic].imatrix.gguf   the importance matrix it was quantized with (llama.cpp's format)
  <base>-<type>.gguf, <name>-lora.gguf   with --adapter-only (base + llama.cpp LoRA adapter)
  ollama/                          with --ollama: the GGUF(s) and a Modelfile
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorakit import artifacts as A
from lorakit.artifacts import (OLLAMA_DIR, PEFT_CONFIG, RunPaths, export_gguf, export_lora_gguf, find_adapter_dir,
                               imatrix_path, is_run_adapter, partial_path, read_meta)
from lorakit.config import ExportConfig
from lorakit.errors import LorakitError
from lorakit.metrics import text_columns

AUTO = "auto"
IMATRIX_BY_DEFAULT = ("q4_k_m", "iq4_xs", "q4_0")
"""The types `export.imatrix: auto` weights (4 bits and fewer per weight: where the rounding error
is large enough for the weighting to matter; measured in BENCHMARKS.md)."""


@dataclass
class ExportResult:
    files: list[Path]
    verifications: list = field(default_factory=list)  # lorakit.export.verify.Verification
    ollama_dir: Path | None = None
    ollama_command: str | None = None
    imatrix_file: Path | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)  # --gguf auto: what was measured


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def run_settings(run: str | Path, **flags: Any) -> ExportConfig:
    """The `export:` section `lorakit export RUN` works with: the run's config.yaml's (schema
    defaults for a run made before it existed), every flag that was given (not None) in its place."""
    from lorakit import config as C

    paths = RunPaths.of(find_adapter_dir(run))
    s = C.load(paths.config).export if paths.config.is_file() else C.ExportConfig()
    return dataclasses.replace(s, **{k: v for k, v in flags.items() if v is not None})


def _check_settings(s: ExportConfig, paths: RunPaths) -> None:
    """What the schema's types cannot say: the names of GGUF types, sizes and counts in range."""
    from lorakit.export.gguf import TYPES

    where = f"--gguf / export.gguf in {paths.config}"
    if s.gguf != AUTO and s.gguf not in TYPES:
        raise LorakitError(f"GGUF type {s.gguf!r} is not one of {', '.join(TYPES)} or 'auto'", where=where,
                           hint="q4_k_m is the usual choice for llama.cpp / Ollama; f16 keeps full quality; auto "
                           "keeps the smallest that passes the task check")
    bad = [t for t in s.auto_types if t not in TYPES]
    if bad:
        raise LorakitError(f"export.auto_types names {', '.join(map(repr, bad))}, not GGUF types",
                           where=str(paths.config), hint=f"use some of {', '.join(TYPES)}")
    if s.max_size is not None and s.max_size <= 0:
        raise LorakitError(f"--max-size {s.max_size:g} is not a size", where="--max-size / export.max_size",
                           hint="the largest GGUF file to write, in MiB, or leave it unset")
    for key in ("eval_limit", "max_new_tokens", "sensitivity_rows"):
        if getattr(s, key) < 0:
            raise LorakitError(f"--{key.replace('_', '-')} {getattr(s, key)} is negative", hint="0 means: all / auto")


def _check_request(s: ExportConfig, paths: RunPaths, adapter_dir: Path, *, adapter_only: bool,
                   verify: bool) -> None:
    """Combinations of settings and options that cannot work, refused before any work."""
    _check_settings(s, paths)
    if s.gguf == AUTO and not verify:
        raise LorakitError("--gguf auto chooses by the checks that --no-verify skips", where="--no-verify",
                           hint="drop --no-verify, or name the type with --gguf TYPE")
    if adapter_only and s.gguf == AUTO:
        raise LorakitError("--gguf auto chooses the type of a merged file", where="--adapter-only",
                           hint="name the base's type with --gguf TYPE, or drop --adapter-only")
    if adapter_only and s.max_size is not None:
        raise LorakitError("--max-size shapes the mix of a merged file", where="--adapter-only",
                           hint="drop --max-size, or drop --adapter-only")
    if s.imatrix_text and not Path(s.imatrix_text).is_file():
        raise LorakitError(f"no such file: {s.imatrix_text}", where="--imatrix-text / export.imatrix_text",
                           hint="a plain-text file of general text, or leave it unset")
    candidates = s.auto_types if s.gguf == AUTO else [s.gguf]
    if not adapter_only and not paths.config.is_file():
        from lorakit.export.quantize import FTYPES

        if s.imatrix == "on" or (s.imatrix == AUTO and any(t in IMATRIX_BY_DEFAULT for t in candidates)):
            raise LorakitError(f"the importance matrix is collected on the run's training rows, and {adapter_dir} "
                               "is not in a run folder with a config.yaml", where="--imatrix / export.imatrix",
                               hint="pass --imatrix off (plain quantization), or export from the run folder")
        if s.max_size is not None and any(t in FTYPES for t in candidates):
            raise LorakitError(f"--max-size measures each tensor's sensitivity on the run's training rows, and "
                               f"{adapter_dir} is not in a run folder with a config.yaml", where="--max-size",
                               hint="export from the run folder, or drop --max-size")


def export(run: str | Path, settings: ExportConfig | None = None, *, adapter_only: bool = False,
           ollama: bool = False, out: str | Path | None = None, verify: bool = True,
           log: Callable[[str], None] = print) -> ExportResult:
    """`lorakit export`: `settings` (None: the run's `export:` section) decides the type and the checks."""
    from lorakit.export import require_toolchain
    from lorakit.export import gguf as G
    from lorakit.model.load import load_tokenizer

    adapter_dir = find_adapter_dir(run)
    paths = RunPaths.of(adapter_dir)
    s = settings if settings is not None else run_settings(adapter_dir)
    _check_request(s, paths, adapter_dir, adapter_only=adapter_only, verify=verify)
    require_toolchain(runtime=verify)
    meta = read_meta(adapter_dir)
    from lorakit.artifacts import compat

    log(compat.format_table(compat.for_adapter(adapter_dir)))
    name = _slug(paths.root.name if is_run_adapter(adapter_dir) else adapter_dir.name)
    out_dir = Path(out) if out is not None else paths.export_dir
    if adapter_only:  # DoRA / modules_to_save / rank patterns: refused before any work
        import json

        G.adapter_alpha(json.loads((adapter_dir / PEFT_CONFIG).read_text(encoding="utf-8")), adapter_dir)
    template = meta.template
    if ollama:
        from lorakit.export import ollama as O

        texts = O.turn_texts(template)  # a template Ollama cannot express: refused before any work
        log("Ollama TEMPLATE: " + ("tools, calls and tool results" if texts.tools else f"no tools ({texts.why_no_tools})")
            + (f"; reasoning between {texts.think[0].strip()} and {texts.think[1].strip()}" if texts.think else ""))
    tokenizer = load_tokenizer(meta.base.model_config())
    task_rows = None
    if verify:
        from lorakit.export.task import task_set

        task_rows = task_set(adapter_dir, tokenizer, eval_data=s.eval_data, limit=s.eval_limit, metric=s.metric,
                             max_new_tokens=s.max_new_tokens, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)

    result = ExportResult(files=[])
    with tempfile.TemporaryDirectory(prefix=".lorakit-export-", dir=out_dir) as tmp:
        merged = Path(tmp) / "merged"
        if verify or not adapter_only:
            from lorakit.config import MergeConfig
            from lorakit.merge import merge

            log("merging into the full-precision base (reloaded from disk) ...")
            merge(adapter_dir, merged, MergeConfig(dtype="fp32"), log=log)
        if task_rows is not None:
            from lorakit.export.task import answer_reference

            answer_reference(task_rows, merged, log=log)
        if adapter_only:
            model_file, lora_file = _adapter_only(adapter_dir, meta, merged, out_dir, name, s, task_rows, verify,
                                                  result, log)
        else:
            model_file, lora_file = _merged(adapter_dir, tokenizer, merged, Path(tmp), out_dir, name, s, task_rows,
                                            verify, result, log)
    result.files = [f for f in (model_file, lora_file) if f is not None]
    if ollama:  # O was imported for the check above
        folder = O.write_ollama_folder(out_dir / OLLAMA_DIR, model_file, template, tokenizer, adapter_gguf=lora_file,
                                       max_length=meta.max_length, name=name)
        result.ollama_dir, result.ollama_command = folder, O.create_command(folder, name)
    return result


def _task(task_rows, max_drop: float, log, adapter: Path | None = None):
    """The task-level check of a candidate file, for `verify.check_file` (None: not asked for)."""
    if task_rows is None:
        return None
    from lorakit.export.task import check

    return lambda path: check(task_rows, path, max_drop=max_drop, adapter_gguf=adapter, log=log)


def _adapter_only(adapter_dir: Path, meta, merged: Path, out_dir: Path, name: str, s, task_rows, verify: bool,
                  result: ExportResult, log) -> tuple[Path, Path]:
    """The base as `s.gguf` (unweighted: the imatrix describes the merged model) plus the LoRA GGUF;
    verified together against the merged model."""
    from lorakit.export import gguf as G
    from lorakit.export.verify import check_file, publish

    base_dir = Path(meta.base.path)
    model_file = export_gguf(out_dir, _slug(Path(meta.base.name).name), s.gguf)
    lora_file = export_lora_gguf(out_dir, name)
    try:
        log(f"converting the base to {s.gguf} (with the trained template) ...")
        G.convert_merged(base_dir, partial_path(model_file), s.gguf, template_meta=meta, log=log)
        log("converting the adapter to llama.cpp's LoRA format ...")
        G.convert_adapter(adapter_dir, base_dir, partial_path(lora_file), log=log)
        if verify:
            v = check_file(partial_path(model_file), model_file, merged, s.gguf, adapter_gguf=partial_path(lora_file),
                           adapter_final=lora_file, task=_task(task_rows, s.max_drop, log, partial_path(lora_file)),
                           log=log)
            result.verifications.append(publish(partial_path(model_file), model_file, v))
        else:
            A.publish(partial_path(model_file), model_file)
        A.publish(partial_path(lora_file), lora_file)
    finally:
        for f in (model_file, lora_file):
            partial_path(f).unlink(missing_ok=True)
    return model_file, lora_file


def _merged(adapter_dir: Path, tokenizer, merged: Path, work: Path, out_dir: Path, name: str, s, task_rows,
            verify: bool, result: ExportResult, log) -> tuple[Path, None]:
    """One merged file of `s.gguf`, or with `auto` the smallest of `s.auto_types` that passes both
    checks (each candidate measured; the table kept in the chosen file's .verify.json). With
    `s.max_size`, only files within it, and the widest mix of the type that fits it (its most
    sensitive tensors one type up: export/sensitivity.py) as the last candidate — or, for a named
    type, in place of its plain mix."""
    from lorakit.export import gguf as G
    from lorakit.export.verify import check_file, publish

    auto = s.gguf == AUTO
    c = _candidates(adapter_dir, tokenizer, merged, work, s, auto and verify, log)
    v = final = None
    for t, weighted, raised in c.plans:
        final = export_gguf(out_dir, name, t, dynamic=bool(raised))
        start = time.perf_counter()
        try:
            G.convert_merged(merged, partial_path(final), t, f32=c.f32, imatrix=c.weights(t, raised) if weighted else None,
                             raised=raised, log=log)
            if not verify:
                A.publish(partial_path(final), final)
                break
            v = check_file(partial_path(final), final, merged, t, task=_task(task_rows, s.max_drop, log), log=log)
            if raised:
                v = dataclasses.replace(v, raised=sorted(raised))
        except BaseException:
            partial_path(final).unlink(missing_ok=True)
            raise
        if auto:
            result.candidates.append(_candidate_row(t, partial_path(final), v, weighted, time.perf_counter() - start,
                                                    raised=len(raised)))
        if v.passed or not auto:
            break
        partial_path(final).unlink(missing_ok=True)
    if auto:
        v = _auto_outcome(v, result, s, c.budget, out_dir, log)
    if v is not None:
        result.verifications.append(publish(partial_path(final), final, v))
    if weighted:  # of the file published
        result.imatrix_file = c.matrix.write(imatrix_path(final))
        log(f"wrote {result.imatrix_file} (reuse it with llama-quantize --imatrix)")
    return final, None


@dataclass
class _Candidates:
    """What `_merged` writes, in order — (type, importance-weighted, tensors raised) — and what they
    share: the f32 conversion, the importance matrix, the size budget, and `weights(type, raised)`:
    the importance vectors a weighted file of that mix is quantized with (export/delta.py's guard)."""

    plans: list
    f32: Path | None
    matrix: Any
    weights: Callable[..., dict | None]
    budget: int | None


def _candidates(adapter_dir: Path, tokenizer, merged: Path, work: Path, s, measure_both: bool, log) -> _Candidates:
    """The files to try: the named type, or auto's types by planned size (4-bit ones with and without
    the importance matrix when `measure_both`), within --max-size, plus its dynamic mix."""
    from lorakit.export import gguf as G
    from lorakit.export.quantize import FTYPES

    auto = s.gguf == AUTO
    types = list(dict.fromkeys(s.auto_types)) if auto else [s.gguf]
    lossy = any(t in FTYPES for t in types)
    f32 = G.convert_raw(merged, work / "model-f32.gguf", log=log) if lossy or s.max_size is not None else None
    plans = [(t, w, frozenset()) for t in types for w in _weightings(t, s.imatrix, measure_both)]

    @functools.cache  # each call reads the f32 file's header: once per plan, however often it is asked
    def size(plan) -> int:
        return G.planned_size(f32, plan[0], has_imatrix=plan[1], raised=plan[2])

    if auto and f32 is not None:
        plans.sort(key=size)  # stable: weighted first at a tie
    budget = None
    if s.max_size is not None:
        header = G.header_bytes(f32)
        budget = int(s.max_size * 2**20) - header
        fitting = [p for p in plans if size(p) <= budget]
        if not fitting:
            smallest = min(plans, key=size)
            raise LorakitError(f"a {smallest[0]} file of this model is about "
                               f"{(size(smallest) + header) / 2**20:.1f} MiB, over --max-size "
                               f"{s.max_size:g}", where="--max-size / export.max_size",
                               hint="allow a larger file, or pick a smaller type (q4_0 and iq4_xs are the smallest)")
        plans = fitting
    weighted = any(w for _, w, _ in plans)
    calibration = None
    if weighted or (budget is not None and lossy):
        from lorakit.export import imatrix as I

        calibration = I.chunks_for_run(adapter_dir, tokenizer, max_rows=s.imatrix_rows, text=s.imatrix_text, log=log)
    matrix = importance(adapter_dir, merged, f32, rows=s.imatrix_rows, text=s.imatrix_text, tokenizer=tokenizer,
                        calibration=calibration, log=log) if weighted else None
    vectors = matrix.vectors() if matrix is not None else None  # one division for every weighted candidate
    weights = guarded_weights(adapter_dir, merged, f32, vectors, s.imatrix_keep, log)
    if budget is not None and any(t in FTYPES for t, _, _ in plans):
        plans = _dynamic(plans, auto, f32, merged, budget, calibration, weights, s, size, log)
    if auto:
        log(f"--gguf auto: trying {', '.join(_label(*p) for p in plans)} (smallest file first), "
            f"keeping the first within {s.max_drop:g} points of the merged model")
    return _Candidates(plans, f32, matrix, weights, budget)


def guarded_weights(adapter_dir: Path, merged: Path, f32: Path | None, vectors: dict | None, floor: float, log):
    """weights(type, raised): `vectors` less the fine-tuned tensors that weighted rounding would pull
    back to the base in that mix (export/delta.py); every vector when `floor` is 0. Measured once per
    mix, and the fine-tune's changes read once, when a weighted file is first written."""
    if not vectors or not floor:
        return lambda type, raised=frozenset(): vectors

    from lorakit.export import delta as D
    from lorakit.export.gguf import _targets

    @functools.cache
    def changed():
        from libgguf.inspect import inspect_gguf

        info = inspect_gguf(f32)
        base = read_meta(adapter_dir).base.model_config(dtype="fp32", gradient_checkpointing="off")
        return info, D.changed_tensors(merged, base, info.metadata["general.architecture"].value)

    @functools.cache
    def weights(type: str, raised: frozenset[str] = frozenset()) -> dict:
        info, deltas = changed()
        return D.guard(vectors, deltas, _targets(info, type, has_imatrix=True, raised=raised), floor, log=log)[0]

    return weights


def _auto_outcome(v, result: ExportResult, s, budget: int | None, out_dir: Path, log):
    """--gguf auto's table printed; the kept file's verification holds it, or none passed: refused."""
    log(format_candidates(result.candidates))
    if v is not None and not v.passed:
        tried = ", ".join(dict.fromkeys(s.auto_types))
        raise LorakitError(f"no candidate of --gguf auto ({tried}) stays within {s.max_drop:g} points of the "
                           "merged model on the task", where=str(out_dir),
                           hint="add a wider type to export.auto_types (f16 always passes), allow a larger "
                           "drop with --max-drop POINTS" + (", or a larger --max-size" if budget else ""))
    return dataclasses.replace(v, auto=result.candidates) if v is not None else None


def _label(type: str, weighted: bool, raised: frozenset[str]) -> str:
    return type + " (imatrix)" * weighted + f" (+{len(raised)} tensors wider)" * bool(raised)


def _dynamic(plans: list, auto: bool, f32: Path, merged: Path, budget: int, calibration, weights, s, size, log) -> list:
    """`plans` with the widest mix that fits `budget`: the largest quantized plan (the named type,
    or with auto the largest that fits) with its most sensitive tensors raised, appended (auto) or
    in its place (a named type). Unchanged where nothing more fits."""
    from lorakit.export.quantize import FTYPES
    from lorakit.export.sensitivity import rank, within

    t, weighted, _ = max((p for p in plans if p[0] in FTYPES), key=size)
    rows = calibration.chunks[:min(s.sensitivity_rows, calibration.rows)]
    start = time.perf_counter()
    ranked = rank(merged, f32, t, rows, imatrix=weights(t) if weighted else None, log=log)
    raised = within(f32, t, ranked, budget, has_imatrix=weighted)
    if not raised:
        log(f"--max-size {s.max_size:g}: no tensor of {t} can be raised within it; the plain mix is kept")
        return plans
    top = ", ".join(f"{n} ({kl:.4f})" for n, kl in ranked[:3])
    log(f"--max-size {s.max_size:g}: {len(raised)} of {len(ranked)} tensors of {t} one type wider "
        f"(most sensitive, KL per token: {top}; measured in {time.perf_counter() - start:.0f} s)")
    plan = (t, weighted, raised)
    return plans + [plan] if auto else [plan if p[0] == t and p[1] == weighted else p for p in plans]


def _weightings(type: str, imatrix: str, measure_both: bool) -> list[bool]:
    """With or without the importance matrix, in the order to try. `on` / `off` are the user's word;
    `auto` weights the 4-bit types, and where `--gguf auto` measures candidates anyway it tries
    those both ways, weighted first: on the demo the weighting lowered every layer's output error
    on held-out rows by 14-29 % yet cost q4_k_m task points (BENCHMARKS.md), so it is measured,
    not assumed."""
    from lorakit.export.quantize import FTYPES

    if type not in FTYPES or imatrix == "off":
        return [False]
    if imatrix == "on":
        return [True]
    if type not in IMATRIX_BY_DEFAULT:
        return [False]
    return [True, False] if measure_both else [True]


def importance(adapter_dir: Path, merged: Path, f32: Path, *, rows: int, text: str | None, tokenizer=None,
               calibration=None, log: Callable[[str], None] = print):
    """The importance matrix (`export.imatrix.Imatrix`) of the merged model over the run's training
    rows rendered with the trained template (and `text`), named as in the f32 conversion `f32`."""
    import torch
    from libgguf.inspect import inspect_gguf
    from transformers import AutoModelForCausalLM

    from lorakit.export import imatrix as I

    if calibration is None:
        calibration = I.chunks_for_run(adapter_dir, tokenizer, max_rows=rows, text=text, log=log)
    log(f"collecting the importance matrix over {calibration.rows} training rows"
        + (f" and {calibration.text_chunks} chunks of general text" if calibration.text_chunks else "") + " ...")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    arch = inspect_gguf(f32).metadata["general.architecture"].value
    return I.collect(model, calibration.chunks, gguf_names=arch, datasets=calibration.datasets,
                     chunk_size=calibration.chunk_size, log=log)


def _candidate_row(type: str, path: Path, v, weighted: bool, seconds: float, raised: int = 0) -> dict[str, Any]:
    task = v.task or {}
    return {"type": type, "mib": round(path.stat().st_size / 2**20, 1), "imatrix": weighted, "raised": raised,
            "metric": task.get("metric"), "reference": task.get("reference"), "gguf": task.get("gguf"),
            "drop": task.get("drop"), "changed": task.get("changed"), "top1_agreement": round(v.top1_agreement, 3),
            "passed": v.passed, "seconds": round(seconds, 1)}


def format_candidates(rows: list[dict[str, Any]]) -> str:
    """The table --gguf auto prints: what each candidate measured."""
    head = ("type", "MiB", "imatrix", "metric", "drop", "changed", "top-1", "s", "")
    lines = [head]
    for r in rows:
        kind = r["type"] + (f" +{r['raised']}" if r.get("raised") else "")
        metric = "-" if r["gguf"] is None else f"{r['gguf']:.1%}"
        drop = "-" if r["drop"] is None else f"{r['drop']:+.1f}"
        lines.append((kind, f"{r['mib']:.1f}", "yes" if r["imatrix"] else "no", metric, drop,
                      "-" if r["changed"] is None else str(r["changed"]), f"{r['top1_agreement']:.3f}",
                      f"{r['seconds']:.0f}", "kept" if r["passed"] else "too lossy"))
    return "\n".join(text_columns(lines))
