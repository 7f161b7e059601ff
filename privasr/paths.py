"""Where privasr's recipes live: the one ``CONFIG_DIR`` and how a recipe argument resolves.

Bottom floor: imports nothing from privasr (see ``[tool.importlinter]`` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_DIR", "available_recipes", "recipe_path"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def available_recipes() -> list[str]:
    """The recipe names in ``CONFIG_DIR`` (``configs/pcc.yaml`` -> ``pcc``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe YAML given as a path (``configs/pcc.yaml``, ``my/recipe.yaml``) or as a bare
    name in ``CONFIG_DIR`` (``pcc`` or ``pcc.yaml`` -> ``configs/pcc.yaml``).

    Raises FileNotFoundError naming the available recipes when neither exists.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.parent == Path(".") and p.name:       # a bare name: look in CONFIG_DIR
        for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
            if cand.suffix == ".yaml" and cand.is_file():
                return cand
    names = ", ".join(available_recipes()) or "none"
    raise FileNotFoundError(f"recipe {str(name_or_path)!r} not found: give a YAML file or a "
                            f"recipe name from {CONFIG_DIR} ({names})")
