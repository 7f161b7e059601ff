"""Server optimizers: the aggregate Δ̄ enters as the pseudo-gradient g = −Δ̄ of each tensor.

``fedavg``  θ ← θ + lr·Δ̄ (SGD on g; lr = 1 is plain FedAvg).
``adam``    FedAdam (Reddi et al. 2021): Adam on g.
``lamb``    LAMB (You et al. 2020), the layer-wise normalising optimizer of docs/federated.md: the Adam
            direction u_l = m̂_l/(√v̂_l + ε) + λ·θ_l of each tensor l is rescaled by the trust
            ratio ‖θ_l‖/‖u_l‖, so every layer moves by lr·‖θ_l‖ whatever the scale of its
            (clipped, noised) update.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["Lamb", "build_server_optimizer", "apply_update"]


class Lamb(torch.optim.Optimizer):
    """LAMB with bias correction; trust ratio 1 where ‖θ_l‖ or ‖u_l‖ is 0."""

    def __init__(self, params: Iterable[nn.Parameter], *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lamb: invalid lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (st["m"] / (1 - b1 ** t)) / ((st["v"] / (1 - b2 ** t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    u = u + group["weight_decay"] * p
                w_norm, u_norm = float(p.norm()), float(u.norm())
                trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
                p.add_(u, alpha=-group["lr"] * trust)
        return None


def build_server_optimizer(name: str, params: list[nn.Parameter], *, lr: float,
                           betas: tuple[float, float], eps: float, weight_decay: float
                           ) -> torch.optim.Optimizer:
    if name == "fedavg":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps,
                                weight_decay=weight_decay)
    if name == "lamb":
        return Lamb(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"server optimizer {name!r}; valid: fedavg, adam, lamb")


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer,
                 update: Mapping[str, Tensor]) -> None:
    """One server step: ``.grad`` = −Δ̄ for each tensor of ``update``, then ``optimizer.step()``."""
    params = dict(model.named_parameters())
    optimizer.zero_grad(set_to_none=True)
    for n, u in update.items():
        p = params[n]
        p.grad = (-u).to(device=p.device, dtype=p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
