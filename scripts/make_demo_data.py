"""Write the demo dataset: `python scripts/make_demo_data.py OUT_DIR`.

A build-time generator, kept out of the package: lorakit reads the committed output
(`src/lorakit/demo/data/`), never this script.  Regenerate the committed copy with
`python scripts/make_demo_data.py src/lorakit/demo/data`; tests/test_demo_data.py checks that
the two agree byte for byte.

Rows are Alpaca dicts (instruction / input / output) in the guide's customer-support style,
for the fictional shop Northwind Outfitters, whose fixed facts are `FACTS` below; every
free-form reply is consistent with them.  Task kinds:

- exact  (answer checkable with exact match, learnable by a 135M model in a few hundred steps):
  `route` (ticket -> one of `CATEGORIES`), `order_id` (ticket -> "#48213"),
  `policy` (question -> a one-line fact such as "30 days.").
- free   (1-3 sentence replies): delay, return_window, refund, account, product_info,
  billing_issue, shipping_info, contact.

Inputs are templates x slots (products, names, order numbers, dates, tones, typos).  One seeded
`random.Random` stream draws test, then val, then train, and a row whose (instruction, input)
pair was already drawn is redrawn, so no held-out pair occurs in train.  Output is byte-for-byte
deterministic: only lists and insertion-ordered dicts are iterated, never sets.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Callable

SEED = 1234
DATA_DIR = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "demo" / "data"
"""The committed copy of the dataset (shipped as package data)."""

SHOP = "Northwind Outfitters"
SUPPORT_EMAIL = "support@northwind.example"
FACTS = {
    "return_window": "30 days from delivery, unworn with tags, free return label",
    "free_shipping": "orders over $50; otherwise standard shipping $5.99",
    "support_hours": "9am-6pm, Monday to Friday",
    "refund_time": "5-7 business days after the return reaches the warehouse",
    "delivery_time": "standard 3-5 business days; express 1-2 business days for $14.99",
    "warranty": "1 year against defects",
    "cancel_window": "within 1 hour of placing the order",
    "ship_to": "the US and Canada only",
}
"""The shop's policies; `POLICY_QA` answers and every free-form reply agree with these."""

CATEGORIES = ["shipping", "returns", "billing", "account", "product"]

ROUTE_INSTRUCTION = (
    "Classify this customer message into one of: shipping, returns, billing, account, product. "
    "Answer with the category only."
)
ORDER_INSTRUCTION = "Extract the order number from this message."
POLICY_INSTRUCTION = f"Answer the customer's question with the {SHOP} policy, as briefly as possible."
EXACT_INSTRUCTIONS = [ROUTE_INSTRUCTION, ORDER_INSTRUCTION, POLICY_INSTRUCTION]

EXACT_KINDS = ["route", "order_id", "policy"]
FREE_KINDS = ["delay", "return_window", "refund", "account", "product_info", "billing_issue",
              "shipping_info", "contact"]

# Rows per split and kind.  Train and val are half exact, half free-form; test is exact only.
SPLITS: dict[str, dict[str, int]] = {
    "test": {"route": 25, "order_id": 20, "policy": 15},
    "val": {"route": 10, "order_id": 6, "policy": 4, "free": 20},
    "train": {"route": 70, "order_id": 50, "policy": 40, "free": 160},
}

Row = dict[str, str]

# --------------------------------------------------------------------------- slots

