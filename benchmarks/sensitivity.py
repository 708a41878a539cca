"""Which tensors a quantized type hurts most, and whether keeping the worst few one type wider wins.

    python benchmarks/sensitivity.py RUN --eval-data FILE [--type q4_k_m] [--imatrix] [--raise 8 16 32]

Issue 22's step 4, measured before it was built into `lorakit export --max-size`: per-tensor
sensitivity (export/sensitivity.py's `rank`, here over the first --rows held-out rows, where the
export ranks on training rows). The K most
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

    from common import export_setup
    from libgguf.inspect import inspect_gguf

    from lorakit.export import gguf as G
    from lorakit.export import run as E
    from lorakit.export import task as T
    from lorakit.export.sensitivity import rank

    quiet = lambda s: None  # noqa: E731
    out: dict = {"run": args.run, "type": args.type, "imatrix": args.imatrix, "files": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-sensitivity-") as tmp:
        work = Path(tmp)
        setup = export_setup(args.run, args.eval_data, work)
        adapter, tok, f32, rows = (setup[k] for k in ("adapter", "tokenizer", "f32", "rows"))
        vectors = E.importance(adapter, work / "merged", f32, rows=256, text=None, tokenizer=tok,
                               log=quiet).vectors() if args.imatrix else {}
        targets = G._targets(inspect_gguf(f32), args.type, has_imatrix=args.imatrix)
        seqs = [ids + tok(r, add_special_tokens=False)["input_ids"]
                for ids, r in zip(rows.prompt_ids[:args.rows], rows.references[:args.rows])]
        t0 = time.perf_counter()
        scores = dict(rank(work / "merged", f32, args.type, seqs, imatrix=vectors or None, log=quiet))
        out["sensitivity_s"] = round(time.perf_counter() - t0, 1)
        ranked = sorted(scores, key=scores.get, reverse=True)
        out["top"] = [(n, targets[n].name, round(scores[n], 5)) for n in ranked[:32]]
        print(f"per-tensor KL over {len(seqs)} held-out rows, {len(scores)} tensors in {out['sensitivity_s']} s; most sensitive:")
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
