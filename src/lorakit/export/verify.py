"""Prove a GGUF file answers as the transformers model it was exported from, in llama.cpp itself.

The GGUF is loaded by llama.cpp through `xllamacpp` (a prebuilt binding: no compiler), its server
run in-process, bound to 127.0.0.1 and shut down when done. The reference is the transformers
folder the file was converted from (`lorakit merge` writes one; its lorakit.json holds the
trained template), run in fp32. `PROMPTS` (merge's fixed set) are rendered with that template
and both engines get the SAME token ids, so a tokenizer difference cannot hide or fake a model
difference; whether llama.cpp's own tokenization of the rendered text gives those ids is
reported separately (a GGUF whose tokenizer differs answers differently to text prompts, e.g.
in Ollama, even when its weights are right).

Per prompt: each engine's greedy continuation (`new_tokens`, cut after the first stop token) is
compared token by token; then the top-N log-probabilities are compared at every position of the
REFERENCE's greedy path, teacher-forced: llama.cpp is given prompt + the reference's first k
tokens and asked for one token, so one early flip (quantization changing a near tie) does not
make every later position incomparable. Where llama.cpp's own continuation equals the
reference's prefix, its free-running log-probabilities are those teacher-forced ones already,
so only the positions after a divergence cost extra requests. At each position:

  - top-1 agreement: llama.cpp's most likely token is the reference's greedy token;
  - |Δ logprob| over the tokens of llama.cpp's top-N (the reference has every logprob) and over
    the reference's top-N tokens that llama.cpp returned (it is asked for 4·N).

Thresholds (`THRESHOLDS`), per GGUF type:

  f32, f16: every greedy token identical, and max |Δ logprob| ≤ `logprob_bound`:

        bound = 2 · SAFETY · (k·u_type + u_fp32·√d) · √(L+1) · S

    the merge tolerance (lorakit.merge.tolerance: rounding u per weight, fp32 dot products of d
    terms in another order, L blocks adding independent errors, S the largest |logit|) doubled
    because a log-probability is logit − logsumexp and both move (|Δ lp| ≤ 2 max |Δ logit|);
    k = 2 for f16 because llama.cpp also rounds the activations to f16 before an f16 matrix
    product (ggml's vec_dot_type of F16), k = 0 for f32. llama.cpp runs with an f32 KV cache and
    flash attention off: its CPU flash attention rounds K, V and the softmax to f16 (measured: an
    f32 file then differs by 1e-3, as much as an f16 one), which would measure the engine's
    settings, not the file. Measured max |Δ lp| / bound: f32 0.033 (tiny) and 0.055 (SmolLM2),
    f16 0.045 and 0.011: a correct file sits 18× or more under it, while a wrong one (another
    model, or the base without its adapter) is 100× to 10⁵× over it.
  q8_0, q4_k_m (and the other quantized types): greedy agreement is reported, and the export
    fails when top-1 agreement falls below a floor (`THRESHOLDS`); greedy continuations of a
    quantized model legitimately drift after a near tie, so they are reported, not failed on.
    Measured top-1 agreement: q8_0 1.000 (tiny) and 0.952 (SmolLM2), q4_k_m 0.969 and 0.903; a
    wrong model 0.42. The floors sit about 3.5 binomial standard deviations below the SmolLM2
    figures over its 62 positions (√(p(1-p)/62): 0.027 at p = 0.95, 0.038 at p = 0.90), so a
    correct file of a model like it rarely fails by chance (positions are not independent, so
    this is a rough guide): q8_0 0.85, q4_k_m 0.75 (bf16, q6_k, q5_k_m, q4_0: set by analogy, not
    measured).

A random model's next-token distribution is nearly flat (median top-1/top-2 margin 0.13 nats on
the tiny Llama), so any rounding flips its argmax: the tests make their tiny model "peaky" (final
norm ×10: margin 1.5 nats, as a trained model has) so that agreement measures the file.

With `adapter_gguf`, llama.cpp loads `gguf_path` as the base plus the LoRA GGUF at scale 1 and is
compared with the merged reference (the transformers folder, or `reference_gguf`, a merged GGUF
run in llama.cpp: then only tokens both engines returned are compared).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorakit.artifacts import atomic_write_json, verification_path
from lorakit.artifacts import publish as publish_file
from lorakit.errors import DataError, LorakitError
from lorakit.export.llama import Llama, cut_at_stop
from lorakit.metrics import text_columns
from lorakit.infer.decoder import greedy as decoder_greedy

SAFETY = 3.0
"""As lorakit.merge.SAFETY: margin of `logprob_bound` over the measured worst case."""
UNIT_ROUNDOFF = {"f32": 0.0, "f16": 2 * 2.0 ** -11}
"""k·u_type of `logprob_bound`: f16 rounds the stored weight and the activation it meets (k = 2)."""
U_FP32 = 2.0 ** -24

EXACT = "exact"
THRESHOLDS: dict[str, dict[str, Any]] = {
    "f32": {"greedy": EXACT, "logprob": "bound"},
    "f16": {"greedy": EXACT, "logprob": "bound"},
    "bf16": {"top1": 0.85},
    "q8_0": {"top1": 0.85},
    "q6_k": {"top1": 0.8},
    "q5_k_m": {"top1": 0.8},
    "q4_k_m": {"top1": 0.75},
    "q4_0": {"top1": 0.7},
    "iq4_xs": {"top1": 0.7},
}
"""What each type must meet (module docstring: how the floors were set, and the measured figures).
Measured on the tiny Llama of tests/test_export_verify.py (hidden 256, 2 layers, peaky) and on
SmolLM2-135M-Instruct merged with a random r = 4 adapter (std 0.02), 4 prompts, 16 tokens."""


@dataclass(frozen=True)
class PromptResult:
    """One prompt, both engines."""

    prompt_tokens: int
    reference: list[int]  # the reference's greedy continuation (ends with a stop token if it stopped)
    gguf: list[int]  # llama.cpp's
    greedy_identical: bool
    first_difference: int | None  # index of the first differing greedy token
    positions: int  # teacher-forced positions compared (= len(reference))
    top1_agree: int  # positions where llama.cpp's top-1 is the reference's greedy token
    max_logprob_diff: float
    tokens_equal: bool | None  # llama.cpp's tokenization of the rendered text == the ids fed


@dataclass(frozen=True)
class Verification:
    """`<file>.verify.json`."""

    gguf: str
    reference: str
    type: str
    adapter: str | None
    top_n: int
    new_tokens: int
    prompts: list[PromptResult]
    greedy_identical: int  # prompts whose greedy continuations are identical
    top1_agreement: float  # over all positions
    max_logprob_diff: float
    logit_scale: float | None  # S: the reference's largest |logit| (None for a GGUF reference)
    logprob_bound: float | None  # f32/f16: the bound on max |Δ logprob|
    top1_floor: float | None  # quantized types: the floor on top-1 agreement
    tokens_equal: bool | None  # every prompt's llama.cpp tokenization equals transformers' ids
    passed: bool
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    created: str = ""
    task: dict[str, Any] | None = None  # lorakit.export.task.TaskCheck.to_dict(), when the task check ran
    auto: list[dict[str, Any]] | None = None  # --gguf auto: every candidate measured, in the order tried
    raised: list[str] | None = None  # --max-size: the tensors kept one type wider than the mix

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def logprob_bound(type: str, logit_scale: float, *, layers: int, width: int) -> float:
    """Module docstring: 2 · SAFETY · (k·u_type + u_fp32·√d) · √(L+1) · S."""
    u = UNIT_ROUNDOFF[type] + U_FP32 * math.sqrt(width)
    return 2 * SAFETY * u * math.sqrt(layers + 1) * logit_scale


# --------------------------------------------------------------------------- the references


@dataclass
class _Step:
    """One position: the engine's log-probabilities it knows (all of them, or its top-K)."""

    logprobs: dict[int, float]
    full: Any = None  # the whole log_softmax row (torch), for the transformers reference

    def get(self, token: int) -> float | None:
        if self.full is not None:
            return float(self.full[token])
        return self.logprobs.get(token)

    def top(self, n: int) -> list[int]:
        return sorted(self.logprobs, key=lambda t: -self.logprobs[t])[:n]


