"""`lorakit eval`: held-out loss and greedy answers of the tuned model (and the base), scored.

Loss is token-weighted over every labelled position of the set, computed by the training loss
(`model.loss.summed_loss`) on the set encoded exactly as training encoded its data, so
"eval loss" here and in training measure the same thing. Answers are greedy, so base and tuned
are compared without sampling noise, and scored against the last assistant turn of each
example. The base is prompted with the adapter's own template (what training used), so the
comparison measures the adapter, not a template change.

Results go to the run folder (`RunPaths.eval_records` / `eval_summary`): one record per
example and one summary per set, both written atomically; the report and `lorakit runs` read them.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorakit import metrics as M
from lorakit.artifacts import EvalRecord, EvalSummary, RunPaths, now_iso, write_jsonl_atomic
from lorakit.config import EvalConfig
from lorakit.errors import LorakitError
from lorakit.infer import BASE, Sampling, Session, generate_batch

TUNED, BASE_MODEL = "tuned", "base"


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")


def split_reference(example: dict[str, Any]) -> tuple[list[dict], str]:
    """Conversation up to the last assistant turn, and that turn's text (the reference)."""
    msgs = example["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def has_reference(example: dict[str, Any]) -> bool:
    msgs = example.get("messages") or []
    return any(m["role"] == "assistant" for m in msgs) and any(m["role"] in ("user", "tool") for m in msgs)


# --------------------------------------------------------------------------- loss


def held_out_loss(session: Session, items: list[dict], *, use_adapter: bool = True, batch_size: int = 8) -> float | None:
    """Mean cross-entropy per labelled token over `items` (encoded examples); None if none is labelled."""
    import torch

    from lorakit.data.collate import Collator
    from lorakit.model.loss import summed_loss

    model = session.model
    collate = Collator(session.tokenizer.pad_token_id)
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))  # less padding per batch
    total, count = 0.0, 0
    ctx = model.disable_adapter() if not use_adapter else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for i in range(0, len(order), batch_size):
            batch = collate([items[j] for j in order[i:i + batch_size]])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            s, n = summed_loss(model, batch)
            total, count = total + s, count + n
    return total / count if count else None


# --------------------------------------------------------------------------- answers


def answer(session: Session, prompts: list[list[dict]], *, use_adapter: bool = True, max_new_tokens: int = 64,
           batch_size: int = 16, adapter: str | None = None) -> list[str]:
    """Greedy answers to `prompts`, batched by prompt length (less left padding), in input order."""
    return [c.text for c in completions(session, prompts, use_adapter=use_adapter, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, adapter=adapter)]


