"""The run directory: how stages hand work to each other, and the whole contract between them.

`runs/<name>/` holds `config.yaml` (resolved), `adapter/` (PEFT files plus `lorakit.json`),
`checkpoints/`, `logs/` (TensorBoard), `metrics.jsonl` (every train/eval log record),
`diagnostics.jsonl` (every warning raised), `data.json` (what the data looked like),
`eval/` (per-example results and summaries of `lorakit eval`), `export/` (GGUFs and their
verifications), `merge.json` (the last merge's parity check) and `report.html`. Every later
stage needs only the run or adapter folder, so `lorakit.json` carries everything needed to use
the adapter again: template, base model and its hash, data fingerprint, versions.

One owner for each part: `paths` spells every file name (`RunPaths`), `atomic` is the one way a
file or folder is published, `meta` is lorakit.json, `records` the JSONL logs and eval results,
`compat` where an adapter's files will load (PEFT, vLLM, llama.cpp, Ollama), `lock` who is
writing a run.
"""

from lorakit.artifacts.atomic import (atomic_dir, atomic_file, atomic_write_json, atomic_write_text, fsync_dir,
                                      fsync_tree, leftovers, move, partial_path, publish, umask_mode,
                                      write_jsonl_atomic)
from lorakit.artifacts.meta import (SCHEMA_VERSION, AdapterMeta, BaseModelRef, DataRef, check_same_base,
                                    library_versions, read_meta, same_base, save_adapter, save_tokenizer, write_meta)
from lorakit.artifacts.paths import (ADAPTER_DIR, CHECKPOINT_STAGING, META_FILE, MODELFILE, OLLAMA_ADAPTER,
                                     OLLAMA_DIR, OLLAMA_MODEL, PARITY_FILE, PEFT_CONFIG, PEFT_WEIGHTS, VERIFY_SUFFIX,
                                     RunPaths, StudioPaths, SweepPaths, check_free, claim, export_gguf, export_lora_gguf, find_adapter_dir,
                                     has_work, imatrix_path, is_run_adapter, release, restore, verification_path)
from lorakit.artifacts.records import (ENDING_KINDS, EVAL_SCHEMA, Diagnostic, EvalRecord, EvalSummary, append_jsonl, now_iso,
                                       read_diagnostics, read_jsonl)

__all__ = [
    "ADAPTER_DIR", "CHECKPOINT_STAGING", "ENDING_KINDS", "EVAL_SCHEMA", "META_FILE", "MODELFILE", "OLLAMA_ADAPTER",
    "OLLAMA_DIR", "OLLAMA_MODEL", "PARITY_FILE", "PEFT_CONFIG", "PEFT_WEIGHTS", "SCHEMA_VERSION",
    "VERIFY_SUFFIX", "AdapterMeta", "BaseModelRef", "DataRef", "Diagnostic", "EvalRecord", "EvalSummary",
    "RunPaths", "StudioPaths", "SweepPaths", "append_jsonl", "atomic_dir", "atomic_file", "atomic_write_json", "atomic_write_text",
    "check_free", "check_same_base", "claim", "export_gguf", "export_lora_gguf", "find_adapter_dir",
    "fsync_dir", "fsync_tree", "has_work", "imatrix_path", "is_run_adapter", "leftovers", "library_versions",
    "move", "now_iso", "partial_path", "publish", "read_diagnostics", "read_jsonl", "read_meta", "release",
    "restore", "same_base", "save_adapter", "save_tokenizer", "umask_mode", "verification_path",
    "write_jsonl_atomic", "write_meta",
]
