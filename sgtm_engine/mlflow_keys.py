"""MLflow keys from our names: one `metric_key` for metric and param keys, used by the tracker and by sweep reports.

Stdlib-only, because `report.py` (imported by the API) must stay torch-free and must log a sweep's aggregates under
the same keys as the runs it aggregates.

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

MAX_KEY_LENGTH = 250
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
