"""`lorakit serve` under load: aggregate tokens/s and time to first token at 1, 8 and 32 clients over
three adapters, the same at 32 on one adapter, and llama.cpp's server (xllamacpp) as a peer.

    python benchmarks/serve.py [--model DIR] [--clients 1 8 32] [--max-tokens 32] [--no-llamacpp]

Three random r=8 adapters are made over the base (default: the embedded SmolLM2-135M-Instruct).
`lorakit serve` runs as users start it, in its own process; llama.cpp's server runs in-process from
the same base (f16 GGUF) with the three adapters as LoRA GGUFs, each request naming its adapter
(llama.cpp's per-request `lora` field). Both are driven by the official `openai` client (AsyncOpenAI,
streamed chat completions, greedy): each of C clients sends its requests one after the other, all
clients at once. One client is the one-at-a-time baseline; every ratio is against it, measured in
the same run. Run it on an otherwise idle machine. Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADAPTERS = ("a1", "a2", "a3")
TOPICS = ("the sea", "a lighthouse keeper", "winter in a mountain village", "an old clock", "a lost letter",
          "the first day of school", "a market at dawn", "a train journey", "a garden after rain", "a city at night")


def make_adapters(base_dir: Path, root: Path, r: int = 8) -> dict[str, Path]:
    """Three LoRA adapters with seeded random weights, saved as `lorakit train` saves one.

    Random, not trained: throughput does not depend on what the weights are, and B != 0 makes each
    adapter's output really differ from the base's (with B = 0 the mixed batch would be trivial)."""
    import torch

    from lorakit.artifacts import AdapterMeta, BaseModelRef, DataRef, save_adapter
    from lorakit.config import LoraConfig, ModelConfig, TrainConfig
    from lorakit.data.templates import resolve_template
    from lorakit.model.load import load_model, load_tokenizer
    from lorakit.model.lora import apply_lora

    tok = load_tokenizer(ModelConfig(name=str(base_dir)))
    out = {}
    for i, name in enumerate(ADAPTERS):
        lora = LoraConfig(r=r, alpha=2 * r, dropout=0.0)
        model, info = load_model(ModelConfig(name=str(base_dir)), training=False)
        model = apply_lora(model, lora)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        meta = AdapterMeta(BaseModelRef(str(base_dir), str(base_dir), info.sha256, info.dtype, "none"),
                           resolve_template("auto", tok), DataRef([], [], "", 0, 0), 2048,
                           lora, TrainConfig(), {}, {})
        save_adapter(model, tok, root / name / "adapter", meta)
        out[name] = root / name
    return out


def requests_for(n: int, models: list[str]) -> list[tuple[str, str]]:
    """n (model, prompt) pairs, models round-robin, prompts that ask for more than max_tokens."""
    return [(models[i % len(models)], f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}, "
             f"chapter {i + 1}.") for i in range(n)]


async def drive(base_url: str, api_key: str, clients: int, reqs: list[tuple[str, str]], max_tokens: int,
                extra=lambda model: {}) -> dict:
    """`clients` concurrent clients sharing `reqs` (each takes the next one when its last one ends)."""
    import httpx
    import openai

    # A new connection per request: llama.cpp's HTTP server closes idle keep-alive connections,
    # which a pooled client then finds dead (a spurious error, not the server's answer). Both
    # servers are driven the same way; a loopback connect costs well under a millisecond.
    http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=1800)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http)
    queue = list(reversed(reqs))
    ttfts, tokens, errors, texts = [], [], [], {}

    async def one_client():
        while queue:
            i = len(queue) - 1
            model, prompt = queue.pop()
            t0 = time.perf_counter()
            first = None
            parts = []
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=extra(model))
                used = 0
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        if first is None:
                            first = time.perf_counter() - t0
                        parts.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        used = chunk.usage.completion_tokens
                ttfts.append(first if first is not None else time.perf_counter() - t0)
                tokens.append(used)
                texts[i] = "".join(parts)
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    await http.aclose()
    q = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    return {"clients": clients, "requests": len(reqs), "errors": len(errors), "error_sample": errors[:3],
            "tokens": sum(tokens), "seconds": round(wall, 2), "tokens_per_s": round(sum(tokens) / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "ttft_p95_s": round(q[18], 3) if ttfts else None, "texts": texts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lorakit(adapters: dict[str, Path], port: int, key: str, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lorakit", "serve", "--port", str(port), "--api-key", key,
           "--max-batch", str(max_batch)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"lorakit serve exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("lorakit serve did not come up within 300 s")


def start_llamacpp(base_dir: Path, adapters: dict[str, Path], work: Path, slots: int, n_ctx_per_slot: int):
    """llama.cpp's server over the f16 base with the three adapters loaded at scale 0, each request
    turning its own on (the `lora` field); `slots` parallel sequences (continuous batching)."""
    import xllamacpp as xlc

    from lorakit.export.gguf import convert_adapter, convert_merged
    from lorakit.export.llama import threads as _threads

    quiet = lambda s: None  # noqa: E731
    base_gguf = convert_merged(base_dir, work / "base-f16.gguf", "f16", log=quiet)
    lora_ggufs = [convert_adapter(path / "adapter", base_dir, work / f"{name}.gguf", log=quiet)
                  for name, path in adapters.items()]
    params = xlc.CommonParams()
    params.model.path = str(base_gguf)
    params.n_parallel = slots
    params.n_ctx = slots * n_ctx_per_slot
    params.hostnames = ["127.0.0.1"]
    params.port = free_port()
    params.warmup = True
    params.verbosity = -1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = _threads()
    params.lora_init_without_apply = True
    params.lora_adapters = [xlc.CommonAdapterLoraInfo(str(p), 0.0) for p in lora_ggufs]
    return xlc.Server(params)


def summarize(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print(f"  {'scenario':22} {'clients':>7} {'requests':>8} {'errors':>6} {'tokens':>6} {'tok/s':>7} {'x1':>6} "
          f"{'TTFT p50':>9} {'TTFT p95':>9}")
    one = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / one:5.1f}x" if one else "     -"
        print(f"  {r['scenario']:22} {r['clients']:7} {r['requests']:8} {r['errors']:6} {r['tokens']:6} "
              f"{r['tokens_per_s']:7.2f} {ratio:>6} {r['ttft_p50_s']:8.2f}s {r['ttft_p95_s']:8.2f}s")


def run_side(base_url: str, key: str, clients: list[int], max_tokens: int, per_client: int, min_requests: int,
             extra=lambda model: {}) -> list[dict]:
    rows = []
    asyncio.run(drive(base_url, key, 1, requests_for(2, list(ADAPTERS)), 4, extra))  # warm-up
    for c in clients:
        reqs = requests_for(max(min_requests, per_client * c), list(ADAPTERS))
        rows.append({"scenario": f"{c} clients, 3 adapters", **asyncio.run(drive(base_url, key, c, reqs, max_tokens,
                                                                                 extra))})
        print(f"  {rows[-1]['scenario']}: {rows[-1]['tokens_per_s']} tok/s", flush=True)
    c = max(clients)
    reqs = requests_for(max(min_requests, per_client * c), [ADAPTERS[0]])
    rows.append({"scenario": f"{c} clients, 1 adapter", **asyncio.run(drive(base_url, key, c, reqs, max_tokens,
                                                                            extra))})
    print(f"  {rows[-1]['scenario']}: {rows[-1]['tokens_per_s']} tok/s", flush=True)
    return rows


def ratios(rows: list[dict]) -> dict:
    one = next(r["tokens_per_s"] for r in rows if r["clients"] == 1)
    top = max(r["clients"] for r in rows)
    mixed = next(r for r in rows if r["clients"] == top and "3 adapters" in r["scenario"])
    single = next(r for r in rows if r["clients"] == top and "1 adapter" in r["scenario"])
    return {f"x_one_at_a_time_at_{top}": round(mixed["tokens_per_s"] / one, 2),
            "mixed_over_single_adapter": round(mixed["tokens_per_s"] / single["tokens_per_s"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--per-client", type=int, default=2, help="requests per client at each level")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer")
    args = p.parse_args(argv)
    if 1 not in args.clients:
        p.error("--clients must include 1: it is the one-at-a-time baseline")

    from lorakit.cli import _quiet_libraries
    from lorakit.model.embedded import embedded_model_dir

    _quiet_libraries()
    base_dir = Path(args.model) if args.model else embedded_model_dir()
    key = "bench-key"
    result: dict = {"model": str(base_dir), "max_tokens": args.max_tokens, "clients": args.clients,
                    "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="lorakit-serve-bench-") as tmp:
        work = Path(tmp)
        adapters = make_adapters(base_dir, work)
        port = free_port()
        proc = start_lorakit(adapters, port, key, max_batch=max(args.clients))
        try:
            print("lorakit serve", flush=True)
            result["lorakit"] = run_side(f"http://127.0.0.1:{port}/v1", key, args.clients, args.max_tokens,
                                         args.per_client, args.min_requests)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        result["lorakit_ratios"] = ratios(result["lorakit"])
        if not args.no_llamacpp:
            print("llama.cpp server (xllamacpp)", flush=True)
            ids = {name: i for i, name in enumerate(adapters)}
            server = start_llamacpp(base_dir, adapters, work, max(args.clients), 256 + args.max_tokens)
            try:
                result["llamacpp"] = run_side(server.listening_address + "/v1", "none", args.clients,
                                              args.max_tokens, args.per_client, args.min_requests,
                                              lambda model: {"lora": [{"id": ids[model], "scale": 1.0}]})
            finally:
                del server
            result["llamacpp_ratios"] = ratios(result["llamacpp"])
            top = max(args.clients)
            pick = lambda side: next(r["tokens_per_s"] for r in result[side]  # noqa: E731
                                     if r["clients"] == top and "3 adapters" in r["scenario"])
            result[f"lorakit_over_llamacpp_mixed_at_{top}"] = round(pick("lorakit") / pick("llamacpp"), 2)
    summarize("lorakit serve", result["lorakit"])
    print(f"  {result['lorakit_ratios']}")
    if "llamacpp" in result:
        summarize("llama.cpp server (xllamacpp, f16 GGUF + 3 LoRA GGUFs)", result["llamacpp"])
        print(f"  {result['llamacpp_ratios']}")
    for side in ("lorakit", "llamacpp"):
        for r in result.get(side, []):
            r.pop("texts", None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
