"""The embedded default corpus: multi-speaker English speech synthesised with espeak-ng.

``synthesize_corpus(out_dir, hours=..., seed=...)`` plans utterances deterministically from the
seed (speakers, sentences, splits), synthesises the missing audio with worker processes, and
writes ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl``. Splits are disjoint by speaker *and* by
sentence, so test WER measures generalisation to unseen voices and unseen sentences. Every file
is written atomically; a rerun with the same arguments does no work, an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from privasr.atomic import atomic_path, atomic_write_text
from privasr.data.espeak import VOICES, Speaker, list_variants, synthesize
from privasr.data.manifest import Utterance, write_manifest
from privasr.data.text_sources import load_sentences

SPLITS = ("train", "dev", "test")
FORMAT_VERSION = 2


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines the corpus; its JSON is the cache key."""

    hours: float = 4.0
    seed: int = 0
    speakers: int = 600
    sources: tuple[str, ...] = ("kjv", "devil")
    dev_fraction: float = 0.04
    test_fraction: float = 0.06
    pitch_range: tuple[int, int] = (25, 75)
    # Slow enough that a 4x-subsampled character CTC (25 frames/s) can emit every transcript.
    rate_range: tuple[int, int] = (120, 180)
    min_words: int = 5
    max_words: int = 25
    ctc_subsampling: int = 4
    version: int = FORMAT_VERSION
    # a subset of espeak.VOICES (empty: all) and the speaker-id prefix; used by the
    # public/private domain split (privasr.data.domains). Left out of the cache key at their
    # defaults, so corpora built before they existed stay valid.
    voices: tuple[str, ...] = ()
    speaker_prefix: str = "spk"

    def to_json(self) -> str:
        d = asdict(self)
        for k, default in (("voices", []), ("speaker_prefix", "spk")):
            if d[k] == default or d[k] == tuple(default):
                del d[k]
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class PlannedUtt:
    id: str
    split: str
    speaker: Speaker
    text: str


class CorpusExistsError(RuntimeError):
    """``out_dir`` holds a corpus made with different settings."""


def make_speakers(n: int, rng: random.Random, pitch_range: tuple[int, int],
                  rate_range: tuple[int, int], voices: tuple[str, ...] = (),
                  prefix: str = "spk") -> list[Speaker]:
    """``n`` distinct speakers: every (voice, variant) pair at most once, random pitch/rate."""
    unknown = sorted(set(voices) - set(VOICES))
    if unknown:
        raise ValueError(f"unknown voice(s) {unknown}; valid: {', '.join(VOICES)}")
    pairs = [(v, var) for v in (voices or VOICES) for var in list_variants()]
    if n > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct speakers are available, asked for {n}")
    rng.shuffle(pairs)
    return [Speaker(id=f"{prefix}{i:04d}", voice=v, variant=var, pitch=rng.randint(*pitch_range),
                    rate=rng.randint(*rate_range))
            for i, (v, var) in enumerate(pairs[:n])]


def _estimate_seconds(text: str, rate_wpm: int) -> float:
    """espeak-ng's duration, fitted on a 2,428-utterance corpus (it speaks ~1.4x its -s rate)."""
    return 0.712 * len(text.split()) * 60.0 / rate_wpm + 0.48


def plan_corpus(cfg: SynthConfig) -> list[PlannedUtt]:
    """Deterministic plan: which speaker says which sentence, in which split."""
    rng = random.Random(cfg.seed)
    sentences = load_sentences(cfg.sources, min_words=cfg.min_words, max_words=cfg.max_words)
    rng.shuffle(sentences)
    speakers = make_speakers(cfg.speakers, rng, cfg.pitch_range, cfg.rate_range,
                             tuple(cfg.voices), cfg.speaker_prefix)
    fractions = {"test": cfg.test_fraction, "dev": cfg.dev_fraction}
    n_spk = {k: max(2, round(f * len(speakers))) for k, f in fractions.items()}
    n_spk["train"] = len(speakers) - n_spk["test"] - n_spk["dev"]
    if n_spk["train"] < 1:
        raise ValueError(f"{cfg.speakers} speakers are too few for train/dev/test splits")
    spk_split = {"test": speakers[: n_spk["test"]],
                 "dev": speakers[n_spk["test"]: n_spk["test"] + n_spk["dev"]],
                 "train": speakers[n_spk["test"] + n_spk["dev"]:]}
    # Sentences are dealt from disjoint pools, so no dev/test sentence is ever in training.
    budget = {k: cfg.hours * 3600 * fractions.get(k, 1 - sum(fractions.values())) for k in SPLITS}
    start = 0
    plan: list[PlannedUtt] = []
    for split in ("test", "dev", "train"):
        spk = spk_split[split]
        seconds, i, utts = 0.0, 0, []
        # every dev/test speaker says at least one sentence, however small the corpus
        while seconds < budget[split] or (split != "train" and i < len(spk)):
            if start + i >= len(sentences):
                raise ValueError(f"text sources hold too few sentences for {cfg.hours} h")
            text = sentences[start + i]
            speaker = spk[i % len(spk)]
            utts.append(PlannedUtt(f"{speaker.id}-{split}{i:06d}", split, speaker, text))
            seconds += _estimate_seconds(text, speaker.rate)
            i += 1
        start += i
        plan.extend(utts)
    return plan


