"""Preference data: rows that judge answers instead of giving one answer to imitate.

DPO, ORPO and SimPO learn from pairs (one prompt, a chosen and a rejected response), KTO from
single completions marked desirable or not.  Rows become one example shape per kind, so every
preference trainer shares one prompt form, one template and one length rule:

    preference  {"prompt": [messages], "chosen": str, "rejected": str}
    kto         {"prompt": [messages], "completion": str, "label": bool}

A response is encoded as the conversation prompt + [assistant response] with the run's
template, so its tokens and labels (end-of-turn and EOS included) are exactly what supervised
fine-tuning on that answer would train.  The prompt is never trained, whatever
`data.train_on_inputs` says: these losses compare how likely the responses are, and the
prompt is the same on both sides.

Responses are never cut, because a cut answer is a different answer and the comparison would
then judge text nobody wrote.  When prompt + the longest response exceed `data.max_length`,
the prompt loses its oldest tokens instead (its end, right before the answer, is what the
answer depends on most).  At least one prompt token stays: the first response token is
predicted from the token before it, so without one it would fall out of the loss.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from lorakit.config import Config, DataConfig
from lorakit.data.dataset import DataStats, Prepared, RowNote, _as_list, fingerprint, percentiles, read_splits
from lorakit.data.formats import (_KEYS, FORMATS, PREFERENCE_FORMATS, _field, _short, _with_system, detect_format,
                                  message_list)
from lorakit.data.sources import read_rows
from lorakit.data.templates import Template, resolve_template
from lorakit.errors import DataError

KINDS = PREFERENCE_FORMATS
RESPONSES = {"preference": ("chosen", "rejected"), "kto": ("completion",)}
"""The response fields of each kind, in the order items hold them."""

Located = tuple[dict, str]


# --------------------------------------------------------------------------- rows -> examples


def to_preference_example(row: dict, kind: str, where: str) -> dict:
    """Validate one row of `kind` ('preference' or 'kto') and convert it to its example."""
    check_kind(row, kind, where)
    example: dict[str, Any] = {"prompt": _prompt(row, kind, where)}
    for key in RESPONSES[kind]:
        example[key] = _response(row, key, kind, where)
    if kind == "kto":
        example["label"] = _label(row, where)
    return example


def check_kind(row: dict, kind: str, where: str) -> None:
    """Refuse a row of another kind, naming what it looks like: one stray SFT row in a preference
    file is a mistake to fix, not a row to skip or to train some other way."""
    paired = "chosen" in row or "rejected" in row
    if kind == "preference" and paired:
        return
    if kind == "kto" and not paired and ("completion" in row or "label" in row):
        return  # a missing 'label' or 'completion' gets the precise field error
    try:
        looks = detect_format(row, where)
    except DataError:
        looks = None
    what = f"a supervised ({looks}) row" if looks in FORMATS else f"a {looks} row" if looks else "a row"
    needs = "'chosen' and 'rejected'" if kind == "preference" else "'completion' and 'label'"
    raise DataError(
        f"{what} in {kind} data: no {needs} (row keys: {', '.join(map(repr, row)) or 'none'})",
        hint=f"every {kind} row needs {_KEYS[kind]}; remove this row or give it those keys",
        where=where,
    )


def _prompt(row: dict, kind: str, where: str) -> list[dict]:
    """The conversation before the answer, from `prompt` (text or messages) or alpaca's fields."""
    has_instruction = row.get("instruction") is not None
    if has_instruction and row.get("prompt") is not None:
        raise DataError(
            "both 'prompt' and 'instruction' given: the prompt would be ambiguous",
            hint="keep one: 'prompt' (text or a list of messages) or 'instruction' (with optional 'input')",
            where=f"{where}, field 'instruction'",
        )
    if has_instruction:  # one user turn holding 'input', exactly as formats._alpaca builds it
        user = {"role": "user", "content": _field(row, "instruction", where, kind),
                "input": _field(row, "input", where, kind, required=False)}
        return _with_system([user], row, where, kind)
    if row.get("input"):
        raise DataError(
            "'input' without 'instruction': it would not reach the prompt",
            hint="give the prompt as 'instruction' + 'input', or put the input's text into 'prompt'",
            where=f"{where}, field 'input'",
        )
    value = row.get("prompt")
    if isinstance(value, list):
        messages = message_list(row, "prompt", where, kind)
        if any(m["role"] == "system" for m in messages) and row.get("system") is not None:
            raise DataError(
                "a 'system' field and a system message in 'prompt': the system prompt would be ambiguous",
                hint="keep one of them", where=f"{where}, field 'system'",
            )
        return _with_system(messages, row, where, kind)
    if value is not None and not isinstance(value, str):
        raise DataError(
            f"expected text or a list of {{role, content}} messages, got {type(value).__name__} {_short(value)}",
            hint='write the prompt as a JSON string, or as [{"role": "user", "content": "..."}]',
            where=f"{where}, field 'prompt'",
        )
    text = _field(row, "prompt", where, kind, empty_ok=True)  # missing / null: the format's keys
    return _with_system([{"role": "user", "content": text}], row, where, kind)


