"""`lorakit studio`: check the folder and the address, make the token, run uvicorn."""

from __future__ import annotations

from pathlib import Path

from lorakit.config import StudioConfig
from lorakit.errors import LorakitError


def studio(settings: StudioConfig, *, log=print) -> int:
    """Serve the studio over `settings.runs` until the process is stopped."""
    from lorakit.serve.run import _draining_server, _is_loopback, _require_serve_extra

    _require_serve_extra()
    import uvicorn

    from lorakit.studio.app import create_app
    from lorakit.studio.guard import hosts_for, new_token

    runs = Path(settings.runs)
    if not runs.is_dir():
        raise LorakitError(f"no such folder: {runs}", where="studio.runs",
                           hint="pass the folder that holds your run folders: --runs DIR (output.dir of your configs)")
    token = settings.token
    if token is None and not _is_loopback(settings.host):
        token = new_token()
    roots = [Path(d) for d in settings.data]
    for root in roots:
        if not root.is_dir():
            raise LorakitError(f"no such folder: {root}", where="studio.data", hint="name folders that hold data files")
    app = create_app(runs, hosts=hosts_for(settings.host, settings.port), token=token, data_roots=roots or None)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{shown}:{settings.port}/" + (f"?token={token}" if token else "")
    log(f"lorakit studio: {url}  (runs: {runs.resolve()})")
    # a page's event stream never ends by itself: on Ctrl-C or SIGTERM give open ones a second, then
    # close them; a stop asked for and carried out is a success (exit 0), as for lorakit serve
    _draining_server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                    timeout_graceful_shutdown=1)).run()
    return 0


__all__ = ["studio"]
