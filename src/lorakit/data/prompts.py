"""Prompt rows for RL (train.method grpo): a prompt to answer and the columns rewards read.

A row gives its prompt as alpaca's `instruction` (+ `input`, `system`), a `prompt` string, or a
`prompt` / `messages` list of turns ending with a user turn; every other column (a reference
answer, a JSON schema, anything) is handed to the reward functions unchanged. A row that also
holds the answer an SFT row would (alpaca `output`, `completion`, or a final assistant turn) gets
it as `reference` unless it has a column of that name, so `exact_match` and `json_fields` work on
SFT data as it is. The prompt is encoded with the run's template exactly as generation encodes it
(`Template.encode_prompt`), which is what the rollouts are sampled from.
"""

from __future__ import annotations

from typing import Any

from lorakit.config import Config
from lorakit.data.dataset import DataStats, Prepared, percentiles, read_splits
from lorakit.data.formats import _short, message_list
from lorakit.data.sources import read_rows
from lorakit.data.templates import resolve_template
from lorakit.errors import DataError

PROMPT_KEYS = ("instruction", "input", "system", "prompt", "messages")
WHERE = "lorakit_where"
"""Row column with the file and line the row came from (reward errors name it)."""


class PreparedPrompts(Prepared):
    """`dataset.Prepared` whose items are encoded prompts with the columns the rewards read
    (`prompt_ids`, `columns`, and `answer` where the row has a reference); the fingerprint is over
    the prompts' ids of both splits."""


def to_prompt(row: dict, where: str) -> tuple[list[dict], dict]:
    """(the conversation to answer, the columns for the rewards) of one row."""
    columns = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    if "instruction" in row:
        if not isinstance(row["instruction"], str) or not row["instruction"].strip():
            raise DataError(f"expected a non-empty text, got {_short(row['instruction'])}",
                            hint="give the instruction as a string", where=f"{where}, field 'instruction'")
        turn = {"role": "user", "content": row["instruction"], "input": row.get("input") or ""}
        msgs = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [turn]
        answer = row.get("output")
    elif isinstance(row.get("prompt"), str):
        msgs = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + \
            [{"role": "user", "content": row["prompt"]}]
        answer = row.get("completion")
    elif isinstance(row.get("prompt"), list) or isinstance(row.get("messages"), list):
        key = "prompt" if isinstance(row.get("prompt"), list) else "messages"
        msgs = message_list(row, key, where, "messages")
        answer = None
        if msgs and msgs[-1]["role"] == "assistant":
            answer, msgs = msgs[-1]["content"], msgs[:-1]
        if not msgs or msgs[-1]["role"] not in ("user", "tool"):
            raise DataError("the conversation must end with a user turn (the turn the model answers)",
                            hint="end the list with a user message", where=f"{where}, field '{key}'")
    else:
        raise DataError(f"no prompt in this row (keys: {', '.join(map(repr, row)) or 'none'})",
                        hint="give 'instruction' (+ 'input'), a 'prompt' string, or a 'prompt' / 'messages' list "
                             "of turns ending with a user turn; other columns go to the rewards", where=where)
    if isinstance(answer, str) and "reference" not in columns:
        columns["reference"] = answer
    return msgs, columns


def prepare_prompts(cfg: Config, tokenizer: Any) -> PreparedPrompts:
    """The prompts of data.train (and data.validation or the seeded split), encoded with the
    template; fingerprinted so resume and eval see the same prompts."""
    import hashlib
    import json

    d = cfg.data
    template = resolve_template(d.template, tokenizer, d.system_prompt)
    located, val = read_splits(cfg, lambda specs, split: ((row, where) for spec in specs
                                                          for row, where in read_rows(spec, split)))

    def encode(rows):
        items, examples, wheres = [], [], []
        for row, where in rows:
            msgs, columns = to_prompt(row, where)
            ids = template.encode_prompt(tokenizer, msgs)
            if len(ids) >= d.max_length:
                ids = ids[-(d.max_length - 1):]  # the prompt's end, next to where the answer starts
            item = {"prompt_ids": ids, "columns": {**columns, WHERE: where}}
            example = {"messages": msgs + ([{"role": "assistant", "content": columns["reference"]}]
                                           if isinstance(columns.get("reference"), str) else [])}
            if len(example["messages"]) > len(msgs):  # a reference: eval scores the run against it
                answer_ids, labels = template.encode(tokenizer, example)
                item["answer"] = {"input_ids": answer_ids[:d.max_length], "labels": labels[:d.max_length]}
            items.append(item)
            examples.append(example)
            wheres.append(where)
        return items, examples, wheres

    train, validation = encode(located), encode(val)
    if not train[0]:
        raise DataError("no training prompts", hint="check data.train and data.limit", where="data.train")
    h = hashlib.sha256(json.dumps([[it["prompt_ids"] for it in s[0]] for s in (train, validation)]).encode())
    stats = DataStats(counts={"train": len(train[0]), "validation": len(validation[0])},
                      rows={"train": len(located), "validation": len(val)}, max_length=d.max_length,
                      length_percentiles=percentiles(len(it["prompt_ids"]) for s in (train, validation) for it in s[0]),
                      tokens={name: sum(len(it["prompt_ids"]) for it in s[0])
                              for name, s in (("train", train), ("validation", validation))})
    return PreparedPrompts(train=train[0], validation=validation[0], train_examples=train[1],
                           validation_examples=validation[1], template=template, stats=stats,
                           fingerprint=h.hexdigest(), train_where=train[2], validation_where=validation[2])
