"""The federated server's state and its round step, independent of the transport (Flower).

    speakers = sorted speakers of the training manifest (N clients); q = E[cohort] / N
    each round r:
        ledger.check_before_step()                 refuse a round the budget cannot pay for
        cohort = sample_cohort(r)                  Poisson over speakers (a function of seed, r)
        deltas = the cohort's replies              failures / timeouts / invalid deltas dropped
        Δ̄ = (Σ clip(Δ_c) + σ·C·ξ) / E[cohort]      privasr.federated.aggregate
        server optimizer step on −Δ̄; ledger.record_step(); round += 1
        atomic checkpoint: model, optimizer, ledger, round (what was released, together)

With ``extrapolate`` (the paper's methodology) σ = σ_sim = σ_big·E[cohort]/K, σ_big calibrated
for the stated population P and cohort K: the ledger accounts the run's own speakers (the true
ε, reported as ``epsilon_simulated``) and the rounds are also accounted at (σ_big, K/P), reported
as ``epsilon_extrapolated`` and budgeted at extrapolate.target_epsilon.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from privasr.clipping.noise import GaussianNoise
from privasr.clipping.release import Release
from privasr.config import to_dict
from privasr.data.manifest import SkipReport
from privasr.data.tokenizer import CharTokenizer
from privasr.federated.accounting import (Extrapolation, build_ledger, extrapolated_noise,
                                          extrapolation_table, simulated_accountant,
                                          simulated_epsilon_report)
from privasr.federated.aggregate import aggregate
from privasr.federated.client import speakers_of
from privasr.federated.clip import DeltaClipper, NoClip, client_policy, policy_label
from privasr.federated.cohort import sample_cohort, sample_rate
from privasr.federated.config import FLConfig, local_train_config
from privasr.federated.optim import apply_update, build_server_optimizer
from privasr.models.conformer import count_parameters
from privasr.privacy.statement import privacy_statement
from privasr.privacy.accountant import default_delta
from privasr.privacy.ledger import (LedgerMismatch, PrivacyBudgetExceeded, PrivacyLedger,
                                    resume_ledger)
from privasr.privacy.randomness import SecretRandomness
from privasr.checkpoint import load_checkpoint, save_checkpoint
from privasr.decoding.evaluate import evaluate
from privasr.report.metrics_log import MetricsLogger
from privasr.models.build import build_model
from privasr.data.splits import load_split, manifest_paths
from privasr.train.trainer import pick_device

__all__ = ["FLServer", "validate_delta"]

CKPT_NAME = "server.pt"


def validate_delta(delta: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> str | None:
    """Why a client's delta cannot be used (None if it can): names, shapes, finiteness."""
    if set(delta) != set(shapes):
        missing, extra = sorted(set(shapes) - set(delta)), sorted(set(delta) - set(shapes))
        return f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for n, s in shapes.items():
        t = delta[n]
        if tuple(t.shape) != tuple(s):
            return f"{n}: shape {tuple(t.shape)} != {tuple(s)}"
        if not bool(torch.isfinite(t).all()):
            return f"{n}: non-finite values"
    return None


