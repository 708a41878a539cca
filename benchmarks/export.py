"""What each GGUF type keeps of a fine-tune, measured on the run's own task: size, time, the task
metric through llama.cpp, answers changed against transformers, and KL on held-out text — for
f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0 and iq4_xs, each quantized type without the importance
matrix ("no"), with all of it as llama-quantize --imatrix uses it ("all"), and as `lorakit export`
uses it ("kept": less the tensors whose weighted rounding would round the fine-tune away,
export/delta.py).

    python benchmarks/export.py RUN --eval-data FILE [--types ...] [--kl-rows 8] [--auto] [--json OUT]

One merge, one f32 conversion, one set of transformers answers and one importance matrix per run;
then, per file, export/task.py's check (the same code `lorakit export` runs) and the KL. With
--auto, `lorakit export RUN --gguf auto` itself runs afterwards and its choice is printed.
Run it on an otherwise idle machine. Last line: JSON.

KL: at every position of the first --kl-rows held-out rows (prompt and reference answer, teacher-
forced), KL(transformers || llama.cpp) over llama.cpp's top-20 tokens with the rest of each
distribution lumped into one outcome. Coarsening can only lower a KL (data-processing
inequality), so this is a lower bound, tight when the mass outside the top 20 is small.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q4_0"]
TOP = 20


def kl_rows(merged: Path, gguf: Path, sequences: list[list[int]], starts: list[int]) -> float:
    """Mean coarsened KL(transformers || llama.cpp) per position (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.export.llama import Llama

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with Llama(gguf, n_ctx=max(256, max(map(len, sequences)) + 8)) as llm, torch.no_grad():
        for ids, start in zip(sequences, starts):
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            for pos in range(start, len(ids)):
                top = llm.complete(ids[:pos], 1, n_probs=TOP)[0]["top_logprobs"]
                q = {t["id"]: math.exp(t["logprob"]) for t in top}
                p = {t: math.exp(float(lp[pos - 1, t])) for t in q}
                kl = sum(p[t] * (math.log(p[t]) - math.log(q[t])) for t in q if p[t] > 0)
                p_rest, q_rest = max(0.0, 1 - sum(p.values())), max(1e-12, 1 - sum(q.values()))
                if p_rest > 0:
                    kl += p_rest * (math.log(p_rest) - math.log(q_rest))
                total, n = total + kl, n + 1
    return total / max(n, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--eval-data", required=True, help="held-out rows with answers (e.g. the run's test file)")
    p.add_argument("--types", nargs="+", default=TYPES)
    p.add_argument("--kl-rows", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="answer only the first N rows")
    p.add_argument("--auto", action="store_true", help="also run `lorakit export --gguf auto` and report its pick")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    from common import export_setup

    from lorakit.export import gguf as G
    from lorakit.export import run as E
    from lorakit.export import task as T
    from lorakit.config import ExportConfig
    from lorakit.export.quantize import FTYPES

    quiet = lambda s: None  # noqa: E731
    result: dict = {"run": args.run, "eval_data": args.eval_data, "files": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-export-bench-") as tmp:
        work = Path(tmp)
        setup = export_setup(args.run, args.eval_data, work, limit=args.limit)
        adapter, meta, tok, f32, rows = (setup[k] for k in ("adapter", "meta", "tokenizer", "f32", "rows"))
        result.update({f"{k}_s": v for k, v in setup["seconds"].items()})
        t0 = time.perf_counter()
        importance = E.importance(adapter, work / "merged", f32, rows=256, text=None, tokenizer=tok, log=quiet)
        result["imatrix_s"] = round(time.perf_counter() - t0, 1)
        template = meta.template
        kl_seq = [template.encode_prompt(tok, pr) for pr in rows.prompts[:args.kl_rows]]
        answers = [tok(r, add_special_tokens=False)["input_ids"] for r in rows.references[:args.kl_rows]]
        print(f"{adapter.parent.name}: {len(rows.prompts)} rows, metric {rows.metric}; merge {result['merge_s']} s, "
              f"f32 {result['convert_f32_s']} s, transformers answers {result['transformers_answer_s']} s, imatrix "
              f"{result['imatrix_s']} s")
        print(f"{'type':8} {'imatrix':7} {'MiB':>7} {'write s':>7} {'metric':>7} {'drop':>6} {'changed':>7} {'KL':>8}")
        vectors = importance.vectors()
        guarded = E.guarded_weights(adapter, work / "merged", f32, vectors, ExportConfig().imatrix_keep, quiet)
        for t in args.types:
            for weighted in (["no", "all", "kept"] if t in FTYPES else ["no"]):
                out = work / f"{t}-{weighted}.gguf"
                t0 = time.perf_counter()
                weights = {"no": None, "all": vectors, "kept": guarded(t) if weighted == "kept" else None}[weighted]
                G.convert_merged(work / "merged", out, t, f32=f32, imatrix=weights, log=quiet)
                write_s = time.perf_counter() - t0
                check = T.check(rows, out, max_drop=3.0, log=quiet)
                kl = kl_rows(work / "merged", out, [s + a for s, a in zip(kl_seq, answers)], [len(s) for s in kl_seq])
                row = {"type": t, "imatrix": weighted, "mib": round(out.stat().st_size / 2**20, 1),
                       "write_s": round(write_s, 1), "metric": rows.metric, "transformers": check.reference,
                       "gguf": check.gguf, "drop": check.drop, "changed": check.changed, "lost": check.lost,
                       "gained": check.gained, "kl": round(kl, 5), "answer_s": check.seconds["llama.cpp"]}
                result["files"].append(row)
                print(f"{t:8} {weighted:7} {row['mib']:7.1f} {row['write_s']:7.1f} "
                      f"{row['gguf']:7.1%} {row['drop']:+6.1f} {row['changed']:7d} {row['kl']:8.5f}", flush=True)
                out.unlink()
    if args.auto:
        from lorakit.export.run import export, run_settings

        with tempfile.TemporaryDirectory(prefix="lorakit-export-auto-") as out:
            t0 = time.perf_counter()
            s = run_settings(args.run, gguf="auto", eval_data=[args.eval_data], eval_limit=args.limit)
            r = export(args.run, s, out=out, log=quiet)
            result["auto"] = {"picked": r.files[0].name, "seconds": round(time.perf_counter() - t0, 1),
                              "candidates": r.candidates}
            print(f"--gguf auto picked {r.files[0].name} in {result['auto']['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