def _response(row: dict, key: str, kind: str, where: str) -> str:
    """A response: text, or TRL's conversational form, a list of assistant messages (joined)."""
    if not isinstance(row.get(key), list):
        return _field(row, key, where, kind)
    turns = message_list(row, key, where, kind)
    if not turns:
        raise DataError("empty: no assistant message", hint=f"give '{key}' the assistant's answer or remove the row",
                        where=f"{where}, field '{key}'")
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            raise DataError(
                f"a {turn['role']} turn in the answer: '{key}' holds only the assistant's response",
                hint="put the conversation before the answer in 'prompt' (a list of messages) and keep only "
                f'assistant messages in \'{key}\', e.g. [{{"role": "assistant", "content": "..."}}]',
                where=f"{where}, field '{key}[{i}].role'",
            )
    return "\n\n".join(turn["content"] for turn in turns)


def _label(row: dict, where: str) -> bool:
    """KTO's judgement: a JSON boolean only; 0/1 or "yes" could be a score or a typo, never guessed."""
    value = row.get("label")
    if isinstance(value, bool):
        return value
    what = "missing" if "label" not in row else "null" if value is None else \
        f"expected true or false, got {type(value).__name__} {_short(value)}"
    hint = 'write "label": true for a desirable completion or false for an undesirable one (JSON booleans)'
    if isinstance(value, str):
        hint += "; a CSV cell holds only text, so keep KTO data in JSONL, JSON or Parquet"
    raise DataError(what, hint=hint, where=f"{where}, field 'label'")


# --------------------------------------------------------------------------- encoding


@dataclass
class Encoding:
    """One example encoded, or why it was left out."""

    item: dict | None
    """None when the row is dropped (`dropped` says why)."""
    dropped: str = ""
    truncated: str = ""
    """How the prompt was cut, when it was."""
    lengths: list[int] = field(default_factory=list)
    """Tokens of each response's whole sequence before any cut."""


def encode_example(example: dict, template: Template, tokenizer: Any, max_length: int, overlong: str = "truncate",
                   where: str = "") -> Encoding:
    """Encode a preference or KTO example into its item (see the module doc for the length rule).

    Item: {"chosen": seq, "rejected": seq} or {"completion": seq, "label": bool}, where a seq is
    {"input_ids", "labels"} with labels -100 over the prompt."""
    sides = [key for key in ("chosen", "rejected", "completion") if key in example]
    if "rejected" in example and example["chosen"] == example["rejected"]:
        return Encoding(None, dropped="chosen and rejected are the same text: the pair teaches nothing")
    try:
        prompt_ids = template.encode_prompt(tokenizer, example["prompt"])
        parts = {side: _response_part(template, tokenizer, example["prompt"], prompt_ids, example[side])
                 for side in sides}
    except DataError as e:
        if e.where:
            raise
        raise DataError(e.message, e.hint, where) from None
    lengths = [len(prompt_ids) + len(ids) for ids, _ in parts.values()]
    longest_side = max(sides, key=lambda side: len(parts[side][0]))
    longest = len(parts[longest_side][0])
    truncated = ""
    if len(prompt_ids) + longest > max_length:
        too_long = f"prompt {len(prompt_ids)} + {longest_side} {longest} tokens > data.max_length {max_length}"
        if overlong == "drop":
            return Encoding(None, dropped=f"{too_long} (data.overlong: drop)", lengths=lengths)
        if longest > max_length - 1:
            return Encoding(None, lengths=lengths, dropped=(
                f"{too_long}: the {longest_side} response alone does not fit with a prompt token before it "
                "(responses are never cut)"))
        cut = _cut_prompt(prompt_ids, max_length - longest, tokenizer.bos_token_id)
        truncated = (f"prompt cut from {len(prompt_ids)} to {len(cut)} tokens (its start) to fit the "
                     f"{longest}-token {longest_side} response in data.max_length {max_length}")
        prompt_ids = cut
    item: dict[str, Any] = {side: {"input_ids": prompt_ids + ids, "labels": [-100] * len(prompt_ids) + labels}
                            for side, (ids, labels) in parts.items()}
    untrained = [side for side in sides if all(x == -100 for x in item[side]["labels"])]
    if untrained:
        return Encoding(None, dropped=f"no trained tokens in {untrained[0]} (nothing in the loss)", lengths=lengths)
    if "label" in example:
        item["label"] = example["label"]
    return Encoding(item, truncated=truncated, lengths=lengths)


