"""Which tensors a quantized type hurts most, and whether keeping the worst few one type wider wins.

    python benchmarks/sensitivity.py RUN --eval-data FILE [--type q4_k_m] [--imatrix] [--raise 8 16 32]

Issue 22's step 4, measured before it is built into `lorakit export`: per-tensor sensitivity is
the mean KL(merged || merged with only that tensor quantized) per position over the first --rows
held-out rows (transformers, fp32; the tensor is quantized and dequantized by llama.cpp's row
code, per row, so the q/k row permutation of the conversion does not matter). The K most
sensitive tensors are then raised one type (`export.quantize.UP`) and each file goes through the
task check of `lorakit export` (export/task.py), beside the plain mixes of the same and the next
larger types. Last line: JSON.
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
    p.add_argument("run")
    p.add_argument("--eval-data", required=True)
    p.add_argument("--type", default="q4_k_m")
    p.add_argument("--imatrix", action="store_true", help="quantize with the run's importance matrix")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--raise", dest="counts", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--compare", nargs="*", default=["q5_k_m", "q6_k"])
    args = p.parse_args(argv)

    import libgguf
    import torch

    from common import export_setup
    from libgguf.inspect import inspect_gguf
    from transformers import AutoModelForCausalLM

    from lorakit.export import gguf as G
    from lorakit.export import imatrix as I
    from lorakit.export import run as E
    from lorakit.export import task as T

    quiet = lambda s: None  # noqa: E731
    out: dict = {"run": args.run, "type": args.type, "imatrix": args.imatrix, "files": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-sensitivity-") as tmp:
        work = Path(tmp)
        setup = export_setup(args.run, args.eval_data, work)
        adapter, tok, f32, rows = (setup[k] for k in ("adapter", "tokenizer", "f32", "rows"))
        vectors = E.importance(adapter, work / "merged", f32, rows=256, text=None, tokenizer=tok,
                               log=quiet).vectors() if args.imatrix else {}
        targets = G._targets(inspect_gguf(f32), args.type, has_imatrix=args.imatrix)
        model = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32).eval()
        names = I.tensor_names(model, inspect_gguf(f32).metadata["general.architecture"].value)
        seqs = [torch.tensor([ids + tok(r, add_special_tokens=False)["input_ids"]])
                for ids, r in zip(rows.prompt_ids[:args.rows], rows.references[:args.rows])]
        with torch.no_grad():
            ref = [torch.log_softmax(model(input_ids=s).logits[0].float(), -1) for s in seqs]
        modules = dict(model.named_modules())
        t0 = time.perf_counter()
        scores = {}
        for module, gname in names.items():
            if gname not in targets:
                continue
            w = modules[module].weight
            q = int(targets[gname])
            keep = w.data.clone()
            deq = libgguf.dequantize_rows(libgguf.quantize_rows(keep.numpy(), q, imatrix=vectors.get(gname)), q)
            w.data.copy_(torch.from_numpy(deq.reshape(keep.shape)))
            with torch.no_grad():
                kl = [torch.nn.functional.kl_div(torch.log_softmax(model(input_ids=s).logits[0].float(), -1), r,
                                                 log_target=True, reduction="sum").item() / s.shape[1]
                      for s, r in zip(seqs, ref)]
            w.data.copy_(keep)
            scores[gname] = sum(kl) / len(kl)
        out["sensitivity_s"] = round(time.perf_counter() - t0, 1)
        ranked = sorted(scores, key=scores.get, reverse=True)
        out["top"] = [(n, targets[n].name, round(scores[n], 5)) for n in ranked[:32]]
        print(f"per-tensor KL over {len(seqs)} rows, {len(scores)} tensors in {out['sensitivity_s']} s; most sensitive:")
        for n, qt, v in out["top"][:12]:
            print(f"  {n:28} {qt:6} {v:.5f}")
        plans = [(args.type, frozenset())] + [(args.type, frozenset(ranked[:k])) for k in args.counts] + \
            [(t, frozenset()) for t in args.compare]
        for t, raised in plans:
            path = work / f"{t}-{len(raised)}.gguf"
            G.convert_merged(work / "merged", path, t, f32=f32, imatrix=vectors or None, raised=raised, log=quiet)
            check = T.check(rows, path, max_drop=3.0, log=quiet)
            row = {"type": t, "raised": len(raised), "mib": round(path.stat().st_size / 2**20, 1),
                   "metric": check.gguf, "drop": check.drop, "changed": check.changed}
            out["files"].append(row)
            print(f"{t:7} raised {len(raised):3d}  {row['mib']:6.1f} MiB  {check.gguf:6.1%}  drop {check.drop:+5.1f}  "
                  f"changed {check.changed}", flush=True)
            path.unlink()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
