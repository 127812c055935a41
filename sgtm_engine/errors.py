"""The engine's small exception family, the one problem type (`Problem`, carried by `ConfigError`) and the exit
codes of `python -m sgtm_engine run-stage`.

Stdlib only: the API and the worker parent import this module to map a child's exit code to a job state without
importing torch. Retryable failures (infrastructure: a killed child, a lost worker) are told apart from final ones
(a bad spec, bad data, a diverged run) by these codes.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
from typing import Any

Loc = tuple[str | int, ...]

class _NoValue:
    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Any = _NoValue()
"""Marks a problem that has no offending value to show (an unknown key, a missing section)."""


def render_loc(loc: Loc) -> str:
    """('train', 'betas', 1) -> 'train.betas[1]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def is_huge_int(value: Any) -> bool:
    """An integer of over 16 digits: shown by its magnitude (`steps: 1e308` arrives as a 309-digit integer, and JSON
    readers lose integers' digits past 2**53 anyway)."""
    return isinstance(value, int) and not isinstance(value, bool) and not -10**16 < value < 10**16


def render_value(value: Any) -> str:
    """How a message shows a value, as the YAML or JSON that carried it spells it: `null`, `true`, `false` (not
    Python's None, True, False), enums by their value, tuples as lists, integers of over 16 digits in scientific
    notation (`steps: 1e308` arrives as a 309-digit integer), anything long cut to 80 characters."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if is_huge_int(value):
        return format(decimal.Decimal(value), ".3e")
    text = _literal(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _literal(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, enum.Enum):
        return repr(value.value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, a recipe, a sweep or a request body.

    `loc` is the path to the offending field (`("masking", "forget_mlp_dim")`, `("stages", 2, "kind")`); `msg` is the
    whole readable line, `"masking.forget_mlp_dim=-1: must be >= 0"`, so `str(problem)` needs nothing else; `value`
    is the offending value (None when there is none); `detail` is what the line says after its location
    (`"=-1: must be >= 0"`). Callers that nest a document inside another prefix both the location and the text with
    `nested`, and a caller that shows the problem at another place writes its label before `detail`, so nothing
    ever re-parses a message to find where it points.
    """

    loc: Loc
    msg: str
    value: Any = None
    detail: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.msg

    @classmethod
    def at(cls, loc: Loc, what: str, value: Any = NO_VALUE) -> Problem:
        """`Problem.at(("model", "n_layer"), "must be >= 1", 0)` reads `model.n_layer=0: must be >= 1`."""
        detail = f"{'' if value is NO_VALUE else f'={render_value(value)}'}: {what}"
        return cls(tuple(loc), render_loc(loc) + detail if loc else what, None if value is NO_VALUE else value,
                   detail if loc else None)

    def nested(self, prefix: Loc, label: str | None = None) -> Problem:
        """The same problem seen from a document that holds this one at `prefix` (label: how to write the prefix
        in the message; default its dotted path)."""
        label = render_loc(prefix) if label is None else label
        msg, detail = self.msg, self.detail
        if label and not self.loc:
            msg, detail = f"{label}: {self.msg}", f": {self.msg}"
        elif label:
            msg = f"{label}{'' if isinstance(self.loc[0], int) else '.'}{self.msg}"
        return Problem(tuple(prefix) + self.loc, msg, self.value, detail)


class SgtmError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1


class ConfigError(SgtmError, ValueError):
    """A spec is invalid. `problems` lists every problem found (`Problem`), each naming the field, the value and the
    fix; a plain string becomes a problem without a location."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | list[str] | list[Problem | str] | Problem | str):
        items = [problems] if isinstance(problems, (str, Problem)) else list(problems)
        self.problems: list[Problem] = [p if isinstance(p, Problem) else Problem((), p) for p in items]
        super().__init__("; ".join(p.msg for p in self.problems))

    def report(self) -> str:
        """What a command line prints: one line for one problem, else one line per problem under a heading."""
        if len(self.problems) == 1:
            return f"invalid configuration: {self.problems[0]}"
        return "\n".join(["invalid configuration:", *(f"  - {p}" for p in self.problems)])


class FolderInUse(SgtmError):
    """Another process is running in the run or stage folder asked for; it is left alone (retrying later can help)."""


class DataError(SgtmError):
    """A data set is missing, corrupt (checksum mismatch) or cannot serve the requested split."""

    exit_code = 3


class TrainingDiverged(SgtmError):
    """The loss became non-finite; the run stops instead of writing a poisoned checkpoint."""

    exit_code = 4


class Cancelled(SgtmError):
    """A stop was requested (SIGTERM or a cancel flag); the stage checkpointed and stopped at a step boundary."""

    exit_code = 5


EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = ConfigError.exit_code
EXIT_DATA = DataError.exit_code
EXIT_DIVERGED = TrainingDiverged.exit_code
EXIT_CANCELLED = Cancelled.exit_code

#: Exit codes after which running the same spec again cannot help.
FINAL_FAILURE_CODES = frozenset({EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED})

EXIT_CODE_NAMES = {
    EXIT_OK: "ok",
    EXIT_UNEXPECTED: "unexpected_error",
    EXIT_CONFIG: "config_error",
    EXIT_DATA: "data_error",
    EXIT_DIVERGED: "training_diverged",
    EXIT_CANCELLED: "cancelled",
}
