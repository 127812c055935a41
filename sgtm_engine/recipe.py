"""Recipes: a named list of stages (train, ablate, evaluate, ...) with their specs and who feeds whom.

```yaml
name: demo
stages:
  - name: train
    kind: train
    spec: {model: {n_layer: 4}, steps: 500}
  - name: eval
    kind: evaluate
    inputs: {model: train}        # role -> an earlier stage's name
    spec: {}
```
`--set train.steps=100` overrides a field of stage `train` (values parsed as YAML: numbers, booleans, lists; a
mapping merges into the block). The stage list is parsed by `config.parse_recipe`, the same rules as the API's
`POST /api/v1/pipelines`, so a recipe that runs here is accepted there; every problem is reported at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sgtm_engine.config import Recipe, Stage, parse_recipe, to_dict
from sgtm_engine.errors import ConfigError
from sgtm_engine.yamlio import load_file

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
SWEEP_DIR = RECIPE_DIR / "sweeps"

__all__ = ["RECIPE_DIR", "SWEEP_DIR", "Recipe", "Stage", "find_recipe", "load_recipe", "read_sweep", "recipe_data"]


def find_recipe(name_or_path: str, folder: Path = RECIPE_DIR) -> Path:
    """A file's path, or the name of a file in `folder` (with or without `.yaml`); a folder of the same name in the
    working directory does not hide a name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (folder / name_or_path, folder / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.exists() else []
    what = "sweep" if folder == SWEEP_DIR else "recipe"
    found = "a folder, not a file" if path.exists() else "no such file"
    raise ConfigError(f"{what} {name_or_path!r}: {found}, and not a {what} name; known {what}s: {known}")


def load_recipe(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe."""
    data = source if isinstance(source, dict) else load_file(find_recipe(str(source)))
    return parse_recipe(data, overrides)


def read_sweep(name_or_path: str) -> dict[str, Any]:
    """A sweep document as plain data: a path, or the name of a file in `recipes/sweeps/`."""
    path = find_recipe(name_or_path, SWEEP_DIR)
    data = load_file(path)
    if not isinstance(data, dict) or data.get("kind") != "sweep":
        raise ConfigError(f"{path}: expected a sweep (kind: sweep, base, variants, grid, seeds)")
    return data


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """A resolved recipe as plain data (every default filled in): what `--print-config` shows and the API accepts."""
    out: dict[str, Any] = {"name": recipe.name}
    if recipe.description:
        out["description"] = recipe.description
    if recipe.experiment:
        out["experiment"] = recipe.experiment
    out["stages"] = [{"name": s.name, "kind": s.kind.value, **({"inputs": s.inputs} if s.inputs else {}),
                      **({"queue": s.queue} if s.queue else {}), **({"gpus": s.gpus} if s.gpus != 1 else {}),
                      "spec": to_dict(s.spec)} for s in recipe.stages]
    return out
