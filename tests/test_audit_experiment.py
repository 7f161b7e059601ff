"""The memorization experiment driver end to end at tiny scale (the real run needs hours)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_memorization_driver_writes_rows_per_policy_and_repetition(tiny_corpus, tmp_path,
                                                                   one_thread):
    corpus, _, _ = tiny_corpus
    spec = importlib.util.spec_from_file_location("mem", ROOT / "benchmarks" / "memorization.py")
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)
    out = tmp_path / "memorization.json"
    common = ["--out", str(out), f"out_dir={tmp_path / 'runs'}",
              f"data.corpus_dir={corpus}", "model.size=tiny", "threads=1",
              "progress=false", "eval_every=1000", "optim.warmup_steps=1",
              "data.max_dev_utts=5", "batch.max_seconds=30", "data.feature_workers=1"]
    assert mem.main(["--steps", "2", *common]) == 0
    rows = json.loads(out.read_text())
    assert {(r["policy"], r["repetitions"]) for r in rows} == {
        (p, r) for p in ("none", "per_example", "per_core") for r in (1, 2, 4, 8, 16)}
    for r in rows:
        for k in ("inserted_exact_match", "heldout_exact_match", "exposure",
                  "epsilon_lower_bound", "test_wer"):
            assert k in r
        assert r["steps"] == 2 and 0 <= r["epsilon_lower_bound"]
    assert (tmp_path / "runs" / "memorization.html").exists()
    assert "Memorization audit" in (tmp_path / "runs" / "per_core" / "report.html").read_text()

    # one policy again (longer): its rows are replaced, the others' kept
    assert mem.main(["--steps", "3", "--policies", "none", *common]) == 0
    again = json.loads(out.read_text())
    assert [(r["policy"], r["repetitions"]) for r in again] == \
        [(r["policy"], r["repetitions"]) for r in rows]
    assert {r["steps"] for r in again if r["policy"] == "none"} == {3}
    assert {r["steps"] for r in again if r["policy"] != "none"} == {2}
