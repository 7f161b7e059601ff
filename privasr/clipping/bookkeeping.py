"""Per-example gradients from ONE ordinary forward and ONE activation-only backward.

The ``bookkeeping`` engine (after Bu et al., "Differentially private optimization on large
model at small cost", 2023) never runs the model under ``vmap`` and never asks autograd for
parameter gradients:

1. forward hooks on every module that owns trainable parameters wrap its output ``y`` in an
   identity ``_Tap`` that keeps the module's input ``x``;
2. ``autograd.grad(Σ_i loss_i, [anchor])``, where ``anchor`` is a scalar every tap depends on,
   runs the backward through every tapped output but asks for no parameter gradient, so
   autograd skips them (each matmul backward does one product instead of two);
3. as soon as a tap's ``∂L/∂y`` is complete, its backward rebuilds the module's per-example
   parameter gradients from (x_i, ∂L_i/∂y_i) with one batched product -- for a Linear,
   ``g_i = (∂L_i/∂y_i)ᵀ x_i`` -- whose cost is what the ordinary weight gradient costs
   anyway, and ``∂L/∂y`` is freed as in an ordinary backward.

Example i's loss depends only on example i's rows (no BatchNorm), so row i of ``∂(Σ loss)/∂y``
is ``∂loss_i/∂y_i``. Padding rows have zero output gradient when the model masks padding (the
engines' equality with the reference, which runs every example alone and unpadded, tests it).

Supported modules: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (zero padding, any stride,
dilation, groups) and ``nn.LayerNorm``, and subclasses that keep their ``forward``; a module called several times per forward has its
per-call gradients summed. Contract: a trainable parameter is used only inside its own module's
``forward`` (no weight tying through ``F.linear(x, other.weight)``), and a hooked module's output
is not modified in place afterwards (checked: it raises). Any other module owning trainable
parameters is refused with an ``UnsupportedModuleError`` (a ``PolicyError`` and a ``TypeError``)
naming every such module and the engines that can run it: ``vectorized`` (unless torch.func.vmap
cannot run the module either, e.g. nn.GRU / nn.LSTM), ``reference`` and ``auto``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privasr.errors import PolicyError
from privasr.data.dataset import Batch

__all__ = ["SUPPORTED", "VMAP_UNSUPPORTED", "UnsupportedModuleError", "hooked_per_example_grads",
           "hooked_clipped_sum", "check_supported", "unsupported_modules", "vmap_unsupported",
           "describe_modules"]

LossFn = Callable[[nn.Module, Batch], Tensor]
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm)
# Modules torch.func.vmap cannot run at all (no batching rule for aten::gru / lstm / rnn_tanh /
# rnn_relu, and no fallback): the ``vectorized`` engine fails on them too, frozen or not.
VMAP_UNSUPPORTED: tuple[type[nn.Module], ...] = (nn.RNNBase,)


class UnsupportedModuleError(PolicyError, TypeError):
    """An engine cannot compute per-example gradients of some modules of the model.

    ``modules``: {qualified name: what is wrong (the type, and why)}; ``engine``: the engine
    that refuses; ``alternatives``: engines that can run the model; ``reason``: why, in short.
    A ``PolicyError`` (the run is misconfigured) and, for callers of ``check_supported``, a
    ``TypeError``.
    """

    def __init__(self, message: str, *, engine: str, modules: dict[str, str],
                 alternatives: tuple[str, ...], reason: str = "") -> None:
        super().__init__(message)
        self.engine, self.modules, self.alternatives = engine, dict(modules), alternatives
        self.reason = reason or message


def describe_modules(modules: dict[str, str], limit: int = 6) -> str:
    """``'rnn' (GRU), 'head' (Embedding)`` -- at most ``limit`` of them, then a count."""
    shown = [f"{name or '<root>'!r} ({what})" for name, what in list(modules.items())[:limit]]
    more = len(modules) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: module} for every module that directly owns a trainable parameter."""
    return {name: mod for name, mod in model.named_modules()
            if any(p.requires_grad for p in mod.parameters(recurse=False))}


def _unsupported_reason(mod: nn.Module) -> str | None:
    """Why bookkeeping cannot hook ``mod`` (a module owning trainable parameters), or None."""
    base = next((c for c in SUPPORTED if isinstance(mod, c)), None)
    if base is None or type(mod).forward is not base.forward:
        return type(mod).__name__
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and (
            mod.padding_mode != "zeros" or isinstance(mod.padding, str) and mod.padding != "valid"):
        return (f"{type(mod).__name__} with padding={mod.padding!r}, "
                f"padding_mode={mod.padding_mode!r}: only explicit zero padding is supported")
    return None


