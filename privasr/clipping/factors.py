"""clip(g_u ; C, scope) for every unit, scope and bound: the clip factors, written once.

Every clipper -- the reference engine (one unit at a time), the vectorized / bookkeeping
engines (stacks of units), per-core clipping under torchrun (one unit per rank) and the
federated server (one client delta per unit) -- measures its units' per-tensor norms and
asks :func:`clip_factors` for f with clip(g_u)_l = f_ul · g_ul (docs/one-equation.md).

Scopes (a "layer" is one trainable parameter tensor; :class:`LayerSpec`):
    global     f_u = min(1, C/‖g_u‖)                        (‖g_u‖ = 0 → 1)
    uniform    ml-pfl4asr ``clip_layer_grads``: unchanged if ‖g_u‖ < C, else every tensor to
               norm C/√L: f_ul = C/√L / (‖g_ul‖ + 1e-10)
    layers     each tensor to its own bound: f_ul = min(1, C_l/‖g_ul‖); total bound √(Σ C_l²)
Bounds: ``fixed`` and ``quantile`` give C (the bound in force this step); ``adaptive_min``
(APCC) gives the factors for C = 1 -- the unit's direction -- to be multiplied by
C_t = min_u ‖g_u‖ once every unit is measured (:func:`adaptive_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Sequence

import torch
from torch import Tensor, nn

from privasr.clipping.policy import ClipPolicy
from privasr.errors import PolicyError

__all__ = ["LayerSpec", "resolve_layers", "trainable_parameters", "clip_factors",
           "adaptive_bound", "UNIFORM_EPS", "UNIFORM_ZERO_RTOL"]

UNIFORM_EPS = 1e-10  # ml-pfl4asr clip_layer_grads: g_l / (‖g_l‖ + 1e-10) · C/√L
# Deviation from ml-pfl4asr: under the uniform rule a tensor whose norm is below
# UNIFORM_ZERO_RTOL × (the unit's total norm) is rounding noise of a gradient that is exactly 0
# in exact arithmetic (e.g. attention key biases: softmax ignores a per-row constant), and
# rescaling it to C/√L would inject that noise at full size. Such tensors are set to 0 instead.
# (ml-pfl4asr's models have no biases, so they never meet the case.)
UNIFORM_ZERO_RTOL = 1e-6


@dataclass(frozen=True)
class LayerSpec:
    """How the scope applies to the trainable tensors ``names`` (each tensor is one layer)."""

    names: tuple[str, ...]
    mode: str                           # "global" | "uniform" | "layers"
    layer_bounds: tuple[float, ...] | None = None

    def total_bound(self, clip_norm: float | None) -> float:
        """The L2 bound of one clipped unit: C, or √(Σ C_l²) for per-tensor bounds."""
        if self.mode == "layers":
            return math.sqrt(sum(c * c for c in self.layer_bounds))
        return float(clip_norm)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def resolve_layers(policy: ClipPolicy, names: Sequence[str]) -> LayerSpec:
    """Match the policy's per-layer bounds to parameter names (raises PolicyError on misfits)."""
    names = tuple(names)
    if policy.scope == "global":
        return LayerSpec(names, "global")
    if policy.per_layer_rule == "uniform":
        return LayerSpec(names, "uniform")
    patterns = list(policy.layer_bounds.items())
    used = {pat: 0 for pat, _ in patterns}
    bounds, unmatched = [], []
    for n in names:
        for pat, c in patterns:
            if fnmatchcase(n, pat):
                bounds.append(float(c))
                used[pat] += 1
                break
        else:
            unmatched.append(n)
    dead = [pat for pat, k in used.items() if k == 0]
    if dead:
        raise PolicyError(f"layer_bounds pattern(s) {dead} match no trainable parameter (a typo, "
                          f"or every match comes earlier or is frozen); trainable names look "
                          f"like {list(names[:4])}")
    if unmatched:
        raise PolicyError(f"{len(unmatched)} trainable parameter(s) match no layer_bounds "
                          f"pattern, e.g. {unmatched[:4]}: every tensor needs a bound (add a "
                          f"catch-all '*' pattern last)")
    return LayerSpec(names, "layers", tuple(bounds))


def clip_factors(layer: Tensor, spec: LayerSpec, c: float | None, adaptive: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """(f, clipped) for U units with per-tensor L2 norms ``layer`` (U, L).

    f (U, L): clip(g_u)_l = f_ul · g_ul. clipped (U,) bool: the unit was changed (for
    ``adaptive``: True, except the global scope, where it is decided by
    :func:`adaptive_bound`). ``c``: the bound in force (ignored for per-tensor bounds and for
    ``adaptive``, whose factors are for C = 1).
    """
    total = layer.square().sum(1).sqrt()                                          # (U,)
    n_layers = layer.shape[1]
    if spec.mode == "global":
        if adaptive:
            f = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
            return f[:, None].expand(-1, n_layers), torch.ones_like(total, dtype=torch.bool)
        f = (c / total).clamp(max=1.0)                                   # total = 0 → inf → 1
        return f[:, None].expand(-1, n_layers), total > c
    if spec.mode == "uniform":
        rescale = torch.where(layer > UNIFORM_ZERO_RTOL * total[:, None],
                              1.0 / math.sqrt(n_layers) / (layer + UNIFORM_EPS),
                              torch.zeros_like(layer))
        if adaptive:
            return rescale, torch.ones_like(total, dtype=torch.bool)
        keep = total < c
        return torch.where(keep[:, None], torch.ones_like(rescale), c * rescale), ~keep
    bounds = torch.tensor(spec.layer_bounds, dtype=layer.dtype, device=layer.device)[None, :]
    return (bounds / layer).clamp(max=1.0), (layer > bounds).any(1)


def adaptive_bound(norms: Tensor, spec: LayerSpec) -> tuple[float, Tensor]:
    """APCC: (C_t = min_u ‖g_u‖ over the live units, clipped flags) for the (U,) total norms.

    Every unit is rescaled to norm C_t; under the global scope the unit(s) at the minimum are
    unchanged. NaN and no flags when there is no unit.
    """
    if norms.numel() == 0:
        return math.nan, torch.zeros(0, dtype=torch.bool)
    c = float(norms.min())
    flags = norms > c if spec.mode == "global" else torch.ones_like(norms, dtype=torch.bool)
    return c, flags
