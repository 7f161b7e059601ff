"""The model a recipe describes: ``model.family`` conformer (``model.size``, ``model.dropout``)
or hf_ctc (a local transformers CTC model directory ``model.path``; privasr.models.hf_ctc)."""

from __future__ import annotations

from torch import nn

from privasr.config import FAMILIES, TrainConfig
from privasr.errors import ConfigError
from privasr.models.conformer import ConformerCTC, config_for

__all__ = ["build_model"]


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    family = cfg.model.family
    if family == "hf_ctc":
        from privasr.models.hf_ctc import load_hf_ctc

        return load_hf_ctc(cfg.model.path, vocab_size,
                           freeze_feature_encoder=cfg.model.freeze_feature_encoder)
    if family != "conformer":
        raise ConfigError(f"model.family={family!r}; valid families: {', '.join(FAMILIES)}")
    return ConformerCTC(config_for(cfg.model.size, vocab_size=vocab_size,
                                   dropout=cfg.model.dropout))
