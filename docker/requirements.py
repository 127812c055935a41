"""Print the pinned requirements of pyproject.toml's base dependencies plus the given extras, one per line.

The image installs these before copying the source, so a code edit rebuilds only the last, dependency-free layer
(torch is not downloaded again). Usage: python requirements.py pyproject.toml service report
"""

from __future__ import annotations

import sys
import tomllib


def main() -> None:
    path, *extras = sys.argv[1:]
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
