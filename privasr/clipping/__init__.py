"""Clipping at every granularity, and DP-SGD: the one equation (docs/one-equation.md).

    g = ( Σ_{u in units} clip(g_u ; C, scope)  +  σ·C·ξ ) / E[#units]        ξ ~ N(0, I)

- ``ClipPolicy`` (policy.py): what -- unit, bound, scope, σ, E[#units]; validated.
- clip factors (factors.py): clip(g_u ; C, scope) for every unit, scope and bound, once.
- engines (engines.py): how Σ_u clip(g_u) is computed -- ``reference`` (ground truth),
  ``vectorized`` (vmap, any module), ``bookkeeping`` (one forward + activation backward;
  Linear/Conv/LayerNorm), ``auto``.
- ``Release`` (release.py): the equation's tail -- noise, ÷ E[#units], quantile bound, stats.
- ``ClippedGradient`` (strategy.py): the trainer's ``GradientStrategy`` on one process.
- ``PerCoreGradient`` (percore.py): per-core clipping across torch.distributed ranks (PCC/APCC).
- ``GaussianNoise`` (noise.py): seeded or CSPRNG noise.
"""

from privasr.clipping.engines import (ENGINES, ClipResult, Engine, ReferenceEngine,
                                      VectorizedEngine, get_engine, per_example_grads,
                                      register_engine)
from privasr.clipping.factors import LayerSpec, clip_factors, resolve_layers
from privasr.clipping.noise import GaussianNoise, secure_standard_normal
from privasr.clipping.percore import PerCoreGradient
from privasr.clipping.policy import ClipPolicy, assign_groups, split_noise_multiplier
from privasr.clipping.release import Release
from privasr.clipping.strategy import ClippedGradient
from privasr.errors import PolicyError

__all__ = ["ClipPolicy", "PolicyError", "assign_groups", "split_noise_multiplier", "ENGINES",
           "ClipResult", "Engine", "ReferenceEngine", "VectorizedEngine", "get_engine",
           "per_example_grads", "register_engine", "ClippedGradient", "GaussianNoise",
           "secure_standard_normal", "PerCoreGradient", "Release", "LayerSpec", "clip_factors",
           "resolve_layers"]