def _steps_of(content: list[dict]) -> list[_Step]:
    return [_Step({p["id"]: p["logprob"] for p in c["top_logprobs"]}) for c in content]


class _Transformers:
    """The reference folder in fp32."""

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.logit_scale = 0.0

    def run(self, ids: list[int], n: int, stop_ids: list[int], k: int) -> tuple[list[int], list[_Step]]:
        torch = self.torch
        with torch.no_grad():
            (greedy,) = decoder_greedy(self.model, [ids], n, stop_ids)
            logits = self.model(input_ids=torch.tensor([ids + greedy])).logits[0, len(ids) - 1:-1].float()
        self.logit_scale = max(self.logit_scale, float(logits.abs().max()))
        lp = torch.log_softmax(logits, dim=-1)
        steps = []
        for row in lp:
            v, i = row.topk(k)
            steps.append(_Step(dict(zip(i.tolist(), v.tolist())), full=row))
        return greedy, steps


class _Gguf:
    """A GGUF run in llama.cpp as the reference (the merged GGUF of the LoRA check)."""

    def __init__(self, llm: Llama):
        self.llm = llm
        self.logit_scale = float("nan")

    def run(self, ids: list[int], n: int, stop_ids: list[int], k: int) -> tuple[list[int], list[_Step]]:
        content = self.llm.complete(ids, n, n_probs=k)
        greedy = cut_at_stop([c["id"] for c in content], stop_ids)
        return greedy, _steps_of(content[:len(greedy)])


