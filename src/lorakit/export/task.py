"""Task-level verification: what an exported GGUF costs on the run's own task, measured.

The token-level check (export/verify.py) compares a few generic prompts position by position; it
passes files that lose a fifth of a fine-tune's right answers, because a quantized model that
agrees on 90 % of next tokens can still flip the one token an extraction answer turns on. This
check answers the run's held-out rows (its validation split, or `--eval-data`) twice — through
transformers with the merged fp32 model and through llama.cpp with the GGUF — greedily, from the
SAME prompt token ids (the trained template rendered once), and scores both with the eval stage's
scorer (`lorakit.metrics`). The drop in points of the run's metric decides; the answers that
changed are counted (a drop of 0 can hide answers that changed in both directions).

The transformers answers are computed once per export (`TaskSet.reference_answers`) and reused by
every candidate type of `--gguf auto`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorakit import metrics as M
from lorakit.errors import LorakitError

SHOWN_CHANGES = 5
"""Changed answers kept in the .verify.json (and shown by the report), the first ones by row."""


@dataclass
class TaskSet:
    """The rows a task check answers, rendered once; `reference_answers` once the merged model ran."""

    name: str
    sources: list[str]
    prompts: list[list[dict]]
    references: list[str]
    prompt_ids: list[list[int]]
    metric: str
    max_new_tokens: int
    stop_ids: list[int]
    tokenizer: Any
    template: Any
    reference_answers: list[str] | None = None
    reference_seconds: float | None = None


@dataclass(frozen=True)
class TaskCheck:
    """The task-level result stored under "task" in `<file>.verify.json`."""

    data: str
    sources: list[str]
    metric: str
    rows: int
    max_new_tokens: int
    reference: float          # the merged model's metric in transformers, in [0, 1]
    gguf: float               # the GGUF's in llama.cpp
    drop: float               # (reference - gguf) in points (percent)
    changed: int              # answers whose text differs between the two engines
    gained: int               # exactly-right answers llama.cpp has and transformers has not
    lost: int                 # and the other way round
    max_drop: float
    passed: bool
    reference_scores: dict[str, float]
    gguf_scores: dict[str, float]
    examples: list[dict] = field(default_factory=list)  # up to SHOWN_CHANGES changed rows
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_metric(metric: str, references: list[str]) -> str:
    """'auto': JSON field accuracy when every reference is a JSON object or array, else exact match."""
    if metric != "auto":
        return metric
    return "json_field_accuracy" if M.json_references(references) else "exact_match"


def task_set(adapter_dir: Path, tokenizer, *, eval_data: list[str], limit: int, metric: str,
             max_new_tokens: int = 0, log: Callable[[str], None] = print) -> TaskSet:
    """The rows to answer: each `eval_data` file, else the run's validation split (as `lorakit eval`
    makes it). Raises before any export work when there is nothing to answer."""
    from lorakit.artifacts import RunPaths, read_meta
    from lorakit.evaluate import auto_max_new_tokens, eval_sets, has_reference, split_reference
    from lorakit.infer import Adapter, Session, adapter_name

    meta = read_meta(adapter_dir)
    name = adapter_name(adapter_dir)
    # eval_sets reads only the tokenizer, the template and the training fingerprint: no model yet.
    session = Session(None, tokenizer, {name: Adapter.from_meta(name, adapter_dir, meta)})
    paths = RunPaths.of(adapter_dir)
    if not eval_data and not paths.config.is_file():
        raise LorakitError(f"the task-level check has no rows to answer: {adapter_dir} is not in a run folder with "
                           "a config.yaml, so it has no validation split", where=str(adapter_dir),
                           hint="pass --eval-data FILE (rows in a training format, with answers), or --no-verify "
                           "to skip every check")
    sets = eval_sets(paths, session, data=eval_data or None, log=log)
    examples = [ex for s in sets for ex in s.examples if has_reference(ex)]
    where = ", ".join(src for s in sets for src in s.sources) or str(paths.config)
    if not examples:
        raise LorakitError(
            "the task-level check has no rows to answer: " + (
                "the --eval-data files hold no row with an answer" if eval_data else
                "the run has no validation split (data.validation is unset and data.val_fraction gave no rows)"),
            where=where, hint="pass --eval-data FILE (rows in a training format, with answers), or --no-verify "
            "to skip every check")
    if limit:
        examples = examples[:limit]
    prompts, refs = (list(t) for t in zip(*map(split_reference, examples)))
    template = session.template
    return TaskSet(
        name=sets[0].name if len(sets) == 1 else "+".join(s.name for s in sets),
        sources=[src for s in sets for src in s.sources], prompts=prompts, references=refs,
        prompt_ids=[template.encode_prompt(tokenizer, p) for p in prompts],
        metric=choose_metric(metric, refs), max_new_tokens=max_new_tokens or auto_max_new_tokens(session, refs),
        stop_ids=template.stop_token_ids(tokenizer), tokenizer=tokenizer, template=template)


def answer_reference(ts: TaskSet, merged_dir: Path, *, log: Callable[[str], None] = print) -> list[str]:
    """The merged model's greedy answers in transformers (fp32), through the eval stage's batched
    answering; kept on `ts` for every candidate file."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.evaluate import answer
    from lorakit.infer import Adapter, Session

    if ts.reference_answers is None:
        log(f"task check: answering {len(ts.prompts)} rows of {ts.name!r} with the merged model (transformers) ...")
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        session = Session(model, ts.tokenizer, {"merged": Adapter("merged", merged_dir, None, ts.template,
                                                                  mixable=False)})
        ts.reference_answers = answer(session, ts.prompts, max_new_tokens=ts.max_new_tokens)
        ts.reference_seconds = round(time.perf_counter() - t0, 2)
        del model, session
    return ts.reference_answers


