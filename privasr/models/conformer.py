"""Conformer-CTC acoustic model, batch-first, in one file.

Design goals: small and readable, and safe for per-example gradients (DP-SGD):
no BatchNorm, no in-place ops, no nn.MultiheadAttention, and no interaction
between the examples of a batch -- padded frames never reach a valid frame, so
an example's output is the same alone or in a padded batch.

    feats (B, T, 80) log-mel @ 100 frames/s
      -> Conv2d subsampling x4 (two 3x3 stride-2 convs, no padding) -> Linear -> + sinusoidal positions
      -> N x ConformerBlock (FFN/2, MHSA, conv module, FFN/2, LayerNorm)      [= model.encoder]
      -> Linear -> log_softmax                                               [= model.ctc_head]
    log_probs (B, T', V) @ 25 frames/s, T' = ((T - 1) // 2 - 1) // 2, CTC blank = 0

Usage:

    from privasr.models.conformer import ConformerCTC, config_for
    model = ConformerCTC(config_for("small", vocab_size=29))
    log_probs, out_lens = model(feats, feat_lens)          # (B, T', V), (B,)
    loss = F.ctc_loss(log_probs.transpose(0, 1), targets, out_lens, target_lens, blank=0)

Sizes: "tiny" (0.24M params, tests), "small" (3.1M, the CPU demo), "base" (29M, GPUs).
Inputs need T >= 7 frames so that every example keeps at least one output frame.

Per-example gradients: ``vmap(grad(loss), randomness="different")`` over
``torch.func.functional_call(model, params, (feats[None], lens[None]))`` works (attention is
an explicit softmax because SDPA's fused CPU kernel has no batching rule). F.ctc_loss has no
batching rule either; see ``ctc_sum`` in tests/test_conformer.py for a vmap-safe wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConformerConfig", "SIZES", "config_for", "ConformerCTC", "ConformerEncoder",
           "count_parameters", "conv_output_length"]


@dataclass(frozen=True)
class ConformerConfig:
    n_mels: int = 80
    d_model: int = 144
    n_heads: int = 4
    n_layers: int = 6
    ff_mult: int = 4
    conv_kernel: int = 15
    dropout: float = 0.1
    vocab_size: int = 29
    sub_channels: int = 64  # channels of the Conv2d front end; its cost dominates a CPU step


SIZES: dict[str, ConformerConfig] = {
    "tiny": ConformerConfig(d_model=64, n_heads=4, n_layers=2, conv_kernel=15, sub_channels=32),
    "small": ConformerConfig(d_model=144, n_heads=4, n_layers=6, conv_kernel=15, sub_channels=64),
    "base": ConformerConfig(d_model=256, n_heads=4, n_layers=18, conv_kernel=31, sub_channels=256),
}


def config_for(size: str, **overrides) -> ConformerConfig:
    """The named preset, with any field overridden (e.g. ``vocab_size=32, dropout=0.0``)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    return replace(SIZES[size], **overrides)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def conv_output_length(lengths: Tensor) -> Tensor:
    """Length after one kernel-3, stride-2, unpadded conv: (L - 1) // 2, never negative."""
    return torch.clamp((lengths - 1) // 2, min=0)


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(length, dim) fixed sin/cos position table (Vaswani et al., 2017)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    angles = pos * freq                                            # (length, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim].to(dtype)


class Conv2dSubsampling(nn.Module):
    """(B, T, n_mels) -> (B, T', d_model) with T' = ((T - 1) // 2 - 1) // 2.

    Unpadded convs: an output frame < T' only sees input frames < T, so padding never leaks in.
    """

    def __init__(self, n_mels: int, d_model: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, kernel_size=3, stride=2)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=2)
        freq = (((n_mels - 1) // 2) - 1) // 2
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(self.conv1(x.unsqueeze(1)))                     # (B, C, T/2, F/2)
        x = F.silu(self.conv2(x))                                  # (B, C, T/4, F/4)
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f))    # (B, T/4, d_model)


class FeedForward(nn.Module):
    def __init__(self, d: int, mult: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, mult * d)
        self.down = nn.Linear(mult * d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.silu(self.up(self.norm(x)))))


