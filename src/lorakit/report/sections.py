"""report.html's sections, each drawn from one file of the run folder (report/read.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from lorakit import artifacts
from lorakit.artifacts import ENDING_KINDS, EvalRecord, EvalSummary
from lorakit.metrics import LABELS, PERCENT, fmt_value, table_rows
from lorakit.report.charts import Series, line_chart
from lorakit.report.format import duration, esc, finite, kv_table, num, prose, size, table, value_text
from lorakit.report.read import LISTED_ROWS, ROLLOUT_STEPS, SAMPLES, RunFiles, _flatten


def _train_records(f: RunFiles) -> list[dict[str, Any]]:
    return [r for r in f.metrics if "loss" in r and "step" in r]


def _eval_records(f: RunFiles) -> list[dict[str, Any]]:
    return [r for r in f.metrics if "eval_loss" in r and "step" in r]


def _final_record(f: RunFiles) -> dict[str, Any]:
    return next((r for r in reversed(f.metrics) if "train_runtime" in r), {})


def _status(f: RunFiles) -> tuple[str, str]:
    """(css class, sentence): how the run ended, as far as the folder tells."""
    stopped = [d for d in f.diagnostics or [] if d.kind in ENDING_KINDS]
    if stopped:
        d = stopped[-1]
        at = f" at step {d.step}" if d.step is not None else ""
        return "bad", f"stopped{at}: {(d.message.splitlines() or [d.kind])[0]}"
    if f.meta is not None:
        return "good", "finished: adapter saved"
    if (f.paths.adapter / artifacts.PEFT_CONFIG).is_file():
        return "good", "finished: adapter saved (its lorakit.json is unreadable)"
    last = max((r["step"] for r in f.metrics if finite(r.get("step"))), default=None)
    return "bad", "not finished: no adapter" + (f" (last log at step {last})" if last is not None else "")


def _summary(f: RunFiles) -> str:
    m = f.meta.metrics if f.meta else {}
    train, evals, final = _train_records(f), _eval_records(f), _final_record(f)
    steps = m.get("steps", max((r["step"] for r in f.metrics if finite(r.get("step"))), default=None))
    cfg_steps = f.config.train.max_steps if f.config is not None and f.config.train.max_steps > 0 else None
    eval_start = m.get("eval_loss_start", evals[0]["eval_loss"] if evals else None)
    eval_end = m.get("eval_loss", evals[-1]["eval_loss"] if evals else None)
    eval_text = "—"
    if eval_start is not None or eval_end is not None:
        eval_text = f"{num(eval_start)} → {num(eval_end)}"
        if finite(eval_start) and finite(eval_end) and eval_start:
            eval_text += f" ({(eval_end - eval_start) / eval_start:+.1%})"
    tokens = m.get("trained_tokens", train[-1].get("trained_tokens") if train else None)
    tps = m.get("trained_tokens_per_s", train[-1].get("trained_tokens_per_s") if train else None)
    seconds = m.get("train_seconds", final.get("train_runtime"))
    kind = {"cuda_max_allocated": "GPU, CUDA allocator peak",
            "process_peak_rss": "CPU, process peak resident memory"}.get(m.get("peak_memory_kind"),
                                                                            m.get("peak_memory_kind"))
    peak = size(m.get("peak_memory_bytes")) + (f" ({esc(kind)})" if kind and "peak_memory_bytes" in m else "")
    rows = [
        ("steps", num(steps) + (f" of {num(cfg_steps)}" if cfg_steps and cfg_steps != steps else "")),
        ("epochs", num(m.get("epochs", train[-1].get("epoch") if train else None))),
        ("train loss (last log)", num(m.get("train_loss_last", train[-1].get("loss") if train else None))),
        ("eval loss (start → end)", eval_text),
        ("trained tokens", num(tokens) + (f" ({num(tps)} per second)" if tps is not None else "")),
        ("training time", duration(seconds)),
        ("peak memory", peak),
    ]
    if isinstance(m.get("best"), dict):  # train.best_by
        b = m["best"]
        won = "the last step" if b.get("step") == b.get("last_step") else \
            f"step {num(b.get('step'))} of {num(b.get('last_step'))} (the last step's adapter is in last/)"
        rows.append((f"adapter (train.best_by {esc(b.get('metric'))})",
                     f"{won}: the best {esc(b.get('metric'))} of the evaluations, {num(b.get('value'))}"))
    if f.meta:
        b = f.meta.base
        base = f"{esc(b.name)}"
        if b.path != b.name:
            base += f' <span class="dim">({esc(b.path)})</span>'
        base += f' <span class="dim">{esc(b.dtype)}, quantization {esc(b.quantization)}' + \
                (f", sha256 {esc(b.sha256[:12])}…" if b.sha256 else "") + "</span>"
        rows.insert(0, ("base model", base))
        rows.insert(1, ("template", esc(f.meta.template.name)))
    elif f.config is not None:
        rows.insert(0, ("base model", esc(f.config.model.name)))
        rows.insert(1, ("template", esc((f.data or {}).get("template", f.config.data.template))))
    cls, sentence = _status(f)
    return (f'<section id="summary"><h2>Summary</h2><p class="status {cls}">{esc(sentence)}</p>'
            f'{kv_table([(esc(k), v) for k, v in rows], "summary-table")}</section>')


EVAL_LOG_SKIP = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def _charts(f: RunFiles) -> str:
    if not f.metrics:
        return '<section id="charts"><h2>Training curves</h2><p class="missing">metrics.jsonl is missing or empty: ' \
               'nothing was logged.</p></section>'
    train, evals = _train_records(f), _eval_records(f)

    def pts(records, key):
        return [(r["step"], r.get(key)) for r in records if key in r]

    charts = [
        line_chart("chart-loss", "Loss", [Series("train loss", pts(train, "loss")),
                                          Series("eval loss", pts(evals, "eval_loss"), markers=True)], "loss",
                   note="Token-weighted mean over the positions with a label."),
        line_chart("chart-lr", "Learning rate", [Series("learning rate", pts(train, "learning_rate"))],
                   "learning rate"),
        line_chart("chart-grad", "Gradient norm", [Series("gradient norm", pts(train, "grad_norm"))], "norm",
                   note="Before clipping (train.max_grad_norm)."),
        line_chart("chart-speed", "Tokens per second",
                   [Series("trained tokens/s", pts(train, "trained_tokens_per_s")),
                    Series("real tokens/s", pts(train, "real_tokens_per_s"))], "tokens/s",
                   note="Running average since training began. Trained: tokens in the loss; real: every "
                        "non-padding token through the model."),
    ]
    charts += _preference_charts(train, evals, pts) + _grpo_charts(train, pts)
    # scores of greedy answers (train.eval_generate_rows); a GRPO run's evaluations have no eval_loss
    scored = [r for r in f.metrics if "step" in r and any(k.startswith("eval_") for k in r)]
    extra = sorted({k for r in scored for k, v in r.items() if k.startswith("eval_") and k not in EVAL_LOG_SKIP
                    and k.removeprefix("eval_").split("/")[0] not in PREFERENCE_FIGURES
                    and (finite(v) or v is None)})
    if extra:
        charts.append(line_chart("chart-eval-metrics", "Eval metrics",
                                 [Series(k.removeprefix("eval_"), pts(scored, k), markers=True) for k in extra],
                                 "score"))
    return f'<section id="charts"><h2>Training curves</h2><div class="charts">{"".join(charts)}</div></section>'


PREFERENCE_FIGURES = ("rewards", "logps", "kl", "log_odds_ratio")
"""The figures a preference method logs (lorakit.train.preference), charted on their own."""


def _preference_charts(train: list[dict], evals: list[dict], pts) -> list[str]:
    """Rewards and preference accuracy of a DPO / KTO / ORPO / SimPO run; none for SFT."""
    if not any("rewards/margins" in r or "rewards/chosen" in r for r in train):
        return []
    rewards = [Series(name, pts(train, f"rewards/{name}")) for name in ("chosen", "rejected", "margins")]
    rewards.append(Series("eval margins", pts(evals, "eval_rewards/margins"), markers=True))
    return [
        line_chart("chart-rewards", "Rewards", [s for s in rewards if s.points], "reward",
                   note="The method's implicit reward of the chosen and rejected answers (beta x log-ratio to the "
                        "reference for DPO / KTO, beta x mean log-prob for SimPO / ORPO), and their margin."),
        line_chart("chart-preference", "Preference accuracy",
                   [Series("train", pts(train, "rewards/accuracies")),
                    Series("eval", pts(evals, "eval_rewards/accuracies"), markers=True)], "share",
                   note="Share of pairs whose chosen answer out-scores the rejected one."),
    ]


def _grpo_charts(train: list[dict], pts) -> list[str]:
    """Rewards, the groups that taught nothing, and answer lengths of a GRPO run; none otherwise."""
    if not any("reward" in r for r in train):
        return []
    names = sorted({k for r in train for k in r if k.startswith("rewards/")})
    return [
        line_chart("chart-reward", "Reward", [Series("reward (weighted sum)", pts(train, "reward")),
                                              *[Series(n.removeprefix("rewards/"), pts(train, n)) for n in names]],
                   "reward", note="Mean over the step's answers; each reward function unweighted."),
        line_chart("chart-groups", "Groups and answers",
                   [Series("zero-spread groups", pts(train, "zero_spread_groups")),
                    Series("answers cut at the limit", pts(train, "truncated")),
                    Series("clipped tokens", pts(train, "clip_ratio"))], "share",
                   note="Zero-spread: every answer of the prompt scored the same (nothing to learn from)."),
        line_chart("chart-length", "Answer length", [Series("tokens", pts(train, "completion_length"))], "tokens"),
    ]


def _config(f: RunFiles) -> str:
    head = "<h2>Configuration</h2>"
    if f.config is None:
        name = f.paths.label(f.paths.config)
        return f'<section id="config">{head}<p class="missing">{esc(name)}: {esc(f.missing.get(name, ""))}</p></section>'
    if not f.config_diff:
        return f'<section id="config">{head}<p>Every setting is at its default.</p></section>'
    rows = [[f"<code>{esc(k)}</code>", f'<code class="dim">{esc(value_text(d))}</code>',
             f"<code>{esc(value_text(v))}</code>"] for k, d, v in f.config_diff]
    return (f'<section id="config">{head}<p>Settings that differ from the defaults, after every <code>auto</code> '
            f'was resolved (the full config is <code>config.yaml</code>).</p>'
            f'{table(["key", "default", "this run"], rows, "config", "config-diff")}</section>')


def _data(f: RunFiles) -> str:
    head = "<h2>Data</h2>"
    d = f.data
    if d is None:
        counts = ""
        if f.meta:
            counts = (f"<p>{num(f.meta.data.train_examples)} train / {num(f.meta.data.validation_examples)} "
                      f"validation examples (from lorakit.json).</p>")
        name = f.paths.label(f.paths.data)
        why = esc(f.missing.get(name, ""))
        return f'<section id="data">{head}{counts}<p class="missing">{esc(name)}: {why}</p></section>'
    splits = [s for s in ("train", "validation") if s in (d.get("counts") or {}) or s in (d.get("rows") or {})]
    rows = [[esc(s), num((d.get("rows") or {}).get(s)), num((d.get("counts") or {}).get(s)),
             num((d.get("tokens") or {}).get(s)), num((d.get("trained_tokens") or {}).get(s))] for s in splits]
    out = [head, table(["split", "rows read", "examples kept", "tokens", "tokens in the loss"], rows, "num",
                       "data-counts")]
    pct = d.get("length_percentiles") or {}
    if pct:
        cells = [[num(pct.get(k)) for k in ("p50", "p90", "p99", "max")] + [num(d.get("max_length"))]]
        out.append("<h3>Example length (tokens, before truncation)</h3>")
        out.append(table(["p50", "p90", "p99", "max", "data.max_length"], cells, "num all", "data-lengths"))
    facts = [f"template <code>{esc(d.get('template', '?'))}</code>"]
    if d.get("formats"):
        facts.append("formats " + ", ".join(f"{esc(k)} ({num(v)})" for k, v in d["formats"].items()))
    dropped, truncated = d.get("dropped") or [], d.get("truncated_rows") or []
    facts.append(f"{num(len(dropped))} dropped, {num(d.get('truncated', len(truncated)))} truncated "
                 f"(data.overlong: {esc(d.get('overlong', '?'))})")
    out.append(f"<p>{'; '.join(facts)}.</p>")
    for label, notes in (("Dropped", dropped), ("Truncated", truncated)):
        if notes:
            items = "".join(f"<li><code>{esc(n.get('where', '?'))}</code>: {esc(n.get('reason', ''))}</li>"
                            for n in notes[:LISTED_ROWS] if isinstance(n, dict))
            more = f"<li>… and {num(len(notes) - LISTED_ROWS)} more</li>" if len(notes) > LISTED_ROWS else ""
            out.append(f'<p class="sub">{label}:</p><ul class="rows">{items}{more}</ul>')
    return f'<section id="data">{"".join(out)}</section>'


def _diagnostics(f: RunFiles) -> str:
    head = "<h2>Diagnostics</h2>"
    if f.diagnostics is None:
        return f'<section id="diagnostics">{head}<p class="missing">diagnostics.jsonl is missing: the run\'s ' \
               f'warnings were not recorded.</p></section>'
    if not f.diagnostics:
        return f'<section id="diagnostics">{head}<p class="good">None raised.</p></section>'
    rows = [[num(d.step) if d.step is not None else "before",
             f'<span class="kind{" bad" if d.kind in ENDING_KINDS else ""}">{esc(d.kind)}</span>',
             f'<pre class="msg">{esc(d.message)}</pre>'] for d in f.diagnostics]
    return (f'<section id="diagnostics">{head}<p>Every warning raised during the run, in order.</p>'
            f'{table(["step", "kind", "message"], rows, "diag", "diagnostics-table")}</section>')


LOWER_IS_BETTER = {"loss", "perplexity"}


def _eval_rows(s: EvalSummary) -> list[tuple[str, dict[str, Any]]]:
    return [(k, v) for k, v in table_rows(s) if any(x is not None for x in v.values())]


def _ordered(models: Iterable[str]) -> list[str]:
    """Columns left to right: base, tuned, then any other model in its own order."""
    models = list(models)
    return [m for m in ("base", "tuned") if m in models] + [m for m in models if m not in ("base", "tuned")]


def _eval_table(s: EvalSummary) -> str:
    models = _ordered(s.models)
    delta = "base" in models and "tuned" in models
    head = ["metric", *[esc(m) for m in models]] + (["Δ tuned − base"] if delta else [])
    rows = []
    for name, vals in _eval_rows(s):
        cells = [esc(LABELS.get(name, name)), *[esc(fmt_value(name, vals.get(m))) for m in models]]
        if delta:
            b, t = vals.get("base"), vals.get("tuned")
            if finite(b) and finite(t):
                better = (t < b) if name in LOWER_IS_BETTER else (t > b)
                cls = "good" if better else ("bad" if t != b else "")
                diff = f"{(t - b) * 100:+.1f} pt" if name in PERCENT else f"{t - b:+.4g}"
                cells.append(f'<span class="{cls}">{diff}</span>')
            else:
                cells.append("—")
        rows.append(cells)
    return table(head, rows, "num eval", f"eval-{s.data}")


def _prompt_html(messages: list[dict[str, Any]]) -> str:
    def text(m: dict[str, Any]) -> str:  # an Alpaca row's input travels beside the instruction
        return str(m.get("content", "")) + (f"\n\n{m['input']}" if m.get("input") else "")

    return "".join(f'<div class="turn"><span class="role">{esc(m.get("role", "?"))}</span>'
                   f'<pre class="msg">{esc(text(m))}</pre></div>'
                   for m in messages if isinstance(m, dict))


def pick_samples(records: list[EvalRecord], n: int = SAMPLES) -> list[EvalRecord]:
    """Examples where the tuned answer is exactly right and the base's is not come first (what the
    adapter learned), then ones where the two differ, then the rest, in file order."""
    def em(r: EvalRecord, model: str) -> float:
        v = (r.scores.get(model) or {}).get("exact_match")
        return float(v) if finite(v) else 0.0

    def rank(r: EvalRecord) -> int:
        if "base" in r.answers and em(r, "tuned") > em(r, "base"):
            return 0
        if "base" in r.answers and r.answers.get("base") != r.answers.get("tuned"):
            return 1
        return 2

    return sorted(records, key=lambda r: (rank(r), r.index))[:n]


def _sample(r: EvalRecord) -> str:
    rows = [("reference", f'<pre class="msg">{esc(r.reference)}</pre>')]
    for model in _ordered(r.answers):
        scores = r.scores.get(model) or {}
        em = scores.get("exact_match")
        mark = "" if em is None else (' <span class="good">✓</span>' if em else ' <span class="bad">✗</span>')
        extra = ", ".join(f"{esc(k)} {num(v, 3)}" for k, v in scores.items() if k != "exact_match")
        label = f"{esc(model)}{mark}" + (f'<br><span class="dim">{extra}</span>' if extra else "")
        rows.append((label, f'<pre class="msg">{esc(r.answers[model])}</pre>'))
    return (f'<div class="sample"><div class="prompt"><span class="dim">example {num(r.index)}</span>'
            f'{_prompt_html(r.prompt)}</div>{kv_table(rows)}</div>')


def _evals(f: RunFiles) -> str:
    head = "<h2>Evaluation</h2>"
    if not f.evals:
        why = f.missing.get(f.paths.label(f.paths.eval_dir), "no eval summary in eval/")
        return f'<section id="eval">{head}<p class="missing">{prose(why)}</p></section>'
    out = [head]
    for s, records in f.evals:
        g = s.generation or {}
        facts = [f"{num(s.count)} examples"]
        if s.sources:
            facts.append("from " + ", ".join(f"<code>{esc(x)}</code>" for x in s.sources))
        if g:
            facts.append(f"greedy answers of up to {num(g.get('max_new_tokens'))} tokens"
                         + (f", {num(g.get('answers_per_s'), 3)} answers/s" if g.get("answers_per_s") else ""))
        if s.created:
            facts.append(esc(s.created))
        out.append(f'<h3>{esc(s.data)}</h3><p>{"; ".join(facts)}.</p>')
        if "base" not in s.models:
            out.append('<p class="dim">The base model was not evaluated, so there is no comparison '
                       '(<code>lorakit eval RUN --base</code> adds it).</p>')
        out.append(_eval_table(s))
        if records:
            chosen = pick_samples(records)
            out.append(f'<h4>Sample answers ({len(chosen)} of {num(len(records))})</h4>'
                       f'<div class="samples" id="samples-{esc(s.data)}">{"".join(_sample(r) for r in chosen)}</div>')
        else:
            out.append(f'<p class="missing">eval/{esc(s.data)}.jsonl is missing: no sample answers.</p>')
    return f'<section id="eval">{"".join(out)}</section>'


def _rollouts(f: RunFiles) -> str:
    """GRPO's sampled answers with their rewards at a few steps: what the rewards were paying for."""
    records = sorted((r for r in f.rollouts if isinstance(r, dict) and r.get("samples")), key=lambda r: r.get("step", 0))
    if not records:
        return ""
    shown = records if len(records) <= ROLLOUT_STEPS else [records[0], *records[-(ROLLOUT_STEPS - 1):]]
    names = sorted({n for r in shown for s in r["samples"] for n in (s.get("rewards") or {})})
    out = [f'<h2>Sampled answers</h2><p>One prompt\'s group of answers at {len(shown)} of the {len(records)} '
           f'recorded steps (<code>rollouts.jsonl</code>), each with its reward and every reward function\'s '
           f'score; "cut" marks an answer that hit grpo.max_completion_tokens.</p>']
    for r in shown:
        rows = [[f'<pre class="msg">{esc(s.get("completion", ""))}</pre>', num(s.get("reward"), 3),
                 *[num((s.get("rewards") or {}).get(n), 3) for n in names],
                 "" if s.get("finished", True) else '<span class="bad">cut</span>'] for s in r["samples"]]
        out.append(f'<div class="sample"><h4>step {esc(r.get("step"))}</h4>'
                   f'<pre class="msg dim">{esc(r.get("prompt", ""))}</pre>'
                   f'{table(["answer", "reward", *[esc(n) for n in names], ""], rows, "num")}</div>')
    return f'<section id="rollouts">{"".join(out)}</section>'