# name -> (material, waterproof, care).  All singular nouns, so templates need no grammar.
PRODUCTS: dict[str, tuple[str, bool, str]] = {
    "rain jacket": ("recycled nylon with a waterproof membrane", True, "machine wash cold, hang dry"),
    "hooded parka": ("waxed cotton with a waterproof lining", True, "wipe clean, re-wax once a season"),
    "rain poncho": ("coated ripstop nylon", True, "rinse and hang dry"),
    "duffel bag": ("coated polyester", True, "wipe clean with a damp cloth"),
    "fleece pullover": ("100% recycled polyester fleece", False, "machine wash cold, tumble dry low"),
    "wool beanie": ("merino wool", False, "hand wash cold, dry flat"),
    "trail backpack": ("ripstop nylon", False, "spot clean with mild soap"),
    "down vest": ("a nylon shell with 650-fill down", False, "machine wash gentle, tumble dry low"),
    "camping hammock": ("parachute nylon", False, "hand wash and air dry"),
    "sun hat": ("cotton canvas", False, "hand wash cold and air dry"),
    "flannel shirt": ("brushed organic cotton", False, "machine wash cold, tumble dry low"),
    "puffer jacket": ("a nylon shell with synthetic insulation", False, "machine wash cold, tumble dry low"),
    "sleeping bag": ("a polyester shell with synthetic fill", False, "spot clean, or wash on gentle in a front loader"),
    "softshell jacket": ("stretch nylon with a water-repellent finish", False, "machine wash cold, hang dry"),
    "merino base layer": ("merino wool", False, "machine wash cold, dry flat"),
    "windbreaker": ("lightweight nylon", False, "machine wash cold, hang dry"),
}
ITEMS = list(PRODUCTS)
NAMES = ["Maria", "James", "Aisha", "Chen", "Olivia", "Mateo", "Priya", "Lukas", "Fatima", "Noah",
         "Sofia", "Kenji", "Amara", "Liam", "Zoë", "José", "Hannah", "Omar", "Ingrid", "Dev"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLORS = ["navy", "olive", "black", "rust", "forest green", "charcoal", "sand", "burgundy"]
SIZES = ["XS", "S", "M", "L", "XL", "XXL"]
CITIES_US_CA = ["Denver", "Toronto", "Austin", "Vancouver", "Seattle", "Montreal", "Chicago", "Calgary"]
COUNTRIES = ["Canada", "the US", "Mexico", "the UK", "Germany", "Australia", "Japan", "France"]
PROMO = ["TRAIL10", "SPRING15", "WELCOME5", "HIKE20", "CAMP25", "FALL10"]
EMAIL_DOMAINS = ["mail.example", "inbox.example", "post.example"]

GREETINGS = ["", "", "Hi,", "Hello,", "Hey there,", "Good morning,", "Hi Northwind team,", "Hello support,",
             "URGENT:", "Quick question:"]
CLOSINGS = ["", "", "Thanks.", "Thank you!", "Please help.", "Any update would be appreciated.",
            "This is really frustrating.", "Thanks in advance!", "Please get back to me soon."]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"


def _order(rng: random.Random) -> int:
    return rng.randint(10000, 99999)


def _price(rng: random.Random, lo: int = 12, hi: int = 240) -> str:
    return f"{rng.randint(lo, hi)}.{rng.choice(['00', '50', '95', '99'])}"


def _email(rng: random.Random, name: str) -> str:
    # Names with accents are transliterated so addresses stay plain ASCII.
    local = name.lower().replace("ë", "e").replace("é", "e") + str(rng.randint(1, 99))
    return f"{local}@{rng.choice(EMAIL_DOMAINS)}"


def _typo(rng: random.Random, text: str) -> str:
    """Swap two inner letters of one alphabetic word of 4+ letters (digits are never touched)."""
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    w = words[i]
    j = rng.randint(1, len(w) - 3)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def _ticket(rng: random.Random, body: str, *, noisy: bool = True) -> str:
    """Wrap a message body in a greeting, closing and signature, then add tone and typos."""
    greeting = rng.choice(GREETINGS)
    if greeting.endswith(",") and not (body.startswith("I ") or body.startswith("I'")):
        body = body[0].lower() + body[1:]  # "Hi, my order ..." reads as one sentence
    text = " ".join(p for p in [greeting, body, rng.choice(CLOSINGS)] if p)
    if noisy:
        if rng.random() < 0.2:
            text = _typo(rng, text)
        if rng.random() < 0.15:
            text = text.lower()
        if rng.random() < 0.1:
            text = text.rstrip(".!")
    if rng.random() < 0.35:
        text += f" - {rng.choice(NAMES)}"
    return text


def _hi(name: str | None, reply: str) -> str:
    """Prefix "Hi NAME, " to a reply, lower-casing its first word unless it is "I"."""
    if not name:
        return reply
    first = reply.split(" ", 1)[0]
    if not (first == "I" or first.startswith("I'")):
        reply = reply[0].lower() + reply[1:]
    return f"Hi {name}, {reply}"


# --------------------------------------------------------------------------- exact tasks

ROUTE_BODIES: dict[str, list[str]] = {
    "shipping": [
        "Where is my {item}? I ordered it on {date} and it still hasn't shown up.",
        "Tracking for order #{n} hasn't updated in {k} days.",
        "The courier says my package was delivered but it's not at my door.",
        "How long does delivery to {city} usually take?",
        "Can you ship my order faster? I need the {item} by {weekday}.",
        "My parcel has been stuck in transit since {weekday}.",
        "Do you deliver to {city}? I want to order {a_item}.",
        "The tracking link for my {item} says 'label created' for {k} days now.",
        "My package went to my old address in {city}, can the carrier reroute it?",
        "When will my order #{n} arrive? The delivery estimate keeps changing.",
    ],
    "returns": [
        "I'd like to return the {item}, it doesn't fit.",
        "How do I send back {a_item} I got as a gift?",
        "Can I exchange my {item} for a size {size}?",
        "I need a return label for order #{n}.",
        "The {item} isn't what I expected and I want to send it back.",
        "I dropped off my return at the post office on {date}, has it been received?",
        "Can I return the {item} I bought on sale?",
        "The {color} {item} looks different from the photos, I want to return it.",
        "I ordered two sizes of the {item} and want to send one back.",
        "What's the process to return {a_item} that's still unworn with tags?",
    ],
    "billing": [
        "I was charged twice for order #{n}.",
        "My card was declined at checkout but ${price} still left my account.",
        "The promo code {code} didn't apply to my total.",
        "Can I get an invoice for my purchase of {a_item}?",
        "Why was I charged ${price} when the {item} was listed at ${price2}?",
        "I want to change the credit card I used to pay for order #{n}.",
        "There's a charge of ${price} from Northwind on my statement that I don't recognize.",
        "The sales tax on my order looks wrong, it's way too high.",
        "Can I pay for the {item} with two gift cards?",
        "My bank shows a pending charge of ${price} from {date}.",
    ],
    "account": [
        "I can't log in, the password reset email never arrives.",
        "How do I change the email address on my account to {email}?",
        "Please delete my account and all my personal data.",
        "My account got locked after too many login attempts.",
        "I want to unsubscribe {email} from your newsletter.",
        "How can I update the phone number on my profile?",
        "I got a login alert from a device I don't recognize.",
        "I have two accounts, {email} and {email2}, can you merge them?",
        "I never received the email to verify my new account.",
        "How do I turn on two-factor authentication for my account?",
    ],
    "product": [
        "Is the {item} waterproof?",
        "What size {item} should I get if I'm usually a {size}?",
        "Is the {item} available in {color}?",
        "When will the {item} in size {size} be back in stock?",
        "How do I wash the {item}?",
        "What material is the {item} made of?",
        "Does the {item} run small or true to size?",
        "How heavy is the {item}? I want it for a long hike.",
        "Is the {color} {item} the same fabric as the {color2} one?",
        "Would the {item} be warm enough for winter camping?",
    ],
}


def _slots(rng: random.Random) -> dict[str, object]:
    """One draw of every slot a template may use (unused ones are simply ignored)."""
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    c1, c2 = rng.sample(COLORS, 2)
    return {
        "item": item, "a_item": _a(item), "n": _order(rng), "k": rng.randint(2, 12),
        "date": _date(rng), "weekday": rng.choice(WEEKDAYS), "city": rng.choice(CITIES_US_CA),
        "size": rng.choice(SIZES), "color": c1, "color2": c2, "code": rng.choice(PROMO),
        "price": _price(rng), "price2": _price(rng), "name": name, "email": _email(rng, name),
        "email2": _email(rng, rng.choice(NAMES)),
    }


def route_row(rng: random.Random, category: str) -> Row:
    body = rng.choice(ROUTE_BODIES[category]).format(**_slots(rng))
    return {"instruction": ROUTE_INSTRUCTION, "input": _ticket(rng, body), "output": category}


# Each body mentions the order number exactly once, as {ref}; distractor numbers (prices,
# dates, quantities, sizes) are there so the task is "find the order number", not "copy digits".
ORDER_BODIES = [
    "I'm still waiting for {ref}, it hasn't arrived yet.",
    "{Ref} arrived today but the {item} is damaged.",
    "I was charged ${price} twice for {ref}.",
    "Can I change the delivery address on {ref}? I moved on {date}.",
    "I placed {ref} on {date} and {q} items are missing from the box.",
    "Please cancel {ref}, I ordered the wrong size ({size}).",
    "The {item} from {ref} is the wrong color, I wanted {color}.",
    "Is {ref} eligible for free shipping? The total was ${price}.",
    "I need an invoice for {ref}, paid ${price} on {date}.",
    "Tracking for {ref} hasn't moved in {k} days.",
    "I returned the {item} from {ref} {k} days ago and I'm still waiting for my refund.",
    "Could you combine {ref} with my other order from {date}?",
    "The promo code {code} didn't work on {ref}.",
    "I ordered 1 {item} but got {q} in {ref}.",
]
ORDER_REFS = ["order #{n}", "order {n}", "order number {n}", "order no. {n}", "order #{n}",
              "#{n}", "order ID {n}", "purchase #{n}"]


def order_row(rng: random.Random) -> Row:
    s = _slots(rng)
    ref = rng.choice(ORDER_REFS).format(n=s["n"])
    body = rng.choice(ORDER_BODIES).format(ref=ref, Ref=ref[0].upper() + ref[1:], q=rng.randint(2, 4), **s)
    return {"instruction": ORDER_INSTRUCTION, "input": _ticket(rng, body), "output": f"#{s['n']}"}


# fact -> (exact answer, question templates)
POLICY_QA: dict[str, tuple[str, list[str]]] = {
    "return_window": ("30 days.", [
        "How many days do I have to return {a_item}?",
        "What's your return window?",
        "How long do I have to send back the {item} if it doesn't fit?",
        "Is there a time limit on returns?",
        "How long is the return period for {item}s?",
        "Up to how many days after delivery can I return something?",
    ]),
    "free_shipping": ("Orders over $50.", [
        "When is shipping free?",
        "How much do I need to spend to get free shipping?",
        "What's the minimum order for free delivery?",
        "Do you offer free shipping on {item}s?",
        "Which orders qualify for free shipping?",
        "Is there a free shipping threshold?",
    ]),
    "support_hours": ("9am-6pm, Monday to Friday.", [
        "What are your customer support hours?",
        "When can I reach your support team?",
        "Is support open on {weekday}?",
        "What time does customer service open?",
        "When is your help desk available?",
        "Can I talk to someone about my {item} on {weekday} evening?",
    ]),
    "refund_time": ("5-7 business days.", [
        "How long do refunds take?",
        "When will I get my money back after returning the {item}?",
        "How many days until a refund shows up on my card?",
        "How fast do you process refunds?",
        "After you receive my return, how long until I'm refunded?",
        "How long does it take to get refunded for {a_item}?",
    ]),
    "delivery_time": ("3-5 business days.", [
        "How long does standard shipping take?",
        "How many days will it take for the {item} to arrive?",
        "What's the usual delivery time?",
        "If I order {a_item} today, how long until it arrives with standard shipping?",
        "How long does delivery to {city} take?",
        "How quickly do standard orders arrive?",
    ]),
    "warranty": ("1 year.", [
        "How long is the warranty on the {item}?",
        "Do your products come with a warranty? For how long?",
        "What's the warranty period?",
        "How long are defects covered?",
        "If the {item} breaks, how long am I covered?",
        "For how long is {a_item} covered against defects?",
    ]),
    "cancel_window": ("Within 1 hour.", [
        "How long do I have to cancel an order?",
        "Can I still cancel my order after placing it? Until when?",
        "What's the time limit for cancelling an order?",
        "When is it too late to cancel my {item} order?",
        "How soon after ordering do I need to cancel?",
        "Until when can an order be cancelled?",
    ]),
    "ship_to": ("The US and Canada.", [
        "Which countries do you ship to?",
        "Do you ship to {country}?",
        "Where do you deliver?",
        "Can I get {a_item} shipped to {country}?",
        "What countries can you send orders to?",
        "Do you ship internationally?",
    ]),
}
POLICY_FACTS = list(POLICY_QA)


def policy_row(rng: random.Random, fact: str) -> Row:
    answer, questions = POLICY_QA[fact]
    s = _slots(rng)
    question = rng.choice(questions).format(country=rng.choice(COUNTRIES), **s)
    return {"instruction": POLICY_INSTRUCTION, "input": _ticket(rng, question, noisy=False), "output": answer}


# --------------------------------------------------------------------------- free-form replies

def _signed(rng: random.Random, body: str) -> tuple[str, str | None]:
    """Optionally sign a free-form input; return (input, name to greet or None)."""
    if rng.random() < 0.4:
        name = rng.choice(NAMES)
        return f"{body} - {name}", name
    return body, None


def delay_row(rng: random.Random) -> Row:
    s = _slots(rng)
    n, k, item = s["n"], s["k"], s["item"]
    body = rng.choice([
        f"My order #{n} was supposed to arrive {k} days ago but tracking shows it's still in transit.",
        f"It's been {k} days past the delivery date and my {item} (order #{n}) still isn't here.",
        f"Order #{n} was due on {s['date']}. Nothing has arrived. Where is it?",
        f"I ordered {_a(item)} {k} days ago, order #{n}, and it still hasn't shipped.",
        f"Still no sign of order #{n}. I needed the {item} for a trip this {s['weekday']}.",
    ])
    text, name = _signed(rng, body)
    reply = rng.choice([
        f"I'm sorry your order #{n} is late. I've asked our carrier to trace the parcel and will email "
        f"you an update within 24 hours.",
        f"I apologize for the delay with order #{n}. It's held at a distribution center, so I've escalated "
        f"it to our logistics team; you'll hear from us within 24 hours.",
        f"Sorry for the wait on order #{n}. If it hasn't moved in 2 more business days, we'll ship a "
        f"replacement {item} at no cost.",
        f"I'm sorry about the delay. I've upgraded order #{n} to express delivery at no charge, so it should "
        f"reach you within 1-2 business days.",
    ])
    instruction = rng.choice(["Respond to this customer complaint about shipping delays.",
                              "Reply to a customer whose order is late."])
    return {"instruction": instruction, "input": text, "output": _hi(name, reply)}


def return_window_row(rng: random.Random) -> Row:
    item = rng.choice(ITEMS)
    # Days since delivery, away from the 30-day edge so every reply is unambiguous.
    d = rng.choice(list(range(3, 28)) + list(range(33, 76)))
    body = rng.choice([
        f"Can I return {_a(item)} I bought {d} days ago?",
        f"I got {_a(item)} {d} days ago and it doesn't fit. Can I still send it back?",
        f"Is it too late to return the {item}? It arrived {d} days ago.",
        f"The {item} was delivered {d} days ago and I changed my mind. Can I return it?",
    ])
    text, name = _signed(rng, body)
    if d < 30:
        reply = (f"Yes. Our return window is 30 days from delivery, so you have {30 - d} days left. "
                 f"Unworn items with tags get a free return label from your order page.")
    else:
        reply = (f"Our return window is 30 days from delivery, so an item delivered {d} days ago is outside it. "
                 f"If the {item} is defective, our 1-year warranty still covers a repair or replacement.")
    instruction = rng.choice(["Explain the return policy to a customer.",
                              "Answer this customer's question about returns."])
    return {"instruction": instruction, "input": text, "output": _hi(name, reply)}


def refund_row(rng: random.Random) -> Row:
    s = _slots(rng)
    n, item, k = s["n"], s["item"], rng.randint(2, 21)
    body = rng.choice([
        f"I returned the {item} {k} days ago. When will I get my refund?",
        f"Still waiting on my refund for order #{n}. I sent it back {k} days ago.",
        f"It's been {k} days since you got my return of the {item}. Where's my money?",
    ])
    text, name = _signed(rng, body)
    base = ("Refunds go back to your original payment method within 5-7 business days "
            "after your return reaches our warehouse.")
    if k <= 7:
        reply = f"{base} Yours is still within that window, so it should arrive soon."
    else:
        reply = (f"{base} Since it's been {k} days, I've asked the warehouse to check on your return "
                 f"and will email you today.")
    instruction = rng.choice(["Reply to this customer's question about their refund.",
                              "Respond to a customer waiting for a refund."])
    return {"instruction": instruction, "input": text, "output": _hi(name, reply)}


def account_row(rng: random.Random) -> Row:
    s = _slots(rng)
    email = s["email"]
    issue = rng.choice(["reset", "email", "delete", "locked", "newsletter"])
    if issue == "reset":
        body = rng.choice(["I forgot my password and can't log in.", "The password reset email never arrived.",
                           "How do I reset my password?"])
        reply = ("Use 'Forgot password' on the sign-in page; the reset link is valid for 24 hours. "
                 "If the email doesn't arrive within 10 minutes, check your spam folder.")
    elif issue == "email":
        body = rng.choice([f"How do I change the email on my account to {email}?",
                           f"I want to use {email} for my account instead of my old address."])
        reply = f"Go to Account > Profile, enter {email} as your new email, and confirm it from the link we send there."
    elif issue == "delete":
        body = rng.choice(["Please delete my account.", "How do I close my account and remove my data?",
                           f"Delete the account registered to {email}, please."])
        reply = ("I've started the deletion request. You'll get a confirmation email, and your account "
                 "and personal data are removed within 7 days.")
    elif issue == "locked":
        body = rng.choice(["My account is locked after too many login attempts.",
                           "It says my account is locked. What do I do?"])
        reply = ("Accounts unlock automatically after 30 minutes. You can also reset your password right "
                 "away with 'Forgot password' on the sign-in page.")
    else:
        body = rng.choice([f"Stop sending marketing emails to {email}.",
                           f"Please unsubscribe {email} from your newsletter."])
        reply = (f"Done: I've unsubscribed {email} from our newsletter. It can take up to 48 hours for "
                 f"the emails to stop.")
    text, name = _signed(rng, body)
    return {"instruction": "Help this customer with their account.", "input": text, "output": _hi(name, reply)}


def product_info_row(rng: random.Random) -> Row:
    item = rng.choice(ITEMS)
    material, waterproof, care = PRODUCTS[item]
    question = rng.choice(["waterproof", "material", "care"])
    if question == "waterproof":
        body = rng.choice([f"Is the {item} waterproof?", f"Can I use the {item} in heavy rain?"])
        reply = (f"Yes, the {item} is waterproof, so it will keep the rain out." if waterproof else
                 f"No, the {item} isn't waterproof. For wet weather, pair it with our rain jacket.")
    elif question == "material":
        body = rng.choice([f"What is the {item} made of?", f"What material is the {item}?"])
        reply = f"The {item} is made of {material}."
    else:
        body = rng.choice([f"How do I wash the {item}?", f"What are the care instructions for the {item}?"])
        reply = f"For the {item}: {care}."
    text, name = _signed(rng, body)
    return {"instruction": "Answer this customer's question about a product.", "input": text,
            "output": _hi(name, reply)}


def billing_issue_row(rng: random.Random) -> Row:
    s = _slots(rng)
    n, price, code = s["n"], s["price"], s["code"]
    issue = rng.choice(["double", "promo", "invoice", "declined"])
    if issue == "double":
        body = rng.choice([f"I was charged twice for order #{n}.", f"Order #{n} shows up twice on my card statement."])
        reply = (f"I'm sorry about that. The second charge for order #{n} is a pending authorization that drops off "
                 f"within 3-5 business days; if it doesn't, reply here and we'll refund it right away.")
    elif issue == "promo":
        body = rng.choice([f"My code {code} didn't work.", f"Why won't {code} apply at checkout?"])
        reply = (f"Promo codes apply to full-price items only and can't be combined. If your cart had full-price "
                 f"items, send me the order number and I'll apply {code} manually.")
    elif issue == "invoice":
        body = rng.choice([f"Can I get an invoice for order #{n}?",
                           f"I need a receipt for order #{n} for my expenses."])
        reply = (f"Yes. You can download the invoice for order #{n} under Orders in your account, "
                 f"or I can email it to you.")
    else:
        body = rng.choice([f"My card got declined but I was still charged ${price}.",
                           f"Checkout failed, yet my bank shows ${price} pending."])
        reply = (f"A declined payment can show as a pending hold of ${price}. Your bank releases it within "
                 f"3-5 business days, and no order was placed.")
    text, name = _signed(rng, body)
    return {"instruction": "Respond to this billing issue.", "input": text, "output": _hi(name, reply)}


def shipping_info_row(rng: random.Random) -> Row:
    s = _slots(rng)
    issue = rng.choice(["cart", "speed", "country"])
    if issue == "cart":
        total = rng.choice([rng.randint(12, 45), rng.randint(55, 240)])  # away from the $50 edge
        cents = rng.choice(["00", "50", "99"])
        body = rng.choice([f"My cart comes to ${total}.{cents}. Do I have to pay for shipping?",
                           f"Is shipping free on a ${total}.{cents} order?"])
        reply = (f"No, shipping is free on orders over $50, and your ${total}.{cents} order qualifies." if total > 50 else
                 f"Standard shipping is $5.99 because your order is under $50; orders over $50 ship free.")
    elif issue == "speed":
        body = rng.choice([f"How fast can I get the {s['item']}?", f"What are my delivery options to {s['city']}?"])
        reply = ("Standard delivery takes 3-5 business days. Express delivery takes 1-2 business days "
                 "for $14.99.")
    else:
        country = rng.choice(COUNTRIES)
        body = rng.choice([f"Do you ship to {country}?", f"Can you send {_a(s['item'])} to {country}?"])
        reply = (f"Yes, we ship to {country}. Standard delivery takes 3-5 business days."
                 if country in ("Canada", "the US") else
                 f"Sorry, we currently ship only to the US and Canada, so we can't deliver to {country}.")
    text, name = _signed(rng, body)
    return {"instruction": "Answer this customer's shipping question.", "input": text, "output": _hi(name, reply)}


def contact_row(rng: random.Random) -> Row:
    day, hour = rng.choice(WEEKDAYS), rng.randint(7, 11)
    weekend = day in ("Saturday", "Sunday")
    body, after_hours = rng.choice([
        (f"Can I call you on {day}?", weekend),
        (f"Is anyone available to chat on {day} at {hour}pm?", True),
        (f"Are you open on {day} morning?", weekend),
        ("How do I reach a real person?", False),
    ])
    text, name = _signed(rng, body)
    hours = "Our support team is available 9am-6pm, Monday to Friday."
    if weekend and after_hours:
        tail = f"On weekends, email {SUPPORT_EMAIL} and we'll reply on Monday."
    elif after_hours:
        tail = f"Outside those hours, email {SUPPORT_EMAIL} and we'll reply the next business day."
    else:
        tail = f"You can also email {SUPPORT_EMAIL} any time."
    return {"instruction": "Tell a customer when our support team is available.", "input": text,
            "output": _hi(name, f"{hours} {tail}")}


FREE_MAKERS: dict[str, Callable[[random.Random], Row]] = {
    "delay": delay_row, "return_window": return_window_row, "refund": refund_row, "account": account_row,
    "product_info": product_info_row, "billing_issue": billing_issue_row, "shipping_info": shipping_info_row,
    "contact": contact_row,
}
assert list(FREE_MAKERS) == FREE_KINDS


# --------------------------------------------------------------------------- splits

def _plan(counts: dict[str, int]) -> list[tuple[str, Callable[[random.Random], Row]]]:
    """(kind, maker) for every row of a split; within a kind, sub-classes go round-robin."""
    plan: list[tuple[str, Callable[[random.Random], Row]]] = []
    for i in range(counts.get("route", 0)):
        cat = CATEGORIES[i % len(CATEGORIES)]
        plan.append(("route", lambda rng, c=cat: route_row(rng, c)))
    plan += [("order_id", order_row)] * counts.get("order_id", 0)
    for i in range(counts.get("policy", 0)):
        fact = POLICY_FACTS[i % len(POLICY_FACTS)]
        plan.append(("policy", lambda rng, f=fact: policy_row(rng, f)))
    for i in range(counts.get("free", 0)):
        kind = FREE_KINDS[i % len(FREE_KINDS)]
        plan.append((kind, FREE_MAKERS[kind]))
    return plan


def build(seed: int = SEED) -> dict[str, list[tuple[str, Row]]]:
    """Every split as a list of (kind, row), in file order.  Pure function of `seed`."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()  # membership only, never iterated
    splits: dict[str, list[tuple[str, Row]]] = {}
    for split, counts in SPLITS.items():  # test first: held-out rows claim their pairs first
        rows = []
        for kind, make in _plan(counts):
            for _ in range(1000):
                row = make(rng)
                key = (row["instruction"], row["input"])
                if key not in seen:
                    break
            else:
                raise RuntimeError(f"demo generator: cannot draw a new unique {kind!r} row; add templates or slots")
            seen.add(key)
            if split == "test":
                row["check"] = "exact"
            rows.append((kind, row))
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def write(out_dir: Path, seed: int = SEED) -> dict[str, Counter]:
    """Write train.jsonl, val.jsonl and test.jsonl to `out_dir`; return row counts per split and kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Counter] = {}
    for split, rows in build(seed).items():
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for _, row in rows)
        (out_dir / f"{split}.jsonl").write_bytes(lines.encode("utf-8"))
        counts[split] = Counter(kind for kind, _ in rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/make_demo_data.py", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for train.jsonl, val.jsonl and test.jsonl")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED}, the committed data)")
    args = parser.parse_args(argv)
    for split, counts in write(args.out_dir, args.seed).items():
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{split}: {sum(counts.values())} rows ({detail})")


if __name__ == "__main__":
    main()
