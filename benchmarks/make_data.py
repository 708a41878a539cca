"""Seeded generator of the benchmark's Alpaca data: a customer-support set whose lengths are
long-tailed like public instruction sets (Alpaca, Dolly): most rows are short, a few are
several hundred tokens long.

    python benchmarks/make_data.py [--out benchmarks/data] [--train-rows 2000] [--eval-rows 200] [--seed 0]

writes `train.jsonl` and `eval.jsonl` (rows `{"instruction", "input", "output"}`) into `--out`.
The same seed always writes the same bytes.

Six tasks, each with answers that follow from the row (so a few optimizer steps already lower
the held-out loss), mixed so that lengths spread the way public sets do. Tokens per row with
SmolLM2's tokenizer, Alpaca template + EOS, measured on the default 2,000 training rows:

    task                  share   tokens min / median / max
    policy question        30%    28 / 40 / 54        answer: 1-3 sentences
    classify a message     23%    60 / 65 / 74        answer: one category word
    reply to a message     18%    50 / 103 / 200
    extract order number   15%    48 / 52 / 61        answer: "#12345"
    write a long guide      8%    166 / 278 / 908     answer: 8-45 steps
    summarise a thread      7%    225 / 340 / 861     input: a long thread

    all rows: p50 63, p90 262, p99 659, max 908; 7.8% are over 300 tokens

The maximum stays under the recipe's max length 2048, so neither side truncates a row.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parent / "data"

CATEGORIES = {
    "shipping": ["my package has not arrived", "tracking has not moved for {days} days",
                 "the courier left my parcel at the wrong address", "delivery is {days} days late"],
    "returns": ["I want to return the {product}", "the {product} does not fit, can I send it back",
                "how do I get a return label for the {product}", "I sent the {product} back {days} days ago"],
    "billing": ["I was charged twice for order #{order}", "there is a charge of ${amount} I do not recognise",
                "my refund of ${amount} has not arrived", "the invoice shows the wrong price"],
    "account": ["I cannot log in to my account", "please change the email on my account",
                "I forgot my password and the reset link expired", "please delete my account"],
    "product": ["the {product} stopped working after {days} days", "the {product} arrived scratched",
                "does the {product} come with a warranty", "the {product} is smaller than described"],
}
PRODUCTS = ["wool sweater", "desk lamp", "coffee grinder", "hiking boots", "phone case", "rain jacket",
            "blender", "backpack", "wireless speaker", "linen shirt", "water bottle", "camping stove"]
NAMES = ["Priya", "Mateo", "Ingrid", "Kenji", "Amara", "Lucas", "Sofia", "Omar", "Hana", "Felix"]
CARRIERS = ["Northpost", "SwiftShip", "ParcelGo"]

POLICIES = {
    "return policy": ["Items can be returned within 30 days of delivery.",
                      "Returns are free for orders over $50.",
                      "Refunds reach the original payment method within 5 business days."],
    "shipping times": ["Standard shipping takes 3 to 5 business days.",
                       "Express shipping arrives in 1 to 2 business days.",
                       "Orders placed before noon ship the same day."],
    "warranty": ["Every product has a one-year warranty against defects.",
                 "The warranty covers repairs or a replacement, not accidental damage.",
                 "Keep the order number: it is your proof of purchase."],
    "payment options": ["We accept cards, bank transfer and gift cards.",
                        "Payments are charged when the order ships.",
                        "Gift cards never expire."],
    "account security": ["Passwords must have at least 12 characters.",
                         "Two-factor sign-in can be turned on under Settings.",
                         "We never ask for your password by email."],
}

GUIDE_TOPICS = ["setting up a new account", "packing an item for return", "tracking a delayed parcel",
                "caring for a wool sweater", "choosing the right hiking boots", "claiming the warranty"]
GUIDE_SENTENCES = [
    "Start by opening the order page and finding order #{order}.",
    "Check that the {product} is clean and in its original packaging.",
    "Print the label and attach it to the outside of the box.",
    "The {carrier} courier collects parcels between 9 am and 5 pm.",
    "Write down the tracking number before you hand the parcel over.",
    "If anything is unclear, our support team answers within 24 hours.",
    "Most customers finish this step in about {days} minutes.",
    "Keep the receipt until the refund of ${amount} has arrived.",
    "You will receive an email as soon as the next step is ready.",
    "Do not wash the {product} at more than 30 degrees.",
    "Try the {product} indoors first so it can still be returned.",
    "A second check after {days} days catches most problems early.",
    "Photos of any damage make a warranty claim much faster.",
    "The settings page lists every device signed in to your account.",
    "Gift cards and store credit can be combined in one payment.",
    "Each step is also described in the help centre under Guides.",
]
THREAD_SENTENCES = [
    "{name}: Hello, I ordered the {product} on order #{order}.",
    "Agent: Thank you, I can see the order in our system.",
    "{name}: The tracking page has not changed for {days} days.",
    "Agent: I have asked {carrier} for an update on the parcel.",
    "{name}: I also see a charge of ${amount} that I do not understand.",
    "Agent: That charge is the deposit, it is released after delivery.",
    "{name}: Could you send a replacement if the parcel is lost?",
    "Agent: Yes, if {carrier} confirms the loss we ship a new {product} at once.",
    "{name}: Thank you, I will wait for your email.",
    "Agent: You are welcome, I will write again within 24 hours.",
]
REPLY_OPENINGS = {
    "shipping": "I am sorry your parcel is late; I have asked {carrier} to trace it today.",
    "returns": "Of course, I have emailed you a free return label for the {product}.",
    "billing": "I have checked your payments and corrected the charge of ${amount}.",
    "account": "I have reset your sign-in so you can choose a new password now.",
    "product": "I am sorry about the {product}; a replacement is covered by the warranty.",
}
REPLY_MIDDLES = [
    "Your order number is #{order}, please keep it for reference.",
    "You will receive a confirmation email within the hour.",
    "There is nothing else you need to do for now.",
    "If the problem comes back, reply to this message and I will help right away.",
    "As an apology, I have added a 10% discount to your next order.",
    "Our team has been told so that this does not happen again.",
]

# Mixture weights of the six tasks (see the module docstring).
TASKS = [("classify", 22), ("extract", 15), ("policy", 28), ("reply", 20), ("guide", 8), ("summary", 7)]


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "product": rng.choice(PRODUCTS), "name": rng.choice(NAMES), "carrier": rng.choice(CARRIERS),
        "order": str(rng.randint(10000, 99999)), "days": str(rng.randint(2, 21)),
        "amount": f"{rng.randint(5, 300)}.{rng.randint(0, 99):02d}",
    }


def _lognormal_count(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A count with a long right tail: lognormal around `median`, clipped to [lo, hi]."""
    return max(lo, min(hi, round(math.exp(rng.gauss(math.log(median), sigma)))))


