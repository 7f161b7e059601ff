"""Recipes: nested dataclasses read from YAML with torchtune-style ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from privasr.errors import ConfigError


# every nn.Linear inside the Conformer blocks: attention projections, FFN and conv pointwise
DEFAULT_LORA_TARGETS = ["encoder.blocks.*.attn.q", "encoder.blocks.*.attn.k",
                        "encoder.blocks.*.attn.v", "encoder.blocks.*.attn.proj",
                        "encoder.blocks.*.ff?.up", "encoder.blocks.*.ff?.down"]

METHODS = ("none", "full", "head", "bitfit", "lora", "rp", "adapters")


@dataclass
class FinetuneConfig:
    """How ``peft`` (none | full | head | bitfit | lora | rp | adapters) adapts the model.

    ``none`` leaves the model as built (every parameter trained); ``full`` is the same but
    states it; ``head`` trains only the CTC head; the others freeze the encoder and add or
    unfreeze a few parameters (the CTC head is always trained).
    """

    keep_head: bool = False  # with init=CKPT: keep its CTC head (default: a new, random one)
    lora_rank: int = 8
    lora_alpha: float = 16.0  # LoRA scale = alpha / rank
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    adapter_dim: int = 32  # bottleneck width of the residual adapter after each block
    bitfit_norms: bool = True  # BitFit also trains LayerNorm gains (biases always)
    extra_trainable: list[str] = field(default_factory=list)  # fnmatch parameter names
    # > 0: the method trains only in the top k encoder blocks (and the head); 0: every block
    top_blocks: int = 0
    # run the frozen front end + blocks below the lowest trainable one once per utterance and
    # train on their cached outputs (privasr.peft.frozen_prefix); off when SpecAugment is on
    cache_frozen: bool = True


@dataclass
class DataConfig:
    corpus_dir: str = "data/synth"  # built with `privasr corpus synth` when manifests are absent
    synth_hours: float = 4.0
    synth_speakers: int = 600
    train: str = ""  # manifest paths; default to <corpus_dir>/{train,dev,test}.jsonl
    dev: str = ""
    test: str = ""
    max_dev_utts: int = 200
    on_error: str = "raise"  # or "skip" (bad utterances counted and reported)
    feature_workers: int = 2
    synth_domain: str = ""  # "public" | "private": a side of privasr.data.domains' split


FAMILIES = ("conformer", "hf_ctc")


@dataclass
class ModelConfig:
    """``family: conformer`` (privasr's Conformer-CTC: ``size``, ``dropout``; fbank features) or
    ``family: hf_ctc``: a local Hugging Face ``transformers`` CTC model directory ``path``
    (Wav2Vec2ForCTC and models with its interface; raw-waveform features), with a new CTC head
    sized to privasr's character vocabulary (``privasr.models.hf_ctc``). ``size`` and
    ``dropout`` do not apply to it (its dropouts are the checkpoint's)."""

    size: str = "small"
    dropout: float = 0.1
    family: str = "conformer"  # conformer | hf_ctc
    path: str = ""  # hf_ctc: a directory written by transformers' save_pretrained
    freeze_feature_encoder: bool = True  # hf_ctc: the convolutional feature encoder stays frozen


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (decoupled weight decay on matrices) | sgd (plain, no momentum)
    lr: float = 2e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 300
    max_steps: int = 3000
    min_lr_ratio: float = 0.05  # cosine decay floor
    grad_accum: int = 1
    max_grad_norm: float = 5.0  # ordinary global-norm clipping of the batch gradient


@dataclass
class BatchConfig:
    max_seconds: float = 120.0  # padded audio seconds per physical batch
    max_utts: int = 64


@dataclass
class AugmentConfig:
    specaugment: bool = True
    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_width_frac: float = 0.05
    # Kaldi-style speed perturbation: extra training copies at these speeds (e.g. [0.9, 1.1]),
    # features computed once and cached; copies too fast for CTC are dropped and counted
    speed_perturb: list[float] = field(default_factory=list)


@dataclass
class PrivacyConfig:
    """Per-unit clipping and DP-SGD. An empty ``policy`` means ordinary training: the batch
    gradient is clipped to ``optim.max_grad_norm``. ``policy`` holds ClipPolicy fields
    (``privasr.clipping.policy``): unit, bound, clip_norm, scope, noise_multiplier, ..."""

    policy: dict = field(default_factory=dict)
    engine: str = "auto"  # auto | bookkeeping | vectorized | reference
    # examples whose per-example gradients are held at once (memory: chunk × trainable params)
    engine_chunk: int = 16
    sampling: str = "bucket"  # bucket (duration-bucketed epochs) | poisson (what DP assumes)
    expected_batch_size: float = 16.0  # Poisson: q = expected_batch_size / N
    max_physical: int = 16  # examples per physical batch (memory bound); noise once per step
    # the ε budget: a step that would exceed it stops training; σ is calibrated so that
    # optim.max_steps spend it, unless privacy.policy gives noise_multiplier explicitly
    target_epsilon: float | None = None
    delta: float | None = None  # default min(1e-5, N^-1.1) (N = training utterances)
    accounting: str = "pld"  # pld | rdp (dp-accounting)
    # secret: with σ > 0 the noise (os.urandom) and the Poisson draws (a key held in memory)
    # are secret, as the ε assumes. seeded: both from the public seed, reproducible, for
    # debugging only -- the run then has no guarantee and no ε is printed or written
    randomness: str = "secret"
    # per-step statistics of the private batch (loss, norm quantiles, fraction clipped,
    # realised batch size / audio seconds) are not covered by ε: off for DP runs unless this
    # is true, and then listed in the results as outside the guarantee
    log_private_stats: bool = False


@dataclass
class AuditConfig:
    # canary manifest from `privasr audit make-canaries`: its inserted canaries join the
    # training set (each r times); held-out ones and dev/test never see them
    canaries: str = ""
    # mechanism probe (privasr.audit.norm_probe): every k steps, per-example gradient norms of
    # norm_probe_size inserted canaries vs as many ordinary utterances -> norm_probe.csv.
    # 0: off. An audit diagnostic of private examples, NOT covered by the run's ε
    norm_probe_every: int = 0
    norm_probe_size: int = 16


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0: all available cores
    bf16: bool = False  # autocast on CUDA
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    # fine-tuning: init=CKPT loads a pre-trained encoder (new CTC head); peft=METHOD picks
    # what is trained: none | full | head | bitfit | lora | rp | adapters (privasr.peft)
    init: str = ""
    peft: str = "none"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_every: int = 250
    ckpt_every: int = 250
    log_every: int = 10
    on_nonfinite: str = "raise"  # or "skip": skip the step, count it, report it
    progress: bool = True


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    try:
        if dataclasses.is_dataclass(tp):
            return from_dict(tp, value, prefix=key + ".")
        if origin in (tuple, list) and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}")
        if origin is tuple:
            args = typing.get_args(tp)
            if len(args) != len(value):
                raise TypeError
            return tuple(_coerce(t, v, key) for t, v in zip(args, value))
        if origin is list:
            (arg,) = typing.get_args(tp)
            return [_coerce(arg, v, key) for v in value]
        if origin in (typing.Union, types.UnionType):     # X | None: None, or coerced to X
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if value is None or len(args) != 1:
                return value
            return _coerce(args[0], value, key)
        if tp is bool and not isinstance(value, bool):
            raise TypeError
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is float and isinstance(value, str):       # YAML 1.1 reads 1e-5 as a string
            return float(value)
        if tp in (int, float, str) and not isinstance(value, tp):
            raise TypeError
        return value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None


def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``d``; unknown keys raise a ConfigError naming them."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid: "
                          f"{', '.join(prefix + n for n in sorted(names))}")
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in d.items()})


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return d


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = TrainConfig) -> Any:
    d = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}")
        d = yaml.safe_load(p.read_text()) or {}
    return from_dict(cls, apply_overrides(d, list(overrides)))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
