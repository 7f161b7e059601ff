"""The ``privasr fl`` recipe: a YAML file with ``key=value`` overrides, like ``privasr train``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from privasr.config import (AugmentConfig, BatchConfig, DataConfig, ModelConfig, OptimConfig,
                            TrainConfig, load_config)
from privasr.errors import ConfigError, PolicyError
from privasr.federated.clip import client_policy

__all__ = ["LocalConfig", "ServerConfig", "DPConfig", "SimulationConfig", "ExtrapolateConfig",
           "FLConfig",
           "load_fl_config", "local_train_config", "SERVER_OPTIMIZERS"]

SERVER_OPTIMIZERS = ("fedavg", "adam", "lamb")


@dataclass
class LocalConfig:
    """What one client (one speaker) does with the server model in a round."""

    epochs: int = 1            # passes over the speaker's utterances
    max_steps: int = 0         # cap on local steps (0: no cap)
    optimizer: str = "sgd"     # sgd | adamw
    lr: float = 0.05
    max_grad_norm: float = 1.0  # ordinary per-step clipping of the local batch gradient
    max_seconds: float = 60.0  # padded audio seconds per local batch
    max_utts: int = 16
    specaugment: bool = False


@dataclass
class ServerConfig:
    rounds: int = 20
    cohort_size: float = 8.0   # E[cohort] (poisson) or the exact cohort size (fixed)
    sampling: str = "poisson"  # poisson (what the accountant assumes) | fixed (σ = 0 only)
    optimizer: str = "fedavg"  # fedavg | adam | lamb
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    round_timeout: float = 0.0  # seconds to wait for replies (0: wait for all of them)


@dataclass
class DPConfig:
    """Clipping of client deltas and the Gaussian noise on their sum (user-level DP)."""

    # the ClipPolicy of a client delta (privasr.clipping.policy; the same keys as
    # privasr train's privacy.policy): unit client; scope global, or per_layer with
    # per_layer_rule=uniform (ml-pfl4asr) or layer_bounds {pattern: C_l}; bound fixed.
    # {} = no clipping: plain FedAvg over the replies (the non-private reference; σ must be 0)
    policy: dict = field(default_factory=lambda: {"unit": "client", "clip_norm": 1.0})
    noise_multiplier: float | None = None  # σ; None: calibrated to target_epsilon
    target_epsilon: float | None = None    # None with noise_multiplier None: σ = 0 (no DP)
    delta: float | None = None             # default min(1e-5, N^-1.1) (N = client speakers)
    accounting: str = "pld"                # pld | rdp (dp-accounting)
    # secret (default): with σ > 0, cohorts from a key held in memory, noise from os.urandom;
    # seeded: both from the public seed (debugging): no guarantee, no ε printed or written
    randomness: str = "secret"


@dataclass
class SimulationConfig:
    """Flower Simulation Runtime (Ray backend) resources."""

    num_cpus: int = 1          # CPUs Ray may use on this machine
    client_cpus: float = 1.0   # per ClientApp: num_cpus / client_cpus clients run at once
    client_gpus: float = 0.0


@dataclass
class ExtrapolateConfig:
    """The population and cohort a simulated run stands for (docs/federated.md, "Extrapolated
    runs"): σ is calibrated so that E[cohort] = ``cohort`` of ``population`` users over
    server.rounds rounds spends ``target_epsilon`` at ``delta``, and the simulation adds the
    same noise std on the average update. That ε holds for the stated population only; the
    run also reports the true ε of its own speakers."""

    population: float = 0.0      # P users (e.g. 1.0e+6)
    cohort: int = 0              # E[cohort] K per round at that scale (e.g. 1024)
    target_epsilon: float = 0.0  # user-level ε at (P, K) over server.rounds rounds
    delta: float = 1e-9


@dataclass
class FLConfig:
    out_dir: str = "runs/fl"
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    init_checkpoint: str = ""  # seed model: a `privasr train` checkpoint (last.pt)
    data: DataConfig = field(default_factory=DataConfig)  # train = the FL speakers' manifest
    model: ModelConfig = field(default_factory=ModelConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    eval_every: int = 5        # central WER on the test speakers every this many rounds
    progress: bool = True      # bars over rounds and over a round's clients (stderr)
    max_test_utts: int = 0     # 0: the whole test manifest
    extrapolate_populations: list[float] = field(default_factory=lambda: [1e4, 1e5, 1e6, 1e7])
    extrapolate_delta: float = 1e-9
    # None: off; {population, cohort, target_epsilon, delta}: σ from the stated population
    extrapolate: ExtrapolateConfig | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"fl recipe: {msg}")

        try:
            client_policy(self.dp.policy)
        except PolicyError as e:
            raise bad(f"dp.policy: {e}") from None
        if self.server.optimizer not in SERVER_OPTIMIZERS:
            raise bad(f"server.optimizer={self.server.optimizer!r}; valid: "
                      f"{', '.join(SERVER_OPTIMIZERS)}")
        if self.server.sampling not in ("poisson", "fixed"):
            raise bad(f"server.sampling={self.server.sampling!r}; valid: poisson, fixed")
        if self.local.optimizer not in ("sgd", "adamw"):
            raise bad(f"local.optimizer={self.local.optimizer!r}; valid: sgd, adamw")
        if self.server.rounds < 1 or self.server.cohort_size <= 0:
            raise bad("server.rounds must be >= 1 and server.cohort_size > 0")
        if self.local.epochs < 1 or self.local.max_steps < 0:
            raise bad("local.epochs must be >= 1 and local.max_steps >= 0")
        if self.eval_every < 1:
            raise bad("eval_every must be >= 1")
        if self.dp.randomness not in ("secret", "seeded"):
            raise bad(f"dp.randomness={self.dp.randomness!r}; valid: secret, seeded")
        if self.server.round_timeout < 0:
            raise bad("server.round_timeout must be >= 0 (0: no timeout)")
        if (self.dp.noise_multiplier is not None and self.dp.target_epsilon is not None):
            raise bad("give dp.noise_multiplier or dp.target_epsilon (σ is calibrated to it), "
                      "not both")
        if self.extrapolate is not None:
            self._check_extrapolate(bad)
        dp_on = (bool(self.dp.noise_multiplier) or self.dp.target_epsilon is not None
                 or self.extrapolate is not None)
        if dp_on and not self.dp.policy:
            raise bad("dp.policy={} is no clipping (the non-private FedAvg reference): it cannot "
                      "be DP; give dp.policy.clip_norm, or drop dp.target_epsilon / "
                      "dp.noise_multiplier / extrapolate")
        if dp_on and self.server.sampling != "poisson":
            raise bad("DP (σ > 0) needs server.sampling=poisson: the user-level accountant "
                      "assumes each speaker joins a round independently with probability "
                      "q = cohort_size / N")

    def _check_extrapolate(self, bad: Callable[[str], ConfigError]) -> None:
        ex = self.extrapolate
        if self.dp.noise_multiplier is not None or self.dp.target_epsilon is not None:
            raise bad("extrapolate sets σ (calibrated to extrapolate.target_epsilon at the "
                      "stated population and cohort): remove dp.noise_multiplier and "
                      "dp.target_epsilon (the simulated population's true ε is reported, not "
                      "budgeted)")
        if not (math.isfinite(ex.population) and ex.population >= 1):
            raise bad(f"extrapolate.population={ex.population!r} must be a finite number "
                      ">= 1 (the users the run stands for, e.g. 1.0e+6)")
        if isinstance(ex.cohort, bool) or not 1 <= ex.cohort <= ex.population:
            raise bad(f"extrapolate.cohort={ex.cohort!r} must be an integer in [1, "
                      f"extrapolate.population={ex.population:g}] (E[cohort] at that scale)")
        if not (math.isfinite(ex.target_epsilon) and ex.target_epsilon > 0):
            raise bad(f"extrapolate.target_epsilon={ex.target_epsilon!r} must be finite and > 0")
        if not 0 < ex.delta * ex.population < 1:
            raise bad(f"extrapolate.delta={ex.delta!r} must be in (0, 1/population): "
                      "δ ≥ 1/P allows publishing one user's data whole")


def load_fl_config(path: str | Path | None, overrides: list[str] = ()) -> FLConfig:
    return load_config(path, list(overrides), cls=FLConfig)


def local_train_config(cfg: FLConfig, *, out_dir: str, steps: int, seed: int) -> TrainConfig:
    """The TrainConfig of one client's local update (the ordinary Trainer runs it)."""
    loc = cfg.local
    return TrainConfig(
        out_dir=out_dir, seed=seed, device=cfg.device, threads=cfg.threads, data=cfg.data,
        model=cfg.model,
        optim=OptimConfig(name=loc.optimizer, lr=loc.lr, weight_decay=0.0, warmup_steps=0,
                          max_steps=steps, min_lr_ratio=1.0, max_grad_norm=loc.max_grad_norm),
        batch=BatchConfig(max_seconds=loc.max_seconds, max_utts=loc.max_utts),
        augment=AugmentConfig(specaugment=loc.specaugment),
        eval_every=10**9, ckpt_every=10**9, log_every=10**9, progress=False)
