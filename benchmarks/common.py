"""What both sides of the benchmark measure the same way: tokens, time, memory, FLOPs, eval loss.

Tokens are counted from the batches the Trainer actually feeds, in `training_step`, by the same
code on both sides (`Meter.observe`):

    trained = Σ (labels[:, 1:] != -100)     positions in the loss (labels shift inside the model,
                                            so a row's first label is never a target)
    real    = Σ attention_mask              non-pad tokens; a padding-free (packed) batch has no
                                            mask and no padding, so every position is real
    fed     = Σ input_ids.numel()           positions computed, padding included

Time is the training loop only: from the Trainer's `on_train_begin` (model loaded, data tokenized,
optimizer built) to `on_train_end`. Neither side evaluates inside the loop in this benchmark.

Useful FLOPs (explicit, not 6·N: the base weights are frozen, so the backward needs activation
gradients but no weight gradients for them):

    F = 4·N_frozen·real + 6·N_lora·real + 4·V·H·trained

    N_frozen  frozen linear weights of the decoder (q/k/v/o/gate/up/down): 2 FLOPs per weight per
              token forward, 2 backward for the activation gradient
    N_lora    LoRA A and B: 2 forward, 2 activation gradient, 2 weight gradient
    V·H       the LM head, needed only where a label is predicted: 2 forward + 2 backward

Attention scores (4·layers·hidden·len per token forward, under 10% of F at these lengths),
norms, activations and the embedding lookup are left out. Recomputation by gradient
checkpointing, padding, and logits at unlabelled positions are work a side chooses to do, not
useful work, so they show as a lower achieved FLOP/s against the matmul rate of this machine.
"""

from __future__ import annotations

import json
import math
import resource
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

# --------------------------------------------------------------------------- training meter


class Meter(TrainerCallback):
    """Times the training loop, counts tokens of the batches fed, records per-step loss and RSS."""

    def __init__(self, rss_interval_s: float = 0.05):
        self.trained = self.real = self.fed = self.micro_batches = self.rows = 0
        self.step_losses: list[float] = []
        self.step_tokens: list[int] = []  # trained tokens per optimizer step: which examples a step held
        self._step_loss = 0.0
        self._step_trained = 0
        self.t0: float | None = None
        self.t1: float | None = None
        self.params: dict[str, int] = {}
        self.checkpointing: bool | None = None
        self.rss_at_start = 0
        self.rss_peak_in_loop = 0
        self._interval = rss_interval_s
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- called from the trainer's training_step (MeteredMixin)

    def observe(self, inputs: dict[str, Any]) -> None:
        labels, ids = inputs["labels"], inputs["input_ids"]
        mask = inputs.get("attention_mask")
        trained = int((labels[:, 1:] != -100).sum())
        self.trained += trained
        self._step_trained += trained
        self.real += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()
        self.fed += ids.numel()
        self.micro_batches += 1
        positions = inputs.get("position_ids")
        # Examples in the batch: rows, or (padding-free) restarts of the position ids.
        self.rows += int((positions == 0).sum()) if mask is None and positions is not None else ids.shape[0]

    def add_loss(self, loss: torch.Tensor) -> None:
        # Both trainers return each micro-batch's loss already divided by the whole step's trained-token
        # count (num_items_in_batch), so the sum over a step's micro-batches is that step's mean loss.
        self._step_loss += float(loss)

    # -- TrainerCallback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.params = param_counts(model)
            self.checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
        self.rss_at_start = rss_bytes()
        self.rss_peak_in_loop = self.rss_at_start
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()
        self.t0 = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_loss = 0.0
        self._step_trained = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.step_losses.append(self._step_loss)
        self.step_tokens.append(self._step_trained)

    def on_train_end(self, args, state, control, **kwargs):
        self.t1 = time.perf_counter()
        self._stop.set()
        if self._poller is not None:
            self._poller.join()

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self.rss_peak_in_loop = max(self.rss_peak_in_loop, rss_bytes())

    def result(self) -> dict[str, Any]:
        seconds = (self.t1 or time.perf_counter()) - (self.t0 or time.perf_counter())
        return {
            "steps": len(self.step_losses),
            "train_seconds": seconds,
            "trained_tokens": self.trained,
            "real_tokens": self.real,
            "fed_tokens": self.fed,
            "examples": self.rows,
            "micro_batches": self.micro_batches,
            "trained_tokens_per_s": self.trained / seconds if seconds > 0 else 0.0,
            "real_tokens_per_s": self.real / seconds if seconds > 0 else 0.0,
            "final_step_loss": self.step_losses[-1] if self.step_losses else None,
            "step_losses": self.step_losses,
            "step_tokens": self.step_tokens,
            "params": self.params,
            "gradient_checkpointing": self.checkpointing,
            "rss_at_train_begin_bytes": self.rss_at_start,
            "rss_peak_in_loop_bytes": self.rss_peak_in_loop,
        }