def check(ts: TaskSet, gguf_path: Path, *, max_drop: float, adapter_gguf: Path | None = None,
          log: Callable[[str], None] = print) -> TaskCheck:
    """Answer `ts` with the GGUF in llama.cpp and compare with the reference answers (which must have
    been computed: `answer_reference`)."""
    from lorakit.export.llama import answer_with_gguf
    from lorakit.infer import answer_text

    if ts.reference_answers is None:
        raise AssertionError("answer_reference() first")  # a bug, not a user mistake
    log(f"task check: answering {len(ts.prompts)} rows with {Path(gguf_path).name} in llama.cpp ...")
    t0 = time.perf_counter()
    ids = answer_with_gguf(gguf_path, ts.prompt_ids, ts.max_new_tokens, ts.stop_ids, adapter_gguf=adapter_gguf)
    gguf_answers = [answer_text(ts.tokenizer, a) for a in ids]
    seconds = round(time.perf_counter() - t0, 2)
    ref_answers, refs = ts.reference_answers, ts.references
    ref_scores, own_scores = M.aggregate(ref_answers, refs), M.aggregate(gguf_answers, refs)
    ref_scores.pop("count"), own_scores.pop("count")
    drop = round(100 * (ref_scores[ts.metric] - own_scores[ts.metric]), 2)
    changed = [i for i, (a, b) in enumerate(zip(ref_answers, gguf_answers)) if a != b]
    right = [(M.exact_match(a, r), M.exact_match(b, r)) for a, b, r in zip(ref_answers, gguf_answers, refs)]
    return TaskCheck(
        data=ts.name, sources=ts.sources, metric=ts.metric, rows=len(refs), max_new_tokens=ts.max_new_tokens,
        reference=round(float(ref_scores[ts.metric]), 4), gguf=round(float(own_scores[ts.metric]), 4), drop=drop,
        changed=len(changed), gained=sum(b and not a for a, b in right), lost=sum(a and not b for a, b in right),
        max_drop=max_drop, passed=max_drop < 0 or drop <= max_drop,
        reference_scores={k: round(float(v), 4) for k, v in ref_scores.items()},
        gguf_scores={k: round(float(v), 4) for k, v in own_scores.items()},
        examples=[{"row": i, "expected": refs[i], "transformers": ref_answers[i], "gguf": gguf_answers[i]}
                  for i in changed[:SHOWN_CHANGES]],
        seconds={"transformers": ts.reference_seconds or 0.0, "llama.cpp": seconds})


LABEL = {"exact_match": "exact match", "json_field_accuracy": "JSON field accuracy", "rouge_l": "ROUGE-L"}


def format_check(t: TaskCheck, type: str) -> str:
    """The lines printed per file."""
    label = LABEL.get(t.metric, t.metric)
    verdict = ("ok" if t.passed else "FAILED") if t.max_drop >= 0 else "not enforced"
    return (f"task check on {t.data!r} ({t.rows} rows, greedy, at most {t.max_new_tokens} new tokens): "
            f"{label} {t.reference:.1%} merged (transformers) -> {t.gguf:.1%} {type} (llama.cpp), "
            f"drop {t.drop:+.1f} points (allowed {t.max_drop:g}): {verdict}\n"
            f"  {t.changed}/{t.rows} answers changed ({t.lost} exact answers lost, {t.gained} gained)")


def failure_hint(type: str) -> str:
    """What to try when a file loses too much on the task."""
    from lorakit.export.quantize import FTYPES

    if type not in FTYPES:
        return ("an unquantized file should answer as transformers does: compare the two engines' answers in the "
                ".verify.json, and allow the difference with --max-drop POINTS if it is the engines, not the file")
    order = list(FTYPES)  # largest file first
    wider = order[max(0, order.index(type) - 2):order.index(type)]
    tries = ", ".join(f"--gguf {w}" for w in reversed(wider)) or "--gguf f16"
    return (f"try a larger type ({tries}, or --gguf auto to keep the smallest that passes, trying 4-bit types with "
            "and without the importance matrix), the other --imatrix setting (on / off), or allow a larger drop "
            "with --max-drop POINTS")
