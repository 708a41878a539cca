"""Merge an adapter into its base and prove the merged model answers as base + adapter did.

    W = W₀ + (α/r)·B·A          (α/√r with rsLoRA; DoRA rescales each column to its magnitude)

The base is reloaded from disk in fp32 whatever the adapter was trained on: never merged into
4-bit or 8-bit weights (rounding W₀ + BA back to NF4 would throw most of the update away) and
never taken from a trained model object (DESIGN.md). PEFT merges (`safe_merge`, which also
refuses a NaN result); the merged model is cast to the chosen dtype and saved as a plain
transformers folder: safetensors weights, the tokenizer with the trained template as its chat
template, a generation config whose EOS list holds the template's stop tokens, and the adapter's
lorakit.json (template and base, for the GGUF export).

Then the parity check, on the merged folder loaded back from disk (what a user will load):
`PROMPTS`, rendered with the adapter's template, are each run through base + adapter (fp32,
unmerged; the reference) and through the merged model; the logits are compared at every prompt
position and at every position of the reference's greedy continuation (teacher-forced), and each
model's own greedy continuation is compared token by token. The merged model runs in fp32
arithmetic on its stored weights, so the check measures what the merge and the storage dtype
did to the model, not the arithmetic of whatever engine later runs it. A difference above
`tolerance(dtype)` fails the merge and nothing is written. Greedy continuations in bf16/fp16 may
legitimately differ where two tokens are nearly tied, so a greedy mismatch is reported, never a
failure; the logit tolerance is the test.

A QLoRA adapter learned its update against the NF4-rounded base, so merging it into the fp32
base gives a model that is neither: the report adds, separately, its distance from the 4-bit
base + adapter it was trained with. That number is informational (nothing to fail on: it is
the price of leaving 4-bit), and it is usually far larger than the merge tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit.artifacts import (PARITY_FILE, AdapterMeta, RunPaths, atomic_dir, atomic_write_json, check_same_base,
                               find_adapter_dir, is_run_adapter, now_iso, read_meta, save_tokenizer, write_meta)
from lorakit.config import MergeConfig
from lorakit.errors import LorakitError
from lorakit.metrics import text_columns

DTYPES = typing.get_args(typing.get_type_hints(MergeConfig)["dtype"])  # the schema's choices
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
"""u = 2^-p for a p-bit significand: round-to-nearest changes a weight by at most u·|w|."""
SAFETY = 3.0
"""Margin of `tolerance` over the measured worst case (see `tolerance`)."""
GREEDY_TOKENS = 16

PROMPTS: list[list[dict]] = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "Explain the return policy to a customer.",
      "input": "Can I return an item after 45 days?"}],
    [{"role": "system", "content": "You are a helpful support agent."},
     {"role": "user", "content": "Where is my order #12345? It was due five days ago."}],
    [{"role": "user", "content": "Write one sentence about the weather, then list three colours."}],
]
"""The fixed prompt set of the parity check: short, so the check costs seconds, and varied
(an input block, a system message) so that most of the template's text is exercised."""


@dataclass(frozen=True)
class Parity:
    """The merged model against one reference, over `PROMPTS`."""

    reference: str  # what it was compared with
    max_abs_diff: float  # max |Δlogit| over every compared position and vocabulary entry
    mean_abs_diff: float
    greedy_identical: bool
    first_difference: tuple[int, int] | None = None  # (prompt, token) of the first differing greedy token


