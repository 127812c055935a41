"""Turn a REST stage spec into the engine's typed spec, or into 422 problems that name the field, value and fix.

Choices made here:
- The engine's `from_dict` is the validator (one schema for CLI, YAML and REST); its problems, located by field
  path, are placed under the spec's location in the body (`("body", "spec", "model", "n_layer")`).
- Before that, every string in the spec must look like a registry name, an enum value, a category name or a parameter
  pattern: letters (any script), digits, spaces and `_ . + - * , ' ( ) & [ ]` only; no `/`, `\\`, `:`, `;`, `$`,
  quotes other than `'`, or `..`. Category names have spaces and commas ('Geografía, historia', 'Biology and health
  sciences') and RMU selects parameters by glob ('transformer.h.*.mlp.c_fc.weight'); the API still never accepts a
  path, a URL or a shell command in any spec field, present or future.
- Non-finite numbers are refused (JSON has none; PostgreSQL's json type rejects them).
- Corpus names are checked against the engine's built-in corpora (`config.BUILTIN_CORPORA`): a job runs in a fresh
  engine process, which knows no others, so a typo is a 422 at the door, not a failure when the job runs.
- The stored spec is the canonical one (defaults filled in), and its hash is the engine's `spec_hash`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from api.errors import InvalidRequest, Problem
from sgtm_engine.config import STAGE_SPECS, StageKind, from_dict, method_name, spec_hash, to_dict, unknown_corpora
from sgtm_engine.errors import ConfigError

SAFE_STRING = re.compile(r"^(?! )[\w .+*,'()&\[\]-]{1,128}(?<! )$")  # \w: letters and digits of any script, and _
MAX_SPEC_BYTES = 64 * 1024

@dataclasses.dataclass(frozen=True)
class ValidSpec:
    spec: dict[str, Any]
    """Canonical JSON of the spec, every default filled in."""
    hash: str
    method: str | None
    """The localization method a train spec names; None for stages that inherit it from their parent."""
    seed: int | None
    wants_cpu: bool


def validate(kind: StageKind, data: dict[str, Any], loc: tuple[str | int, ...]) -> ValidSpec:
    """Validate `data` as the spec of `kind`; raises `InvalidRequest` with every problem, located under `loc`."""
    problems = list(_unsafe_values(data, loc))
    if len(json.dumps(data, default=str)) > MAX_SPEC_BYTES:
        problems.append(Problem(loc, f"spec is larger than {MAX_SPEC_BYTES} bytes of JSON; send only the fields "
                                     "that differ from the defaults"))
    cls = STAGE_SPECS.get(kind)
    if cls is None:
        available = sorted(k.value for k in STAGE_SPECS)
        problems.append(Problem(loc[:-1] + ("kind",), f"kind={kind.value!r}: this engine build has no "
                                                      f"'{kind.value}' stage yet; available kinds: {available}",
                                kind.value))
    if problems:
        raise InvalidRequest(problems)
    try:
        spec = from_dict(cls, data)
    except ConfigError as e:
        raise InvalidRequest([p.nested(loc, label="spec") for p in e.problems]) from None
    except (ArithmeticError, TypeError, ValueError, RecursionError) as e:
        # e.g. an integer too large for a float field; the engine's validator reports most things, not this
        message = f"spec: a value cannot be represented ({e.__class__.__name__}: {e})"
        raise InvalidRequest([Problem(loc, message)]) from None
    corpora = unknown_corpora(spec)  # the engine child knows only the built-in corpora
    if corpora:
        raise InvalidRequest([p.nested(loc, label="spec") for p in corpora])
    canonical = to_dict(spec)
    return ValidSpec(spec=canonical, hash=spec_hash(spec), method=_method(kind, spec), seed=_seed(canonical),
                     wants_cpu=(canonical.get("runtime") or {}).get("device") == "cpu")


def check_strings(value: Any, loc: tuple[str | int, ...]) -> list[Problem]:
    """Every string in `value` must be a registry name or enum value; every number finite (see the module doc)."""
    return _unsafe_values(value, loc)


def _unsafe_values(value: Any, loc: tuple[str | int, ...]) -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(value, str):
        if not SAFE_STRING.match(value) or ".." in value:
            where = ".".join(str(p) for p in loc[1:])
            problems.append(Problem(loc, f"{where}={value[:80]!r}: must be a registry name, enum value, category "
                                         "name or parameter pattern (letters, digits, spaces, _ . + - * , ' ( ) & "
                                         "[ ]); paths, URLs and commands are not accepted",
                                    value[:200]))
    elif isinstance(value, float) and not math.isfinite(value):
        problems.append(Problem(loc, f"{'.'.join(str(p) for p in loc[1:])}={value}: must be a finite number", value))
    elif isinstance(value, dict):
        for key, item in value.items():
            problems += _unsafe_values(item, loc + (str(key),))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problems += _unsafe_values(item, loc + (i,))
    return problems


def _method(kind: StageKind, spec: Any) -> str | None:
    """The tag that runs are compared by: a train spec's engine label (`config.method_name`); RMU is a
    method of its own; other stages inherit their parent's."""
    if kind == StageKind.RMU:
        return "rmu"
    return method_name(spec) if kind == StageKind.TRAIN else None


def _seed(spec: dict[str, Any]) -> int | None:
    seed = spec.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None