def _response_part(template: Template, tokenizer: Any, prompt: list[dict], prompt_ids: list[int],
                   response: str) -> tuple[list[int], list[int]]:
    """The ids and labels after the prompt of SFT's encoding of prompt + [response]."""
    ids, labels = template.encode(tokenizer, {"messages": [*prompt, {"role": "assistant", "content": response}]})
    if ids[: len(prompt_ids)] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
        raise DataError(
            f"template '{template.name}' encodes the prompt differently when a response follows it (the prompt "
            f"alone is {len(prompt_ids)} tokens; they differ from token {at})",
            hint="the prompt rendered with add_generation_prompt=True must be the start of the rendered "
            "conversation; use data.template: chatml or alpaca, or fix the custom template",
        )
    return ids[len(prompt_ids):], labels[len(prompt_ids):]


def _cut_prompt(ids: list[int], budget: int, bos_id: int | None) -> list[int]:
    """The prompt's last tokens within `budget` (>= 1), behind its BOS when it starts with one."""
    head = ids[:1] if bos_id is not None and ids and ids[0] == bos_id else []
    keep = budget - len(head)
    return head + (ids[len(ids) - keep:] if keep > 0 else [])


def sequences(item: dict) -> list[dict]:
    """The {"input_ids", "labels"} sequences of one item (both sides of a pair)."""
    return [item[key] for key in ("chosen", "rejected", "completion") if key in item]


# --------------------------------------------------------------------------- prepare


@dataclass
class PreparedPreference(Prepared):
    """`dataset.Prepared` whose items are pairs or labelled completions; the fingerprint is over both
    sides' ids and labels (and KTO's labels) of both splits."""

    kind: str = "preference"
    """'preference' (pairs) or 'kto' (labelled completions)."""


def preference_kind(d: DataConfig) -> str | None:
    """'preference' or 'kto' when `d` holds preference data, else None (SFT, or rows that the SFT
    path will explain better); what `lorakit data` uses to choose its report."""
    try:
        return data_kind(d)
    except DataError:
        return None


def data_kind(d: DataConfig) -> str:
    """The kind declared by data.format, or detected from the first training row."""
    if d.format in KINDS:
        return d.format
    if d.format != "auto":
        raise DataError(f"data.format is {d.format!r}, not preference data",
                        hint=f"set data.format to one of {', '.join(KINDS)} or 'auto'", where="data.format")
    specs = _as_list(d.train)
    if not specs:
        raise DataError("no training data", hint="set data.train", where="data.train")
    rows = read_rows(specs[0], d.split)
    try:
        row, where = next(rows)
    except StopIteration:
        raise DataError("no rows", hint="add rows or choose another file", where=specs[0]) from None
    finally:
        rows.close()
    fmt = detect_format(row, where)
    if fmt not in KINDS:
        check_kind(row, "preference", where)  # raises, naming the row and the keys a pair needs
    return fmt


def prepare_preference(cfg: Config, tokenizer: Any) -> PreparedPreference:
    """`dataset.prepare` for preference data: the same reading, limit, seeded split and template."""
    d = cfg.data
    kind = data_kind(d)
    template = resolve_template(d.template, tokenizer, d.system_prompt)
    stats = DataStats(max_length=d.max_length, overlong=d.overlong)
    formats: Counter[str] = Counter()
    train_rows, val_rows = read_splits(cfg, lambda specs, split: _read(specs, kind, split, formats))
    stats.formats = dict(formats)
    lengths: list[int] = []
    train = _encode_split("train", train_rows, template, tokenizer, d, stats, lengths)
    validation = _encode_split("validation", val_rows, template, tokenizer, d, stats, lengths)
    stats.length_percentiles = percentiles(lengths)
    if not train[0]:
        raise _all_dropped(stats, len(train_rows))
    return PreparedPreference(
        kind=kind, train=train[0], validation=validation[0], train_examples=train[1],
        validation_examples=validation[1], template=template, stats=stats,
        fingerprint=fingerprint([_hashed(train[0]), _hashed(validation[0])]),
        train_where=train[2], validation_where=validation[2],
    )


