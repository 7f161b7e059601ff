"""Clipping at every granularity, and DP-SGD: the one equation of DESIGN.md.

    g = ( Σ_{u in units} clip(g_u ; C, scope)  +  σ·C·ξ ) / E[#units]        ξ ~ N(0, I)

- ``ClipPolicy`` (policy.py): what -- unit, bound, scope, σ, E[#units]; validated.
- engines (engines.py): how -- ``reference`` (ground truth), ``vectorized`` (vmap, any module),
  ``bookkeeping`` (one forward + activation backward; Linear/Conv/LayerNorm), ``auto``.
- ``ClippedGradient`` (strategy.py): the trainer's ``GradientStrategy``; noise and normalisation.
- ``GaussianNoise`` (noise.py): seeded or CSPRNG noise.
- ``PerCoreGradient`` (percore.py): per-core clipping across torch.distributed ranks (PCC/APCC);
  ``SimulatedCores``: its one-process simulation.
"""

from privasr.clipping.engines import (ENGINES, ClipResult, Engine, ReferenceEngine,
                                      VectorizedEngine, get_engine, per_example_grads,
                                      register_engine)
from privasr.clipping.noise import GaussianNoise, secure_standard_normal
from privasr.clipping.percore import PerCoreGradient, SimulatedCores
from privasr.clipping.policy import ClipPolicy, assign_groups, split_noise_multiplier
from privasr.errors import PolicyError
from privasr.clipping.strategy import ClippedGradient

__all__ = ["ClipPolicy", "PolicyError", "assign_groups", "split_noise_multiplier", "ENGINES",
           "ClipResult", "Engine", "ReferenceEngine", "VectorizedEngine", "get_engine",
           "per_example_grads", "register_engine", "ClippedGradient", "GaussianNoise",
           "secure_standard_normal", "PerCoreGradient", "SimulatedCores"]
