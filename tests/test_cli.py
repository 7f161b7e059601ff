"""One CLI convention: `privasr CMD [RECIPE.yaml] key=value ...` from one registry of commands,
one config directory, and a README whose command lines the parser accepts."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from privasr import cli
from privasr.cli import COMMANDS, build_parser, leaf_commands, main, resolve
from privasr.paths import CONFIG_DIR, available_recipes, recipe_path

ROOT = Path(__file__).resolve().parent.parent


def _listed(help_text: str) -> list[str]:
    """The (sub)command names an argparse help lists under its subcommands."""
    return re.findall(r"^    (\S+)", help_text, flags=re.M)


def _group_help(capsys, *names: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*names, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_lists_exactly_the_registry_commands(capsys):
    assert _listed(build_parser().format_help()) == [c.name for c in COMMANDS]
    for group in (c for c in COMMANDS if c.subcommands):
        assert _listed(_group_help(capsys, group.name)) == [c.name for c in group.subcommands]
    for name, cmd in leaf_commands().items():      # the module docstring is made from it too
        assert re.search(rf"privasr {re.escape(name)} +{re.escape(cmd.help)}", cli.__doc__)
    assert "audit run" in leaf_commands() and "corpus synth" in leaf_commands()


def test_every_leaf_command_parses_its_help(capsys):
    for name in leaf_commands():
        out = _group_help(capsys, *name.split())
        assert out.startswith(f"usage: privasr {name} ")


def _readme_command_lines() -> list[str]:
    """Lines of README code blocks that run privasr (also `... -m privasr.cli ...`)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (ROOT / "README.md").read_text(),
                        flags=re.S | re.M)
    lines = []
    for block in blocks:
        for ln in block.splitlines():
            ln = ln.strip()
            if ln.startswith("privasr "):
                lines.append(ln)
            elif "-m privasr.cli " in ln:
                lines.append("privasr " + ln.split("-m privasr.cli ", 1)[1])
    return lines


def test_readme_command_lines_parse(monkeypatch):
    monkeypatch.chdir(ROOT)                       # README paths are relative to the checkout
    lines = _readme_command_lines()
    assert len(lines) > 10
    seen = set()
    for ln in lines:
        argv = shlex.split(ln, comments=True)[1:]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {ln}")
        resolve(args)                             # recipes exist; settings are key=value
        seen.add(args.command_name)
    missing = set(leaf_commands()) - seen
    assert not missing, f"commands without a README example: {sorted(missing)}"


def test_settings_may_sit_between_flags():
    a = build_parser().parse_args(["demo", "a=1", "--quick", "b.c=2"])
    resolve(a)
    assert a.quick and a.overrides == ["a=1", "b.c=2"]
    a = build_parser().parse_args(["audit", "run", "c.pt", "k.jsonl", "--out", "o.json",
                                   "device=cpu"])
    resolve(a)
    assert (a.checkpoint, a.canaries, a.out, a.overrides) == ("c.pt", "k.jsonl", "o.json",
                                                              ["device=cpu"])


def test_pcc_experiment_settings_reach_the_experiment(monkeypatch):
    import privasr.recipes.pcc as pcc

    monkeypatch.chdir(ROOT)

    calls = []
    monkeypatch.setattr(pcc, "run_pcc_experiment",
                        lambda config, **kw: calls.append((config, kw)) or {})
    assert main(["pcc-experiment", "experiment.steps=7", "experiment.bounds=[0.5,2]",
                 "experiment.cores=2", "experiment.out=runs/x", "device=cuda",
                 "model.size=tiny"]) == 0
    config, kw = calls.pop()
    assert config == CONFIG_DIR / "pcc.yaml"
    assert (kw["steps"], kw["bounds"], kw["cores"], kw["out"]) == (7, [0.5, 2.0], 2, "runs/x")
    assert kw["overrides"] == ["device=cuda", "model.size=tiny"]   # recipe keys go on
    assert main(["pcc-experiment", "configs/pcc.yaml"]) == 0       # defaults: the recipe's steps
    config, kw = calls.pop()
    assert config.resolve() == CONFIG_DIR / "pcc.yaml"
    assert (kw["steps"], kw["bounds"], kw["cores"], kw["overrides"]) == (
        None, list(pcc.DEFAULT_BOUNDS), 4, [])
    assert main(["pcc-experiment", "pcc", "experiment={cores: 3}"]) == 0
    assert calls.pop()[1]["cores"] == 3


