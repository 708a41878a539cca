"""GGUF export on a trained run: time and size per type, the llama.cpp verification per type, and
the held-out exact match answered by llama.cpp from the q4_k_m file next to transformers'.

    python benchmarks/export.py [RUN] [--types f16 q8_0 q4_k_m] [--out DIR]

RUN defaults to runs/demo (make it with `lorakit demo`, which also writes eval/test.jsonl: the
transformers answers this compares with). Each type is one `lorakit export` (merge, convert,
verify). Run it on an otherwise idle machine. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="runs/demo")
    p.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    p.add_argument("--out", help="keep the files here (default: a temporary folder)")
    p.add_argument("--limit", type=int, help="exact match on the first N test rows only")
    args = p.parse_args(argv)

    from lorakit.artifacts import RunPaths, find_adapter_dir, read_jsonl, read_meta
    from lorakit.cli import _quiet_libraries
    from lorakit.export.run import export
    from lorakit.export.verify import answer_with_gguf
    from lorakit.infer import base_model_config
    from lorakit.metrics import exact_match
    from lorakit.model.load import load_tokenizer

    _quiet_libraries()
    run = RunPaths.of(find_adapter_dir(args.run))
    result: dict = {"run": str(run.root), "types": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-export-bench-") as tmp:
        out = Path(args.out or tmp)
        files = {}
        for t in args.types:
            t0 = time.perf_counter()
            r = export(run.root, gguf=t, out=out, log=lambda s: None)
            seconds = time.perf_counter() - t0
            v = r.verifications[0]
            files[t] = r.files[0]
            result["types"].append({"type": t, "seconds": round(seconds, 1), "mib": round(r.files[0].stat().st_size / 2**20, 1),
                                    "greedy_identical": f"{v.greedy_identical}/{len(v.prompts)}",
                                    "top1_agreement": round(v.top1_agreement, 3),
                                    "max_logprob_diff": v.max_logprob_diff, "passed": v.passed})
            row = result["types"][-1]
            print(f"{t:7} {row['seconds']:6.1f} s {row['mib']:7.1f} MiB  greedy {row['greedy_identical']}  top-1 "
                  f"{row['top1_agreement']:.3f}  max |dlogprob| {row['max_logprob_diff']:.3g}")
        records = read_jsonl(run.eval_records("test"))[:args.limit]
        if records and "q4_k_m" in files:
            meta = read_meta(run.adapter)
            tok, template = load_tokenizer(base_model_config(meta)), meta.template_object()
            prompts = [template.encode_prompt(tok, r["prompt"]) for r in records]
            t0 = time.perf_counter()
            ids = answer_with_gguf(files["q4_k_m"], prompts, 20, template.stop_token_ids(tok))
            seconds = time.perf_counter() - t0
            gguf_answers = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
            refs = [r["reference"] for r in records]
            em = lambda answers: sum(exact_match(a, b) for a, b in zip(answers, refs)) / len(refs)  # noqa: E731
            result["exact_match"] = {"rows": len(refs), "transformers": em([r["answers"]["tuned"] for r in records]),
                                     "llama.cpp q4_k_m": em(gguf_answers), "gguf_seconds": round(seconds, 1),
                                     "same_answers": sum(a == r["answers"]["tuned"] for a, r in zip(gguf_answers, records))}
            e = result["exact_match"]
            print(f"test exact match ({e['rows']} rows, 20 new tokens): transformers {e['transformers']:.1%}, "
                  f"llama.cpp q4_k_m {e['llama.cpp q4_k_m']:.1%}; identical answers {e['same_answers']}/{e['rows']}")
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
