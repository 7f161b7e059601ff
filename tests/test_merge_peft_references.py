"""tools/merge_peft_references.py: joins reference rows with a new run's rows, or refuses."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("merge_refs", ROOT / "tools" / "merge_peft_references.py")
merge_refs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merge_refs)


def row(method, eps, wer, seed=0, overrides=()):
    return {"method": method, "epsilon": eps, "seed": seed, "test_wer": wer,
            "overrides": list(overrides)}


REFS = [row("zero_shot", None, 0.8, seed=None), row("full", None, 0.4),
        row("adapters", None, 0.5, overrides=["finetune.adapter_dim=32"]),
        row("adapters", 8.0, 0.99)]             # an old DP row: not carried over


def test_keeps_new_dp_rows_and_new_nonprivate_peft_and_recomputes_gaps():
    new = [row("zero_shot", None, 0.8, seed=None),
           row("adapters", None, 0.6, overrides=["finetune.adapter_dim=8"]),
           row("adapters", 8.0, 0.7), row("adapters", 8.0, 0.72, seed=1)]
    got = merge_refs.merge(REFS, new)
    assert [(r["method"], r["epsilon"], r["test_wer"]) for r in got] == [
        ("zero_shot", None, 0.8), ("full", None, 0.4), ("adapters", None, 0.5),
        ("adapters", None, 0.6), ("adapters", 8.0, 0.7), ("adapters", 8.0, 0.72)]
    assert got[0]["gap_closed"] is None
    assert [r["gap_closed"] for r in got[1:]] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.2])


def test_refuses_when_the_zero_shot_rows_differ_or_are_missing():
    with pytest.raises(SystemExit, match="zero-shot"):
        merge_refs.merge(REFS, [row("zero_shot", None, 0.81, seed=None), row("adapters", 8.0, 0.7)])
    with pytest.raises(SystemExit, match="zero-shot"):
        merge_refs.merge(REFS, [row("adapters", 8.0, 0.7)])
