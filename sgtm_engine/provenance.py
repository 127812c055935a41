"""Which code produced a run: one `code_version` string, recorded alike in `result.json`, the ledger and MLflow, and
the versions of the libraries beside it (`library_versions`).

Stdlib-only, so the torch-free worker parent stamps its MLflow runs with the same function the engine child uses for
`result.json` (two formats for one run would make the two records disagree).

Choices made here, in order of precedence:
- `SGTM_CODE_VERSION` when set: images are built without `.git`, so the build passes the commit in.
- In a git checkout: the full commit, plus `-dirty-<12 hex of a sha256>` of `git diff HEAD -- sgtm_engine` and of the
  engine's untracked files (names and contents; git-ignored ones aside) when there are any: results depend on the
  engine's code, and an edited README does not change them.
- Outside git: `sgtm-<installed package version>`, else `unknown`.
- At most 64 characters (the ledger's column); a full commit with its dirty suffix is 59.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MAX_LENGTH = 64
_ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """`$SGTM_CODE_VERSION`, else `<git commit>[-dirty-<diff hash>]`, else `sgtm-<package version>`, else `unknown`."""
    explicit = os.environ.get("SGTM_CODE_VERSION")
    if explicit:
        return explicit[:MAX_LENGTH]
    return (_git_version() or _package_version())[:MAX_LENGTH]


def _git_version() -> str | None:
    # Only our own checkout counts: an installed copy inside some other repository must not report that one's commit.
    if not (_ROOT / ".git").exists():
        return None
    try:
        sha = _git("rev-parse", "HEAD").decode().strip()
        diff = _git("diff", "HEAD", "--", "sgtm_engine")
        # a new module that is not committed yet changes results as much as an edit does (ignored files do not count)
        new = sorted(_git("ls-files", "--others", "--exclude-standard", "-z", "--", "sgtm_engine").split(b"\0"))
        changes = diff + b"".join(b"\0" + name + b"\0" + (_ROOT / name.decode()).read_bytes() for name in new if name)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + (f"-dirty-{hashlib.sha256(changes).hexdigest()[:12]}" if changes else "")


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, timeout=5, check=True).stdout


def _package_version() -> str:
    installed = installed_version("sgtm")
    return f"sgtm-{installed}" if installed else "unknown"


#: The libraries besides torch whose versions a stage's outputs depend on: tokenizers trains the BPE vocabulary and
#: numpy stores the tokenized corpora; transformers and safetensors load, convert and write models.
_LIBRARIES = ("transformers", "tokenizers", "numpy", "safetensors")


def library_versions() -> dict[str, str | None]:
    """The Python version and the installed version of each of `_LIBRARIES` (None where one is missing)."""
    return {"python": platform.python_version(), **{name: installed_version(name) for name in _LIBRARIES}}


def installed_version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