def _noise_seed(seed: int, round_: int) -> int:
    h = hashlib.blake2b(f"privasr-fl-noise/{seed}/{round_}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


class FLServer:
    """Model, server optimizer, clipper, ledger and round counter of one federated run."""

    def __init__(self, cfg: FLConfig, log: Callable[[str], Any] = print) -> None:
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.speakers = speakers_of(manifest_paths(cfg)["train"])
        self.population = len(self.speakers)
        s = cfg.server
        self.q = sample_rate(s.cohort_size, self.population)
        self.expected_cohort = float(s.cohort_size if s.sampling == "poisson"
                                     else round(s.cohort_size))
        self.device = pick_device(cfg.device)
        self.vocab = list(CharTokenizer().symbols)
        self.model = build_model(cfg, len(self.vocab))
        if cfg.init_checkpoint:
            ck = load_checkpoint(cfg.init_checkpoint)
            self.model.load_state_dict(ck["model"])
        self.model.to(self.device)
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.shapes = {n: p.shape for n, p in params.items()}
        d = cfg.dp
        self.optimizer = build_server_optimizer(s.optimizer, list(params.values()), lr=s.lr,
                                                betas=s.betas, eps=s.eps,
                                                weight_decay=s.weight_decay)
        self.delta = float(d.delta) if d.delta is not None else default_delta(self.population)
        self.extrapolation: Extrapolation | None = None
        self.ledger: PrivacyLedger | None
        if cfg.extrapolate is not None:   # σ from the stated population, not from this one
            ex = cfg.extrapolate
            self.extrapolation = extrapolated_noise(
                population=ex.population, cohort=ex.cohort, target_epsilon=ex.target_epsilon,
                delta=ex.delta, rounds=s.rounds, method=d.accounting)
            sigma = self.extrapolation.simulated_noise_multiplier(self.expected_cohort)
            self.ledger = build_ledger(noise_multiplier=sigma, target_epsilon=None,
                                       delta=self.delta, rounds=s.rounds, sample_rate=self.q,
                                       method=simulated_accountant(sigma, d.accounting))
        else:
            self.ledger = build_ledger(
                noise_multiplier=d.noise_multiplier, target_epsilon=d.target_epsilon,
                delta=self.delta, rounds=s.rounds, sample_rate=self.q, method=d.accounting)
        self.noise_multiplier = self.ledger.noise_multiplier if self.ledger else 0.0
        # the recipe's dp.policy, unit = client: the same ClipPolicy as privasr train's
        self.policy = client_policy(d.policy, noise_multiplier=self.noise_multiplier,
                                    expected_cohort=self.expected_cohort)
        self.clipper = (DeltaClipper(self.policy, list(params)) if self.policy is not None
                        else NoClip(list(params)))
        # secret cohorts and noise whenever σ > 0 (the key lives in memory only)
        self.secret = self.ledger is not None and d.randomness == "secret"
        self.source = SecretRandomness() if self.secret else None
        if self.ledger is not None:
            self.ledger.population = self.population
            self.ledger.secret_randomness = self.secret
        self.round = 0
        self.history: list[dict] = []
        self.metrics = MetricsLogger(self.out, tensorboard=False)
        self._test_ds = None

    # -- rounds ----------------------------------------------------------------------------
    def cohort(self) -> list[str]:
        """The speakers sampled for the current round."""
        s = self.cfg.server
        idx = sample_cohort(self.round, self.population, s.cohort_size, sampling=s.sampling,
                            seed=self.cfg.seed, source=self.source)
        return [self.speakers[i] for i in idx]

    def check_budget(self) -> None:
        """Raise PrivacyBudgetExceeded (a StopTraining) if one more round is over budget."""
        if self.ledger is not None:
            self.ledger.check_before_step()
        ex = self.extrapolation
        if ex is not None and self.ledger is not None:
            eps_next = ex.epsilon(self.ledger.segments, self.expected_cohort, more_rounds=1)
            if eps_next > ex.target_epsilon:
                raise PrivacyBudgetExceeded(
                    f"the next round would spend extrapolated ε = {eps_next:.4g} > "
                    f"extrapolate.target_epsilon = {ex.target_epsilon:g} ({ex.label}); "
                    f"stopping ({self.ledger.steps} rounds done)",
                    epsilon_next=eps_next, budget=ex.target_epsilon,
                    steps_done=self.ledger.steps)

    def epsilon_extrapolated(self) -> float | None:
        """Extrapolated ε of the rounds run (None without ``extrapolate``): it holds for the
        stated population and cohort, not for this run's speakers."""
        if self.extrapolation is None or self.ledger is None:
            return None
        return self.extrapolation.epsilon(self.ledger.segments, self.expected_cohort)

    def epsilon_text(self, eps: float, eps_extrapolated: float | None = None) -> str:
        """An ε for the log, saying which one it is."""
        if self.extrapolation is None:
            return f"ε = {eps:.4g} (δ = {self.delta:.3g}, per speaker)"
        ex = self.extrapolation
        return (f"ε_simulated = {eps:.4g} (δ = {self.delta:.3g}, per speaker of these "
                f"{self.population}: this run's guarantee), ε_extrapolated = "
                f"{eps_extrapolated if eps_extrapolated is not None else math.nan:.4g} "
                f"(δ = {ex.delta:.3g}, P = {ex.population:g}, E[cohort] = {ex.cohort:g}: "
                "not this run's guarantee)")

    def global_state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def step(self, deltas: list[Mapping[str, Tensor]], *, sampled: int, failed: int,
             seconds: float = math.nan, client_seconds: Sequence[float] = (),
             workers: int | None = None) -> dict:
        """Aggregate the valid deltas, apply the server optimizer, record the round.
        ``client_seconds``: the replying clients' local training times; ``workers``: how many
        train at once (None: all of them)."""
        self.check_budget()
        usable, invalid = [], 0
        for dl in deltas:
            why = validate_delta(dl, self.shapes)
            if why is None:
                usable.append(dl)
            else:
                invalid += 1
                self.log(f"round {self.round}: client delta rejected: {why}")
        gen = None if self.secret else torch.Generator().manual_seed(
            _noise_seed(self.cfg.seed, self.round))
        if self.ledger is not None:   # the ledger records the σ and q this round applies
            self.ledger.set_params(noise_multiplier=self.noise_multiplier, sample_rate=self.q)
        release = (Release(self.policy, GaussianNoise(generator=gen, secure=self.secret))
                   if self.policy is not None else None)
        agg = aggregate(usable, self.clipper, release, self.shapes)
        apply_update(self.model, self.optimizer, agg.update)
        if self.ledger is not None:
            self.ledger.record_step()
        self.round += 1
        upd = math.sqrt(sum(float(u.double().pow(2).sum()) for u in agg.update.values()))
        row = {"round": self.round, "sampled": sampled, "aggregated": agg.clients,
               "failed": failed + invalid, "clipped": agg.clipped, "update_norm": upd,
               "epsilon": self.epsilon(), "round_seconds": seconds,
               "delta_norm_median": _nan_if_none(_median_finite(agg.norms)),
               **round_parallelism(seconds, client_seconds, workers)}
        if self.extrapolation is not None:   # "epsilon" stays this run's own (simulated) ε
            row["epsilon_extrapolated"] = self.epsilon_extrapolated()
        if self.ledger is not None:   # realised cohort, clipping counts and client times:
            row.update({k: math.nan for k in PRIVATE_ROUND_STATS})      # not covered by ε
        self.history.append(row)
        self.metrics.log("rounds", self.round, {k: v for k, v in row.items() if k != "round"})
        return row

    def epsilon(self) -> float:
        """ε per speaker so far; NaN when the run has no guarantee (seeded randomness)."""
        if self.ledger is None:
            return math.inf
        eps = self.ledger.claimed_epsilon()
        return math.nan if eps is None else eps

    # -- evaluation ------------------------------------------------------------------------
    def evaluate_test(self) -> dict[str, float]:
        """WER/CER/loss on the test speakers (unseen by every client)."""
        if self._test_ds is None:
            cfg = self.cfg
            tcfg = local_train_config(cfg, out_dir=str(self.out), steps=1, seed=cfg.seed)
            self._test_ds = load_split(manifest_paths(cfg)["test"], tcfg, CharTokenizer(),
                                       SkipReport(), limit=cfg.max_test_utts or None)
        res = evaluate(self.model, self._test_ds, self.vocab, device=self.device)
        self.metrics.log("test", self.round, res)
        return res

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / CKPT_NAME

    def save(self) -> None:
        """Model, optimizer, ledger and round in one atomic file: what was released so far."""
        save_checkpoint(self.ckpt_path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "round": self.round, "history": self.history,
            "privacy_ledger": self.ledger.to_dict() if self.ledger else None,
            "noise_multiplier": self.noise_multiplier, "config": to_dict(self.cfg),
            "vocab": self.vocab,
            "model_config": vars(self.model.cfg).copy() if hasattr(self.model, "cfg") else None,
        })

    def resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        ck = load_checkpoint(self.ckpt_path, map_location=self.device)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.round, self.history = int(ck["round"]), list(ck["history"])
        saved = ck["privacy_ledger"]
        if (saved is None) != (self.ledger is None) and self.round > 0:
            raise LedgerMismatch("cannot resume: the checkpoint and the recipe disagree on "
                                 "whether the run is DP (noise on or off); start a new out_dir")
        if saved is not None:
            self.ledger, notes = resume_ledger(PrivacyLedger.from_dict(saved), self.ledger)
            for note in notes:
                self.log(note)
        self.metrics.truncate_after(self.round)
        return True

    # -- results ---------------------------------------------------------------------------
    def describe(self) -> str:
        s = self.cfg.server
        priv = (self.ledger.summary() if self.ledger else
                "σ = 0: clipping only, no DP guarantee")
        ex = self.extrapolation
        if ex is not None:
            priv = (f"simulated (this run's guarantee, its {self.population} speakers): {priv}; "
                    f"extrapolated (P = {ex.population:g}, E[cohort] = {ex.cohort:g}, not this "
                    f"run's guarantee): σ_big = {ex.noise_multiplier:.4g} calibrated to ε = "
                    f"{ex.target_epsilon:g} at δ = {ex.delta:.3g} over {ex.rounds} rounds, "
                    f"noise std on the average {ex.noise_multiplier / ex.cohort:.4g}·C")
        return (f"FL: {self.population} client speakers, E[cohort] = {self.expected_cohort:g} "
                f"({s.sampling}, q = {self.q:.4g}), {s.rounds} rounds, clipping "
                f"{policy_label(self.policy)} "
                f"(total bound C = {self.clipper.bound:.4g}), σ = {self.noise_multiplier:.4g}, "
                f"server {s.optimizer} lr {s.lr:g}; model {self.cfg.model.size} "
                f"{count_parameters(self.model):,} parameters; privacy: {priv}")

    def results(self, test: Mapping[str, float], wall: float) -> dict:
        cfg = self.cfg
        eps = self.epsilon()
        secs = [r["round_seconds"] for r in self.history if math.isfinite(r["round_seconds"])]
        out = {
            "clipping": policy_label(self.policy),
            "clip_policy": self.policy.to_dict() if self.policy is not None else None,
            "server_optimizer": cfg.server.optimizer,
            "epsilon": eps if math.isfinite(eps) else "inf", "delta": self.delta,
            "privacy_unit": "speaker (user-level, one client = one speaker)",
            "noise_multiplier": self.noise_multiplier,
            "clip_bound": self.clipper.bound if self.policy is not None else None,
            "rounds": self.round, "population": self.population,
            "expected_cohort": self.expected_cohort, "sample_rate": self.q,
            "test_wer": test["wer"], "test_cer": test["cer"], "test_loss": test["loss"],
            "mean_round_seconds": sum(secs) / len(secs) if secs else None,
            "round_time_ratio_median": _median_finite(
                [r.get("round_time_ratio", math.nan) for r in self.history]),
            "wall_seconds": wall, "failed_clients": (None if self.ledger is not None   # withheld
                                                      else sum(r["failed"] for r in self.history)),
            "history": self.history,
            "privacy": self.ledger.to_dict() if self.ledger else None,
            "privacy_statement": privacy_statement(
                self.ledger, clipped=True, private_stats=False, protects="speaker",
                sampling=f"Poisson over speakers, q = {self.q:.4g}",
                extra_outside=["per-round wall-clock time"]),
        }
        if not math.isfinite(eps):
            out["epsilon"] = "inf" if eps == math.inf else None
        if self.extrapolation is not None and self.ledger is not None:
            out["epsilon_simulated"] = simulated_epsilon_report(
                self.ledger, expected_cohort=self.expected_cohort)
            out["epsilon_extrapolated"] = self.extrapolation.report(self.ledger.segments,
                                                                    self.expected_cohort)
        if self.noise_multiplier > 0:
            out["extrapolation"] = extrapolation_table(
                noise_multiplier=self.noise_multiplier, cohort=self.expected_cohort,
                rounds=self.round, populations=cfg.extrapolate_populations,
                delta=cfg.extrapolate_delta, method=cfg.dp.accounting)
        return out

    def write_results(self, results: dict) -> Path:
        from privasr.atomic import atomic_write_text

        path = self.out / "results.json"
        atomic_write_text(path, json.dumps(results, indent=1))
        return path

    def finish(self) -> None:
        self.metrics.close()


