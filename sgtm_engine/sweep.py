"""Sweeps: one base pipeline, named variants, a grid of overrides and a list of seeds, expanded into cells.

```yaml
kind: sweep
name: cpu-undiscovered-rate
experiment: sweeps                  # optional MLflow experiment
base:                               # a pipeline recipe: the `stages` list `sgtm run` / POST /pipelines accept
  stages:
    - {name: train, kind: train, spec: {...}}
    - {name: ablate, kind: ablate, inputs: {model: train}, spec: {...}}
    - {name: evaluate, kind: evaluate, inputs: {model: ablate}, spec: {...}}
variants:                           # optional named bundles of overrides: the "variant" axis (e.g. the method)
  sgtm: {train.masking.strategy: sgtm, train.noise.retain_retain_frac: 0.25}
  recall_filter: {train.masking.strategy: none, train.filter.kind: weak,
                  ablate: null, evaluate.inputs.model: train}
grid:                               # optional axes: "<stage>.<field path>" -> values (cartesian product)
  train.noise.recall: [1.0, 0.99, 0.95, 0.8, 0.5]
seeds: [0, 1, 2]                    # optional
seed_paths: [train.seed, train.noise.seed]   # optional; the default is explained below
```

Cells = variants × product(grid axes) × seeds, in that order (variants in file order, grid axes in file order with
the last axis varying fastest, seeds last): the order is deterministic, so cell positions are stable.

Override paths (in variants and grid axes):
- `<stage>.<field>[.<field>…]` sets a field of that stage's spec (`train.noise.recall`). A mapping value is merged
  into the mapping already there (`train.model: {n_layer: 2}` keeps the other model fields).
- `<stage>.inputs.<name>` re-points an input of that stage to another stage (`evaluate.inputs.model: train`).
- `<stage>: null` (variants only) removes the stage from the cell; every input that named it must be re-pointed in
  the same variant, else the sweep is rejected.
- A path may be set by one source only: a variant key and a grid axis (or a seed path) on the same field conflict.

Seeds: a cell's seed is written to every path of `seed_paths`. By default those are `<stage>.seed` of every stage
whose spec has a top-level `seed` field (train, attack, rmu) plus `<stage>.noise.seed` of train stages (the label
noise draw). Without `seeds`, cells keep the base's seeds and their `seed` is None.

A cell's id is the `spec_hash` of its resolved pipeline (stage names, kinds, inputs, canonical specs with every default
filled in) and its seed: two sweeps that share a cell share its id, which is how the service dedupes reruns. Two cells
of one sweep that resolve to the same pipeline are an error (a variant or axis value that changes nothing).

Choices made here: stdlib only (the API imports this module); every problem is reported at once as a `Problem`
with a location (`("grid", "train.noise.recall", 3)`), and a message naming the field, the value and the fix. Cross-cell
pipelines (one cell's stage feeding another cell) are not supported: an attack's baseline is given as
`reference_forget_loss`, or runs as its own sweep.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import typing
from collections.abc import Iterable
from typing import Any

from sgtm_engine.config import (
    STAGE_NAME_PATTERN,
    STAGE_SPECS,
    StageKind,
    apply_stage_overrides,
    did_you_mean,
    from_dict,
    parse_stages,
    set_path,
    spec_hash,
    to_dict,
)
from sgtm_engine.errors import ConfigError, Problem

TOP_KEYS = ("kind", "name", "description", "experiment", "base", "variants", "grid", "seeds", "seed_paths")
NAME = re.compile(STAGE_NAME_PATTERN)
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
MAX_CELLS = 2000

Loc = tuple[str | int, ...]


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
class Sweep:
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
        else:
            staged[key] = value
    if staged:
        base = data.get("base") if isinstance(data.get("base"), dict) else {}
        data["base"] = {**base, "stages": apply_stage_overrides(base.get("stages"), staged)}
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Parse


def parse_sweep(data: Any, *, max_cells: int = MAX_CELLS) -> Sweep:
    """Validate a sweep document and expand it into cells. Raises `SweepError` listing every problem."""
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise SweepError([Problem((), f"sweep={_short(data)}: expected a mapping with 'base', 'grid', 'seeds'")])
    for key in data:
        if key not in TOP_KEYS:
            problems.append(Problem((str(key),), f"{key}: unknown key of a sweep; allowed: {list(TOP_KEYS)}",
                                    key))
    if data.get("kind", "sweep") != "sweep":
        problems.append(Problem(("kind",), f"kind={data['kind']!r}: a sweep document has kind 'sweep'",
                                data["kind"]))
    name = data.get("name", "sweep")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append(Problem(("name",), f"name={_short(name)}: use 1-32 characters: lowercase letters, "
                                           "digits, '_' or '-', starting with a letter", name))
    experiment = data.get("experiment")
    if experiment is not None and (not isinstance(experiment, str) or not VARIANT_NAME.match(experiment)):
        problems.append(Problem(("experiment",), f"experiment={_short(experiment)}: a registry-style name "
                                                 "(letters, digits, '_', '-', '.', '+')", experiment))
    stages = _parse_base(data.get("base"), problems)
    variants = _parse_variants(data.get("variants"), stages, problems)
    grid = _parse_grid(data.get("grid"), stages, problems)
    seeds = _parse_seeds(data.get("seeds"), problems)
    seed_paths = _parse_seed_paths(data.get("seed_paths"), stages, seeds, problems)
    if stages is None:
        raise SweepError(problems)
    before = len(problems)
    _check_conflicts(variants, grid, seed_paths, problems)
    n = max(len(variants), 1) * _product_size(grid) * max(len(seeds), 1)
    if n > max_cells:
        problems.append(Problem((), f"the sweep has {n} cells; at most {max_cells} per sweep: split it, or drop "
                                    "axis values", n))
    cells: list[Cell] = []
    if len(problems) == before:  # conflicts and size checked; bad paths were left out of the axes, so go on
        cells = _expand(stages, variants, grid, seeds, seed_paths, problems)
    if problems:
        raise SweepError(_unique(problems))
    return Sweep(name=name, experiment=experiment, variants=variants, grid=grid, seeds=seeds, seed_paths=seed_paths,
                 cells=cells)


def _parse_base(base: Any, problems: list[Problem]) -> list[dict[str, Any]] | None:
    if not isinstance(base, dict) or not isinstance(base.get("stages"), list) or not base["stages"]:
        problems.append(Problem(("base",), f"base={_short(base)}: needs a non-empty 'stages' list (a pipeline "
                                           "recipe: [{name, kind, spec, inputs}])", base))
        return None
    for key in base:
        if key not in ("stages", "name", "description"):
            problems.append(Problem(("base", str(key)), f"base.{key}: unknown key; the base holds 'stages'", key))
    try:  # the one stage-list parser; specs are validated per cell, after the overrides
        parsed = parse_stages(base["stages"], validate_specs=False)
    except ConfigError as e:
        problems += [p.nested(("base",)) for p in e.problems]
        return None
    return [{"name": s.name, "kind": s.kind, "spec": copy.deepcopy(s.spec), "inputs": dict(s.inputs),
             "queue": s.queue, "gpus": s.gpus} for s in parsed]


def _parse_variants(raw: Any, stages: list[dict[str, Any]] | None,
                    problems: list[Problem]) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem(("variants",), f"variants={_short(raw)}: expected a mapping "
                                               "{name: {dotted path: value}}", raw))
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, overrides in raw.items():
        loc: Loc = ("variants", str(name))
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            problems.append(Problem(loc, f"variants.{name}: a variant name uses letters, digits, '_', '-', '.', "
                                         "'+' (at most 64)", name))
            continue
        if overrides is None:
            overrides = {}  # a variant that is the base as is
        if not isinstance(overrides, dict):
            problems.append(Problem(loc, f"variants.{name}={_short(overrides)}: expected a mapping "
                                         "{dotted path: value}", overrides))
            continue
        kept = {}
        for path, value in overrides.items():
            where = f"variants.{name}.{path}"
            if stages is not None and _check_path(path, stages, loc + (str(path),), where, problems,
                                                  allow_drop=value is None):
                kept[path] = value
        out[name] = kept
    return out


def _parse_grid(raw: Any, stages: list[dict[str, Any]] | None, problems: list[Problem]) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(Problem(("grid",), f"grid={_short(raw)}: expected a mapping {{dotted path: [values]}}",
                                raw))
        return {}
    out: dict[str, list[Any]] = {}
    for path, values in raw.items():
        loc: Loc = ("grid", str(path))
        if not isinstance(values, list) or not values:
            problems.append(Problem(loc, f"grid.{path}={_short(values)}: expected a non-empty list of values, "
                                         f"e.g. [1.0, 0.9]", values))
            continue
        keys = [_canonical_json(v) for v in values]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            problems.append(Problem(loc, f"grid.{path}: values {dupes} repeat; list each value once", values))
        elif stages is not None and _check_path(path, stages, loc, f"grid.{path}", problems, allow_drop=False):
            out[str(path)] = list(values)
    return out


def _parse_seeds(raw: Any, problems: list[Problem]) -> list[int]:
    if raw is None:
        return []
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in raw)):
        problems.append(Problem(("seeds",), f"seeds={_short(raw)}: expected a non-empty list of integers >= 0, "
                                            "e.g. [0, 1, 2]", raw))
        return []
    if len(set(raw)) != len(raw):
        problems.append(Problem(("seeds",), f"seeds={raw}: each seed once", raw))
    return list(dict.fromkeys(raw))


def _parse_seed_paths(raw: Any, stages: list[dict[str, Any]] | None, seeds: list[int],
                      problems: list[Problem]) -> list[str]:
    if raw is None:
        return default_seed_paths(stages or []) if seeds else []
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        problems.append(Problem(("seed_paths",), f"seed_paths={_short(raw)}: expected a list of dotted paths, "
                                                 "e.g. [train.seed, train.noise.seed]", raw))
        return []
    if not seeds:
        problems.append(Problem(("seed_paths",), "seed_paths: given without seeds; add 'seeds' or drop it", raw))
    return [path for i, path in enumerate(raw) if stages is not None
            and _check_path(path, stages, ("seed_paths", i), f"seed_paths[{i}]={path!r}", problems, allow_drop=False)]


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


def _check_path(path: Any, stages: list[dict[str, Any]], loc: Loc, where: str, problems: list[Problem],
                *, allow_drop: bool) -> bool:
    """The path names a stage of the base and, below it, `inputs.<name>` or a field of the stage's spec class.
    Returns whether it does (else a problem was added)."""
    names = {s["name"]: s for s in stages}
    if not isinstance(path, str) or not path:
        problems.append(Problem(loc, f"{where}: a path is text '<stage>.<field>', e.g. 'train.steps'", path))
        return False
    stage_name, _, rest = path.partition(".")
    stage = names.get(stage_name)
    if stage is None:
        guess = did_you_mean(stage_name, names)
        hint = f"did you mean {guess!r}?" if guess else f"the base has {sorted(names)}"
        problems.append(Problem(loc, f"{where}: no stage named {stage_name!r}; {hint}", path))
        return False
    if not rest:
        if not allow_drop:
            problems.append(Problem(loc, f"{where}: names a whole stage; set a field ('{stage_name}.steps'), or "
                                         f"drop the stage in a variant with '{stage_name}: null'", path))
        return allow_drop
    parts = rest.split(".")
    if parts[0] == "inputs":
        if len(parts) != 2:
            problems.append(Problem(loc, f"{where}: an input is set as '{stage_name}.inputs.<name>'", path))
        return len(parts) == 2
    tp: Any = STAGE_SPECS[StageKind(stage["kind"])]
    for i, part in enumerate(parts):
        tp = _dataclass_of(tp)
        if tp is None:
            done = ".".join(parts[:i])
            problems.append(Problem(loc, f"{where}: {stage_name}.{done} is a value, not a mapping; "
                                         f"set '{stage_name}.{done}' itself", path))
            return False
        hints = typing.get_type_hints(tp)
        fields = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in fields:
            prefix = ".".join([stage_name, *parts[:i]])
            guess = did_you_mean(part, fields)
            hint = f"did you mean {guess!r}?" if guess else f"known fields: {sorted(fields)}"
            problems.append(Problem(loc, f"{where}: {part!r} is not a field of {prefix} ({tp.__name__}); {hint}",
                                    path))
            return False
        tp = hints[part]
    return True


def _dataclass_of(tp: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]  # Optional[SomeSpec]
    return None


def _check_conflicts(variants: dict[str, dict[str, Any]], grid: dict[str, list[Any]], seed_paths: list[str],
                     problems: list[Problem]) -> None:
    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    for path in grid:
        for other in seed_paths:
            if overlaps(path, other):
                problems.append(Problem(("grid", path), f"grid.{path}: overlaps seed path {other!r}; seeds set "
                                                        "it (drop the axis, or set seed_paths)", path))
        for name, overrides in variants.items():
            for key in overrides:
                if overlaps(path, key):
                    problems.append(Problem(("variants", name, key), f"variants.{name}.{key}: also a grid axis "
                                            f"({path!r}); set it in one place only", key))
    for name, overrides in variants.items():
        for key, value in overrides.items():
            if "." not in key and value is None:  # drops a stage: its seeds no longer matter, nothing to clash
                continue
            for other in seed_paths:
                if overlaps(key, other):
                    problems.append(Problem(("variants", name, key), f"variants.{name}.{key}: overlaps seed path "
                                            f"{other!r}; seeds set it (drop it, or set seed_paths)", key))


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
                sources += [(p, seed, ("seeds", seeds.index(seed))) for p in seed_paths if seed is not None]
                resolved = _resolve(stages, sources, problems)
                if resolved is None:
                    continue
                cell_id = spec_hash({"stages": [_identity(s) for s in resolved], "seed": seed})
                params = {a: grid[a][i] for a, i in zip(axes, combo, strict=True)}
                label = _label(variant, params, seed)
                if cell_id in seen:
                    problems.append(Problem((), f"cells {seen[cell_id]} and {label} resolve to the same pipeline; "
                                                "a variant or grid value changes nothing: remove it", label))
                    continue
                seen[cell_id] = label
                cells.append(Cell(cell_id=cell_id, position=len(cells), variant=variant, params=params, seed=seed,
                                  stages=resolved))
    return cells


def _resolve(stages: list[dict[str, Any]], sources: list[tuple[str, Any, Loc]],
             problems: list[Problem]) -> list[dict[str, Any]] | None:
    """Apply the overrides to a copy of the base, drop stages, check inputs, validate every spec."""
    work = {s["name"]: copy.deepcopy(s) for s in stages}
    dropped: dict[str, Loc] = {}
    for path, value, loc in sources:
        stage_name, _, rest = path.partition(".")
        if not rest:
            dropped[stage_name] = loc
            continue
        parts = rest.split(".")
        if parts[0] == "inputs":
            work[stage_name]["inputs"][parts[1]] = value
            continue
        try:
            set_path(work[stage_name]["spec"], parts, value)
        except ConfigError as e:
            problems += [Problem(loc, f"{path}: {p.msg}", value) for p in e.problems]
            return None
    ok = True
    order = [s["name"] for s in stages if s["name"] not in dropped]
    if not order:
        loc = next(iter(dropped.values()))
        problems.append(Problem(loc, f"{loc[0]}.{loc[1]}: drops every stage; keep at least one", None))
        return None
    out: list[dict[str, Any]] = []
    for name in order:
        stage = work[name]
        for role, parent in stage["inputs"].items():
            if parent in dropped:
                loc = dropped[parent]
                problems.append(Problem(loc, f"{loc[0]}.{loc[1]}: drops stage {parent!r}, but "
                                             f"{name}.inputs.{role} still names it; re-point it in the same "
                                             f"variant, e.g. '{name}.inputs.{role}: <another stage>'", None))
                ok = False
            elif parent not in order[:order.index(name)]:
                src = _source_of(sources, f"{name}.inputs.{role}") or ("base",)
                problems.append(Problem(src, f"{name}.inputs.{role}={parent!r}: must name an earlier stage of "
                                             f"the cell; have {order[:order.index(name)]}", parent))
                ok = False
        try:
            spec = from_dict(STAGE_SPECS[stage["kind"]], stage["spec"])
        except ConfigError as e:
            for problem in e.problems:
                problems.append(_attribute(name, problem, sources, stages))
            ok = False
            continue
        stage["spec"] = to_dict(spec)
        stage["kind"] = StageKind(stage["kind"]).value
        out.append(stage)
    return out if ok else None


def _attribute(stage: str, problem: Problem, sources: list[tuple[str, Any, Loc]],
               stages: list[dict[str, Any]]) -> Problem:
    """Blame the override that set the field a problem names (grid value, variant key, seed); else the base."""
    field_path = ".".join([stage, *(str(p) for p in problem.loc if not isinstance(p, int))])
    for path, value, loc in sources:
        if field_path == path or field_path.startswith(path + ".") or path.startswith(field_path + "."):
            where = ".".join(str(p) for p in loc if not isinstance(p, int))
            index = next((f"[{p}]" for p in loc if isinstance(p, int)), "")
            return Problem(loc, f"{where}{index}: {stage}.{problem.msg}", value)
    i = next(i for i, s in enumerate(stages) if s["name"] == stage)
    return Problem(("base", "stages", i, "spec") + problem.loc, f"base: {stage}.{problem.msg}")


def _source_of(sources: list[tuple[str, Any, Loc]], path: str) -> Loc | None:
    return next((loc for p, _v, loc in sources if p == path), None)


def _identity(stage: dict[str, Any]) -> dict[str, Any]:
    """What a cell's pipeline is, for its hash: where it runs (queue, gpus) is not part of it."""
    return {"name": stage["name"], "kind": stage["kind"], "inputs": dict(sorted(stage["inputs"].items())),
            "spec": stage["spec"]}


def _label(variant: str | None, params: dict[str, Any], seed: int | None) -> str:
    parts = ([f"variant={variant}"] if variant is not None else []) + [f"{k}={v!r}" for k, v in params.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    return "(" + ", ".join(parts) + ")"


def _product_size(grid: dict[str, list[Any]]) -> int:
    n = 1
    for values in grid.values():
        n *= len(values)
    return n


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unique(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[Loc, str]] = set()
    out = []
    for p in problems:
        if (p.loc, p.msg) not in seen:
            seen.add((p.loc, p.msg))
            out.append(p)
    return out


def cell_label(cell: Cell) -> str:
    """A short human label: `(variant=sgtm, train.noise.recall=0.5, seed=1)`."""
    return _label(cell.variant, cell.params, cell.seed)