# --------------------------------------------------------------------------- verify


def _compare(llm: Llama, ids: list[int], ref_greedy: list[int], ref_steps: list[_Step], n: int,
             stop_ids: list[int], top_n: int) -> tuple[list[int], int, float]:
    """llama.cpp's greedy continuation, its top-1 agreement along the reference's path, max |Δ lp|."""
    k = 4 * top_n
    content = llm.complete(ids, n, n_probs=k)
    own = cut_at_stop([c["id"] for c in content], stop_ids)
    steps = _steps_of(content)
    same = next((i for i, (a, b) in enumerate(zip(own, ref_greedy)) if a != b), min(len(own), len(ref_greedy)))
    # positions 0..same hold llama.cpp's log-probabilities after prompt + ref[:i] (its tokens equal the
    # reference's there); the later ones are asked for one at a time, teacher-forced
    path = steps[:min(same + 1, len(ref_greedy))]
    for i in range(len(path), len(ref_greedy)):
        path += _steps_of(llm.complete(ids + ref_greedy[:i], 1, n_probs=k))[:1]
    agree, worst = 0, 0.0
    for tok, mine, ref in zip(ref_greedy, path, ref_steps):
        top = mine.top(1)
        agree += bool(top) and top[0] == tok
        for t in set(mine.top(top_n)) | {t for t in ref.top(top_n) if t in mine.logprobs}:
            a, b = mine.get(t), ref.get(t)
            if a is not None and b is not None:
                worst = max(worst, abs(a - b))
    return own, agree, worst


