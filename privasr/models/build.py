"""The model a recipe describes (``model.size``, ``model.dropout``)."""

from __future__ import annotations

from privasr.config import TrainConfig
from privasr.models.conformer import ConformerCTC, config_for

__all__ = ["build_model"]


def build_model(cfg: TrainConfig, vocab_size: int) -> ConformerCTC:
    return ConformerCTC(config_for(cfg.model.size, vocab_size=vocab_size,
                                   dropout=cfg.model.dropout))