class SelfAttention(nn.Module):
    """Multi-head self-attention from nn.Linear projections; padded keys are masked out."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        assert d % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        x = self.norm(x)
        q, k, v = (lin(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))                   # (B, H, T, Dh)
        # Explicit softmax attention: has vmap batching rules everywhere (SDPA's fused CPU kernel
        # falls back to a slow per-example loop under torch.func.vmap). Only keys are masked, so
        # no row is all-masked; padded query rows are garbage but never read by valid frames.
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)         # (B, H, T, T)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        y = self.attn_dropout(scores.softmax(dim=-1)) @ v                 # (B, H, T, Dh)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv, LayerNorm, SiLU, pointwise conv.

    LayerNorm (per frame, over channels) replaces the usual BatchNorm; padded frames are zeroed
    before the depthwise conv so they look exactly like the conv's own zero padding.
    """

    def __init__(self, d: int, kernel: int, dropout: float):
        super().__init__()
        assert kernel % 2 == 1, "conv_kernel must be odd ('same' padding)"
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * d)          # pointwise conv == per-frame linear
        self.dw = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.dw_norm = nn.LayerNorm(d)
        self.pw2 = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = F.glu(self.pw1(self.norm(x)), dim=-1)                         # (B, T, d)
        x = x.masked_fill(~mask[..., None], 0.0)
        x = self.dw(x.transpose(1, 2)).transpose(1, 2)
        x = self.pw2(F.silu(self.dw_norm(x)))
        return self.dropout(x)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        d = cfg.d_model
        self.ff1 = FeedForward(d, cfg.ff_mult, cfg.dropout)
        self.attn = SelfAttention(d, cfg.n_heads, cfg.dropout)
        self.conv = ConvModule(d, cfg.conv_kernel, cfg.dropout)
        self.ff2 = FeedForward(d, cfg.ff_mult, cfg.dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, mask)
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class ConformerEncoder(nn.Module):
    """(B, T, n_mels), (B,) -> (B, T', d_model), (B,).

    ``start_block = k > 0`` (a run-time setting, not saved): the inputs are already the
    outputs of the front end and blocks ``0..k-1`` (``prefix(feats, lens, k)``, cached once per
    utterance by ``privasr.peft.frozen_prefix`` when those are frozen), shape (B, T', d_model)
    with T' lengths, and only blocks ``k..`` run.
    """

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.subsample = Conv2dSubsampling(cfg.n_mels, cfg.d_model, cfg.sub_channels)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.n_layers))
        self.start_block = 0

    def prefix(self, feats: Tensor, feat_lens: Tensor, stop: int) -> tuple[Tensor, Tensor]:
        """The front end and blocks ``0..stop-1``: (B, T', d_model), (B,) output lengths."""
        valid_in = length_mask(feat_lens, feats.shape[1])
        feats = feats.masked_fill(~valid_in[..., None], 0.0)      # hygiene: NaN/inf padding stays out
        x = self.subsample(feats)
        out_lens = conv_output_length(conv_output_length(feat_lens))
        x = self.dropout(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype))
        mask = length_mask(out_lens, x.shape[1])
        for block in self.blocks[:stop]:
            x = block(x, mask)
        return x, out_lens

    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        k = self.start_block
        if k == 0:
            return self.prefix(feats, feat_lens, len(self.blocks))
        x, out_lens = feats, feat_lens
        mask = length_mask(out_lens, x.shape[1])
        for block in self.blocks[k:]:
            x = block(x, mask)
        return x, out_lens


class ConformerCTC(nn.Module):
    """Conformer encoder + linear CTC head (blank = 0). Re-initialise ``ctc_head`` for a new vocab."""

    subsampling: int = 4  # input frames per output frame

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ConformerEncoder(cfg)
        self.ctc_head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def output_lengths(self, feat_lens: Tensor) -> Tensor:
        if self.encoder.start_block:          # inputs are already block outputs
            return feat_lens
        return conv_output_length(conv_output_length(feat_lens))

    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """feats (B, T, n_mels), feat_lens (B,) -> log_probs (B, T', V), out_lens (B,)."""
        x, out_lens = self.encoder(feats, feat_lens)
        return F.log_softmax(self.ctc_head(x), dim=-1), out_lens