def verify(gguf_path: str | Path, reference_dir: str | Path, type: str, *, prompts: list[list[dict]] | None = None,
           adapter_gguf: str | Path | None = None, reference_gguf: str | Path | None = None, top_n: int = 5,
           new_tokens: int = 16, log: Callable[[str], None] = print) -> Verification:
    """Run `gguf_path` (plus `adapter_gguf`) in llama.cpp against `reference_dir` in transformers
    (or `reference_gguf` in llama.cpp) on `prompts` (default lorakit.merge.PROMPTS); print the table."""
    from transformers import AutoTokenizer

    from lorakit.artifacts import now_iso, read_meta
    from lorakit.data.templates import engine_text
    from lorakit.merge import PROMPTS, _depth, _width

    type = type.lower()
    if type not in THRESHOLDS:
        raise LorakitError(f"no verification thresholds for GGUF type {type!r}",
                           hint=f"use one of {', '.join(THRESHOLDS)}")
    start = time.perf_counter()
    reference_dir = Path(reference_dir)
    template = read_meta(reference_dir).template
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    stop_ids = template.stop_token_ids(tokenizer)
    rendered = []
    for msgs in prompts or PROMPTS:
        try:
            rendered.append((engine_text(template, tokenizer, msgs), template.encode_prompt(tokenizer, msgs)))
        except DataError:  # a template that rejects e.g. a system message: as merge.prompt_ids
            continue
    if not rendered:
        raise LorakitError("the template renders none of the verification prompts", where=str(reference_dir))
    n_ctx = max(256, max(len(ids) for _, ids in rendered) + new_tokens + 8)

    with contextlib.ExitStack() as stack:
        if reference_gguf is not None:
            ref = _Gguf(stack.enter_context(Llama(reference_gguf, n_ctx=n_ctx)))
        else:
            ref = _Transformers(reference_dir)
        refs = [ref.run(ids, new_tokens, stop_ids, 4 * top_n) for _, ids in rendered]
        llm = stack.enter_context(Llama(gguf_path, adapter_gguf=adapter_gguf, n_ctx=n_ctx))
        results = [_prompt_result(llm, text, ids, ref_greedy, ref_steps, new_tokens, stop_ids, top_n)
                   for (text, ids), (ref_greedy, ref_steps) in zip(rendered, refs)]
    scale = None if math.isnan(ref.logit_scale) else ref.logit_scale
    bound = None
    if THRESHOLDS[type].get("logprob") == "bound":
        cfg = _config(reference_dir)
        bound = logprob_bound(type, scale or _logit_scale_guess(refs), layers=_depth(cfg), width=_width(cfg))
    failures, top1, worst, identical = _judge(type, results, bound)
    tokens_equal = None if any(r.tokens_equal is None for r in results) else all(r.tokens_equal for r in results)
    v = Verification(str(gguf_path), str(reference_gguf or reference_dir), type,
                     str(adapter_gguf) if adapter_gguf else None, top_n, new_tokens, results, identical, top1, worst,
                     scale, bound, THRESHOLDS[type].get("top1"), tokens_equal, not failures, failures,
                     round(time.perf_counter() - start, 2), now_iso())
    log(format_verification(v))
    return v


def _prompt_result(llm: Llama, text: str, ids: list[int], ref_greedy: list[int], ref_steps: list[_Step],
                   new_tokens: int, stop_ids: list[int], top_n: int) -> PromptResult:
    """One prompt: the file's greedy tokens and log-probabilities against the reference's, and
    whether llama.cpp tokenizes the rendered prompt to the same ids."""
    own, agree, worst = _compare(llm, ids, ref_greedy, ref_steps, new_tokens, stop_ids, top_n)
    first = next((i for i, (a, b) in enumerate(zip(own, ref_greedy)) if a != b), None)
    if first is None and len(own) != len(ref_greedy):
        first = min(len(own), len(ref_greedy))
    try:
        equal = llm.tokenize(text) == ids
    except OSError:  # the HTTP side did not answer: not a verdict on the file
        equal = None
    return PromptResult(len(ids), ref_greedy, own, first is None, first, len(ref_greedy), agree, worst, equal)


def _judge(type: str, results: list[PromptResult], bound: float | None) -> tuple[list[str], float, float, int]:
    """The type's rule (THRESHOLDS) over every prompt: (failures, top-1 agreement, max |Δ logprob|,
    prompts with identical greedy tokens)."""
    rule = THRESHOLDS[type]
    positions = sum(r.positions for r in results) or 1
    top1 = sum(r.top1_agree for r in results) / positions
    worst = max(r.max_logprob_diff for r in results)
    identical = sum(r.greedy_identical for r in results)
    failures = []
    if rule.get("greedy") == EXACT and identical < len(results):
        bad = next(i for i, r in enumerate(results) if not r.greedy_identical)
        failures.append(f"greedy tokens differ (prompt {bad}, token {results[bad].first_difference}); "
                        f"a {type} file must agree on every one")
    if bound is not None and worst > bound:
        failures.append(f"max |Δ logprob| {worst:.3g} exceeds the {type} bound {bound:.3g}")
    if "top1" in rule and top1 < rule["top1"]:
        failures.append(f"top-1 agreement {top1:.3f} is below the {type} floor {rule['top1']}")
    return failures, top1, worst, identical


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _logit_scale_guess(refs) -> float:
    """A GGUF reference returns log-probabilities, not logits: their range stands in for S."""
    return max((abs(v) for _, steps in refs for s in steps for v in s.logprobs.values()), default=1.0)


