"""How long a call refused for a full queue should wait before it comes back.

The wait goes to the client as `grpc-retry-pushback-ms` (gRPC's retry policies honour it, and
so do memserve's clients). A constant wait fails under overload: K clients refused and told
to wait P come back at K / P calls a second whatever the server can take, and past some K
answering refusals takes the cores that should run the admitted calls (measured in
docs/performance.md, "Overload"). So the wait adapts, per model, to keep refusals a small
share of the work: over each `window` the refused calls are counted against the admitted
ones; while refusals are more than `most_refused` of the admitted, the wait doubles (up to
`longest`), and while they are under half of that, or no call came, it halves (down to
`shortest`). Each refused
call is told a wait drawn uniformly from [P/2, 3P/2], so that clients refused together do not
all come back together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Pushback:
    def __init__(
        self,
        shortest: float = 0.01,
        longest: float = 5.0,
        window: float = 0.1,
        most_refused: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < shortest <= longest:
            raise ValueError(f"need 0 < shortest <= longest, got {shortest} and {longest}")
        self.shortest, self.longest = shortest, longest
        self.window, self.most_refused = window, most_refused
        self.clock = clock
        self.rng = rng or random.Random()
        self.wait = shortest  # P, seconds: the middle of the waits told
        self.began = clock()  # the window's start
        self.admitted_calls = 0  # in this window
        self.refused_calls = 0

    def admitted(self) -> None:
        self._roll()
        self.admitted_calls += 1

    def refused(self) -> float:
        """Count a refusal; the seconds this caller should wait."""
        self._roll()
        self.refused_calls += 1
        return self.wait * self.rng.uniform(0.5, 1.5)

    def _roll(self) -> None:
        now = self.clock()
        if now - self.began < self.window:
            return
        refused, admitted = self.refused_calls, max(1, self.admitted_calls)
        if refused > self.most_refused * admitted:
            self.wait = min(self.longest, self.wait * 2)
        elif refused < self.most_refused * admitted / 2:
            self.wait /= 2
        idle = int((now - self.began) / self.window) - 1  # windows without a call: no refusals
        self.wait = max(self.shortest, self.wait / 2 ** min(idle, 64))
        self.began, self.admitted_calls, self.refused_calls = now, 0, 0
