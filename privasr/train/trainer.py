"""The one trainer. It knows neither clipping nor privacy: a gradient strategy fills ``.grad``.

    for each logical step:
        batches = the next grad_accum physical batches (from the batch sampler)
        strategy.fill_grads(model, batches, loss)      # ordinary, DP-SGD, micro-batch, per-core...
        optimizer.step(); scheduler.step()
        log / evaluate / checkpoint (atomically, with RNG states and the data position)
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn
from tqdm import tqdm

from privasr.config import OptimConfig, TrainConfig, to_dict
from privasr.errors import ConfigError
from privasr.data.dataset import AsrDataset, Batch, DurationBucketSampler
from privasr.data.features import SpecAugment
from privasr.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from privasr.decoding.evaluate import evaluate
from privasr.train.gradient import BatchClipGradient, GradientStrategy
from privasr.errors import NonFiniteLossError
from privasr.models.loss import checked, per_example_ctc
from privasr.report.metrics_log import MetricsLogger
from privasr.train.schedule import warmup_cosine
from privasr.errors import StopTraining


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda asked for, but no CUDA device is available")
    return torch.device(name)


def set_threads(n: int) -> int:
    """Use ``n`` CPU threads (0: the cores this process may run on)."""
    n = n or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``optim.name`` over the trainable parameters: AdamW (weight decay on matrices only) or
    plain SGD (what a federated client runs locally)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name != "adamw":
        raise ConfigError(f"optim.name={cfg.name!r}; valid: adamw, sgd")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=tuple(cfg.betas))


@dataclass
class Position:
    """Where training is: optimizer steps done, and the next batch of the sampler's epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class BucketPlan:
    """Logical batches of ``grad_accum`` duration-bucketed batches, epoch after epoch."""

    def __init__(self, sampler: DurationBucketSampler, grad_accum: int = 1) -> None:
        self.sampler, self.grad_accum = sampler, grad_accum
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.sampler.batches(epoch))
        return self._epoch[1]

    def logical_batch(self, pos: "Position") -> list[list[int]]:
        out = []
        for _ in range(self.grad_accum):
            while pos.batch >= len(self._batches(pos.epoch)):
                pos.epoch, pos.batch = pos.epoch + 1, 0
            out.append(self._batches(pos.epoch)[pos.batch])
            pos.batch += 1
        return out


