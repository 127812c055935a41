"""Sweeps: one base pipeline, named variants, a grid of overrides and a list of seeds, expanded into cells.

The file format, cell order, override paths, seeds and cell ids are user documentation: docs/sweeps.md.

Choices made here: stdlib only (the API imports this module). A cell is the base with its overrides applied and its
pipeline validated by the config layer (`apply_stage_overrides`, `parse_stages`: the same rules and did-you-means as
`sgtm run`); every problem is reported at once, located in the sweep document and blamed on the variant key, grid
value or seed that set the field it names (`("grid", "train.noise.recall", 3)`), else on the base.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import re
from collections.abc import Iterable
from typing import Any

from sgtm_engine.config import (
    STAGE_SPECS,
    StageKind,
    apply_stage_overrides,
    did_you_mean,
    header_problems,
    parse_stages,
    spec_hash,
    to_dict,
    unknown_key,
)
from sgtm_engine.errors import ConfigError, Loc, Problem, render_loc

TOP_KEYS = ("kind", "name", "description", "experiment", "base", "variants", "grid", "seeds", "seed_paths")
BASE_KEYS = ("stages", "name", "description")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
MAX_CELLS = 2000


class SweepError(ConfigError):
    """The sweep is invalid; `problems` has every problem with its location in the sweep document:
    ("grid", "train.noise.recall", 3), ("variants", "sgtm", "train.steps"), …"""


@dataclasses.dataclass(frozen=True)
class Cell:
    cell_id: str
    """spec_hash of the resolved pipeline and the seed."""
    position: int
    variant: str | None
    params: dict[str, Any]
    """The grid values of this cell, by dotted path."""
    seed: int | None
    stages: list[dict[str, Any]]
    """The resolved pipeline: [{name, kind, inputs, spec (canonical), queue, gpus}]."""


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """A sweep document, validated and expanded into its cells (the service's ledger row is `api.db.models.Sweep`)."""

    name: str
    experiment: str | None
    variants: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]]
    seeds: list[int]
    seed_paths: list[str]
    cells: list[Cell]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "experiment": self.experiment, "variants": self.variants, "grid": self.grid,
                "seeds": self.seeds, "seed_paths": self.seed_paths}


# ---------------------------------------------------------------------------------------------------------------------
# Overrides (`--set` on a sweep, for `sgtm sweep` both local and submitted)


