"""lorakit studio: the runs folder as a web app, tested as a user meets it — the server started on
127.0.0.1 by the CLI, pages driven by a real headless Chromium (Debian's, through Playwright), a
real training watched live — and as an attacker would try it: paths out of the folder, a foreign
Host, no token, cross-site writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SHOTS = os.environ.get("LORAKIT_STUDIO_SHOTS")  # a folder to keep the screenshots in (the README's come from here)


def _config(tmp: Path, model_dir: Path, name: str, **train) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp, model_dir, name, train={"max_steps": 6, **train})),
                    encoding="utf-8")
    return path


def _lorakit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], env=ENV, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Path:
    """Two finished runs that differ in rank, the first evaluated on its validation split."""
    tmp = tmp_path_factory.mktemp("studio")
    _lorakit("train", str(_config(tmp, tiny_model_dir, "alpha")))
    _lorakit("train", str(_config(tmp, tiny_model_dir, "beta")), "--lora.r", "8")
    _lorakit("eval", str(tmp / "runs" / "alpha"), "--max-new-tokens", "8")
    return tmp / "runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Studio:
    """`lorakit studio` as a user starts it, on a free port; stopped at the end."""

    def __init__(self, runs: Path, *extra: str):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "lorakit", "studio", "--runs", str(runs), "--port",
                                      str(self.port), *extra], env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.first_line = self.proc.stdout.readline()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(self.url + "/static/studio.css", timeout=2)
                return
            except httpx.TransportError:
                assert self.proc.poll() is None, self.proc.stdout.read()
                time.sleep(0.2)
        raise AssertionError("the studio did not start within 60 s")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def studio(runs):
    s = Studio(runs)
    yield s
    s.close()


# --------------------------------------------------------------------------- what the server refuses


def test_paths_outside_the_runs_folder_are_refused(runs, tmp_path):
    from lorakit.studio.read import NotFound, locate

    outside = tmp_path / "secret"
    outside.mkdir()
    (runs / "link-out").symlink_to(outside, target_is_directory=True)
    try:
        for bad in ("../secret", "/etc", "alpha/../../secret", ".hidden", "alpha/./adapter/..", "", "link-out",
                    "alpha\\..\\x", "%2e%2e"):
            with pytest.raises(NotFound):
                locate(runs, bad)
        assert locate(runs, "alpha") == (runs / "alpha").resolve()
        from lorakit.studio.read import runs_table

        assert "link-out" not in {r["id"] for r in runs_table(runs)}  # a link out of the folder is not listed
    finally:
        (runs / "link-out").unlink()


def test_the_form_takes_only_schema_keys_and_files_in_its_folders(runs, tmp_path, tiny_model_dir):
    from lorakit.studio import form

    allowed = tmp_path / "data"
    allowed.mkdir()
    good = allowed / "rows.jsonl"
    good.write_text('{"instruction": "Say hello.", "output": "Hello!"}\n')
    secret = tmp_path / "secret.jsonl"
    secret.write_text(good.read_text())
    roots = [allowed, tiny_model_dir]
    values = {"model.name": str(tiny_model_dir), "data.train": str(good), "data.template": "alpaca"}
    cfg, problems = form.check(values, "ok-run", runs, roots)
    assert problems == {} and cfg.data.train == [str(good)] and cfg.run_dir == (runs / "ok-run").resolve()
    for bad in (str(secret), str(allowed / ".." / "secret.jsonl"), "/etc/passwd"):
        _, problems = form.check({**values, "data.train": bad}, "x", runs, roots)
        assert "not a file in the studio's data folders" in problems["data.train"]
    _, problems = form.check({**values, "model.name": str(tmp_path)}, "x", runs, roots)
    assert "outside the studio's data folders" in problems["model.name"]
    _, problems = form.check({**values, "output.dir": "/tmp", "serve.host": "0.0.0.0"}, "../x", runs, roots)
    assert set(problems) == {"output.dir", "serve.host", "name"}
    _, problems = form.check({**values, "train.lr": "-1", "lora.r": "[oops"}, "x", runs, roots)
    assert "must be positive" in problems["train.lr"] and "not a value YAML can read" in problems["lora.r"]
    fields = {f["key"]: f for s in form.schema() for f in s["fields"]}
    assert fields["train.method"]["choices"] == ["sft", "dpo", "kto", "orpo", "simpo", "grpo"]
    assert fields["data.train"]["required"] and "output.dir" not in fields and "serve.port" not in fields


def test_the_guard_checks_host_token_and_cross_site_writes(studio, runs):
    import httpx

    ok = httpx.get(studio.url + "/api/run", params={"id": "../secret"})
    assert ok.status_code == 404 and "not a run name" in ok.json()["error"]["message"]
    assert httpx.get(studio.url + "/api/runs", headers={"Host": f"evil.example:{studio.port}"}).status_code == 400
    # a write needs the studio's own header and no foreign Origin; past the guard, an empty body is
    # the route's own 400 naming the missing field
    assert httpx.post(studio.url + "/api/runs").status_code == 403
    assert httpx.post(studio.url + "/api/runs", headers={"X-Lorakit-Studio": "1",
                                                         "Origin": "http://evil.example"}).status_code == 403
    assert httpx.post(studio.url + "/api/runs", headers={"X-Lorakit-Studio": "1",
                                                         "Sec-Fetch-Site": "cross-site"}).status_code == 403
    passed = httpx.post(studio.url + "/api/runs", headers={"X-Lorakit-Studio": "1", "Origin": studio.url}, json={})
    assert passed.status_code == 400 and passed.json()["error"]["field"] == "name"

    guarded = Studio(runs, "--token", "s3cret-token")
    try:
        assert "?token=s3cret-token" in guarded.first_line
        assert httpx.get(guarded.url + "/api/runs").status_code == 401
        assert httpx.get(guarded.url + "/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(guarded.url + "/api/runs", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        with httpx.Client(base_url=guarded.url, follow_redirects=True) as client:  # ?token= once, then the cookie
            first = client.get("/?token=s3cret-token")
            assert first.status_code == 200 and first.history and first.history[0].status_code == 303
            assert client.get("/api/runs").status_code == 200
    finally:
        guarded.close()


# --------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    from test_report import CHROMIUM

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"headless Chromium is needed and {CHROMIUM} is missing: scripts/setup.sh --test installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A browser tab that records every console error and uncaught exception, and blocks every
    request that leaves the studio (no CDN, no font, nothing fetched from outside)."""

    def __init__(self, browser, base: str, shots: Path):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.base, self.shots = base, shots
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", self._only_studio)

    def _only_studio(self, route):
        if route.request.url.startswith(self.base):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def shot(self, name: str) -> None:
        for folder in [self.shots] + ([Path(SHOTS)] if SHOTS else []):
            folder.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(folder / f"studio-{name}.png"), full_page=True)


