"""The pieces of `tests.kernels.newest_triton` that need no network: the declared Triton
range and the overlay's place on PYTHONPATH. (`make test` runs the whole of it.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.version import Version

from tests.kernels.newest_triton import ROOT, declared_range, overlay_environment


def test_the_makefiles_pinned_triton_lies_in_the_declared_range() -> None:
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TRITON_REQUIREMENT \?= triton==(\S+)$", makefile, re.MULTILINE)
    assert pinned is not None
    assert Version(pinned.group(1)) in declared_range()


def test_a_release_outside_the_range_is_seen(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    requirement = "triton>=3.6,<3.10; sys_platform == 'linux'"
    pyproject.write_text(f'[project]\ndependencies = ["torch", "{requirement}"]\n')
    declared = declared_range(pyproject)
    assert "3.9.0" in declared and "3.10.0" not in declared and "3.5.1" not in declared
    pyproject.write_text('[project]\ndependencies = ["torch"]\n')
    with pytest.raises(LookupError):
        declared_range(pyproject)


def test_the_overlay_comes_first_on_pythonpath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    assert overlay_environment(tmp_path)["PYTHONPATH"] == f"{tmp_path.resolve()}:/somewhere"
    monkeypatch.delenv("PYTHONPATH")
    assert overlay_environment(tmp_path)["PYTHONPATH"] == str(tmp_path.resolve())
