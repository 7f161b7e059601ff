"""Engines: *how* Σ_u clip(g_u) is computed for one logical batch (a list of physical batches).

Every engine returns the same ``ClipResult`` for the same policy; ``reference`` is the ground
truth the others are tested against. Register a new one with ``@register_engine``.

``reference``   a Python loop, one forward/backward per unit (an example alone with its
                padding trimmed; a group's examples re-padded into one batch, its mean loss).
                Slow, obviously correct.
``vectorized``  per-example gradients of a chunk of examples in one pass, then per-unit norms
                and clipping as tensor ops (micro-batch / core units: per-example gradients are
                averaged into their groups first, then clipped). Any module torch.func.vmap
                can run (not nn.GRU / nn.LSTM / nn.RNN).
``bookkeeping``  the same clipping, with per-example gradients from one ordinary forward and an
                activation-only backward (``privasr.clipping.bookkeeping``): the fastest, for
                models built of Linear / Conv1d / Conv2d / LayerNorm (the Conformer-CTC).
``auto``        per model: ``bookkeeping`` when it supports every module owning trainable
                parameters; else ``vectorized``, unless torch.func.vmap cannot run the model
                (nn.GRU / nn.LSTM / nn.RNN, packed sequences, ...): then ``reference``, with a
                one-time ``EngineFallbackWarning`` (the default engine).

Unsupported models. ``bookkeeping`` and ``vectorized`` never compute a wrong gradient for a
module they cannot handle: they refuse with an ``UnsupportedModuleError`` (a ``PolicyError``)
naming the module(s) and the engines that can run them. ``vectorized`` counts a forward as
unsupported when it fails under vmap but runs without it (anything else is re-raised as is).

How ``vectorized`` gets per-example gradients. The usual ``vmap(grad(loss))`` would run the
trainer's loss function under ``vmap``, which breaks twice for CTC: ``F.ctc_loss`` has no
batching rule (its fallback loop crashes on different target lengths), and the trainer's
``checked()`` NaN guard branches on a tensor. So the engine turns the problem around: it
gives ``loss_fn`` a stand-in for the model whose ``__call__`` runs
``vmap(functional_call(model, params_i, example_i))`` with one (stride-0, copy-free) replica
of every trainable parameter per example, and then takes ONE ordinary
``autograd.grad(losses.sum(), replicas)``. Example i's loss depends only on replica i, so the
gradient w.r.t. replica i is example i's gradient. ``loss_fn`` itself -- native CTC, autocast,
the finiteness check -- runs outside vmap, untouched. Contract: ``loss_fn(model, batch)`` gets
the model's output by calling ``model(...)`` with tensors whose dim 0 is the batch (like
``per_example_ctc``), and no example's loss depends on another example (no BatchNorm).
Frozen parameters (requires_grad=False) get no replicas and no gradients.
Memory: ``chunk_size`` × (trainable parameters) for the per-example gradients, plus
G × (trainable parameters) for the group sums of micro-batch / core units.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from privasr.clipping.bookkeeping import (UnsupportedModuleError, describe_modules,
                                          hooked_clipped_sum, hooked_per_example_grads,
                                          unsupported_modules, vmap_unsupported)
from privasr.clipping.factors import (LayerSpec, adaptive_bound, clip_factors, resolve_layers,
                                      trainable_parameters)
from privasr.clipping.policy import ClipPolicy, batch_units
from privasr.errors import PolicyError
from privasr.data.dataset import Batch

__all__ = ["ClipResult", "Engine", "ENGINES", "register_engine", "get_engine",
           "ReferenceEngine", "VectorizedEngine", "BookkeepingEngine", "AutoEngine",
           "per_example_grads", "EngineFallbackWarning", "UnsupportedModuleError",
           "check_losses", "batch_rows", "SavedState"]

LossFn = Callable[[nn.Module, Batch], Tensor]
# ---------------------------------------------------------------------------------------------
# results, registry
# ---------------------------------------------------------------------------------------------
@dataclass
class ClipResult:
    """Σ_u clip(g_u) per trainable parameter, and what happened to each realised unit."""

    grads: dict[str, Tensor]   # name -> tensor shaped like the parameter
    norms: Tensor              # (U,) global L2 norm of each unit's gradient before clipping
    clipped: Tensor            # (U,) bool: the unit was changed by clipping
    bound: float               # total bound in force: C, C_t (adaptive), sqrt(Σ C_l²) (layers)
    loss_sum: float            # Σ of per-example losses over the logical batch
    examples: int

    @property
    def units(self) -> int:
        return int(self.norms.numel())

    @property
    def unclipped(self) -> int:
        """Units with ‖g_u‖ ≤ bound: the count behind the quantile bound update."""
        return int((self.norms <= self.bound).sum()) if self.units else 0


ENGINES: dict[str, type["Engine"]] = {}


def register_engine(cls: type["Engine"]) -> type["Engine"]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    ENGINES[cls.name] = cls
    return cls


def get_engine(name: str, **kwargs: Any) -> "Engine":
    """An instance of the engine registered as ``name``."""
    if name not in ENGINES:
        raise ValueError(f"unknown clipping engine {name!r}; registered: {', '.join(ENGINES)}")
    return ENGINES[name](**kwargs)


class Engine(ABC):
    name: ClassVar[str]

    @abstractmethod
    def clipped_sum(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn,
                    policy: ClipPolicy, *, clip_norm: float | None = None, step: int = 0
                    ) -> ClipResult:
        """Σ_u clip(g_u) over the units of the logical batch ``batches``.

        ``clip_norm``: the bound in force this step (the quantile state); defaults to
        ``policy.clip_norm``. ``step`` salts the hash grouping of micro-batches / cores.
        """


# ---------------------------------------------------------------------------------------------
# batch plumbing
# ---------------------------------------------------------------------------------------------
def _nonempty(batches: Sequence[Batch]) -> list[Batch]:
    return [b for b in batches if len(b) > 0]


def _trim(b: Batch) -> Batch:
    """Drop the columns of padding no example of ``b`` needs."""
    t = int(b.feat_lens.max())
    s = max(1, int(b.target_lens.max())) if b.targets.shape[1] else 0
    return Batch(list(b.ids), b.feats[:, :t], b.feat_lens, b.targets[:, :s], b.target_lens,
                 b.speakers, b.seconds_per_frame)


def batch_rows(b: Batch, start: int, stop: int) -> Batch:
    return _trim(Batch(b.ids[start:stop], b.feats[start:stop], b.feat_lens[start:stop],
                       b.targets[start:stop], b.target_lens[start:stop],
                       b.speakers_of(range(start, stop)), b.seconds_per_frame))


def _gather(batches: Sequence[Batch], where: Sequence[tuple[int, int]]) -> Batch:
    """The examples at (batch index, row) pairs, re-padded into one batch."""
    rows = [(batches[bi], r) for bi, r in where]
    t = max(int(b.feat_lens[r]) for b, r in rows)
    s = max(1, max(int(b.target_lens[r]) for b, r in rows))
    ref = rows[0][0]
    feats = ref.feats.new_zeros((len(rows), t, ref.feats.shape[2]))
    targets = ref.targets.new_zeros((len(rows), s))
    for i, (b, r) in enumerate(rows):
        n, k = int(b.feat_lens[r]), int(b.target_lens[r])
        feats[i, :n] = b.feats[r, :n]
        targets[i, :k] = b.targets[r, :k]
    speakers = None if any(b.speakers is None for b, _ in rows) else \
        [b.speakers[r] for b, r in rows]
    return Batch([b.ids[r] for b, r in rows], feats,
                 torch.stack([b.feat_lens[r] for b, r in rows]), targets,
                 torch.stack([b.target_lens[r] for b, r in rows]), speakers,
                 ref.seconds_per_frame)


def check_losses(losses: Tensor, n: int) -> Tensor:
    if losses.dim() != 1 or losses.shape[0] != n:
        raise ValueError(f"loss_fn must return one loss per example, shape ({n},); "
                         f"got {tuple(losses.shape)}")
    return losses


def _grads(loss: Tensor, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(params.items(), gs)}


# ---------------------------------------------------------------------------------------------
# reference engine
# ---------------------------------------------------------------------------------------------
@register_engine
class ReferenceEngine(Engine):
    """One backward per unit; clipping in plain Python. The ground truth."""

    name = "reference"

    def clipped_sum(self, model, batches, loss_fn, policy, *, clip_norm=None, step=0):
        params = trainable_parameters(model)
        spec = resolve_layers(policy, list(params))
        batches = _nonempty(batches)
        where = [(bi, r) for bi, b in enumerate(batches) for r in range(len(b))]
        unit_of, _ = batch_units(policy, batches, step)
        members: dict[int, list[tuple[int, int]]] = {}
        for w, u in zip(where, unit_of):
            members.setdefault(u, []).append(w)

        unit_grads, loss_sum = [], 0.0
        for u in sorted(members):
            b = _gather(batches, members[u])    # an example alone is trimmed to its own length
            losses = check_losses(loss_fn(model, b), len(b))
            loss_sum += float(losses.detach().sum())
            unit_grads.append(_grads(losses.mean(), params))

        # per-tensor norms in float64, one unit at a time; the factors of privasr.clipping.factors
        layer = torch.tensor([[math.sqrt(float(g[n].double().pow(2).sum())) for n in spec.names]
                              for g in unit_grads], dtype=torch.float64).reshape(-1, len(spec.names))
        norms = layer.square().sum(1).sqrt()
        adaptive = policy.bound == "adaptive_min"
        c = policy.clip_norm if clip_norm is None else clip_norm
        factors, flags = clip_factors(layer, spec, None if adaptive else c, adaptive)
        if adaptive:
            c, flags = adaptive_bound(norms, spec)
            factors = factors * (c if norms.numel() else 0.0)
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for g, f in zip(unit_grads, factors.tolist()):
            for n, fl in zip(spec.names, f):
                total[n] += g[n] * fl
        bound = c if adaptive else spec.total_bound(c)
        return ClipResult(total, norms, flags.to(torch.bool), float(bound), loss_sum, len(where))


# ---------------------------------------------------------------------------------------------
# vectorized engine
# ---------------------------------------------------------------------------------------------
def _first_row(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out[0]
    if isinstance(out, (tuple, list)):
        return type(out)(_first_row(o) for o in out)
    if isinstance(out, dict):
        return {k: _first_row(v) for k, v in out.items()}
    raise TypeError(f"per-example model outputs must be tensors (or tuples/lists/dicts of "
                    f"tensors) with the batch in dim 0; got {type(out).__name__}")


class _PerExampleModel:
    """Stands in for ``model`` inside ``loss_fn``: each example runs alone, with its own replica
    of the trainable parameters (``replicas[name]`` has shape (B, *param.shape))."""

    def __init__(self, model: nn.Module, replicas: dict[str, Tensor]) -> None:
        self._model = model
        self._replicas = replicas

    def __getattr__(self, name: str) -> Any:     # model.cfg, model.output_lengths(...), ...
        return getattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pos = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        keys = [k for k, v in kwargs.items() if isinstance(v, Tensor)]

        def one(params: dict[str, Tensor], *ts: Tensor) -> Any:
            a, kw = list(args), dict(kwargs)
            for i, t in zip(pos, ts):
                a[i] = t.unsqueeze(0)
            for k, t in zip(keys, ts[len(pos):]):
                kw[k] = t.unsqueeze(0)
            return _first_row(functional_call(self._model, params, tuple(a), kw))

        try:
            return vmap(one, randomness="different")(
                self._replicas, *[args[i] for i in pos], *[kwargs[k] for k in keys])
        except Exception as error:
            refusal = _vmap_refusal(self._model, error, args, kwargs)
            if refusal is None:
                raise                   # the model fails without vmap too: a real error
            raise refusal from error


class SavedState:
    """The RNG streams and buffers of ``model`` at creation, to undo a forward's side effects
    (dropout draws, BatchNorm running statistics)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
        self.cpu = torch.get_rng_state()
        devs = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devs if d.type == "cuda"}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda.items():
            torch.cuda.set_rng_state(state, d)
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                if k in self.buffers:
                    b.copy_(self.buffers[k])


