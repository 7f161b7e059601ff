"""Corpus statistics for a list of utterances, and a small table for the CLI."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from privasr.data.manifest import Utterance

__all__ = ["corpus_stats", "format_stats"]


def corpus_stats(utts: Iterable[Utterance]) -> dict:
    """Summary numbers of a corpus.

    Keys: ``hours``, ``utterances``, ``speakers``, ``words`` (running words), ``vocabulary``
    (distinct whitespace-separated words, case-folded), ``characters`` (transcript characters,
    spaces between words included), ``mean_duration`` / ``min_duration`` / ``max_duration``
    (seconds), ``min_utts_per_speaker`` / ``max_utts_per_speaker``. An empty corpus gives zeros.
    """
    utts = list(utts)
    durations = [u.duration for u in utts]
    per_speaker = Counter(u.speaker for u in utts)
    vocab: set[str] = set()
    words = chars = 0
    for u in utts:
        toks = u.text.lower().split()
        vocab.update(toks)
        words += len(toks)
        chars += len(" ".join(toks))
    n = len(utts)
    total = sum(durations)
    return {
        "hours": total / 3600.0,
        "utterances": n,
        "speakers": len(per_speaker),
        "words": words,
        "vocabulary": len(vocab),
        "characters": chars,
        "mean_duration": total / n if n else 0.0,
        "min_duration": min(durations, default=0.0),
        "max_duration": max(durations, default=0.0),
        "min_utts_per_speaker": min(per_speaker.values(), default=0),
        "max_utts_per_speaker": max(per_speaker.values(), default=0),
    }


_LABELS = {
    "hours": ("hours", "{:.3f}"),
    "utterances": ("utterances", "{:d}"),
    "speakers": ("speakers", "{:d}"),
    "words": ("words", "{:d}"),
    "vocabulary": ("vocabulary (distinct words)", "{:d}"),
    "characters": ("characters", "{:d}"),
    "mean_duration": ("mean duration (s)", "{:.2f}"),
    "min_duration": ("min duration (s)", "{:.2f}"),
    "max_duration": ("max duration (s)", "{:.2f}"),
    "min_utts_per_speaker": ("min utterances / speaker", "{:d}"),
    "max_utts_per_speaker": ("max utterances / speaker", "{:d}"),
}


def _fmt(value, spec: str | None) -> str:
    if spec is not None:
        try:
            return spec.format(value)
        except (ValueError, TypeError):
            pass
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_stats(d: dict) -> str:
    """Two aligned columns, label then right-aligned value; unknown keys are listed last."""
    rows = [(label, _fmt(d[k], spec)) for k, (label, spec) in _LABELS.items() if k in d]
    rows += [(str(k), _fmt(v, None)) for k, v in d.items() if k not in _LABELS]
    if not rows:
        return ""
    lw = max(len(label) for label, _ in rows)
    vw = max(len(value) for _, value in rows)
    return "\n".join(f"{label:<{lw}}  {value:>{vw}}" for label, value in rows)