class PoissonPlan:
    """Poisson-sampled logical batches (for DP), drawn from the step number alone."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def logical_batch(self, pos: "Position") -> list[list[int]]:
        return self.sampler.logical_batch(pos.step)


@dataclass
class TrainResult:
    steps: int
    wall_seconds: float
    audio_seconds: float
    final_train_loss: float
    dev: dict[str, float] = field(default_factory=dict)
    skipped_nonfinite: int = 0
    stopped: str | None = None  # why training ended before max_steps, if it did
    # training wall time over every invocation that led to this model (None when resumed from
    # a checkpoint written before the total was recorded)
    total_wall_seconds: float | None = None


class StepObserver(Protocol):
    """Called on the main rank after each optimizer step (``step`` = steps done), before the
    evaluation and checkpoint of that step; it may log via ``trainer.log``. It must leave the
    model, ``.grad``, the optimizer and the RNG states as it found them. The returned values
    (or None) are the observer's; the trainer ignores them."""

    def after_step(self, trainer: "Trainer", step: int) -> dict[str, float] | None: ...


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, train_ds: AsrDataset,
                 dev_ds: AsrDataset | None, vocab: list[str], *,
                 strategy: GradientStrategy | None = None, plan: Any = None,
                 dist: Any = None, shard: Callable[[list[Batch]], list[Batch]] | None = None,
                 withhold: frozenset[str] = frozenset(),
                 observers: Sequence[StepObserver] = ()) -> None:
        self.cfg = cfg
        self.observers = tuple(observers)
        # metric names this run must not release (a DP run: statistics of the private batch,
        # e.g. loss and audio_s_per_s); they are neither logged nor shown on the progress bar
        self.withhold = frozenset(withhold)
        # torchrun (privasr.train.distributed): ``dist`` is the DistContext, ``shard`` keeps
        # this rank's share of each logical batch; rank 0 alone logs, evaluates, checkpoints
        self.dist, self.shard = dist, shard
        self.is_main = dist is None or dist.is_main
        self.device = dist.device if dist is not None else pick_device(cfg.device)
        self.model = model.to(self.device)
        if dist is not None:
            from privasr.train.distributed import broadcast_module

            broadcast_module(self.model)
        self.train_ds, self.dev_ds, self.vocab = train_ds, dev_ds, vocab
        self.strategy = strategy or BatchClipGradient(max_norm=cfg.optim.max_grad_norm)
        self.plan = plan or BucketPlan(DurationBucketSampler(
            train_ds.durations, max_seconds=cfg.batch.max_seconds, max_utts=cfg.batch.max_utts,
            seed=cfg.seed), cfg.optim.grad_accum)
        self.optimizer = build_optimizer(cfg.optim, model)
        self.scheduler = warmup_cosine(self.optimizer, warmup_steps=cfg.optim.warmup_steps,
                                       max_steps=cfg.optim.max_steps,
                                       min_lr_ratio=cfg.optim.min_lr_ratio)
        a = cfg.augment
        self.specaug = SpecAugment(a.freq_masks, a.freq_width, a.time_masks,
                                   a.time_width_frac) if a.specaugment else None
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "last.pt"
        self.pos = Position()
        self.skipped = 0
        self.audio_seconds = 0.0
        self.train_seconds: float | None = 0.0   # wall time of earlier invocations (fit adds)
        self._fit_start: float | None = None
        if self.is_main:
            self.log = MetricsLogger(self.out)
        else:
            from privasr.train.distributed import NullLog

            self.log = NullLog()

    def _physical_batches(self) -> list[Batch]:
        out = []
        for k, idx in enumerate(self.plan.logical_batch(self.pos)):
            b = self.train_ds.collate(idx)
            if self.specaug is not None:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.pos.step * 64 + k)
                b.feats = self.specaug(b.feats, b.feat_lens, generator=g)
            out.append(b)
        if self.shard is not None:
            out = self.shard(out)
        return [b.to(self.device) for b in out]

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "position": vars(self.pos).copy(),
            "config": to_dict(self.cfg),
            "vocab": list(self.vocab),
            "model_config": vars(getattr(self.model, "cfg", object())).copy()
            if hasattr(self.model, "cfg") else None,
            "skipped_nonfinite": self.skipped,
            "audio_seconds": self.audio_seconds,
            "train_seconds": self.total_train_seconds(),
            # stateful strategies (adaptive bounds, the privacy ledger) travel with the model
            "strategy": self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else None,
        }

    def save(self, path: Path | None = None) -> None:
        if not self.is_main:
            return
        save_checkpoint(path or self.ckpt_path, self.state())

    def resume(self, path: Path | None = None) -> bool:
        path = path or self.ckpt_path
        if not path.exists():
            return False
        ck = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        self.pos = Position(**ck["position"])
        self.skipped = ck.get("skipped_nonfinite", 0)
        self.audio_seconds = ck.get("audio_seconds", 0.0)
        self.train_seconds = ck.get("train_seconds")
        if ck.get("strategy") is not None and hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict(ck["strategy"])
        self.log.truncate_after(self.pos.step)
        return True

    def total_train_seconds(self) -> float | None:
        """Training wall time so far, summed over resumed invocations (None if unknown)."""
        if self.train_seconds is None:
            return None
        now = time.time() - self._fit_start if self._fit_start is not None else 0.0
        return self.train_seconds + now

    # -- the loop --------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with self._autocast():
            return per_example_ctc(model, batch)

    def evaluate_dev(self) -> dict[str, float]:
        if self.dev_ds is None or len(self.dev_ds) == 0:
            return {}
        with self._autocast():
            return evaluate(self.model, self.dev_ds, self.vocab, device=self.device)

    def fit(self) -> TrainResult:
        cfg = self.cfg
        loss_fn = checked(self._loss)
        self.model.train()
        start = self._fit_start = time.time()
        last_loss, window = math.nan, []
        dev: dict[str, float] = {}
        bar = tqdm(total=cfg.optim.max_steps, initial=self.pos.step, desc="train", unit="step",
                   disable=not (cfg.progress and self.is_main), dynamic_ncols=True)
        t_last = time.time()
        stopped = None
        while self.pos.step < cfg.optim.max_steps:
            saved_pos = Position(**vars(self.pos))
            if self.dist is not None:  # dropout: differs across ranks, and resumes exactly
                torch.manual_seed(cfg.seed * 1_000_003 + self.dist.rank * 7919 + self.pos.step)
            batches = self._physical_batches()
            self.optimizer.zero_grad(set_to_none=True)
            try:
                stats = self.strategy.fill_grads(self.model, batches, loss_fn)
            except StopTraining as e:
                self.pos = saved_pos  # the refused step did not happen
                self.optimizer.zero_grad(set_to_none=True)
                stopped = str(e)
                bar.write(f"stopping at step {self.pos.step}: {e}")
                self.save()
                break
            except NonFiniteLossError as e:
                if cfg.on_nonfinite != "skip":
                    e.add_note(f"at step {self.pos.step}; on_nonfinite=skip skips such steps")
                    raise
                self.skipped += 1
                bar.write(f"step {self.pos.step}: skipped, {e}")
                self.optimizer.zero_grad(set_to_none=True)
                self.pos.step += 1
                self.scheduler.step()
                continue
            self.optimizer.step()
            self.scheduler.step()
            self.pos.step += 1
            secs = stats.pop("audio_seconds", None)  # all ranks' audio, under torchrun
            secs = sum(b.audio_seconds for b in batches) if secs is None else secs
            self.audio_seconds += secs
            if math.isfinite(stats["loss"]):  # NaN only for an empty Poisson draw
                window.append((stats["loss"], secs))
                last_loss = stats["loss"]
            if self.pos.step % cfg.log_every == 0 or self.pos.step == cfg.optim.max_steps:
                now = time.time()
                rate = sum(s for _, s in window) / max(now - t_last, 1e-9)
                row = {"loss": sum(l for l, _ in window) / max(len(window), 1) if window
                       else math.nan,
                       "lr": self.scheduler.get_last_lr()[0], "audio_s_per_s": rate,
                       **{k: v for k, v in stats.items() if k != "loss"}}
                row = {k: v for k, v in row.items() if k not in self.withhold}
                self.log.log("train", self.pos.step, row)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "audio_s_per_s")
                                 if k in row})
                window, t_last = [], now
            if self.observers and self.is_main:
                t_obs = time.time()
                for obs in self.observers:
                    obs.after_step(self, self.pos.step)
                t_last += time.time() - t_obs   # audio_s_per_s: training time only
            if (self.pos.step % cfg.eval_every == 0 or self.pos.step == cfg.optim.max_steps) \
                    and self.is_main:
                dev = self.evaluate_dev()
                if dev:
                    self.log.log("dev", self.pos.step, dev)
                    bar.write(f"step {self.pos.step}: dev WER {dev['wer']:.3f} "
                              f"CER {dev['cer']:.3f} loss {dev['loss']:.3f}")
                t_last = time.time()
            if self.pos.step % cfg.ckpt_every == 0 or self.pos.step == cfg.optim.max_steps:
                self.save()
            bar.update(1)
        bar.close()
        self.log.close()
        total = self.total_train_seconds()
        self.train_seconds, self._fit_start = total, None
        return TrainResult(steps=self.pos.step, wall_seconds=time.time() - start,
                           audio_seconds=self.audio_seconds, final_train_loss=last_loss, dev=dev,
                           skipped_nonfinite=self.skipped, stopped=stopped,
                           total_wall_seconds=total)
