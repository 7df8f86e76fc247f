"""Prove the protobuf range pyproject.toml declares: the generated code in protos/ imported
and used (`tests.protos.use_generated`) under its lowest and its highest protobuf.

`make test-protobuf-range` (part of `make test`) runs `python -m tests.protos.protobuf_range
FOLDER`. The lowest is the declared `>=` bound; the highest is the newest release on PyPI
inside the range (asked at every run, so a new 7.x that breaks the code fails CI before a
user). Each is installed alone (`--no-deps`: protobuf needs nothing) into FOLDER/VERSION, once,
and put first on PYTHONPATH for a child Python, which must import it from there. Older
gencode runs on newer runtimes, never the reverse: the lowest bound must not be below the
version the generated files were made for (`test_protobuf_range` checks that offline).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.kernels.newest_triton import overlay_environment

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip"]


def declared_range(pyproject: Path = ROOT / "pyproject.toml") -> SpecifierSet:
    """The protobuf versions pyproject.toml's dependencies accept."""
    with pyproject.open("rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    for line in dependencies:
        requirement = Requirement(line)
        if requirement.name == "protobuf":
            return requirement.specifier
    raise LookupError(f"{pyproject} declares no protobuf dependency")


def lowest(declared: SpecifierSet) -> str:
    """The declared `>=` bound."""
    bounds = [spec.version for spec in declared if spec.operator == ">="]
    if len(bounds) != 1:
        raise ValueError(f"protobuf{declared} needs exactly one '>=' bound")
    return bounds[0]


def newest_in(declared: SpecifierSet) -> str:
    """The newest protobuf on PyPI inside the range with a wheel for this Python (metadata
    only, nothing is downloaded whole)."""
    report = subprocess.run(
        [*PIP, "install", "--quiet", "--dry-run", "--ignore-installed", "--no-deps",
         "--only-binary=:all:", "--report", "-", f"protobuf{declared}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (item,) = json.loads(report)["install"]
    return str(item["metadata"]["version"])


def gencode_versions(folder: Path = ROOT / "protos") -> dict[str, str]:
    """The protobuf version each generated `*_pb2.py` was made for, by file."""
    found = {}
    for path in sorted(folder.rglob("*_pb2.py")):
        stamp = re.search(r"^# Protobuf Python Version: (\S+)$", path.read_text(), re.MULTILINE)
        if stamp is None:
            raise ValueError(f"{path} names no protobuf version")
        found[str(path.relative_to(folder))] = stamp.group(1)
    return found


def install_overlay(folder: Path, version: str) -> Path:
    """`protobuf==version` alone in folder/version, unless it is there already."""
    target = folder / version
    if not (target / f"protobuf-{version}.dist-info").is_dir():
        subprocess.run(
            [*PIP, "install", "--quiet", "--no-deps", "--only-binary=:all:", "--upgrade",
             "--target", str(target), f"protobuf=={version}"],
            check=True,
        )  # fmt: skip
    return target


def check(folder: Path, version: str) -> bool:
    """Run `tests.protos.use_generated` under protobuf `version` from its overlay."""
    overlay = install_overlay(folder, version)
    result = subprocess.run(
        [sys.executable, "-m", "tests.protos.use_generated"],
        cwd=ROOT, env=overlay_environment(overlay), capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        print(f"protobuf {version}: the generated code fails\n{result.stderr}", file=sys.stderr)
        return False
    imported, location = result.stdout.split()[-2:]
    if imported != version or not Path(location).is_relative_to(overlay.resolve()):
        print(f"expected protobuf {version} from {overlay}, got {imported} from {location}")
        return False
    print(f"protobuf {version}: protos/ imported and used", flush=True)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    declared = declared_range()
    versions = [lowest(declared), newest_in(declared)]
    print(f"protobuf{declared}: checking {' and '.join(versions)}", flush=True)
    results = [check(folder, version) for version in versions]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
