"""The memorization mechanism, measured: per-example gradient norms of inserted canaries vs
ordinary utterances over training, and the share of a batch's gradient norm one canary carries
with and without per-example clipping.

Sped-up canaries are hard to fit, so their gradients stay large for long; without clipping one
canary can carry a large part of the update, with clipping at C its norm counts at most C. The
ratio of the two groups' norms is what decides whether clipping without noise can help
(ratio >> 1 and C near the ordinary norms) or cannot (ratio ≈ 1, or C above both).

The probe reads private examples' gradients: its statistics are an audit diagnostic, written
only to the run directory (``norm_probe.csv``, ``results.json``), and NOT covered by the run's ε.

    privasr train configs/demo.yaml audit.canaries=CANARIES.jsonl audit.norm_probe_every=50
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Collection, Sequence

import torch
from torch import nn

from privasr.clipping.policy import ClipPolicy
from privasr.config import AuditConfig
from privasr.data.dataset import AsrDataset
from privasr.errors import ConfigError
from privasr.models.loss import example_gradients
from privasr.train.trainer import BucketPlan, PoissonPlan

__all__ = ["NormProbe", "check_settings", "example_grad_norms", "norm_share", "canary_indices",
           "run_batch_size", "per_example_bound", "summarize_rows", "OUTSIDE_EPSILON"]

OUTSIDE_EPSILON = ("norm_probe.csv: per-example gradient norms of probe canaries and ordinary "
                   "training utterances (an audit diagnostic)")


def check_settings(audit: AuditConfig) -> None:
    """Refuse bad ``audit.norm_probe_*`` settings with a message naming the key."""
    _check(audit.norm_probe_every, audit.norm_probe_size)
    if audit.norm_probe_every > 0 and not audit.canaries:
        raise ConfigError("audit.norm_probe_every > 0 needs audit.canaries (the probe compares "
                          "inserted canaries with ordinary utterances)")


def _check(every: int, size: int) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"audit.norm_probe_every must be an integer >= 0 (0: off), got "
                          f"{every!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"audit.norm_probe_size must be an integer >= 1, got {size!r}")


def canary_indices(ds: AsrDataset, canary_ids: Collection[str]) -> dict[str, list[int]]:
    """Training-set indices of each canary's copies (ids ``<id>_rep<j>`` or ``<id>``)."""
    ids = set(canary_ids)
    out: dict[str, list[int]] = {}
    for i, u in enumerate(ds.utts):
        base = u.id.rsplit("_rep", 1)[0]
        if base in ids:
            out.setdefault(base, []).append(i)
    return out


def run_batch_size(plan: Any, n: int) -> float:
    """Examples per logical batch: Poisson's expected batch size, else the mean of epoch 0."""
    if isinstance(plan, PoissonPlan):
        return float(plan.sampler.expected_batch_size)
    if isinstance(plan, BucketPlan):
        return plan.grad_accum * n / max(len(plan.sampler.batches(0)), 1)
    raise TypeError(f"unknown batch plan {type(plan).__name__}")


def per_example_bound(policy: ClipPolicy | None) -> float | None:
    """C when each example's whole gradient is clipped to a fixed C (``min(norm, C)`` is then
    what it contributes); None otherwise (no policy, group units, adaptive or per-layer)."""
    if policy is None or policy.unit != "example" or policy.bound != "fixed" \
            or policy.scope != "global" or policy.clip_norm is None:
        return None
    return float(policy.clip_norm)


def example_grad_norms(model: nn.Module, ds: AsrDataset, indices: Sequence[int],
                       device: torch.device | str) -> list[float]:
    """The unclipped L2 norm of each example's loss gradient (:func:`example_gradients`)."""
    return [float(g.norm()) for g in example_gradients(model, ds, indices, device)]


def norm_share(canary: Sequence[float], ordinary: Sequence[float], batch_size: float,
               clip: float | None = None) -> float:
    """``n_c / (n_c + (B-1)·n_o)``: one canary's share of the summed gradient norm of a batch of
    B, with n the mean norm of each group (after ``min(norm, clip)`` when ``clip`` is given).
    An upper bound on its share of the update direction (norms add up only when aligned)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def mean(xs: Sequence[float]) -> float:
        return statistics.fmean(min(x, clip) if clip is not None else x for x in xs)

    c, o = mean(canary), mean(ordinary)
    return c / (c + (batch_size - 1) * o) if c + (batch_size - 1) * o > 0 else math.nan


def summarize_rows(rows: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """Probe rows (``norm_probe.csv``) over a run: the ratio's first / last / median, and each
    share's median over training and last value (None without rows)."""
    keys = ["share_unclipped"] + [k for k in ("share_clipped", "share_clipped_at_median")
                                  if rows and k in rows[0]]
    col = {k: [float(r[k]) for r in rows] for k in ["ratio", *keys]}
    out: dict[str, float | None] = {
        "ratio_first": col["ratio"][0] if rows else None,
        "ratio_last": col["ratio"][-1] if rows else None,
        "ratio_median": statistics.median(col["ratio"]) if rows else None}
    for k in keys:
        out[f"{k}_median"] = statistics.median(col[k]) if rows else None
        out[f"{k}_last"] = col[k][-1] if rows else None
    return out


