"""Clean public-domain English sentences for an espeak-ng synthesised corpus.

The transcripts must be read by espeak-ng *exactly as written*, so that the
synthesised audio matches the text.  Every sentence is therefore normalised to
the alphabet ``[a-z' ]`` (lowercase letters, apostrophe, single spaces) and any
sentence that espeak-ng would expand differently from its written words
(digits, roman numerals, abbreviations, initials, acronyms, consonant-only
tokens it would spell out letter by letter, brackets, non-ASCII letters...) is
rejected outright rather than repaired.

Sources are Debian packages (installed in CI with ``apt-get``):

* ``kjv``   -- King James Bible via the ``bible`` command (package ``bible-kjv``).
* ``devil`` -- Ambrose Bierce's *The Devil's Dictionary* (package ``dict-devil``,
  ``/usr/share/dictd/devil.dict.dz``).  Headwords, part-of-speech tags, verse
  quotations, block quotations and attributions are dropped; only definition
  and anecdote prose is kept.

More sources can be plugged in with :func:`register_text_source`; a source is
a zero-argument callable returning *raw* sentences (or sentence-like chunks),
which :func:`load_sentences` normalises, filters by length and deduplicates.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "TEXT_SOURCES",
    "TextSourceError",
    "load_sentences",
    "normalize_text",
    "register_text_source",
    "source_available",
    "split_sentences",
]


class TextSourceError(RuntimeError):
    """A text source cannot be read (typically: its Debian package is missing)."""


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

#: name -> zero-argument callable returning raw sentences, in a stable order.
TEXT_SOURCES: dict[str, Callable[[], list[str]]] = {}
#: name -> zero-argument callable telling whether the source can be read here.
_AVAILABILITY: dict[str, Callable[[], bool]] = {}


def register_text_source(
    name: str, *, available: Callable[[], bool] | None = None
) -> Callable[[Callable[[], list[str]]], Callable[[], list[str]]]:
    """Decorator registering a raw-sentence loader under ``name``.

    The loader returns raw sentences (any case and punctuation); it should raise
    :class:`TextSourceError` with an actionable message when its data is missing.
    ``available`` optionally tells cheaply whether the loader can work; by
    default a source is considered available.
    """

    def deco(fn: Callable[[], list[str]]) -> Callable[[], list[str]]:
        TEXT_SOURCES[name] = fn
        _AVAILABILITY[name] = available if available is not None else (lambda: True)
        cached = globals().get("_normalized_source")
        if cached is not None:  # a re-registered name must not serve stale sentences
            cached.cache_clear()
        return fn

    return deco


def _check_name(name: str) -> None:
    if name not in TEXT_SOURCES:
        valid = ", ".join(sorted(TEXT_SOURCES))
        raise ValueError(f"unknown text source {name!r}; valid sources: {valid}")


def source_available(name: str) -> bool:
    """True when source ``name`` can be read on this machine (package installed)."""
    _check_name(name)
    try:
        return bool(_AVAILABILITY[name]())
    except Exception:  # noqa: BLE001 - availability probes must never raise
        return False


# --------------------------------------------------------------------------- #
# Normalisation
# --------------------------------------------------------------------------- #

# Abbreviations that are never English words as bare tokens; also the tokens
# after which a full stop does not end a sentence (so that the sentence keeps
# an internal "." and is rejected by normalize_text).
_ABBREVIATIONS = frozenset(
    """
    mr mrs ms messrs mme mlle dr st jr sr esq rev revd hon gen col capt lt lieut
    sgt cpl maj prof gov pres supt bros ltd inc corp co vs viz etc cf ibid
    vol vols pp ff lbs lb oz ft mt eds
    """.split()
)
# A full stop after these does not end a sentence ("Mr. Smith", "lib. II").
_NO_SPLIT_AFTER = _ABBREVIATIONS | frozenset("no nos ch chap fig lib ed op cit loc seq ult inst prox".split())

# KJV prints the divine name in small capitals ("LORD", "GOD"): lower-case them.
# Any other ALL-CAPS word is an acronym / heading and rejects the sentence.
_SMALL_CAPS = frozenset({"LORD", "LORDS", "LORD'S", "GOD", "GOD'S", "JEHOVAH", "JAH"})

# Single-letter words espeak-ng reads as words rather than as letter names.
_SINGLE_LETTER_WORDS = frozenset({"a", "i", "o"})

# Strict (canonical) roman numeral of >= 2 letters; espeak-ng reads e.g. "vi",
# "ii" or "xiv" as numbers even in lower case.
_ROMAN_RE = re.compile(r"^(?=[mdclxvi]{2,}$)m{0,4}(cm|cd|d?c{0,3})(xc|xl|l?x{0,3})(ix|iv|v?i{0,3})$")
# Canonical roman numerals that are ordinary English words (espeak reads them
# as words): keep them.
_ROMAN_WORDS = frozenset({"mix", "dix", "lix", "civ", "mid", "dim", "mild", "lid"})

# Words espeak-ng 1.51 mangles (spells out a leading consonant cluster, or
# reads as a roman numeral / abbreviation).  Found by running ``espeak-ng -X``
# over the vocabulary of both sources; sentences containing them are rejected.
# ("ai" -> letter names "A I", "ys" -> "Y s", "bdellium" -> "B dellium", "e'en"
# -> apostrophe read as "tick" in the trace).
_ESPEAK_BAD_WORDS = frozenset({"ai", "ys", "bdellium", "e'en"})

_QUOTE_TRANSLATION = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2014": " -- ",
        "\u2013": " -- ",
    }
)
# Characters allowed in a raw sentence; anything else (digits, brackets, &, $,
# /, non-ASCII letters, ...) rejects it.
_ALLOWED_RAW_RE = re.compile(r"^[A-Za-z\s'\"_,;:!?.\-]*$")
_TOKEN_RE = re.compile(r"^[A-Za-z]+(?:'[A-Za-z]+)*$")
_VOWEL_RE = re.compile(r"[aeiouy]")
_TERMINAL_RE = re.compile(r"[\s.?!;:,\"'_\-]+$")


@functools.lru_cache(maxsize=1 << 16)
def _normalize_token(tok: str) -> str | None:
    """Lower-cased word, ``""`` for a bare quote mark, ``None`` to reject the sentence."""
    tok = tok.strip("'")
    if not tok:
        return ""
    if not _TOKEN_RE.match(tok):
        return None
    letters = tok.replace("'", "")
    if len(letters) >= 2 and letters.isupper() and tok.upper() not in _SMALL_CAPS:
        return None  # acronym / heading in capitals
    low = tok.lower()
    if len(low) == 1 and low not in _SINGLE_LETTER_WORDS:
        return None  # a stray letter: espeak-ng says its name
    if low in _ABBREVIATIONS or low in _ESPEAK_BAD_WORDS:
        return None
    if _ROMAN_RE.match(low) and low not in _ROMAN_WORDS:
        return None
    if len(letters) >= 2 and not _VOWEL_RE.search(letters.lower()):
        return None  # no vowel: espeak-ng spells it out
    return low


def normalize_text(
    s: str, *, min_words: int | None = None, max_words: int | None = None
) -> str | None:
    """Normalise one raw sentence to ``[a-z' ]``; ``None`` if it must be rejected.

    Lowercases, removes punctuation, turns hyphens and dashes into word breaks,
    strips ``_italics_`` markers and leading/trailing quote marks, keeps
    apostrophes inside words, and collapses whitespace.  Rejects sentences with
    digits, brackets, symbols, non-ASCII letters, abbreviations (any full stop
    before the end, or a known abbreviation token), roman numerals, ALL-CAPS
    words other than KJV small capitals (``LORD``, ``GOD``), stray single
    letters, or tokens without a vowel (espeak-ng spells those out).
    ``min_words``/``max_words`` (inclusive, optional) bound the word count.
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_text expects str, got {type(s).__name__}")
    s = s.translate(_QUOTE_TRANSLATION).strip()
    # Trailing sentence punctuation and closing quotes belong to no word.
    s = _TERMINAL_RE.sub("", s)
    if not s or not _ALLOWED_RAW_RE.match(s):
        return None
    if "." in s:  # an internal full stop: abbreviation, initials, or two sentences
        return None
    s = s.replace("_", "")
    s = re.sub(r"[-,;:!?\"]", " ", s)
    words: list[str] = []
    for tok in s.split():
        word = _normalize_token(tok)
        if word is None:
            return None
        if word:
            words.append(word)
    if not words:
        return None
    if min_words is not None and len(words) < min_words:
        return None
    if max_words is not None and len(words) > max_words:
        return None
    return " ".join(words)


# Sentence ends at . ? ! ; : optionally followed by closing quotes/brackets/
# italics markers, then whitespace or end of text.
_BOUNDARY_RE = re.compile(r"[.?!;:]+[\"')\]_]*(?=\s|$)")


def split_sentences(text: str) -> list[str]:
    """Split running text on ``. ? ! ; :`` (not after abbreviations/initials).

    A full stop after an abbreviation (``Mr.``), an initial (``J.``) or a dotted
    token (``i.e.``) does not split, so that the resulting sentence keeps an
    internal full stop and is rejected by :func:`normalize_text`.
    """
    text = text.translate(_QUOTE_TRANSLATION)
    out: list[str] = []
    start = 0
    for m in _BOUNDARY_RE.finditer(text):
        if text[m.start()] == "." and m.group().rstrip("\"')]_") == ".":
            word = text[start : m.start()].split()[-1:] or [""]
            w = word[0].lstrip("\"'(_[")
            if (
                w.lower() in _NO_SPLIT_AFTER
                or (len(w) == 1 and w.isalpha() and w.isupper() and w != "I")
                or "." in w
            ):
                continue
        piece = text[start : m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


# --------------------------------------------------------------------------- #
# King James Bible (Debian package bible-kjv)
# --------------------------------------------------------------------------- #

_KJV_HINT = "install Debian package bible-kjv: apt-get install bible-kjv"
_KJV_RANGE = "Genesis1:1-Revelation22:21"
_KJV_VERSE_RE = re.compile(r"^\s+(\d+)\s+(.*)$")


def _kjv_available() -> bool:
    return shutil.which("bible") is not None


@functools.lru_cache(maxsize=1)
def _kjv_chapters() -> tuple[str, ...]:
    """The whole KJV as one string per chapter (verses joined by spaces)."""
    exe = shutil.which("bible")
    if exe is None:
        raise TextSourceError(f"text source 'kjv' needs the `bible` command; {_KJV_HINT}")
    env = dict(os.environ, LC_ALL="C", COLUMNS="0")
    try:
        proc = subprocess.run(
            [exe, "-l0", _KJV_RANGE],
            capture_output=True,
            text=True,
            encoding="latin-1",
            env=env,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TextSourceError(f"running `bible` failed ({exc}); {_KJV_HINT}") from exc
    chapters: list[list[str]] = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        m = _KJV_VERSE_RE.match(line)
        if m:
            if not chapters:
                chapters.append([])
            chapters[-1].append(m.group(2).strip())
        elif line[:1].isspace():
            # continuation of a wrapped verse (if -l0 ever stops disabling wrapping)
            if chapters and chapters[-1]:
                chapters[-1][-1] += " " + line.strip()
        else:  # chapter heading, e.g. "Genesis 1"
            chapters.append([])
    chapters = [c for c in chapters if c]
    nverses = sum(len(c) for c in chapters)
    if proc.returncode != 0 or nverses < 30000:
        err = (proc.stderr or "").strip()[:200]
        raise TextSourceError(
            f"`bible -l0 {_KJV_RANGE}` returned {nverses} verses (rc={proc.returncode}"
            f"{', ' + err if err else ''}); the KJV text data is missing or broken; "
            f"{_KJV_HINT} (data package bible-kjv-text)"
        )
    return tuple(" ".join(c) for c in chapters)


@register_text_source("kjv", available=_kjv_available)
def kjv_sentences() -> list[str]:
    """Raw sentences of the King James Bible, in canonical book order.

    Verses are joined within a chapter before splitting, so a sentence that
    runs over a verse boundary stays whole.
    """
    out: list[str] = []
    for chapter in _kjv_chapters():
        out.extend(split_sentences(chapter))
    return out


# --------------------------------------------------------------------------- #
# The Devil's Dictionary (Debian package dict-devil)
# --------------------------------------------------------------------------- #

_DEVIL_HINT = "install Debian package dict-devil: apt-get install dict-devil"
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
DEVIL_INDEX = Path("/usr/share/dictd/devil.index")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# "ABASEMENT, n.", "BABE or BABY, n.", "TZETZE (or TSETSE) FLY, n.", "LEAD,n.",
# "ABSOLUTE adj.", "ABSENT, adj."; the POS tag ends the headword.
_POS = r"(?:n\.\s?pl|n|v\.\s?t|v\.\s?i|v|adj|adv|pp|p\.p|pro|pron|prep|conj|interj|x)\."
_HEAD_POS_RE = re.compile(
    r"^[A-Z][A-Z'\- ,()]*?(?:\bor\b[A-Z'\- ,()]*?)*[\s,]*" + _POS + r"(?:\s+and\s+" + _POS + r")?(?=\s|$)"
)
# Entries without a POS tag: "ABRACADABRA.", "R.I.P.", "ALL HALLOWS?"
_HEAD_BARE_RE = re.compile(r"^[A-Z][A-Z'\- .]*[.?](?=\s|$)")


def _devil_available() -> bool:
    return DEVIL_DICT.is_file() and DEVIL_INDEX.is_file()


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


@functools.lru_cache(maxsize=1)
def _devil_entries() -> tuple[str, ...]:
    """Dictionary entries (headword line included), in file order, headers skipped."""
    if not _devil_available():
        raise TextSourceError(
            f"text source 'devil' needs {DEVIL_DICT} and {DEVIL_INDEX}; {_DEVIL_HINT}"
        )
    try:
        data = gzip.open(DEVIL_DICT, "rb").read()
        index = DEVIL_INDEX.read_text(encoding="utf-8")
    except OSError as exc:
        raise TextSourceError(f"cannot read {DEVIL_DICT} ({exc}); {_DEVIL_HINT}") from exc
    spans: set[tuple[int, int]] = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database"):
            continue  # dictd header entries (short name, info/preface/licence, url, ...)
        spans.add((_b64(parts[1]), _b64(parts[2])))
    entries = [data[o : o + n].decode("utf-8", errors="replace") for o, n in sorted(spans)]
    if len(entries) < 900:
        raise TextSourceError(f"{DEVIL_INDEX} lists only {len(entries)} entries; {_DEVIL_HINT}")
    return tuple(entries)


def _strip_headword(first_line: str) -> str:
    m = _HEAD_POS_RE.match(first_line) or _HEAD_BARE_RE.match(first_line)
    return first_line[m.end() :] if m else first_line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _devil_prose(entry: str) -> list[str]:
    """Prose paragraphs of one entry: drops headword/POS, verse, block quotes, attributions.

    Layout of the dictd text: blocks are separated by blank lines.  A block
    with at least one unindented line is prose: each line indented by at most
    4 spaces starts a paragraph, unindented lines continue it, and a line
    indented deeper starts a block quotation that is dropped together with its
    continuation lines.  A block whose lines are all indented is verse or an
    attribution ("G.J.") and is dropped entirely.
    """
    lines = entry.replace("\t", "    ").split("\n")
    if lines and lines[0].strip():
        lines[0] = _strip_headword(lines[0]).strip()  # now an unindented prose line
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line.rstrip())
        elif blocks[-1]:
            blocks.append([])
    paragraphs: list[list[str]] = []
    for block in blocks:
        if not block or all(_indent(ln) > 0 for ln in block):
            continue  # verse, attribution, or a lone indented line
        current: list[str] | None = None  # None while skipping a block quote
        for k, ln in enumerate(block):
            ind = _indent(ln)
            if ind == 0:
                if current is None and k == 0:
                    current = []
                    paragraphs.append(current)
                if current is not None:
                    current.append(ln.strip())
            elif ind <= 4:
                current = [ln.strip()]
                paragraphs.append(current)
            else:
                current = None  # deeper indent: block quotation, skipped
    out: list[str] = []
    for para in paragraphs:
        text = ""
        for ln in para:
            if not text:
                text = ln
            elif re.search(r"[A-Za-z]-$", text) and not text.endswith("--"):
                text += ln  # word hyphenated across a line break: "Brillat-\nSavarin"
            else:
                text += " " + ln
        if text.strip():
            out.append(text.strip())
    return out


@register_text_source("devil", available=_devil_available)
def devil_sentences() -> list[str]:
    """Raw sentences of the definitions and anecdotes of The Devil's Dictionary."""
    out: list[str] = []
    for entry in _devil_entries():
        for para in _devil_prose(entry):
            out.extend(split_sentences(para))
    return out


# --------------------------------------------------------------------------- #
# Public loader
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=32)
def _normalized_source(name: str) -> tuple[str, ...]:
    out: list[str] = []
    for raw in TEXT_SOURCES[name]():
        norm = normalize_text(raw)
        if norm is not None:
            out.append(norm)
    return tuple(out)


def load_sentences(
    sources: Sequence[str] = ("kjv", "devil"), *, min_words: int = 5, max_words: int = 25
) -> list[str]:
    """Clean sentences from ``sources`` (in that order), deduplicated, deterministic.

    Each returned sentence matches ``^[a-z']+( [a-z']+)*$`` and has between
    ``min_words`` and ``max_words`` words (inclusive).  Exact duplicates keep
    their first occurrence.  Raises ``ValueError`` for an unknown source name
    and :class:`TextSourceError` when a source's Debian package is missing.
    """
    if isinstance(sources, str):
        sources = (sources,)
    for name in sources:
        _check_name(name)
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    seen: set[str] = set()
    out: list[str] = []
    for name in sources:
        for sent in _normalized_source(name):
            n = sent.count(" ") + 1
            if min_words <= n <= max_words and sent not in seen:
                seen.add(sent)
                out.append(sent)
    return out