def _read(specs: list[str], kind: str, split: str, formats: Counter[str]) -> Iterator[Located]:
    for spec in specs:
        for row, where in read_rows(spec, split):
            example = to_preference_example(row, kind, where)
            formats[kind] += 1
            yield example, where


def _encode_split(split: str, rows: list[Located], template: Template, tokenizer: Any, d: DataConfig,
                  stats: DataStats, lengths: list[int]) -> tuple[list[dict], list[dict], list[str]]:
    items, examples, wheres = [], [], []
    for example, where in rows:
        enc = encode_example(example, template, tokenizer, d.max_length, d.overlong, where)
        lengths += enc.lengths
        if enc.item is None:
            stats.dropped.append(RowNote(where, enc.dropped))
            continue
        if enc.truncated:
            stats.truncated += 1
            stats.truncated_rows.append(RowNote(where, enc.truncated))
        items.append(enc.item)
        examples.append(example)
        wheres.append(where)
    seqs = [seq for item in items for seq in sequences(item)]
    stats.rows[split] = len(rows)
    stats.counts[split] = len(items)
    stats.tokens[split] = sum(len(seq["input_ids"]) for seq in seqs)
    stats.trained_tokens[split] = sum(sum(1 for x in seq["labels"] if x != -100) for seq in seqs)
    return items, examples, wheres


def _hashed(items: list[dict]) -> list[dict]:
    """The sequences `dataset.fingerprint` hashes; a KTO label is one more (one-token) sequence,
    since flipping a label changes what is trained as surely as changing a token."""
    out = []
    for item in items:
        out += sequences(item)
        if "label" in item:
            out.append({"input_ids": [int(item["label"])], "labels": []})
    return out


def _all_dropped(stats: DataStats, n_rows: int) -> DataError:
    if not n_rows:
        return DataError("no training rows", hint="check data.train and data.limit", where="data.train")
    reasons = "\n".join(f"  {note.where}: {note.reason}" for note in stats.dropped[:3])
    return DataError(
        f"all {n_rows} training rows were dropped, e.g.:\n{reasons}",
        hint=f"fix the rows named, or raise data.max_length (the longest sequence has "
        f"{stats.length_percentiles['max']} tokens; responses are never cut)",
        where="data.train",
    )


# --------------------------------------------------------------------------- by train.method


def prepare_method(cfg: Config, tokenizer: Any):
    """The training data as `train.method` reads it: SFT examples (`dataset.prepare`), pairs for
    dpo / orpo / simpo, labelled answers for kto; a method and data of another kind are refused."""
    from lorakit.data.dataset import prepare

    if cfg.train.method == "sft":
        return prepare(cfg, tokenizer)
    if cfg.train.method == "grpo":
        from lorakit.data.prompts import prepare_prompts

        return prepare_prompts(cfg, tokenizer)
    prepared = prepare_preference(cfg, tokenizer)
    wanted = "kto" if cfg.train.method == "kto" else "preference"
    if prepared.kind != wanted:
        have = "single answers labelled good or bad (kto rows)" if prepared.kind == "kto" else \
            "{prompt, chosen, rejected} pairs"
        raise DataError(f"train.method {cfg.train.method} needs {wanted} rows, and the data holds {have}",
                        hint="set train.method: kto for labelled answers, dpo / orpo / simpo for pairs",
                        where="data.train")
    return prepared


def answers(prepared, split: str) -> tuple[list[dict], list[dict], list[str]]:
    """A split as SFT (items, examples, wheres) with the answer to imitate: a pair's chosen answer, or
    a KTO answer labelled good. What `lorakit eval` scores a preference run's validation split against."""
    items, examples = getattr(prepared, split), getattr(prepared, f"{split}_examples")
    wheres = getattr(prepared, f"{split}_where")
    if "prompt_ids" in (items[0] if items else {}):  # GRPO prompts: the rows that carry a reference answer
        kept = [(it["answer"], ex, w) for it, ex, w in zip(items, examples, wheres) if "answer" in it]
        return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
    if not isinstance(prepared, PreparedPreference):
        return items, examples, wheres
    side = "completion" if prepared.kind == "kto" else "chosen"
    kept = [(it, ex, w) for it, ex, w in zip(items, examples, wheres) if prepared.kind != "kto" or ex["label"]]
    return ([it[side] for it, _, _ in kept],
            [{"messages": [*ex["prompt"], {"role": "assistant", "content": ex[side]}]} for _, ex, _ in kept],
            [w for _, _, w in kept])
