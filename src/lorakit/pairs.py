"""`lorakit pairs`: DPO preference pairs from the adapter's own mistakes.

The guide's loop is train → evaluate → look at what is wrong → train again. This stage turns what
is wrong into training data: every held-out row the adapter answers wrong (by the metric the user
picks) gives a pair with the reference as `chosen` and the adapter's answer as `rejected`, the
contrast a preference objective learns from, taken exactly where the adapter fails.

The rows are eval's rows (`evaluate.eval_sets`: same template, data rules and prompts) and the
greedy answers are eval's answers (`evaluate.answer` with eval's length rule), so a pair's
`rejected` is the answer `lorakit eval` records for that row. Sampled answers (`samples`) add the
other mistakes the adapter is likely to make; each (set, draw, row) draws from a seed of its own
derived from `seed`, so the file depends neither on the batch size nor on luck.

A pair is written in the form that renders the same prompt when it is read back as training data
(alpaca's instruction / input / system for a row that came from alpaca, else the conversation
before the answer as `prompt`), with a `lorakit` object beside it that traces it to its source row.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorakit import metrics as M
from lorakit.artifacts import RunPaths, find_adapter_dir, write_jsonl_atomic
from lorakit.config import STAGE_CHECKS, PairsConfig
from lorakit.errors import LorakitError
from lorakit.evaluate import EvalSet, answer, auto_max_new_tokens, eval_sets, has_reference, split_reference
from lorakit.infer import Sampling, Session, generate_batch

GREEDY = "greedy"
EMPTY = "empty answer"
SAME = "equal to the reference after normalization"
REPEATED = "repeats an answer already paired"
SKIP_REASONS = (EMPTY, SAME, REPEATED)


@dataclass
class PairsResult:
    out: Path
    metric: str
    threshold: float
    sets: list[str] = field(default_factory=list)
    examples: int = 0  # rows with a reference, answered
    wrong: int = 0  # rows whose greedy answer is wrong by the metric
    sampled: int = 0  # sampled answers drawn
    sampled_wrong: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)  # wrong answers not written, by reason (SKIP_REASONS)


def judge(metric: str, pred: str, ref: str, threshold: float = PairsConfig.threshold) -> tuple[bool, float]:
    """(wrong, score) of one answer: the score is what the pair's `lorakit.score` records, so a
    user can sort the pairs by how far off the answer was."""
    if metric == "exact_match":
        score = float(M.exact_match(pred, ref))
        return score < 1, score
    if metric == "json_fields":
        hit, total = M.json_fields(pred, ref)
        score = hit / total if total else 1.0
        return score < 1, score
    if metric == "rouge_l":
        score = M.rouge_l(pred, ref)
        return score < threshold, score
    raise LorakitError(f"--metric {metric!r} is not a metric pairs knows",
                       hint="use --metric exact_match, json_fields or rouge_l")


def prompt_fields(prompt: list[dict]) -> dict[str, Any]:
    """The keys of a pair that render `prompt` again when read back: alpaca's for a row that came
    from alpaca (its user turn carries `input`, which the alpaca template shows as its own block and
    a conversation has no place for), else the conversation itself."""
    *head, last = prompt
    if last["role"] == "user" and "input" in last and len(head) <= 1 and all(m["role"] == "system" for m in head):
        row = {"instruction": last["content"], "input": last["input"]}
        if head:
            row["system"] = head[0]["content"]
        return row
    return {"prompt": [dict(m) for m in prompt]}


def sample_seed(seed: int, set_name: str, draw: int) -> int:
    """Row 0's seed for one draw over one set; row j draws from it + j. Hashed, so that draws and
    sets never share a stream (below 2**56: room to add row indices)."""
    digest = hashlib.sha256(f"{seed}/{set_name}/{draw}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def sampled_answers(session: Session, prompts: list[list[dict]], settings: PairsConfig, set_name: str,
                    max_new_tokens: int) -> list[list[str]]:
    """answers[draw][row]. `generate_batch` seeds row i of a call from sampling.seed + i, so a batch
    of consecutive rows starting at row j0 and seeded sample_seed + j0 gives every row its own seed
    whatever the batch size."""
    out = []
    for draw in range(settings.samples):
        base, texts = sample_seed(settings.seed, set_name, draw), []
        for j0 in range(0, len(prompts), settings.batch_size):
            sampling = Sampling(max_new_tokens=max_new_tokens, temperature=settings.temperature, top_p=1.0,
                                top_k=0, seed=base + j0)
            texts += [c.text for c in generate_batch(session, prompts[j0:j0 + settings.batch_size], sampling)]
        out.append(texts)
    return out


# --------------------------------------------------------------------------- checks before the model loads


def _checked_out(settings: PairsConfig) -> Path:
    problems: list[str] = []
    STAGE_CHECKS["pairs"](settings, problems)
    if problems:
        raise LorakitError("; ".join(problems), hint="give each flag (or key of the --config file's pairs: section) "
                           "a value in the range named")
    if not settings.out:
        raise LorakitError("no output file for the pairs", hint="pass --out FILE.jsonl (or pairs.out in --config FILE)")
    out = Path(settings.out).expanduser()
    if out.is_dir():
        raise LorakitError(f"--out {settings.out} is a folder", hint=f"name a file in it: --out {out / 'pairs.jsonl'}")
    if not out.parent.is_dir():
        raise LorakitError(f"--out {settings.out}: the folder {out.parent} does not exist",
                           hint=f"create it first (mkdir -p {out.parent}) or pass --out in an existing folder")
    return out


def _check_split(paths: RunPaths, settings: PairsConfig) -> None:
    """A split the run does not have, named by its flag before the model loads (eval_sets would
    find out too, after the load, in words about the config)."""
    from lorakit import config

    if settings.data or not paths.config.is_file():
        return
    d = config.load(paths.config).data
    if settings.split == "test" and not d.test:
        raise LorakitError("--split test: the run's config has no data.test", where=str(paths.config),
                           hint="pass --data FILE, or --split validation")
    if settings.split == "validation" and not d.validation and d.val_fraction <= 0:
        raise LorakitError("--split validation: the run has no validation split (no data.validation, "
                           "data.val_fraction 0)", where=str(paths.config),
                           hint="pass --split test for the run's data.test files, or --data FILE")


def _nothing_to_answer(s: EvalSet, settings: PairsConfig) -> LorakitError:
    if s.name == "validation" and not settings.data:
        return LorakitError("--split validation: every row of the run's validation split was dropped (too long?)",
                            hint="pass --split test for the run's data.test files, or --data FILE")
    return LorakitError(f"set {s.name!r} has no row with a reference answer", where=", ".join(s.sources),
                        hint="check the file with `lorakit data` (rows dropped as too long? no assistant turn?)")


def _require_json(refs: list[str], wheres: list[str]) -> None:
    for ref, where in zip(refs, wheres):
        ok, value = M.parse_json(ref)
        if not (ok and isinstance(value, (dict, list))):
            raise LorakitError("--metric json_fields: this row's reference answer is not a JSON object or array",
                               where=where, hint="use --metric exact_match or --metric rouge_l for text answers")


# --------------------------------------------------------------------------- the stage


def set_pairs(session: Session, s: EvalSet, settings: PairsConfig, result: PairsResult,
              log: Callable[[str], None] = print) -> list[dict]:
    """The pairs of one eval set, in row order (each row's greedy answer, then its draws); counts go
    into `result`. Rows are limited before the ones without a reference are left out, as eval does."""
    examples = s.examples[:settings.limit]
    wheres = (s.wheres or [""] * len(s.examples))[:settings.limit]
    kept = [(ex, w) for ex, w in zip(examples, wheres) if has_reference(ex)]
    if not kept:
        raise _nothing_to_answer(s, settings)
    prompts = [split_reference(ex)[0] for ex, _ in kept]
    refs = [split_reference(ex)[1] for ex, _ in kept]
    if settings.metric == "json_fields":
        _require_json(refs, [w for _, w in kept])
    new_tokens = settings.max_new_tokens or auto_max_new_tokens(session, refs)
    log(f"{s.name}: answering {len(prompts)} prompts greedily"
        + (f", then {settings.samples} sampled answers each ..." if settings.samples else " ..."))
    greedy = answer(session, prompts, max_new_tokens=new_tokens, batch_size=settings.batch_size)
    draws = sampled_answers(session, prompts, settings, s.name, new_tokens)
    rows = []
    for j, ((_, where), prompt, ref) in enumerate(zip(kept, prompts, refs)):
        result.examples += 1
        paired: set[str] = set()
        for label, text in [(GREEDY, greedy[j])] + [(f"sample {k + 1}", d[j]) for k, d in enumerate(draws)]:
            wrong, score = judge(settings.metric, text, ref, settings.threshold)
            if label == GREEDY:
                result.wrong += wrong
            else:
                result.sampled, result.sampled_wrong = result.sampled + 1, result.sampled_wrong + wrong
            if not wrong:
                continue
            reason = EMPTY if not text.strip() else SAME if M.exact_match(text, ref) else \
                REPEATED if M.normalize(text) in paired else None
            if reason:
                result.skipped[reason] += 1
                continue
            paired.add(M.normalize(text))
            rows.append({**prompt_fields(prompt), "chosen": ref, "rejected": text,
                         "lorakit": {"where": where, "metric": settings.metric, "score": round(score, 4),
                                     "answer": label}})
    return rows


def make_pairs(run: str | Path, settings: PairsConfig, *, session: Session | None = None,
               log: Callable[[str], None] = print) -> PairsResult:
    """`lorakit pairs`: answer the run's held-out rows (the sets eval scores), write a preference
    pair for every wrong answer to `settings.out` (atomically: an interrupted run leaves no half
    file), and return the counts."""
    from lorakit.infer import load_session

    out = _checked_out(settings)  # before the model loads: a typo should cost no minutes
    adapter_dir = find_adapter_dir(run)
    paths = RunPaths.of(adapter_dir)
    _check_split(paths, settings)
    session = session or load_session(adapter_dir, log=log)
    sets = eval_sets(paths, session, data=settings.data or None, split=settings.split, log=log)
    result = PairsResult(out, settings.metric, settings.threshold, [s.name for s in sets])
    rows = [row for s in sets for row in set_pairs(session, s, settings, result, log)]
    write_jsonl_atomic(out, rows)
    result.pairs = len(rows)
    return result


def format_result(result: PairsResult, run: str | Path) -> str:
    """The summary `lorakit pairs` prints, ending with the command that trains on the pairs."""
    how = f"ROUGE-L below {result.threshold}" if result.metric == "rouge_l" else result.metric
    lines = [f"pairs: {result.examples} examples read ({', '.join(result.sets)}), wrong by {how}:",
             f"  greedy answers wrong: {result.wrong} of {result.examples}"]
    if result.sampled:
        lines.append(f"  sampled answers wrong: {result.sampled_wrong} of {result.sampled}")
    skipped = [f"{result.skipped[r]} {r}" for r in SKIP_REASONS if result.skipped[r]]
    lines.append(f"  skipped: {'; '.join(skipped)}" if skipped else "  skipped: none")
    lines.append(f"  pairs written: {result.pairs} -> {result.out}")
    if result.pairs:
        lines.append(f"next: lorakit train dpo.yaml --model.adapter {run} --data.train {result.out}")
    else:
        lines.append("nothing to train on: no wrong answer to pair (try --samples K, or --metric rouge_l)")
    return "\n".join(lines)


__all__ = ["PairsResult", "format_result", "judge", "make_pairs", "prompt_fields", "sample_seed", "sampled_answers",
           "set_pairs"]
