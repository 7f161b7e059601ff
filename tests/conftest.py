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


FL_SPEAKERS = 16


@pytest.fixture
def fl_manifest(tmp_path):
    """A manifest of FL_SPEAKERS speakers (the FL server only reads who the clients are)."""
    import json

    d = tmp_path / "corpus"
    d.mkdir()
    rows = [{"id": f"s{i:02d}-{j}", "audio": f"audio/s{i:02d}-{j}.flac", "duration": 1.0,
             "text": "a b", "speaker": f"s{i:02d}", "sampling_rate": 16000}
            for i in range(FL_SPEAKERS) for j in range(2)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d
