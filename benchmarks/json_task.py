"""A checkable task with JSON answers, for benchmarks/export.py: order-desk messages -> a JSON record.

    python benchmarks/json_task.py OUT_DIR        # OUT_DIR/{train,val,test}.jsonl + OUT_DIR/json_task.yaml

Each row asks for {"intent", "order", "item", "quantity"} from a customer message written from
templates x slots (products, order numbers, quantities in words or digits, typos, greetings), so
every field is checkable by `lorakit.metrics` JSON field accuracy. One seeded stream draws test,
then val, then train; a message already drawn is redrawn, so no held-out message is trained on.
The config is the demo's (SmolLM2-135M-Instruct, r 16, ChatML) on this data.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 2026
INSTRUCTION = ("Extract the order details from the customer message as JSON with the keys intent "
               "(cancel, change_quantity, status, return), order (the order number, or null), item and quantity "
               "(a number, or null).")
ITEMS = ["hiking boots", "rain jacket", "wool socks", "trail backpack", "fleece vest", "camp stove", "sleeping bag",
         "trekking poles", "sun hat", "water bottle", "down jacket", "headlamp", "tent stakes", "merino beanie"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 8: "eight", 10: "ten", 12: "twelve"}
GREETINGS = ["", "Hi, ", "Hello there. ", "Hey team, ", "Good morning! ", "Hi support, "]
SIGNOFFS = ["", " Thanks!", " Thank you.", " Cheers, Sam", " - Priya", " Appreciate it."]
TEMPLATES = {
    "cancel": ["please cancel order {order}, the {item} x{qty}.", "I want to cancel my order {order} ({qty} {item}).",
               "cancel {order} please, I ordered {qty} {item} by mistake.", "can you cancel the {item} order {order}?"],
    "change_quantity": ["on order {order} please change the {item} to {qty}.",
                        "I need {qty} {item} instead on {order}.", "update {order}: make it {qty} {item}."],
    "status": ["where is my order {order}? It has the {item} in it.", "any news on {order} with my {item}?",
               "what's the status of order {order}? ({item})", "has my {item} shipped yet? order {order}"],
    "return": ["I'd like to return the {item} from order {order}, {qty} of them.",
               "how do I send back {qty} {item}? Order {order}.", "returning the {item} ({order}), it doesn't fit."],
}
NO_ORDER = {"status": ["where are my {item}? I forgot the order number."],
            "return": ["can I return {qty} {item}? I lost the order number."]}


def _qty_text(rng: random.Random, qty: int) -> str:
    return WORDS[qty] if qty in WORDS and rng.random() < 0.5 else str(qty)


def _row(rng: random.Random) -> dict:
    intent = rng.choice(list(TEMPLATES))
    item, qty = rng.choice(ITEMS), rng.choice(list(WORDS))
    order = f"#{rng.randint(10000, 99999)}"
    with_order = not (intent in NO_ORDER and rng.random() < 0.2)
    text = rng.choice(TEMPLATES[intent] if with_order else NO_ORDER[intent])
    uses_qty = "{qty}" in text
    message = rng.choice(GREETINGS) + text.format(order=order, item=item, qty=_qty_text(rng, qty)) + rng.choice(SIGNOFFS)
    if rng.random() < 0.15:
        message = message.lower()
    answer = {"intent": intent, "order": order if with_order else None, "item": item,
              "quantity": qty if uses_qty else None}
    return {"instruction": INSTRUCTION, "input": message, "output": json.dumps(answer)}


def make(out: Path, *, train: int = 400, val: int = 40, test: int = 60) -> Path:
    rng, seen, splits = random.Random(SEED), set(), {}
    for name, n in (("test", test), ("val", val), ("train", train)):
        rows = []
        while len(rows) < n:
            row = _row(rng)
            if row["input"] not in seen:
                seen.add(row["input"])
                rows.append(row)
        splits[name] = rows
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    demo = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "demo" / "demo.yaml"
    config = demo.read_text(encoding="utf-8").replace("data/", "").replace("name: demo", "name: json-task")
    (out / "json_task.yaml").write_text(config, encoding="utf-8")
    return out / "json_task.yaml"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    print(make(p.parse_args().out))
