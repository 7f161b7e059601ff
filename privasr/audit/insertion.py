"""Mixing inserted canaries (×r) into a training set, and nowhere else."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Mapping

from privasr.audit.canaries import CanaryError, read_canaries, training_copies
from privasr.data.dataset import AsrDataset, compute_features, ctc_min_frames, ctc_output_frames
from privasr.data.features import FeatureConfig
from privasr.data.manifest import validate
from privasr.data.tokenizer import CharTokenizer


def add_canaries(train_ds: AsrDataset, canary_path: str | Path, tok: CharTokenizer, *,
                 others: Mapping[str, AsrDataset] = {}, subsampling: int = 4,
                 feature_workers: int = 1, features: FeatureConfig = FeatureConfig(),
                 output_frames: Callable[[int], int] | None = None, log=print
                 ) -> tuple[AsrDataset, dict]:
    """A new training set: ``train_ds`` plus every inserted canary r times. Refuses if a
    canary (or its transcript) is already in the training set or in any of ``others``
    (dev/test). CTC-infeasible inserted canaries (kept by ``make-canaries --on-infeasible
    warn``) are left out with a warning, as the audit's scoring leaves them out."""
    path = Path(canary_path)
    canaries = read_canaries(path)
    ids, texts = {c.id for c in canaries}, {c.text for c in canaries}
    for name, ds in {"train": train_ds, **others}.items():
        clash = [u.id for u in ds.utts if u.id.split("_rep")[0] in ids or u.text in texts]
        if clash:
            raise CanaryError(f"canaries of {path} already appear in the {name} set "
                              f"({len(clash)} utterance(s), e.g. {clash[0]!r}); canaries must "
                              f"enter training only through audit.canaries")
    inserted = validate([c.utt for c in canaries if c.inserted])
    feats = dict(zip([u.id for u in inserted],
                     compute_features(inserted, features, cache_dir=path.parent / "feats",
                                      workers=feature_workers, progress=False,
                                      desc="canary features")))
    if output_frames is None:
        def output_frames(n: int) -> int:
            return ctc_output_frames(n, subsampling)
    bad = [u.id for u in inserted if output_frames(feats[u.id].shape[0])
           < ctc_min_frames(tok.encode(u.text))]
    if bad:
        warnings.warn(f"{len(bad)} inserted canaries are CTC-infeasible for a {subsampling}×-"
                      f"subsampled model (e.g. {bad[0]}) and are not inserted; remake the "
                      f"canaries with a lower speed-up factor", stacklevel=2)
    copies = [u for u in training_copies(canaries) if u.id.rsplit("_rep", 1)[0] not in bad]
    ds = AsrDataset(list(train_ds.utts) + copies,
                    list(train_ds.feats) + [feats[u.id.rsplit("_rep", 1)[0]] for u in copies],
                    tok, subsampling=subsampling, report=train_ds.report,
                    source_of=train_ds.source_of, output_frames=output_frames)
    info = {"canaries": str(path), "n": len(canaries), "inserted": len(inserted),
            "held_out": len(canaries) - len(inserted), "training_copies": len(copies),
            "infeasible_not_inserted": len(bad)}
    log(f"audit: {info['inserted']} of {info['n']} canaries inserted into training "
        f"({info['training_copies']} copies); {info['held_out']} held out")
    return ds, info
