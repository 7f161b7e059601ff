"""Canaries: seeded random-word transcripts, spoken by espeak-ng, sped up, split in/out.

``make_canaries(out_dir, CanaryConfig(...))`` writes ``out_dir/canaries.jsonl`` — an ordinary
privasr manifest (so ``privasr eval`` reads it) whose lines also carry a ``canary`` object
``{inserted, repetitions, factor, method}`` — plus ``out_dir/canaries.json`` (settings, the
feasibility summary). Every canary gets a nominal repetition count r (the ``repetitions`` values
dealt out evenly) and then an *independent fair coin*: heads → inserted r times into training,
tails → held out (its nominal r makes matched groups for the by-r table). Independence is what
the one-run ε audit (``privasr.audit.metrics``) assumes.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from privasr.atomic import atomic_path, atomic_write_text
from privasr.audit.blocklist import blocked
from privasr.audit.speedup import METHODS, ctc_slack, max_feasible_factor, speed_up
from privasr.data.espeak import Speaker, synthesize
from privasr.data.manifest import Utterance, read_manifest, write_manifest

WAMERICAN = Path("/usr/share/dict/american-english")
REPETITIONS = (1, 2, 4, 8, 16)
# "auto" factor: the largest of these that leaves every canary ≥ `margin`× the CTC frames it needs
AUTO_FACTORS = (3.0, 2.5, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.33, 1.25, 1.2, 1.15, 1.1)


class CanaryError(ValueError):
    """Canaries that cannot measure memorization (e.g. too fast for the model's CTC)."""


def load_vocabulary(top_n: int = 20000, dictionary: Path = WAMERICAN) -> list[str]:
    """wordfreq's English top-``top_n`` words that are ``[a-z]{2,}``, in Debian's wamerican and
    not on the blocklist (frequency order). ~16k words for top_n = 20000."""
    try:
        import wordfreq
    except ImportError:
        raise CanaryError("canary vocabulary needs wordfreq: pip install wordfreq==3.1.1") from None
    if not dictionary.is_file():
        raise CanaryError(f"{dictionary} not found: install it with `apt-get install wamerican`")
    known = set(dictionary.read_text(encoding="utf-8", errors="ignore").split())
    return [w for w in wordfreq.top_n_list("en", top_n)
            if re.fullmatch(r"[a-z]{2,}", w) and w in known and not blocked(w)]


@dataclass(frozen=True)
class CanaryConfig:
    n: int = 60
    words: int = 8
    seed: int = 0
    vocab_top_n: int = 20000
    voice: str = "en-us"
    variant: str = "m1"
    pitch: int = 50
    rate: int = 120  # espeak-ng -s (words per minute) before speeding up
    factor: float | str = "auto"  # speed-up factor, or "auto" (largest feasible, see AUTO_FACTORS)
    method: str = "resample"  # resample | tempo | espeak_rate (privasr.audit.speedup)
    repetitions: tuple[int, ...] = REPETITIONS
    subsampling: int = 4  # the model's frame reduction (ConformerCTC: 4)
    margin: float = 1.15  # auto: keep ≥ margin × the CTC frames needed
    on_infeasible: str = "refuse"  # refuse | warn (warn: keep, they are dropped at training)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise CanaryError(f"method={self.method!r}; valid: {', '.join(METHODS)}")
        if self.on_infeasible not in ("refuse", "warn"):
            raise CanaryError(f"on_infeasible={self.on_infeasible!r}; valid: refuse, warn")
        if self.n < 2 or self.words < 1:
            raise CanaryError(f"need n >= 2 canaries of >= 1 word (n={self.n}, words={self.words})")
        if not self.repetitions or any(r < 1 for r in self.repetitions):
            raise CanaryError(f"repetitions must be positive integers, got {self.repetitions}")
        if self.factor != "auto" and not (isinstance(self.factor, (int, float))
                                          and self.factor > 0):
            raise CanaryError(f"factor must be a positive number or 'auto', got {self.factor!r}")


@dataclass(frozen=True)
class Canary:
    utt: Utterance
    inserted: bool
    repetitions: int  # nominal r (the copies in training if inserted)
    factor: float
    method: str

    @property
    def id(self) -> str:
        return self.utt.id

    @property
    def text(self) -> str:
        return self.utt.text


def plan_canaries(cfg: CanaryConfig, vocab: Sequence[str]) -> list[tuple[str, str, bool, int]]:
    """(id, text, inserted, r) per canary, a pure function of the seed and vocabulary."""
    rng = random.Random(cfg.seed)
    texts = [" ".join(rng.choice(vocab) for _ in range(cfg.words)) for _ in range(cfg.n)]
    reps = [cfg.repetitions[i % len(cfg.repetitions)] for i in range(cfg.n)]
    rng.shuffle(reps)
    coins = [rng.random() < 0.5 for _ in range(cfg.n)]  # independent fair coins
    return [(f"canary{i:04d}", t, c, r) for i, (t, r, c) in enumerate(zip(texts, reps, coins))]


def _speaker(cfg: CanaryConfig, factor: float) -> Speaker:
    rate = round(cfg.rate * factor) if cfg.method == "espeak_rate" else cfg.rate
    return Speaker(id="canary", voice=cfg.voice, variant=cfg.variant, pitch=cfg.pitch, rate=rate)


def choose_factor(texts: Sequence[str], samples_1x: Sequence[int], *, subsampling: int = 4,
                  margin: float = 1.15) -> float:
    """The largest of ``AUTO_FACTORS`` that keeps every canary ``margin``-feasible."""
    limit = min(max_feasible_factor(t, n, subsampling=subsampling, margin=margin)
                for t, n in zip(texts, samples_1x))
    for f in AUTO_FACTORS:
        if f <= limit:
            return f
    raise CanaryError(
        f"no speed-up factor ≥ {AUTO_FACTORS[-1]} keeps every canary transcribable by a "
        f"{subsampling}×-subsampled character CTC (even 1× speech leaves only {limit * margin:.2f}× "
        f"the frames needed); use fewer words, a slower rate, or less subsampling")


def make_canaries(out_dir: str | Path, cfg: CanaryConfig = CanaryConfig(), *,
                  vocab: Sequence[str] | None = None, log=print) -> list[Canary]:
    """Synthesise, speed up, check and write the canaries; return them."""
    cfg.validate()
    out = Path(out_dir)
    vocab = list(vocab) if vocab is not None else load_vocabulary(cfg.vocab_top_n)
    plan = plan_canaries(cfg, vocab)
    if cfg.factor == "auto":
        base = [synthesize(t, _speaker(cfg, 1.0)) for _, t, _, _ in plan]
        factor = choose_factor([t for _, t, _, _ in plan], [len(x) for x in base],
                               subsampling=cfg.subsampling, margin=cfg.margin)
        log(f"speed-up factor {factor} (auto: every canary keeps ≥ {cfg.margin}× the CTC frames "
            f"a {cfg.subsampling}×-subsampled character model needs)")
    else:
        factor, base = float(cfg.factor), None
    canaries, infeasible = [], []
    (out / "audio").mkdir(parents=True, exist_ok=True)
    for i, (cid, text, inserted, r) in enumerate(plan):
        if cfg.method == "espeak_rate" or base is None:
            x = synthesize(text, _speaker(cfg, factor))
        else:
            x = base[i]
        y = speed_up(x, factor, cfg.method)
        peak = float(np.abs(y).max())
        if peak > 0.89:
            y = y * (0.89 / peak)
        path = out / "audio" / f"{cid}.flac"
        with atomic_path(path, suffix=".flac") as tmp:
            sf.write(tmp, y, 16000, format="FLAC", subtype="PCM_16")
        slack = ctc_slack(text, len(y), subsampling=cfg.subsampling)
        if slack < 1.0:
            infeasible.append((cid, slack))
        canaries.append(Canary(Utterance(id=cid, audio=str(path), duration=len(y) / 16000,
                                         text=text, speaker="canary", sampling_rate=16000),
                               inserted, r, factor, cfg.method))
    if infeasible:
        msg = (f"{len(infeasible)}/{len(plan)} canaries are CTC-infeasible at speed-up {factor} "
               f"({cfg.method}, {cfg.subsampling}× subsampling), e.g. {infeasible[0][0]} has "
               f"{infeasible[0][1]:.2f}× the frames it needs; they cannot be transcribed and "
               f"measure nothing")
        if cfg.on_infeasible == "refuse":
            raise CanaryError(msg + "; lower the factor, use fewer words or a slower rate "
                              "(or on_infeasible=warn to keep them anyway)")
        warnings.warn(msg + "; training and scoring leave them out", stacklevel=2)
    write_canaries(out / "canaries.jsonl", canaries)
    speed = speech_rate([c.utt for c in canaries])
    log(f"canary speech: {speed['p50']} characters/s (median; p99 {speed['p99']}); canaries "
        f"faster than the training speech are harder to learn from it (speech_rate() of the "
        f"training manifest tells)")
    summary = {"config": {**asdict(cfg), "factor": factor}, "n": len(canaries),
               "characters_per_second": speed,
               "inserted": sum(c.inserted for c in canaries),
               "infeasible": [c for c, _ in infeasible],
               "vocabulary_size": len(vocab)}
    atomic_write_text(out / "canaries.json", json.dumps(summary, indent=1))
    return canaries


def speech_rate(utts: Sequence[Utterance]) -> dict[str, float]:
    """Characters per second of transcripts over audio: median, p99, max."""
    r = np.array([len(u.text) / u.duration for u in utts])
    return {"p50": round(float(np.median(r)), 2), "p99": round(float(np.percentile(r, 99)), 2),
            "max": round(float(r.max()), 2)}


def write_canaries(path: Path, canaries: Sequence[Canary]) -> None:
    write_manifest(path, [c.utt for c in canaries])
    meta = {c.id: {"inserted": c.inserted, "repetitions": c.repetitions, "factor": c.factor,
                   "method": c.method} for c in canaries}
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        obj["canary"] = meta[obj["id"]]
        lines.append(json.dumps(obj, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_canaries(path: str | Path) -> list[Canary]:
    """Canaries of a manifest written by :func:`make_canaries` (errors name the line)."""
    path = Path(path)
    utts = {u.id: u for u in read_manifest(path)}
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        meta = obj.get("canary")
        if not isinstance(meta, dict) or not {"inserted", "repetitions"} <= set(meta):
            raise CanaryError(f"{path}:{lineno}: not a canary line (no 'canary' object with "
                              f"inserted/repetitions); make it with `privasr audit make-canaries`")
        r = meta["repetitions"]
        if not isinstance(r, int) or r < 1 or not isinstance(meta["inserted"], bool):
            raise CanaryError(f"{path}:{lineno}: bad canary metadata {meta}")
        out.append(Canary(utts[obj["id"]], meta["inserted"], r, float(meta.get("factor", 1.0)),
                          str(meta.get("method", "?"))))
    if not out:
        raise CanaryError(f"{path}: no canaries")
    return out


def training_copies(canaries: Sequence[Canary]) -> list[Utterance]:
    """The utterances to add to training: each *inserted* canary r times (ids ``<id>_rep<j>``);
    held-out canaries never appear."""
    return [replace(c.utt, id=f"{c.id}_rep{j}") for c in canaries if c.inserted
            for j in range(c.repetitions)]
