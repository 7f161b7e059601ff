"""Tests for privasr.decoding: greedy/beam CTC decoding, word n-gram LM, WER/CER."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from privasr.decoding.ctc import beam_search, beam_search_batch, greedy_decode, path_log_prob
from privasr.decoding.lm import EOS, UNK, Lexicon, WordNgramLM
from privasr.decoding.metrics import cer, error_report, wer

VOCAB = ["", " "] + [chr(ord("a") + i) for i in range(26)] + ["'"]
IDX = {s: i for i, s in enumerate(VOCAB)}

SALT_CORPUS = [
    "pass the salt please",
    "the salt is on the table",
    "add salt and pepper",
    "the sea salt",
    "please pass the pepper",
    "the table is set",
    "she sat at the table",
    "salt the soup",
]


def frames(seq: list[str], vocab=VOCAB, p: float = 0.98) -> np.ndarray:
    """Peaky (T, V) log-probs: frame t puts mass ``p`` on symbol seq[t] ("" = blank)."""
    idx = {s: i for i, s in enumerate(vocab)}
    V = len(vocab)
    out = np.full((len(seq), V), (1.0 - p) / (V - 1))
    for t, s in enumerate(seq):
        out[t, idx[s]] = p
    return np.log(out)


def spell(text: str) -> list[str]:
    """A plausible alignment of text: each symbol on one frame followed by a blank."""
    seq = [""]
    for ch in text:
        seq += [ch, ""]
    return seq


# ------------------------------------------------------------------------------ greedy
def test_greedy_collapse_rules():
    cases = {
        ("l", "l", "", "l"): "ll",        # a blank between repeats keeps both
        ("l", "l", "l"): "l",             # plain repeats merge
        ("", "l", "", "", "l", "l", ""): "ll",
        (" ", "h", "i", " ", " ", "", " ", "t", " "): "hi t",  # strip/collapse spaces
        ("", "", ""): "",
        ("a", "'", "s"): "a's",
    }
    for seq, want in cases.items():
        lp = torch.tensor(frames(list(seq)))[None]
        assert greedy_decode(lp, torch.tensor([len(seq)]), VOCAB) == [want], seq


def test_greedy_respects_lengths_and_batch():
    a = frames(spell("cat"))
    b = frames(spell("dog") + ["x"] * 4)  # padding frames beyond the length
    T = max(len(a), len(b))
    batch = np.full((2, T, len(VOCAB)), -30.0)
    batch[0, : len(a)] = a
    batch[1, : len(b)] = b
    out = greedy_decode(torch.tensor(batch), torch.tensor([len(a), len(b) - 4]), VOCAB)
    assert out == ["cat", "dog"]
    with pytest.raises(ValueError):
        greedy_decode(torch.tensor(batch), torch.tensor([1, 2]), VOCAB[:-1])


def test_decoders_use_generic_vocab():
    vocab = ["<b>", "x", "y", " ", "z"]
    seq = ["x", "<b>", "x", " ", "y", "y", "z"]
    lp = frames(seq, vocab)
    assert greedy_decode(torch.tensor(lp)[None], None, vocab) == ["xx yz"]
    assert beam_search(lp, vocab, beam_size=4) == "xx yz"


# ------------------------------------------------------------------------------ beam search
SMALL = ["", " ", "a", "b"]


def brute_force_text_probs(lp: np.ndarray, vocab) -> dict[str, float]:
    T, V = lp.shape
    probs: dict[str, float] = {}
    for path in itertools.product(range(V), repeat=T):
        out, prev = [], None
        for c in path:
            if c != prev and c != 0:
                out.append(vocab[c])
            prev = c
        text = " ".join("".join(out).split())
        s = float(sum(lp[t, c] for t, c in enumerate(path)))
        probs[text] = np.logaddexp(probs.get(text, -np.inf), s)
    return probs


def test_beam_search_is_exact_without_pruning():
    rng = np.random.default_rng(0)
    for _ in range(5):
        lp = np.log(rng.dirichlet(np.ones(len(SMALL)), size=5))
        probs = brute_force_text_probs(lp, SMALL)
        text, score = beam_search(lp, SMALL, beam_size=10_000, prune_logp=-1e9,
                                  token_top_k=None, return_score=True)
        best = max(probs, key=probs.get)
        assert text == best
        assert score == pytest.approx(probs[best], abs=1e-9)
        for t, p in probs.items():
            assert path_log_prob(lp, t, SMALL) == pytest.approx(p, abs=1e-9)


def test_beam_matches_or_beats_greedy_on_random_inputs():
    rng = np.random.default_rng(1)
    vocab = ["", " ", "a", "b", "c", "'"]
    for trial in range(20):
        T = int(rng.integers(5, 40))
        logits = rng.normal(0, 1.5, size=(T, len(vocab)))
        lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        g = greedy_decode(torch.tensor(lp)[None], None, vocab)[0]
        b = beam_search(lp, vocab, beam_size=16)
        assert path_log_prob(lp, b, vocab) >= path_log_prob(lp, g, vocab) - 1e-9, trial


def test_beam_equals_greedy_on_peaky_inputs():
    for text in ["the cat sat", "hello world", "a", "don't stop", "ll l", ""]:
        seq = [" "] + spell(text) + [" ", ""]
        lp = frames(seq, p=0.95)
        g = greedy_decode(torch.tensor(lp)[None], None, VOCAB)[0]
        assert g == text
        assert beam_search(lp, VOCAB, beam_size=8) == text
        assert beam_search(lp, VOCAB, beam_size=1) == text


def test_beam_search_accepts_tensor_and_batch():
    lps = [frames(spell("hi there")), frames(spell("ok"))]
    T = max(len(x) for x in lps)
    batch = np.full((2, T, len(VOCAB)), math.log(1.0 / len(VOCAB)))
    for i, x in enumerate(lps):
        batch[i, : len(x)] = x
    lengths = torch.tensor([len(x) for x in lps])
    out = beam_search_batch(torch.tensor(batch, dtype=torch.float32), lengths, VOCAB,
                            beam_size=4)
    assert out == ["hi there", "ok"]
    assert beam_search(torch.tensor(lps[1]), VOCAB) == "ok"
    assert beam_search(np.zeros((0, len(VOCAB))), VOCAB) == ""


def _ambiguous_salt() -> np.ndarray:
    """'pass the sa?lt': the frame between 'a' and 'l' slightly favours 'u' over blank."""
    seq = spell("pass the sa")
    lp = frames(seq)
    amb = np.full(len(VOCAB), 1e-4)
    amb[IDX["u"]] = 0.52
    amb[0] = 0.48 - 1e-4 * (len(VOCAB) - 2)
    lp = np.vstack([lp, np.log(amb)[None], frames(["l", "", "t", ""])])
    return lp


def test_lm_flips_ambiguous_word_to_in_vocabulary_word():
    lp = _ambiguous_salt()
    assert greedy_decode(torch.tensor(lp)[None], None, VOCAB) == ["pass the sault"]
    assert beam_search(lp, VOCAB, beam_size=16) == "pass the sault"
    lm = WordNgramLM.from_transcripts(SALT_CORPUS, order=3)
    assert "salt" in lm.vocabulary and "sault" not in lm.vocabulary
    assert beam_search(lp, VOCAB, beam_size=16, lm=lm, lm_weight=0.5) == "pass the salt"
    # the lexicon alone (no LM) does it too, through the OOV penalty
    lex = Lexicon.from_transcripts(SALT_CORPUS)
    assert beam_search(lp, VOCAB, beam_size=16, lexicon=lex, oov_penalty=-2.0) == \
        "pass the salt"


def test_unknown_words_survive_soft_lexicon_but_not_hard_lexicon():
    lm = WordNgramLM.from_transcripts(SALT_CORPUS, order=2)
    lex = Lexicon.from_lm(lm)
    lp = frames(spell("pass the zebra"), p=0.99)
    kw = dict(beam_size=16, lm=lm, lm_weight=0.5, lexicon=lex)
    assert beam_search(lp, VOCAB, **kw) == "pass the zebra"
    hard = beam_search(lp, VOCAB, hard_lexicon=True, **kw)
    assert all(w in lex for w in hard.split())
    assert "zebra" not in hard
    with pytest.raises(ValueError):
        beam_search(lp, VOCAB, hard_lexicon=True)


def test_word_bonus_and_lm_keep_clear_input():
    lm = WordNgramLM.from_transcripts(SALT_CORPUS, order=3)
    lp = frames(spell("she sat at the table"), p=0.97)
    assert beam_search(lp, VOCAB, lm=lm, lm_weight=1.0, word_bonus=1.0) == \
        "she sat at the table"


# ------------------------------------------------------------------------------ LM
@pytest.mark.parametrize("order", [1, 2, 3])
def test_lm_distribution_sums_to_one(order):
    lm = WordNgramLM.from_transcripts(SALT_CORPUS, order=order)
    events = sorted(lm.vocabulary) + [EOS, UNK]
    contexts = [(), ("<s>",), ("the",), ("pass", "the"), ("zzz", "the"), ("the", "zzz"),
                ("<s>", "pass"), ("salt", "and"), ("table",)]
    for ctx in contexts:
        total = sum(math.exp(lm.score(ctx, w)) for w in events)
        assert total == pytest.approx(1.0, abs=1e-9), ctx
        for w in events:
            assert lm.score(ctx, w) < 0.0


def test_lm_backoff_and_unknown_words():
    lm = WordNgramLM.from_transcripts(SALT_CORPUS, order=3)
    # seen bigram beats the same word after a context it never followed
    assert lm.score(("the",), "salt") > lm.score(("pepper",), "salt")
    # unseen bigram still gets a finite probability through backoff
    s = lm.score(("pepper",), "table")
    assert math.isfinite(s) and s < 0
    # an unknown context word backs off to the lower order
    assert lm.score(("zzz",), "salt") == pytest.approx(lm.score((), "salt"))
    # unknown words get the explicit <unk> probability, below seen words
    assert lm.score(("the",), "sault") == lm.score(("the",), UNK)
    assert lm.score(("the",), "sault") < lm.score(("the",), "pepper")
    # only the last order-1 words matter
    assert lm.score(("a", "b", "pass", "the"), "salt") == lm.score(("pass", "the"), "salt")
    assert lm.score_sentence("pass the salt please") > lm.score_sentence("please salt the pass")
    assert lm.perplexity(["pass the salt"]) > 1.0
    with pytest.raises(ValueError):
        WordNgramLM.from_transcripts(["", "  "])


def test_lm_save_load_round_trip(tmp_path):
    lm = WordNgramLM.from_transcripts(SALT_CORPUS, order=3)
    path = tmp_path / "lm.json"
    lm.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["lm.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["order"] == 3 and data["log_base"] == "e"
    lm2 = WordNgramLM.load(path)
    assert lm2.vocabulary == lm.vocabulary and lm2.order == lm.order
    for ctx in [(), ("<s>",), ("the",), ("pass", "the"), ("zzz", "salt")]:
        for w in sorted(lm.vocabulary) + [EOS, "unseen"]:
            assert lm2.score(ctx, w) == lm.score(ctx, w)
    lm.save(path)  # overwrite in place
    assert WordNgramLM.load(path).vocabulary == lm.vocabulary
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError):
        WordNgramLM.load(path)


def test_lm_arpa_export():
    lm = WordNgramLM.from_transcripts(SALT_CORPUS, order=2)
    arpa = lm.to_arpa()
    assert "\\data\\" in arpa and "\\2-grams:" in arpa and "\\end\\" in arpa
    ngram1 = [ln for ln in arpa.splitlines() if ln.startswith("ngram 1=")][0]
    assert int(ngram1.split("=")[1]) == len(lm.vocabulary) + 3  # + <s> </s> <unk>
    line = [ln for ln in arpa.splitlines() if ln.split("\t")[1:2] == ["the salt"]][0]
    assert float(line.split("\t")[0]) == pytest.approx(
        lm.score(("the",), "salt") / math.log(10), abs=1e-6)


def test_lexicon_prefixes():
    lex = Lexicon(["salt", "sat", "table"])
    assert lex.is_prefix("") and lex.is_prefix("sa") and lex.is_prefix("salt")
    assert not lex.is_prefix("sau") and "sa" not in lex and "sat" in lex
    assert len(lex) == 3


# ------------------------------------------------------------------------------ metrics
def test_wer_cer_hand_computed():
    refs = ["the cat sat", "on the mat"]
    hyps = ["the cat sit", "on mat"]
    # words: 1 substitution + 1 deletion over 6 reference words
    assert wer(refs, hyps) == pytest.approx(2 / 6)
    # chars: 1 substitution ("a"->"i") + 4 deletions ("the ") over 11 + 10 chars
    assert cer(refs, hyps) == pytest.approx(5 / 21)
    rep = error_report(refs, hyps)
    assert rep["n_utts"] == 2 and rep["n_ref_words"] == 6
    assert (rep["substitutions"], rep["deletions"], rep["insertions"]) == (1, 1, 0)
    assert rep["wer"] == pytest.approx(2 / 6) and rep["cer"] == pytest.approx(5 / 21)


def test_corpus_level_not_mean_of_utterances():
    refs = ["a", "b c d e f g h i j"]
    hyps = ["x", "b c d e f g h i j"]
    assert wer(refs, hyps) == pytest.approx(1 / 10)  # the mean of rates would be 0.5


def test_metrics_empty_hypotheses_and_insertions():
    rep = error_report(["a b", "c"], ["", ""])
    assert rep["wer"] == 1.0 and rep["deletions"] == 3 and rep["substitutions"] == 0
    assert cer(["ab"], [""]) == 1.0
    assert wer(["a"], ["a b c"]) == 2.0
    # an empty reference contributes its hypothesis words as insertions
    assert error_report(["a b", ""], ["a b", "x y"])["insertions"] == 2
    assert wer(["  a   b "], ["a b"]) == 0.0


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="empty reference list"):
        wer([], [])
    with pytest.raises(ValueError, match="empty reference list"):
        error_report([], [])
    with pytest.raises(ValueError):
        cer(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        wer([""], ["x"])  # no reference words at all: undefined
    with pytest.raises(TypeError):
        wer("abc", "abc")
