"""A public/private split of the embedded corpus, with a domain shift between the two.

Papers.md §3's setting: an encoder pre-trained on *public* speech is fine-tuned on *private*
in-domain speech it has never heard. Two corpora are synthesised (each with its own
train/dev/test split by speaker and sentence), disjoint by construction in three ways:

=========  ==========================================  ===========================================
           public (pre-training)                       private (DP fine-tuning)
=========  ==========================================  ===========================================
voices     en-us, en-gb, en-gb-x-rp, en-gb-x-gbclan,   en-us-nyc, en-gb-scotland, en-029
           en-gb-x-gbcwmd                              (New York, Scottish, Caribbean accents)
rate       120-155 wpm                                 155-180 wpm (faster speech)
pitch      25-60                                       45-85
text       King James Bible                            Bierce's *Devil's Dictionary*
=========  ==========================================  ===========================================

So no private speaker (a voice × variant × pitch × rate tuple) and no private sentence ever
occurs in public data, and the private data differs in accent, tempo, pitch and vocabulary: a
public model has a measurable zero-shot gap that fine-tuning closes. The Devil's Dictionary holds
~1,700 usable sentences (~1.9 h of speech), which bounds the private corpus.

    privasr corpus synth --domain public  --out data/pubpriv/public  --hours 4 --speakers 420
    privasr corpus synth --domain private --out data/pubpriv/private --hours 1.8 --speakers 240

The ``assistant`` domain is the large private domain of DP fine-tuning at scale: ~20,000
training utterances of requests and dictation (names, amounts, dates, numbers read as words)
generated from templates and Debian word lists (``privasr.data.assistant_text``), the private
accents at pitch 76-99 and 160-190 wpm; fine-tuned from the demo model, whose corpus (all
voices, pitch 25-75, Bible and Devil's Dictionary text) shares no speaker and no sentence with it:

    privasr corpus synth --domain assistant --out data/assistant --hours 18 --speakers 240

or let ``privasr train`` build them (``data.synth_domain: public|private`` in the recipe).
"""

from __future__ import annotations

from dataclasses import replace

from privasr.data.synth import SynthConfig

__all__ = ["DOMAINS", "domain_config"]

DOMAINS: dict[str, dict] = {
    "public": dict(voices=("en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd"),
                   rate_range=(120, 155), pitch_range=(25, 60), sources=("kjv",),
                   speaker_prefix="pub"),
    "private": dict(voices=("en-us-nyc", "en-gb-scotland", "en-029"),
                    rate_range=(155, 180), pitch_range=(45, 85), sources=("devil",),
                    speaker_prefix="prv", dev_fraction=0.05, test_fraction=0.10),
    # issue 16's large private domain: unlimited template text (privasr.data.assistant_text),
    # the private accents at pitch 76-99 -- above the demo corpus's 25-75, so no assistant
    # speaker is a demo speaker and the demo model is public with respect to it
    "assistant": dict(voices=("en-us-nyc", "en-gb-scotland", "en-029"),
                      rate_range=(160, 190), pitch_range=(76, 99), sources=("assistant",),
                      speaker_prefix="ast", min_words=4, max_words=12,
                      dev_fraction=0.02, test_fraction=0.04),
}


def domain_config(name: str, *, hours: float, speakers: int, seed: int = 0) -> SynthConfig:
    """The ``SynthConfig`` of one side of the split."""
    if name not in DOMAINS:
        raise ValueError(f"unknown corpus domain {name!r}; valid: {', '.join(DOMAINS)}")
    return replace(SynthConfig(hours=hours, speakers=speakers, seed=seed), **DOMAINS[name])