PRIVATE_ROUND_STATS = ("sampled", "aggregated", "failed", "clipped", "delta_norm_median",
                       "client_train_seconds_sum",
                       "client_train_seconds_max", "round_time_ratio", "round_time_ratio_to_bound")


def round_parallelism(seconds: float, client_seconds: Sequence[float],
                      workers: int | None) -> dict:
    """How well a round used its workers: ``round_time_ratio`` = round wall time / (Σ client
    training time / workers), and ``round_time_ratio_to_bound`` against the makespan's lower
    bound max(Σ / workers, slowest client). 1.0 is perfect; the excess is transport,
    scheduling, server-side work and idle workers. NaN without client times."""
    ts = [t for t in client_seconds if math.isfinite(t)]
    if not ts or not math.isfinite(seconds):
        return {"client_train_seconds_sum": math.nan, "client_train_seconds_max": math.nan,
                "workers": workers, "round_time_ratio": math.nan,
                "round_time_ratio_to_bound": math.nan}
    w = min(workers or len(ts), len(ts))
    ideal = sum(ts) / w
    return {"client_train_seconds_sum": sum(ts), "client_train_seconds_max": max(ts),
            "workers": w, "round_time_ratio": seconds / ideal,
            "round_time_ratio_to_bound": seconds / max(ideal, max(ts))}


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else x


