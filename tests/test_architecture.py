"""The architecture as tests: the import-linter contracts of pyproject.toml (floors, no cycles),
and no module importing another module's private names."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold():
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in sorted((ROOT / "privasr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("privasr"):
                bad += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)
