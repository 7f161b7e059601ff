"""privasr.peft.signal_noise: the clipped-signal estimate and the noise scale it is compared with."""

import math

import pytest
import torch

from privasr.data.dataset import AsrDataset, compute_features
from privasr.data.manifest import read_manifest
from privasr.data.tokenizer import CharTokenizer
from privasr.models.conformer import ConformerCTC, config_for
from privasr.models.loss import per_example_ctc
from privasr.peft.signal_noise import clipped_signal, group_of, noise_on_mean


@pytest.fixture(scope="module")
def ds(tiny_corpus):
    corpus, _, _ = tiny_corpus
    utts = read_manifest(corpus / "train.jsonl")[:4]
    return AsrDataset(utts, compute_features(utts, progress=False), CharTokenizer())


def _model():
    torch.manual_seed(0)
    return ConformerCTC(config_for("tiny", vocab_size=CharTokenizer().vocab_size)).eval()


def _grad_norm(model, ds, idx):
    model.zero_grad(set_to_none=True)
    losses = per_example_ctc(model, ds.collate(idx))
    losses.mean().backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()
                         if p.grad is not None))


def test_identical_examples_give_the_clipped_norm_itself(ds, one_thread):
    model = _model()
    norm = _grad_norm(model, ds, [1])
    for clip in (norm / 3, 10 * norm):      # clipped, and not
        got = clipped_signal(model, ds, [1, 1, 1, 1], clip)
        assert got["signal"] == pytest.approx(min(norm, clip), rel=1e-4)
        assert got["clipped_mean_norm_sample"] == pytest.approx(min(norm, clip), rel=1e-4)
        assert got["unclipped_mean_norm_sample"] == pytest.approx(norm, rel=1e-4)
        assert got["clipped_share"] == (1.0 if clip < norm else 0.0)
        groups = got["by_group"].values()        # the groups split d and the signal's square
        assert sum(g["d"] for g in groups) == got["d"]
        assert math.fsum(g["signal"] ** 2 for g in groups) == pytest.approx(
            got["signal"] ** 2, rel=1e-4)


def test_unclipped_sample_mean_is_the_batch_gradient_and_signal_is_below_it(ds, one_thread):
    model = _model()
    got = clipped_signal(model, ds, [0, 1, 2, 3], clip_norm=1e9)
    assert all(p.grad is None for p in model.parameters())   # autograd.grad: .grad untouched
    assert got["unclipped_mean_norm_sample"] == pytest.approx(_grad_norm(model, ds, [0, 1, 2, 3]),
                                                              rel=1e-4)
    assert got["clipped_mean_norm_sample"] == pytest.approx(got["unclipped_mean_norm_sample"])
    assert got["signal"] < got["clipped_mean_norm_sample"]  # distinct examples: bias removed
    assert got["d"] == sum(p.numel() for p in model.parameters())


def test_groups_are_modules_at_most_three_levels_deep():
    assert group_of("encoder.blocks.3.adapter.up.weight") == "encoder.blocks.3"
    assert group_of("head.weight") == "head"
    assert group_of("scale") == "scale"


def test_noise_on_mean_and_too_few_examples(ds):
    assert noise_on_mean(0.71, 1.0, 60_557, 1024) == pytest.approx(0.1707, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        clipped_signal(_model(), ds, [0], 1.0)
