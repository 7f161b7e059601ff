"""The CUDA path: engines on the GPU equal the CPU reference; DP training with bf16 autocast.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from privasr.clipping import ClipPolicy, get_engine
from privasr.config import load_config
from privasr.models.conformer import ConformerCTC, config_for
from privasr.models.loss import per_example_ctc
from privasr.recipes.train import run_training
from test_engines import assert_same, make_batches
from test_trainer import _overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("unit", ["example", "microbatch"])
@pytest.mark.parametrize("engine", ["bookkeeping", "vectorized"])
def test_engines_on_cuda_equal_cpu_reference(engine, unit):
    torch.manual_seed(0)
    model = ConformerCTC(config_for("tiny", vocab_size=5, dropout=0.0))
    batches = make_batches([3, 2], seed=1, f=80, vocab=5, min_len=20, max_len=40, max_tlen=3)
    policy = ClipPolicy(unit=unit, clip_norm=0.5, **({"microbatch_size": 2}
                                                      if unit == "microbatch" else {}))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = get_engine("reference").clipped_sum(model, batches, per_example_ctc, policy)
    gpu = model.to("cuda")
    res = get_engine(engine).clipped_sum(gpu, [b.to("cuda") for b in batches], per_example_ctc,
                                         policy)
    res.grads = {k: v.cpu() for k, v in res.grads.items()}
    res.norms = res.norms.cpu()
    res.clipped = res.clipped.cpu()
    assert_same(res, ref)


def test_dpsgd_bf16_training_on_cuda(tiny_corpus, tmp_path):
    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/dpsgd_eps8.yaml", _overrides(corpus, tmp_path / "dp", steps=6) + [
        "device=cuda", "bf16=true", "privacy.expected_batch_size=8", "privacy.max_physical=4",
        "privacy.delta=1e-3"])
    res = run_training(cfg, log=lambda *_: None)
    assert res["device"].startswith("cuda")
    assert res["steps"] == 6 and math.isfinite(res["final_train_loss"])
    assert 0 < res["privacy"]["epsilon"] <= 8.0 + 1e-9
