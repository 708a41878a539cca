"""Multi-process training, for real: `torchrun --nproc_per_node 2 -m lorakit train` on CPU (gloo)
against one process with the doubled per-device batch (fp32, dropout 0, same seed and data).

What makes the two equal: each process takes the next per-device batch of the same shuffled order
(so the two together see the one process's rows), the loss divides by the trained-token count
over both processes, and DDP all-reduces (averages) the gradients once per step. A process that
trained alone, or a step all-reduced per pass, or a loss normalised per process, would end
elsewhere; the negative control shows how far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ALPACA_ROWS, write_jsonl
from safetensors.torch import load_file

TORCHRUN = Path(sys.executable).with_name("torchrun")
ACCELERATE = Path(sys.executable).with_name("accelerate")
LIMIT_S = 300  # per launch: the tiny model trains in seconds; a hung process group must not hang CI

# The two runs differ by summation order only (two partial gradients added in the all-reduce, other
# pass groupings). How far summation order alone moves this adapter is measured in the test: one
# process, the same rows, cut into passes of 64 or of 512 tokens (the same sum in another order):
# 4.7e-6 here, with parameters of 0.13 after 4 Adam steps at lr 1e-2. The two-process run must stay
# within a few times that floor; a process training alone must land over 100 times further.
FLOOR_FACTOR = 4


def config(tmp: Path, model_dir: Path, data: Path, name: str, batch: int, **train) -> Path:
    t = {"max_steps": 4, "batch_size": batch, "grad_accum": 1, "lr": 1e-2, "logging_steps": 1, "eval_steps": 0,
         "save_steps": 0, "mixed_precision": "no", "seed": 3, "tokens_per_pass": 64, **train}
    path = tmp / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name: {model_dir}, dtype: fp32}}
        data: {{train: {data}, template: alpaca, max_length: 128, val_fraction: 0.1}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        train: {json.dumps(t)}
        output: {{dir: {tmp / 'runs'}, name: {name}}}
        """), encoding="utf-8")
    return path


def launch(args: list, cwd: Path, processes: int = 2, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, *args]
    elif launcher == "accelerate":  # --multi_gpu is accelerate's switch for N local processes, CPU too
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), *args]
    else:
        cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), *args]
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=LIMIT_S)


def ok(proc: subprocess.CompletedProcess) -> str:
    # The process that failed first is often not the one whose traceback ends stderr (the others
    # then fail in a collective): every process's error lines come first, then the tails.
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, "\n".join(errors[-40:]) + "\n---\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dist-data") / "d.jsonl", ALPACA_ROWS * 4)


def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path, tiny_model_dir, data):
    two = config(tmp_path, tiny_model_dir, data, "two", batch=4)
    one = config(tmp_path, tiny_model_dir, data, "one", batch=8)
    reordered = config(tmp_path, tiny_model_dir, data, "reordered", batch=8, tokens_per_pass=512)
    alone = config(tmp_path, tiny_model_dir, data, "alone", batch=4)
    out = ok(launch(["-m", "lorakit", "train", two], tmp_path))
    via_accelerate = config(tmp_path, tiny_model_dir, data, "accelerate", batch=4)
    acc_out = ok(launch(["-m", "lorakit", "train", via_accelerate], tmp_path, launcher="accelerate"))
    for c in (one, reordered, alone):
        ok(launch(["-m", "lorakit", "train", c], tmp_path, processes=1))
    runs = tmp_path / "runs"
    floor = max_diff(adapter(runs / "reordered"), adapter(runs / "one"))
    tol = FLOOR_FACTOR * max(floor, 1e-7)  # 1e-7: a floor of exactly 0 would demand bit-identity

    # each process says it trained as one of two, inside DDP, on gloo (accelerate's MULTI_CPU)
    for r in (0, 1):
        assert f"lorakit: process {r} of 2 trained (DistributedType.MULTI_CPU, model in DistributedDataParallel)" \
            in out, out[-3000:]
    assert out.count("done: ") == 1 and out.count("adapter saved to") == 1
    meta = json.loads((runs / "two" / "adapter" / "lorakit.json").read_text())
    assert meta["metrics"]["processes"] == 2

    # the same adapter and the same loss at every step as one process with the doubled batch
    d = max_diff(adapter(runs / "two"), adapter(runs / "one"))
    assert d <= tol, (d, floor)
    assert losses(runs / "two") == pytest.approx(losses(runs / "one"), rel=1e-5)
    assert len(losses(runs / "two")) == 4
    one_meta = json.loads((runs / "one" / "adapter" / "lorakit.json").read_text())
    assert meta["metrics"]["trained_tokens"] == one_meta["metrics"]["trained_tokens"]  # summed over both

    # `accelerate launch` starts the same two processes: the same passes in the same order
    assert "lorakit: process 1 of 2 trained (DistributedType.MULTI_CPU" in acc_out, acc_out[-3000:]
    assert max_diff(adapter(runs / "accelerate"), adapter(runs / "two")) <= 1e-7

    # negative control: what a process training alone on all the data ends at is far away
    assert max_diff(adapter(runs / "alone"), adapter(runs / "one")) > 100 * tol

    # written once: one run folder per run, no staging or backup left behind
    assert sorted(p.name for p in runs.iterdir()) == ["accelerate", "alone", "one", "reordered", "two"]
    assert not list((runs / "two").glob("*.tmp*")) and not (runs / "two" / "checkpoints" / ".staging").exists()