class MeteredMixin:
    """Mix in before a Trainer class: every micro-batch is counted by `self.meter` as it is fed."""

    meter: Meter

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.meter.observe(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.meter.add_loss(loss)
        return loss


# --------------------------------------------------------------------------- memory, FLOPs


def rss_bytes() -> int:
    """Resident set size of this process now."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process over its whole life (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """{'frozen_linear', 'lora', 'head'}: the parameter groups of the FLOP formula (module doc)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    frozen = lora = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        n = sum(p.numel() for p in module.parameters(recurse=False))
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            lora += n
        else:
            frozen += n
    return {"frozen_linear": frozen, "lora": lora, "head": head.weight.numel() if head is not None else 0}


def useful_flops(params: dict[str, int], real_tokens: int, trained_tokens: int) -> float:
    """F = 4·N_frozen·real + 6·N_lora·real + 4·V·H·trained (see the module docstring)."""
    return (4 * params["frozen_linear"] * real_tokens + 6 * params["lora"] * real_tokens
            + 4 * params["head"] * trained_tokens)


def matmul_rate(n: int = 2048, dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """FLOP/s of an n×n @ n×n torch.matmul here (best of `reps` after a warm-up): the limit to compare with."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# --------------------------------------------------------------------------- held-out loss


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def encode_rows(tokenizer: Any, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of Alpaca rows with lorakit's alpaca template: the guide's text, loss on response + EOS."""
    from lorakit.data.formats import to_example
    from lorakit.data.templates import resolve_template

    template = resolve_template("alpaca", tokenizer)
    return [template.encode(tokenizer, to_example(r, "alpaca", f"row {i + 1}")) for i, r in enumerate(rows)]


@torch.inference_mode()
def eval_loss(model_dir: str | Path, adapter_dir: str | Path | None, rows: list[dict], batch_size: int = 4) -> dict:
    """Token-weighted cross-entropy over response + EOS tokens of `rows`, fp32, base + optional adapter.

    The same code, tokenization and precision for every adapter, so the numbers compare. Rows are
    batched by length (right padding, masked) only to spend less time on padding; the sum of
    token losses does not depend on the batching. The LM head runs only at positions that predict
    a label: for Llama-family models (logits = lm_head(last hidden state), no scaling or capping)
    that equals the full forward's loss and skips a fifth of its work.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))  # LoRA layers go into `model` in place
    model.eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = inner.get_decoder(), inner.get_output_embeddings()
    encoded = sorted(encode_rows(tokenizer, rows), key=lambda e: len(e[0]))
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (i, lab) in enumerate(chunk):
            ids[row, :len(i)] = torch.tensor(i)
            labels[row, :len(lab)] = torch.tensor(lab)
            mask[row, :len(i)] = 1
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]  # (B, T-1, H): t predicts t+1
        target = labels[:, 1:]
        keep = target != -100
        logits = head(hidden[keep]).float()  # (N, V)
        total += float(torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum"))
        count += int(keep.sum())
    return {"loss": total / count, "tokens": count, "rows": len(rows)}


# --------------------------------------------------------------------------- worker output


def emit(result: dict, path: str | Path | None) -> None:
    """Write the worker's result to `path` (if given) and print it as the last stdout line."""
    result = {**result, "peak_rss_bytes": peak_rss_bytes()}
    text = json.dumps(result)
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)


def export_setup(run: str | Path, eval_data: str, work: Path, *, limit: int = 0) -> dict[str, Any]:
    """What the export benchmarks share: the run's adapter, metadata and tokenizer, its merged fp32
    folder and f32 GGUF in `work`, and the task rows of `eval_data` with the merged model's answers
    (lorakit.export.task), each step timed ("seconds")."""
    from lorakit.artifacts import find_adapter_dir, read_meta
    from lorakit.cli import _quiet_libraries
    from lorakit.export import gguf as G
    from lorakit.export import task as T
    from lorakit.config import MergeConfig
    from lorakit.merge import merge
    from lorakit.model.load import load_tokenizer

    _quiet_libraries()
    quiet = lambda s: None  # noqa: E731
    adapter = find_adapter_dir(run)
    meta = read_meta(adapter)
    tok = load_tokenizer(meta.base.model_config())
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    merge(adapter, work / "merged", MergeConfig(dtype="fp32"), log=quiet)
    seconds["merge"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()
    f32 = G.convert_raw(work / "merged", work / "f32.gguf", log=quiet)
    seconds["convert_f32"] = round(time.perf_counter() - t0, 1)
    rows = T.task_set(adapter, tok, eval_data=[eval_data], limit=limit, metric="auto", log=quiet)
    T.answer_reference(rows, work / "merged", log=quiet)
    seconds["transformers_answer"] = rows.reference_seconds
    return {"adapter": adapter, "meta": meta, "tokenizer": tok, "merged": work / "merged", "f32": f32, "rows": rows,
            "seconds": seconds}


def loop_timer():
    """A Trainer callback timing the training loop, on_train_begin to on_train_end, for sides whose
    batches differ in shape (the preference and RL benchmarks count their work from the steps)."""
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    return LoopTimer()


def embedded_model() -> str:
    """The folder of the embedded SmolLM2-135M-Instruct (the benchmarks' default base)."""
    from lorakit.model import embedded

    return str(embedded.embedded_model_dir())


def run_side(script: str, name: str, out: Path, args: list[str], model: str | None = None) -> dict:
    """One side of a two-sided benchmark in a process of its own (so its peak RSS is its own):
    `script --side NAME --out OUT --result OUT/NAME.json [--model M] ARGS`, its output in
    OUT/NAME.log; returns the JSON result it wrote."""
    import subprocess
    import sys

    result = out / f"{name}.json"
    cmd = [sys.executable, script, "--side", name, "--out", str(out), "--result", str(result),
           *(["--model", model] if model else []), *args]
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=Path(script).resolve().parents[1])
    return json.loads(result.read_text())
