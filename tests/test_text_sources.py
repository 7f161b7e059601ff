"""Tests for privasr.data.text_sources (KJV + Devil's Dictionary transcripts)."""

from __future__ import annotations

import re

import pytest

from privasr.data import text_sources as ts
from privasr.data.text_sources import (
    TEXT_SOURCES,
    TextSourceError,
    load_sentences,
    normalize_text,
    register_text_source,
    source_available,
    split_sentences,
)

SENTENCE_RE = re.compile(r"^[a-z']+( [a-z']+){4,24}$")

needs_packages = pytest.mark.skipif(
    not (source_available("kjv") and source_available("devil")),
    reason="Debian packages bible-kjv and dict-devil not installed "
    "(apt-get install bible-kjv dict-devil)",
)


# --------------------------------------------------------------------------- #
# normalize_text
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("In the beginning God created the heaven and the earth.", "in the beginning god created the heaven and the earth"),
        ("And the LORD said unto Moses,", "and the lord said unto moses"),
        ("O LORD GOD, the LORD'S house!", "o lord god the lord's house"),
        ("His mercy is long-suffering; amen", "his mercy is long suffering amen"),
        ("The cynic -- a blackguard -- sneered.", "the cynic a blackguard sneered"),
        ("The king's sons' horses don't run.", "the king's sons horses don't run"),
        ("\"'Tis true,\" said he.", "tis true said he"),
        ("\u201cIt is,\u201d he said, \u2018so.\u2019", "it is he said so"),
        ("confided by _him_ to the _Cynic's Word Book_.", "confided by him to the cynic's word book"),
        ("  Lots   of\n  space\there ", "lots of space here"),
        ("What? and How? and Why", "what and how and why"),
        ("Brillat-Savarin said so", "brillat savarin said so"),
    ],
)
def test_normalize_text_accepts_and_cleans(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "He was born in 1855 in Boston.",  # digits
        "Chapter 3 begins here",
        "Mr. Smith went to Washington.",  # abbreviation with a full stop
        "Dr Jones and St Paul",  # abbreviation tokens without a full stop
        "apples, pears, etc",
        "the word, i.e. the thing",
        "Father Jape, S.J., wrote it",  # initials
        "Professor Garrett P. Servis holds",
        "King George III ruled then",  # roman numerals
        "see book iii of the work",
        "as told in lib ii of the chronicle",
        "HOLINESS TO THE LORD",  # ALL CAPS other than LORD/GOD
        "the NASA rocket flew",
        "an animal (now extinct) was here",  # brackets
        "the straiter [sic] resemblance",
        "bread & butter for all",  # symbols
        "it costs $5 today",
        "a caf\u00e9 in the town",  # non-ASCII letter
        "entrusted by A with the secrets of B",  # stray single letters
        "the sound of brr was heard",  # no vowel: spelled out by espeak
        "the men of Ai smote them",  # espeak-ng spells "ai"
        "",
        "  ...  ",
        "''",
    ],
)
def test_normalize_text_rejects(raw):
    assert normalize_text(raw) is None


def test_normalize_text_output_alphabet():
    out = normalize_text("Hark! 'Twas the LORD'S voice -- long-suffering, kind: \"so be it\".")
    assert out == "hark twas the lord's voice long suffering kind so be it"
    assert re.fullmatch(r"[a-z' ]+", out) and "  " not in out


def test_normalize_text_length_limits():
    s = "one two three four five six"
    assert normalize_text(s) == s
    assert normalize_text(s, min_words=6, max_words=6) == s
    assert normalize_text(s, min_words=7) is None
    assert normalize_text(s, max_words=5) is None


def test_split_sentences():
    text = "Let there be light: and there was light. Mr. Smith came; he left! Why? So."
    assert split_sentences(text) == [
        "Let there be light:",
        "and there was light.",
        "Mr. Smith came;",
        "he left!",
        "Why?",
        "So.",
    ]
    # "Mr." does not end a sentence, so the sentence is later rejected whole
    assert normalize_text(split_sentences(text)[2]) is None
    assert split_sentences('He said, "Go away." Then he left.') == ['He said, "Go away."', "Then he left."]


# --------------------------------------------------------------------------- #
# Registry and errors
# --------------------------------------------------------------------------- #


def test_registry_contains_builtin_sources():
    assert {"kjv", "devil"} <= set(TEXT_SOURCES)