@dataclass(frozen=True)
class MergeReport:
    """merge_parity.json (in the merged folder, and the run's merge.json)."""

    adapter: str
    out: str
    dtype: str
    tolerance: float  # `tolerance(dtype, logit_scale, layers, width)` of the base
    logit_scale: float  # max |logit| of the reference
    parity: Parity  # against base + adapter in fp32: the check
    adapter_effect: float  # max |Δlogit| of base + adapter against the base alone
    quantized: Parity | None  # QLoRA: against the 4-bit (or 8-bit) base + adapter it was trained with
    passed: bool
    seconds: float
    prompts: int
    positions: int  # logit rows compared
    base_matches: bool  # the base on disk has the hash recorded at training
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tolerance(dtype: str, logit_scale: float, *, layers: int, width: int) -> float:
    """The largest max |Δlogit| a correct merge stored in `dtype` can show:

        tol = SAFETY · (u_dtype + u_fp32·√d) · √(L+1) · S

    Storing a merged weight rounds it by at most u·|w| (u = 2^-p for a p-bit significand: 2^-24
    fp32, 2^-11 fp16, 2^-8 bf16). A linear layer's output then moves by about u relative to its
    size; each of the L blocks adds such a perturbation to the residual stream with signs
    independent from block to block, so the relative error of the last hidden state grows like
    √(L+1) (+1: the embedding and LM head), and a logit moves by about u·√(L+1)·S, S the largest
    |logit| of the reference. The second term is the arithmetic: merged and unmerged layers sum
    in a different order, and an fp32 dot product of d terms (d the widest of hidden and
    intermediate size) rounds differently by about u_fp32·√d; it is what an fp32 merge shows.

    Measured, the observed max |Δlogit| divided by (u_dtype + u_fp32·√d)·√(L+1)·S is at most
    0.34 / 0.56 / 0.61 (fp32 / bf16 / fp16) on the tiny random Llama (L = 2, d = 128; plain,
    rsLoRA, DoRA and modules_to_save adapters, 3 seeds) and 0.24 / 0.52 / 0.46 on SmolLM2-135M
    (L = 30, d = 1536, r = 16 on every linear layer), so SAFETY = 3 leaves a margin of at least 4.9.
    It still fails wrong merges: on SmolLM2 in bf16 a doubled α exceeds it 1.8×, a dropped adapter
    3.5×; an fp32 merge done in bf16 arithmetic 280× (tests/test_merge.py repeats these on the tiny
    model). The model of independent, small perturbations assumes an update small next to the
    base weights, as trained ones are; an update that dwarfs them (random B·A fifty times the
    weights) makes the network chaotic enough that rounding alone exceeds it, and fails."""
    u = UNIT_ROUNDOFF[dtype] + UNIT_ROUNDOFF["fp32"] * math.sqrt(width)
    return SAFETY * u * math.sqrt(layers + 1) * logit_scale


# --------------------------------------------------------------------------- the merge


def merge(path: str | Path, out: str | Path, settings: MergeConfig | None = None, *,
          log: Callable[[str], None] = print) -> MergeReport:
    """Merge the adapter of `path` (a run or adapter folder) into its base, write `out` (in `settings`'
    dtype), check parity. The report is printed (`log`), stored in `out`/merge_parity.json and, for an
    adapter inside a run folder, in the run's merge.json; a failed check leaves `out` as it was."""
    s = settings or MergeConfig()
    dtype = s.dtype
    if dtype not in DTYPES:
        raise LorakitError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", hint="use --dtype fp32, bf16 or fp16")
    start = time.perf_counter()
    adapter_dir = find_adapter_dir(path)
    meta = read_meta(adapter_dir)
    out = Path(out)
    _check_out(out, adapter_dir, s.overwrite)
    check_finite(adapter_dir)
    template = meta.template

    base, tokenizer, base_matches = _load_base(meta, "none", log)
    stop_ids, pad_id = template.stop_token_ids(tokenizer), tokenizer.pad_token_id
    prompts = prompt_ids(template, tokenizer)
    tol_of = functools.partial(tolerance, dtype, layers=_depth(base.config), width=_width(base.config))
    model = _with_adapter(base, adapter_dir)
    ref = _Outputs.of(model, prompts, stop_ids)
    with model.disable_adapter():
        adapter_effect = ref.max_abs_diff(_Outputs.of(model, prompts, stop_ids, ref.sequences, greedy=False))
    merged = _merged(model).to(_torch_dtype(dtype))
    del model, base
    merged.generation_config.eos_token_id = stop_ids  # generate() stops at the end of a turn, as lorakit's does
    merged.generation_config.pad_token_id = pad_id

    qref = None
    if meta.base.quantization != "none":  # the model training actually ran: quantized base + adapter
        qbase, _, _ = _load_base(meta, meta.base.quantization, log)
        qref = _Outputs.of(_with_adapter(qbase, adapter_dir), prompts, stop_ids, ref.sequences)
        del qbase

    paths = RunPaths.of(adapter_dir) if is_run_adapter(adapter_dir) else None
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        del merged
        save_tokenizer(tokenizer, tmp, template)
        write_meta(tmp, meta)
        got = _Outputs.of(_load_merged(tmp, dtype), prompts, stop_ids, ref.sequences)
        parity = ref.compare(got, "base + adapter (fp32)")
        quantized = qref.compare(got, f"{meta.base.quantization} base + adapter (as trained)") if qref else None
        tol = tol_of(ref.logit_scale)
        report = MergeReport(str(adapter_dir), str(out), dtype, tol, ref.logit_scale, parity, adapter_effect,
                             quantized, parity.max_abs_diff <= tol, round(time.perf_counter() - start, 2),
                             len(prompts), ref.positions, base_matches, now_iso())
        log(format_report(report))
        if paths is not None:
            atomic_write_json(paths.merge, report.to_dict())
        if not report.passed:
            raise LorakitError(
                f"the merged model differs from base + adapter by up to {parity.max_abs_diff:.3g} in the logits, "
                f"more than the {dtype} tolerance {tol:.3g}; {out} was left as it was",
                where=str(adapter_dir), hint=_failure_hint(dtype))
        atomic_write_json(tmp / PARITY_FILE, report.to_dict())
    return report


