"""The live progress line on stderr while a level runs: phase, a bar over the warm-up and
the window, requests answered, their rate so far and the errors."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from clients.loadgen.schedule import Level, now

REFRESH_SECONDS = 0.25
BAR_WIDTH = 24


class Progress:
    """Redraws one line (carriage return, erase) until stopped; silent when disabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.task: asyncio.Task[None] | None = None

    def start(
        self, level: Level, warmup: float, duration: float | None, requests: int | None
    ) -> None:
        if self.enabled:
            self.task = asyncio.create_task(self._draw(level, warmup, duration, requests))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
            self.clear()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    async def _draw(
        self, level: Level, warmup: float, duration: float | None, requests: int | None
    ) -> None:
        while True:
            self.stream.write("\r\033[K" + self.line(level, warmup, duration, requests))
            self.stream.flush()
            await asyncio.sleep(REFRESH_SECONDS)

    @staticmethod
    def line(level: Level, warmup: float, duration: float | None, requests: int | None) -> str:
        recorder = level.recorder
        elapsed = now() - level.started
        if not level.opened.is_set() and not level.closed.is_set():
            done = min(1.0, elapsed / warmup) if warmup > 0 else 1.0
            detail = f"{min(elapsed, warmup):5.1f}/{warmup:g} s"
        elif requests is not None:
            done = min(1.0, recorder.issued / requests)
            detail = f"{recorder.issued}/{requests} req"
        else:
            assert duration is not None
            measured = max(0.0, min(now(), recorder.end or now()) - recorder.start)
            done = min(1.0, measured / duration)
            detail = f"{measured:5.1f}/{duration:g} s"
        filled = round(done * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        window = max(1e-9, min(now(), recorder.end or now()) - recorder.start)
        rate = recorder.answered / window if level.opened.is_set() else 0.0
        errors = sum(recorder.errors.values())
        return (
            f"{level.label:>10} {level.phase:<11} [{bar}] {detail}  {recorder.ok} ok "
            f"{rate:8.1f}/s  {errors} errors"
        )
