"""How a spec checks itself: one `Checks` collector per `__post_init__`, so every spec reports every problem at once
and every bound reads the same way (`n_layer=0: must be >= 1`).

Choices made here:
- Bounds go through `Checks.bound` only: one place turns ge/gt/le/lt into a message, refuses NaN and infinities,
  and says "or null" for optional fields.
- Cross-field checks (`Checks.require`) name the fields they read. When `from_dict` builds a spec whose input had a
  problem in one of those fields (a typo'd key, a bad value, a broken sub-spec), that field holds its default, not
  what the user meant; a check reading it would report a false follow-on error, so it is skipped. Direct
  construction checks everything.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator
from typing import Any

from sgtm_engine.errors import NO_VALUE, ConfigError, Problem

FORBID_EXTRA = {"extra": "forbid", "use_attribute_docstrings": True}
"""`__pydantic_config__` of every spec (a plain dict: no pydantic here): pydantic's TypeAdapter refuses unknown keys,
and the JSON schema it draws for the API's OpenAPI takes each field's description from its attribute docstring."""

_SUSPECT: contextvars.ContextVar[tuple[type, frozenset[str]] | None] = contextvars.ContextVar("suspect_fields",
                                                                                              default=None)


@contextlib.contextmanager
def suspect_fields(cls: type, names: set[str]) -> Iterator[None]:
    """While building one `cls`: these fields did not take the value the input meant (see the module doc). Keyed by
    class, so the default sub-specs built inside `cls.__init__` check themselves in full."""
    token = _SUSPECT.set((cls, frozenset(names)))
    try:
        yield
    finally:
        _SUSPECT.reset(token)


class Checks:
    """The problems of one spec; `done()` raises them all as one `ConfigError`."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.problems: list[Problem] = []
        building = _SUSPECT.get()
        self._suspect = building[1] if building is not None and building[0] is type(spec) else frozenset()

    def bound(self, *names: str, ge: float | None = None, gt: float | None = None, le: float | None = None,
              lt: float | None = None, nullable: bool = False, kind: str = "", fix: str = "") -> None:
        """Each named field (each item of a tuple field) lies within the bounds and is finite; with `nullable`, None
        passes too.

        `kind` names what the number is ("a probability": `must be a probability in [0, 1]`); `fix` is appended.
        """
        for name in names:
            value = getattr(self.spec, name)
            if value is None and nullable:
                continue
            items = value if isinstance(value, tuple) else (value,)  # a tuple: every item (AdamW's betas)
            if not all(_within(v, ge, gt, le, lt) for v in items):
                self.problems.append(Problem.at((name,), _describe(ge, gt, le, lt, nullable, kind) + fix, value))

    def require(self, ok: bool, name: str | tuple[str, ...], what: str, *, reads: tuple[str, ...] = (),
                value: Any = NO_VALUE, show_value: bool = True) -> None:
        """A check on field `name` (or a path below it) that also reads the fields `reads`; skipped when any of them
        is suspect. The message shows the field's value unless `value` or `show_value=False` says otherwise."""
        loc = name if isinstance(name, tuple) else (name,)
        if ok or self._suspect & {loc[0], *reads}:
            return
        if value is NO_VALUE and show_value:
            value = getattr(self.spec, loc[0]) if len(loc) == 1 else NO_VALUE
        self.problems.append(Problem.at(loc, what, value))

    def registered_name(self, name: str) -> None:
        """Field `name` is null or a model-registry name: letters, digits, `_`, `-` and `.`, at most 256."""
        value = getattr(self.spec, name)
        self.require(value is None or bool(_REGISTERED_NAME.fullmatch(value)), name,
                     "a registered model name is 1-256 letters, digits, '_', '-' or '.' (starting with a letter or "
                     "digit), or null to log the model without registering it")

    def extend(self, problems: list[Problem], *, reads: tuple[str, ...]) -> None:
        """Problems found by a sub-spec's own cross-checks (`MaskingSpec.problems_with(model)`)."""
        if not self._suspect & set(reads):
            self.problems += problems

    def done(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


_REGISTERED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}")


def _within(value: Any, ge: float | None, gt: float | None, le: float | None, lt: float | None) -> bool:
    finite = isinstance(value, int) or (value is not None and math.isfinite(value))  # ints: no float overflow
    return (finite and (ge is None or value >= ge) and (gt is None or value > gt)
            and (le is None or value <= le) and (lt is None or value < lt))


def _describe(ge: float | None, gt: float | None, le: float | None, lt: float | None, nullable: bool,
              kind: str) -> str:
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if low and high:
        text = f"must be {kind + ' ' if kind else ''}in {low}, {high}"
    elif low:
        text = f"must be {'>=' if ge is not None else '>'} {low[1:]}"
    elif high:
        text = f"must be {'<=' if le is not None else '<'} {high[:-1]}"
    else:
        text = "must be a finite number"
    return text + (" or null" if nullable else "")