class NormProbe:
    """A trainer observer (``Trainer(observers=[probe])``): at step 1 and every ``every``
    steps, per-example gradient norms of a fixed probe set -- ``size`` distinct inserted
    canaries (one copy each) and ``size`` ordinary training utterances, drawn with ``seed`` --
    logged as a ``norm_probe`` row:

    - ``canary_norm_median/mean``, ``ordinary_norm_median/mean``; ``ratio`` = canary median /
      ordinary median;
    - ``share_unclipped`` and ``share_clipped`` (per-example clipping at ``clip_norm``), or,
      without a per-example bound, ``share_clipped_at_median`` (C = the ordinary median):
      :func:`norm_share` for a batch of ``batch_size``. These are norm shares, an upper bound
      on the canary's share of the update, not a projection onto it.

    The model runs in eval mode (no dropout) on the unaugmented features, in float32; the
    torch RNG states, the modules' train/eval flags, ``.grad`` and the optimizer are left as
    they were, so the training trajectory is unchanged. The statistics are NOT covered by the
    run's ε.
    """

    def __init__(self, ds: AsrDataset, canary_ids: Collection[str], *, every: int, size: int,
                 batch_size: float, clip_norm: float | None = None, seed: int = 0) -> None:
        _check(every, size)
        if every < 1:
            raise ConfigError("audit.norm_probe_every must be >= 1 for a NormProbe (0 is off)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        copies = canary_indices(ds, canary_ids)
        if not copies:
            raise ValueError("norm probe: no inserted canary is in the training set")
        taken = {i for idx in copies.values() for i in idx}
        ordinary = [i for i in range(len(ds)) if i not in taken]
        if not ordinary:
            raise ValueError("norm probe: the training set has no ordinary utterances")
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)

        def pick(pool: list[int]) -> list[int]:
            perm = torch.randperm(len(pool), generator=g).tolist()
            return sorted(pool[j] for j in perm[:size])

        self.ds, self.every, self.batch_size, self.clip_norm = ds, every, float(batch_size), clip_norm
        self.canaries = pick(sorted(idx[0] for idx in copies.values()))
        self.ordinary = pick(ordinary)
        self.rows: list[dict[str, float]] = []
        self._loaded = False
        self.share_key = "share_clipped" if clip_norm is not None else "share_clipped_at_median"

    def due(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    def measure(self, model: nn.Module, device: torch.device | str) -> dict[str, float]:
        """One row of statistics for ``model`` as it is now (its state is left untouched)."""
        modes = [(m, m.training) for m in model.modules()]
        cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
        try:
            model.eval()
            with torch.random.fork_rng(devices=cuda), torch.enable_grad():
                c = example_grad_norms(model, self.ds, self.canaries, device)
                o = example_grad_norms(model, self.ds, self.ordinary, device)
        finally:
            for m, mode in modes:
                m.training = mode
        c = [x for x in c if math.isfinite(x)] or [math.nan]
        o = [x for x in o if math.isfinite(x)] or [math.nan]
        cm, om = statistics.median(c), statistics.median(o)
        clip = self.clip_norm if self.clip_norm is not None else om
        return {"canary_norm_median": cm, "ordinary_norm_median": om,
                "canary_norm_mean": statistics.fmean(c), "ordinary_norm_mean": statistics.fmean(o),
                "ratio": cm / om if om > 0 else math.nan,
                "share_unclipped": norm_share(c, o, self.batch_size),
                self.share_key: norm_share(c, o, self.batch_size, clip)}

    def after_step(self, trainer: Any, step: int) -> dict[str, float] | None:
        if not getattr(trainer, "is_main", True):
            return None
        if not self._loaded:   # resumed run: the rows logged before the checkpoint
            self._loaded = True
            read = getattr(trainer.log, "read", None)
            if read is not None:
                self.rows = [r for r in read("norm_probe") if r["step"] < step]
        if not self.due(step):
            return None
        row = self.measure(trainer.model, trainer.device)
        trainer.log.log("norm_probe", step, row)
        self.rows.append({"step": float(step), **row})
        return row

    def summary(self, log: Any = None) -> dict[str, Any]:
        """For results.json: the settings, the ratio's first / last / median and the last
        shares (None before any row). ``log`` (the run's metrics log): read the rows there when
        this process logged none (a finished run entered again measures nothing new)."""
        if not self._loaded and log is not None and hasattr(log, "read"):
            self._loaded = True
            self.rows = log.read("norm_probe")
        return {"every": self.every, "size": {"canaries": len(self.canaries),
                                              "ordinary": len(self.ordinary)},
                "batch_size": self.batch_size, "clip_norm": self.clip_norm,
                "rows": len(self.rows), "csv": "norm_probe.csv",
                f"{self.share_key}_median": None, f"{self.share_key}_last": None,
                **summarize_rows(self.rows),
                "covered_by_epsilon": False}