def test_runs_page_run_page_answers_and_compare_in_a_browser(studio, runs, browser, tmp_path):
    tab = Page(browser, studio.url, tmp_path / "screenshots")
    page = tab.page
    page.goto(studio.url + "/")
    page.wait_for_selector("table#runs tbody tr")
    ids = page.eval_on_selector_all("table#runs tbody tr", "rows => rows.map(r => r.dataset.id)")
    assert set(ids) == {"alpha", "beta"}
    # filter, then sort by steps (both 6: the order holds) and by name descending
    page.fill("#filter", "alpha")  # every column is searched: "alp" would match the template, alpaca
    assert page.eval_on_selector_all("table#runs tbody tr", "rows => rows.map(r => r.dataset.id)") == ["alpha"]
    page.fill("#filter", "")
    page.click("th[data-key=name]")
    page.click("th[data-key=name]")
    assert page.eval_on_selector_all("table#runs tbody tr", "rows => rows.map(r => r.dataset.id)") == ["beta", "alpha"]
    tab.shot("runs")

    page.click("a[href='#/run/alpha']")
    page.wait_for_selector("#section-charts svg")
    assert page.inner_text("#state") == "done"
    assert page.locator("#section-evals h2").inner_text() == "Evaluation"
    # the answers one by one: every validation example, then only the wrong ones
    page.wait_for_selector("#example-list .example")
    n_all = page.locator("#example-list .example").count()
    records = [json.loads(x) for x in (runs / "alpha" / "eval" / "validation.jsonl").read_text().splitlines()]
    assert n_all == len(records)
    page.check("#only-wrong")
    wrong = sum(not r["scores"]["tuned"]["exact_match"] for r in records)
    page.wait_for_function(f"() => document.querySelectorAll('#example-list .example').length === {wrong}")
    if wrong:  # a wrong answer marks the words that differ from the reference
        assert page.locator("#example-list mark").count() > 0
    tab.shot("run")
    # the plan of the run's own config, beside the peak its training measured
    page.click("#plan")
    page.wait_for_selector("#plan-report", timeout=60_000)
    planned = _lorakit("plan", str(runs / "alpha" / "config.yaml"), "--no-calibrate").stdout
    assert page.inner_text("#plan-report").split("\n")[0] == planned.strip().split("\n")[0]
    assert "measured" in page.inner_text("#plan-check")

    page.goto(studio.url + "/")
    page.wait_for_selector("table#runs tbody tr")
    page.check("input[data-id=alpha]")
    page.check("input[data-id=beta]")
    page.click("#compare")
    page.wait_for_selector("#compare-config table")
    diff = page.inner_text("#compare-config")
    assert "lora.r" in diff and "lora.alpha" not in diff.split("lora.r")[0]
    assert page.locator("#compare-charts svg").count() >= 1
    tab.shot("compare")
    assert tab.errors == [] and tab.outside == []