def _median_finite(xs: Sequence[float]) -> float | None:
    xs = sorted(x for x in xs if isinstance(x, (int, float)) and math.isfinite(x))
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def run_rounds(server: FLServer,
               train_cohort: Callable[[int, list[str]], tuple[list, int, list[float]]], *,
               workers: int | None = None) -> dict:
    """The round loop for any transport: ``train_cohort(round, speakers) -> (deltas, failed,
    the clients' local training seconds)``; ``workers``: clients trained at once."""
    from privasr.errors import StopTraining

    t0 = time.time()
    cfg = server.cfg
    if server.resume():
        server.log(f"resumed from {server.ckpt_path} at round {server.round}")
    server.log(server.describe())
    stopped = None
    bar = tqdm(total=cfg.server.rounds, initial=server.round, desc="FL", unit="round",
               disable=not cfg.progress, dynamic_ncols=True)
    while server.round < cfg.server.rounds:
        try:
            server.check_budget()
        except StopTraining as e:
            stopped = str(e)
            server.log(f"stopping at round {server.round}: {e}")
            break
        cohort = server.cohort()
        t = time.time()
        deltas, failed, client_seconds = train_cohort(server.round, cohort)
        row = server.step(deltas, sampled=len(cohort), failed=failed, seconds=time.time() - t,
                          client_seconds=client_seconds, workers=workers)
        eps = server.epsilon_text(row["epsilon"], row.get("epsilon_extrapolated"))
        msg = (f"round {row['round']}/{cfg.server.rounds}: {row['aggregated']}/{row['sampled']} "
               f"clients ({row['failed']} failed, {row['clipped']} clipped), "
               f"‖Δ̄‖ = {row['update_norm']:.3g}, {eps}, {row['round_seconds']:.1f} s"
               + (f" ({row['round_time_ratio']:.2f}x Σ client time / {row['workers']} workers)"
                  if math.isfinite(row.get("round_time_ratio", math.nan)) else ""))
        if row["round"] % cfg.eval_every == 0 and row["round"] < cfg.server.rounds:
            ev = server.evaluate_test()
            msg += f"; test WER {ev['wer']:.3f} CER {ev['cer']:.3f}"
        server.save()
        bar.update(1)
        bar.set_postfix_str(f"{eps}, {row['round_seconds']:.0f} s/round")
        server.log(msg)
    bar.close()
    test = server.evaluate_test()
    server.log(f"final test WER {test['wer']:.3f} CER {test['cer']:.3f} after {server.round} "
               f"rounds; {server.epsilon_text(server.epsilon(), server.epsilon_extrapolated())}")
    res = server.results(test, time.time() - t0)
    res["stopped"] = stopped
    server.write_results(res)
    server.finish()
    return res