WORKER = '''
import os, signal, sys
import torch
from lorakit.train import trainer as T

mode, rank = os.environ["LK_FAULT"], int(os.environ["RANK"])
original = T.LorakitTrainer.compute_loss

def compute_loss(self, model, inputs, *args, **kwargs):
    loss = original(self, model, inputs, *args, **kwargs)
    if mode == "nan" and rank == 1 and self.state.global_step == 2:
        return loss * float("nan")  # this process only, in its third step
    if mode == "kill" and rank == 0 and self.state.global_step == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # after checkpoint-2 is published, before checkpoint-4
    return loss

T.LorakitTrainer.compute_loss = compute_loss
if mode == "no_use_cpu":  # accelerate asked without cpu=True, as a CPU-only launch without use_cpu is
    import accelerate

    init = accelerate.PartialState.__init__
    accelerate.PartialState.__init__ = lambda self, cpu=False, **kw: init(self, cpu=False, **kw)
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_nan_on_one_process_stops_both_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, data):
    (tmp_path / "worker.py").write_text(WORKER)
    cfg = config(tmp_path, tiny_model_dir, data, "nan", batch=4, max_steps=6, save_steps=1)
    os.environ["LK_FAULT"] = "nan"
    try:
        proc = launch([tmp_path / "worker.py", "train", cfg], tmp_path)  # bounded: a hang fails by timeout
    finally:
        del os.environ["LK_FAULT"]
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "loss became" in out.lower() or "nan" in out.lower(), out[-3000:]
    assert "checkpoint-2" in out, out[-3000:]
    run = tmp_path / "runs" / "nan"
    assert not (run / "adapter").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-1", "checkpoint-2"]


def test_sigkill_then_resume_ends_at_the_uninterrupted_adapter(tmp_path, tiny_model_dir, data):
    (tmp_path / "worker.py").write_text(WORKER)
    ref = config(tmp_path, tiny_model_dir, data, "ref", batch=4, max_steps=6, save_steps=2)
    cfg = config(tmp_path, tiny_model_dir, data, "cut", batch=4, max_steps=6, save_steps=2)
    ok(launch(["-m", "lorakit", "train", ref], tmp_path))
    os.environ["LK_FAULT"] = "kill"
    try:
        killed = launch([tmp_path / "worker.py", "train", cfg], tmp_path)
    finally:
        del os.environ["LK_FAULT"]
    assert killed.returncode != 0
    run = tmp_path / "runs" / "cut"
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and not (run / "adapter").exists()
    out = ok(launch(["-m", "lorakit", "train", cfg, "--resume"], tmp_path))
    assert "resuming from" in out and "checkpoint-2" in out
    # the same two processes, the same passes, the states restored from checkpoint-2: the same sums
    # in the same order, so the same adapter up to fp32 rounding of the restored optimizer state
    d = max_diff(adapter(run), adapter(tmp_path / "runs" / "ref"))
    assert d <= 1e-7, d
    assert losses(run) == pytest.approx(losses(tmp_path / "runs" / "ref"), rel=1e-5)


def test_the_silent_single_process_trap_is_caught_before_any_work(tmp_path, tiny_model_dir, data):
    """torchrun on a CPU-only machine, accelerate initialised without cpu=True: accelerate 1.16 then
    reports one process (DistributedType.NO) in each of the two, which would each train alone on
    all the data. Both stop with the error before the run folder exists."""
    (tmp_path / "worker.py").write_text(WORKER)
    cfg = config(tmp_path, tiny_model_dir, data, "trap", batch=4)
    os.environ["LK_FAULT"] = "no_use_cpu"
    try:
        proc = launch([tmp_path / "worker.py", "train", cfg], tmp_path)
    finally:
        del os.environ["LK_FAULT"]
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("the launcher started 2 processes (WORLD_SIZE=2) but the Trainer sees 1") == 2, out[-3000:]
    assert "Traceback" not in proc.stdout and not (tmp_path / "runs").exists()


def test_a_launcher_world_the_trainer_does_not_see_is_refused():
    from lorakit.errors import LorakitError
    from lorakit.train.distributed import check_world

    check_world(2, 2, "MULTI_CPU")
    with pytest.raises(LorakitError) as e:
        check_world(2, 1, "NO")
    msg = e.value.render()
    assert "started 2 processes" in msg and "sees 1" in msg and "alone on all the data" in msg


def test_train_distributed_maps_to_the_trainers_arguments_and_refuses_what_lorakit_does_not_run(tmp_path):
    from lorakit import config as config_mod
    from lorakit.errors import ConfigError
    from lorakit.train.distributed import DEEPSPEED_PRESETS, check_strategy, trainer_arguments

    def cfg(*over):
        return config_mod.load(None, ["--data.train=x.jsonl", *over])

    assert trainer_arguments(cfg()) == {}  # ddp: the Trainer's default
    check_strategy(cfg(), "cpu")
    fsdp = cfg("--train.distributed=fsdp", "--train.fast_path=false", "--train.fsdp=shard_grad_op auto_wrap")
    assert trainer_arguments(fsdp) == {"fsdp": "shard_grad_op auto_wrap", "fsdp_config": {"use_orig_params": True}}
    check_strategy(fsdp, "cuda")
    z3 = cfg("--train.distributed=deepspeed", "--train.deepspeed=zero3")
    assert trainer_arguments(z3)["deepspeed"]["zero_optimization"]["stage"] == 3
    own = tmp_path / "ds.json"
    own.write_text("{}")
    assert trainer_arguments(cfg("--train.distributed=deepspeed", f"--train.deepspeed={own}")) == \
        {"deepspeed": str(own)}
    assert DEEPSPEED_PRESETS["zero2"]["train_micro_batch_size_per_gpu"] == "auto"

    def refused(c, device):
        with pytest.raises(ConfigError) as e:
            check_strategy(c, device)
        return e.value.render()

    msg = refused(cfg("--train.distributed=fsdp"), "cpu")
    assert "needs CUDA GPUs" in msg and "train.fast_path" in msg  # both reasons, each naming its key
    assert "bnb_4bit_quant_storage" in refused(cfg("--train.distributed=fsdp", "--train.fast_path=false",
                                                   "--model.quantization=4bit"), "cuda")
    assert "neither 'zero2', 'zero3'" in refused(cfg("--train.distributed=deepspeed", "--train.fast_path=false",
                                                     "--train.deepspeed=nope.json"), "cuda")


def test_fsdp_on_cpu_is_refused_by_every_process_before_the_run_folder(tmp_path, tiny_model_dir, data):
    cfg = config(tmp_path, tiny_model_dir, data, "fsdp", batch=4, distributed="fsdp")
    proc = launch(["-m", "lorakit", "train", cfg], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("train.distributed: fsdp needs CUDA GPUs") == 2, out[-3000:]
    assert not (tmp_path / "runs").exists()


def test_two_epochs_with_a_short_last_step_see_every_example_once_per_epoch(tmp_path, tiny_model_dir, data):
    """58 training rows in steps of 8: each epoch ends with a step of 2, all on process 0; process 1
    runs that step on a masked copy (no loss, no gradient). Over two epochs (reshuffled per epoch)
    the two processes train what one process with the doubled batch trains, token for token."""
    two = config(tmp_path, tiny_model_dir, data, "two", batch=4, max_steps=-1, epochs=2)
    one = config(tmp_path, tiny_model_dir, data, "one", batch=8, max_steps=-1, epochs=2)
    reordered = config(tmp_path, tiny_model_dir, data, "reordered", batch=8, max_steps=-1, epochs=2,
                       tokens_per_pass=512)
    ok(launch(["-m", "lorakit", "train", two], tmp_path))
    for c in (one, reordered):
        ok(launch(["-m", "lorakit", "train", c], tmp_path, processes=1))
    runs = tmp_path / "runs"
    metrics = {n: json.loads((runs / n / "adapter" / "lorakit.json").read_text())["metrics"] for n in ("one", "two")}
    assert metrics["two"]["steps"] == metrics["one"]["steps"] == 16  # ceil(58 / 8) per epoch
    assert metrics["two"]["trained_tokens"] == metrics["one"]["trained_tokens"]  # no example counted twice
    floor = max_diff(adapter(runs / "reordered"), adapter(runs / "one"))
    d = max_diff(adapter(runs / "two"), adapter(runs / "one"))
    assert d <= FLOOR_FACTOR * max(floor, 1e-7), (d, floor)
    assert losses(runs / "two") == pytest.approx(losses(runs / "one"), rel=1e-4)
