"""`lorakit serve` over HTTP: a real uvicorn server on 127.0.0.1 and the real Engine over the tiny
random Llama, driven by the official `openai` client (what users will point at it), plus raw httpx
where the client hides what is checked (status codes, headers, SSE bytes, closing a stream early)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (an openai dependency)

from conftest import make_adapter  # noqa: E402

KEY = "sk-lorakit-test"
MSGS = [{"role": "user", "content": "Where is my order #12345?"}]
N = 12  # tokens per greedy answer: the random model rarely emits a stop token, so answers end by length


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, limit_s: float, headers=None) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health", timeout=1.0, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}/health did not answer within {limit_s} s")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    a = make_adapter(tiny_model_dir, tiny_tokenizer, root / "support", seed=1)
    b = make_adapter(tiny_model_dir, tiny_tokenizer, root / "chatty", seed=2, template="chatml")
    loadable = root / "loadable"
    (loadable / "extra").parent.mkdir(parents=True, exist_ok=True)
    make_adapter(tiny_model_dir, tiny_tokenizer, loadable / "extra", seed=3)
    make_adapter(tiny_model_dir, tiny_tokenizer, loadable / "othersha", seed=4, sha="0" * 64)
    pickled = make_adapter(tiny_model_dir, tiny_tokenizer, loadable / "pickled", seed=5)
    _to_bin(pickled / "adapter")
    outside = make_adapter(tiny_model_dir, tiny_tokenizer, root / "outside", seed=6)
    (loadable / "sneaky").symlink_to(outside)  # inside the root by name, outside once resolved
    return {"support": a, "chatty": b, "root": loadable, "outside": outside}


def _to_bin(adapter_dir: Path) -> None:
    """The same adapter saved as pickle (adapter_model.bin) only: must be refused, never unpickled."""
    import torch
    from safetensors.torch import load_file

    st = adapter_dir / "adapter_model.safetensors"
    torch.save(load_file(st), adapter_dir / "adapter_model.bin")
    st.unlink()


@pytest.fixture(scope="module")
def server(adapters):
    from lorakit import infer
    from lorakit.data.templates import resolve_template
    from lorakit.serve.app import Limits, create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import Registry

    session = infer.load_session([adapters["support"], adapters["chatty"]], log=lambda *_: None)
    # References before the engine owns the model: infer.generate is what `lorakit generate` answers.
    greedy = infer.Sampling(greedy=True, max_new_tokens=N)
    refs = {name: infer.generate(session, MSGS, greedy, adapter=name) for name in ("support", "chatty")}
    # The base answers in its own chat template (the tiny tokenizer's ChatML), not an adapter's.
    own = resolve_template("model", session.tokenizer)
    assert own.source != session.adapters["support"].template.source
    refs[infer.BASE] = infer.generate(session, MSGS, greedy, adapter=infer.BASE, template=own)
    # max_batch 4 / max_queue 2: small enough for a burst of 16 to overflow the queue (the 429 test).
    engine = Engine(session, max_batch=4, max_queue=2, log=lambda *_: None)
    registry = Registry(engine, adapter_roots=[adapters["root"]], allow_loading=True)
    limits = Limits(max_tokens_cap=1000, max_body_bytes=64 * 1024, timeout_s=60)
    app = create_app(engine, registry, api_key=KEY, limits=limits)
    with running(app, engine) as url:
        yield {"url": url, "engine": engine, "registry": registry, "refs": refs, "session": session}


@contextlib.contextmanager
def running(app, engine):
    """The engine and a uvicorn server on a free loopback port, stopped (server, then engine) after."""
    import uvicorn

    engine.start()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, 20)
        yield url
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        engine.shutdown(drain_s=1)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_chat_greedy_matches_generate_streamed_and_not(server, client):
    """The server's greedy answer is `infer.generate`'s, token for token, for each adapter and the
    base (prompted with its own chat template), and streaming does not change it."""
    base_id = server["registry"].base_id
    for model, name in (("support", "support"), ("chatty", "chatty"), (base_id, "__base__"), ("__base__", "__base__")):
        ref = server["refs"][name]
        r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=N, temperature=0)
        text = r.choices[0].message.content
        # infer.Completion strips its text; the server returns the tokens' text as decoded.
        assert text.strip() == ref.text, model
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == ref.prompt_tokens
        assert r.usage.completion_tokens == ref.completion_tokens
        assert r.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens
        chunks = list(client.chat.completions.create(model=model, messages=MSGS, max_completion_tokens=N,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.completion_tokens
    # different adapters answer differently (the adapters are random, not zero)
    assert len({server["refs"][n].text for n in ("support", "chatty", "__base__")}) == 3


def test_completions_raw_prompt_streamed_and_not(server, client):
    tok = server["session"].tokenizer
    prompt = "### Instruction:\nSay hello.\n\n### Response:\n"
    r = client.completions.create(model="support", prompt=prompt, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
    s = list(client.completions.create(model="support", prompt=[prompt], max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    # seeded sampling is reproducible
    a, b = (client.completions.create(model="support", prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.9,
                                      seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_sse_bytes_end_with_raw_done(server):
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers=auth(), timeout=30,
                      json={"model": "support", "messages": MSGS, "max_tokens": 4, "stream": True}) as r:
        body = r.read().decode()
    assert r.headers["content-type"].startswith("text/event-stream")
    assert body.endswith("data: [DONE]\n\n") and '"[DONE]"' not in body
    assert all(ev.startswith("data: ") for ev in body.strip().split("\n\n"))


def test_models_list_has_base_and_parents(server, client):
    base_id = server["registry"].base_id
    models = {m.id: m.to_dict() for m in client.models.list()}
    assert set(models) == {base_id, "support", "chatty"}
    assert models["support"]["parent"] == base_id and models["chatty"]["parent"] == base_id
    assert all(m["object"] == "model" and m["owned_by"] == "lorakit" for m in models.values())


def test_errors_are_openai_shaped(server, client):
    url = server["url"]
    # 401: no key, wrong key
    r = httpx.post(url + "/v1/chat/completions", json={"model": "support", "messages": MSGS})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # 404 unknown model
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSGS)
    assert e.value.body["code"] == "model_not_found"
    # 400 unsupported parameters, named
    for kwargs, param in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                          ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
                           "tool_choice"),
                          ({"tools": [{"type": "function", "function": {}}]}, "tools"),
                          ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"stop": ["a", "b", "c", "d", "e"]}, "stop")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="support", messages=MSGS, max_tokens=2, **kwargs)
        assert e.value.body["param"] == param, kwargs
    # 400 validation errors name the field (not FastAPI's 422)
    for body, param in (({"model": "support", "messages": MSGS, "temperature": 5}, "temperature"),
                        ({"model": "support"}, "messages"),
                        ({"model": "support", "messages": [{"role": "robot", "content": "x"}]}, "messages")):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth())
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body
    # 400: over the context (512 positions) and over the cap (1000)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="support", messages=MSGS, max_tokens=600)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="support", prompt="hi", max_tokens=2000)
    assert "cap" in e.value.body["message"]
    # 413 over the 64 KiB body cap
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="support", messages=[{"role": "user", "content": "x" * 70_000}])
    assert e.value.status_code == 413
    # unknown route: shaped 404
    r = httpx.get(url + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and "error" in r.json()


def test_burst_over_queue_gets_429_with_retry_after(server):
    """16 at once against max_batch 4 + max_queue 2: the engine admits at most its batch between
    two steps, so at least 16 - 4 - 2 ... in practice most are refused; some must be, none may fail."""
    results = []

    def one():
        r = httpx.post(server["url"] + "/v1/completions", headers=auth(), timeout=30,
                       json={"model": "support", "prompt": "Hello", "max_tokens": 64, "temperature": 0})
        results.append((r.status_code, r.headers.get("retry-after"), r.json()))

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    codes = [c for c, _, _ in results]
    assert len(codes) == 16 and set(codes) <= {200, 429} and 429 in codes and 200 in codes
    assert all(ra == "1" and body["error"]["type"] == "rate_limit_error" for c, ra, body in results if c == 429)


LONG = 400


def long_prompt(client, model: str) -> str:
    """A prompt whose greedy answer runs to LONG tokens (no stop token), so a request for it is still
    running when the test acts on it; found by asking (greedy is deterministic)."""
    for prompt in ("Hello", "Order number: #", "The quick brown fox", "Category:", "Our standard return"):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=LONG, temperature=0)
        if r.choices[0].finish_reason == "length":
            return prompt
    pytest.fail(f"no candidate prompt runs to {LONG} tokens on {model}")


def test_client_disconnect_frees_the_slot(server, client):
    """Closing a stream after its first chunk cancels the request: the engine is idle again well
    before the LONG steps the request would have taken (steps counted, not time)."""
    engine = server["engine"]
    prompt = long_prompt(client, "support")
    before = engine.steps
    with httpx.stream("POST", server["url"] + "/v1/completions", headers=auth(), timeout=30,
                      json={"model": "support", "prompt": prompt, "max_tokens": LONG, "stream": True,
                            "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    end = time.monotonic() + 10
    while (engine.running or engine.waiting) and time.monotonic() < end:
        time.sleep(0.02)
    assert engine.running == 0 and engine.waiting == 0
    # LONG - 1 decode steps if it ran out; the cancel lands within a few steps of the close
    assert engine.steps - before < LONG // 2


def test_runtime_load_and_unload(server, client, adapters):
    url, root = server["url"], adapters["root"]

    def post(path, body):
        return httpx.post(url + path, json=body, headers=auth(), timeout=30)

    r = post("/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(root / "extra")})
    assert r.status_code == 200, r.text
    assert "extra" in {m.id for m in client.models.list()}
    out = client.chat.completions.create(model="extra", messages=MSGS, max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1
    r = post("/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(root / "extra")})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    # refused: outside the root, a symlink out of it, `..`, pickle-only weights, another base
    for path, code in ((adapters["outside"], 403), (root / "sneaky", 403), (root / ".." / "outside", 403),
                       (root / "pickled", 400), (root / "othersha", 400)):
        r = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)})
        assert r.status_code == code, (path, r.text)
    assert ".bin" in post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "pickled")}).text
    msg = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "othersha")}).json()["error"]
    assert "0" * 64 in msg["message"] and server["session"].base_sha256 in msg["message"]
    # unload: refused while a request for it is queued. The engine thread is held between two steps
    # (a call that waits on a gate) so the request stays queued for as long as the check takes.
    engine, gate, answers = server["engine"], threading.Event(), []
    engine.call_between_steps(lambda: gate.wait(10))
    asker = threading.Thread(target=lambda: answers.append(
        post("/v1/completions", {"model": "extra", "prompt": "Hi", "max_tokens": 2})))
    asker.start()
    try:
        end = time.monotonic() + 10
        while engine.in_use("extra") == 0 and time.monotonic() < end:
            time.sleep(0.01)
        r = post("/v1/unload_lora_adapter", {"lora_name": "extra"})
        assert r.status_code == 409 and "running or queued" in r.json()["error"]["message"], r.text
    finally:
        gate.set()
        asker.join(timeout=30)
    assert answers and answers[0].status_code == 200
    assert post("/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 200
    assert "extra" not in server["session"].adapters
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="extra", messages=MSGS, max_tokens=2)
    assert post("/v1/unload_lora_adapter", {"lora_name": "support"}).status_code == 400  # the first adapter


def test_cli_serves_and_exits_cleanly(adapters):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", str(adapters["support"]),
                             "--adapter", f"renamed={adapters['chatty']}", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, 60)
        ids = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert {"support", "renamed"} <= ids
        # runtime loading is off without --allow-adapter-loading
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/"}).status_code == 404
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_cli_refuses_public_host_warning_and_bad_args(adapters):
    from lorakit.serve import run

    logs = []
    with pytest.raises(Exception):
        run.parse_named(["noequals"])
    assert run.read_api_key(None, None) is None
    assert not run._is_loopback("0.0.0.0") and run._is_loopback("127.0.0.1") and run._is_loopback("::1")
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError, match="without any adapter"):
        run.build_session([], [], "some/base", log=logs.append)


# ----------------------------------------------------------------------------- load


@pytest.fixture(scope="module")
def load_server(adapters, tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """Three adapters (two templates) and the base, with the default batch (32) and queue (256)."""
    from lorakit import infer
    from lorakit.serve.app import create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import Registry

    third = make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path_factory.mktemp("load") / "third", seed=7,
                         template="chatml")
    session = infer.load_session([adapters["support"], adapters["chatty"], third], log=lambda *_: None)
    engine = Engine(session, log=lambda *_: None)
    registry = Registry(engine)
    with running(create_app(engine, registry, api_key=KEY), engine) as url:
        yield {"url": url, "engine": engine, "models": [registry.base_id, "support", "chatty", "third"]}


def test_200_concurrent_requests_over_three_adapters_and_the_base(load_server):
    """200 requests at once (chat and completions, streamed and not, 4 models, 4..16 tokens each):
    none fails, the engine really batches them (most run together), and every greedy answer is
    token for token the one the same request gets when it is sent alone."""
    engine, models = load_server["engine"], load_server["models"]
    requests = []
    for i in range(200):
        requests.append({"model": models[i % 4], "chat": i % 3 != 0, "stream": i % 2 == 0, "max_tokens": 4 + i % 13,
                         "text": f"Question {i}: where is order #{1000 + 7 * i}?" + " Please hurry." * (i % 5)})

    async def send(client, r):
        common = {"model": r["model"], "max_tokens": r["max_tokens"], "temperature": 0}
        if r["chat"]:
            msgs = [{"role": "user", "content": r["text"]}]
            if r["stream"]:
                out = await client.chat.completions.create(messages=msgs, stream=True,
                                                           stream_options={"include_usage": True}, **common)
                chunks = [c async for c in out]
                return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                        [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens)
            out = await client.chat.completions.create(messages=msgs, **common)
            return out.choices[0].message.content, out.choices[0].finish_reason, out.usage.completion_tokens
        if r["stream"]:
            out = await client.completions.create(prompt=r["text"], stream=True, stream_options={"include_usage": True},
                                                  **common)
            chunks = [c async for c in out]
            return ("".join(c.choices[0].text for c in chunks if c.choices),
                    [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens)
        out = await client.completions.create(prompt=r["text"], **common)
        return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=load_server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        alone = [await send(client, r) for r in requests]  # one at a time: each ran in a batch of one
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, engine.running)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        together = await asyncio.wait_for(asyncio.gather(*(send(client, r) for r in requests)), 600)
        watcher.cancel()
        await client.close()
        return alone, together, peak

    alone, together, peak = asyncio.run(main())
    assert peak >= 16, f"the 200 requests never ran more than {peak} at a time"
    diff = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    assert not diff, [(i, requests[i], alone[i], together[i]) for i in diff[:3]]
    # the answers are real: of the requested length or stopped, and different across models
    assert all(reason in ("stop", "length") and n <= r["max_tokens"] for (_, reason, n), r in zip(alone, requests))
    assert len({alone[i][0] for i in range(1, 9)}) > 1