def completions(session: Session, prompts: list[list[dict]], *, use_adapter: bool = True, max_new_tokens: int = 64,
                batch_size: int = 16, adapter: str | None = None) -> list:
    """`answer`'s greedy answers as Completions (a reward reads whether each ended by itself)."""
    sampling = Sampling(max_new_tokens=max_new_tokens, greedy=True)
    tok, template = session.tokenizer, session.adapter(adapter).template
    lengths = [len(template.encode_prompt(tok, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list = [None] * len(prompts)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        done = generate_batch(session, [prompts[j] for j in idx], sampling, adapter=adapter, use_adapter=use_adapter)
        for j, c in zip(idx, done):
            out[j] = c
    return out


def auto_max_new_tokens(session: Session, references: list[str], cap: int = 512) -> int:
    """Room for the longest reference plus a margin (16 tokens): long enough never to cut a right
    answer, short enough that a rambling base model does not dominate the run time."""
    if not references:
        return 64
    longest = max(len(session.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(cap, longest + 16)


class GenerationProbe:
    """train.eval_generate_rows: greedy answers to a few validation rows at every evaluation during
    training, scored like `lorakit eval` (eval_exact_match, eval_rouge_l, ... beside eval_loss in
    metrics.jsonl and TensorBoard). Loss can fall while answers stay wrong; this shows it early.

    With `rewards` (the config's grpo.rewards) each answer is also scored by them, and their
    weighted sum, averaged over the rows, is `eval_reward`: the measure of a GRPO run, and what a
    sweep or train.best_by can choose by when a reward says best what a good answer is. A reward
    reads the row's `columns` (a prompt row's, as GRPO hands them) or, for a chat row, its
    `reference`; rows without a reference are answered for the rewards only.

    It answers with the model being trained (its active adapter, not mixed per row: the fast path's
    fused LoRA layers take no `adapter_names`) and puts it back in training mode afterwards."""

    def __init__(self, tokenizer, template, examples: list[dict], batch_size: int = 16,
                 max_new_tokens: int | None = None, rewards=None, columns: list[dict] | None = None):
        self.prompts: list[list[dict]] = []
        self.references: list[str | None] = []
        self.rows: list[dict] = []
        for i, ex in enumerate(examples):
            if has_reference(ex):
                prompt, ref = split_reference(ex)
            elif rewards is not None and ex.get("messages") and ex["messages"][-1]["role"] in ("user", "tool"):
                prompt, ref = ex["messages"], None
            else:
                continue
            self.prompts.append(prompt)
            self.references.append(ref)
            row = dict(columns[i]) if columns is not None else {}
            if ref is not None:
                row.setdefault("reference", ref)
            self.rows.append(row)
        self.tokenizer, self.template, self.batch_size = tokenizer, template, batch_size
        self.rewards = rewards
        self.max_new_tokens = max_new_tokens  # None: room for the longest reference (auto_max_new_tokens)
        self.last_answers: list[str] = []

    def __call__(self, model) -> dict[str, float]:
        from lorakit.infer import Adapter

        if not self.prompts:
            return {}
        name = getattr(model, "active_adapter", "default")
        session = Session(model, self.tokenizer, {name: Adapter(name, Path("."), None, self.template, mixable=False)})
        refs = [r for r in self.references if r is not None]
        was_training = model.training
        model.eval()
        try:
            done = completions(session, self.prompts, batch_size=self.batch_size,
                               max_new_tokens=self.max_new_tokens or auto_max_new_tokens(session, refs))
        finally:
            model.train(was_training)
        answers = self.last_answers = [c.text for c in done]
        out = {}
        if refs:
            scores = M.aggregate([a for a, r in zip(answers, self.references) if r is not None], refs)
            out = {f"eval_{k}": round(float(scores[k]), 4) for k in (*M.SCORES, *M.JSON_SCORES) if k in scores}
        if self.rewards is not None:
            texts = [self.tokenizer.decode(self.template.encode_prompt(self.tokenizer, p)) for p in self.prompts]
            rows = [{**row, "finished": c.finish_reason == "stop"} for row, c in zip(self.rows, done)]
            total, _ = self.rewards.score(texts, answers, rows)
            out["eval_reward"] = round(sum(total) / len(total), 4)
        return out


def probe_for(cfg, tokenizer, prepared) -> GenerationProbe | None:
    """The probe a training run asks for (train.eval_generate_rows over its validation rows), or
    None: the factory `lorakit.train.run.train` takes as `probe`. With grpo.rewards it scores the
    answers by them too (eval_reward); a GRPO run's evaluations are this probe alone."""
    n = cfg.train.eval_generate_rows
    if n <= 0 or not prepared.validation_examples:
        return None
    rewards = columns = None
    if cfg.grpo.rewards:
        from lorakit.rewards import load_rewards

        rewards = load_rewards(cfg.grpo.rewards, Path.cwd())
    if prepared.validation and "columns" in prepared.validation[0]:  # prompt rows (GRPO): what rewards read
        columns = [it["columns"] for it in prepared.validation[:n]]
    return GenerationProbe(tokenizer, prepared.template, prepared.validation_examples[:n],
                           batch_size=cfg.train.eval_batch_size, rewards=rewards, columns=columns)


def wins(tuned: list[str], base: list[str], references: list[str], limit: int = 2) -> list[int]:
    """Indices where the tuned answer is exactly right and the base's is not (else the first ones)."""
    won = [i for i, ref in enumerate(references)
           if M.exact_match(tuned[i], ref) and not M.exact_match(base[i], ref)]
    return (won or list(range(len(references))))[:limit]


# --------------------------------------------------------------------------- a run's eval sets


@dataclass
class EvalSet:
    name: str  # 'validation', 'test' or a file stem: the eval/<name>.* files
    sources: list[str]
    items: list[dict]  # encoded as training encodes
    examples: list[dict]
    wheres: list[str] = field(default_factory=list)  # each example's file and line, for tracing a result back


def eval_sets(paths: RunPaths, session: Session, *, data: list[str] | None = None, split: str = EvalConfig.split,
              log: Callable[[str], None] = print) -> list[EvalSet]:
    """The sets to score: each --data file, else the run's validation split (re-made from its
    config, checked against the training fingerprint) or its data.test files."""
    from lorakit import config as config_mod
    from lorakit.data.dataset import encode_sources
    from lorakit.data.preference import answers, prepare_method

    template, tok = session.template, session.tokenizer
    if not paths.config.is_file():
        if not data:
            raise LorakitError(f"no config.yaml in {paths.root}: the run's data rules and splits are unknown",
                               hint="point at a run folder made by `lorakit train` (runs/<name>), or pass --data FILE")
        cfg = config_mod.Config()  # a bare adapter folder: --data files are read by the default data rules
    else:
        cfg = config_mod.load(paths.config)

    def encoded(name: str, specs: list[str], which: str) -> EvalSet:
        e = encode_sources(specs, template, tok, cfg.data, which)
        return EvalSet(name, list(specs), e.items, e.examples, e.wheres)

    if data:
        sets = []
        for spec in data:
            name = Path(spec).stem if Path(spec).suffix else Path(spec).name
            if any(s.name == name for s in sets):
                raise LorakitError(f"two --data sets are named {name!r} (eval/{name}.jsonl would be written twice)",
                                   where=spec, hint="rename one of the files")
            sets.append(encoded(name, [spec], "test"))
        return sets
    if split == "test":
        if not cfg.data.test:
            raise LorakitError("the run's config has no data.test", where=str(paths.config),
                               hint="pass --data FILE, or add data.test to the training config for later runs")
        return [encoded("test", cfg.data.test, "test")]
    if split != "validation":
        raise LorakitError(f"--split {split!r} is not 'validation' or 'test'", hint="use --split validation|test")
    if cfg.data.validation and cfg.train.method == "sft":
        return [encoded("validation", cfg.data.validation, "validation")]
    prepared = prepare_method(cfg, tok)  # the seeded split of train, as training made it
    if prepared.fingerprint != session.meta.data.fingerprint:
        log("warning: the training data changed since this run (fingerprint differs): the validation split "
            "re-made from it may overlap what was trained")
    items, examples, wheres = answers(prepared, "validation")  # a preference run: against the chosen answers
    sources = cfg.data.validation or [f"{s} (validation split)" for s in cfg.data.train]
    return [EvalSet("validation", list(sources), items, examples, wheres)]


def evaluate_set(session: Session, s: EvalSet, *, base: bool = False, max_new_tokens: int | None = None,
                 batch_size: int = EvalConfig.batch_size, loss_batch_size: int = 8, limit: int | None = None,
                 log: Callable[[str], None] = print) -> tuple[EvalSummary, list[EvalRecord]]:
    """Loss and scored greedy answers of the tuned model (and the base) on one set."""
    items, examples = s.items[:limit], s.examples[:limit]
    if not items:
        raise LorakitError(f"eval set {s.name!r} has no usable example", where=", ".join(s.sources),
                           hint="check the file's format with `lorakit data` (rows dropped as too long or empty?)")
    models = [TUNED, BASE_MODEL] if base else [TUNED]
    loss = {m: held_out_loss(session, items, use_adapter=m == TUNED, batch_size=loss_batch_size) for m in models}
    gen = [ex for ex in examples if has_reference(ex)]
    prompts, refs = (list(t) for t in zip(*map(split_reference, gen))) if gen else ([], [])
    as_json = M.json_references(refs)
    new_tokens = max_new_tokens or auto_max_new_tokens(session, refs)
    answers: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for m in models:
        if not prompts:
            break
        log(f"{s.name}: answering {len(prompts)} prompts with the {m} model ...")
        t0 = time.perf_counter()
        answers[m] = answer(session, prompts, use_adapter=m == TUNED, max_new_tokens=new_tokens, batch_size=batch_size)
        seconds[m] = time.perf_counter() - t0
    scores = {m: {k: v for k, v in M.aggregate(answers[m], refs).items() if k != "count"} for m in answers}
    records = [EvalRecord(i, p, r, {m: answers[m][i] for m in answers},
                          {m: M.score(answers[m][i], r, as_json=as_json) for m in answers})
               for i, (p, r) in enumerate(zip(prompts, refs))]
    total_s = sum(seconds.values())
    summary = EvalSummary(
        data=s.name, sources=s.sources, count=len(items), adapter=session.default.name, models=models,
        loss=loss, perplexity={m: perplexity(v) for m, v in loss.items()}, scores=scores,
        generation={"answered": len(prompts), "max_new_tokens": new_tokens, "batch_size": batch_size,
                    "greedy": True, "seconds": {m: round(v, 2) for m, v in seconds.items()},
                    "answers_per_s": round(len(prompts) * len(seconds) / total_s, 2) if total_s else None,
                    "bleu": "sacrebleu corpus BLEU, 13a tokens, case-sensitive"},
        created=now_iso())
    return summary, records


def write_results(paths: RunPaths, summary: EvalSummary, records: list[EvalRecord]) -> None:
    write_jsonl_atomic(paths.eval_records(summary.data), [r.to_dict() for r in records])
    summary.write(paths.eval_summary(summary.data))


def evaluate_run(run: str | Path, settings: EvalConfig | None = None, *, session: Session | None = None,
                 log: Callable[[str], None] = print) -> list[EvalSummary]:
    """`lorakit eval`: score each set, write eval/<set>.jsonl and .summary.json into the run folder
    (`settings`: which sets, how they are answered; the schema's `eval:` defaults when None)."""
    from lorakit.artifacts import find_adapter_dir
    from lorakit.infer import load_session

    adapter_dir = find_adapter_dir(run)
    paths = RunPaths.of(adapter_dir)
    session = session or load_session(adapter_dir, log=log)
    e = settings or EvalConfig()
    out = []
    for s in eval_sets(paths, session, data=e.data, split=e.split, log=log):
        summary, records = evaluate_set(session, s, base=e.base, max_new_tokens=e.max_new_tokens,
                                        batch_size=e.batch_size, limit=e.limit, log=log)
        write_results(paths, summary, records)
        out.append(summary)
    return out


def format_summary(summary: EvalSummary) -> str:
    cols = [m for m in (BASE_MODEL, TUNED) if m in summary.models]
    head = f"eval '{summary.data}' ({summary.count} examples, adapter {summary.adapter})"
    lines = [head, f"{'':24}" + "".join(f"{c:>12}" for c in cols)]
    for key, vals in M.table_rows(summary):
        lines.append(f"{M.LABELS[key]:24}" + "".join(f"{M.fmt_value(key, vals.get(c)):>12}" for c in cols))
    g = summary.generation
    if g.get("answers_per_s"):
        lines.append(f"{g['answered']} greedy answers per model (max {g['max_new_tokens']} new tokens, batches of "
                     f"{g['batch_size']}): {g['answers_per_s']} answers/s")
    return "\n".join(lines)


__all__ = ["BASE", "EvalSet", "GenerationProbe", "probe_for", "answer", "wins", "eval_sets", "evaluate_run", "evaluate_set",
           "format_summary", "held_out_loss", "perplexity", "split_reference", "write_results"]