def format_verification(v: Verification) -> str:
    """The table printed per export."""
    rows = [("prompt", "tokens", "greedy", "top-1", "max |Δ logprob|", "tokenizer")]
    for i, r in enumerate(v.prompts):
        greedy = "identical" if r.greedy_identical else f"differs at {r.first_difference}"
        tok = {True: "same", False: "DIFFERS", None: "?"}[r.tokens_equal]
        rows.append((str(i), str(r.prompt_tokens), greedy, f"{r.top1_agree}/{r.positions}",
                     f"{r.max_logprob_diff:.3g}", tok))
    what = f"{Path(v.gguf).name}" + (f" + {Path(v.adapter).name}" if v.adapter else "")
    lines = [f"verify {what} ({v.type}) against {v.reference}: {len(v.prompts)} prompts, "
             f"{v.new_tokens} greedy tokens, top-{v.top_n} logprobs (teacher-forced on the reference's tokens)"]
    lines += text_columns(rows)
    rule = (f"max |Δ logprob| ≤ {v.logprob_bound:.3g} and every greedy token identical" if v.logprob_bound is not None
            else f"top-1 agreement ≥ {v.top1_floor}")
    lines.append(f"  greedy identical {v.greedy_identical}/{len(v.prompts)}, top-1 agreement {v.top1_agreement:.3f}, "
                 f"max |Δ logprob| {v.max_logprob_diff:.3g}; needs {rule}: {'ok' if v.passed else 'FAILED'}")
    if v.tokens_equal is False:
        lines.append("  warning: llama.cpp tokenizes the rendered prompt differently from transformers "
                     "(text prompts, e.g. in Ollama, will not see the same tokens)")
    lines += [f"  {f}" for f in v.failures]
    return "\n".join(lines)


def write_verification(v: Verification, path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else verification_path(v.gguf)
    atomic_write_json(path, v.to_dict())
    return path


def check_file(tmp_gguf: str | Path, final: str | Path, reference_dir: str | Path, type: str, *,
               adapter_final: str | Path | None = None, task: Callable[[Path], Any] | None = None,
               log: Callable[[str], None] = print, **kwargs) -> Verification:
    """Both checks of `tmp_gguf` (a file under a name that does not look finished): the token-level
    `verify`, then — when it passed and `task` is given — the task-level check `task(tmp_gguf)` (a
    `lorakit.export.task.TaskCheck`), folded into one verdict. Names in the result are `final`'s."""
    from lorakit.export.task import format_check

    tmp_gguf = Path(tmp_gguf)
    v = verify(tmp_gguf, reference_dir, type, log=log, **kwargs)
    v = dataclasses.replace(v, gguf=str(final), adapter=str(adapter_final) if adapter_final else v.adapter)
    if v.passed and task is not None:
        t = task(tmp_gguf)
        log(format_check(t, type))
        failures = [] if t.passed else [f"the task metric drops {t.drop:.1f} points, more than the {t.max_drop:g} "
                                        "allowed (--max-drop)"]
        v = dataclasses.replace(v, task=t.to_dict(), passed=t.passed, failures=v.failures + failures)
    return v


def publish(tmp_gguf: str | Path, final: str | Path, v: Verification) -> Verification:
    """Store `v` as `final`.verify.json; a passed file is moved to `final`, a failed one removed with
    a LorakitError (the JSON, passed: false, kept to say why): a failed export leaves no file that
    looks done."""
    tmp_gguf, final = Path(tmp_gguf), Path(final)
    write_verification(v, verification_path(final))
    if not v.passed:
        from lorakit.export.task import failure_hint

        tmp_gguf.unlink(missing_ok=True)
        what = ("loses too much of what the fine-tune learned" if v.task and not v.task["passed"] else
                "does not answer as the model it was exported from")
        hint = (failure_hint(v.type) if v.task and not v.task["passed"] else
                "a correct f32/f16 conversion always passes, so report it if those fail; for a quantized type, "
                "use a larger one (q8_0)")
        raise LorakitError(f"the {v.type} GGUF {what}: " + "; ".join(v.failures), where=str(final),
                           hint=f"see {verification_path(final)}; {hint}")
    publish_file(tmp_gguf, final)
    return v


def publish_verified(tmp_gguf: str | Path, final: str | Path, reference_dir: str | Path, type: str, **kwargs
                     ) -> Verification:
    """`check_file` then `publish`; the file is removed when a check raises."""
    try:
        v = check_file(tmp_gguf, final, reference_dir, type, **kwargs)
    except BaseException:
        Path(tmp_gguf).unlink(missing_ok=True)
        raise
    return publish(tmp_gguf, final, v)
