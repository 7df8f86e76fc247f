"""deploy/docker/Dockerfile: hadolint finds nothing, the pins it installs are the Makefile's,
what it copies exists and is not ignored by .dockerignore, its command's flags are flags
`memserve serve` takes, and its health check runs `memserve healthcheck`. (No Docker engine
runs here: the build itself is not tried.)"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from serving import config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_pins_are_the_makefiles() -> None:
    arguments = dict(
        rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest
    )
    makefile = (ROOT / "Makefile").read_text()
    for name in ("TORCH_REQUIREMENT", "TRITON_REQUIREMENT"):
        pinned = re.search(rf"^{name} \?= (.+)$", makefile, re.MULTILINE)
        assert pinned is not None
        assert arguments[name].strip('"') == pinned.group(1).strip(), name


def test_what_it_copies_exists_and_reaches_the_build() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for word, rest in instructions():
        if word == "COPY":
            copied += shlex.split(rest)[:-1]
    assert {"pyproject.toml", "memserve", "serving", "models", "kernels", "protos"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    # the bundled models travel with models/ (package data)
    assert list((ROOT / "models" / "checkpoints").glob("*/model.safetensors"))


def test_its_command_and_health_check_are_memserves() -> None:
    steps = instructions()
    entry = json.loads(next(rest for word, rest in steps if word == "ENTRYPOINT"))
    assert entry[:2] == ["memserve", "serve"]
    flags = dict(zip(entry[2::2], entry[3::2], strict=True))
    settings = config.load({k.removeprefix("--").replace("-", "_"): v for k, v in flags.items()},
                           environ={})  # fmt: skip
    assert settings.host == "0.0.0.0"
    health = next(rest for word, rest in steps if word == "HEALTHCHECK")
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[:2] == ["memserve", "healthcheck"]
    assert "USER 10001:10001" in DOCKERFILE.read_text()
