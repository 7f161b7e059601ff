"""Clip one client's model delta: the unit of federated DP is a client (one speaker).

The recipe's ``dp.policy`` is a ``ClipPolicy`` section like ``privacy.policy`` of ``privasr
train`` (unit ``client``; scope, bounds, per-layer rules are the same keys), so a delta is
clipped by the same factors (``privasr.clipping.factors``) as a per-example gradient. Noise and
denominator are the server's, from the same policy (``privasr.clipping.release``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from privasr.clipping.factors import LayerSpec, clip_factors, resolve_layers
from privasr.clipping.policy import ClipPolicy
from privasr.errors import PolicyError

__all__ = ["DeltaClipper", "NoClip", "ClippedDelta", "client_policy", "policy_label"]


def client_policy(fields: Mapping[str, Any], *, noise_multiplier: float = 0.0,
                  expected_cohort: float | None = None) -> ClipPolicy | None:
    """The server's ClipPolicy: the recipe's ``dp.policy`` with unit=client, the round's σ and
    the expected cohort as the denominator. An empty ``dp.policy`` ({}) is no clipping (plain
    FedAvg, the non-private reference): None, refused with noise."""
    if not fields:
        if noise_multiplier:
            raise PolicyError("dp.policy={} (no clipping) cannot be noised: user-level DP needs "
                              "a bound on each client's delta (give dp.policy.clip_norm)")
        return None
    d = {"unit": "client", **dict(fields)}
    if d["unit"] != "client":
        raise PolicyError(f"dp.policy.unit={d['unit']!r}: in federated training the unit is the "
                          "client (one speaker's model delta); for speaker-level DP without FL "
                          "use `privasr train` with privacy.policy.unit=speaker")
    for key in ("noise_multiplier", "expected_units", "expected_batch_size"):
        if key in d:
            raise PolicyError(f"dp.policy.{key}: set by the server (dp.noise_multiplier or "
                              "dp.target_epsilon; server.cohort_size), not in the policy")
    return ClipPolicy.from_dict({**d, "noise_multiplier": float(noise_multiplier),
                                 "expected_units": expected_cohort})


def policy_label(policy: ClipPolicy | None) -> str:
    """A short name of the clipping: none | global | per_layer_uniform | per_layer."""
    if policy is None:
        return "none"
    if policy.scope == "global":
        return "global"
    return "per_layer_uniform" if policy.per_layer_rule == "uniform" else "per_layer"


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
        self.bound = self.spec.total_bound(policy.clip_norm)

    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.names

    def __call__(self, delta: Mapping[str, Tensor]) -> ClippedDelta:
        missing = [n for n in self.spec.names if n not in delta]
        if missing:
            raise ValueError(f"client delta lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        layer = torch.stack([delta[n].double().norm() for n in self.spec.names])[None, :]
        factors, clipped = clip_factors(layer, self.spec, self.policy.clip_norm)
        out = {n: delta[n] * float(f) for n, f in zip(self.spec.names, factors[0])}
        return ClippedDelta(out, float(layer.square().sum().sqrt()), bool(clipped[0]))


class NoClip:
    """The clipper of a run without clipping (``dp.policy={}``): deltas pass unchanged."""

    bound = math.inf

    def __init__(self, names: Sequence[str]) -> None:
        self._names = tuple(names)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def __call__(self, delta: Mapping[str, Tensor]) -> ClippedDelta:
        missing = [n for n in self._names if n not in delta]
        if missing:
            raise ValueError(f"client delta lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        norm = math.sqrt(sum(float(delta[n].double().pow(2).sum()) for n in self._names))
        return ClippedDelta({n: delta[n] for n in self._names}, norm, False)
