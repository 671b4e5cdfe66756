"""Print a pip constraints file of the versions installed in this environment for
cl-runner[dev] and everything it pulls in (the packages the test suite ran with).

    python scripts/freeze_constraints.py > constraints.txt      # or: make constraints

Only the dependency closure of cl-runner[dev] is listed (not whatever else sits in the
venv); pip, setuptools and wheel are left to the Makefile. A local version label is
dropped (torch 2.13.0+cpu -> torch==2.13.0), so a CUDA build of the same release
satisfies the line too. Every line carries a marker for this Python's minor version:
the pins were tested there, and on another Python (where some of them may not exist)
pip ignores them and pyproject's ranges apply.
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = "cl-runner"
EXTRAS = ("dev",)
LEFT_OUT = {"cl-runner", "pip", "setuptools", "wheel"}


def closure(name: str, extras: tuple[str, ...]) -> dict[str, str]:
    """{canonical name: installed version} of `name` and its requirements, recursively."""
    found: dict[str, str] = {}
    visited: dict[str, set[str]] = {}
    todo = [(name, set(extras))]
    while todo:
        current, wanted = todo.pop()
        try:
            dist = distribution(current)
        except PackageNotFoundError:
            continue  # an optional dependency that is not installed (e.g. peft)
        key = canonicalize_name(dist.metadata["Name"])
        seen = visited.get(key)
        if seen is not None and wanted <= seen:
            continue
        visited[key] = (seen or set()) | wanted
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    return found


def main() -> int:
    pins = closure(ROOT, EXTRAS)
    if canonicalize_name(ROOT) not in pins:
        print(f"{ROOT} is not installed in {sys.prefix}", file=sys.stderr)
        return 1
    print("# Versions the test suite last passed with (make install uses them; CONSTRAINTS= for the newest).")
    print("# Regenerate from a venv that passed: make constraints  (scripts/freeze_constraints.py).")
    print(f"# Tested on Python {sys.version.split()[0]}; on another Python the markers switch the pins off.")
    print("# torch is installed by the Makefile's TORCH_SPEC, whose default matches the torch line.")
    marker = f'python_version == "{sys.version_info.major}.{sys.version_info.minor}"'
    for key in sorted(pins):
        if key not in LEFT_OUT:
            print(f"{key}=={Version(pins[key]).public}; {marker}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
