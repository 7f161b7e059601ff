"""The `privasr` command: demo | corpus {synth,stats,librispeech} | train | eval | transcribe |
audit {make-canaries,run} | dp-peft | fl |
compare."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _corpus_synth(a: argparse.Namespace) -> int:
    from privasr.data.synth import SynthConfig, synthesize_corpus
    import time

    t = time.time()
    cfg = SynthConfig(hours=a.hours, seed=a.seed, speakers=a.speakers)
    if a.domain:
        from privasr.data.domains import domain_config

        cfg = domain_config(a.domain, hours=a.hours, speakers=a.speakers, seed=a.seed)
    summary = synthesize_corpus(a.out, cfg, workers=a.workers, force=a.force)
    wall = time.time() - t
    audio = sum(summary["hours"].values()) * 3600
    if summary["cached"]:
        print(f"{a.out}: up to date (nothing to do)")
    else:
        print(f"{a.out}: synthesised {audio / 3600:.2f} h in {wall:.0f} s "
              f"({audio / max(wall, 1e-9):.0f}x real time, {a.workers} workers)")
    print(json.dumps(summary, indent=1))
    return 0


def _corpus_stats(a: argparse.Namespace) -> int:
    from privasr.data.manifest import SkipReport, read_manifest
    from privasr.data.stats import corpus_stats, format_stats

    for m in a.manifests:
        rep = SkipReport()
        utts = read_manifest(m, on_error="skip" if a.skip_bad else "raise", report=rep)
        print(f"== {m}")
        print(format_stats(corpus_stats(utts)))
        if rep.total:
            print(rep.summary())
    return 0


def _corpus_librispeech(a: argparse.Namespace) -> int:
    from privasr.data.librispeech import import_librispeech
    from privasr.data.manifest import SkipReport
    from privasr.data.stats import corpus_stats, format_stats

    rep = SkipReport()
    utts = import_librispeech(Path(a.dir), Path(a.out), on_error="skip" if a.skip_bad else "raise",
                              report=rep)
    print(f"wrote {a.out}")
    print(format_stats(corpus_stats(utts)))
    if rep.total:
        print(rep.summary())
    return 0


def _train(a: argparse.Namespace) -> int:
    from privasr.config import load_config
    from privasr.recipes.train import run_training

    cfg = load_config(a.config, a.overrides)
    res = run_training(cfg)
    if res.get("rank", 0):  # under torchrun rank 0 reports
        return 0
    print(json.dumps({k: res[k] for k in ("test_wer", "test_cer", "steps", "wall_seconds",
                                          "stopped")}, indent=1))
    if res["privacy"]:
        print(f"achieved privacy: {res['privacy']['summary']}")
    return 0


def _pcc_experiment(a: argparse.Namespace) -> int:
    from privasr.recipes.pcc import DEFAULT_BOUNDS, run_pcc_experiment

    try:
        bounds = [float(c) for c in a.bounds.split(",")] if a.bounds else DEFAULT_BOUNDS
    except ValueError:
        raise ValueError(f"--bounds {a.bounds!r}: give clip norms like 1,3,10") from None
    run_pcc_experiment(a.config, out=a.out, bounds=bounds, cores=a.cores, steps=a.steps,
                       device=a.device, overrides=a.overrides)
    return 0


def _fl(a: argparse.Namespace) -> int:
    from privasr.federated.config import load_fl_config

    cfg = load_fl_config(a.config, a.overrides)
    from privasr.federated.app import run_simulation_fl  # sets Flower's environment first

    res = run_simulation_fl(cfg)
    print(json.dumps({k: res[k] for k in ("clipping", "server_optimizer", "epsilon", "delta",
                                          "rounds", "test_wer", "test_cer", "stopped")}, indent=1))
    return 0


def _demo(a: argparse.Namespace) -> int:
    from privasr.recipes.demo import run_demo

    run_demo(quick=a.quick, overrides=a.overrides)
    return 0


def _compare(a: argparse.Namespace) -> int:
    from privasr.report.compare import compare, format_table, write_comparison

    rows = compare(a.runs)
    print(format_table(rows))
    if a.out:
        print(f"wrote {write_comparison(rows, a.out)}")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from privasr.inference import eval_command

    return eval_command(a.checkpoint, a.manifest, out=a.out, beam=a.beam, lm_train=a.lm,
                        lm_weight=a.lm_weight, word_bonus=a.word_bonus)


def _transcribe(a: argparse.Namespace) -> int:
    from privasr.inference import load_model, transcribe_files

    model, vocab = load_model(a.checkpoint)
    for path, text in transcribe_files(model, vocab, a.audio):
        print(f"{path}\t{text}")
    return 0


def _dp_peft(a: argparse.Namespace) -> int:
    from privasr.recipes.dp_peft import main as experiment

    return experiment([a.config, *a.overrides])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privasr", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="build the corpus, train the small model, report test WER")
    d.add_argument("--quick", action="store_true", help="a ≤5-minute smoke run")
    d.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    d.set_defaults(fn=_demo)

    c = sub.add_parser("corpus", help="embedded corpus, statistics, LibriSpeech import")
    cs = c.add_subparsers(dest="corpus_cmd", required=True)
    s = cs.add_parser("synth", help="synthesise the multi-speaker espeak-ng corpus")
    s.add_argument("--out", default="data/synth")
    s.add_argument("--hours", type=float, default=4.0)
    s.add_argument("--speakers", type=int, default=600)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--force", action="store_true", help="rebuild over a corpus with other settings")
    s.add_argument("--domain", choices=("public", "private"),
                   help="a side of the public/private split (privasr.data.domains)")
    s.set_defaults(fn=_corpus_synth)
    st = cs.add_parser("stats", help="hours, utterances, speakers, vocabulary of manifests")
    st.add_argument("manifests", nargs="+")
    st.add_argument("--skip-bad", action="store_true", help="skip and count bad lines")
    st.set_defaults(fn=_corpus_stats)
    ls = cs.add_parser("librispeech", help="import a LibriSpeech-layout tree as a manifest")
    ls.add_argument("dir")
    ls.add_argument("--out", required=True)
    ls.add_argument("--skip-bad", action="store_true", help="skip and count bad utterances")
    ls.set_defaults(fn=_corpus_librispeech)

    t = sub.add_parser("train", help="train from a YAML recipe with key=value overrides")
    t.add_argument("config", help=f"recipe YAML (see {CONFIG_DIR})")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(fn=_train)

    pe = sub.add_parser("pcc-experiment", help="baseline vs per-core clipping (PCC) at a few "
                        "bounds vs adaptive PCC, K simulated cores: WER table + curves")
    pe.add_argument("--config", default=str(CONFIG_DIR / "pcc.yaml"))
    pe.add_argument("--out", default="runs/pcc-experiment")
    pe.add_argument("--bounds", help="PCC clip norms C, comma-separated (default 0.5,1,2)")
    pe.add_argument("--cores", type=int, default=4, help="K simulated cores")
    pe.add_argument("--steps", type=int, help="optim.max_steps (warm-up/eval scaled to fit)")
    pe.add_argument("--device", help="auto | cpu | cuda")
    pe.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    pe.set_defaults(fn=_pcc_experiment)
    dp = sub.add_parser("dp-peft", help="DP fine-tuning experiment: WER x ε x PEFT method")
    dp.add_argument("config", help="experiment YAML, e.g. configs/dp_peft.yaml")
    dp.add_argument("overrides", nargs="*", help="key=value, e.g. device=cuda finetune_steps=300")
    dp.set_defaults(fn=_dp_peft)
    f = sub.add_parser("fl", help="federated learning with user-level DP (Flower simulation)")
    f.add_argument("config", help=f"FL recipe YAML (see {CONFIG_DIR}/fl_dp.yaml)")
    f.add_argument("overrides", nargs="*")
    f.set_defaults(fn=_fl)

    c = sub.add_parser("compare", help="runs' results side by side (first run = baseline)")
    c.add_argument("runs", nargs="+", help="run directories holding results.json")
    c.add_argument("--out", help="also write the rows as JSON here")
    c.set_defaults(fn=_compare)

    e = sub.add_parser("eval", help="WER/CER of a checkpoint on a manifest")
    e.add_argument("checkpoint")
    e.add_argument("manifest")
    e.add_argument("--out", help="JSON results path (default: next to the checkpoint)")
    e.add_argument("--beam", type=int, default=0, help="beam size (0: greedy)")
    e.add_argument("--lm", help="training manifest whose transcripts build a word n-gram LM")
    e.add_argument("--lm-weight", type=float, default=0.3, help="LM weight (shallow fusion)")
    e.add_argument("--word-bonus", type=float, default=1.0, help="score bonus per word")
    e.set_defaults(fn=_eval)

    tr = sub.add_parser("transcribe", help="transcribe audio files with a checkpoint")
    tr.add_argument("checkpoint")
    tr.add_argument("audio", nargs="+")
    tr.set_defaults(fn=_transcribe)

    from privasr.recipes.audit import add_audit_parser
    add_audit_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if "PRIVASR_DEBUG" in __import__("os").environ:
            raise
        print(f"privasr: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
