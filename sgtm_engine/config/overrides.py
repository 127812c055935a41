"""Overrides: the one deep merge and the one way a dotted path (`optim.lr`, `train.model`) sets a value.

Semantics (as OmegaConf users expect):
- `a.b.c=v` sets field c of block a.b, creating the blocks on the way.
- A mapping value merges into the mapping already there: `train.model={n_layer: 2}` keeps `context` and every other
  model field; any other value (a list, a number, null) replaces what was there.
Turning `--set` text into values (`1e-3` is a float) is YAML's job: `sgtm_engine.yamlio.parse_sets`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from sgtm_engine.config.convert import from_dict
from sgtm_engine.errors import ConfigError, Problem

T = TypeVar("T")


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: `extra` merged into `base`, mappings recursively, everything else replaced (deep copies)."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(data: dict[str, Any], path: str | Iterable[str], value: Any) -> None:
    """Set `value` at a dotted path inside `data` (in place), merging a mapping into the mapping already there."""
    *parents, leaf = path.split(".") if isinstance(path, str) else list(path)
    node = data
    for i, key in enumerate(parents):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[:i + 1])
            raise ConfigError(Problem.at(tuple(parents[:i + 1]), f"is a value, not a block: set '{where}' itself, "
                                                                 "not a field below it", child))
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(leaf), Mapping):
        node[leaf] = merge(node[leaf], value)
    else:
        node[leaf] = copy.deepcopy(value)


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `data` with every dotted-path override applied in order; every problem at once."""
    out = copy.deepcopy(dict(data))
    problems: list[Problem] = []
    for path, value in overrides.items():
        try:
            set_path(out, path, value)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return out


def with_overrides(cls: type[T], data: Mapping[str, Any], overrides: Mapping[str, Any]) -> T:
    """Apply dotted-path overrides (`optim.lr=3e-4`) to plain data, then build and validate the spec."""
    return from_dict(cls, apply_overrides(data, overrides))
