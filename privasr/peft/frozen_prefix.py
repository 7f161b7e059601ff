"""Train only above the lowest trainable block: the frozen prefix runs once per utterance.

When fine-tuning leaves the front end and encoder blocks ``0..k-1`` frozen (``peft=head``,
or any method with ``finetune.top_blocks``), their output for an utterance never changes
during the run. So they run once, in eval mode (no dropout), without autograd, and training
(every gradient strategy, DP or not) sees the cached outputs as its inputs, with the model set
to start at block ``k`` (``ConformerEncoder.start_block``). A DP step then costs what the
trained part costs: the per-example engines never touch the frozen prefix.

The cache is exact, not an approximation, as long as nothing random touches the prefix's input
during training: SpecAugment masks the features anew every step, so with
``augment.specaugment`` on nothing is cached. Speed-perturbed copies are separate utterances,
each cached. Each utterance's prefix output depends on that utterance only (padding is masked;
``probe_independence`` re-checks the trained part before a DP run). The checkpoint holds the
whole model; the final test evaluation runs the whole model on the audio features.

    k = cacheable_start(cfg, model)          # 0: run the whole model every step
    train_ds = cache_prefix(model, train_ds, k, device)
    model.encoder.start_block = k
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from privasr.atomic import atomic_path
from privasr.data.dataset import AsrDataset, DurationBucketSampler
from privasr.peft.apply import block_list, head_of

__all__ = ["lowest_trainable_block", "cacheable_start", "cache_prefix", "start_at"]


def lowest_trainable_block(model: nn.Module) -> int:
    """k: every trainable parameter is in encoder block ``k`` or above, or in the CTC head
    (k = number of blocks when only the head trains); 0 when anything below trains."""
    prefix, blocks = block_list(model)
    head = head_of(model) + "."
    k = len(blocks)
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(head):
            continue
        if not name.startswith(prefix + "."):
            return 0
        k = min(k, int(name[len(prefix) + 1:].split(".", 1)[0]))
    return k


def cacheable_start(cfg: Any, model: nn.Module, log: Callable[[str], None] = print) -> int:
    """The block a run of recipe ``cfg`` can start at (0: no cache), with the reason logged
    when a frozen prefix exists but is not cached."""
    if not cfg.finetune.cache_frozen or cfg.peft in ("none", "full") and not \
            cfg.finetune.top_blocks:
        return 0
    if not hasattr(getattr(model, "encoder", None), "prefix"):
        return 0          # a model without ConformerEncoder.prefix (e.g. hf_ctc) runs whole
    k = lowest_trainable_block(model)
    if k and cfg.augment.specaugment:
        log(f"frozen prefix (front end + {k} blocks) not cached: augment.specaugment masks its "
            f"input anew every step (set augment.specaugment=false to cache it)")
        return 0
    return k


def prefix_key(model: nn.Module, ds: AsrDataset, k: int) -> str:
    """A digest of everything the cached outputs depend on: k, the weights of the front end
    and blocks < k (every encoder tensor outside blocks >= k), and every input tensor."""
    prefix, blocks = block_list(model)
    above = tuple(f"{prefix}.{i}." for i in range(k, len(blocks)))
    h = hashlib.sha1(f"k={k}".encode())
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(head_of(model) + ".") or name.startswith(above):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for f in ds.feats:
        h.update(f.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_prefix(model: nn.Module, ds: AsrDataset, k: int, device: torch.device | str,
                 *, max_seconds: float = 120.0, progress: bool = True,
                 cache_dir: str | Path | None = None) -> AsrDataset:
    """``ds`` with each utterance's input replaced by the output of the front end and blocks
    ``0..k-1`` (eval mode, float32 on the CPU); k = 0 returns ``ds`` itself. With
    ``cache_dir`` the outputs are kept on disk under :func:`prefix_key` (runs fine-tuning the
    same pre-trained model on the same data share them)."""
    if k == 0:
        return ds
    sub = model.subsampling if hasattr(model, "subsampling") else 4
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"prefix-{prefix_key(model, ds, k)}.pt"
        if path.exists():
            return ds.with_features(torch.load(path), ds.frame_seconds * sub)
    out = _run_prefix(model, ds, k, device, max_seconds, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(out, tmp)
    return ds.with_features(out, ds.frame_seconds * sub)


@torch.inference_mode()
def _run_prefix(model: nn.Module, ds: AsrDataset, k: int, device: torch.device | str,
                max_seconds: float, progress: bool) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    enc = model.encoder
    out: list[torch.Tensor | None] = [None] * len(ds)
    sampler = DurationBucketSampler(ds.durations, max_seconds=max(max_seconds,
                                                                  max(ds.durations)),
                                    shuffle=False)
    batches = sampler.batches(0)
    for idx in tqdm(batches, desc=f"frozen prefix ({k} blocks)", disable=not progress):
        b = ds.collate(idx).to(device)
        x, lens = enc.prefix(b.feats, b.feat_lens, k)
        for j, i in enumerate(idx):
            out[i] = x[j, : int(lens[j])].float().cpu().clone()
    model.train(was_training)
    return out  # type: ignore[return-value]


def start_at(model: nn.Module, k: int) -> None:
    """Make ``model`` take block-``k`` inputs (0: audio features, the whole model)."""
    model.encoder.start_block = k
