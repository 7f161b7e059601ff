"""privasr: train speech recognition models that memorize less, prove it, and bound it."""

__version__ = "0.1.0"
