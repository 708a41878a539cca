"""report.html: drawn from a really trained tiny run (plus an eval written with the artifacts types),
read back as a person would (headless Chromium: the DOM it built, the requests it made, a
screenshot), and rendered from partial run folders that must never crash it."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lorakit import artifacts
from lorakit.artifacts import EvalRecord, EvalSummary, RunPaths
from lorakit.errors import LorakitError
from lorakit.report import Series, envelope, line_chart, nice_ticks, pick_samples, render_report, write_report

HOSTILE = '<script>alert("x")</script> see https://example.com/x.png <img src="https://example.com/y.png">'


def tiny_config(tmp_path, model_dir, data_file):
    from lorakit import config

    return config.load(None, [
        f"--model.name={model_dir}", f"--data.train={data_file}", "--data.val_fraction=0.25",
        "--data.template=alpaca", "--data.max_length=128",
        "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0",
        "--train.max_steps=6", "--train.batch_size=2", "--train.grad_accum=1", "--train.lr=1e-2",
        "--train.logging_steps=1", "--train.eval_steps=2", "--train.save_steps=0",
        "--train.mixed_precision=no", f"--output.dir={tmp_path / 'runs'}", "--output.name=tiny",
    ])


def add_eval(run_dir: Path) -> None:
    """An eval/ as `lorakit eval --base` writes it: a summary and one record per example; example 2
    is the one where the tuned answer is right and the base's wrong, and carries hostile text."""
    paths = RunPaths(run_dir)
    records = [
        EvalRecord(0, [{"role": "user", "content": "Say hello."}], "Hello world!",
                   {"base": "Hello world!", "tuned": "Hello world!"},
                   {"base": {"exact_match": 1.0, "rouge_l": 1.0}, "tuned": {"exact_match": 1.0, "rouge_l": 1.0}}),
        EvalRecord(1, [{"role": "user", "content": "Classify this message.", "input": "Where is my order?"}],
                   "Category: shipping",
                   {"base": "billing", "tuned": "Category: billing"},
                   {"base": {"exact_match": 0.0, "rouge_l": 0.0}, "tuned": {"exact_match": 0.0, "rouge_l": 0.5}}),
        EvalRecord(2, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": HOSTILE}],
                   "Order number: #555", {"base": HOSTILE, "tuned": "Order number: #555"},
                   {"base": {"exact_match": 0.0, "rouge_l": 0.0}, "tuned": {"exact_match": 1.0, "rouge_l": 1.0}}),
        EvalRecord(3, [{"role": "user", "content": "Return policy?"}], "30 days.",
                   {"base": "no idea", "tuned": "30 days"},
                   {"base": {"exact_match": 0.0, "rouge_l": 0.0}, "tuned": {"exact_match": 1.0, "rouge_l": 1.0}}),
    ]
    artifacts.write_jsonl_atomic(paths.eval_records("test"), [r.to_dict() for r in records])
    EvalSummary(
        data="test", sources=["data/test.jsonl"], count=4, adapter=str(paths.adapter), models=["tuned", "base"],
        loss={"tuned": 1.25, "base": 2.5}, perplexity={"tuned": math.exp(1.25), "base": math.exp(2.5)},
        scores={"tuned": {"exact_match": 0.75, "rouge_l": 0.875, "count": 4},
                "base": {"exact_match": 0.25, "rouge_l": 0.25, "count": 4}},
        generation={"max_new_tokens": 64, "batch_size": 16, "seconds": 2.0, "answers_per_s": 4.0},
        created="2025-01-01T00:00:00+00:00",
    ).write(paths.eval_summary("test"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """(run folder as training left it, a copy with eval/ added and its report rewritten)."""
    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit.pipeline import train

    tmp = tmp_path_factory.mktemp("report")
    cfg = tiny_config(tmp, tiny_model_dir, write_jsonl(tmp / "data.jsonl", ALPACA_ROWS))
    run_dir = train(cfg, log=lambda s: None, progress=False)
    evaluated = tmp / "evaluated"
    shutil.copytree(run_dir, evaluated, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    add_eval(evaluated)
    write_report(evaluated)
    return run_dir, evaluated


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Dom(HTMLParser):
    """Elements of a page as (tag, attrs, text inside) plus every attribute that could fetch something."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[dict] = []
        self.open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": [e["tag"] + "#" + e["attrs"].get("id", "")
                                                                       for e in self.open]}
        self.elements.append(el)
        if tag not in VOID:
            self.open.append(el)

    def handle_startendtag(self, tag, attrs):  # <line ... />: no end tag will come
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.open.pop()

    def handle_endtag(self, tag):
        while self.open:
            if self.open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self.open:
            el["text"] += data

    def find(self, tag=None, inside=None, **attrs):
        return [e for e in self.elements if (tag is None or e["tag"] == tag)
                and (inside is None or any(p.endswith("#" + inside) for p in e["parents"]))
                and all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def by_id(self, ident):
        found = [e for e in self.elements if e["attrs"].get("id") == ident]
        assert found, f"no element with id {ident!r}"
        return found[0]


def train_records(run_dir):
    return [r for r in artifacts.read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


# --------------------------------------------------------------------------- plain rendering


def test_training_writes_the_report(trained):
    run_dir, _ = trained
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    dom = Dom(page)
    for chart in ("chart-loss", "chart-lr", "chart-grad", "chart-speed"):
        assert dom.find("polyline", inside=chart), f"{chart} has no line"
    assert "not evaluated yet" in page  # no eval/ at the end of training: said, not crashed
    assert dom.by_id("summary").get("text") and "finished: adapter saved" in dom.by_id("summary")["text"]
    assert not list(run_dir.glob(".report.html.tmp-*")), "written atomically, nothing left behind"


def test_summary_config_data_and_diagnostics(trained):
    _, run = trained
    dom = Dom(render_report(run))
    meta = artifacts.read_meta(run / "adapter")
    summary = dom.by_id("summary-table")["text"]
    assert "steps6" in summary.replace(" ", "")
    assert f"{meta.metrics['trained_tokens']:,}" in summary
    # The process's peak RSS covers the whole pytest process, so MiB alone or GiB after other tests.
    peak = meta.metrics["peak_memory_bytes"]
    shown = f"{peak / 2**30:.2f} GiB" if peak >= 2**30 else f"{peak / 2**20:.0f} MiB"
    assert "process peak resident memory" in summary and ("MiB" in summary or "GiB" in summary), summary
    assert shown.split()[1] in summary
    diff = dom.by_id("config-diff")["text"]
    # default → value for what the config changed, nested keys dotted; untouched keys absent
    assert "lora.r164" in diff.replace(" ", "") and "train.max_steps-16" in diff.replace(" ", "")
    assert "train.weight_decay" not in diff
    data = json.loads((run / "data.json").read_text())
    counts = dom.by_id("data-counts")["text"]
    assert str(data["counts"]["train"]) in counts and f"{data['tokens']['train']:,}" in counts
    lengths = dom.by_id("data-lengths")["text"]
    assert all(str(data["length_percentiles"][k]) in lengths for k in ("p50", "p90", "p99", "max"))
    diags = dom.by_id("diagnostics-table")["text"]
    raised = artifacts.read_diagnostics(RunPaths(run))
    assert raised and all(d.kind in diags for d in raised)
    assert "lr_high" in diags  # train.lr 1e-2 is above the guide's 1e-3


def test_eval_table_and_samples(trained):
    _, run = trained
    dom = Dom(render_report(run))
    text = dom.by_id("eval-test")["text"]
    # columns base | tuned | Δ; rows per metric
    assert "exactmatch25.0%75.0%+50.0pt" in text.replace(" ", "")
    assert "loss2.5001.250-1.25" in text.replace(" ", "")
    assert "count" not in text  # the example count is the heading's, not a metric row
    samples = dom.by_id("samples-test")
    shown = [e["text"] for e in dom.find("span", inside="samples-test", **{"class": "dim"}) if "example" in e["text"]]
    assert shown == ["example 2", "example 3", "example 1"], "tuned-right/base-wrong first, then differing ones"
    assert "Order number: #555" in samples["text"]
    assert "Where is my order?" in samples["text"], "an Alpaca row's input is part of the prompt shown"
    assert not dom.find("script") and not dom.find("img"), "user text is escaped, never markup"
    assert HOSTILE in samples["text"]


def test_pick_samples_without_base():
    recs = [EvalRecord(i, [], "r", {"tuned": "a"}, {"tuned": {"exact_match": 1.0}}) for i in range(5)]
    assert [r.index for r in pick_samples(recs)] == [0, 1, 2]


def copy_parts(src: Path, dst: Path, *names: str) -> Path:
    dst.mkdir(parents=True)
    for n in names:
        (shutil.copytree if (src / n).is_dir() else shutil.copy)(src / n, dst / n)
    return dst


def test_partial_folders_render_what_exists(trained, tmp_path):
    _, run = trained
    killed = copy_parts(run, tmp_path / "killed", "metrics.jsonl", "config.yaml")
    page = render_report(killed)
    dom = Dom(page)
    assert dom.find("polyline", inside="chart-loss")
    assert dom.by_id("missing") and "adapter/" in dom.by_id("missing")["text"]
    assert "not finished: no adapter (last log at step 6)" in page
    assert "diagnostics.jsonl is missing" in page and "data.json" in dom.by_id("missing")["text"]

    adapter_only = copy_parts(run, tmp_path / "adapter-only", "adapter")
    page = render_report(adapter_only / "adapter")  # the adapter folder names its run
    assert "metrics.jsonl is missing or empty" in page and "finished: adapter saved" in page
    assert "from lorakit.json" in page  # data counts fall back to the adapter's metadata

    broken = copy_parts(run, tmp_path / "broken", "metrics.jsonl", "eval")
    (broken / "eval" / "test.summary.json").write_text("{not json")
    (broken / "data.json").write_text("[1, 2]")
    (broken / "config.yaml").write_text("lora: {r: -3, nope: 1}\n")
    page = render_report(broken)
    missing = Dom(page).by_id("missing")["text"]
    assert "test.summary.json" in missing and "data.json" in missing and "config.yaml" in missing

    odd = copy_parts(run, tmp_path / "odd", "metrics.jsonl", "eval")
    summary = json.loads((odd / "eval" / "test.summary.json").read_text())
    (odd / "eval" / "test.summary.json").write_text(json.dumps({**summary, "scores": [1, 2]}))
    dom = Dom(render_report(odd))  # valid JSON, wrong shape: that section says so, the rest is drawn
    failed = dom.find("section", **{"class": "failed"})
    assert len(failed) == 1 and failed[0]["text"].startswith("Evaluation") and "could not be drawn" in failed[0]["text"]
    assert dom.find("polyline", inside="chart-loss")


def test_nan_run_is_reported_not_crashed(trained, tmp_path):
    _, run = trained
    stopped = copy_parts(run, tmp_path / "nan", "config.yaml")
    recs = train_records(run)[:3]
    recs.append({**recs[-1], "step": 4, "loss": float("nan"), "grad_norm": float("inf")})
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 5, "lo')
    artifacts.append_jsonl(stopped / "diagnostics.jsonl", {"kind": "nonfinite", "message": "loss is NaN at step 4\n"
                                                           "fix: lower train.lr", "step": 4, "time": ""})
    write_report(stopped)
    page = (stopped / "report.html").read_text()
    dom = Dom(page)
    assert "stopped at step 4: loss is NaN at step 4" in page
    assert dom.find("text", inside="chart-loss", **{"class": "nonfinite"}), "the NaN is marked on the loss chart"
    assert "not finite at step 4" in dom.by_id("chart-loss")["text"]


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="neither adapter/ nor metrics.jsonl") as e:
        render_report(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(LorakitError, match="no such folder"):
        render_report(tmp_path / "absent")


def test_cli_report(trained, tmp_path, capsys):
    from lorakit.cli import main

    _, run = trained
    out = tmp_path / "out" / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and str(out) in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither adapter/ nor metrics.jsonl" in capsys.readouterr().err


def test_report_failure_never_costs_the_adapter(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit import report
    from lorakit.pipeline import train

    def boom(run):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(report, "write_report", boom)
    cfg = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS))
    cfg.train.max_steps, cfg.train.eval_steps = 1, 0
    logs: list[str] = []
    run_dir = train(cfg, log=logs.append, progress=False)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert any("report.html not written (RuntimeError: renderer broke)" in m for m in logs)


def test_line_chart_edge_cases():
    empty = line_chart("c", "T", [Series("a", [])], "y")
    assert "not recorded" in empty and "<svg" not in empty.split("</figcaption>")[1]
    one = Dom(line_chart("c", "T", [Series("a", [(3, 1.5)])], "y"))
    assert len(one.find("circle", **{"class": "point"})) == 1 and not one.find("polyline")
    flat = Dom(line_chart("c", "T", [Series("a", [(1, 2.0), (2, 2.0), (3, 2.0)])], "y"))
    assert len(flat.find("polyline")) == 1  # a constant series still gets a y range
    gap = Dom(line_chart("c", "T", [Series("a", [(1, 1.0), (2, 2.0), (3, None), (4, float("nan")), (5, 1.0),
                                                  (6, 0.5)])], "y"))
    assert len(gap.find("polyline")) == 2, "a missing value breaks the line instead of joining across it"
    assert len(gap.find("text", **{"class": "nonfinite"})) == 2
    wide = line_chart("c", "T", [Series("g", [(1, 1e-3), (2, 5.0), (3, 40.0)])], "norm")
    assert "log scale" in wide  # four decades: linear would flatten the small norms to the axis
    assert "&lt;b&gt;" in line_chart("c", "<b>", [Series("<b>", [(1, 1.0)])], "<b>")


def test_long_runs_keep_their_extremes_at_screen_resolution():
    pts = [(62 + i * 474 / 20000, (i * 7919) % 101) for i in range(20001)]  # 20k steps over 474 px
    kept = envelope(pts)
    assert len(kept) <= 2 * 475 and kept[0] == pts[0]  # two per pixel column at most
    columns = {}
    for x, y in pts:
        columns.setdefault(round(x), []).append(y)
    drawn = {}
    for x, y in kept:
        drawn.setdefault(round(x), []).append(y)
    assert all(min(drawn[c]) == min(v) and max(drawn[c]) == max(v) for c, v in columns.items())
    assert envelope(pts[:50]) == pts[:50]  # short runs are drawn point for point


def test_nice_ticks_cover_the_range():
    for lo, hi in [(0.0, 1.0), (0.37, 0.41), (1e-5, 2e-4), (1.0, 6.0), (3.0, 3.0), (-2.0, 7.5)]:
        t = nice_ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 12, (lo, hi, t)
    assert nice_ticks(0, 6, 6, integer=True) == [0, 1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars"]


def chromium(page: Path, tmp: Path, *extra: str) -> tuple[str, list[str]]:
    """(stdout, URLs the PAGE asked the network for). Chromium logs every request it makes to a
    net log; the page's own carry the file:// network isolation key, the browser's housekeeping
    (time sync, update checks) do not. --host-resolver-rules makes sure nothing leaves the machine."""
    if not Path(CHROMIUM).is_file():
        pytest.fail("headless Chromium is needed to check report.html as a reader sees it, and "
                    f"{CHROMIUM} is missing: install it with `apt-get update && apt-get install -y chromium` "
                    "(scripts/setup.sh --test does this on Debian/Ubuntu)")
    tmp.mkdir(parents=True, exist_ok=True)
    netlog = tmp / "net.json"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--log-net-log={netlog}",
           "--host-resolver-rules=MAP * ~NOTFOUND", *extra, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp)})
    assert done.returncode == 0, done.stderr[-2000:]
    log = json.loads(netlog.read_text())
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    requested = [e["params"]["url"] for e in log["events"] if names.get(e["type"]) == "URL_REQUEST_START_JOB"
                 and "file://" in e["params"].get("network_isolation_key", "")]
    return done.stdout, requested


def test_network_check_catches_a_page_that_fetches(tmp_path):
    """The control for the check below: a page with a CDN stylesheet and a remote image is caught."""
    page = tmp_path / "fetching.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.com/x.css">'
                    '</head><body><img src="http://img.example.com/y.png"></body></html>')
    _, requested = chromium(page, tmp_path / "c", "--dump-dom")
    assert sorted(requested) == ["http://img.example.com/y.png", "https://cdn.example.com/x.css"]


def png_size_and_colors(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct colours in a sample of rows) of an 8-bit RGB(A) PNG, without Pillow."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    idat, pos = b"", 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    bpp = {2: 3, 6: 4}[color]
    stride = width * bpp + 1
    # unfiltered bytes are enough to count colours roughly: a blank page is one colour whatever the filter
    colors = {raw[r * stride + 1 + i: r * stride + 1 + i + bpp] for r in range(0, height, 50) for i in
              range(0, width * bpp, bpp * 7)}
    return width, height, len(colors)


def test_report_in_chromium(trained, tmp_path):
    _, run = trained
    page = RunPaths(run).report
    dumped, requested = chromium(page, tmp_path / "dom", "--dump-dom")
    assert requested == [], f"report.html fetched {requested}"
    dom = Dom(dumped)
    assert dom.by_id("summary")
    # Nothing in the page can fetch: no script, stylesheet link, image or external reference at all.
    assert not dom.find("script") and not dom.find("link") and not dom.find("img")
    refs = [(e["tag"], k, v) for e in dom.elements for k, v in e["attrs"].items()
            if k in ("src", "href", "xlink:href")]
    assert refs == []
    # One line per series: train loss (and eval loss as line + dots), lr, grad norm, both tokens/s.
    expected = {"chart-loss": ["train loss", "eval loss"], "chart-lr": ["learning rate"],
                "chart-grad": ["gradient norm"], "chart-speed": ["trained tokens/s", "real tokens/s"]}
    for chart, series in expected.items():
        assert dom.find("svg", inside=chart), chart
        for name in series:
            assert dom.find("polyline", inside=chart, data_series=name), (chart, name)
        ticks = [e["text"] for e in dom.find("text", inside=chart, **{"class": "tick"})]
        assert "6" in ticks, f"{chart}: the x axis reaches the last step (ticks {ticks})"
    evals = [r for r in artifacts.read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert len(dom.find("circle", inside="chart-loss", data_series="eval loss")) == len(evals) == 4  # steps 0,2,4,6
    # Tables a reader looks for, with the numbers from the run's files.
    assert "exactmatch25.0%75.0%+50.0pt" in dom.by_id("eval-test")["text"].replace(" ", "")
    assert "lr_high" in dom.by_id("diagnostics-table")["text"]
    assert "lora.r" in dom.by_id("config-diff")["text"]
    assert HOSTILE in dom.by_id("samples-test")["text"]

    shot = tmp_path / "report.png"
    chromium(page, tmp_path / "shot", f"--screenshot={shot}", "--window-size=1200,3000")
    width, height, colors = png_size_and_colors(shot)
    assert (width, height) == (1200, 3000) and colors > 5, "a rendered page, not a blank one"
    if os.environ.get("LORAKIT_REPORT_SCREENSHOT"):  # for a person to look at
        shutil.copy(shot, os.environ["LORAKIT_REPORT_SCREENSHOT"])


def test_run_stopped_on_nan_still_gets_its_report(tiny_model_dir, tmp_path):
    """A real divergence (lr 1e4, no clipping): training raises, no adapter, and report.html says why."""
    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit.pipeline import train

    cfg = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS))
    cfg.train.lr, cfg.train.max_grad_norm, cfg.train.max_steps, cfg.train.eval_steps = 1e4, 0.0, 40, 0
    with pytest.raises(LorakitError, match=r"loss became (nan|inf)"):
        train(cfg, log=lambda s: None, progress=False)
    page = (cfg.run_dir / "report.html").read_text()
    dom = Dom(page)
    assert not (cfg.run_dir / "adapter").exists()
    assert "stopped at step" in dom.by_id("summary")["text"] and "loss became" in dom.by_id("summary")["text"]
    assert "nonfinite" in dom.by_id("diagnostics-table")["text"]
    good = train_records(cfg.run_dir)
    assert good and all(math.isfinite(r["loss"]) for r in good)
    drawn = dom.find("polyline", inside="chart-loss", data_series="train loss") or \
        dom.find("circle", inside="chart-loss", data_series="train loss")
    assert drawn, "the good steps before it are drawn"