def test_pcc_experiment_refuses_bad_settings(monkeypatch, capsys):
    import privasr.recipes.pcc as pcc

    monkeypatch.setattr(pcc, "run_pcc_experiment", lambda *a, **k: pytest.fail("ran"))
    assert main(["pcc-experiment", "experiment.stepz=3"]) == 2
    assert "experiment.stepz" in capsys.readouterr().err
    assert main(["pcc-experiment", "experiment.bounds=0.5,1"]) == 2
    assert "[0.5,1,2]" in capsys.readouterr().err
    assert main(["pcc-experiment", "experiment.steps=-1"]) == 2
    with pytest.raises(SystemExit):                                # the old flags are gone
        build_parser().parse_args(["pcc-experiment", "--steps", "3"])


def test_dp_peft_parses_its_settings_once(monkeypatch):
    import privasr.recipes.dp_peft as dp

    seen = []
    monkeypatch.setattr(dp, "run_experiment", lambda cfg, log=print: seen.append(cfg) or [])
    assert main(["dp-peft", "device=cuda", "finetune_steps=3", "epsilons=[10]"]) == 0
    cfg = seen.pop()
    assert (cfg.device, cfg.finetune_steps, cfg.epsilons) == ("cuda", 3, [10.0])
    assert cfg.lr["lora"] == 3.0e-3                                # from configs/dp_peft.yaml
    assert main(["dp-peft", "dp_peft", "nonsense_key=1"]) == 2


def test_audit_settings_are_key_value(tmp_path, capsys):
    from privasr.recipes.audit import audit_run_config, canary_config

    c = canary_config(["n=100", "words=6", "repetitions=[1,2]", "factor=1.5"])
    assert (c.n, c.words, c.repetitions, c.factor) == (100, 6, (1, 2), 1.5)
    assert audit_run_config(["device=cuda", "delta=1.0e-5"]).delta == 1e-5
    assert audit_run_config(["delta=1e-5"]).delta == 1e-5        # YAML's '1e-5' coerced
    with pytest.raises(ValueError, match="delta: expected float"):
        audit_run_config(["delta=small"])
    assert main(["audit", "make-canaries", "--out", str(tmp_path), "nn=3"]) == 2
    assert "nn" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_unknown_recipe_is_a_clear_error(capsys, monkeypatch):
    assert recipe_path("pcc") == recipe_path("pcc.yaml") == CONFIG_DIR / "pcc.yaml"
    assert "pcc" in available_recipes() and "demo" in available_recipes()
    for argv in (["train", "no_such_recipe"], ["fl", "no_such_recipe"],
                 ["dp-peft", "no_such_recipe"], ["pcc-experiment", "no/such.yaml"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("privasr: error: recipe") and argv[1] in err
        assert "pcc, pretrain" in err                             # lists what there is
    assert main(["train", "optim.max_steps=3"]) == 2
    assert "give a recipe" in capsys.readouterr().err
    monkeypatch.setenv("PRIVASR_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["train", "no_such_recipe"])


def test_config_dir_is_defined_once():
    defs = [p.relative_to(ROOT) for p in sorted((ROOT / "privasr").rglob("*.py"))
            if re.search(r"^\s*CONFIG_DIR\s*(:[^=]*)?=", p.read_text(), flags=re.M)]
    assert defs == [Path("privasr/paths.py")]
    tree = ast.parse((ROOT / "privasr" / "paths.py").read_text())   # the bottom floor
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names]
    assert not [m for m in imported if m and m.startswith("privasr")]
