"""Who may call, and how much: tenants, their API keys and their quotas (`--auth-keys FILE`).

```toml
[tenants.acme]
keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
max_sessions = 1000          # sessions it holds (active, parked, stored)
max_parked_bytes = 1073741824  # state bytes of its sessions outside the slots
steps_per_second = 5000      # session-steps per second (a token bucket of one second)
max_concurrent_calls = 64    # calls (and streams) being answered at once
models = ["ntm-copy"]        # the models it may see and use (default: all)
```

A key is stored as the SHA-256 of its bytes, never itself. A plain hash, not a password
hash (bcrypt, argon2): keys are random tokens of 128 bits or more (`memserve keys new` makes
them), which no dictionary holds and no brute force reaches, so a slow hash would cost every
call a millisecond and buy nothing; a password a person chose would need one. Keys are
looked up by their hash, so comparing them takes the same time whatever the key.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from serving.errors import ResourceExhausted, Unauthenticated

KEY_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
QUOTAS = ("max_sessions", "max_parked_bytes", "steps_per_second", "max_concurrent_calls")
FIELDS = {"keys", "models", *QUOTAS}
OPEN = ""  # the one tenant of a server without --auth-keys


def hash_key(key: str) -> str:
    """How a key is written in the keys file."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: 256 random bits, URL-safe."""
    return "msk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Tenant:
    """One tenant's name, quotas (None: no limit) and models (None: all)."""

    name: str
    max_sessions: int | None = None
    max_parked_bytes: int | None = None
    steps_per_second: float | None = None
    max_concurrent_calls: int | None = None
    models: frozenset[str] | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check_room(self, sessions: int, parked_bytes: int) -> None:
        """RESOURCE_EXHAUSTED, naming the quota, if one more session is too many for a tenant
        that holds `sessions` and would hold `parked_bytes` of state outside the slots."""
        if self.max_sessions is not None and sessions >= self.max_sessions:
            raise ResourceExhausted(
                f"tenant {self.name!r} holds {self.max_sessions} sessions, its max_sessions quota"
            )
        if self.max_parked_bytes is not None and parked_bytes > self.max_parked_bytes:
            raise ResourceExhausted(
                f"tenant {self.name!r} would hold more than its max_parked_bytes quota "
                f"({self.max_parked_bytes} bytes) outside the slots"
            )


OPEN_TENANT = Tenant(OPEN)


@dataclass(frozen=True)
class Keys:
    """The tenants of a keys file, by the hashes of their keys."""

    tenants: Mapping[str, Tenant]
    by_hash: Mapping[bytes, str]  # SHA-256 digest of a key -> tenant name
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Keys:
        """Read and check a keys file; ValueError naming the file and what is wrong."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as error:
            raise ValueError(f"cannot read the keys file {path}: {error.strerror}") from error
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"the keys file {path} is not valid TOML: {error}") from error
        tenants_table = data.get("tenants")
        if set(data) - {"tenants"} or not isinstance(tenants_table, dict) or not tenants_table:
            raise ValueError(f"the keys file {path} must hold [tenants.NAME] tables, and only them")
        tenants: dict[str, Tenant] = {}
        by_hash: dict[bytes, str] = {}
        for name, table in tenants_table.items():
            tenant, digests = _tenant(name, table, path)
            for digest in digests:
                if digest in by_hash:
                    raise ValueError(
                        f"the keys file {path}: a key of tenant {name!r} is also one of "
                        f"tenant {by_hash[digest]!r}"
                    )
                by_hash[digest] = name
            tenants[name] = tenant
        return cls(tenants, by_hash, str(path))

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an `authorization: Bearer KEY` value; UNAUTHENTICATED otherwise,
        never saying which keys exist."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthenticated("this server needs an API key: authorization: Bearer KEY")
        digest = hashlib.sha256(authorization[len("Bearer ") :].strip().encode()).digest()
        name = self.by_hash.get(digest)
        if name is None:
            raise Unauthenticated("the API key is not valid on this server")
        return self.tenants[name]


def _tenant(name: str, table: Any, path: str | Path) -> tuple[Tenant, list[bytes]]:
    where = f"the keys file {path}, tenant {name!r}"
    if not name or not isinstance(table, dict):
        raise ValueError(f"{where}: must be a table with a non-empty name")
    unknown = sorted(set(table) - FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown fields {', '.join(unknown)} (known: {sorted(FIELDS)})")
    keys = table.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ValueError(f'{where}: keys must be a list of at least one "sha256:HEX"')
    digests = []
    for key in keys:
        match = KEY_HASH.match(key) if isinstance(key, str) else None
        if match is None:
            raise ValueError(
                f'{where}: keys hold SHA-256 hashes written "sha256:" and 64 hex digits '
                "(`memserve keys new` prints a key and its line), never keys themselves"
            )
        digests.append(bytes.fromhex(match.group(1)))
    quotas: dict[str, Any] = {}
    for quota in QUOTAS:
        value = table.get(quota)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {quota} must be a number > 0, got {value!r}")
        if quota != "steps_per_second" and not isinstance(value, int):
            raise ValueError(f"{where}: {quota} must be a whole number, got {value!r}")
        quotas[quota] = value
    models = table.get("models")
    if models is not None and not (
        isinstance(models, list) and all(isinstance(m, str) and m for m in models)
    ):
        raise ValueError(f"{where}: models must be a list of model names")
    return Tenant(name, models=None if models is None else frozenset(models), **quotas), digests


@dataclass
class Usage:
    """What one tenant uses now: calls in progress and its step-rate bucket."""

    calls: int = 0
    tokens: float = math.inf  # the bucket starts full
    refilled: float = field(default_factory=time.monotonic)

    def take_steps(self, tenant: Tenant, steps: int) -> None:
        """Spend `steps` from the tenant's bucket (one second of its rate, full at first);
        RESOURCE_EXHAUSTED with how long to wait if it does not hold them."""
        rate = tenant.steps_per_second
        if rate is None:
            return
        now = time.monotonic()
        self.tokens = min(rate, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if steps > rate:
            raise ResourceExhausted(
                f"tenant {tenant.name!r} may run {rate:g} steps per second; a call of "
                f"{steps} steps never fits (split it)"
            )
        if steps > self.tokens:
            wait = (steps - self.tokens) / rate
            raise ResourceExhausted(
                f"tenant {tenant.name!r} is over its steps_per_second quota ({rate:g}); "
                f"retry in {wait * 1000:.0f} ms",
                retry_after=wait,
            )
        self.tokens -= steps