def _failure_hint(dtype: str) -> str:
    if dtype != "fp32":
        return (f"try --dtype fp32: if that passes, rounding to {dtype} changes this model more than a typical one "
                "(an update much larger than the base weights does that), so keep it in fp32 or use the adapter "
                "unmerged; if fp32 fails too, it is a lorakit bug: report it with merge.json")
    return ("a correct fp32 merge differs only by rounding, so this is a lorakit or PEFT bug: report it with "
            "merge.json; meanwhile use the adapter unmerged (lorakit generate)")


def _merged(model):
    """PEFT's merge with its NaN check; the one step a test replaces to prove a wrong merge fails."""
    return model.merge_and_unload(safe_merge=True)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _depth(config) -> int:
    """L of `tolerance`: the number of blocks."""
    return int(getattr(_text_config(config), "num_hidden_layers", 1) or 1)


def _width(config) -> int:
    """d of `tolerance`: the longest dot product, the wider of hidden and intermediate size."""
    c = _text_config(config)
    return max(int(getattr(c, k, 0) or 0) for k in ("hidden_size", "intermediate_size")) or 1


def _with_adapter(base, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


def _torch_dtype(dtype: str) -> torch.dtype:
    from lorakit.model.load import TORCH_DTYPES

    return TORCH_DTYPES[dtype]


def _check_out(out: Path, adapter_dir: Path, overwrite: bool) -> None:
    o, a = out.resolve(), adapter_dir.resolve()
    if o == a or a in o.parents or o in a.parents:
        raise LorakitError(f"{out} overlaps the adapter folder {adapter_dir}", where="--out",
                           hint="write the merged model to a folder of its own, e.g. merged/<run name>")
    if out.exists() and not out.is_dir():
        raise LorakitError(f"{out} is a file", where="--out", hint="choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LorakitError(f"{out} exists and is not empty", where="--out",
                           hint="choose another folder, or pass --overwrite to replace it")


def check_finite(adapter_dir: Path) -> None:
    """Refuse an adapter with a NaN or infinite weight (a diverged run), naming the file and tensor."""
    from safetensors.torch import load_file

    files = sorted(Path(adapter_dir).glob("*.safetensors"))
    if not files:
        raise LorakitError(f"no adapter weights (*.safetensors) in {adapter_dir}",
                           hint="re-save the adapter with `lorakit train`")
    for f in files:
        for name, t in load_file(f).items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise LorakitError(
                    f"tensor {name} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}: training "
                    "diverged before this adapter was saved, and merging it would break every layer it touches",
                    where=str(f), hint="retrain with a lower train.lr, or resume from an earlier checkpoint: "
                    "`lorakit train CONFIG --resume` continues from the newest one in runs/<name>/checkpoints/, so "
                    "move the checkpoints saved after the loss went NaN out of the way first")


def _load_base(meta: AdapterMeta, quantization: str, log: Callable[[str], None]):
    """The base from disk: fp32 for the merge, or quantized as trained (with its training dtype)."""
    from lorakit.model.load import load_model, load_tokenizer

    trained = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(meta.base.dtype, "fp32")
    mcfg = meta.base.model_config(dtype="fp32" if quantization == "none" else trained, quantization=quantization,
                                  gradient_checkpointing="off")
    tokenizer = load_tokenizer(mcfg)
    model, info = load_model(mcfg, training=False, tokenizer=tokenizer)
    # warned about once, for the full-precision base the merge is made from
    matches = check_same_base(meta.base, info, policy="warn" if quantization == "none" else "quiet", unknown="same",
                              held_as="on disk", consequence="the merged model will be off by as much", log=log)
    return model, tokenizer, matches


def _load_merged(folder: Path, dtype: str):
    """The merged folder as a user loads it; checked to hold `dtype`, then run in fp32 (module docstring)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    if model.dtype != _torch_dtype(dtype):
        raise AssertionError(f"the merged folder holds {model.dtype}, not {dtype}")
    return model.float().eval()


# --------------------------------------------------------------------------- parity


def prompt_ids(template, tokenizer) -> list[list[int]]:
    """`PROMPTS` as the template renders them for generation; prompts it cannot render (a model
    template that rejects system messages) are left out."""
    from lorakit.errors import DataError

    out = []
    for msgs in PROMPTS:
        try:
            out.append(template.encode_prompt(tokenizer, msgs))
        except DataError:
            continue
    if not out:
        raise LorakitError("the adapter's template renders none of the parity prompts",
                           hint="check the template in lorakit.json with `lorakit generate`")
    return out


@dataclass
class _Outputs:
    """One model's logits on the compared sequences and its own greedy continuations."""

    sequences: list[list[int]]  # prompt + the reference's greedy continuation
    logits: list[torch.Tensor]  # (T, V) fp32 per sequence
    greedy: list[list[int]]

    @classmethod
    @torch.no_grad()
    def of(cls, model, prompts: list[list[int]], stop_ids: list[int],
           sequences: list[list[int]] | None = None, greedy: bool = True) -> "_Outputs":
        """`sequences` None: the prompts plus this model's greedy continuations (the reference)."""
        greedy = _greedy(model, prompts, stop_ids) if greedy else []
        sequences = sequences or [p + g for p, g in zip(prompts, greedy)]
        device = next(model.parameters()).device
        logits = [model(input_ids=torch.tensor([s], device=device)).logits[0].float().cpu() for s in sequences]
        return cls(sequences, logits, greedy)

    @property
    def logit_scale(self) -> float:
        return max(float(x.abs().max()) for x in self.logits)

    @property
    def positions(self) -> int:
        return sum(x.shape[0] for x in self.logits)

    def max_abs_diff(self, other: "_Outputs") -> float:
        return max(float((a - b).abs().max()) for a, b in zip(self.logits, other.logits))

    def compare(self, other: "_Outputs", reference: str) -> Parity:
        diffs = [(a - b).abs() for a, b in zip(self.logits, other.logits)]
        total = sum(float(d.sum()) for d in diffs)
        count = sum(d.numel() for d in diffs)
        first = None
        for i, (a, b) in enumerate(zip(self.greedy, other.greedy)):
            if a != b:
                first = (i, next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
                break
        return Parity(reference, max(float(d.max()) for d in diffs), total / count, first is None, first)


def _greedy(model, prompts: list[list[int]], stop_ids: list[int]) -> list[list[int]]:
    """Greedy continuations of all prompts, each cut after its first stop token (the decoder's
    rows do not depend on each other, so the batch is the prompts' only shared cost)."""
    from lorakit.infer.decoder import greedy

    return greedy(model, prompts, GREEDY_TOKENS, stop_ids)


def format_report(r: MergeReport) -> str:
    """The table `lorakit merge` prints."""
    def greedy(p: Parity) -> str:
        return "identical" if p.greedy_identical else f"differs (prompt {p.first_difference[0]}, " \
                                                        f"token {p.first_difference[1]})"

    rows = [("merged vs", "max |Δlogit|", "mean |Δlogit|", "greedy")]
    rows.append((r.parity.reference, f"{r.parity.max_abs_diff:.3g}", f"{r.parity.mean_abs_diff:.3g}", greedy(r.parity)))
    if r.quantized is not None:
        q = r.quantized
        rows.append((q.reference, f"{q.max_abs_diff:.3g}", f"{q.mean_abs_diff:.3g}", greedy(q)))
    lines = [f"merge parity: {r.prompts} prompts, {r.positions} positions, {GREEDY_TOKENS} greedy tokens each"]
    lines += text_columns(rows)
    verdict = "ok" if r.passed else "FAILED"
    lines.append(f"  {r.dtype} tolerance {r.tolerance:.3g} (logit scale {r.logit_scale:.3g}): {verdict}; "
                 f"the adapter itself moves the logits by up to {r.adapter_effect:.3g}")
    if r.quantized is not None:
        lines.append(f"  trained on a {r.quantized.reference.split()[0]} base: the merged model runs on the "
                     "full-precision weights, so it differs from what training saw by the second row")
    if not r.base_matches:
        lines.append("  warning: the base on disk is not the one the adapter was trained on")
    return "\n".join(lines)
