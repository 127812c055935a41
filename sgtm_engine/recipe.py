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
`--set train.steps=100` overrides a field of stage `train` (values parsed as YAML: numbers, booleans, lists).
Specs are validated through the same dataclasses as the REST API; every problem is reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sgtm_engine.config import STAGE_SPECS, StageKind, with_overrides
from sgtm_engine.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class Stage:
    name: str
    kind: StageKind
    spec: Any
    inputs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    description: str = ""


def find_recipe(name_or_path: str) -> Path:
    """A path, or the name of a file in `recipes/` (with or without `.yaml`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    for candidate in (RECIPE_DIR / name_or_path, RECIPE_DIR / f"{name_or_path}.yaml"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.exists() else []
    raise ConfigError(f"recipe {name_or_path!r}: no such file, and not a recipe name; known recipes: {known}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. train.steps=100")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def load_recipe(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe."""
    data = source if isinstance(source, dict) else yaml.safe_load(find_recipe(str(source)).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError("recipe: needs a non-empty 'stages' list")
    overrides = dict(overrides or {})
    problems: list[str] = []
    stages: list[Stage] = []
    names: set[str] = set()
    for i, raw in enumerate(data["stages"]):
        where = f"stages[{i}]"
        name, kind = raw.get("name"), raw.get("kind")
        unknown = set(raw) - {"name", "kind", "spec", "inputs"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}; allowed: name, kind, spec, inputs")
        if not name or name in names:
            problems.append(f"{where}.name={name!r}: every stage needs a unique name")
            continue
        try:
            kind = StageKind(kind)
        except ValueError:
            problems.append(f"{where}.kind={kind!r}: one of {[k.value for k in STAGE_SPECS]}")
            continue
        inputs = dict(raw.get("inputs") or {})
        for role, parent in inputs.items():
            if parent not in names:
                problems.append(f"{name}.inputs.{role}={parent!r}: must name an earlier stage")
        mine = {k[len(name) + 1:]: v for k, v in overrides.items() if k.startswith(f"{name}.")}
        for k in [k for k in overrides if k.startswith(f"{name}.")]:
            overrides.pop(k)
        try:
            spec = with_overrides(STAGE_SPECS[kind], raw.get("spec") or {}, mine)
        except ConfigError as e:
            problems += [f"{name}.{p}" for p in e.problems]
            continue
        names.add(name)
        stages.append(Stage(name, kind, spec, inputs))
    if overrides:
        problems.append(f"--set {sorted(overrides)}: no stage with that name; stages: {sorted(names)}")
    if problems:
        raise ConfigError(problems)
    return Recipe(data.get("name", "recipe"), tuple(stages), data.get("description", ""))
