"""The studio's HTTP layer: pages, JSON, server-sent events of runs as they train, the actions.

Everything shown is read by lorakit.studio.read / views from the run folders, in a worker thread
(FastAPI runs plain `def` routes in its thread pool), so a slow disk, a large run or a long check
never blocks the event loop that streams other pages' updates; a stage the page starts is a child
process (`jobs`), so one user's long export blocks nothing at all. Every error is `{"error": {...}}`
JSON with the LorakitError's text (a config's problems as `{"problems": {key: text}}`); the page
shows each where it belongs.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from lorakit.artifacts import RunPaths, StudioPaths
from lorakit.errors import LorakitError
from lorakit.studio import views
from lorakit.studio.guard import Guard, _error
from lorakit.studio.read import NotFound, locate, runs_table

POLL_S = 0.5
"""How often a run's event stream looks at its files (a stat of a few files: negligible)."""
REDRAW_S = 2.0
"""The least time between two redraws of a training run's live sections. A redraw re-reads the
metrics and draws the curves again on the server and in the browser, both on the cores the
training uses; once a step is far too often for a fast run on a small machine (measured in
BENCHMARKS.md, "The studio"), and every 2 s is still live to the eye."""
REDRAW_SHARE = 0.05
"""...and at most this share of the wall time spent redrawing: a run with 10,000 logged steps
whose sections take 0.3 s to draw is redrawn every 6 s, not every 2."""
HEARTBEAT_S = 15.0
"""A comment line this often keeps proxies and the browser from closing an idle stream."""



def _asset(name: str) -> str:
    return resources.files("lorakit.studio").joinpath("static", name).read_text(encoding="utf-8")


def _lorakit_error(e: LorakitError) -> JSONResponse:
    status = 404 if isinstance(e, NotFound) else 400
    return JSONResponse({"error": {"message": e.message, "hint": e.hint, "field": e.where}}, status_code=status)


class NewRun(BaseModel):
    name: str
    values: dict[str, Any] = {}


class RunAction(BaseModel):
    id: str


class Load(BaseModel):
    ids: list[str]


class Chat(BaseModel):
    messages: list[dict[str, Any]]
    models: list[str]
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None


class StageAction(BaseModel):
    id: str
    kind: str
    split: str = "validation"  # eval
    base: bool = False  # eval: score the base too
    gguf: str = "q4_k_m"  # export
    ollama: bool = False  # export


def stage_options(a: StageAction, folder: Path) -> list[str]:
    """The CLI flags of a stage the page asked for, built here from checked choices (the page never
    sends flags: an --out of its choosing could write anywhere)."""
    from lorakit.export.gguf import TYPES

    types = (*TYPES, "auto")
    if a.kind == "eval":
        if a.split not in ("validation", "test"):
            raise LorakitError(f"split {a.split!r}: validation or test", where="split")
        return ["--split", a.split] + (["--base"] if a.base else [])
    if a.kind == "merge":
        return ["--out", str(RunPaths(folder).root / "merged"), "--overwrite"]
    if a.kind == "export":
        if a.gguf not in types:
            raise LorakitError(f"GGUF type {a.gguf!r} is not one of {', '.join(types)}", where="gguf")
        return ["--gguf", a.gguf] + (["--ollama"] if a.ollama else [])
    raise LorakitError(f"unknown stage {a.kind!r}", where="kind", hint="eval, merge or export")


