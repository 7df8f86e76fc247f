"""Run the kernel tests under the newest Triton release on PyPI, beside the pinned one.

`make test-triton-latest` (part of `make test`) runs `python -m tests.kernels.newest_triton
FOLDER [PYTEST_ARGS...]`. It asks PyPI for the newest triton at every run, so a release
that breaks the kernels fails CI the first time CI runs after it, not a user; installs that
wheel alone (`--no-deps`: triton needs nothing, and torch stays as it is) into FOLDER, again
only when the newest release changes; and runs `pytest tests/kernels` with FOLDER first on
PYTHONPATH, after checking that Python really imports triton from there. It prints a note
when the newest release lies outside the range pyproject.toml declares.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip"]


def newest_release() -> str:
    """The triton version pip would install here with no pin: PyPI's newest that has a wheel
    for this Python and platform (metadata only, nothing is downloaded whole)."""
    report = subprocess.run(
        [*PIP, "install", "--quiet", "--dry-run", "--ignore-installed", "--no-deps",
         "--only-binary=:all:", "--report", "-", "triton"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (item,) = json.loads(report)["install"]
    return str(item["metadata"]["version"])


def install_overlay(folder: Path, version: str) -> None:
    """`triton==version` alone in `folder`, unless it is there already."""
    if (folder / f"triton-{version}.dist-info").is_dir():
        return
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(
        [*PIP, "install", "--quiet", "--no-deps", "--only-binary=:all:", "--target", str(folder),
         f"triton=={version}"],
        check=True,
    )  # fmt: skip


def declared_range(pyproject: Path = ROOT / "pyproject.toml") -> SpecifierSet:
    """The triton versions that pyproject.toml's dependencies accept."""
    with pyproject.open("rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    for line in dependencies:
        requirement = Requirement(line)
        if requirement.name == "triton":
            return requirement.specifier
    raise LookupError(f"{pyproject} declares no triton dependency")


def overlay_environment(folder: Path) -> dict[str, str]:
    """This process's environment with `folder` first on PYTHONPATH."""
    environment = dict(os.environ)
    paths = [str(folder.resolve()), *filter(None, [environment.get("PYTHONPATH")])]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    folder, pytest_args = Path(argv[0]), argv[1:]
    version = newest_release()
    install_overlay(folder, version)
    environment = overlay_environment(folder)
    imported = subprocess.run(
        [sys.executable, "-c", "import triton; print(triton.__version__, triton.__file__)"],
        env=environment, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if imported[0] != version or not Path(imported[1]).is_relative_to(folder.resolve()):
        print(
            f"expected triton {version} from {folder}, Python imports {imported}", file=sys.stderr
        )
        return 1
    print(f"kernel tests under triton {version}, the newest on PyPI, from {folder}", flush=True)
    declared = declared_range()
    if version not in declared:
        print(
            f"note: pyproject.toml declares triton{declared}, which excludes {version}; "
            "widen it once these tests pass",
            flush=True,
        )
    command = [sys.executable, "-m", "pytest", "tests/kernels", *pytest_args]
    return subprocess.run(command, cwd=ROOT, env=environment).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
