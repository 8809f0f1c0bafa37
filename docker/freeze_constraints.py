"""Write pip constraints for one extra of jlad from the versions installed here.

The images install exactly the versions the tests ran against: run this in the project's
virtualenv after changing dependencies, and commit the result.

    .venv/bin/python docker/freeze_constraints.py serve > docker/constraints-serve.txt
    .venv/bin/python docker/freeze_constraints.py train > docker/constraints-train.txt

Requirements that are not installed here (optional speed-ups such as uvloop) are left
unpinned and listed on stderr.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

from packaging.requirements import Requirement

# Packaging tools are the base image's business, and jlad is the wheel being installed.
NEVER_PINNED = frozenset({"jlad", "pip", "setuptools", "wheel"})


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path, extra: str) -> list[Requirement]:
    """jlad's base dependencies plus one extra, read from pyproject.toml (the installed
    metadata of an editable install lags behind edits of the file)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def installed_closure(roots: list[Requirement], missing: set[str]) -> dict[str, str]:
    """Installed version of every distribution the `roots` need, transitively."""
    pins: dict[str, str] = {}
    pending = [(root.name, tuple(sorted(root.extras))) for root in roots]
    visited: set[tuple[str, tuple[str, ...]]] = set()
    while pending:
        dist, dist_extras = pending.pop()
        if (canonical_name(dist), dist_extras) in visited:
            continue
        visited.add((canonical_name(dist), dist_extras))
        try:
            pins[canonical_name(dist)] = version(dist)
        except PackageNotFoundError:
            missing.add(canonical_name(dist))
            continue
        for line in requires(dist) or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in dist_extras] or [{"extra": ""}]
            if requirement.marker and not any(
                requirement.marker.evaluate(env) for env in environments
            ):
                continue
            pending.append((requirement.name, tuple(sorted(requirement.extras))))
    return pins


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    missing: set[str] = set()
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    pins = installed_closure(project_requirements(pyproject, argv[1]), missing)
    print(f"# pip constraints for jlad[{argv[1]}]: written by docker/freeze_constraints.py")
    for name in sorted(pins):
        if name not in NEVER_PINNED:
            # A local label (torch's +cpu) is the index's business, not the version's.
            print(f"{name}=={pins[name].split('+')[0]}")
    if missing - NEVER_PINNED:
        print(f"not installed here, left unpinned: {sorted(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