def unsupported_modules(model: nn.Module) -> dict[str, str]:
    """{qualified name: type (and why)} of the modules owning trainable parameters that the
    bookkeeping engine cannot compute per-example gradients of; empty when it supports all."""
    out = {}
    for name, mod in _owners(model).items():
        why = _unsupported_reason(mod)
        if why is not None:
            out[name] = why
    return out


def vmap_unsupported(model: nn.Module) -> dict[str, str]:
    """{qualified name: type} of the modules torch.func.vmap is known not to run
    (``VMAP_UNSUPPORTED``), trainable or frozen."""
    return {name: type(mod).__name__ for name, mod in model.named_modules()
            if isinstance(mod, VMAP_UNSUPPORTED)}


def check_supported(model: nn.Module) -> dict[str, nn.Module]:
    """The modules to hook; raises ``UnsupportedModuleError`` naming every unsupported one."""
    bad = unsupported_modules(model)
    if bad:
        no_vmap = vmap_unsupported(model)
        alternatives = ("reference", "auto") if no_vmap else ("vectorized", "reference", "auto")
        why_not = (f" (not 'vectorized': torch.func.vmap has no batching rule for "
                   f"{describe_modules(no_vmap)})" if no_vmap else "")
        raise UnsupportedModuleError(
            f"engine 'bookkeeping' computes per-example gradients of nn.Linear, nn.Conv1d, "
            f"nn.Conv2d (explicit zero padding) and nn.LayerNorm only; module(s) "
            f"{describe_modules(bad)} own trainable parameters and are not supported by it: "
            f"use engine {' or '.join(repr(a) for a in alternatives)}{why_not}",
            engine="bookkeeping", modules=bad, alternatives=alternatives)
    return _owners(model)


