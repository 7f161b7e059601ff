"""The `privasr` command line: ``privasr CMD [RECIPE.yaml] [key=value ...]``.

Recipe settings are ``key=value`` (values parsed as YAML, nested keys with dots); flags are only
for what is not a recipe setting (paths of checkpoints and manifests, modes such as --quick).
RECIPE is a YAML file or the name of one in ``configs/`` (``pcc`` -> ``configs/pcc.yaml``).
Every command is one entry of ``COMMANDS``; the parser, ``--help`` and the list below are made
from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from privasr.paths import CONFIG_DIR, available_recipes, recipe_path

Runner = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """One ``privasr`` (sub)command.

    ``recipe``: the command reads a recipe (positional RECIPE); ``default_recipe`` makes it
    optional. ``settings``: the help of its trailing key=value settings (empty: none).
    ``arguments`` adds what is not a setting (paths, modes). ``run`` gets the parsed namespace,
    with ``recipe`` resolved to a path and ``overrides`` the key=value list.
    """

    name: str
    help: str
    run: Runner | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    recipe: bool = False
    default_recipe: str | None = None
    settings: str = ""
    subcommands: tuple["Command", ...] = ()


# -- what each command runs (imports stay lazy: `privasr --help` loads no torch) ---------------
def _demo(a: argparse.Namespace) -> int:
    from privasr.recipes.demo import run_demo

    run_demo(quick=a.quick, overrides=a.overrides)
    return 0


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


def _corpus_commonvoice(a: argparse.Namespace) -> int:
    from privasr.data.commonvoice import default_audio_dir, import_commonvoice
    from privasr.data.manifest import SkipReport
    from privasr.data.stats import corpus_stats, format_stats

    rep = SkipReport()
    audio_dir = Path(a.audio_dir) if a.audio_dir else default_audio_dir(a.out)
    utts = import_commonvoice(Path(a.dir), Path(a.out), split=a.split,
                              on_error="skip" if a.skip_bad else "raise", report=rep,
                              audio_dir=audio_dir, progress=sys.stderr.isatty())
    print(f"wrote {a.out} (16 kHz FLAC clips in {audio_dir})")
    print(format_stats(corpus_stats(utts)))
    if rep.total:
        print(rep.summary())
    return 0


def _train(a: argparse.Namespace) -> int:
    from privasr.config import load_config
    from privasr.recipes.train import run_training

    res = run_training(load_config(a.recipe, a.overrides))
    if res.get("rank", 0):  # under torchrun rank 0 reports
        return 0
    print(json.dumps({k: res[k] for k in ("test_wer", "test_cer", "steps", "wall_seconds",
                                          "stopped")}, indent=1))
    if res["privacy"]:
        print(f"achieved privacy: {res['privacy']['summary']}")
    return 0


def _pcc_experiment(a: argparse.Namespace) -> int:
    from privasr.recipes.pcc import run_recipe

    run_recipe(a.recipe, a.overrides)
    return 0


def _dp_peft(a: argparse.Namespace) -> int:
    from privasr.recipes.dp_peft import run_recipe

    run_recipe(a.recipe, a.overrides)
    return 0


def _fl(a: argparse.Namespace) -> int:
    from privasr.federated.config import load_fl_config

    cfg = load_fl_config(a.recipe, a.overrides)
    from privasr.federated.app import run_simulation_fl  # sets Flower's environment first

    res = run_simulation_fl(cfg)
    print(json.dumps({k: res[k] for k in ("clipping", "server_optimizer", "epsilon", "delta",
                                          "rounds", "test_wer", "test_cer", "stopped")}, indent=1))
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


def _export(a: argparse.Namespace) -> int:
    from privasr.recipes.export import export_checkpoint

    export_checkpoint(a.checkpoint, a.out)
    return 0


def _audit_make(a: argparse.Namespace) -> int:
    from privasr.recipes.audit import make_canaries_command

    return make_canaries_command(a.out, a.overrides)


def _audit_run(a: argparse.Namespace) -> int:
    from privasr.recipes.audit import run_command

    return run_command(a.checkpoint, a.canaries, out=a.out, overrides=a.overrides)


# -- what each command takes besides RECIPE and key=value settings ----------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a ≤5-minute smoke run")


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/synth")
    p.add_argument("--hours", type=float, default=4.0)
    p.add_argument("--speakers", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rebuild over a corpus with other settings")
    from privasr.data.domains import DOMAINS

    p.add_argument("--domain", choices=tuple(DOMAINS),
                   help="a corpus domain of privasr.data.domains (public, private, assistant)")


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifests", nargs="+")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad lines")


def _librispeech_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir")
    p.add_argument("--out", required=True)
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad utterances")


def _commonvoice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a Common Voice language folder (SPLIT.tsv, clips/)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="validated",
                   help="the TSV to import: validated, train, dev, test, ... (default: validated)")
    p.add_argument("--audio-dir", help="where the clips converted to 16 kHz FLAC go "
                   "(default: clips_16000/ next to --out; reused when up to date)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad utterances")


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories holding results.json")
    p.add_argument("--out", help="also write the rows as JSON here")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("manifest")
    p.add_argument("--out", help="JSON results path (default: next to the checkpoint)")
    p.add_argument("--beam", type=int, default=0, help="beam size (0: greedy)")
    p.add_argument("--lm", help="training manifest whose transcripts build a word n-gram LM")
    p.add_argument("--lm-weight", type=float, default=0.3, help="LM weight (shallow fusion)")
    p.add_argument("--word-bonus", type=float, default=1.0, help="score bonus per word")


def _transcribe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("audio", nargs="+")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a model.family=hf_ctc checkpoint (last.pt, merged.pt)")
    p.add_argument("out", help="the transformers directory to write")


def _make_canaries_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (canaries.jsonl, audio/)")


def _audit_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("canaries", help="canaries.jsonl from make-canaries")
    p.add_argument("--out", help="JSON path (default CKPT.audit.json; HTML next to it)")


COMMANDS: tuple[Command, ...] = (
    Command("demo", "build the corpus, train the small model, report test WER", _demo,
            _demo_args, settings="overrides of configs/demo.yaml, e.g. model.size=tiny"),
    Command("corpus", "embedded corpus, statistics, LibriSpeech and Common Voice import",
            subcommands=(
        Command("synth", "synthesise the multi-speaker espeak-ng corpus", _corpus_synth,
                _synth_args),
        Command("stats", "hours, utterances, speakers, vocabulary of manifests", _corpus_stats,
                _stats_args),
        Command("librispeech", "import a LibriSpeech-layout tree as a manifest",
                _corpus_librispeech, _librispeech_args),
        Command("commonvoice", "import a Common Voice split (TSV + MP3 clips) as a manifest",
                _corpus_commonvoice, _commonvoice_args))),
    Command("train", "train from a YAML recipe with key=value overrides", _train, recipe=True,
            settings="recipe overrides, e.g. optim.max_steps=500 device=cuda"),
    Command("pcc-experiment", "baseline vs per-core clipping (PCC) vs adaptive PCC on K "
            "simulated cores: WER table + curves", _pcc_experiment, recipe=True,
            default_recipe="pcc",
            settings="experiment.{out,bounds,cores,steps}=... (the experiment's settings, e.g. "
                     "experiment.steps=500 experiment.bounds=[0.5,1,2]); any other key "
                     "overrides the recipe, e.g. device=cuda"),
    Command("dp-peft", "DP fine-tuning experiment: WER x ε x PEFT method", _dp_peft,
            recipe=True, default_recipe="dp_peft",
            settings="overrides of the experiment recipe (DpPeftConfig), e.g. device=cuda "
                     "finetune_steps=300 epsilons=[10]"),
    Command("fl", "federated learning with user-level DP (Flower simulation)", _fl, recipe=True,
            settings="recipe overrides, e.g. server.rounds=20"),
    Command("compare", "runs' results side by side (first run = baseline)", _compare,
            _compare_args),
    Command("eval", "WER/CER of a checkpoint on a manifest", _eval, _eval_args),
    Command("transcribe", "transcribe audio files with a checkpoint", _transcribe,
            _transcribe_args),
    Command("export", "an hf_ctc checkpoint as a transformers model directory", _export,
            _export_args),
    Command("audit", "memorization audit: sped-up canaries, exposure, one-run ε", subcommands=(
        Command("make-canaries", "synthesise sped-up random-word canaries", _audit_make,
                _make_canaries_args,
                settings="canary settings (privasr.audit.canaries.CanaryConfig): n=60 words=8 "
                         "seed=0 voice=en-us variant=m1 pitch=50 rate=120 factor=auto "
                         "method=resample|tempo|espeak_rate repetitions=[1,2,4,8,16] "
                         "subsampling=4 margin=1.15 on_infeasible=refuse|warn"),
        Command("run", "score canaries with a checkpoint; tables + JSON + HTML", _audit_run,
                _audit_run_args,
                settings="device=cpu confidence=0.95 delta=... (δ of the ε bound; default: "
                         "the checkpoint's claimed δ, else 0)"))),
)


def leaf_commands(commands: tuple[Command, ...] = COMMANDS, prefix: str = ""
                  ) -> dict[str, Command]:
    """Every runnable command as typed (``demo``, ``corpus synth``, ..., ``audit run``)."""
    out: dict[str, Command] = {}
    for c in commands:
        name = f"{prefix}{c.name}"
        out.update(leaf_commands(c.subcommands, name + " ") if c.subcommands else {name: c})
    return out


# -- the parser ---------------------------------------------------------------------------------
def _is_setting(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


class _Parser(argparse.ArgumentParser):
    """key=value settings may come before, between or after flags (argparse alone stops filling
    a ``nargs='*'`` positional at the first flag and calls the rest unrecognized)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        cmd = getattr(ns, "command", None)
        if cmd is not None and cmd.settings and any(map(_is_setting, extras)):
            ns.overrides = [*ns.overrides, *filter(_is_setting, extras)]
            extras = [x for x in extras if not _is_setting(x)]
        return ns, extras


