"""CTC decoding: greedy (best path) and prefix beam search with word-LM shallow fusion.

The decoders take a generic ``vocab`` (index -> symbol).  Index ``blank`` (0 by default)
is the CTC blank; the symbol ``" "`` is the word separator; every other symbol is
appended verbatim to the current word.  Output text has single spaces and no leading or
trailing space.

Scores are natural logs throughout: the acoustic input must be log-probabilities
(``log_softmax`` output) and :class:`~privasr.decoding.lm.WordNgramLM` scores in nats.
Beam search ranks a hypothesis by::

    log P_ctc(prefix) + lm_weight * sum(log P_lm(word | history))
                      + word_bonus * n_words + oov_penalty * n_non_lexicon_words

where the LM term for a word is added when the word is completed (a space is emitted, or
the utterance ends; ``</s>`` is scored at the end as well).
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

import numpy as np
import torch

from privasr.decoding.lm import BOS, EOS, Lexicon, WordNgramLM

WORD_SEP = " "
_NEG_INF = float("-inf")


def _collapse_spaces(text: str) -> str:
    return " ".join(t for t in text.split(WORD_SEP) if t)


# ---------------------------------------------------------------------------- greedy
def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None,
                  vocab: Sequence[str], blank: int = 0) -> list[str]:
    """Best-path decoding of a batch ``(B, T, V)``; ``lengths`` (B,) valid frames.

    Per utterance: argmax per frame, merge consecutive repeats, drop blanks (so a
    blank between two equal symbols keeps both: "l_l" -> "ll", "ll" -> "l"), then
    strip and collapse spaces.
    """
    lp = torch.as_tensor(log_probs)
    if lp.dim() != 3:
        raise ValueError(f"log_probs must be (B, T, V), got shape {tuple(lp.shape)}")
    B, T, V = lp.shape
    if V != len(vocab):
        raise ValueError(f"log_probs has V={V} but vocab has {len(vocab)} symbols")
    if lengths is None:
        lens = [T] * B
    else:
        lens = [int(x) for x in torch.as_tensor(lengths).reshape(-1).tolist()]
        if len(lens) != B:
            raise ValueError(f"lengths has {len(lens)} entries for a batch of {B}")
    best = lp.argmax(dim=-1).cpu()
    out = []
    for b in range(B):
        n = max(0, min(lens[b], T))
        ids = best[b, :n]
        if n:
            keep = torch.ones(n, dtype=torch.bool)
            keep[1:] = ids[1:] != ids[:-1]
            ids = ids[keep]
            ids = ids[ids != blank]
        out.append(_collapse_spaces("".join(vocab[i] for i in ids.tolist())))
    return out


# ---------------------------------------------------------------------------- helpers
def _to_numpy_2d(log_probs) -> np.ndarray:
    if isinstance(log_probs, torch.Tensor):
        arr = log_probs.detach().to(torch.float64).cpu().numpy()
    else:
        arr = np.asarray(log_probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected (T, V) log-probs, got shape {arr.shape}")
    return arr


def _lse(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == _NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


def path_log_prob(log_probs, text: str, vocab: Sequence[str], blank: int = 0) -> float:
    """Exact log P(text | x) under CTC, summed over every alignment whose output equals
    ``text`` after space normalisation (extra leading, trailing or repeated spaces are
    allowed), i.e. the quantity the prefix beam search approximates.  O(T * len(text)).
    """
    lp = _to_numpy_2d(log_probs)
    sym2id = {s: i for i, s in enumerate(vocab) if i != blank and s}
    sp = sym2id.get(WORD_SEP)
    text = _collapse_spaces(text)
    labels: list[int] = []
    max_len = max(len(s) for s in sym2id)
    i = 0
    while i < len(text):  # greedy longest-match segmentation into vocab symbols
        for L in range(min(max_len, len(text) - i), 0, -1):
            if text[i:i + L] in sym2id:
                labels.append(sym2id[text[i:i + L]])
                i += L
                break
        else:
            raise ValueError(f"text contains a symbol not in vocab at {text[i:]!r}")
    n_text = len(labels)
    if labels and sp is not None:
        labels.append(sp)  # optional trailing space
    n = len(labels)
    # pb[j] / pnb[j]: log-prob of having emitted labels[:j], ending in blank / non-blank
    pb = [_NEG_INF] * (n + 1)
    pnb = [_NEG_INF] * (n + 1)
    pb[0] = 0.0
    for t in range(lp.shape[0]):
        row = lp[t]
        nb = [_NEG_INF] * (n + 1)
        nnb = [_NEG_INF] * (n + 1)
        for j in range(n + 1):
            tot = _lse(pb[j], pnb[j])
            if tot == _NEG_INF:
                continue
            nb[j] = _lse(nb[j], tot + row[blank])
            if sp is not None and (j == 0 or labels[j - 1] == sp):
                nnb[j] = _lse(nnb[j], tot + row[sp])       # extra space: text unchanged
            elif j > 0:
                nnb[j] = _lse(nnb[j], pnb[j] + row[labels[j - 1]])  # repeat collapses
            if j < n:
                c = labels[j]
                src = pb[j] if (j > 0 and labels[j - 1] == c) else tot
                nnb[j + 1] = _lse(nnb[j + 1], src + row[c])
        pb, pnb = nb, nnb
    out = _lse(pb[n_text], pnb[n_text])
    if n > n_text:
        out = _lse(out, _lse(pb[n], pnb[n]))
    return out


# ---------------------------------------------------------------------------- beam search
class _Node:
    """A hypothesis prefix (node of the prefix tree of hypotheses)."""

    __slots__ = ("parent", "sym", "last", "hist", "partial", "score", "text")

    def __init__(self, parent, sym: str, last: int, hist: tuple, partial: str, score: float):
        self.parent = parent
        self.sym = sym          # symbol appended to parent ("" for the root)
        self.last = last        # id of the last emitted non-blank token (-1: none)
        self.hist = hist        # word history for the LM (starts with <s>)
        self.partial = partial  # the word being spelled ("" right after a space)
        self.score = score      # accumulated LM / bonus / penalty score
        self.text: str | None = None

    def get_text(self) -> str:
        if self.text is None:
            parts = []
            node = self
            while node is not None:
                parts.append(node.sym)
                node = node.parent
            self.text = "".join(reversed(parts))
        return self.text


class _Scorer:
    """Word-level scoring shared by all frames of one decode."""

    def __init__(self, lm, lm_weight, word_bonus, lexicon, oov_penalty, hard_lexicon):
        self.lm = lm
        self.lm_weight = lm_weight
        self.word_bonus = word_bonus
        self.lexicon = lexicon
        self.oov_penalty = oov_penalty
        self.hard = hard_lexicon
        self.ctx_len = (lm.order - 1) if lm is not None else 0

    def extend_char(self, node: _Node, sym: str) -> float | None:
        """Score delta for appending ``sym`` to the current word (None: forbidden)."""
        if self.lexicon is None:
            return 0.0
        was_ok = self.lexicon.is_prefix(node.partial)
        if not was_ok:
            return 0.0  # already penalised once for this word
        if self.lexicon.is_prefix(node.partial + sym):
            return 0.0
        return None if self.hard else self.oov_penalty

    def complete_word(self, node: _Node) -> tuple[float | None, tuple]:
        """Score delta and new history when ``node.partial`` is completed as a word."""
        word = node.partial
        delta = self.word_bonus
        if self.lexicon is not None and word not in self.lexicon:
            if self.hard:
                return None, node.hist
            if self.lexicon.is_prefix(word):
                delta += self.oov_penalty  # a proper prefix only: not penalised so far
        hist = node.hist
        if self.lm is not None:
            delta += self.lm_weight * self.lm.score(hist, word)
            hist = (hist + (word,))[-self.ctx_len:] if self.ctx_len else ()
        return delta, hist

    def end(self, node: _Node) -> float | None:
        """Score delta at the end of the utterance (last word + </s>)."""
        delta = 0.0
        hist = node.hist
        if node.partial:
            d, hist = self.complete_word(node)
            if d is None:
                return None
            delta += d
        if self.lm is not None:
            delta += self.lm_weight * self.lm.score(hist, EOS)
        return delta


def beam_search(log_probs, vocab: Sequence[str], beam_size: int = 16,
                lm: WordNgramLM | None = None, lm_weight: float = 0.5,
                word_bonus: float = 0.0, lexicon: Lexicon | None = None,
                oov_penalty: float = -5.0, hard_lexicon: bool = False,
                prune_logp: float = -10.0, token_top_k: int | None = 12,
                blank: int = 0, return_score: bool = False):
    """CTC prefix beam search for one utterance; returns the best string.

    Args:
        log_probs: ``(T, V)`` log-probabilities (numpy array or tensor); trim padding
            before calling (see :func:`beam_search_batch`).
        vocab: index -> symbol; ``vocab[blank]`` is the blank, ``" "`` separates words.
        beam_size: hypotheses kept after each frame.
        lm: optional word n-gram LM (natural-log scores) for shallow fusion; a word's
            score ``lm_weight * log P(word | history)`` is added when it is completed.
        word_bonus: added per completed word (counteracts the LM's bias to short output).
        lexicon: optional :class:`Lexicon`; a word that leaves the lexicon's prefix set
            costs ``oov_penalty`` once (or, with ``hard_lexicon=True``, is dropped).
        prune_logp: per frame only tokens with log-prob >= this are expanded (the
            frame's best token is always expanded) ...
        token_top_k: ... and at most this many of them (None: no cap).
        return_score: also return the hypothesis' total score.
    """
    lp = _to_numpy_2d(log_probs)
    T, V = lp.shape
    if V != len(vocab):
        raise ValueError(f"log_probs has V={V} but vocab has {len(vocab)} symbols")
    if beam_size < 1:
        raise ValueError("beam_size must be >= 1")
    if lexicon is None and hard_lexicon:
        raise ValueError("hard_lexicon=True needs a lexicon")
    scorer = _Scorer(lm, lm_weight, word_bonus, lexicon, oov_penalty, hard_lexicon)
    sep_ids = {i for i, s in enumerate(vocab) if s == WORD_SEP and i != blank}
    syms = list(vocab)
    use_word_scoring = lm is not None or lexicon is not None or word_bonus != 0.0

    start_hist = (BOS,) if (lm is not None and lm.order > 1) else ()
    root = _Node(None, "", -1, start_hist, "", 0.0)
    # beams: node -> (log p ending in blank, log p ending in non-blank)
    beams: dict[_Node, list[float]] = {root: [0.0, _NEG_INF]}
    # (parent, token) -> child, so that a prefix reached twice is one hypothesis.  Kept
    # outside the nodes (nodes only point to their parent: no reference cycles, so
    # pruned hypotheses are freed at once instead of loading the garbage collector).
    children: dict[tuple[_Node, int], _Node] = {}

    # candidate tokens per frame, computed vectorised up front
    if token_top_k is not None and token_top_k < V:
        k = max(1, token_top_k)
        top = np.argpartition(-lp, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(V), (T, V))
    best_tok = lp.argmax(axis=1)

    lse = _lse
    for t in range(T):
        row = lp[t]
        cands = [int(c) for c in top[t] if row[c] >= prune_logp]
        b = int(best_tok[t])
        if b not in cands:
            cands.append(b)
        cand_lp = [(c, float(row[c])) for c in cands]
        nxt: dict[_Node, list[float]] = {}
        for node, (pb, pnb) in beams.items():
            ptot = lse(pb, pnb)
            for c, lpc in cand_lp:
                if c == blank:
                    e = nxt.get(node)
                    if e is None:
                        nxt[node] = [ptot + lpc, _NEG_INF]
                    else:
                        e[0] = lse(e[0], ptot + lpc)
                    continue
                if c in sep_ids and not node.partial:
                    # space at the start or after a space: normalised text unchanged
                    e = nxt.get(node)
                    if e is None:
                        nxt[node] = [_NEG_INF, ptot + lpc]
                    else:
                        e[1] = lse(e[1], ptot + lpc)
                    continue
                if c == node.last:
                    # repeat without blank collapses into the same prefix ...
                    e = nxt.get(node)
                    if e is None:
                        nxt[node] = [_NEG_INF, pnb + lpc]
                    else:
                        e[1] = lse(e[1], pnb + lpc)
                    src = pb  # ... only a blank-separated repeat extends
                else:
                    src = ptot
                if src == _NEG_INF:
                    continue
                child = children.get((node, c))
                if child is None:
                    child = _make_child(node, c, syms[c], c in sep_ids, scorer,
                                        use_word_scoring)
                    children[(node, c)] = child
                if child.score == _NEG_INF:
                    continue  # forbidden by the hard lexicon
                e = nxt.get(child)
                if e is None:
                    nxt[child] = [_NEG_INF, src + lpc]
                else:
                    e[1] = lse(e[1], src + lpc)
        if len(nxt) > beam_size:
            kept = heapq.nlargest(beam_size, nxt.items(),
                                  key=lambda kv: lse(kv[1][0], kv[1][1]) + kv[0].score)
            beams = dict(kept)
        else:
            beams = nxt
        # only hypotheses still in the beam can be extended again
        children = {k: v for k, v in children.items() if k[0] in beams}

    # final scoring: complete the last word, add </s>, merge equal texts
    finals: dict[str, float] = {}
    for node, (pb, pnb) in beams.items():
        if use_word_scoring:
            d = scorer.end(node)
            if d is None:
                continue
        else:
            d = 0.0
        total = lse(pb, pnb) + node.score + d
        text = _collapse_spaces(node.get_text())
        prev = finals.get(text)
        finals[text] = total if prev is None else lse(prev, total)
    if not finals:
        best_text, best_score = "", _NEG_INF  # every hypothesis violated the hard lexicon
    else:
        best_text, best_score = max(finals.items(), key=lambda kv: kv[1])
    return (best_text, best_score) if return_score else best_text


def _make_child(node: _Node, c: int, sym: str, is_sep: bool, scorer: _Scorer,
                use_word_scoring: bool) -> _Node:
    if not use_word_scoring:
        if is_sep:
            return _Node(node, sym, c, node.hist, "", node.score)
        return _Node(node, sym, c, node.hist, node.partial + sym, node.score)
    if is_sep:
        delta, hist = scorer.complete_word(node)
        if delta is None:
            return _Node(node, sym, c, node.hist, "", _NEG_INF)
        return _Node(node, sym, c, hist, "", node.score + delta)
    delta = scorer.extend_char(node, sym)
    if delta is None:
        return _Node(node, sym, c, node.hist, node.partial + sym, _NEG_INF)
    return _Node(node, sym, c, node.hist, node.partial + sym, node.score + delta)


def beam_search_batch(log_probs, lengths, vocab: Sequence[str], **kwargs) -> list[str]:
    """:func:`beam_search` over a batch ``(B, T, V)`` with valid lengths ``(B,)``."""
    if isinstance(log_probs, torch.Tensor):
        arr = log_probs.detach().to(torch.float64).cpu().numpy()
    else:
        arr = np.asarray(log_probs, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"log_probs must be (B, T, V), got shape {arr.shape}")
    B, T, _ = arr.shape
    if lengths is None:
        lens = [T] * B
    else:
        lens = [int(x) for x in np.asarray(
            lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths).reshape(-1)]
        if len(lens) != B:
            raise ValueError(f"lengths has {len(lens)} entries for a batch of {B}")
    return [beam_search(arr[b, :max(0, min(lens[b], T))], vocab, **kwargs) for b in range(B)]