# -- per-module per-example gradients from (x, dL/dy) --------------------------------------------
def _linear(mod: nn.Linear, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    b = x.shape[0]
    x3, g3 = x.reshape(b, -1, x.shape[-1]), gy.reshape(b, -1, gy.shape[-1])
    out = {"weight": torch.bmm(g3.transpose(1, 2), x3)}
    if mod.bias is not None:
        out["bias"] = g3.sum(1)
    return out


def _layer_norm(mod: nn.LayerNorm, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    b, dims = x.shape[0], len(mod.normalized_shape)
    reduce = tuple(range(1, x.dim() - dims))
    out = {}
    if mod.weight is not None:
        gx = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps).mul_(gy)  # x̂ ⊙ ∂L/∂y
        out["weight"] = gx.sum(reduce) if reduce else gx
    if mod.bias is not None:
        out["bias"] = gy.sum(reduce) if reduce else gy
    return {k: v.reshape(b, *mod.normalized_shape) for k, v in out.items()}


def _conv(mod: nn.Conv1d | nn.Conv2d, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    """Per-example weight gradients as ONE weight-only ``convolution_backward``: the batch is
    folded into the channels, (B, C, ...) -> (1, B·C, ...), with B× the groups, so every
    example is its own group and the "summed" weight gradient comes out per example. Exact,
    and on CPU faster than unfold + einsum (im2col of a batch is memory-bound)."""
    b, w = x.shape[0], mod.weight.detach().to(x.dtype)
    pad = _pad(mod)
    wb = torch.ops.aten.convolution_backward(
        gy.reshape(1, -1, *gy.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
        w.repeat(b, *[1] * (w.dim() - 1)), None, mod.stride, pad, mod.dilation, False,
        [0] * len(pad), mod.groups * b, [False, True, False])[1]
    out = {"weight": wb.reshape(b, *w.shape)}
    if mod.bias is not None:
        out["bias"] = gy.flatten(2).sum(2)
    return out


def _depthwise_conv1d(mod: nn.Conv1d, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    """Per-example weight gradients of a depthwise Conv1d (groups = in_channels) as K
    shifted products: g_i[o, 0, k] = Σ_t ∂L_i/∂y[o, t] · x_pad[o // m, t·s + k·d] (m output
    channels per input channel). Same numbers as the folded ``convolution_backward``, about
    3x faster on CPU at Conformer shapes (B·C groups of one channel each are a slow case for
    oneDNN)."""
    (k,), (s,), (d,) = mod.kernel_size, mod.stride, mod.dilation
    (p,) = _pad(mod)
    m = mod.out_channels // mod.in_channels
    if m > 1:
        x = x.repeat_interleave(m, dim=1)
    span = s * (gy.shape[2] - 1) + 1
    if x.stride(1) == 1 and gy.stride(1) == 1:      # channels-last (a Conformer's (B, T, C))
        xt, gt = x.transpose(1, 2), gy.transpose(1, 2)
        xt = F.pad(xt, (0, 0, p, p)) if p else xt
        w = torch.stack([(xt[:, j * d:j * d + span:s] * gt).sum(1) for j in range(k)], dim=2)
    else:
        xp = F.pad(x, (p, p)) if p else x
        w = torch.stack([torch.linalg.vecdot(xp[:, :, j * d:j * d + span:s], gy)
                         for j in range(k)], dim=2)
    out = {"weight": w.unsqueeze(2)}
    if mod.bias is not None:
        out["bias"] = gy.sum(2)
    return out


def _is_depthwise_conv1d(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Conv1d) and mod.groups == mod.in_channels > 1
            and mod.out_channels % mod.in_channels == 0)


def _pad(mod: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    return (0,) * len(mod.kernel_size) if mod.padding == "valid" else tuple(mod.padding)


def _module_grads(mod: nn.Module, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    if isinstance(mod, nn.Linear):
        return _linear(mod, x, gy)
    if isinstance(mod, nn.LayerNorm):
        return _layer_norm(mod, x, gy)
    if _is_depthwise_conv1d(mod):
        return _depthwise_conv1d(mod, x, gy)
    return _conv(mod, x, gy)


# -- one forward + activation-only backward -------------------------------------------------------
Sink = Callable[[str, nn.Module, Tensor, Tensor], None]


class _Tap(torch.autograd.Function):
    """Identity on a hooked module's output ``y``, tied to a scalar ``anchor``. Its backward
    hands (x, ∂L/∂y) to ``sink`` as soon as ∂L/∂y is complete, so each module's per-example
    gradients are built during the backward and its ∂L/∂y is freed right after (the peak
    never holds every module's ∂L/∂y at once)."""

    @staticmethod
    def forward(ctx, y: Tensor, anchor: Tensor, x: Tensor, call: tuple) -> Tensor:
        ctx.x, ctx.call = x, call
        return y        # returned as-is: autograd makes it a view (in-place use then raises)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, (sink, prefix, mod) = ctx.x, ctx.call
        del ctx.x, ctx.call
        dtype = torch.promote_types(x.dtype, torch.float32)
        sink(prefix, mod, x.to(dtype), gy.to(dtype))
        return gy, torch.zeros((), device=gy.device), None, None


_INPLACE = "is a view and is being modified inplace"


def _capture(model: nn.Module, batch: Batch, loss_fn: LossFn,
             check_losses: Callable[[Tensor, int], Tensor], want: bool, sink: Sink) -> Tensor:
    """Run ``loss_fn`` with every module owning trainable parameters tapped, then one
    activation-only backward (autograd.grad w.r.t. the taps' anchor only: no parameter
    gradient is computed) that calls ``sink(prefix, module, x, ∂L/∂y)`` once per module call.
    Returns the (B,) losses."""
    owners = check_supported(model)
    ref = next(iter(model.parameters()), None)
    anchor = torch.zeros((), requires_grad=True,
                         device=ref.device if ref is not None else None)
    tapped: list[str] = []

    def hook(name: str, mod: nn.Module):
        call = (sink, f"{name}." if name else "", mod)

        def tap(_mod: nn.Module, args: tuple, output: Tensor):
            if isinstance(output, Tensor) and output.requires_grad:
                tapped.append(name)
                return _Tap.apply(output, anchor, args[0].detach(), call)
            return None
        return tap

    handles = [mod.register_forward_hook(hook(name, mod)) for name, mod in owners.items()]
    try:
        losses = check_losses(loss_fn(model, batch), len(batch))
    except RuntimeError as err:
        if _INPLACE not in str(err):
            raise
        raise RuntimeError(f"engine 'bookkeeping': the output of a module with trainable "
                           f"parameters (one of {describe_modules({n: type(m).__name__ for n, m in owners.items()})}) "
                           f"was modified in place after its forward; use engine='vectorized'"
                           ) from err
    finally:
        for h in handles:
            h.remove()
    if want and not tapped:
        raise RuntimeError("the loss does not depend on any hooked module output: loss_fn must "
                           "get its outputs by calling model(...) on the batch")
    if tapped:
        torch.autograd.grad(losses.sum(), [anchor], allow_unused=True)
    return losses.detach()


def hooked_per_example_grads(model: nn.Module, params: dict[str, nn.Parameter], batch: Batch,
                             loss_fn: LossFn, check_losses: Callable[[Tensor, int], Tensor]
                             ) -> tuple[dict[str, Tensor], Tensor]:
    """({name: (B, *shape)} per-example gradients of ``loss_fn``'s (B,) losses, the losses)."""
    n = len(batch)
    grads: dict[str, Tensor] = {}

    def add(prefix: str, mod: nn.Module, x: Tensor, gy: Tensor) -> None:
        for k, g in _module_grads(mod, x, gy).items():
            if (key := prefix + k) in params:
                grads[key] = grads[key] + g if key in grads else g

    losses = _capture(model, batch, loss_fn, check_losses, bool(params), add)
    return ({k: grads[k].to(p.dtype) if k in grads
             else torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device)
             for k, p in params.items()}, losses)


def hooked_clipped_sum(model: nn.Module, params: dict[str, nn.Parameter], batch: Batch,
                       loss_fn: LossFn, check_losses: Callable[[Tensor, int], Tensor],
                       names: tuple[str, ...], factors: Callable[[Tensor], Tensor],
                       sums: dict[str, Tensor]) -> Tensor:
    """Add Σ_i clip(g_i) of one batch (unit = example) to ``sums``; return the (B,) losses.

    Two passes over the captured (x, ∂L/∂y), never holding B × (all parameters): a Linear
    weight's per-example gradients are built one layer at a time, only to take their norms;
    the clipped sum is then ONE matrix product per layer with ∂L/∂y scaled per example,
    Σ_i f_i (∂L_i/∂y_i)ᵀ x_i. Small tensors (biases, norms, convolutions, layers called twice)
    keep their per-example gradients. ``factors`` maps the (B, L) squared per-tensor norms of
    ``names`` to the (B, L) clipping factors (``_UnitClipper.factors``).
    """
    n = len(batch)
    calls: dict[str, tuple[nn.Module, list[tuple[Tensor, Tensor]]]] = {}

    def keep(prefix: str, mod: nn.Module, x: Tensor, gy: Tensor) -> None:
        calls.setdefault(prefix, (mod, []))[1].append((x, gy))

    losses = _capture(model, batch, loss_fn, check_losses, bool(params), keep)
    kept: dict[str, Tensor] = {}
    sq: dict[str, Tensor] = {}
    deferred: dict[str, tuple[Tensor, Tensor]] = {}       # Linear weight -> (x3, g3)
    for prefix, (mod, pairs) in calls.items():
        if isinstance(mod, nn.Linear) and len(pairs) == 1 and mod.weight.requires_grad:
            x, gy = pairs[0]
            x3, g3 = x.reshape(n, -1, x.shape[-1]), gy.reshape(n, -1, gy.shape[-1])
            key = prefix + "weight"
            sq[key] = torch.linalg.vector_norm(torch.bmm(g3.transpose(1, 2), x3).flatten(1),
                                               dim=1).square()
            deferred[key] = (x3, g3)
            if mod.bias is not None and mod.bias.requires_grad:
                kept[prefix + "bias"] = g3.sum(1)
            continue
        for x, gy in pairs:
            for k, g in _module_grads(mod, x, gy).items():
                if (key := prefix + k) in params:
                    kept[key] = kept[key] + g if key in kept else g
    for k, g in kept.items():
        sq[k] = torch.linalg.vector_norm(g.flatten(1), dim=1).square()
    if not names:
        return losses
    ref = next(iter(params.values()))
    zero = torch.zeros(n, dtype=torch.float32, device=ref.device)
    f = factors(torch.stack([sq.get(k, zero).float() for k in names], dim=1))     # (B, L)
    for j, k in enumerate(names):
        w = f[:, j]
        if k in deferred:
            x3, g3 = deferred[k]
            g = (g3 * w.to(g3.dtype)[:, None, None]).flatten(0, 1).t() @ x3.flatten(0, 1)
        elif k in kept:
            g = torch.tensordot(w.to(kept[k].dtype), kept[k], dims=1)
        else:
            continue
        sums[k] += g.to(sums[k].dtype)
    return losses
