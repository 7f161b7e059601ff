"""The clip factors (privasr.clipping.factors) against clipping written out plainly, one unit at
a time, in float64: the ground truth for every clipper that uses them (engines, per-core,
federated)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privasr.clipping.factors import (UNIFORM_EPS, UNIFORM_ZERO_RTOL, LayerSpec, adaptive_bound,
                                      clip_factors)


def plain_clip(layer: list[float], mode: str, c: float, bounds: list[float]
               ) -> tuple[list[float], bool]:
    """(factor per tensor, clipped) for one unit with per-tensor norms ``layer``."""
    total = math.sqrt(sum(x * x for x in layer))
    if mode == "global":
        return ([c / total] * len(layer), True) if total > c else ([1.0] * len(layer), False)
    if mode == "uniform":
        if total < c:
            return [1.0] * len(layer), False
        target = c / math.sqrt(len(layer))
        return [target / (x + UNIFORM_EPS) if x > UNIFORM_ZERO_RTOL * total else 0.0
                for x in layer], True
    out = [cl / x if x > cl else 1.0 for x, cl in zip(layer, bounds)]
    return out, any(x > cl for x, cl in zip(layer, bounds))


norms = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(units=st.lists(norms, min_size=1, max_size=4), mode=st.sampled_from(["global", "uniform",
                                                                             "layers"]),
       c=st.sampled_from([1e-3, 0.5, 2.0, 1e4]), seed=st.integers(0, 1000))
def test_factors_match_plain_clipping(units, mode, c, seed):
    width = len(units[0])
    units = [(u * width)[:width] for u in units]            # one width for the stack
    bounds = [c * (1 + (seed + i) % 3) / 2 for i in range(width)]
    spec = LayerSpec(tuple(f"t{i}" for i in range(width)), mode,
                     tuple(bounds) if mode == "layers" else None)
    layer = torch.tensor(units, dtype=torch.float64)
    f, flags = clip_factors(layer, spec, c)
    for u, row in enumerate(units):
        want, clipped = plain_clip(row, mode, c, bounds)
        torch.testing.assert_close(f[u], torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-12, atol=0)
        assert bool(flags[u]) == clipped
    # a clipped unit has total norm ≤ the total bound
    after = (f * layer).square().sum(1).sqrt()
    assert bool((after <= spec.total_bound(c) * (1 + 1e-9)).all())


@settings(max_examples=100, deadline=None)
@given(units=st.lists(st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=2), min_size=1,
                      max_size=5), mode=st.sampled_from(["global", "uniform"]))
def test_adaptive_factors_rescale_every_unit_to_the_smallest_norm(units, mode):
    spec = LayerSpec(("a", "b"), mode)
    layer = torch.tensor(units, dtype=torch.float64)
    f, _ = clip_factors(layer, spec, None, adaptive=True)
    c, flags = adaptive_bound(layer.square().sum(1).sqrt(), spec)
    totals = layer.square().sum(1).sqrt()
    assert c == float(totals.min())
    for u, row in enumerate(units):   # APCC: every unit rescaled to C_t = min_u ‖g_u‖
        total = math.sqrt(sum(x * x for x in row))
        if mode == "global":
            want = [c / total] * len(row)
        else:                          # every tensor to C_t/√L (the unit at the minimum too)
            want = [c / math.sqrt(len(row)) / (x + UNIFORM_EPS)
                    if x > UNIFORM_ZERO_RTOL * total else 0.0 for x in row]
        torch.testing.assert_close(f[u] * c, torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12)
    assert flags.tolist() == ((totals > c).tolist() if mode == "global" else [True] * len(units))
    assert math.isnan(adaptive_bound(torch.zeros(0), spec)[0])
