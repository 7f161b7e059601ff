"""ClipPolicy: validation with reasons, YAML round trip, the denominator, grouping, accounting."""

from __future__ import annotations

import math
import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from privasr.clipping import ClipPolicy, PolicyError, assign_groups, split_noise_multiplier


# -- validation: every refusal says why ---------------------------------------------------------
@pytest.mark.parametrize("kwargs, why", [
    (dict(bound="adaptive_min", noise_multiplier=1.0, expected_batch_size=64),
     r"data-dependent bound leaks.*memorization mitigation with σ=0.*bound='quantile' for DP"),
    (dict(unit="microbatch"), r"needs microbatch_size"),
    (dict(unit="microbatch", microbatch_size=0), r"microbatch_size must be an integer >= 1"),
    (dict(clip_norm=-1.0), r"clip_norm must be a finite number > 0.*L2 bound"),
    (dict(clip_norm=0.0), r"clip_norm must be"),
    (dict(clip_norm=float("inf")), r"clip_norm must be"),
    (dict(clip_norm=None), r"clip_norm must be"),
    (dict(noise_multiplier=-0.5), r"noise_multiplier must be .*>= 0"),
    (dict(noise_multiplier=1.0), r"fixed denominator.*expected_units.*would leak"),
    (dict(unit="bogus"), r"unit='bogus'; valid: batch, example, microbatch, core"),
    (dict(bound="max"), r"bound='max'; valid"),
    (dict(scope="layer"), r"scope='layer'; valid"),
    (dict(unit="core"), r"needs num_cores"),
    (dict(unit="example", num_cores=4), r"num_cores is only used with unit='core'"),
    (dict(unit="core", num_cores=2, microbatch_size=4), r"microbatch_size is only used"),
    (dict(scope="per_layer"), r"exactly one of layer_bounds.*per_layer_rule"),
    (dict(scope="per_layer", per_layer_rule="uniform", layer_bounds={"*": 1.0}, clip_norm=None),
     r"exactly one of"),
    (dict(scope="per_layer", per_layer_rule="dimension"), r"per_layer_rule='dimension'"),
    (dict(per_layer_rule="uniform"), r"need scope='per_layer'"),
    (dict(scope="per_layer", layer_bounds={"*": 1.0}), r"either clip_norm or layer_bounds"),
    (dict(scope="per_layer", layer_bounds={"*": -1.0}, clip_norm=None), r"finite number > 0"),
    (dict(scope="per_layer", layer_bounds={}, clip_norm=None), r"non-empty mapping"),
    (dict(scope="per_layer", layer_bounds={"*": 1.0}, clip_norm=None, bound="adaptive_min"),
     r"would be overridden by the adaptive one"),
    (dict(unit="microbatch", microbatch_size=4, grouping="contiguous", noise_multiplier=1.0,
          expected_batch_size=64), r"shifts every later group.*2C sensitivity.*grouping='hash'"),
    (dict(bound="quantile", noise_multiplier=1.0, expected_batch_size=64),
     r"quantile_noise_multiplier > 0.*must be noised"),
    (dict(bound="quantile", target_quantile=1.0), r"target_quantile must be in \(0, 1\)"),
    (dict(quantile_noise_multiplier=1.0, expected_batch_size=8),
     r"only used with bound='quantile'"),
    (dict(unit="batch", expected_units=4), r"contradicts unit='batch' has exactly 1 unit"),
    (dict(unit="core", num_cores=4, expected_units=2), r"contradicts unit='core'"),
    (dict(expected_batch_size=64, expected_units=32), r"contradicts expected_batch_size"),
    (dict(unit="microbatch", microbatch_size=4, expected_units=2.5), r"must be an integer"),
    (dict(expected_units=0), r"expected_units must be > 0"),
    (dict(grouping="random"), r"grouping='random'; valid"),
])
def test_invalid_policies_explain(kwargs, why):
    with pytest.raises(PolicyError, match=why):
        ClipPolicy(**kwargs)


def test_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        ClipPolicy("example")                                   # type: ignore[misc]
    p = ClipPolicy()
    with pytest.raises(AttributeError):
        p.clip_norm = 2.0                                       # type: ignore[misc]


def test_valid_combinations():
    ClipPolicy(bound="adaptive_min", clip_norm=None)            # σ = 0: memorization mitigation
    ClipPolicy(unit="core", num_cores=8, bound="adaptive_min", scope="per_layer",
               per_layer_rule="uniform")                        # APCC, per-layer uniform
    ClipPolicy(bound="quantile", noise_multiplier=1.0, quantile_noise_multiplier=3.0,
               expected_batch_size=64)
    ClipPolicy(unit="microbatch", microbatch_size=4, grouping="contiguous")  # σ = 0: fine
    p = ClipPolicy(scope="per_layer", layer_bounds={"*.bias": 0.1, "*": 1.0}, clip_norm=None)
    assert p.layer_bounds == {"*.bias": 0.1, "*": 1.0}


# -- YAML ---------------------------------------------------------------------------------------
def test_from_dict_yaml_round_trip():
    text = """
    unit: microbatch
    microbatch_size: 8
    clip_norm: 0.5
    scope: per_layer
    per_layer_rule: uniform
    noise_multiplier: 1.2
    expected_batch_size: 256
    """
    p = ClipPolicy.from_dict(yaml.safe_load(text))
    assert (p.unit, p.microbatch_size, p.per_layer_rule, p.expected_units) == (
        "microbatch", 8, "uniform", 32.0)
    assert ClipPolicy.from_dict(p.to_dict()) == p
    lb = ClipPolicy.from_dict({"scope": "per_layer", "clip_norm": None,
                               "layer_bounds": {"encoder.*": 1.0, "*": 0.5}})
    assert ClipPolicy.from_dict(lb.to_dict()) == lb
    with pytest.raises(PolicyError, match=r"unknown ClipPolicy key\(s\) \['clip'\].*valid keys"):
        ClipPolicy.from_dict({"clip": 1.0})


