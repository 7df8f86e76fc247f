"""`memserve serve` settings: file < environment < flags, and errors that name the setting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.child_server import ServerProcess, children_of
from serving import config
from serving.config import ServerConfig


def test_defaults_are_documented_ones() -> None:
    defaults = config.load({}, environ={})
    assert defaults == ServerConfig()
    assert (defaults.host, defaults.port, defaults.metrics_port) == ("127.0.0.1", 50051, 9464)


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    toml = tmp_path / "memserve.toml"
    toml.write_text(
        'models = ["ntm-copy"]\nslots = 8\nmax_batch = 4\nport = 6000\npark_host_bytes = "2MiB"\n'
    )
    environ = {"MEMSERVE_SLOTS": "16", "MEMSERVE_PORT": "7000", "MEMSERVE_CONFIG": str(toml)}
    loaded = config.load({"port": "8000", "session_ttl": None}, environ=environ)
    assert loaded.models == ("ntm-copy",)  # file
    assert loaded.max_batch == 4  # file
    assert loaded.slots == 16  # environment over file
    assert loaded.port == 8000  # flag over environment
    assert loaded.park_host_bytes == 2 * 2**20
    assert loaded.session_ttl == ServerConfig().session_ttl  # not given anywhere


@pytest.mark.parametrize(
    ("flags", "environ", "words"),
    [
        ({"slots": "many"}, {}, ("--slots", "many")),
        ({"slots": "0"}, {}, ("slots", ">= 1")),
        ({}, {"MEMSERVE_PORT": "1.5"}, ("MEMSERVE_PORT",)),
        ({"session_ttl": "nan"}, {}, ("session_ttl",)),
        ({"session_ttl": "100000"}, {}, ("session_ttl", "max_session_ttl")),
        ({"park_host_bytes": "12 parsecs"}, {}, ("park_host_bytes", "512MiB")),
        ({"log_level": "chatty"}, {}, ("log_level",)),
        ({"device": "tpu"}, {}, ("device",)),
        ({"metrics_port": "-2"}, {}, ("metrics_port",)),
        ({"model_nice": "20"}, {}, ("model_nice", "0..19")),
        ({"model_timeout": "0"}, {}, ("model_timeout", "> 0")),
        (
            {"replica": "r1", "store": "redis://localhost:6379/0", "durability": "park"},
            {},
            ("replica", "launch or interval", "park"),
        ),
    ],
)
def test_bad_values_name_the_setting(
    flags: dict[str, str], environ: dict[str, str], words: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError) as error:
        config.load(flags, environ=environ)
    for word in words:
        assert word in str(error.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("slotz = 3\n")
    with pytest.raises(ValueError, match="unknown settings slotz"):
        config.load({}, environ={}, config_file=str(unknown))
    broken = tmp_path / "broken.toml"
    broken.write_text("slots = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        config.load({}, environ={}, config_file=str(broken))
    with pytest.raises(ValueError, match="cannot read config file"):
        config.load({}, environ={}, config_file=str(tmp_path / "absent.toml"))


def test_printed_config_reads_back(tmp_path: Path) -> None:
    """`--print-config` prints a TOML file that loads into the same settings."""
    printed = subprocess.run(
        [sys.executable, "-m", "memserve", "serve", "--print-config", "--slots", "12",
         "--models", "ntm-copy"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    saved = tmp_path / "printed.toml"
    saved.write_text(printed)
    loaded = config.load({}, environ={}, config_file=str(saved))
    assert loaded.slots == 12 and loaded.models == ("ntm-copy",)
    assert loaded == config.load({"slots": "12", "models": "ntm-copy"}, environ={})


def test_bad_setting_exits_2_with_the_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memserve", "serve", "--slots", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "slots must be >= 1" in result.stderr


def test_unknown_model_exits_2_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memserve", "serve", "--models", "ntm-nope", "--port", "0",
         "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "ntm-nope" in result.stderr


@pytest.mark.parametrize("replica", ["", "r1"], ids=["server", "replica"])
def test_a_store_that_cannot_be_reached_at_start_exits_1_naming_it(replica: str) -> None:
    """Also a cluster's replica, which reads no sessions at start (they are found as they
    are used) and would otherwise report SERVING until its first commit failed."""
    result = subprocess.run(
        [sys.executable, "-m", "memserve", "serve", "--models", "ntm-copy", "--store",
         "redis://127.0.0.1:1/0", "--port", "0", "--metrics-port", "-1", "--replica", replica],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "memserve serve: error: the session store redis://127.0.0.1:1/0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_exits_2_naming_it() -> None:
    """The model's process resolves --device (the server starts it before it imports
    torch itself); its refusal is the server's, with the same message and exit code."""
    result = subprocess.run(
        [sys.executable, "-m", "memserve", "serve", "--models", "ntm-copy", "--device", "cuda",
         "--port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "device 'cuda' asked for, but this machine has no CUDA device" in result.stderr


def test_what_starts_the_models_processes_does_not_import_torch() -> None:
    """What lets a server's own import of torch overlap its models' processes' (theirs
    begins first): `memserve serve` starts them from modules that do not import torch."""
    code = (
        "import sys\n"
        "import memserve.cli, serving.config, serving.logs, serving.startup\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_help_names_every_setting_with_its_variable_and_default() -> None:
    text = subprocess.run(
        [sys.executable, "-m", "memserve", "serve", "--help"],
        capture_output=True, text=True, check=True, env={"COLUMNS": "200", **os.environ},
    ).stdout  # fmt: skip
    entries = [" ".join(entry.split()) for entry in text.split("\n  --")[1:]]
    defaults = ServerConfig()
    for name in config.FIELDS:
        flag = f"{name.replace('_', '-')} "
        entry = next(entry for entry in entries if entry.startswith(flag))
        assert f"MEMSERVE_{name.upper()}" in entry
        default = getattr(defaults, name)
        if default not in ("", ()):
            assert f"default: {default};" in entry


def niceness(pid: int) -> int:
    """Field 19 of /proc/PID/stat (after the parenthesised command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def test_the_model_process_runs_at_model_nice_below_the_server(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, "--models", "ntm-copy", "--model-nice", "7") as server:
        loaded = server.event("model_loaded")
        assert loaded is not None and server.process is not None
        server_nice = niceness(server.process.pid)
        assert niceness(loaded["pid"]) == min(19, server_nice + 7)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_the_logs_name_what_runs_each_models_step(tmp_path: Path, fused: str) -> None:
    """`model_loaded` and `serving` say what the worker really steps with: the NTM's fused C
    step where it applies, the PyTorch reference for a model without one (vmed-chat) or
    with it turned off, never a guess made in the server's process."""
    from kernels import cpu_step

    env = {"MEMSERVE_FUSED_STEP": fused}
    with ServerProcess(tmp_path, "--models", "ntm-copy,vmed-chat", env=env) as server:
        loaded = {
            e["model"]: e["backend"] for e in server.events() if e.get("event") == "model_loaded"
        }
        serving = server.event("serving")
    ntm = "fused-cpu" if fused == "1" and cpu_step.available() else "torch"
    assert loaded == {"ntm-copy": ntm, "vmed-chat": "torch"}
    assert serving is not None and serving["backends"] == loaded


def test_a_failed_start_names_the_metrics_address_and_leaves_no_park_directory(
    tmp_path: Path,
) -> None:
    """The metrics port is taken: the error names it, exit 1, and the park directory the
    server made for itself (no --park-dir) is gone with it."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "memserve", "serve", "--models", "ntm-copy", "--port", "0",
             "--metrics-host", "127.0.0.1", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"memserve serve: error: cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert list(tmp_path.glob("memserve-park-*")) == []


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_models_load_stops_the_start_cleanly(
    tmp_path: Path, number: int
) -> None:
    """SIGTERM or SIGINT while a model still loads (its fused step's build held up by a
    compiler that waits): the server stops its model's process, says so and exits 0, with no
    traceback and no process left behind."""
    entered = tmp_path / "building"
    compiler = tmp_path / "cc"
    compiler.write_text(f"#!/bin/sh\ntouch {entered}\nexec sleep 20\n")
    compiler.chmod(0o755)
    env = {**os.environ, "CC": str(compiler), "MEMSERVE_CACHE_DIR": str(tmp_path / "cache"),
           "MEMSERVE_KERNEL_BACKEND": "torch", "TMPDIR": str(tmp_path)}  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "memserve", "serve", "--models", "ntm-copy", "--port", "0",
         "--metrics-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not entered.exists():  # the model's process is in its build
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # The model's process (multiprocessing's resource tracker leaves once the server has)
        models = [
            pid
            for pid in children_of(server.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(models) == 1
        server.send_signal(number)
        _, stderr = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 0, stderr
    assert f"memserve serve: stopped by {signal.Signals(number).name} before serving" in stderr
    assert "Traceback" not in stderr
    assert not [pid for pid in models if Path(f"/proc/{pid}").exists()]
    assert list(tmp_path.glob("memserve-park-*")) == []
