"""Server settings: defaults, overridden by a TOML file, by environment variables, by flags.

Every setting has one name used everywhere: `slots` is `slots = 512` in the TOML file,
`MEMSERVE_SLOTS=512` in the environment and `--slots 512` on the command line. Later
sources win (flag > environment > file > default). A value that does not parse is an
error naming the setting and where it came from.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "MEMSERVE_"
CONFIG_ENV = "MEMSERVE_CONFIG"


@dataclass(frozen=True)
class ServerConfig:
    """What `memserve serve` runs with. The help text of each flag is its field's `help`."""

    models: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "bundled model names or checkpoint directories, comma-separated "
            "(default: every bundled model)"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0: any free port)"})
    metrics_host: str = field(
        default="127.0.0.1",
        metadata={"help": "address the plain-HTTP /metrics endpoint listens on"},
    )
    metrics_port: int = field(
        default=9464,
        metadata={
            "help": "Prometheus /metrics port on the same host (0: any free port, "
            "-1: no metrics endpoint)"
        },
    )
    slots: int = field(default=256, metadata={"help": "active sessions per model (pool size)"})
    max_batch: int = field(default=256, metadata={"help": "most sessions in one launch"})
    steps_per_launch: int = field(
        default=8,
        metadata={
            "help": "most steps of one Step call a launch runs back to back, for calls of "
            "T > 1 (1: one step per launch; more: fewer round trips to the model, a longer "
            "wait for the sessions that share the launch)"
        },
    )
    max_queue_delay: float = field(
        default=0.0,
        metadata={
            "help": "seconds a launch waits for more sessions to join it "
            "(0: launch at once; calls that arrive meanwhile join the next)"
        },
    )
    session_ttl: float = field(
        default=600.0, metadata={"help": "seconds a session may sit idle before it expires"}
    )
    max_session_ttl: float = field(
        default=86400.0, metadata={"help": "largest ttl_seconds a client may ask for"}
    )
    max_steps_per_call: int = field(
        default=1024, metadata={"help": "largest T (steps) one Step call may carry"}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "largest max_tokens a Generate call may ask for"}
    )
    park_host_bytes: int = field(
        default=1 << 30,
        metadata={
            "help": "host memory for parked sessions before they go to disk "
            "(bytes; suffixes KiB, MiB, GiB, KB, MB, GB)"
        },
    )
    park_dir: str = field(
        default="",
        metadata={
            "help": "directory for sessions parked to disk (default: a temporary "
            "directory removed at exit)"
        },
    )
    tls_cert: str = field(
        default="",
        metadata={"help": "PEM certificate chain: serve gRPC over TLS (with tls_key)"},
    )
    tls_key: str = field(default="", metadata={"help": "PEM private key of tls_cert"})
    tls_client_ca: str = field(
        default="",
        metadata={
            "help": "PEM CA certificates: require client certificates signed by them "
            "(mutual TLS; needs tls_cert)"
        },
    )
    auth_keys: str = field(
        default="",
        metadata={
            "help": "TOML file of tenants, their API key hashes and quotas: every call then "
            "needs authorization: Bearer KEY (re-read on SIGHUP; default: an open server)"
        },
    )
    max_sessions: int = field(
        default=1_000_000,
        metadata={"help": "sessions the whole server holds, at most (active, parked, stored)"},
    )
    max_queued_calls: int = field(
        default=4096,
        metadata={"help": "calls queued or running per model, at most; more are refused at once"},
    )
    park_disk_bytes: int = field(
        default=8 << 30,
        metadata={
            "help": "bytes of parked sessions park_dir may hold (suffixes as park_host_bytes)"
        },
    )
    replica: str = field(
        default="",
        metadata={
            "help": "this server's name as one replica of a cluster sharing a redis:// store: "
            "it serves any session by bringing it back from the store, keeps one only while "
            "it serves it, and leaves expiry to the store (docs/cluster.md)"
        },
    )
    store: str = field(
        default="memory",
        metadata={
            "help": "where sessions are kept so they survive a restart: memory (nothing "
            "survives), dir:PATH (a local directory) or redis://HOST:PORT/DB"
        },
    )
    durability: str = field(
        default="launch",
        metadata={
            "help": "with a store other than memory: launch (a call is answered once its "
            "steps are committed, one commit per launch), interval (committed every "
            "durability_interval seconds, in the background) or park (written only when a "
            "session is parked or the server drains)"
        },
    )
    durability_interval: float = field(
        default=1.0,
        metadata={"help": "seconds between background commits with durability = interval"},
    )
    snapshot_every: int = field(
        default=1024,
        metadata={
            "help": "steps a session may take before its whole state is written again, so "
            "that bringing it back replays at most this many"
        },
    )
    grace: float = field(
        default=10.0,
        metadata={"help": "seconds in-flight calls get to finish after SIGTERM/SIGINT"},
    )
    model_timeout: float = field(
        default=30.0,
        metadata={
            "help": "seconds a model's process may spend on one request (a launch, bringing "
            "a stored session back, a slot read or write) before it counts as stuck (a hung "
            "device, a deadlock): it is killed, its calls are answered UNAVAILABLE and the "
            "server drains and exits 1, so that its supervisor starts another; must exceed "
            "the longest launch (max_batch x steps_per_launch steps) and replay "
            "(snapshot_every + max_steps_per_call steps)"
        },
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads each model's process may use (torch intra-op threads; "
            "0: the cores this process may run on but one, which the server process keeps, "
            "shared among the models)"
        },
    )
    model_nice: int = field(
        default=10,
        metadata={
            "help": "how many steps of niceness each model's process runs below the server "
            "(0..19, added to the server's own): where the cores are short, the model yields "
            "them to the gRPC front end that feeds it and its launches grow (0: the same "
            "priority as the server)"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "where pools live: auto (cuda if present), cpu, cuda"}
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})

    def validate(self) -> ServerConfig:
        """Raise ValueError naming the first setting out of range."""
        for name in (
            "port",
            "slots",
            "max_batch",
            "steps_per_launch",
            "max_steps_per_call",
            "max_new_tokens",
            "threads",
            "snapshot_every",
            "max_sessions",
            "max_queued_calls",
        ):
            low = 0 if name in ("port", "threads") else 1
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.model_nice <= 19:
            raise ValueError(f"model_nice must be in 0..19, got {self.model_nice}")
        if not 0 <= self.port <= 65535 or not -1 <= self.metrics_port <= 65535:
            raise ValueError("port must be in 0..65535 and metrics_port in -1..65535")
        if not re.fullmatch(r"memory|dir:.+|(redis|rediss|unix)://.+", self.store):
            raise ValueError(
                f"store must be memory, dir:PATH or redis://HOST:PORT/DB, got {self.store!r}"
            )
        if self.replica and not re.fullmatch(r"(redis|rediss|unix)://.+", self.store):
            raise ValueError("replica needs a store the replicas share: redis://HOST:PORT/DB")
        if self.durability not in ("launch", "interval", "park"):
            raise ValueError(
                f"durability must be launch, interval or park, got {self.durability!r}"
            )
        if self.replica and self.durability == "park":
            raise ValueError(
                "replica needs durability launch or interval: a session moves to another "
                "replica at any call, which brings back only what the store has, and with "
                "park the store hears of a session in use only when it is parked (Redis "
                "would expire it meanwhile)"
            )
        if not (math.isfinite(self.durability_interval) and self.durability_interval > 0):
            raise ValueError(
                f"durability_interval must be a number of seconds > 0, "
                f"got {self.durability_interval}"
            )
        seconds = ("max_queue_delay", "session_ttl", "max_session_ttl", "grace", "model_timeout")
        for name in seconds:
            value = getattr(self, name)
            positive = name.endswith("ttl") or name == "model_timeout"
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
        if self.session_ttl > self.max_session_ttl:
            raise ValueError(
                f"session_ttl ({self.session_ttl:g}) exceeds max_session_ttl "
                f"({self.max_session_ttl:g})"
            )
        if self.park_host_bytes < 0 or self.park_disk_bytes < 0:
            raise ValueError(
                f"park_host_bytes and park_disk_bytes must be >= 0, got "
                f"{self.park_host_bytes} and {self.park_disk_bytes}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_queue_delay > 1.0:
            raise ValueError(
                f"max_queue_delay is in seconds and at most 1, got {self.max_queue_delay}"
            )
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(
                f"log_level must be debug, info, warning or error, got {self.log_level!r}"
            )
        return self


FIELDS = {f.name: f for f in fields(ServerConfig)}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 1073741824, 512MiB or 2GB")
    unit = (match.group(2) or "").lower()
    return int(match.group(1)) * _UNITS.get(unit, 1)


def parse_value(name: str, value: Any, source: str) -> Any:
    """`value` (a string from flags/environment, or a TOML value) as setting `name`'s type."""
    kind = FIELDS[name].type
    try:
        if name == "models":
            items = value.split(",") if isinstance(value, str) else list(value)
            if not all(isinstance(item, str) for item in items):
                raise ValueError("must be a list of strings")
            return tuple(item.strip() for item in items if item.strip())
        if name in ("park_host_bytes", "park_disk_bytes"):
            return (
                value
                if isinstance(value, int) and not isinstance(value, bool)
                else (parse_bytes(str(value)))
            )
        if kind == "int":
            if isinstance(value, (bool, float)):
                raise ValueError("must be an integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("must be a number")
            return float(value)
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value.lower() if name == "log_level" else value
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {name} = {value!r} is invalid: {error}") from error


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a TOML file (top-level keys named as the settings)."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ValueError(f"cannot read config file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}") from error
    unknown = sorted(set(data) - FIELDS.keys())
    if unknown:
        raise ValueError(
            f"config file {path}: unknown settings {', '.join(unknown)} "
            f"(known: {', '.join(FIELDS)})"
        )
    return {name: parse_value(name, value, str(path)) for name, value in data.items()}


def load(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> ServerConfig:
    """Defaults < TOML file (`config_file` or $MEMSERVE_CONFIG) < environment < flags.

    `flags` maps setting names to values given on the command line (None: not given).
    """
    environ = os.environ if environ is None else environ
    config = ServerConfig()
    path = config_file or environ.get(CONFIG_ENV)
    if path:
        config = replace(config, **read_file(path))
    from_env = {
        name: parse_value(name, environ[ENV_PREFIX + name.upper()], ENV_PREFIX + name.upper())
        for name in FIELDS
        if ENV_PREFIX + name.upper() in environ
    }
    config = replace(config, **from_env)
    given = {
        name: parse_value(name, value, "--" + name.replace("_", "-"))
        for name, value in flags.items()
        if value is not None
    }
    return replace(config, **given).validate()


def example_toml(config: ServerConfig | None = None) -> str:
    """A TOML file with every setting at its value in `config` (default: the defaults)."""
    config = config or ServerConfig()
    lines = []
    for name in FIELDS:
        value = getattr(config, name)
        if isinstance(value, tuple):
            rendered = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        elif isinstance(value, str):
            rendered = f'"{value}"'
        else:
            rendered = repr(value)
        lines.append(f"# {FIELDS[name].metadata['help']}\n{name} = {rendered}")
    return "\n".join(lines) + "\n"
