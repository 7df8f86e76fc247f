"""A real `redis-server` in a child process, for the tests and the durability benchmark: on a
Unix socket in a directory of its own (no port to race for), with the append-only file on
and `appendfsync always`, the configuration `--durability launch` relies on. Stopped by PID;
`kill` is a `kill -9`, and `start` again brings it back on the same files."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

STARTUP_SECONDS = 30.0


class RedisServer:
    """`redis-server` with its data, log and socket in `directory`."""

    def __init__(self, directory: Path, appendfsync: str = "always") -> None:
        self.directory = directory
        self.appendfsync = appendfsync
        self.socket = directory / "redis.sock"
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server", "--port", "0", "--unixsocket", str(self.socket),
            "--unixsocketperm", "700", "--dir", str(self.directory), "--appendonly", "yes",
            "--appendfsync", self.appendfsync, "--save", "", "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        deadline = time.monotonic() + STARTUP_SECONDS
        try:
            while True:  # its log says "Ready to accept connections" as the socket opens
                try:
                    if client.ping():
                        return self
                except (redis.exceptions.ConnectionError, FileNotFoundError):
                    if self.process.poll() is not None:
                        raise RuntimeError(f"redis-server exited:\n{self.log_text()}") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not start:\n{self.log_text()}"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        """`kill -9`: what the disk has is what survives."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()
