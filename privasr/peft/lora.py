"""LoRA (Hu et al., 2021) and its random-projection variant, built from plain ``nn.Linear``.

    y = x Wᵀ + b + (α/r) · B(A(x))        W, b frozen;  A: in → r,  B: r → out (zero-initialised)

``LoRALinear`` *is* an ``nn.Linear`` (same ``weight``/``bias`` names, so a pre-trained state dict
loads unchanged) whose low-rank update lives in two child ``nn.Linear`` modules ``lora_A`` and
``lora_B``. Per-example gradient engines therefore see only ordinary layers: ``vmap`` engines
replicate the trainable ``lora_A.weight``/``lora_B.weight``, and hook-based engines hook the two
children like any other linear. The frozen ``weight`` gets no per-example gradient at all.

Random projection (``train_a=False``; the ``rp`` method). With A frozen at its random
initialisation only B is trained, so the gradient DP-SGD clips and noises is
∂L/∂B = (α/r)·(∂L/∂W)·Aᵀ -- each example's full weight gradient projected onto r fixed random
directions -- and the update reaches the weight as ΔW = (α/r)·ΔB·A. That is DP random
projection of the gradient done exactly and cheaply (the full per-example gradient is never
formed), with half of LoRA's trainable parameters for square layers (LoRA-FA, Zhang et al. 2023).

``merge_lora(model)`` folds every update into its base weight, W ← W + (α/r)·B·A, and turns each
``LoRALinear`` back into a plain ``nn.Linear``: the merged model has the original architecture and
state-dict keys, and computes the same outputs.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoRALinear", "add_lora", "merge_lora", "lora_layers"]


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable rank-``rank`` update (see the module docstring)."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, train_a: bool = True) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank {rank} exceeds min(in, out) = "
                             f"{min(base.in_features, base.out_features)} of a "
                             f"{base.in_features}->{base.out_features} linear layer")
        nn.Module.__init__(self)           # no fresh weight: the base layer's tensors are reused
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # nn.Linear's own init
        nn.init.zeros_(self.lora_B.weight)                              # starts as the base layer
        self.lora_A.weight.requires_grad_(train_a)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = float(alpha) / rank

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_B(self.lora_A(x))

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (W + (α/r)·B·A, same bias)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.scale * (self.lora_B.weight @ self.lora_A.weight))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, "
                f"train_a={self.lora_A.weight.requires_grad}")


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def add_lora(model: nn.Module, targets: Sequence[str], *, rank: int, alpha: float,
             train_a: bool = True, within: Callable[[str], bool] | None = None) -> list[str]:
    """Replace every ``nn.Linear`` whose module name matches a pattern (and, given ``within``,
    for which ``within(name)`` holds) by a ``LoRALinear``.

    Returns the wrapped module names. Each pattern must match at least one linear layer.
    """
    if not targets:
        raise ValueError("finetune.lora_targets is empty: name the linear layers to adapt")
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen, used = [], {p: 0 for p in targets}
    for n in linears:
        hit = [p for p in targets if fnmatchcase(n, p)]
        for p in hit:
            used[p] += 1
        if hit:
            chosen.append(n)
    dead = [p for p, k in used.items() if k == 0]
    if dead:
        raise ValueError(f"finetune.lora_targets pattern(s) {dead} match no nn.Linear module; "
                         f"linear layers are named like {linears[:6]}")
    for n in chosen if within is None else [n for n in chosen if within(n)]:
        _set_child(model, n, LoRALinear(model.get_submodule(n), rank=rank, alpha=alpha,
                                        train_a=train_a))
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight, in place; return how many were merged."""
    layers = lora_layers(model)
    for n, m in layers.items():
        merged = m.merged()
        merged.weight.requires_grad_(m.weight.requires_grad)
        if merged.bias is not None:
            merged.bias.requires_grad_(m.bias.requires_grad)
        _set_child(model, n, merged)
    return len(layers)