def plan_digest(plan: list[PlannedUtt]) -> str:
    """Changes whenever the text sources or speaker set change, invalidating the cache."""
    h = hashlib.sha1()
    for u in plan:
        h.update(f"{u.id}|{u.text}|{u.speaker}\n".encode())
    return h.hexdigest()


def _content_hash(u: PlannedUtt) -> str:
    return hashlib.sha1(f"{u.text}|{u.speaker}".encode()).hexdigest()[:8]


def ctc_feasible(text: str, n_samples: int, sample_rate: int = 16000, subsampling: int = 4) -> bool:
    """Can a character CTC with this subsampling emit ``text`` from this much audio?

    Frames at 10 ms shift (25 ms window) are subsampled; CTC needs one frame per character
    plus one blank between each pair of repeated characters.
    """
    frames = 1 + (n_samples - int(0.025 * sample_rate)) // int(0.01 * sample_rate)
    out_frames = frames // subsampling - 1
    repeats = sum(1 for a, b in zip(text, text[1:]) if a == b)
    return out_frames >= len(text) + repeats


def _synth_one(item: tuple[PlannedUtt, str]) -> tuple[str, int]:
    utt, path = item
    p = Path(path)
    if p.exists():  # written atomically, so present means complete
        return utt.id, sf.info(path).frames
    y = synthesize(utt.text, utt.speaker)
    with atomic_path(p, suffix=".flac") as tmp:
        sf.write(tmp, y, 16000, format="FLAC", subtype="PCM_16")
    return utt.id, len(y)


def synthesize_corpus(out_dir: str | Path, cfg: SynthConfig = SynthConfig(), *,
                      workers: int = 2, force: bool = False, progress: bool = True) -> dict:
    """Build (or find cached) the corpus in ``out_dir``; return a summary dict."""
    out = Path(out_dir)
    cfg_path = out / "config.json"
    manifests = [out / f"{s}.jsonl" for s in SPLITS]
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("config") != json.loads(cfg.to_json()) and not force:
            raise CorpusExistsError(f"{out} holds a corpus made with other settings; "
                                    f"choose another --out or pass --force to rebuild it")
    plan = plan_corpus(cfg)
    digest = plan_digest(plan)
    if cfg_path.exists():
        if (old.get("config") == json.loads(cfg.to_json()) and old.get("plan_digest") == digest
                and all(m.exists() for m in manifests)):
            return {**old["summary"], "cached": True}
    out.mkdir(parents=True, exist_ok=True)
    # the file name carries a hash of what is said by whom, so audio is never reused stale
    items = [(u, str(out / "audio" / u.speaker.id / f"{u.id}-{_content_hash(u)}.flac"))
             for u in plan]
    n_samples: dict[str, int] = {}
    ctx = mp.get_context("spawn")  # fork after torch's thread pools start can deadlock
    with ctx.Pool(workers) as pool:
        it = pool.imap_unordered(_synth_one, items, chunksize=8)
        for uid, n in tqdm(it, total=len(items), desc="synthesising", unit="utt",
                           disable=not progress):
            n_samples[uid] = n
    by_split: dict[str, list[Utterance]] = {s: [] for s in SPLITS}
    dropped = []
    for u, path in items:
        n = n_samples[u.id]
        if not ctc_feasible(u.text, n, subsampling=cfg.ctc_subsampling):
            dropped.append(u.id)
            continue
        by_split[u.split].append(Utterance(id=u.id, audio=path, duration=n / 16000, text=u.text,
                                           speaker=u.speaker.id, sampling_rate=16000))
    for s in SPLITS:
        write_manifest(out / f"{s}.jsonl", by_split[s])
    speakers = {u.speaker.id: asdict(u.speaker) for u in plan}
    atomic_write_text(out / "speakers.json", json.dumps(speakers, indent=1, sort_keys=True))
    summary = {
        "hours": {s: round(sum(u.duration for u in by_split[s]) / 3600, 4) for s in SPLITS},
        "utterances": {s: len(by_split[s]) for s in SPLITS},
        "speakers": {s: len({u.speaker for u in by_split[s]}) for s in SPLITS},
        "dropped_ctc_infeasible": len(dropped),
    }
    atomic_write_text(cfg_path, json.dumps({"config": json.loads(cfg.to_json()),
                                            "plan_digest": digest, "summary": summary}, indent=1))
    return {**summary, "cached": False}
