"""Where sessions' committed histories are kept (`memserve serve --store URL`).

`memory` keeps nothing (the default), `dir:PATH` a local directory
(`serving.durable.directory`), `redis://HOST:PORT/DB` a Redis server
(`serving.durable.redis_store`). `serving.durable.base` says what a store is.
"""

from __future__ import annotations

from serving.durable.base import MemorySessionStore, SessionStore


def open_store(url: str, replica: str = "") -> SessionStore:
    """The store a `--store` URL names; ValueError saying what is wrong with a bad one."""
    if url in ("", "memory"):
        return MemorySessionStore()
    if url.startswith("dir:"):
        from serving.durable.directory import DirectorySessionStore

        path = url[len("dir:") :]
        if not path:
            raise ValueError("--store dir:PATH needs a directory, e.g. dir:/var/lib/memserve")
        return DirectorySessionStore(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from serving.durable.redis_store import RedisSessionStore

        return RedisSessionStore(url, replica=replica)
    raise ValueError(f"--store must be memory, dir:PATH or redis://HOST:PORT/DB, got {url!r}")
