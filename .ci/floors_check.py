"""Checks for the floors job (.ci/floors).

``--pins``: every dependency of ``pyproject.toml`` has a floor (``>=X``) and ``.ci/floors-constraints.txt`` pins
exactly that version (``==X``), and pins nothing else. ``--installed``: the environment holds exactly the pinned
versions. Exits 1 with one line per problem.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / ".ci" / "floors-constraints.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(a: str | None, b: str | None) -> bool:
    """``2.4`` equals ``2.4.0`` (trailing zero components do not count); a local tag (``+cpu``) is ignored."""
    def key(v: str) -> list[str]:
        parts = v.split("+")[0].split(".")
        while len(parts) > 1 and parts[-1] == "0":
            parts.pop()
        return parts

    return a is not None and b is not None and key(a) == key(b)


def floors() -> dict[str, str]:
    """Package -> the version after ``>=`` in ``pyproject.toml``'s dependencies ('' when there is none)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
        floor = re.search(r">=\s*([0-9][^,;\s]*)", dep)
        out[canonical(name)] = floor.group(1) if floor else ""
    return out


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            out[canonical(name.strip())] = pinned.strip()
    return out


def main(what: str) -> int:
    problems = []
    declared, pinned = floors(), pins()
    if what == "--pins":
        for name, floor in declared.items():
            if not floor:
                problems.append(f"{name} has no floor (>=) in pyproject.toml")
            elif not same_version(pinned.get(name), floor):
                problems.append(f"{name}: pyproject.toml floor {floor}, {CONSTRAINTS.name} pins {pinned.get(name)}")
        problems += [f"{CONSTRAINTS.name} pins {name}, which pyproject.toml does not depend on"
                     for name in pinned if name not in declared]
    elif what == "--installed":
        for name, pin in pinned.items():
            try:
                found = version(name)
            except PackageNotFoundError:
                found = "(not installed)"
            if not same_version(found, pin):
                problems.append(f"{name}: installed {found}, pinned {pin}")
        if not problems:
            print("floors installed: " + ", ".join(f"{name}=={pin}" for name, pin in pinned.items()))
    else:
        problems.append(f"usage: {sys.argv[0]} --pins | --installed")
    for problem in problems:
        print(f"floors: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
