"""Signal vs noise of a DP fine-tuning run: how large the clipped mean gradient is next to the
Gaussian noise DP-SGD adds to it (issue 16's "what limits it").

For ``n`` training utterances drawn at random (``--seed``), one at a time: each example's
gradient over the trainable parameters, its norm, clipped to C. Reported:

- ``signal``: the square root of an unbiased estimate of ||E[clip(g)]||², the clipped mean
  gradient of the whole training set (the plain n-sample mean's squared norm is biased up by
  spread/n; both are printed), also per module (``by_group``);
- ``noise``: sigma * C * sqrt(d) / E[B], the norm of the noise on the mean gradient per step;
- their ratio, the per-example norms and the share clipped.

The model is the run's checkpoint (``--ckpt``, default ``RUN/last.pt``) or, with ``--ckpt init``,
the starting point (pre-trained encoder + fresh PEFT modules). It reads private training
examples: the numbers are a diagnostic for the run's owner, NOT covered by the run's ε.

    python tools/dp_signal_noise.py runs/dp_peft_assistant/adapters_top6_eps8_s0 --ckpt init
    python tools/dp_signal_noise.py runs/dp_peft_assistant/adapters_top6_eps8_s0 --ckpt init \
        finetune.adapter_dim=8        # screen a smaller adapter at the same σ, E[B]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from privasr.config import load_config
from privasr.data.manifest import SkipReport
from privasr.data.splits import load_split, manifest_paths
from privasr.data.tokenizer import CharTokenizer
from privasr.inference import load_model
from privasr.models.build import build_model
from privasr.peft.apply import prepare_model
from privasr.peft.signal_noise import clipped_signal, noise_on_mean


def model_of(run: Path, ckpt: str, cfg) -> torch.nn.Module:
    if ckpt == "init":
        model = build_model(cfg, CharTokenizer().vocab_size)
        prepare_model(cfg, model, log=lambda *_: None)
        return model.eval()
    return load_model(ckpt or run / "last.pt")[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a privasr train run directory (config.json)")
    ap.add_argument("overrides", nargs="*", help="key=value changes to the run's config "
                    "(with --ckpt init: screen another PEFT set-up at the run's σ and E[B])")
    ap.add_argument("--ckpt", default="", help="checkpoint, or 'init' (default RUN/last.pt)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", type=float, help="C (default: the run's privacy.policy.clip_norm)")
    ap.add_argument("--out", type=Path, help="append the result as one JSON line here")
    a = ap.parse_intermixed_args(argv)
    torch.set_num_threads(2)
    if a.overrides and a.ckpt != "init":
        ap.error("overrides change the model: only with --ckpt init")
    cfg = load_config(a.run / "config.json", a.overrides)
    pc = cfg.privacy
    clip = a.clip if a.clip is not None else (pc.policy or {}).get("clip_norm")
    if clip is None:
        ap.error(f"{a.run} has no privacy.policy.clip_norm: give --clip")
    res = json.loads((a.run / "results.json").read_text()) if (a.run / "results.json").exists() \
        else {}
    sigma = (res.get("privacy") or {}).get("noise_multiplier")
    ds = load_split(manifest_paths(cfg)["train"], cfg, CharTokenizer(), SkipReport())
    g = torch.Generator().manual_seed(a.seed)
    indices = torch.randperm(len(ds), generator=g)[:a.n].tolist()
    m = clipped_signal(model_of(a.run, a.ckpt, cfg), ds, indices, clip)
    out = {"run": str(a.run), "overrides": a.overrides, "ckpt": a.ckpt or str(a.run / "last.pt"),
           "seed": a.seed, "clip_norm": clip, "expected_batch_size": pc.expected_batch_size,
           "noise_multiplier": sigma, "n_private": len(ds), **m}
    if sigma is not None:
        out["noise"] = noise_on_mean(sigma, clip, m["d"], pc.expected_batch_size)
        out["signal_to_noise"] = m["signal"] / out["noise"]
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