def test_a_training_run_is_watched_live(studio, runs, browser, tiny_model_dir, tmp_path):
    """The run page of a run that is training gains points on its loss curve without a reload, and
    shows 'running' until the run is done."""
    cfg = _config(runs.parent, tiny_model_dir, "live", max_steps=400, eval_steps=100)
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(cfg)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (runs / "live" / "metrics.jsonl").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no log"
            time.sleep(0.2)
        tab = Page(browser, studio.url, tmp_path / "screenshots")
        page = tab.page
        page.goto(studio.url + "/#/run/live")
        page.wait_for_selector("#section-charts svg")
        assert page.inner_text("#state") == "running"

        def points() -> int:  # the train-loss series: one vertex per logged step
            return page.evaluate("""() => {
                const line = document.querySelector('#chart-loss polyline.series');
                return line ? line.getAttribute('points').trim().split(/\\s+/).length : 0; }""")

        first, opened = points(), time.monotonic()
        page.wait_for_function("() => Number(document.body.dataset.updates || 0) >= 2", timeout=60_000)
        assert points() > first
        tab.shot("live")
        assert proc.wait(timeout=300) == 0
        page.wait_for_function("() => document.getElementById('state').textContent === 'done'", timeout=30_000)
        # every step is logged (some 70 a second), yet the page is redrawn at most every REDRAW_S while
        # the run trains, plus at once for each change of state or stage (running -> done: a few)
        from lorakit.studio.app import REDRAW_S

        updates = page.evaluate("() => Number(document.body.dataset.updates)")
        assert updates <= (time.monotonic() - opened) / REDRAW_S + 4, updates
        assert tab.errors == [] and tab.outside == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_new_run_from_the_form_then_stop_resume_and_stages(runs, browser, tiny_model_dir, tmp_path):
    """The form is the schema: a bad value comes back beside its field; a good config shows what
    `lorakit data` and `lorakit plan` say; Start trains it as a child of the studio; Stop leaves a
    checkpoint (interrupted), Resume finishes it; Eval from the page adds its answers."""
    from conftest import ALPACA_ROWS, write_jsonl

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = write_jsonl(data_dir / "rows.jsonl", ALPACA_ROWS)
    studio = Studio(runs, "--data", str(data_dir), "--data", str(tiny_model_dir))
    tab = Page(browser, studio.url, tmp_path / "screenshots")
    page = tab.page
    try:
        page.goto(studio.url + "/#/new")
        page.wait_for_selector("#field-train\\.lr")
        page.fill("#field-name", "formed")
        page.fill("#field-model\\.name", str(tiny_model_dir))
        page.fill("#field-data\\.train", str(data))
        for key, value in (("data.template", "alpaca"), ("data.max_length", "96"), ("data.val_fraction", "0.25"), ("lora.r", "4"), ("lora.alpha", "8"),
                           ("train.max_steps", "1500"), ("train.batch_size", "2"), ("train.grad_accum", "1"),
                           ("train.logging_steps", "1"), ("train.eval_steps", "100"), ("train.save_steps", "0"),
                           ("train.lr", "-1"), ("train.report_to", "[]")):
            page.fill(f"#field-{key.replace('.', chr(92) + '.')}", value)
        page.select_option("#field-train\\.mixed_precision", "no")
        page.click("#check")
        page.wait_for_function("() => document.getElementById('problem-train.lr').textContent.length > 0")
        assert "train.lr: -1" in page.inner_text("#problem-train\\.lr") and "must be positive" in page.inner_text("#problem-train\\.lr")
        tab.shot("form-error")
        page.fill("#field-train\\.lr", "5.0e-3")
        page.click("#check")
        page.wait_for_selector("#plan-report", timeout=120_000)
        assert page.inner_text("#problem-train\\.lr") == ""
        assert "train" in page.inner_text("#data-report") and "peak" in page.inner_text("#plan-report").lower()
        tab.shot("form")
        page.click("#start")
        page.wait_for_url("**/#/run/formed")
        page.wait_for_function("() => document.getElementById('state') && document.getElementById('state').textContent === 'running'",
                               timeout=120_000)
        page.click("#stop")  # the tiny model trains some 70 steps a second: 1,500 steps leave time to stop it
        page.wait_for_function("() => document.getElementById('state').textContent === 'interrupted'", timeout=120_000)
        checkpoints = list((runs / "formed" / "checkpoints").glob("checkpoint-*"))
        assert len(checkpoints) == 1 and not (runs / "formed" / "adapter").exists()
        page.click("#resume")
        page.wait_for_function("() => document.getElementById('state').textContent === 'done'", timeout=240_000)
        records = [json.loads(line) for line in (runs / "formed" / "metrics.jsonl").read_text().splitlines()]
        assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, 1501))  # each step once
        page.select_option("#eval-split", "validation")
        page.click("#eval")
        page.wait_for_selector("#example-list .example", timeout=120_000)
        assert page.locator("#jobs .job[data-kind=eval]").count() == 1
        tab.shot("actions")
        assert tab.errors == [] and tab.outside == []
    finally:
        studio.close()


