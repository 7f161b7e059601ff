"""Corpora, features and batching. Importing the package registers every text source."""

from privasr.data import assistant_text as _assistant_text  # noqa: F401  (source "assistant")
