"""Word n-gram language model and prefix lexicon for CTC shallow fusion.

:class:`WordNgramLM` is an interpolated Kneser-Ney model (Chen & Goodman 1998, one
discount per order) built in pure Python from an iterable of transcripts.  All scores
are **natural-log** probabilities (the same base as the acoustic log-softmax), so
``score(...)`` can be added to CTC log-probs directly.  ARPA export converts to log10.

Events: every sentence is ``<s> w1 ... wn </s>``.  The model predicts the words seen in
training, ``</s>``, and ``<unk>`` (any word not seen); ``<s>`` is only ever context.
The unigram level interpolates with a uniform distribution over those predictable
events, so for every context ``sum(exp(score(ctx, w)) for w in vocabulary | {</s>, <unk>})
== 1`` and an unseen word gets the explicit, context-dependent ``<unk>`` probability.

Privacy note: the saved model holds n-gram counts of the training transcripts, i.e.
it can reproduce rare phrases verbatim; treat it with the same care as the transcripts.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Iterable, Iterator, Sequence

from privasr.atomic import atomic_write_text

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
_FORMAT = "privasr.word_ngram_lm"
_FORMAT_VERSION = 1


def _words(sentence: str | Sequence[str]) -> list[str]:
    if isinstance(sentence, str):
        return sentence.split()
    return [w for w in sentence if w]


class WordNgramLM:
    """Interpolated Kneser-Ney word n-gram LM (natural-log scores).

    Build with :meth:`from_transcripts` (or ``WordNgramLM.train``); query with
    :meth:`score`.  ``order`` is the n of the n-gram (2 = bigram, 3 = trigram).
    """

    def __init__(self, order: int, counts: list[dict[tuple[str, ...], int]],
                 discounts: list[float]):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if len(counts) != order or len(discounts) != order:
            raise ValueError("need one count table and one discount per order")
        self.order = order
        # counts[k-1][(w1..wk)]: Kneser-Ney adjusted counts of k-grams (raw counts at the
        # highest order and for k-grams starting with <s>; continuation counts otherwise).
        self._counts = counts
        self._discounts = [float(d) for d in discounts]
        self._build_tables()

    # ------------------------------------------------------------------ training
    @classmethod
    def from_transcripts(cls, transcripts: Iterable[str | Sequence[str]], order: int = 3,
                         discount: float | None = None) -> "WordNgramLM":
        """Train on transcripts (strings are split on whitespace; words kept as given).

        ``discount``: fixed absolute discount for every order in (0, 1); by default each
        order's discount is estimated as n1 / (n1 + 2 n2) from its count-of-counts.
        """
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if discount is not None and not 0.0 < discount < 1.0:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        raw: list[dict[tuple[str, ...], int]] = [defaultdict(int) for _ in range(order)]
        n_sent = 0
        for sent in transcripts:
            words = _words(sent)
            if not words:
                continue
            n_sent += 1
            for w in words:
                if w in (BOS, EOS, UNK):
                    raise ValueError(f"transcripts may not contain the reserved token {w!r}")
            toks = [BOS] + words + [EOS]
            for k in range(1, order + 1):
                table = raw[k - 1]
                for i in range(len(toks) - k + 1):
                    g = tuple(toks[i:i + k])
                    if k == 1 and g[0] == BOS:
                        continue  # <s> is never predicted
                    table[g] += 1
        if n_sent == 0:
            raise ValueError("cannot build a language model from zero non-empty transcripts")

        # Kneser-Ney adjusted counts: for orders below the highest, the count of a k-gram
        # is the number of distinct words seen to its left, except for k-grams that start
        # with <s> (nothing can precede them), which keep their raw count.
        counts: list[dict[tuple[str, ...], int]] = [dict() for _ in range(order)]
        counts[order - 1] = dict(raw[order - 1])
        for k in range(order - 1, 0, -1):
            cont: dict[tuple[str, ...], int] = defaultdict(int)
            for g in raw[k]:  # (k+1)-grams
                cont[g[1:]] += 1
            adj: dict[tuple[str, ...], int] = {}
            for g, c in raw[k - 1].items():
                adj[g] = c if g[0] == BOS else cont.get(g, c)
            counts[k - 1] = adj

        discounts = []
        for k in range(order):
            if discount is not None:
                discounts.append(discount)
                continue
            n1 = sum(1 for c in counts[k].values() if c == 1)
            n2 = sum(1 for c in counts[k].values() if c == 2)
            d = n1 / (n1 + 2 * n2) if n1 > 0 and n2 > 0 else 0.5
            discounts.append(min(max(d, 0.1), 0.9))
        return cls(order, counts, discounts)

    train = from_transcripts

    # ------------------------------------------------------------------ tables
    def _build_tables(self) -> None:
        # Per context h at order k: total count c(h) and N1+(h .) (distinct followers).
        self._ctx_total: list[dict[tuple[str, ...], int]] = []
        self._ctx_types: list[dict[tuple[str, ...], int]] = []
        for k in range(1, self.order + 1):
            tot: dict[tuple[str, ...], int] = defaultdict(int)
            typ: dict[tuple[str, ...], int] = defaultdict(int)
            for g, c in self._counts[k - 1].items():
                if c <= 0:
                    raise ValueError(f"non-positive count for n-gram {g!r}")
                tot[g[:-1]] += c
                typ[g[:-1]] += 1
            self._ctx_total.append(dict(tot))
            self._ctx_types.append(dict(typ))
        self._vocab = frozenset(g[0] for g in self._counts[0] if g[0] != EOS)
        # predictable events: seen words, </s>, <unk>
        self._n_events = len(self._vocab) + 2
        self._cache: dict[tuple[tuple[str, ...], str], float] = {}

    @property
    def vocabulary(self) -> frozenset[str]:
        """Words seen in training (without ``<s>``, ``</s>``, ``<unk>``)."""
        return self._vocab

    @property
    def discounts(self) -> tuple[float, ...]:
        return tuple(self._discounts)

    def __contains__(self, word: str) -> bool:
        return word in self._vocab

    # ------------------------------------------------------------------ scoring
    def _prob(self, ctx: tuple[str, ...], word: str) -> float:
        """Interpolated KN probability P(word | ctx), len(ctx) <= order - 1."""
        # unigram level: discounted continuation counts + uniform over predictable events
        k = 1
        d = self._discounts[0]
        total = self._ctx_total[0].get((), 0)
        c = self._counts[0].get((word,), 0)
        p = (max(c - d, 0.0) + d * self._ctx_types[0].get((), 0) / self._n_events) / total
        for k in range(2, len(ctx) + 2):
            h = ctx[len(ctx) - (k - 1):]
            total = self._ctx_total[k - 1].get(h)
            if not total:
                continue  # unseen context: P(w|h) = P_lower(w|h')
            d = self._discounts[k - 1]
            c = self._counts[k - 1].get(h + (word,), 0)
            p = (max(c - d, 0.0) + d * self._ctx_types[k - 1][h] * p) / total
        return p

    def score(self, prev_words: Sequence[str], word: str) -> float:
        """Natural-log P(word | prev_words).

        ``prev_words`` is the history, oldest first; only the last ``order - 1`` words
        are used.  Put ``"<s>"`` first to condition on the sentence start (``()`` means
        no context, i.e. the unigram/backoff distribution).  ``word`` may be ``"</s>"``;
        a word outside :attr:`vocabulary` is scored as ``<unk>``.
        """
        if word not in self._vocab and word != EOS:
            word = UNK
        n = self.order - 1
        ctx = tuple(prev_words[len(prev_words) - n:]) if n and prev_words else ()
        ctx = tuple(w if (w in self._vocab or w == BOS) else UNK for w in ctx)
        key = (ctx, word)
        s = self._cache.get(key)
        if s is None:
            s = math.log(self._prob(ctx, word))
            if len(self._cache) < 1_000_000:
                self._cache[key] = s
        return s

    def score_sentence(self, sentence: str | Sequence[str], eos: bool = True) -> float:
        """Natural-log probability of a whole sentence (with ``</s>`` when ``eos``)."""
        words = _words(sentence)
        hist: list[str] = [BOS]
        total = 0.0
        for w in words + ([EOS] if eos else []):
            total += self.score(hist, w)
            hist.append(w)
        return total

    def perplexity(self, sentences: Iterable[str | Sequence[str]]) -> float:
        """Per-token perplexity (words plus ``</s>``) of ``sentences``."""
        logp, n = 0.0, 0
        for s in sentences:
            words = _words(s)
            logp += self.score_sentence(words)
            n += len(words) + 1
        if n == 0:
            raise ValueError("perplexity of an empty set of sentences")
        return math.exp(-logp / n)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "order": self.order,
            "log_base": "e",
            "smoothing": "interpolated_kneser_ney",
            "discounts": self._discounts,
            "counts": [[[list(g), c] for g, c in sorted(table.items())]
                       for table in self._counts],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WordNgramLM":
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a privasr word n-gram LM (format={data.get('format')!r})")
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported LM format version {data.get('version')!r}")
        order = int(data["order"])
        counts = [{tuple(g): int(c) for g, c in table} for table in data["counts"]]
        for k, table in enumerate(counts, start=1):
            if any(len(g) != k for g in table):
                raise ValueError(f"malformed LM file: wrong n-gram length in order {k}")
        return cls(order, counts, data["discounts"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as JSON, atomically (temp file in the same dir + os.replace)."""
        atomic_write_text(path, json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordNgramLM":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ------------------------------------------------------------------ ARPA
    def _iter_arpa(self) -> Iterator[tuple[int, list[tuple[float, tuple[str, ...], float | None]]]]:
        log10 = math.log(10.0)
        for k in range(1, self.order + 1):
            entries: list[tuple[float, tuple[str, ...], float | None]] = []
            grams = sorted(self._counts[k - 1])
            if k == 1:
                grams = [(BOS,)] + grams + [(UNK,)]
            for g in grams:
                if g == (BOS,):
                    lp = -99.0
                else:
                    lp = math.log(self._prob(g[:-1], g[-1])) / log10
                bow = None
                if k < self.order:
                    tot = self._ctx_total[k].get(g)
                    if tot:
                        gamma = self._discounts[k] * self._ctx_types[k][g] / tot
                        bow = math.log(gamma) / log10
                    else:
                        bow = 0.0
                entries.append((lp, g, bow))
            yield k, entries

    def to_arpa(self) -> str:
        """The model in ARPA format (log10). Interpolated probabilities are written as
        n-gram probabilities and the interpolation weights as back-off weights, which
        reproduces :meth:`score` exactly (up to the base) in an ARPA reader."""
        sections = list(self._iter_arpa())
        lines = ["", "\\data\\"]
        lines += [f"ngram {k}={len(e)}" for k, e in sections]
        for k, entries in sections:
            lines += ["", f"\\{k}-grams:"]
            for lp, g, bow in entries:
                text = f"{lp:.6f}\t{' '.join(g)}"
                if bow is not None:
                    text += f"\t{bow:.6f}"
                lines.append(text)
        lines += ["", "\\end\\", ""]
        return "\n".join(lines)

    def __repr__(self) -> str:
        sizes = ", ".join(str(len(t)) for t in self._counts)
        return f"WordNgramLM(order={self.order}, vocab={len(self._vocab)}, ngrams=[{sizes}])"


class Lexicon:
    """Set of allowed words with O(1) word-prefix queries (a flattened prefix trie).

    Used by the beam search to spot partial words that cannot become a lexicon word.
    """

    def __init__(self, words: Iterable[str]):
        self._words = frozenset(w for w in words if w)
        prefixes = {""}
        for w in self._words:
            for i in range(1, len(w) + 1):
                prefixes.add(w[:i])
        self._prefixes = frozenset(prefixes)

    @classmethod
    def from_transcripts(cls, transcripts: Iterable[str | Sequence[str]]) -> "Lexicon":
        return cls(w for t in transcripts for w in _words(t))

    @classmethod
    def from_lm(cls, lm: WordNgramLM) -> "Lexicon":
        return cls(lm.vocabulary)

    def is_prefix(self, partial: str) -> bool:
        """True when ``partial`` is a prefix of (or equal to) some lexicon word."""
        return partial in self._prefixes

    def __contains__(self, word: str) -> bool:
        return word in self._words

    def __len__(self) -> int:
        return len(self._words)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._words))

    @property
    def words(self) -> frozenset[str]:
        return self._words