def _merge(f: RunFiles) -> str:
    if f.merge is None:
        return ""
    rows = [(f"<code>{esc(k)}</code>", num(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
             else esc(value_text(v))) for k, v in _flatten(f.merge).items()]
    return f'<section id="merge"><h2>Merge parity check</h2><p>From <code>merge.json</code>, the last ' \
           f'<code>lorakit merge</code>.</p>{kv_table(rows, "merge-table")}</section>'


def _export_row(v: dict[str, Any]) -> list[str]:
    t = v.get("task") or {}
    passed = '<span class="good">passed</span>' if v.get("passed") else '<span class="bad">FAILED (not published)</span>'
    token = f"top-1 {num(v.get('top1_agreement'), 3)}, greedy {esc(v.get('greedy_identical'))}/{len(v.get('prompts') or [])}"
    if t:
        metric = esc(str(t.get("metric", "")).replace("_", " "))
        task = (f"{metric} {num(100 * t['reference'], 3)} % → {num(100 * t['gguf'], 3)} % (drop {num(t['drop'], 3)} "
                f"points, allowed {num(t['max_drop'], 3)}); {esc(t['changed'])}/{esc(t['rows'])} answers changed "
                f"on <code>{esc(t.get('data'))}</code>")
    else:
        task = '<span class="missing">not run</span>'
    return [f"<code>{esc(Path(str(v.get('gguf', ''))).name)}</code>", esc(v.get("type")), token, task, passed]


def _exports(f: RunFiles) -> str:
    if not f.exports:
        return ""
    rows = [_export_row(v) for v in f.exports]
    auto = "".join(
        f'<h3>--gguf auto for <code>{esc(Path(str(v.get("gguf", ""))).name)}</code></h3>' + table(
            ["type", "MiB", "imatrix", "metric", "drop", "answers changed", "top-1", "seconds", ""],
            [[esc(r["type"]), num(r["mib"], 4), "yes" if r["imatrix"] else "no",
              "-" if r.get("gguf") is None else f"{num(100 * r['gguf'], 3)} %",
              "-" if r.get("drop") is None else num(r["drop"], 3), esc(r.get("changed", "-")),
              num(r["top1_agreement"], 3), num(r["seconds"], 3), "kept" if r["passed"] else "too lossy"]
             for r in v["auto"]], "num")
        for v in f.exports if v.get("auto"))
    return ('<section id="export"><h2>GGUF exports</h2><p>From <code>export/*.verify.json</code>: each file '
            'checked in llama.cpp against the merged model in transformers, token by token on fixed prompts and '
            'on the run\'s own held-out rows (greedy answers scored with the eval metric).</p>'
            + table(["file", "type", "token-level", "task-level", "verdict"], rows, "", "export-table") + auto
            + "</section>")


def _missing(f: RunFiles) -> str:
    if not f.missing:
        return ""
    items = "".join(f"<li><code>{esc(k)}</code>: {prose(v)}</li>" for k, v in f.missing.items())
    return f'<aside id="missing"><b>Not in this run folder</b><ul>{items}</ul></aside>'
