"""The ``bookkeeping`` engine's per-example gradients vs a loop of single-example backwards."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from privasr.clipping import ClipPolicy, get_engine
from privasr.clipping.bookkeeping import check_supported, hooked_per_example_grads
from privasr.clipping.engines import check_losses, trainable_parameters
from privasr.data.dataset import Batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(x: Tensor) -> Batch:
    n = x.shape[0]
    return Batch([f"u{i}" for i in range(n)], x, torch.full((n,), x.shape[1]),
                 torch.zeros(n, 1, dtype=torch.long), torch.ones(n, dtype=torch.long))


def _loss(model: nn.Module, b: Batch) -> Tensor:
    """A per-example loss that is nonlinear in the output (so ∂L/∂y varies per element)."""
    y = model(b.feats)
    return (y.flatten(1) ** 2).sum(1) + y.flatten(1).sin().sum(1)


def _loop(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    params = trainable_parameters(model)
    rows = []
    for i in range(x.shape[0]):
        loss = _loss(model, _batch(x[i:i + 1])).sum()
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        rows.append({k: torch.zeros_like(p) if g is None else g
                     for (k, p), g in zip(params.items(), gs)})
    return {k: torch.stack([r[k] for r in rows]) for k in params}


def _assert_matches_loop(model: nn.Module, x: Tensor) -> None:
    params = trainable_parameters(model)
    got, losses = hooked_per_example_grads(model, params, _batch(x), _loss, check_losses)
    want = _loop(model, x)
    assert set(got) == set(want)
    for k in want:
        scale = float(want[k].abs().max()) + 1e-12
        assert got[k].shape == want[k].shape, k
        assert float((got[k] - want[k]).abs().max()) <= 1e-5 * scale, k
    assert losses.shape == (x.shape[0],)


class Twice(nn.Module):
    """One Linear used twice per forward, plus a LayerNorm over two dims."""

    def __init__(self, f: int):
        super().__init__()
        self.lin = nn.Linear(f, f)
        self.norm = nn.LayerNorm((3, f))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


@settings(max_examples=25, deadline=None)
@given(conv2d=st.booleans(), stride=st.integers(1, 2), pad=st.integers(0, 2),
       dil=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]), bias=st.booleans(),
       n=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_conv_per_example_grads_match_loop(conv2d, stride, pad, dil, groups, bias, n, seed):
    torch.manual_seed(seed)
    cin, cout = 4, 4 * (1 + seed % 2)
    if conv2d:
        conv = nn.Conv2d(cin, cout, (3, 2), stride=stride, padding=pad, dilation=dil,
                         groups=groups, bias=bias)
        x = torch.randn(n, cin, 9, 7)
    else:
        conv = nn.Conv1d(cin, cout, 3, stride=stride, padding=pad, dilation=dil, groups=groups,
                         bias=bias)
        x = torch.randn(n, cin, 11)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(1), nn.LazyLinear(3))
    model(x)                                        # materialise the lazy layer
    _assert_matches_loop(model, x)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 5), t=st.integers(1, 6), seed=st.integers(0, 2 ** 16),
       three_d=st.booleans())
def test_linear_and_layernorm_match_loop(n, t, seed, three_d):
    torch.manual_seed(seed)
    f = 5
    model = nn.Sequential(nn.Linear(f, 7), nn.LayerNorm(7), nn.SiLU(), nn.Linear(7, 3, bias=False))
    x = torch.randn(n, t, f) if three_d else torch.randn(n, f)
    _assert_matches_loop(model, x)


def test_module_called_twice_and_multi_dim_layernorm():
    torch.manual_seed(0)
    _assert_matches_loop(Twice(4), torch.randn(3, 3, 4))


def test_frozen_parameters_are_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    model[0].weight.requires_grad_(False)
    params = trainable_parameters(model)
    got, _ = hooked_per_example_grads(model, params, _batch(torch.randn(3, 4)), _loss,
                                      check_losses)
    assert set(got) == {"0.bias", "2.weight", "2.bias"}
    _assert_matches_loop(model, torch.randn(3, 4))


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.emb(x.long().clamp(0, 9)))


def test_unsupported_module_is_named():
    with pytest.raises(TypeError, match="'emb' \\(Embedding\\).*vectorized"):
        check_supported(WithEmbedding())
    frozen = WithEmbedding()
    frozen.emb.weight.requires_grad_(False)         # frozen: nothing to compute, accepted
    assert set(check_supported(frozen)) == {"out"}
    with pytest.raises(TypeError, match="padding='same'"):
        check_supported(nn.Conv1d(2, 2, 3, padding="same"))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).mul_(2.0)


def test_output_modified_in_place_raises():
    with pytest.raises(RuntimeError, match=r"'lin' \(Linear\)\) was modified in place"):
        get_engine("bookkeeping").clipped_sum(InPlace(), [_batch(torch.randn(2, 3))], _loss,
                                              ClipPolicy())


class ChannelsLastDepthwise(nn.Module):
    """A Conformer-style depthwise Conv1d fed (B, T, C) activations transposed to (B, C, T)."""

    def __init__(self, c: int, mult: int, k: int, stride: int, dil: int, pad: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.dw = nn.Conv1d(c, c * mult, k, stride=stride, dilation=dil, padding=pad, groups=c)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dw(self.lin(x).transpose(1, 2))).transpose(1, 2)


@settings(max_examples=20, deadline=None)
@given(mult=st.sampled_from([1, 2]), k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2),
       dil=st.integers(1, 2), pad=st.integers(0, 3), n=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_depthwise_conv1d_both_layouts_match_loop(mult, k, stride, dil, pad, n, seed):
    """The shifted-product path for depthwise Conv1d, on channels-last and ordinary inputs."""
    torch.manual_seed(seed)
    model = ChannelsLastDepthwise(3, mult, k, stride, dil, pad)
    _assert_matches_loop(model, torch.randn(n, 13, 3))
    conv = nn.Conv1d(3, 3 * mult, k, stride=stride, dilation=dil, padding=pad, groups=3)
    _assert_matches_loop(_materialised(conv, n), torch.randn(n, 3, 13))


def _materialised(conv: nn.Conv1d, n: int) -> nn.Module:
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(1), nn.LazyLinear(2))
    model(torch.randn(n, 3, 13))
    return model
