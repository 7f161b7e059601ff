"""Clip one client's model delta: the unit of federated DP is a client (one speaker).

The per-tensor math is the engines' (``privasr.clipping.engines``): the same ``LayerSpec``
(global / per-layer bounds / "uniform" rule) and the same ``clip_one``, so a delta is clipped
exactly like a per-example gradient would be. The scope is validated by ``ClipPolicy``; its
unit is ``batch`` there (one whole delta is one unit), noise and denominator are the server's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import Tensor

from privasr.clipping.engines import LayerSpec, clip_one, unit_norms, resolve_layers
from privasr.clipping.policy import ClipPolicy

__all__ = ["DeltaClipper", "ClippedDelta", "clip_policy"]


def clip_policy(clipping: str, clip_norm: float | None,
                layer_bounds: Mapping[str, float] | None) -> ClipPolicy:
    """The ClipPolicy (scope and bounds) of a ``dp.clipping`` choice."""
    if clipping == "global":
        return ClipPolicy(unit="batch", clip_norm=clip_norm, scope="global")
    if clipping == "per_layer_uniform":
        return ClipPolicy(unit="batch", clip_norm=clip_norm, scope="per_layer",
                          per_layer_rule="uniform")
    if clipping == "per_layer":
        return ClipPolicy(unit="batch", clip_norm=None, scope="per_layer",
                          layer_bounds=dict(layer_bounds or {}))
    raise ValueError(f"clipping={clipping!r}; valid: global, per_layer, per_layer_uniform")


@dataclass
class ClippedDelta:
    delta: dict[str, Tensor]
    norm: float        # L2 norm of the delta before clipping
    clipped: bool


class DeltaClipper:
    """Clips deltas over the trainable tensors ``names``; ``bound`` is the total bound C."""

    def __init__(self, policy: ClipPolicy, names: Sequence[str]) -> None:
        self.policy = policy
        self.spec: LayerSpec = resolve_layers(policy, list(names))
        self.bound = self.spec.total_bound(policy.clip_norm or 0.0)

    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.names

    def __call__(self, delta: Mapping[str, Tensor]) -> ClippedDelta:
        missing = [n for n in self.spec.names if n not in delta]
        if missing:
            raise ValueError(f"client delta lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        g = {n: delta[n] for n in self.spec.names}
        layer, total = unit_norms(g, self.spec)
        out, clipped = clip_one(g, layer, total, self.spec, self.policy.clip_norm)
        return ClippedDelta(out, total, clipped)
