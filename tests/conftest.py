import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and don't stall when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A ~3-minute embedded corpus shared by the tests (synthesised once per session)."""
    from privasr.data.synth import SynthConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("corpus")
    cfg = SynthConfig(hours=0.05, speakers=20, seed=0)
    summary = synthesize_corpus(out, cfg, workers=2, progress=False)
    return out, cfg, summary