def _runs_plainly(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether ``model(*args, **kwargs)`` runs without vmap (no side effects kept)."""
    saved = SavedState(model)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:
        return False
    finally:
        saved.restore()
    return True


def _failure_site(model: nn.Module, error: BaseException) -> tuple[str, nn.Module, str]:
    """(qualified name, module) of the innermost module of ``model`` whose code raised
    ``error`` (the root when none), and 'function (file:line)' of the innermost Python frame."""
    names = {id(m): n for n, m in model.named_modules()}
    name, mod, where = "", model, "?"
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        obj = frame.f_locals.get("self")
        if obj is not None and id(obj) in names:
            name, mod = names[id(obj)], obj
        path = os.path.normpath(frame.f_code.co_filename).split(os.sep)
        where = f"{frame.f_code.co_qualname} ({'/'.join(path[-2:])}:{tb.tb_lineno})"
        tb = tb.tb_next
    return name, mod, where


def _vmap_refusal(model: nn.Module, error: Exception, args: tuple, kwargs: dict
                  ) -> UnsupportedModuleError | None:
    """The ``vectorized`` engine's refusal when ``model``'s forward fails under vmap but runs
    without it; None when it fails without vmap too (then ``error`` is a real error)."""
    if not _runs_plainly(model, args, kwargs):
        return None
    name, mod, where = _failure_site(model, error)
    modules = {name: type(mod).__name__}
    text = str(error).strip()
    first = text.splitlines()[0][:240] if text else ""
    detail = (f"runs without torch.func.vmap but fails under it ({type(error).__name__}: "
              f"{first} -- in {where})")
    reason = f"module {describe_modules(modules)} {detail}"
    return UnsupportedModuleError(
        f"module {describe_modules(modules)} is not supported by engine 'vectorized': its "
        f"forward {detail}: use engine 'reference' or 'auto'",
        engine="vectorized", modules=modules, alternatives=("reference", "auto"), reason=reason)


def per_example_grads(model: nn.Module, params: dict[str, nn.Parameter], batch: Batch,
                      loss_fn: LossFn) -> tuple[dict[str, Tensor], Tensor]:
    """({name: (B, *shape)} per-example gradients of loss_fn's (B,) losses, the losses)."""
    n = len(batch)
    replicas = {k: p.detach().expand(n, *p.shape).requires_grad_() for k, p in params.items()}
    losses = check_losses(loss_fn(_PerExampleModel(model, replicas), batch), n)
    gs = torch.autograd.grad(losses.sum(), list(replicas.values()), allow_unused=True)
    if all(g is None for g in gs):
        raise RuntimeError("the loss does not depend on the per-example parameters: loss_fn must "
                           "get its outputs by calling model(...) on the batch (see "
                           "privasr.clipping.engines)")
    return ({k: torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device) if g is None else g
             for (k, p), g in zip(params.items(), gs)}, losses.detach())


class _UnitClipper:
    """Accumulates Σ_u clip(g_u) for stacks of unit gradients {name: (U, *shape)}.

    For ``adaptive_min`` the bound C_t = min_u ‖g_u‖ is only known after the last unit, and
    every unit is rescaled (‖g_u‖ ≥ C_t): the sum is accumulated for C = 1 (Σ g_u/‖g_u‖, or
    Σ g_{u,l}/(‖g_{u,l}‖+ε)/√L for the uniform rule) and multiplied by C_t at the end.
    """

    def __init__(self, spec: LayerSpec, policy: ClipPolicy, clip_norm: float | None,
                 params: dict[str, nn.Parameter]) -> None:
        self.spec, self.adaptive = spec, policy.bound == "adaptive_min"
        c = policy.clip_norm if clip_norm is None else clip_norm
        self.c = None if self.adaptive or c is None else float(c)   # None: layer_bounds
        self.sums = {n: torch.zeros_like(p) for n, p in params.items()}
        self.norms: list[Tensor] = []
        self.flags: list[Tensor] = []

    def add(self, g: dict[str, Tensor]) -> None:
        """Clip the stacked unit gradients ``g`` and add them to the sums."""
        names = self.spec.names
        if not names:
            return
        sq = torch.stack([torch.linalg.vector_norm(g[n].flatten(1), dim=1) for n in names],
                         dim=1).square()                                            # (U, L)
        factors = self.factors(sq)
        for j, n in enumerate(names):
            self.sums[n] += torch.tensordot(factors[:, j].to(g[n].dtype), g[n], dims=1)

    def factors(self, sq: Tensor) -> Tensor:
        """(U, L) factors f with clip(g_u)_l = f_ul · g_ul, from the (U, L) squared per-tensor
        norms; records the units' norms and clipped flags. The caller adds Σ_u f_ul · g_ul."""
        layer = sq.sqrt()
        self.norms.append(sq.sum(1).sqrt().detach().double().cpu())
        f, flags = clip_factors(layer, self.spec, self.c, self.adaptive)
        self.flags.append(flags.cpu())
        return f

    def finish(self, loss_sum: float, examples: int) -> ClipResult:
        norms = torch.cat(self.norms) if self.norms else torch.zeros(0, dtype=torch.float64)
        if self.adaptive:
            bound, flags = adaptive_bound(norms, self.spec)
            for s in self.sums.values():
                s.mul_(bound if norms.numel() else 0.0)
        else:
            flags = torch.cat(self.flags) if self.flags else torch.zeros(norms.shape, dtype=bool)
            bound = self.spec.total_bound(self.c)
        return ClipResult(self.sums, norms, flags, float(bound), loss_sum, examples)


@register_engine
class VectorizedEngine(Engine):
    """Per-example gradients, ``chunk_size`` examples at a time, clipped with tensor ops."""

    name = "vectorized"

    def __init__(self, *, chunk_size: int = 16) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
        self.chunk_size = chunk_size

    def per_example(self, model: nn.Module, params: dict[str, nn.Parameter], batch: Batch,
                    loss_fn: LossFn) -> tuple[dict[str, Tensor], Tensor]:
        """({name: (B, *shape)} per-example gradients, (B,) losses) of one chunk."""
        return per_example_grads(model, params, batch, loss_fn)

    def example_chunk(self, params: dict[str, nn.Parameter]) -> int:
        """Examples per forward pass for unit = example."""
        return self.chunk_size

    def clip_chunk(self, model: nn.Module, params: dict[str, nn.Parameter], batch: Batch,
                   loss_fn: LossFn, clipper: "_UnitClipper") -> Tensor:
        """Add the clipped per-example gradients of one chunk to ``clipper``; return losses."""
        g, losses = self.per_example(model, params, batch, loss_fn)
        clipper.add(g)
        return losses

    def clipped_sum(self, model, batches, loss_fn, policy, *, clip_norm=None, step=0):
        params = trainable_parameters(model)
        spec = resolve_layers(policy, list(params))
        clipper = _UnitClipper(spec, policy, clip_norm, params)
        batches = _nonempty(batches)
        n = sum(len(b) for b in batches)
        loss_sum = 0.0
        if n == 0:
            return clipper.finish(0.0, 0)

        if policy.unit == "batch":      # ordinary mean gradient: no per-example work at all
            mean = {k: torch.zeros_like(p) for k, p in params.items()}
            for b in batches:
                losses = check_losses(loss_fn(model, b), len(b))
                loss_sum += float(losses.detach().sum())
                for k, g in _grads(losses.sum() / n, params).items():
                    mean[k] += g
            clipper.add({k: v[None] for k, v in mean.items()})
            return clipper.finish(loss_sum, n)

        unit_of, groups = batch_units(policy, batches, step)
        unit_of = torch.tensor(unit_of, dtype=torch.long)
        grouped = policy.unit != "example"
        if grouped:
            dev = next(iter(params.values())).device if params else torch.device("cpu")
            sums = {k: torch.zeros(groups, *p.shape, dtype=p.dtype, device=p.device)
                    for k, p in params.items()}
            counts = torch.zeros(groups, dtype=torch.long)
        pos = 0
        for b in batches:
            chunk = self.chunk_size if grouped else self.example_chunk(params)
            for start in range(0, len(b), chunk):
                sub = batch_rows(b, start, min(len(b), start + chunk))
                if not grouped:         # unit = example: clip chunk by chunk
                    loss_sum += float(self.clip_chunk(model, params, sub, loss_fn, clipper).sum())
                    continue
                g, losses = self.per_example(model, params, sub, loss_fn)
                loss_sum += float(losses.sum())
                idx = unit_of[pos:pos + len(sub)]
                counts.index_add_(0, idx, torch.ones_like(idx))
                idx = idx.to(dev)
                for k in sums:
                    sums[k].index_add_(0, idx, g[k])
                pos += len(sub)
                del g
        if grouped:
            live = (counts > 0).nonzero().flatten()
            div = counts[live].to(dev)
            for s in range(0, live.numel(), self.chunk_size):      # bounded temporary memory
                sel, d = live[s:s + self.chunk_size].to(dev), div[s:s + self.chunk_size]
                clipper.add({k: v[sel] / d.view(-1, *[1] * (v.dim() - 1)).to(v.dtype)
                             for k, v in sums.items()})
        return clipper.finish(loss_sum, n)


@register_engine
class BookkeepingEngine(VectorizedEngine):
    """``vectorized``'s clipping, with per-example gradients from one ordinary forward and one
    activation-only backward (``privasr.clipping.bookkeeping``): no vmap, no parameter-gradient
    products. Linear / Conv1d / Conv2d / LayerNorm modules only (others are refused with an
    ``UnsupportedModuleError``)."""

    name = "bookkeeping"

    def __init__(self, *, chunk_size: int = 16, store_limit_mb: float = 256.0) -> None:
        super().__init__(chunk_size=chunk_size)
        self.store_limit_mb = store_limit_mb

    def stores(self, params: dict[str, nn.Parameter]) -> bool:
        """Unit = example: hold the chunk's per-example gradients (fastest) when they fit in
        ``store_limit_mb``; else the two-pass sum (memory per layer, one extra product)."""
        n = sum(p.numel() * p.element_size() for p in params.values())
        return self.chunk_size * n <= self.store_limit_mb * 2 ** 20

    def example_chunk(self, params):
        return self.chunk_size if self.stores(params) else 1 << 30   # whole physical batch

    def per_example(self, model, params, batch, loss_fn):
        return hooked_per_example_grads(model, params, batch, loss_fn, check_losses)

    def clip_chunk(self, model, params, batch, loss_fn, clipper):
        if self.stores(params):
            return super().clip_chunk(model, params, batch, loss_fn, clipper)
        return hooked_clipped_sum(model, params, batch, loss_fn, check_losses,
                                  clipper.spec.names, clipper.factors, clipper.sums)


class EngineFallbackWarning(UserWarning):
    """``auto`` runs a model on the slower ``reference`` engine."""


@register_engine
class AutoEngine(Engine):
    """Decided per model (and per set of trainable parameters), once:

    1. ``bookkeeping`` when it supports every module owning trainable parameters;
    2. else ``reference`` when the model holds a module torch.func.vmap cannot run
       (``VMAP_UNSUPPORTED``: nn.GRU / nn.LSTM / nn.RNN);
    3. else ``vectorized``, on trial: the first real calls are the trial. If one is refused
       (the forward fails under vmap but runs without it), the RNG streams and buffers are
       restored, the call is redone on ``reference``, and ``reference`` is kept.

    Falling back to ``reference`` warns once per model (``EngineFallbackWarning``), naming the
    modules. Every engine computes the same ``ClipResult``, so the choice changes speed only.
    Real errors (a non-finite loss, a model that fails without vmap too) propagate.
    """

    name = "auto"

    def __init__(self, *, chunk_size: int = 16, store_limit_mb: float = 256.0) -> None:
        self.fast = BookkeepingEngine(chunk_size=chunk_size, store_limit_mb=store_limit_mb)
        self.general = VectorizedEngine(chunk_size=chunk_size)
        self.slow = ReferenceEngine()
        self.chunk_size = chunk_size
        self._chosen: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], Engine]] = (
            weakref.WeakKeyDictionary())

    def choose(self, model: nn.Module) -> Engine:
        """The engine for ``model`` (``vectorized`` may still fall back on its first calls)."""
        key = tuple(trainable_parameters(model))
        hit = self._chosen.get(model)
        if hit is not None and hit[0] == key:
            return hit[1]
        bad = unsupported_modules(model)
        if not bad:
            engine = self.fast
        elif no_vmap := vmap_unsupported(model):
            engine = self._fall_back(model, bad, f"torch.func.vmap has no batching rule for "
                                                 f"{describe_modules(no_vmap)}")
        else:
            engine = self.general
        self._chosen[model] = (key, engine)
        return engine

    def _fall_back(self, model: nn.Module, bad: dict[str, str], why: str) -> Engine:
        """Record ``reference`` for ``model`` and warn once."""
        self._chosen[model] = (tuple(trainable_parameters(model)), self.slow)
        warnings.warn(
            f"engine 'auto': {type(model).__name__} runs on the slower 'reference' engine (one "
            f"forward/backward per example or group): module(s) {describe_modules(bad)} are "
            f"not supported by 'bookkeeping', and 'vectorized' cannot run the model ({why})",
            EngineFallbackWarning, stacklevel=2)
        return self.slow

    def clipped_sum(self, model, batches, loss_fn, policy, *, clip_norm=None, step=0):
        engine = self.choose(model)
        if engine is not self.general:
            return engine.clipped_sum(model, batches, loss_fn, policy, clip_norm=clip_norm,
                                      step=step)
        saved = SavedState(model)
        try:
            return engine.clipped_sum(model, batches, loss_fn, policy, clip_norm=clip_norm,
                                      step=step)
        except UnsupportedModuleError as refusal:
            if refusal.engine != "vectorized":
                raise
            saved.restore()
            self._fall_back(model, unsupported_modules(model), refusal.reason)
        return self.slow.clipped_sum(model, batches, loss_fn, policy, clip_norm=clip_norm,
                                     step=step)