def create_app(runs: Path, *, hosts: set[str], token: str | None = None,
               data_roots: list[Path] | None = None) -> FastAPI:
    """The studio over the runs folder `runs`, answering to `hosts` (Host headers), with `token`
    required when given; the New-run form picks data from `data_roots` (default: the working folder)."""
    import contextlib

    from lorakit.report import CSS
    from lorakit.studio import form
    from lorakit.studio.jobs import Jobs
    from lorakit.studio.playground import Playground

    runs = Path(runs)
    roots = [Path(r) for r in data_roots] if data_roots else [Path.cwd()]
    jobs = Jobs(runs)
    playground = Playground()
    guard = Guard(hosts, token)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        playground.close()  # the engine thread gives the model back

    app = FastAPI(title="lorakit studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    page = _asset("index.html")
    assets = {"studio.js": ("text/javascript", _asset("studio.js")),
              "studio.css": ("text/css", CSS + _asset("studio.css"))}

    app.add_middleware(_Guarded, guard=guard)

    @app.exception_handler(LorakitError)
    async def _errors(request: Request, e: LorakitError):
        return _lorakit_error(e)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/static/{name}")
    def static(name: str):
        if name not in assets:
            return JSONResponse(_error(f"no such file: {name}"), status_code=404)
        kind, text = assets[name]
        return Response(text, media_type=kind, headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    def api_runs():
        return {"folder": str(runs.resolve()), "runs": runs_table(runs)}

    @app.get("/api/run")
    def api_run(id: str = Query(...)):
        try:
            return views.run_page(runs, id)
        except NotFound:
            # a run started here has no folder until its process has loaded the model and the data
            starting = [j for j in jobs.views(id) if j["state"] == "running" and j["kind"] == "train"]
            if not starting:
                raise
            return {"starting": starting[0]}

    @app.get("/api/run/plan")
    def api_plan(id: str = Query(...)):
        return views.plan(runs, id)

    @app.get("/api/run/eval")
    def api_eval(id: str = Query(...), name: str = Query(..., alias="set")):
        return views.eval_examples(runs, id, name)

    @app.get("/api/compare")
    def api_compare(id: list[str] = Query(...)):
        return views.compare(runs, id)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"][1:]) or "body"
        return JSONResponse(_error(f"{where}: {err['msg']}", where), status_code=400)

    # ---- the New-run form

    @app.get("/api/schema")
    def api_schema():
        return {"sections": form.schema(), "runs": str(runs.resolve()), "data_roots": [str(r) for r in roots]}

    @app.get("/api/files")
    def api_files():
        return {"files": form.data_files(roots)}

    @app.post("/api/check")
    def api_check(body: NewRun):
        """The form checked as `lorakit train` would load it; with no problem, what `lorakit data`
        and `lorakit plan` say of it (seconds: the tokenizer, the data, a two-layer probe)."""
        from lorakit.pipeline import data_report
        from lorakit.plan import format_plan, make_plan

        cfg, problems = form.check(body.values, body.name, runs, roots)
        if cfg is None:
            return {"problems": problems}
        return {"problems": {}, "data": data_report(cfg), "plan": format_plan(make_plan(cfg, calibrate_steps=0))}

    @app.post("/api/runs")
    def api_start(body: NewRun):
        from lorakit import artifacts
        from lorakit import config as config_mod

        cfg, problems = form.check(body.values, body.name, runs, roots)
        if cfg is None:
            return JSONResponse({"problems": problems}, status_code=400)
        if (runs / body.name).exists():
            return JSONResponse({"problems": {"name": f"name: runs/{body.name} exists; choose another name"}},
                                status_code=400)
        path = StudioPaths(runs).config(body.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.atomic_write_text(path, config_mod.dump(cfg))
        return {"run": body.name, "job": jobs.train(path, body.name).view()}

    # ---- actions on a run

    @app.post("/api/run/stop")
    def api_stop(body: RunAction):
        locate(runs, body.id)
        return {"pid": jobs.stop(body.id)}

    @app.post("/api/run/resume")
    def api_resume(body: RunAction):
        folder = locate(runs, body.id)
        own = StudioPaths(runs).config(body.id)
        config = own if own.is_file() else RunPaths(folder).config
        return {"job": jobs.train(config, body.id, resume=True).view()}

    @app.post("/api/run/stage")
    def api_stage(body: StageAction):
        folder = locate(runs, body.id)
        return {"job": jobs.stage(body.id, body.kind, stage_options(body, folder)).view()}

    @app.get("/api/jobs")
    def api_jobs(id: str | None = None):
        return {"jobs": jobs.views(id)}

    @app.get("/api/run/download")
    def api_download(id: str = Query(...), what: str = Query(...), file: str | None = None):
        """The adapter folder as a zip, or one GGUF of the run's export/ folder."""
        from fastapi.responses import FileResponse

        paths = RunPaths(locate(runs, id))
        if what == "adapter":
            if not paths.meta.is_file():
                raise NotFound(f"run {id!r} has no adapter yet")
            return Response(_zip(paths.adapter), media_type="application/zip",
                            headers={"Content-Disposition": f'attachment; filename="{paths.root.name}-adapter.zip"'})
        if what == "gguf" and file and file.endswith(".gguf") and "/" not in file and not file.startswith("."):
            target = paths.export_dir / file
            if target.is_file() and target.resolve().is_relative_to(paths.export_dir.resolve()):
                return FileResponse(target, filename=file, media_type="application/octet-stream")
        raise NotFound(f"run {id!r} has no such download", hint="what=adapter, or what=gguf&file=NAME.gguf")

    # ---- the playground

    @app.get("/api/playground")
    def api_playground():
        return playground.view()

    @app.post("/api/playground/load")
    def api_load(body: Load):
        return playground.load(body.ids, [locate(runs, i) for i in body.ids])

    @app.post("/api/playground/chat")
    async def api_chat(body: Chat):
        handles = playground.submit(body.messages, body.models, max_tokens=body.max_tokens,
                                    temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                    loop=asyncio.get_running_loop())
        return StreamingResponse(Playground.stream(handles), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/run/events")
    async def api_events(request: Request, id: str = Query(...)):
        seen = await asyncio.to_thread(views.version, runs, id)  # a missing run is a 404 here, not in the stream

        async def stream():
            nonlocal seen
            quiet, sent_jobs, next_redraw = 0.0, None, 0.0
            yield "retry: 2000\n\n"
            while not await request.is_disconnected():
                await asyncio.sleep(POLL_S)
                try:
                    now = await asyncio.to_thread(views.version, runs, id)
                except NotFound:
                    yield _event("gone", {"id": id})
                    return
                mine = await asyncio.to_thread(jobs.views, id)
                if mine != sent_jobs:
                    sent_jobs, quiet = mine, 0.0
                    yield _event("jobs", {"jobs": mine})
                urgent = now[0][-1] != seen[0][-1] or now[1] != seen[1]  # a new state or a later stage: at once
                if now != seen and (urgent or time.monotonic() >= next_redraw):
                    names = views.LIVE if now[1] == seen[1] else views.SECTIONS
                    seen, quiet = now, 0.0
                    start = time.monotonic()
                    sections = await asyncio.to_thread(views.sections, runs, id, names)
                    took = time.monotonic() - start
                    next_redraw = start + max(REDRAW_S, took / REDRAW_SHARE)
                    yield _event("live", {"state": now[0][-1], "sections": sections})
                else:
                    quiet += POLL_S
                    if quiet >= HEARTBEAT_S:
                        quiet = 0.0
                        yield ": idle\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class _Guarded:
    """The guard in front of every route, as plain ASGI (a streamed response passes through
    untouched, and the route still sees the client disconnect), plus the headers every answer
    carries: no sniffing, no framing, scripts and styles from the studio only."""

    HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
               "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                          "frame-ancestors 'none'"}

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        from starlette.datastructures import MutableHeaders

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.guard.refuse(Request(scope))
        if refused is not None:
            return await refused(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in self.HEADERS.items():
                    headers[k] = v
            await send(message)

        await self.app(scope, receive, with_headers)


def _zip(folder: Path) -> bytes:
    """The files of `folder` (an adapter: megabytes) as a zip, in memory."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


__all__ = ["create_app"]
