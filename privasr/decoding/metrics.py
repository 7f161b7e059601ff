"""Corpus-level word and character error rates (jiwer).

Rates are corpus-level: total edit operations over all utterances divided by the total
number of reference words (WER) or characters (CER), not a mean of per-utterance rates.
Text is compared as given apart from whitespace: leading/trailing spaces are stripped and
runs of spaces collapse to one (spaces count as characters for CER).  An empty
hypothesis is all deletions; an empty reference contributes its hypothesis as insertions.
"""

from __future__ import annotations

from typing import Sequence

import jiwer


def _prepare(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(refs, str) or isinstance(hyps, str):
        raise TypeError("refs and hyps must be sequences of strings, not a single string")
    refs = list(refs)
    hyps = list(hyps)
    if not refs:
        raise ValueError("error rate of an empty reference list is undefined (no references)")
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not isinstance(r, str) or not isinstance(h, str):
            raise TypeError(f"pair {i}: references and hypotheses must be str")
    norm = lambda s: " ".join(s.split())  # noqa: E731
    return [norm(r) for r in refs], [norm(h) for h in hyps]


def _counts(refs: list[str], hyps: list[str], unit: str) -> dict[str, int]:
    """Hits/substitutions/deletions/insertions summed over utterances."""
    split = str.split if unit == "word" else list
    n_ref = sum(len(split(r)) for r in refs)
    out = {"n_ref": n_ref, "hits": 0, "substitutions": 0, "deletions": 0, "insertions": 0}
    # jiwer wants non-empty references: an empty one is all insertions, handled here.
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    for r, h in zip(refs, hyps):
        if not r:
            out["insertions"] += len(split(h))
    if pairs:
        rs, hs = [p[0] for p in pairs], [p[1] for p in pairs]
        o = jiwer.process_words(rs, hs) if unit == "word" else jiwer.process_characters(rs, hs)
        out["hits"] += o.hits
        out["substitutions"] += o.substitutions
        out["deletions"] += o.deletions
        out["insertions"] += o.insertions
    return out


def _rate(c: dict[str, int], what: str) -> float:
    if c["n_ref"] == 0:
        raise ValueError(f"{what} is undefined: the references contain no "
                         f"{'words' if what == 'WER' else 'characters'}")
    return (c["substitutions"] + c["deletions"] + c["insertions"]) / c["n_ref"]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: (S + D + I) / total reference words."""
    r, h = _prepare(refs, hyps)
    return _rate(_counts(r, h, "word"), "WER")


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate: (S + D + I) / total reference characters."""
    r, h = _prepare(refs, hyps)
    return _rate(_counts(r, h, "char"), "CER")


def error_report(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """WER, CER and the word-level (and character-level) edit counts.

    Keys: wer, cer, n_utts, n_ref_words, n_hyp_words, n_ref_chars, hits,
    substitutions, deletions, insertions (word level), char_substitutions,
    char_deletions, char_insertions, sentence_error_rate.
    """
    r, h = _prepare(refs, hyps)
    w = _counts(r, h, "word")
    c = _counts(r, h, "char")
    return {
        "wer": _rate(w, "WER"),
        "cer": _rate(c, "CER"),
        "n_utts": len(r),
        "n_ref_words": w["n_ref"],
        "n_hyp_words": sum(len(x.split()) for x in h),
        "n_ref_chars": c["n_ref"],
        "hits": w["hits"],
        "substitutions": w["substitutions"],
        "deletions": w["deletions"],
        "insertions": w["insertions"],
        "char_substitutions": c["substitutions"],
        "char_deletions": c["deletions"],
        "char_insertions": c["insertions"],
        "sentence_error_rate": sum(a != b for a, b in zip(r, h)) / len(r),
    }
