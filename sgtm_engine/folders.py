"""Run folders on disk: making one, and writing a JSON record into it so that readers never see half of it.

Stdlib only: the service's client, API and worker parent use these too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sgtm_engine.errors import ConfigError


def make_folder(path: Path, field: str = "workdir") -> Path:
    """`path` as a folder, created with its parents when missing; a ConfigError naming `field` when it cannot be one
    (a file of that name, a parent that is a file, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{field}={str(path)!r}: a file, not a folder; name a folder (created when missing)"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{field}={str(path)!r}: cannot create the folder ({exc.strerror}); name another") from exc
    return path


def write_json(path: Path, payload: Any) -> None:
    """Atomically: readers see the old file or the whole new one. The temporary file is this process's own, so
    torchrun's ranks recording the same error at once do not rename each other's."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str, sort_keys=True))
    tmp.replace(path)