# -- the denominator E[#units] ------------------------------------------------------------------
def test_expected_units_derivation():
    assert ClipPolicy(expected_batch_size=64).expected_units == 64.0
    assert ClipPolicy().expected_units is None                   # σ = 0: realised count
    assert ClipPolicy(unit="batch").expected_units == 1.0
    assert ClipPolicy(unit="core", num_cores=4).expected_units == 4.0
    assert ClipPolicy(unit="microbatch", microbatch_size=8,
                      expected_batch_size=60).expected_units == 8.0      # ceil(60/8)
    assert ClipPolicy(unit="microbatch", microbatch_size=8,
                      expected_batch_size=64).expected_units == 8.0
    p = ClipPolicy(unit="microbatch", microbatch_size=4)
    assert p.expected_units is None and p.num_groups(10) == 3 and p.num_groups(0) == 1


# -- grouping -----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=30, unique=True),
       g=st.integers(1, 7), step=st.integers(0, 5), drop=st.integers(0, 10**6))
def test_hash_groups_do_not_reshuffle(ids, g, step, drop):
    """Adding/removing one example leaves every other example's group unchanged (2C argument)."""
    p = ClipPolicy(unit="microbatch", microbatch_size=2, expected_units=g)
    groups, n_groups = assign_groups(p, ids, step)
    assert n_groups == g and all(0 <= x < g for x in groups)
    k = drop % len(ids)
    fewer, _ = assign_groups(p, ids[:k] + ids[k + 1:], step)
    assert fewer == groups[:k] + groups[k + 1:]
    shuffled = ids[::-1]
    assert assign_groups(p, shuffled, step)[0] == groups[::-1]   # order-free: a function of id


def test_hash_group_sizes_under_poisson_sampling():
    """G = ceil(qN/m) fixed groups keep the mean group size ≈ m under Poisson sampling."""
    rng = random.Random(0)
    n_total, q, m = 5000, 0.02, 10
    p = ClipPolicy(unit="microbatch", microbatch_size=m, expected_batch_size=q * n_total)
    assert p.expected_units == 10
    sizes = []
    for step in range(40):
        ids = [f"utt{i}" for i in range(n_total) if rng.random() < q]
        groups, g = assign_groups(p, ids, step)
        sizes += [groups.count(k) for k in range(g)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - m) < 0.6, mean
    # a group's size is ~ Poisson(m): variance ≈ m
    var = sum((s - mean) ** 2 for s in sizes) / len(sizes)
    assert 0.6 * m < var < 1.5 * m, var


def test_steps_regroup_and_seed():
    ids = [f"u{i}" for i in range(40)]
    p = ClipPolicy(unit="core", num_cores=4)
    assert assign_groups(p, ids, 0)[0] != assign_groups(p, ids, 1)[0]
    assert assign_groups(p, ids, 3)[0] == assign_groups(p, ids, 3)[0]
    q = ClipPolicy(unit="core", num_cores=4, group_seed=7)
    assert assign_groups(q, ids, 0)[0] != assign_groups(p, ids, 0)[0]


@pytest.mark.parametrize("n, g", [(10, 3), (8, 4), (3, 5), (0, 2)])
def test_contiguous_groups(n, g):
    p = ClipPolicy(unit="core", num_cores=g, grouping="contiguous")
    groups, G = assign_groups(p, [str(i) for i in range(n)], 0)
    assert G == g and groups == sorted(groups)
    sizes = [groups.count(k) for k in range(g)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


def test_example_and_batch_units():
    ids = ["a", "b", "c"]
    assert assign_groups(ClipPolicy(), ids) == ([0, 1, 2], 3)
    assert assign_groups(ClipPolicy(unit="batch"), ids) == ([0, 0, 0], 1)


# -- what the accountant charges ------------------------------------------------------------------
def test_accounting_noise_multiplier():
    assert ClipPolicy().accounting_noise_multiplier() == 0.0
    assert ClipPolicy(noise_multiplier=1.0, expected_batch_size=10
                      ).accounting_noise_multiplier() == 1.0
    p = ClipPolicy(unit="microbatch", microbatch_size=4, noise_multiplier=2.0,
                   expected_batch_size=64)
    assert p.sensitivity_factor == 2.0 and p.accounting_noise_multiplier() == 1.0
    q = ClipPolicy(bound="quantile", noise_multiplier=1.2, quantile_noise_multiplier=5.0,
                   expected_batch_size=100)
    z = q.accounting_noise_multiplier()
    assert z == pytest.approx((1.2 ** -2 + 10.0 ** -2) ** -0.5) and z < 1.2
    # split_noise_multiplier inverts it
    sigma = split_noise_multiplier(1.0, 5.0)
    q2 = ClipPolicy(bound="quantile", noise_multiplier=sigma, quantile_noise_multiplier=5.0,
                    expected_batch_size=100)
    assert q2.accounting_noise_multiplier() == pytest.approx(1.0)
    with pytest.raises(PolicyError, match="too small"):
        split_noise_multiplier(1.0, 0.4)
    assert math.isfinite(sigma) and sigma > 1.0
