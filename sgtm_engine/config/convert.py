"""Specs to and from plain data (YAML/JSON): `from_dict`, `to_dict`, the content hash and MLflow params.

Choices made here:
- `from_dict` reports every problem at once, each a `Problem` located by its field path (`("model", "n_layer")`).
- An unknown key is an error with a did-you-mean (`n_layr` -> `n_layer`); the field it was probably meant for, and
  every field whose value was refused, keeps its default and is marked suspect, so cross-field checks that read it are
  skipped (no false follow-on errors; see `checks.py`).
- Integral floats are accepted for integer fields (`2.0` -> 2) and integers for float fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import types
import typing
from typing import Any, TypeVar

from sgtm_engine.config.checks import suspect_fields
from sgtm_engine.errors import ConfigError, Loc, Problem

T = TypeVar("T")
_PLAIN: dict[Any, str] = {bool: "expected true or false", str: "expected a string"}


def from_dict(cls: type[T], data: Any, loc: Loc = ()) -> T:
    """Build a spec from plain data, reporting every problem at once; `loc` locates `data` in a larger document."""
    problems: list[Problem] = []
    value = _convert(cls, data, tuple(loc), problems)
    if problems:
        raise ConfigError(problems)
    return typing.cast(T, value)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str | None:
    """The closest of `choices` to a mistyped `word`, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.7)  # 0.6 pairs nope with noise
    return close[0] if close else None


def unknown_key(loc: Loc, key: str, choices: typing.Iterable[str], owner: str) -> Problem:
    """The one wording of 'not a field here': a did-you-mean when one is close, else the known names."""
    choices = sorted(choices)
    guess = did_you_mean(key, choices)
    hint = f"did you mean {guess!r}?" if guess else f"known fields: {choices}" if choices else "it has none"
    return Problem.at(tuple(loc) + (key,), f"unknown field of {owner}; {hint}")


def unknown_choice(loc: Loc, value: Any, choices: typing.Iterable[Any]) -> Problem:
    """The one wording of 'not one of the allowed values': the values, and a did-you-mean when one is close."""
    values = list(choices)
    guess = did_you_mean(value, [str(v) for v in values]) if isinstance(value, str) else None
    return Problem.at(loc, f"must be one of {values}" + (f"; did you mean {guess!r}?" if guess else ""), value)


def _convert(tp: Any, data: Any, loc: Loc, problems: list[Problem]) -> Any:
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, data, loc, problems)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], data, loc, problems)
        problems.append(Problem.at(loc, f"unsupported union type {tp}"))
        return None
    if origin is tuple:
        return _convert_tuple(tp, data, loc, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            problems.append(unknown_choice(loc, data, [m.value for m in tp]))
            return None
    if tp in _PLAIN:  # taken as they are: no bool is read from 0/1, no string from a number
        if not isinstance(data, tp):
            problems.append(Problem.at(loc, _PLAIN[tp], data))
        return data
    if tp is int:
        if isinstance(data, float) and data.is_integer():
            return int(data)
        if isinstance(data, bool) or not isinstance(data, int):
            problems.append(Problem.at(loc, "expected an integer", data))
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            problems.append(Problem.at(loc, "expected a number", data))
            return data
        try:
            return float(data)
        except OverflowError:
            problems.append(Problem.at(loc, "too large for a float", data))
            return data
    if tp is Any:
        return data
    problems.append(Problem.at(loc, f"unsupported field type {tp}"))
    return None


def _convert_tuple(tp: Any, data: Any, loc: Loc, problems: list[Problem]) -> Any:
    args = typing.get_args(tp)
    if not isinstance(data, (list, tuple)):
        problems.append(Problem.at(loc, "expected a list", data))
        return None
    item_types = [args[0]] * len(data) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(item_types) != len(data):
        problems.append(Problem.at(loc, f"expected {len(item_types)} items", list(data)))
        return None
    return tuple(_convert(t, d, loc + (i,), problems) for i, (t, d) in enumerate(zip(item_types, data, strict=True)))


def _convert_dataclass(cls: Any, data: Any, loc: Loc, problems: list[Problem]) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        problems.append(Problem.at(loc, f"expected a mapping of {cls.__name__} fields", data))
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    suspect: set[str] = set()
    failed = False
    for key in data:
        if key not in names:
            problems.append(unknown_key(loc, str(key), names, cls.__name__))
            guess = did_you_mean(str(key), names)
            suspect |= {guess} if guess else set()
            failed = True
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        before = len(problems)
        value = _convert(hints[name], data[name], loc + (name,), problems)
        if len(problems) == before:
            kwargs[name] = value
        else:
            suspect.add(name)  # keeps its default, so the other fields are still checked
            failed = True
    try:
        with suspect_fields(cls, suspect):
            built = cls(**kwargs)
    except ConfigError as e:
        problems.extend(p.nested(loc) for p in e.problems)
        return None
    return None if failed else built


def to_dict(spec: Any) -> Any:
    """Plain JSON-able data from a spec (enums as their values, tuples as lists)."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return {f.name: to_dict(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    if isinstance(spec, enum.Enum):
        return spec.value
    if isinstance(spec, (list, tuple)):
        return [to_dict(x) for x in spec]
    if isinstance(spec, dict):
        return {k: to_dict(v) for k, v in spec.items()}
    return spec


def spec_hash(spec: Any) -> str:
    """A stable content hash of a spec (sha256 of its canonical JSON), used to dedupe jobs and sweep cells."""
    blob = json.dumps(to_dict(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'model': {'n_layer': 2}} -> {'model.n_layer': '2'}; lists as JSON, everything else `str()`.

    The one rendering of a spec as MLflow params, shared by the engine's tracker and the service's supervisor:
    both log the spec into the same run, and MLflow accepts a param logged twice only if the value is identical.
    """
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out
