"""YAML in and out: recipe and sweep files, `--set` values, and `--print-config`.

Choices made here:
- One loader for files and `--set` values: PyYAML's safe loader with YAML 1.2's number rule, as OmegaConf does.
  YAML 1.1 (PyYAML's default) reads `1e-3` as the string "1e-3" because its float needs a dot; here it is 0.001.
  Everything else is YAML 1.1 as people know it: `true`, `null`, `[1, 2]`, `{n_layer: 2}`, `1_000` = 1000.
- A syntax error is one line naming the file, line and column (`recipe.yaml:4:7: ...`), raised as a `ConfigError`:
  the CLI prints it without a traceback.
- `--set a.b=c` pairs become `{"a.b": value}`; applying them is `sgtm_engine.config` (`apply_overrides`, and
  `apply_stage_overrides` for recipes), the one implementation every command and the API share.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sgtm_engine.errors import ConfigError, Problem


class _Loader(yaml.SafeLoader):
    """The safe loader with YAML 1.2 floats (`1e-3`, `-2E5`; a dot is not required)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def loads(text: str, source: str = "<text>") -> Any:
    """Parse YAML text; a syntax error is one `ConfigError` line: `source:line:column: what is wrong`."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no Python objects from YAML
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise ConfigError(Problem.at((), f"{where}: invalid YAML: {what}")) from None
    except yaml.YAMLError as e:
        raise ConfigError(Problem.at((), f"{source}: invalid YAML: {e}")) from None


def load_file(path: str | Path) -> Any:
    """Read and parse a YAML file (errors name the file, line and column)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(Problem.at((), f"{path}: cannot read it ({e.strerror or e})")) from None
    return loads(text, str(path))


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`["train.optim.lr=1e-3", "train.model={n_layer: 2}"]` -> `{"train.optim.lr": 0.001, "train.model":
    {"n_layer": 2}}`; values are YAML (numbers, true/false, null, lists, flow mappings); `key=` is the empty
    string."""
    out: dict[str, Any] = {}
    problems: list[Problem] = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem.at(("--set",), "expected KEY=VALUE, e.g. train.steps=100", pair))
            continue
        try:
            out[key] = loads(raw, f"--set {key}") if raw.strip() else ""
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return out


def dump_yaml(data: Any) -> str:
    """Plain data (a resolved spec, recipe or sweep: `config.to_dict(...)`) as block YAML, keys in their order."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
