"""The ``assistant`` text source: what people say to assistants, dictation and call centres.

Requests and dictation with personal names, amounts, dates, times and phone / account numbers
read out as words, generated from templates and word lists shipped by Debian packages:

* first names: ``/usr/share/dict/propernames.gz`` (package ``miscfiles``);
* surnames and place-like names: the capitalised words of ``/usr/share/dict/american-english``
  (package ``wamerican``) that are not first names, 3-10 ASCII letters;
* numbers, amounts, dates and times: spelled out here ("four five two seven", "twenty three
  dollars and fifty cents", "the fourth of march", "half past seven").

Every sentence is in the corpus alphabet ``[a-z' ]`` and passes ``normalize_text`` unchanged,
so espeak-ng reads exactly its transcript. The list is a pure function of the word lists:
``random.Random(0)`` fills the templates in a fixed order, duplicates are dropped, and it
stops at ``N_SENTENCES`` distinct sentences (a handful of slots already make millions).
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

from privasr.data.text_sources import TextSourceError, normalize_text, register_text_source

__all__ = ["assistant_sentences", "spell_digits", "spell_number", "N_SENTENCES"]

PROPERNAMES = Path("/usr/share/dict/propernames.gz")
WORDS = Path("/usr/share/dict/american-english")
N_SENTENCES = 120_000
MIN_WORDS, MAX_WORDS = 4, 12

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh "
             "twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth "
             "nineteenth twentieth").split()
_MONTHS = ("january february march april may june july august september october november "
           "december").split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()

_ITEMS = ["milk", "bread", "eggs", "butter", "coffee", "tea", "rice", "pasta", "apples",
          "bananas", "oranges", "tomatoes", "onions", "potatoes", "carrots", "cheese", "yogurt",
          "chicken", "salmon", "flour", "sugar", "honey", "cereal", "juice", "soap", "shampoo",
          "toothpaste", "batteries", "light bulbs", "paper towels", "dog food", "cat food",
          "flowers", "stamps", "envelopes", "a birthday card", "a present", "nappies",
          "sparkling water", "washing powder", "bin bags", "olive oil", "ice cream"]
_TASKS = ["call the dentist", "pay the rent", "water the plants", "take out the bins",
          "pick up the kids", "book the car service", "renew my passport", "feed the cat",
          "walk the dog", "send the invoice", "charge my phone", "cancel the gym membership",
          "check the oven", "lock the back door", "return the library books",
          "move the car", "call my mother", "email the landlord", "buy a present",
          "collect the parcel", "fill up the car", "take my medicine", "defrost the freezer",
          "confirm the booking", "back up my laptop", "phone the bank"]
_PLACES = ["the pharmacy", "the airport", "the station", "the office", "the hospital",
           "the school", "the library", "the supermarket", "the post office", "the gym",
           "the bank", "the hotel", "the museum", "the stadium", "the beach", "the park"]
_STREETS = ["street", "road", "avenue", "lane", "drive", "close", "square", "place"]
_ACCOUNTS = ["account", "card", "policy", "order", "booking", "reference", "member",
             "customer", "claim", "ticket"]
_PHONES = ["mobile", "home", "work", "office"]
_THANKS = ["the lovely flowers", "your kind letter", "the help last week", "dinner on friday",
           "the birthday present", "your patience", "the quick reply", "the introduction",
           "looking after the kids", "the lift to the airport"]
_PROBLEMS = ["my card was declined", "my parcel never arrived", "the bill is wrong",
             "my internet keeps dropping", "i was charged twice", "the heating is broken",
             "my flight was cancelled", "the app will not let me log in",
             "my order arrived damaged", "i lost my card"]


def spell_number(n: int) -> str:
    """0..999 as words ("three hundred and twelve")."""
    if not 0 <= n < 1000:
        raise ValueError(f"spell_number handles 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + ("" if rest == 0 else " and " + spell_number(rest))


def spell_digits(digits: str) -> str:
    """Digit by digit, as people read phone and account numbers ("four oh two" for 402 is not
    used: zero is "zero")."""
    return " ".join(_ONES[int(d)] for d in digits)


def _ordinal(day: int) -> str:
    if day <= 20:
        return _ORDINALS[day - 1]
    tens = "twenty" if day < 30 else "thirty"
    return tens + " " + _ORDINALS[day % 10 - 1] if day % 10 else tens.replace("y", "ieth")


def _amount(rng: random.Random) -> str:
    dollars = rng.choice((rng.randint(1, 99), rng.randint(100, 999)))
    unit = rng.choice(("dollars", "pounds", "euros"))
    if rng.random() < 0.5:
        return f"{spell_number(dollars)} {unit}"
    cents = spell_number(rng.randint(1, 99))
    if unit == "dollars":
        return f"{spell_number(dollars)} {unit} and {cents} cents"
    return f"{spell_number(dollars)} {unit} {cents}"


def _date(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return f"the {_ordinal(rng.randint(1, 28))} of {rng.choice(_MONTHS)}"
    if r < 0.7:
        return f"{rng.choice(_MONTHS)} {_ordinal(rng.randint(1, 28))}"
    return rng.choice(("next ", "this ", "")) + rng.choice(_DAYS)


def _time(rng: random.Random) -> str:
    h = rng.randint(1, 12)
    r = rng.random()
    if r < 0.25:
        return f"{_ONES[h]} o'clock"
    if r < 0.45:
        return f"half past {_ONES[h]}"
    if r < 0.6:
        return f"quarter past {_ONES[h]}" if rng.random() < 0.5 else f"quarter to {_ONES[h]}"
    m = rng.choice((10, 15, 20, 30, 40, 45, 50))
    return f"{_ONES[h]} {spell_number(m)}"


def _read_names() -> tuple[list[str], list[str]]:
    for path, pkg in ((PROPERNAMES, "miscfiles"), (WORDS, "wamerican")):
        if not path.exists():
            raise TextSourceError(f"text source 'assistant' needs {path}: install the Debian "
                                  f"package {pkg} (apt-get install {pkg})")
    first = {w.strip() for w in gzip.open(PROPERNAMES, "rt", encoding="utf-8", errors="replace")}
    first = {w for w in first if w.isascii() and w.isalpha() and 3 <= len(w) <= 10}
    words = WORDS.read_text(encoding="utf-8", errors="replace").split()
    last = {w for w in words if w.isascii() and w.isalpha() and w[0].isupper()
            and w[1:].islower() and 3 <= len(w) <= 10 and w not in first}
    ok = lambda w: normalize_text(w) == w.lower()  # noqa: E731 - espeak-safe single word
    return sorted(w.lower() for w in first if ok(w)), sorted(w.lower() for w in last if ok(w))


def _templates(first: list[str], last: list[str]):
    """(family, filler) pairs; a filler maps an rng to one raw sentence."""
    c = random.Random.choice

    def name(r):
        return f"{c(r, first)} {c(r, last)}" if r.random() < 0.6 else c(r, first)

    def phone(r):
        return spell_digits("".join(str(r.randint(0, 9)) for _ in range(r.choice((7, 10)))))

    def digits(r, lo=4, hi=8):
        return spell_digits("".join(str(r.randint(0, 9)) for _ in range(r.randint(lo, hi))))

    return [
        ("call", lambda r: f"call {name(r)} on {c(r, _PHONES)}"),
        ("call", lambda r: f"call {name(r)}"),
        ("call", lambda r: f"phone {c(r, first)} {c(r, last)} at {c(r, _PHONES)}"),
        ("call", lambda r: f"dial {phone(r)}"),
        ("call", lambda r: f"my number is {phone(r)}"),
        ("call", lambda r: f"save {phone(r)} as {name(r)}"),
        ("message", lambda r: f"text {c(r, first)} that i am running late"),
        ("message", lambda r: f"send a message to {name(r)} saying see you at {_time(r)}"),
        ("message", lambda r: f"tell {c(r, first)} i will be there by {_time(r)}"),
        ("message", lambda r: f"email {name(r)} about {c(r, _TASKS).split(' ', 1)[1]}"),
        ("payment", lambda r: f"send {_amount(r)} to {name(r)}"),
        ("payment", lambda r: f"pay {c(r, first)} {_amount(r)} for dinner"),
        ("payment", lambda r: f"transfer {_amount(r)} to my savings account"),
        ("payment", lambda r: f"how much did i spend at {c(r, last)}'s last {c(r, _DAYS)}"),
        ("bank", lambda r: f"my {c(r, _ACCOUNTS)} number is {digits(r)}"),
        ("bank", lambda r: f"the {c(r, _ACCOUNTS)} number is {digits(r)} please"),
        ("bank", lambda r: f"i'd like to dispute a charge of {_amount(r)}"),
        ("bank", lambda r: f"i'd like to dispute a charge of {_amount(r)} from {c(r, last)}"),
        ("bank", lambda r: f"my name is {c(r, first)} {c(r, last)} and {c(r, _PROBLEMS)}"),
        ("bank", lambda r: f"hello this is {c(r, first)} {c(r, last)} calling about my "
                           f"{c(r, _ACCOUNTS)}"),
        ("bank", lambda r: f"the last four digits are {digits(r, 4, 4)}"),
        ("bank", lambda r: f"my date of birth is {_date(r)}"),
        ("bank", lambda r: f"i want to speak to {c(r, first)} about {c(r, _PROBLEMS)}"),
        ("remind", lambda r: f"remind me to buy {c(r, _ITEMS)} on {_date(r)}"),
        ("remind", lambda r: f"remind me to {c(r, _TASKS)} at {_time(r)}"),
        ("remind", lambda r: f"remind me to {c(r, _TASKS)} on {_date(r)}"),
        ("remind", lambda r: f"add {c(r, _ITEMS)} and {c(r, _ITEMS)} to my shopping list"),
        ("calendar", lambda r: f"schedule a meeting with {name(r)} on {_date(r)}"),
        ("calendar", lambda r: f"book a table for {spell_number(r.randint(2, 9))} at "
                               f"{_time(r)} on {_date(r)}"),
        ("calendar", lambda r: f"move my appointment with {name(r)} to {_date(r)}"),
        ("calendar", lambda r: f"what time is my call with {c(r, first)} on {_date(r)}"),
        ("calendar", lambda r: f"cancel lunch with {name(r)}"),
        ("calendar", lambda r: f"set an alarm for {_time(r)}"),
        ("navigate", lambda r: f"navigate to {spell_number(r.randint(1, 999))} "
                               f"{c(r, last)} {c(r, _STREETS)}"),
        ("navigate", lambda r: f"how long to drive to {c(r, _PLACES)} in {c(r, last)}"),
        ("navigate", lambda r: f"directions to {c(r, last)} {c(r, _STREETS)}"),
        ("navigate", lambda r: f"take me to {c(r, first)}'s house"),
        ("dictation", lambda r: f"dear {c(r, first)} thank you for {c(r, _THANKS)}"),
        ("dictation", lambda r: f"hi {c(r, first)} can we meet on {_date(r)} at {_time(r)}"),
        ("dictation", lambda r: f"dear {c(r, first)} {c(r, last)} please find the invoice for "
                                f"{_amount(r)} attached"),
        ("dictation", lambda r: f"note that {c(r, first)} owes me {_amount(r)}"),
        ("dictation", lambda r: f"kind regards {c(r, first)} {c(r, last)}"),
    ]


def assistant_sentences(n: int = N_SENTENCES) -> list[str]:
    """``n`` distinct raw sentences, in a fixed order (see the module docstring)."""
    first, last = _read_names()
    if not first or not last:
        raise TextSourceError("text source 'assistant': the name lists are empty")
    families = _templates(first, last)
    rng = random.Random(0)
    seen: set[str] = set()
    out: list[str] = []
    for _ in range(20 * n):
        if len(out) >= n:
            break
        _, fill = families[rng.randrange(len(families))]
        s = fill(rng)
        if s in seen or normalize_text(s, min_words=MIN_WORDS, max_words=MAX_WORDS) != s:
            continue
        seen.add(s)
        out.append(s)
    return out


register_text_source("assistant", available=lambda: PROPERNAMES.exists() and WORDS.exists())(
    assistant_sentences)