def apply_sweep_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a sweep document with `--set` overrides applied: a top-level key (`seeds=[0]`) replaces its value,
    except that a list for `variants` keeps just those variants; `<stage>.<field>=value` sets a field of a base stage
    as `sgtm run --set` does (a mapping merges into the block)."""
    data = copy.deepcopy(data)
    staged = {}
    for key, value in overrides.items():
        if key == "variants" and isinstance(value, list):
            known = list(data.get("variants") or {})
            unknown = [v for v in value if v not in known]
            if unknown:
                raise SweepError([Problem(("--set", "variants"), f"--set variants={value}: unknown {unknown}; this "
                                                                 f"sweep's variants: {known}", value)])
            data["variants"] = {name: data["variants"][name] for name in known if name in value}
        elif key in TOP_KEYS:
            data[key] = value
        elif "." not in key and (meant := did_you_mean(key, TOP_KEYS)):  # `sedes=[1]`: a misspelt key, not a stage
            raise SweepError([Problem(("--set", key), f"--set {key}: unknown field of a sweep; did you mean "
                                                      f"{meant!r}?", value)])
        else:
            staged[key] = value
    if staged:
        base = data.get("base") if isinstance(data.get("base"), dict) else {}
        data["base"] = {**base, "stages": apply_stage_overrides(base.get("stages"), staged)}
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Parse


def parse_sweep(data: Any, *, max_cells: int = MAX_CELLS) -> SweepPlan:
    """Validate a sweep document and expand it into cells. Raises `SweepError` listing every problem."""
    if not isinstance(data, dict):
        raise SweepError(Problem.at((), "a sweep is a mapping with 'base', 'variants', 'grid', 'seeds'"))
    problems = [unknown_key((), str(key), TOP_KEYS, "a sweep") for key in data if key not in TOP_KEYS]
    if data.get("kind", "sweep") != "sweep":
        problems.append(Problem.at(("kind",), "a sweep document has kind 'sweep'", data["kind"]))
    problems += header_problems(data)  # name, description and experiment: a recipe's rules
    stages = _parse_base(data.get("base"), problems)
    variants = _parse_variants(data.get("variants"), problems)
    grid = _parse_grid(data.get("grid"), problems)
    seeds = _parse_seeds(data.get("seeds"), problems)
    seed_paths = _parse_seed_paths(data.get("seed_paths"), stages, seeds, problems)
    if stages is None:
        raise SweepError(problems)
    before = len(problems)
    _check_conflicts(variants, grid, seed_paths, problems)
    n = max(len(variants), 1) * math.prod(len(v) for v in grid.values()) * max(len(seeds), 1)
    if n > max_cells:
        problems.append(Problem.at((), f"the sweep has {n} cells; at most {max_cells} per sweep: split it, or drop "
                                       "axis values"))
    cells = _expand(stages, variants, grid, seeds, seed_paths, problems) if len(problems) == before else []
    if problems:
        unique: dict[str, Problem] = {}  # a bad path fails every cell alike: report it once
        raise SweepError([unique.setdefault(p.msg, p) for p in problems if p.msg not in unique])
    return SweepPlan(name=data.get("name", "sweep"), experiment=data.get("experiment"), variants=variants,
                     grid=grid, seeds=seeds, seed_paths=seed_paths, cells=cells)


def _parse_base(base: Any, problems: list[Problem]) -> list[dict[str, Any]] | None:
    if not isinstance(base, dict) or not isinstance(base.get("stages"), list) or not base["stages"]:
        problems.append(Problem.at(("base",), "needs a non-empty 'stages' list (a pipeline recipe: [{name, kind, "
                                              "spec, inputs}])", base))
        return None
    problems += [unknown_key(("base",), str(key), BASE_KEYS, "a sweep's base") for key in base if key not in BASE_KEYS]
    try:  # the one stage-list parser; specs are validated per cell, after the overrides
        parsed = parse_stages(base["stages"], validate_specs=False)
    except ConfigError as e:
        problems += [p.nested(("base",)) for p in e.problems]
        return None
    return [{"name": s.name, "kind": s.kind, "spec": s.spec, "inputs": s.inputs, "queue": s.queue, "gpus": s.gpus}
            for s in parsed]


def _parse_variants(raw: Any, problems: list[Problem]) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem.at(("variants",), "expected a mapping {name: {dotted path: value}}", raw))
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, overrides in raw.items():
        loc: Loc = ("variants", str(name))
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            problems.append(Problem.at(loc, "a variant name uses letters, digits, '_', '-', '.', '+' (at most 64)"))
        elif not isinstance(overrides or {}, dict) or not all(isinstance(p, str) for p in overrides or {}):
            problems.append(Problem.at(loc, "expected a mapping {'<stage>.<field>': value}", overrides))
        else:
            out[name] = dict(overrides or {})  # None: the base as is
    return out


def _parse_grid(raw: Any, problems: list[Problem]) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(Problem.at(("grid",), "expected a mapping {'<stage>.<field>': [values]}", raw))
        return {}
    out: dict[str, list[Any]] = {}
    for path, values in raw.items():
        loc: Loc = ("grid", str(path))
        keys = [json.dumps(v, sort_keys=True, default=str) for v in values] if isinstance(values, list) else []
        if not isinstance(path, str) or not keys:
            problems.append(Problem.at(loc, "expected '<stage>.<field>': a non-empty list of values, e.g. [1.0, 0.9]",
                                       values))
        elif dupes := list({k: v for k, v in zip(keys, values, strict=True) if keys.count(k) > 1}.values()):
            problems.append(Problem.at(loc, f"values {dupes} repeat; list each value once"))
        else:
            out[path] = list(values)
    return out


def _parse_seeds(raw: Any, problems: list[Problem]) -> list[int]:
    if raw is None:
        return []
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in raw)):
        problems.append(Problem.at(("seeds",), "expected a non-empty list of integers >= 0, e.g. [0, 1, 2]", raw))
        return []
    if len(set(raw)) != len(raw):
        problems.append(Problem.at(("seeds",), "each seed once", raw))
    return list(dict.fromkeys(raw))


def _parse_seed_paths(raw: Any, stages: list[dict[str, Any]] | None, seeds: list[int],
                      problems: list[Problem]) -> list[str]:
    if raw is None:
        return default_seed_paths(stages or []) if seeds else []
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        problems.append(Problem.at(("seed_paths",), "expected a list of dotted paths, e.g. [train.seed, "
                                                    "train.noise.seed]", raw))
        return []
    if not seeds:
        problems.append(Problem.at(("seed_paths",), "given without seeds; add 'seeds' or drop it"))
    return list(raw)


def default_seed_paths(stages: Iterable[dict[str, Any]]) -> list[str]:
    """`<stage>.seed` of every stage whose spec has a top-level seed, plus `<stage>.noise.seed` of train stages."""
    paths = []
    for stage in stages:
        fields = {f.name for f in dataclasses.fields(STAGE_SPECS[StageKind(stage["kind"])])}
        if "seed" in fields:
            paths.append(f"{stage['name']}.seed")
        if stage["kind"] == StageKind.TRAIN:
            paths.append(f"{stage['name']}.noise.seed")
    return paths


def _check_conflicts(variants: dict[str, dict[str, Any]], grid: dict[str, list[Any]], seed_paths: list[str],
                     problems: list[Problem]) -> None:
    """A field is set by one source only: a variant key, a grid axis or a seed path."""
    def overlap(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    seeded = [(f"seed path {p!r}; seeds set it (drop it, or set seed_paths)", p) for p in seed_paths]
    for path in grid:
        problems += [Problem.at(("grid", path), f"overlaps {why}") for why, p in seeded if overlap(path, p)]
    for name, overrides in variants.items():
        for key, value in overrides.items():
            clash = [(f"a grid axis ({a!r}); set it in one place only", a) for a in grid]
            clash += seeded if "." in key or value is not None else []  # a dropped stage's seeds clash with nothing
            problems += [Problem.at(("variants", name, key), f"overlaps {why}") for why, p in clash if overlap(key, p)]


# ---------------------------------------------------------------------------------------------------------------------
# Expand


def _expand(stages: list[dict[str, Any]], variants: dict[str, dict[str, Any]], grid: dict[str, list[Any]],
            seeds: list[int], seed_paths: list[str], problems: list[Problem]) -> list[Cell]:
    variant_items: list[tuple[str | None, dict[str, Any]]] = list(variants.items()) or [(None, {})]
    axes = list(grid)
    combos = list(itertools.product(*(range(len(grid[a])) for a in axes)))
    seed_items: list[int | None] = list(seeds) or [None]
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for variant, overrides in variant_items:
        for combo in combos:
            for seed in seed_items:
                sources: list[tuple[str, Any, Loc]] = [(p, v, ("variants", str(variant), p))
                                                       for p, v in overrides.items()]
                sources += [(a, grid[a][i], ("grid", a, i)) for a, i in zip(axes, combo, strict=True)]
                sources += [(p, seed, ("seed_paths", i)) for i, p in enumerate(seed_paths) if seed is not None]
                resolved = _resolve(stages, sources, problems)
                if resolved is None:
                    continue
                params = {a: grid[a][i] for a, i in zip(axes, combo, strict=True)}
                cell_id = spec_hash({"stages": [_identity(s) for s in resolved], "seed": seed})
                cell = Cell(cell_id, len(cells), variant, params, seed, resolved)
                if cell.cell_id in seen:
                    problems.append(Problem((), f"cells {seen[cell.cell_id]} and {cell_label(cell)} resolve to the "
                                                "same pipeline; a variant or grid value changes nothing: remove it"))
                    continue
                seen[cell.cell_id] = cell_label(cell)
                cells.append(cell)
    return cells


def _resolve(stages: list[dict[str, Any]], sources: list[tuple[str, Any, Loc]],
             problems: list[Problem]) -> list[dict[str, Any]] | None:
    """The cell's pipeline: the base with its overrides, less the stages it drops, validated by the one stage-list
    parser; each problem is blamed on the override that caused it (`_blame`)."""
    names = [s["name"] for s in stages]
    dropped = {p: loc for p, v, loc in sources if "." not in p and v is None and loc[0] == "variants" and p in names}
    where = {p: (loc[:2] if loc[0] == "grid" else loc) for p, _v, loc in sources}  # a path's problem is the axis's
    raw, before = stages, len(problems)
    for path, value, _loc in sources:
        try:  # one at a time: a bad one is left out and the others still checked
            if path not in dropped:
                raw = apply_stage_overrides(raw, {path: value}, where=lambda p: (where[p], render_loc(where[p])))
        except ConfigError as e:
            problems += e.problems
    raw, refused = [s for s in raw if s["name"] not in dropped], len(problems)
    for stage in raw:
        for role, parent in stage["inputs"].items():
            if parent in dropped:
                loc = dropped[parent]
                problems.append(Problem(loc, f"{render_loc(loc)}: drops stage {parent!r}, but {stage['name']}.inputs."
                                             f"{role} still names it; re-point it in the same variant, e.g. "
                                             f"'{stage['name']}.inputs.{role}: <another stage>'"))
    if not raw:
        loc = next(iter(dropped.values()))
        problems.append(Problem(loc, f"{render_loc(loc)}: drops every stage; keep at least one"))
    if len(problems) > refused:
        return None  # inputs left naming a dropped stage are the drop's problem, not their stage's
    try:
        parsed = parse_stages(raw)
    except ConfigError as e:
        problems += [_blame(p, raw, names, sources) for p in e.problems]
        return None
    if len(problems) > before:
        return None
    return [{"name": s.name, "kind": s.kind.value, "inputs": s.inputs, "spec": to_dict(s.spec), "queue": s.queue,
             "gpus": s.gpus} for s in parsed]


def _blame(problem: Problem, raw: list[dict[str, Any]], names: list[str],
           sources: list[tuple[str, Any, Loc]]) -> Problem:
    """A problem of the cell's stage list (`("stages", i, "spec", "noise", "recall")`) seen from the sweep document:
    at the grid value, variant key or seed that set that field (or a block around it), else in the base."""
    i, rest = problem.loc[1], problem.loc[2:]
    assert isinstance(i, int)  # parse_stages locates every problem in a stage
    name, fields = raw[i]["name"], rest[1:] if rest[:1] == ("spec",) else rest
    field = ".".join([name, *(str(p) for p in fields if not isinstance(p, int))])
    for path, value, loc in sources:
        if field == path or field.startswith(path + ".") or path.startswith(field + "."):
            if loc[0] == "grid" and problem.value is None and value is not None:
                loc = loc[:2]  # a problem that names no value (an unknown field) is the axis's, not one value's
            label = render_loc(loc[:2] if loc[0] == "grid" else loc)  # a value's problem shows the value
            if render_loc((name, *fields)) == path and label.endswith(path) and problem.detail is not None:
                return Problem(loc, label + problem.detail, value, problem.detail)  # `grid.train.steps=0: ...`
            return Problem(loc, f"{label}: {problem.msg}", value)
    return Problem(("base", "stages", names.index(name), *rest), f"base: {problem.msg}", problem.value)


def stage_keys(stages: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Stage name -> what the stage computes, as 16 hex digits: the hash of its kind, resolved spec and its inputs'
    keys (not its name, nor where it runs). Stages of different cells with one key compute the same output, which
    `sgtm sweep --local` and the service both compute once per sweep."""
    keys: dict[str, str] = {}
    for stage in stages:
        inputs = {role: keys[parent] for role, parent in sorted(stage["inputs"].items())}
        keys[stage["name"]] = spec_hash({"kind": stage["kind"], "spec": stage["spec"], "inputs": inputs})[:16]
    return keys


def _identity(stage: dict[str, Any]) -> dict[str, Any]:
    """What a cell's pipeline is, for its hash: where it runs (queue, gpus) is not part of it."""
    return {"name": stage["name"], "kind": stage["kind"], "inputs": dict(sorted(stage["inputs"].items())),
            "spec": stage["spec"]}


def cell_label(cell: Cell) -> str:
    """A short human label: `(variant=sgtm, train.noise.recall=0.5, seed=1)`."""
    parts = [f"variant={cell.variant}"] if cell.variant is not None else []
    parts += [f"{k}={v!r}" for k, v in cell.params.items()]
    parts += [f"seed={cell.seed}"] if cell.seed is not None else []
    return "(" + ", ".join(parts) + ")"