def _message(rng: random.Random, category: str, slots: dict[str, str]) -> str:
    text = rng.choice(CATEGORIES[category]).format(**slots)
    return f"Hi, {text}. Order #{slots['order']}. - {slots['name']}"


def _row(rng: random.Random) -> dict[str, str]:
    task = rng.choices([t for t, _ in TASKS], weights=[w for _, w in TASKS])[0]
    s = _slots(rng)
    category = rng.choice(list(CATEGORIES))
    if task == "classify":
        return {"instruction": "Classify this customer message into one of: shipping, returns, billing, account, "
                               "product. Answer with the category only.",
                "input": _message(rng, category, s), "output": category}
    if task == "extract":
        return {"instruction": "Extract the order number from this message.",
                "input": _message(rng, category, s), "output": f"#{s['order']}"}
    if task == "policy":
        topic = rng.choice(list(POLICIES))
        answer = POLICIES[topic][: rng.randint(1, 3)]
        return {"instruction": f"Tell me about your {topic}.", "input": "", "output": " ".join(answer)}
    if task == "reply":
        n_in = _lognormal_count(rng, 2, 0.6, 1, 6)
        said = [rng.choice(CATEGORIES[category]).format(**s) for _ in range(n_in)]
        body = " ".join(t[0].upper() + t[1:] + "." for t in said)
        n_out = _lognormal_count(rng, 3, 0.5, 1, 8)
        middles = rng.sample(REPLY_MIDDLES, min(n_out - 1, len(REPLY_MIDDLES)))
        reply = [REPLY_OPENINGS[category].format(**s)] + [m.format(**s) for m in middles]
        return {"instruction": "Respond to this customer message.",
                "input": f"{body} - {s['name']}", "output": f"Dear {s['name']}, " + " ".join(reply)}
    if task == "guide":
        n = _lognormal_count(rng, 14, 0.55, 8, 45)
        steps = [f"Step {i + 1}. " + rng.choice(GUIDE_SENTENCES).format(**s) for i in range(n)]
        return {"instruction": f"Write a step-by-step guide to {rng.choice(GUIDE_TOPICS)}.", "input": "",
                "output": "\n".join(steps)}
    # summary: a long thread in, a short fixed-shape answer out
    n = _lognormal_count(rng, 16, 0.45, 10, 45)
    thread = "\n".join(THREAD_SENTENCES[i % len(THREAD_SENTENCES)].format(**s) for i in range(n))
    return {"instruction": "Summarise this support conversation in two sentences.", "input": thread,
            "output": f"{s['name']} asked about the late {s['product']} on order #{s['order']}. "
                      f"The agent contacted {s['carrier']} and promised an update within 24 hours."}


def generate(n: int, seed: int) -> list[dict[str, str]]:
    """`n` rows; the same (n, seed) always gives the same rows."""
    rng = random.Random(seed)
    return [_row(rng) for _ in range(n)]


def write(out: Path, train_rows: int = 2000, eval_rows: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl (seed) and eval.jsonl (seed + 1, so no shared random stream) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / TRAIN_FILE, out / EVAL_FILE
    for path, rows in zip(paths, (generate(train_rows, seed), generate(eval_rows, seed + 1))):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    train, held_out = write(a.out, a.train_rows, a.eval_rows, a.seed)
    print(f"wrote {a.train_rows} rows to {train} and {a.eval_rows} rows to {held_out}")


if __name__ == "__main__":
    main()