def test_playground_streams_the_greedy_answer_generate_gives(browser, tiny_model_dir, tiny_tokenizer, tmp_path):
    """Base and adapter side by side in one conversation, streamed, on serve's engine; the adapter's
    greedy answer is the one `lorakit generate --greedy` prints. (The adapter has seeded random
    weights: the tiny model, trained a few steps, answers greedily with its stop token at once, and
    an empty answer equal to an empty answer would prove nothing.)"""
    from conftest import make_adapter

    runs = tmp_path / "runs"
    make_adapter(tiny_model_dir, tiny_tokenizer, runs / "alpha", 5)
    question = "Explain the return policy to a customer."
    expected = _lorakit("generate", str(runs / "alpha"), "-i", question, "--greedy", "--max-new-tokens", "16",
                        "--no-stream").stdout.strip()
    studio = Studio(runs)
    tab = Page(browser, studio.url, tmp_path / "screenshots")
    page = tab.page
    page.goto(studio.url + "/#/play")
    page.wait_for_selector("#play-runs input[value=alpha]")
    page.check("#play-runs input[value=alpha]")
    page.click("#play-load")
    page.wait_for_selector("#play-models input[data-model=alpha]", timeout=120_000)
    assert page.locator("#play-models input").count() == 2  # the base and the adapter
    page.fill("#play-max-tokens", "16")
    page.fill("#play-input", question)
    page.click("#play-send")
    page.wait_for_function("() => Number(document.getElementById('play-talk').dataset.finished || 0) === 2", timeout=120_000)
    answer = page.inner_text(".answer[data-model=alpha] pre").strip()
    assert answer == expected and answer
    assert page.locator(".answer[data-model]:not([data-model=alpha])").count() == 1  # the base answered beside it
    tab.shot("playground")
    studio.close()
    assert tab.errors == [] and tab.outside == []
