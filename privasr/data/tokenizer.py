"""Character tokenizer for CTC: id 0 is the blank, then space, a-z and the apostrophe."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

BLANK = "<blank>"


class TokenizerError(ValueError):
    """Text holds a character the tokenizer cannot encode."""


@dataclass(frozen=True)
class CharTokenizer:
    symbols: tuple[str, ...] = (BLANK, " ", *string.ascii_lowercase, "'")
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.symbols)})

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str, *, where: str = "") -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            ctx = f" in {where}" if where else ""
            raise TokenizerError(f"character {e.args[0]!r}{ctx} is not in the tokenizer's "
                                 f"alphabet (lowercase a-z, space, apostrophe): {text!r}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != 0)
