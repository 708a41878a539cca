"""`lorakit serve`: build the session, the engine and the app, run uvicorn, drain on exit."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import threading
from pathlib import Path

from lorakit.config import ServeConfig
from lorakit.errors import LorakitError, MissingExtraError


def _require_serve_extra() -> None:
    for package in ("fastapi", "uvicorn"):
        try:
            __import__(package)
        except ImportError:
            raise MissingExtraError(package, "serve", "lorakit serve") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_named(specs: list[str]) -> list[tuple[str, str]]:
    """--adapter NAME=PATH values as (name, path)."""
    out = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise LorakitError(f"--adapter {s!r} is not NAME=PATH", hint="e.g. --adapter support=runs/support")
        out.append((name, path))
    return out


def read_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    if api_key and api_key_file:
        raise LorakitError("both --api-key and --api-key-file given", hint="use one of them")
    if api_key_file:
        try:
            key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise LorakitError(f"cannot read the API key file: {e}", where=api_key_file) from None
        if not key:
            raise LorakitError("the API key file is empty", where=api_key_file, hint="write the key on one line")
        return key
    return api_key or None


def build_session(adapters: list[str], named: list[tuple[str, str]], base: str | None, log=print):
    """One session holding every adapter; a --adapter NAME=PATH first adapter is renamed to NAME."""
    from lorakit import infer
    from lorakit.artifacts import BaseModelRef, check_same_base, find_adapter_dir, read_meta

    specs = [(None, p) for p in adapters] + list(named)
    if not specs:
        raise LorakitError("serving a base model without any adapter is not supported yet",
                           hint="pass a run or adapter folder (lorakit serve runs/NAME); the base is then served "
                           "too, under its own name")
    first_name, first_path = specs[0]
    if base is not None:
        meta = read_meta(find_adapter_dir(first_path))
        named = BaseModelRef(base, base, None, meta.base.dtype, meta.base.quantization)  # a name, no hash
        check_same_base(meta.base, named, policy="error", unknown="by name", held_as="--base", where=str(first_path),
                        hint="drop --base: the base is read from lorakit.json")
    session = infer.load_session([first_path], log=log)
    if first_name is not None and first_name != session.default.name:
        old = session.default
        session.model.load_adapter(str(old.path), adapter_name=first_name, is_trainable=False)
        session.model.set_adapter(first_name)
        session.model.delete_adapter(old.name)
        session.adapters = {first_name: infer.Adapter.from_meta(first_name, old.path, old.meta)}
        session.model.eval()
    for name, path in specs[1:]:
        session.add_adapter(path, name)
    return session


def serve(settings: ServeConfig, *, log=print) -> int:
    """`lorakit serve`: the models and limits of `settings` behind the API until the process is stopped."""
    _require_serve_extra()
    import uvicorn

    from lorakit.serve.app import Limits, create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import Registry

    s = settings
    key = read_api_key(s.api_key, s.api_key_file)
    pairs = parse_named(list(s.adapter))
    if not _is_loopback(s.host) and key is None:
        log(f"warning: serving on {s.host} without an API key: anyone who can reach this address can use the "
            "models (and load adapters, with --allow-adapter-loading); pass --api-key-file")
    if s.allow_adapter_loading and not s.adapter_root:
        log("warning: --allow-adapter-loading without --adapter-root: every load request will be refused")
    session = build_session(list(s.adapters), pairs, s.base, log=log)
    engine = Engine(session, max_batch=s.max_batch, max_queue=s.max_queue, log=log)
    registry = Registry(engine, adapter_roots=list(s.adapter_root), allow_loading=s.allow_adapter_loading)
    app = create_app(engine, registry, api_key=key,
                     limits=Limits(max_tokens_cap=s.max_tokens_cap, timeout_s=s.timeout))
    engine.start()
    names = ", ".join([registry.base_id] + registry.adapters())
    log(f"lorakit serve: http://{s.host}:{s.port}/v1 — models: {names}")
    config = uvicorn.Config(app, host=s.host, port=s.port, log_level="info", timeout_graceful_shutdown=s.drain_s)
    try:
        _draining_server(config).run()
    finally:
        engine.shutdown(drain_s=s.drain_s)
    return 0


def _draining_server(config):
    """A uvicorn server whose signals only ask it to stop. uvicorn re-raises SIGTERM/SIGINT once its
    own shutdown is done, which kills the process before the engine has finished or cancelled its
    in-flight requests; here the caller then drains the engine and the command exits 0: a stop
    asked for and carried out cleanly is a success."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return DrainingServer(config)
