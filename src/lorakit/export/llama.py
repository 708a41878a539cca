"""llama.cpp in-process, for the checks of an exported GGUF: greedy continuations with the
log-probabilities of the raw logits (export/verify.py) and greedy answers (export/task.py).

The server is xllamacpp's (llama.cpp's own server code in this process), bound to 127.0.0.1."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from lorakit.errors import LorakitError

REQUEST_TIMEOUT_S = 60
"""Bound on one HTTP request to the in-process server (only /tokenize goes over HTTP)."""


def threads() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(8, os.cpu_count() or 1))


class Llama:
    """llama.cpp's server in-process: one slot, fp32 KV cache (the file is measured, not the cache),
    127.0.0.1 only. Use as a context manager; leaving it stops the server."""

    def __init__(self, gguf_path: str | Path, *, adapter_gguf: str | Path | None = None, n_ctx: int = 1024):
        try:
            import xllamacpp as xlc
        except ImportError as e:  # pragma: no cover - the extra is missing
            raise LorakitError("GGUF verification needs llama.cpp's Python binding xllamacpp",
                               hint="pip install 'lorakit[gguf]' (or pass --no-verify)") from e
        for p in (gguf_path, adapter_gguf):
            if p is not None and not Path(p).is_file():
                raise LorakitError(f"{p} does not exist", hint="export the GGUF first (lorakit export)")
        params = xlc.CommonParams()
        params.model.path = str(gguf_path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.warmup = False
        params.hostnames = ["127.0.0.1"]
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads()
        params.cache_type_k = params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
        params.verbosity = -1
        params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if adapter_gguf is not None:
            params.lora_adapters = [xlc.CommonAdapterLoraInfo(str(adapter_gguf), 1.0)]
        self.path = str(gguf_path)
        self._server = xlc.Server(params)

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        server, self._server = getattr(self, "_server", None), None
        del server  # ~Server stops its loop and the HTTP thread

    def complete(self, ids: list[int], n: int, n_probs: int = 1) -> list[dict]:
        """Greedy continuation of `ids` (at most `n` tokens; llama.cpp stops at its end-of-generation
        tokens): one dict per token with "id" and "top_logprobs" (n_probs ≥ 1 of them, from the raw
        logits, before any sampler)."""
        r = self._server.handle_completions({
            "prompt": list(ids), "n_predict": n, "temperature": 0.0, "top_k": 1, "n_probs": n_probs,
            "cache_prompt": True, "samplers": ["top_k"], "post_sampling_probs": False, "seed": 0})
        if "error" in r:
            raise RuntimeError(f"llama.cpp: {r['error']}")
        return (r["choices"][0].get("logprobs") or {}).get("content") or []

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of `text`, with the BOS its GGUF asks for and special tokens parsed."""
        body = json.dumps({"content": text, "add_special": True, "parse_special": True}).encode()
        req = urllib.request.Request(self._server.listening_address + "/tokenize", data=body,
                                     headers={"Content-Type": "application/json"})
        # The server is ours, on 127.0.0.1: never through an HTTP(S)_PROXY the environment names.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return list(json.loads(resp.read())["tokens"])


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    stop = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    return ids if stop is None else ids[:stop + 1]


def answer_with_gguf(gguf_path: str | Path, prompts_ids: list[list[int]], max_new_tokens: int,
                     stop_ids: list[int], *, adapter_gguf: str | Path | None = None) -> list[list[int]]:
    """Greedy answers of a GGUF in llama.cpp, one prompt after the other, each cut after its first
    stop token (the stop token itself excluded, as lorakit.infer's answers are)."""
    width = max((len(p) for p in prompts_ids), default=0) + max_new_tokens + 8
    out = []
    with Llama(gguf_path, adapter_gguf=adapter_gguf, n_ctx=max(256, width)) as llm:
        for ids in prompts_ids:
            got = cut_at_stop([t["id"] for t in llm.complete(ids, max_new_tokens, n_probs=1)], stop_ids)
            out.append(got[:-1] if got and got[-1] in stop_ids else got)
    return out


__all__ = ["Llama", "answer_with_gguf", "cut_at_stop", "threads"]
