"""Residual bottleneck adapters (Houlsby et al., 2019) after each Conformer block.

    block'(x, mask) = h + up(SiLU(down(h))),   h = block(x, mask)      up zero-initialised

Two plain ``nn.Linear`` per block (d → r → d), so per-example engines need nothing special;
the block itself stays frozen. At initialisation the adapted model computes exactly what the
pre-trained one did. Adapters add layers, so unlike LoRA they cannot be merged away: a
checkpoint of an adapted model is loaded by rebuilding the adapters first
(``privasr.peft.apply.rebuild``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Adapter", "AdaptedBlock", "add_adapters"]


class Adapter(nn.Module):
    def __init__(self, d: int, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"finetune.adapter_dim must be >= 1 (got {dim})")
        self.down = nn.Linear(d, dim)
        self.up = nn.Linear(dim, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.silu(self.down(x)))


class AdaptedBlock(nn.Module):
    """A (frozen) block followed by a residual adapter; same call signature as the block."""

    def __init__(self, block: nn.Module, d: int, dim: int) -> None:
        super().__init__()
        self.block = block
        self.adapter = Adapter(d, dim)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.adapter(self.block(x, *args, **kwargs))


def add_adapters(model: nn.Module, dim: int, first: int = 0) -> int:
    """Put an adapter after every block ``first..`` of ``model.encoder.blocks`` (or of the
    blocks ``model.peft_blocks()`` names, with their width); return how many."""
    if hasattr(model, "peft_blocks"):
        blocks, d = model.peft_blocks()
    else:
        blocks = getattr(getattr(model, "encoder", None), "blocks", None)
        d = getattr(getattr(model, "cfg", None), "d_model", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError("adapters need a model with encoder.blocks (a ModuleList of blocks)")
    for i in range(first, len(blocks)):
        blocks[i] = AdaptedBlock(blocks[i], d, dim)
    return len(blocks) - first