def test_unknown_source_raises_value_error_naming_valid_ones():
    with pytest.raises(ValueError) as ei:
        load_sentences(("kjv", "shakespeare"))
    msg = str(ei.value)
    assert "shakespeare" in msg and "kjv" in msg and "devil" in msg
    with pytest.raises(ValueError, match="devil"):
        source_available("nope")


def test_bad_length_bounds():
    with pytest.raises(ValueError):
        load_sentences((), min_words=10, max_words=5)


def test_register_custom_source(monkeypatch):
    monkeypatch.setattr(ts, "TEXT_SOURCES", dict(TEXT_SOURCES))
    monkeypatch.setattr(ts, "_AVAILABILITY", dict(ts._AVAILABILITY))

    @register_text_source("_test_toy")
    def _toy() -> list[str]:
        return [
            "The quick brown fox jumps over the lazy dog.",
            "It cost 5 shillings.",  # rejected: digit
            "The quick brown fox jumps over the lazy dog!",  # duplicate after normalising
            "Too short here.",
        ]

    try:
        assert source_available("_test_toy")
        assert load_sentences(("_test_toy",)) == ["the quick brown fox jumps over the lazy dog"]
        assert load_sentences(("_test_toy",), min_words=3) == [
            "the quick brown fox jumps over the lazy dog",
            "too short here",
        ]
    finally:
        ts._normalized_source.cache_clear()


def test_missing_kjv_package_raises_actionable_error(monkeypatch):
    monkeypatch.setattr(ts.shutil, "which", lambda name: None)
    assert not source_available("kjv")
    with pytest.raises(TextSourceError, match="apt-get install bible-kjv"):
        ts._kjv_chapters.__wrapped__()  # bypass the in-process cache


def test_missing_devil_package_raises_actionable_error(monkeypatch, tmp_path):
    monkeypatch.setattr(ts, "DEVIL_DICT", tmp_path / "devil.dict.dz")
    monkeypatch.setattr(ts, "DEVIL_INDEX", tmp_path / "devil.index")
    assert not source_available("devil")
    with pytest.raises(TextSourceError, match="apt-get install dict-devil"):
        ts._devil_entries.__wrapped__()
    assert issubclass(TextSourceError, RuntimeError)


# --------------------------------------------------------------------------- #
# Real corpora (Debian packages bible-kjv, dict-devil)
# --------------------------------------------------------------------------- #


@needs_packages
def test_load_sentences_format_unique_deterministic():
    sents = load_sentences()
    assert len(sents) > 40000
    bad = [s for s in sents if not SENTENCE_RE.match(s)]
    assert not bad, bad[:5]
    assert len(set(sents)) == len(sents)
    assert load_sentences() == sents
    assert load_sentences(["kjv", "devil"]) == sents


@needs_packages
def test_both_sources_contribute():
    kjv = load_sentences(("kjv",))
    devil = load_sentences(("devil",))
    assert len(kjv) > 30000
    assert len(devil) > 1000
    assert kjv[0] == "in the beginning god created the heaven and the earth"
    assert "the grace of our lord jesus christ be with you all" in kjv
    assert "the lord is my shepherd" in kjv
    # headword "ABASEMENT, n." and the dictd header/preface are dropped
    assert devil[0] == "a decent and customary mental attitude in the presence of wealth of power"
    assert not any("wiretap" in s or "copyright" in s for s in devil)
    both = load_sentences()
    # concatenation in source order, duplicates across sources removed
    assert both[: len(kjv)] == kjv
    assert set(both) == set(kjv) | set(devil)


@needs_packages
def test_devil_drops_verse_and_attributions():
    devil = load_sentences(("devil",), min_words=1, max_words=1000)
    # verse of ABDICATION and its attribution "G.J."
    assert not any("she wisely left a throne too hot to hold her" in s for s in devil)
    assert not any(s in {"g j", "gj"} for s in devil)
    assert "an act whereby a sovereign attests his sense of the high temperature of the throne" in devil


@needs_packages
def test_length_limits_configurable():
    short = load_sentences(("kjv",), min_words=3, max_words=4)
    assert short and all(3 <= len(s.split()) <= 4 for s in short)
    assert "jesus wept" in load_sentences(("kjv",), min_words=2, max_words=2)
    assert "jesus wept" not in load_sentences(("kjv",))
