"""Print the dependencies pyproject.toml declares (and those of the extras named), one a line.

The Dockerfile installs them before it copies the source, so the dependency layer is rebuilt only
when pyproject.toml changes: ``python scripts/pyproject-deps.py [EXTRA ...] > requirements.txt``.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def dependencies(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found.extend(project["optional-dependencies"][extra])
    return found


if __name__ == "__main__":
    print("\n".join(dependencies(Path("pyproject.toml"), sys.argv[1:])))