def _add(sub: argparse._SubParsersAction, cmd: Command, prefix: str = "") -> None:
    names = " | ".join(c.name for c in cmd.subcommands)
    p = sub.add_parser(cmd.name, help=f"{cmd.help} [{names}]" if names else cmd.help,
                       description=cmd.help)
    if cmd.subcommands:
        inner = p.add_subparsers(dest=f"{cmd.name}_cmd", required=True, metavar="CMD")
        for c in cmd.subcommands:
            _add(inner, c, f"{prefix}{cmd.name} ")
        return
    if cmd.recipe:
        what = "recipe YAML, or a recipe name in configs/ (privasr --help lists them)"
        if cmd.default_recipe:
            p.add_argument("recipe", nargs="?", metavar="RECIPE",
                           help=f"{what} (default: {cmd.default_recipe})")
        else:
            p.add_argument("recipe", metavar="RECIPE", help=what)
    if cmd.arguments:
        cmd.arguments(p)
    if cmd.settings:
        p.add_argument("overrides", nargs="*", metavar="key=value", help=cmd.settings)
    p.set_defaults(fn=cmd.run, command=cmd, command_name=f"{prefix}{cmd.name}")


def build_parser() -> argparse.ArgumentParser:
    about = textwrap.fill(
        "Recipe settings are key=value (YAML values, nested keys with dots); flags are only for "
        "what is not a recipe setting. RECIPE: a YAML file or a recipe name from configs/ "
        f"({', '.join(available_recipes())}).", width=79)
    p = _Parser(prog="privasr", formatter_class=argparse.RawDescriptionHelpFormatter,
                description=f"privasr CMD [RECIPE.yaml] [key=value ...]\n\n{about}",
                epilog="`privasr CMD --help` shows a command's arguments and settings.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="CMD", title="commands")
    for c in COMMANDS:
        _add(sub, c)
    return p


def resolve(a: argparse.Namespace) -> None:
    """``a.recipe`` -> a path (a bare name -> configs/NAME.yaml); a key=value argparse took for
    RECIPE goes back to the settings; every setting must be key=value."""
    cmd: Command = a.command
    if cmd.settings:
        bad = [x for x in a.overrides if "=" not in x]
        if bad:
            raise ValueError(f"{a.command_name}: {' '.join(bad)}: not key=value (see "
                             f"privasr {a.command_name} --help)")
    if not cmd.recipe:
        return
    if a.recipe is not None and "=" in a.recipe and not Path(a.recipe).is_file():
        a.overrides = [a.recipe, *a.overrides]
        a.recipe = None
    if a.recipe is None:
        if cmd.default_recipe is None:
            raise FileNotFoundError(f"{a.command_name}: give a recipe first: a YAML file or a "
                                    f"recipe name from {CONFIG_DIR} "
                                    f"({', '.join(available_recipes())})")
        a.recipe = cmd.default_recipe
    a.recipe = recipe_path(a.recipe)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resolve(args)
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if "PRIVASR_DEBUG" in os.environ:
            raise
        print(f"privasr: error: {e}", file=sys.stderr)
        return 2


__doc__ += "\n" + "\n".join(f"    privasr {name:<22} {c.help}"
                             for name, c in leaf_commands().items()) + "\n"

if __name__ == "__main__":
    sys.exit(main())
