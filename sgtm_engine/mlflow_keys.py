"""MLflow keys from our names: one `metric_key` for metric and param keys, used by the tracker and by sweep reports;
the one tag and param scheme of a stage's run (`run_tags`, `spec_params`), used by `sgtm run`, local sweeps and
the service's supervisor alike, so a run reads the same whoever started it; and the evaluation's metric names as
tables show them (`VIEWS`, `headline_columns`: the end of `sgtm run`, `sgtm show` and sweep reports alike).

Stdlib-only, because `report.py` (imported by the API) and the worker parent must stay torch-free, and a sweep's
aggregates must be logged under the same keys as the runs it aggregates.

A key we log is ASCII letters, digits and `_-. /:` (MLflow's validator also takes non-ASCII word characters; ASCII
keys survive every store and URL), at most 250 characters, and left unchanged by `posixpath.normpath` (no empty, `.`
or `..` segment, no leading or trailing `/`), which MLflow requires. Category names are free text ("Geografía,
historia", "数学"), so:
- accents fold to their base letter (`Geografía` -> `Geografia`), so Latin-script keys stay readable;
- any other non-ASCII character becomes `u<hex code point>` (`数` -> `u6570`), so two CJK names never collide;
- any other character MLflow refuses (`,`, `'`, `(`) becomes `_`;
- empty, `.` and `..` path segments become `_`;
- a key over 250 characters keeps its head and ends in a hash of the whole name, so it stays unique.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

from sgtm_engine.config import Split, flat_params

#: The evaluation views, as the prefixes of their metric keys (`eval_ablated/forget/loss`), in the order a model goes
#: through them, and what a person calls each.
VIEWS = {"eval": "unablated", "eval_ablated": "ablated", "eval_calibrated": "calibrated"}
MAX_KEY_LENGTH = 250


def headline_columns(names: Iterable[str]) -> dict[str, str]:
    """Of one view's metric names (`forget/loss`, `capability/forget_cloze_acc`, ...), the headline ones in the order
    a table shows them, each with its column header: the split losses (`forget loss`), then the capability measures
    by name."""
    present = set(names)
    ordered = [f"{split}/loss" for split in Split] + sorted(n for n in present if n.startswith("capability/"))
    return {n: n.replace("/loss", " loss").removeprefix("capability/") for n in ordered if n in present}
_REFUSED = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_key(name: str) -> str:
    """The MLflow key for `name`: unchanged when MLflow accepts it, else folded as the module docstring says."""
    folded = "".join(_fold(ch) for ch in unicodedata.normalize("NFKD", name) if not unicodedata.combining(ch))
    key = "/".join("_" if part in ("", ".", "..") else part for part in _REFUSED.sub("_", folded).split("/"))
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        key = f"{key[:MAX_KEY_LENGTH - len(digest) - 1]}-{digest}"
    return key


def _fold(ch: str) -> str:
    return ch if ch.isascii() else f"u{ord(ch):04x}"


# ---------------------------------------------------------------------------------------------------------------------
# The run scheme

TAG_PREFIX = "sgtm."


def run_tags(*, kind: str | None = None, method: str | None = None, seed: int | str | None = None,
             recipe: str | None = None, spec_hash: str | None = None, code_version: str | None = None,
             stage: str | None = None
             ) -> dict[str, str]:
    """The tags of an sgtm MLflow run: `sgtm.kind` (a stage kind, or `pipeline` / `sweep` / `cell` for a parent),
    and for a stage run its method, seed, recipe (or pipeline) name, spec hash, code version and stage name.
    Values not known (None) are left out, so a later `set_tags` can add them."""
    values = {"kind": kind, "method": method, "seed": seed, "recipe": recipe, "spec_hash": spec_hash,
              "code_version": code_version, "stage": stage}
    return {f"{TAG_PREFIX}{key}": str(value) for key, value in values.items() if value is not None}


def spec_params(spec: dict[str, Any]) -> dict[str, str]:
    """A stage's spec as MLflow params (`spec.model.n_layer`, ...): logged on every stage run, by whoever opens it."""
    return flat_params(spec, "spec.")


def headline_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The stages' split-level numbers (`eval/forget/loss`, `eval_calibrated/retain/loss`, not per category or per
    step), under `<stage>/...`: what a recipe's or a pipeline's parent run shows in MLflow's run table."""
    splits = {split.value for split in Split}
    out = {}
    for stage, result in results.items():
        for key, value in (result.get("metrics") or {}).items():
            parts = key.split("/")
            if len(parts) == 3 and parts[1] in splits and isinstance(value, int | float):
                out[f"{stage}/{key}"] = float(value)
    return out
