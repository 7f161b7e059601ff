"""The memorization experiment driver: grid planning, equal-epoch recipes, the summary's criteria
(fast), and the driver end to end at tiny scale (slow; the real run needs hours)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("mem", ROOT / "benchmarks" / "memorization.py")
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)
    return mem


mem = _load()

SPEC = {"policies": {"none": {}, "per_example": {"policy": {"unit": "example", "clip_norm": 1.0}},
                     "apcc": {"policy": {"unit": "core", "num_cores": 8,
                                         "bound": "adaptive_min"}}},
        "reference_batch": 32,
        "grid": [{"policies": ["none", "per_example"], "batch_sizes": [32, 128], "seeds": [0]},
                 {"policies": ["none", "apcc"], "batch_sizes": [32], "seeds": [0, 1]}]}
BASE = {"out_dir": "runs/x", "seed": 0, "batch": {"max_seconds": 400, "max_utts": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 50, "max_steps": 2200}}


def test_grid_runs_in_order_once_and_filters():
    cells = mem.plan_cells(SPEC, BASE)
    assert [c.name for c in cells] == [
        "none/b32/s0", "per_example/b32/s0", "none/b128/s0", "per_example/b128/s0",
        "apcc/b32/s0", "none/b32/s1", "apcc/b32/s1"]     # none/b32/s0 only once
    assert [c.name for c in mem.plan_cells(SPEC, BASE, batches=[128])] == [
        "none/b128/s0", "per_example/b128/s0"]
    assert [c.name for c in mem.plan_cells(SPEC, BASE, policies=["apcc"], seeds=[1])] == \
        ["apcc/b32/s1"]
    with pytest.raises(SystemExit, match="unknown policies"):
        mem.plan_cells({**SPEC, "grid": [{"policies": ["pcc9"], "batch_sizes": [32],
                                          "seeds": [0]}]}, BASE)


def test_cpu_grid_is_a_slice_and_falls_back_to_the_full_grid():
    spec = {**SPEC, "cpu_grid": [{"policies": ["per_example", "none"], "batch_sizes": [128],
                                  "seeds": [0]}]}
    assert [c.name for c in mem.plan_cells(spec, BASE, size="cpu")] == [
        "per_example/b128/s0", "none/b128/s0"]
    assert len(mem.plan_cells(spec, BASE)) == 7                      # full: the grid
    assert mem.plan_cells(SPEC, BASE, size="cpu") == mem.plan_cells(SPEC, BASE)
    with pytest.raises(SystemExit, match="grid size"):
        mem.plan_cells(SPEC, BASE, size="gpu")


def test_faithful_config_cpu_grid_is_inside_the_full_grid():
    import yaml
    spec = yaml.safe_load((ROOT / "configs" / "memorization_faithful.yaml").read_text())
    cpu, full = (mem.plan_cells(spec, spec["train"], size=s) for s in ("cpu", "full"))
    assert cpu and set(cpu) < set(full)


def test_no_grid_is_every_policy_at_the_recipe_batch_and_seed():
    spec = {k: v for k, v in SPEC.items() if k != "grid"}
    assert [c.name for c in mem.plan_cells(spec, {**BASE, "seed": 3})] == [
        "none/b32/s3", "per_example/b32/s3", "apcc/b32/s3"]


def test_cell_recipe_keeps_epochs_equal_across_batch_sizes(tmp_path):
    can = tmp_path / "c.jsonl"
    r32 = mem.cell_recipe(SPEC, BASE, mem.Cell("per_example", 32, 1), can, tmp_path)
    r128 = mem.cell_recipe(SPEC, BASE, mem.Cell("per_example", 128, 1), can, tmp_path)
    assert r32["optim"] == BASE["optim"] and r32["batch"] == BASE["batch"]
    assert r128["batch"] == {"max_utts": 128, "max_seconds": 1600}
    assert r128["optim"]["max_steps"] * 128 == r32["optim"]["max_steps"] * 32
    assert r128["optim"]["warmup_steps"] == round(50 / 4)
    assert math.isclose(r128["optim"]["lr"], 2e-3)                  # sqrt(128/32) = 2
    assert r128["seed"] == 1 and r128["privacy"]["policy"]["clip_norm"] == 1.0
    assert r128["out_dir"] == str(tmp_path / "s1" / "b128" / "per_example")
    assert r128["audit"]["canaries"] == str(can)
    assert "privacy" not in mem.cell_recipe(SPEC, BASE, mem.Cell("none", 32, 0), can, tmp_path)
    assert BASE["optim"]["max_steps"] == 2200                       # the base is not mutated


def test_cell_key_changes_with_what_determines_the_run(tmp_path):
    can = tmp_path / "c.jsonl"
    can.write_text("a\n")
    cell = mem.Cell("none", 32, 0)
    k = mem.cell_key(cell, mem.cell_recipe(SPEC, BASE, cell, can, tmp_path), can)
    moved = mem.cell_recipe(SPEC, {**BASE, "out_dir": "elsewhere", "progress": False}, cell, can,
                            tmp_path / "other")
    assert mem.cell_key(cell, moved, can) == k                      # where it runs: same run
    lr = mem.cell_recipe(SPEC, {**BASE, "optim": {**BASE["optim"], "lr": 5e-4}}, cell, can,
                         tmp_path)
    assert mem.cell_key(cell, lr, can) != k
    can.write_text("b\n")
    assert mem.cell_key(cell, mem.cell_recipe(SPEC, BASE, cell, can, tmp_path), can) != k


def _rows(policy, batch, seed, ins_em: dict, held_em, wer, *, n=10, held=50, copies=400):
    common = {"policy": policy, "batch": batch, "seed": seed, "held_out": held,
              "heldout_exact_match": held_em, "heldout_cer": 0.5, "epsilon_lower_bound": 0.1,
              "auc": 0.6, "test_wer": wer, "epochs": 3.0, "copy_share": copies / 24000,
              **{f"probe_{k}": 1.5 for k in ("ratio_first", "ratio_last", "ratio_median",
                                             "share_unclipped_last", "share_clipped_last")}}
    return [{**common, "repetitions": r, "inserted": n, "inserted_exact_match": e,
             "inserted_cer": 0.1, "exposure": 3.0} for r, e in ins_em.items()]


def test_summary_pools_seeds_and_applies_the_issue_criteria():
    mem_r = {1: 0.0, 2: 0.1, 4: 0.2, 8: 0.5, 16: 0.9}
    rows = (_rows("none", 32, 0, mem_r, 0.0, 0.30) + _rows("none", 32, 1, {**mem_r, 16: 0.5},
                                                          0.02, 0.32)
            + _rows("per_example", 32, 0, {**mem_r, 16: 0.3}, 0.0, 0.31)
            + _rows("none", 128, 0, mem_r, 0.0, 0.33)
            + _rows("per_example", 128, 0, {r: 0.04 for r in mem_r}, 0.0, 0.34)
            + _rows("apcc", 32, 0, mem_r, 0.0, 0.33) + _rows("apcc", 32, 1, mem_r, 0.0, 0.35)
            + _rows("per_core", 32, 0, mem_r, 0.0, 0.30)
            + _rows("per_core", 32, 1, mem_r, 0.0, 0.30))
    s = mem.summarize(rows)
    none32 = s["cells"]["none/b32"]
    assert none32["by_repetitions"][16]["inserted_exact_match"] == pytest.approx(0.7)  # pooled
    assert none32["heldout_exact_match"] == pytest.approx(0.01)
    assert none32["test_wer"]["values"] == [0.30, 0.32] and none32["seeds"] == [0, 1]
    assert s["memorizes"][32]["holds"] and s["memorizes"][128]["holds"]
    pe32, pe128 = s["per_example"][32], s["per_example"][128]
    assert not pe32["mitigates"] and pe32["max_gap"] == pytest.approx(0.5)  # r = 8, its own held-out
    assert pe128["mitigates"] and pe128["wer_cost_relative"] == pytest.approx(0.34 / 0.33 - 1)
    assert s["per_example_smallest_mitigating_batch"] == 128
    assert s["largest_batch_tried"] == 128
    pc = s["per_core"][32]
    assert pc["best_pcc"] == "per_core" and pc["min_seeds"] == 2
    assert pc["apcc_vs_best_pcc_relative"] == pytest.approx(0.34 / 0.30 - 1)
    vs_best = pc["apcc_vs_best_pcc_paired"]             # per seed: 0.33 / 0.30, 0.35 / 0.30
    assert vs_best["diffs"] == pytest.approx([0.1, 0.35 / 0.30 - 1])
    assert vs_best["exceeds_seed_spread"] is True       # 13 % > apcc's sd 0.014 / 0.30 = 4.7 %
    ap, pco = pc["wer_vs_none"]["apcc"], pc["wer_vs_none"]["per_core"]   # paired by seed
    assert ap["seeds"] == [0, 1] and ap["diffs"] == pytest.approx([0.03, 0.03])
    assert ap["exceeds_seed_spread"] is True            # 0.03 > seed sd 0.014
    assert pco["mean"] == pytest.approx(-0.01) and pco["exceeds_seed_spread"] is False
    # a mean beyond both policies' seed sd, but not beyond the sd of the paired differences
    # (none: 0.30, 0.32; pcc_c05: 0.30, 0.28 -> diffs 0, -0.04: mean -0.02 > both seed sds 0.014)
    noisy = rows + _rows("pcc_c05", 32, 0, mem_r, 0.0, 0.30) + _rows("pcc_c05", 32, 1, mem_r,
                                                                       0.0, 0.28)
    pn = mem.versus_baseline(noisy, "pcc_c05", 32, "test_wer")
    assert pn["diffs"] == pytest.approx([0.0, -0.04]) and pn["sd"] == pytest.approx(0.0283, 1e-2)
    assert pn["exceeds_seed_spread"] is False
    assert pn["p_paired_t"] == pytest.approx(0.5)          # t = -1 with 1 degree of freedom
    assert ap["p_paired_t"] < 1e-6 and mem.paired_t_p([0.0, 0.0]) == 1.0
    assert mem.paired_t_p([0.01]) is None
    one_seed = mem.versus_baseline(rows, "per_example", 128, "test_wer")
    assert one_seed["diffs"] == pytest.approx([0.01]) and one_seed["exceeds_seed_spread"] is None
    assert mem.versus_baseline(rows, "pcc_c05", 32, "test_wer") is None
    em = pe32["exact_match_vs_none"]            # seed 0 only (per_example has no seed 1)
    assert em["seeds"] == [0]
    assert (em["by_repetitions"][16]["matched"], em["by_repetitions"][16]["none_matched"]) == (3, 9)
    assert em["by_repetitions"][16]["p_fewer"] < 0.05 < em["by_repetitions"][8]["p_fewer"]
    assert em["by_repetitions"][1]["p_two_sided"] == pytest.approx(1.0)
    table = mem.markdown_table(s)
    assert "| none | 32 | 0,1 | 0 / 10 / 20 / 50 / 70 (20) | 1 |" in table
    pct = mem.per_core_table(s)
    assert "| 32 | apcc | 2 | 34.00 ± 1.41 | 3.00 ± 0.00 | yes, t test p = 0.00 | 13.33 ± 4.71 " \
        "vs per_core (beyond spread: yes, t test p = 0.16) |" in pct
    assert "| 32 | none | 2 | 31.00 ± 1.41 | – | – | – |" in pct
    # a WER cost above 5 % fails the mitigation even with no gap
    worse = [dict(r, test_wer=0.40) if r["policy"] == "per_example" and r["batch"] == 128 else r
             for r in rows]
    assert mem.summarize(worse)["per_example_smallest_mitigating_batch"] is None
    # memorization needs the held-out canaries unrecognized and few copies
    leaky = [dict(r, heldout_exact_match=0.2) if r["policy"] == "none" else r for r in rows]
    assert not mem.summarize(leaky)["memorizes"][32]["holds"]
    crowded = [dict(r, copy_share=0.08) for r in rows]
    assert not mem.summarize(crowded)["memorizes"][32]["holds"]


def test_plot_draws_the_per_seed_wer_panel(tmp_path):
    mem_r = {1: 0.0, 4: 0.2, 16: 0.9}
    rows = (_rows("none", 32, 0, mem_r, 0.0, 0.30) + _rows("none", 32, 1, mem_r, 0.0, 0.32)
            + _rows("per_core", 32, 0, mem_r, 0.0, 0.29) + _rows("none", 128, 0, mem_r, 0.0, 0.31))
    s = mem.summarize(rows)
    import matplotlib.image

    wide = matplotlib.image.imread(mem.plot(s, tmp_path / "a.png", rows))
    narrow = matplotlib.image.imread(mem.plot(s, tmp_path / "b.png"))
    assert wide.shape[1] > 1.4 * narrow.shape[1]       # the third panel is there


def test_old_list_results_are_not_reused(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"policy": "none", "repetitions": 1}]))
    assert mem.load_rows(f) == []
    f.write_text(json.dumps({"rows": [{"policy": "none", "key": {"a": 1}}, {"policy": "x"}]}))
    assert mem.load_rows(f) == [{"policy": "none", "key": {"a": 1}}]


@pytest.mark.slow
def test_memorization_driver_runs_cells_once_and_keeps_rows(tiny_corpus, tmp_path, one_thread,
                                                            capsys):
    corpus, _, _ = tiny_corpus
    out = tmp_path / "memorization.json"
    common = ["--config", str(ROOT / "configs" / "memorization.yaml"), "--out", str(out),
              "--steps", "2", f"out_dir={tmp_path / 'runs'}", f"data.corpus_dir={corpus}",
              "model.size=tiny", "threads=1", "progress=false", "eval_every=1000",
              "optim.warmup_steps=1", "data.max_dev_utts=5", "batch.max_seconds=30",
              "data.feature_workers=1", "audit.norm_probe_every=1"]
    assert mem.main(["--policies", "none", "per_example", *common]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["policy"], r["repetitions"]) for r in rows} == {
        (p, r) for p in ("none", "per_example") for r in (1, 2, 4, 8, 16)}
    for r in rows:
        assert r["steps"] == 2 and r["batch"] == 32 and r["seed"] == 0 and "key" in r
        assert 0 <= r["epsilon_lower_bound"] and 0 < r["copy_share"] < 1
        assert r["probe_ratio_first"] is not None
    assert set(data["summary"]["cells"]) == {"none/b32", "per_example/b32"}
    assert "holds" in data["summary"]["memorizes"][str(32)]
    runs = tmp_path / "runs"
    assert (runs / "memorization.html").exists() and (runs / "report.html").exists()
    assert "Memorization audit" in (runs / "s0" / "b32" / "none" / "report.html").read_text()

    # a rerun trains nothing; --max-runs 1 adds exactly one new cell and keeps the others
    capsys.readouterr()
    assert mem.main(["--max-runs", "1", *common]) == 0
    said = capsys.readouterr().out
    assert "none/b32/s0: done" in said and "per_example/b32/s0: done" in said
    assert "stopping after 1 new cell" not in said           # per_core was the only one left
    again = json.loads(out.read_text())["rows"]
    assert {r["policy"] for r in again} == {"none", "per_example", "per_core"}
    assert [r for r in again if r["policy"] != "per_core"] == rows

    # --refresh rebuilds the finished cells' rows from their run directories, training nothing
    assert mem.main(["--refresh", *common]) == 0
    said = capsys.readouterr().out
    assert said.count("rows rebuilt from") == 3 and "steps of 32 utterances" not in said
    fresh = json.loads(out.read_text())["rows"]
    key = lambda r: (r["policy"], r["repetitions"])  # noqa: E731
    assert sorted(fresh, key=key) == sorted(again, key=key)


def test_probe_stats_read_every_logged_row(tmp_path):
    (tmp_path / "norm_probe.csv").write_text(
        "step,canary_norm_median,ordinary_norm_median,canary_norm_mean,ordinary_norm_mean,ratio,"
        "share_unclipped,share_clipped\n1,4,2,4,2,2.0,0.06,0.03\n100,3,2,3,2,1.5,0.05,0.03\n"
        "200,1,2,1,2,0.5,0.02,0.01\n")
    s = mem.probe_stats(tmp_path, {"norm_probe": {"every": 100}})
    assert (s["ratio_first"], s["ratio_last"], s["ratio_median"]) == (2.0, 0.5, 1.5)
    assert s["share_unclipped_median"] == 0.05 and s["share_clipped_median"] == 0.03
    assert s["share_clipped_last"] == 0.01 and s["rows"] == 3 and s["clip"] == "the run's C"
    assert mem.probe_stats(tmp_path / "none", {})["ratio_median"] is None
