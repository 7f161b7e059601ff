"""The assistant domain: template text read exactly as written, disjoint from the demo corpus."""

from __future__ import annotations

import re

import pytest

from privasr.data import assistant_text as A
from privasr.data.text_sources import TextSourceError, load_sentences, normalize_text

pytestmark = pytest.mark.skipif(not (A.PROPERNAMES.exists() and A.WORDS.exists()),
                                reason="needs the Debian packages miscfiles and wamerican")


@pytest.fixture(scope="module")
def sentences():
    return load_sentences(("assistant",), min_words=A.MIN_WORDS, max_words=A.MAX_WORDS)


def test_many_distinct_sentences_in_the_corpus_alphabet(sentences):
    assert len(sentences) == len(set(sentences)) >= 100_000
    alphabet = re.compile(r"^[a-z']+( [a-z']+)*$")
    for s in sentences:
        assert alphabet.match(s) and normalize_text(s) == s, s
        assert A.MIN_WORDS <= len(s.split()) <= A.MAX_WORDS, s
    assert A.assistant_sentences(500) == A.assistant_sentences(500)      # deterministic


def test_the_families_people_say_to_assistants_occur(sentences):
    text = "\n".join(sentences[:20_000])
    for needle in ("call ", "send ", " dollars and ", "remind me to ", " o'clock",
                   "my account number is ", "dear ", "navigate to ", " of march"):
        assert needle in text, needle
    assert not re.search(r"\d", text)


@pytest.mark.parametrize("n,words", [(0, "zero"), (13, "thirteen"), (40, "forty"),
                                     (72, "seventy two"), (300, "three hundred"),
                                     (915, "nine hundred and fifteen")])
def test_numbers_are_spelled_out(n, words):
    assert A.spell_number(n) == words


def test_digits_are_read_one_by_one():
    assert A.spell_digits("4027") == "four zero two seven"
    with pytest.raises(ValueError):
        A.spell_number(1000)


def test_a_missing_word_list_names_its_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(A, "PROPERNAMES", tmp_path / "nope.gz")
    with pytest.raises(TextSourceError, match="miscfiles"):
        A.assistant_sentences(10)


def test_assistant_speakers_are_not_demo_speakers():
    from privasr.data.domains import domain_config
    from privasr.data.synth import SynthConfig, plan_corpus

    plan = plan_corpus(domain_config("assistant", hours=0.05, speakers=12))
    demo = SynthConfig()
    assert all(u.speaker.pitch > demo.pitch_range[1] for u in plan)
    assert {u.split for u in plan} == {"train", "dev", "test"}
    by_split = {s: {u.text for u in plan if u.split == s} for s in ("train", "dev", "test")}
    assert not by_split["train"] & (by_split["dev"] | by_split["test"])
    spk = {s: {u.speaker.id for u in plan if u.split == s} for s in ("train", "dev", "test")}
    assert not spk["train"] & (spk["dev"] | spk["test"])
