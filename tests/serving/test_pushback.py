"""The adaptive pushback (`serving.pushback`): its rule on a clock the test moves, and what it
buys under overload in a simulation of closed-loop clients against a bounded queue (a
constant wait, as before, is the comparison)."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

import pytest

from serving.pushback import Pushback


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pushback(clock: Clock, **options: float) -> Pushback:
    return Pushback(clock=clock, rng=random.Random(0), **options)


def test_the_wait_doubles_while_refusals_dominate_and_halves_when_they_stop() -> None:
    clock = Clock()
    policy = pushback(clock, shortest=0.01, longest=0.08, window=0.125)  # exact in binary
    middles = []
    for _ in range(6):  # each window: 100 refused against 10 admitted
        for _ in range(10):
            policy.admitted()
        for _ in range(100):
            policy.refused()
        clock.now += 0.125
        policy.admitted()  # rolls the window
        middles.append(policy.wait)
    assert middles == [0.02, 0.04, 0.08, 0.08, 0.08, 0.08]  # doubled, then held at `longest`
    for _ in range(5):  # admitted only
        for _ in range(10):
            policy.admitted()
        clock.now += 0.125
        policy.admitted()
    assert policy.wait == 0.01  # halved down to `shortest`


def test_a_window_within_the_band_keeps_the_wait() -> None:
    clock = Clock()
    policy = pushback(clock, shortest=0.01, window=0.125, most_refused=0.1)
    policy.wait = 0.04
    for _ in range(100):
        policy.admitted()
    for _ in range(7):  # 7%: between half of the bound (5%) and the bound (10%)
        policy.refused()
    clock.now += 0.125
    policy.admitted()
    assert policy.wait == 0.04


def test_idle_windows_halve_the_wait_each() -> None:
    clock = Clock()
    policy = pushback(clock, shortest=0.001, longest=10.0, window=0.1)
    policy.wait = 1.6
    policy.refused()  # 1 refused against no admitted: the counted window doubles it
    clock.now += 0.45  # and three windows more without a call
    policy.admitted()
    assert policy.wait == pytest.approx(1.6 * 2 / 2**3)


def test_waits_told_are_spread_around_the_middle() -> None:
    clock = Clock()
    policy = pushback(clock, shortest=0.02, window=1.0)
    waits = [policy.refused() for _ in range(2000)]
    assert min(waits) >= 0.01 and max(waits) <= 0.03
    assert min(waits) < 0.011 and max(waits) > 0.029  # the whole band is used
    assert sum(waits) / len(waits) == pytest.approx(0.02, rel=0.02)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="shortest <= longest"):
        Pushback(shortest=1.0, longest=0.5)
    with pytest.raises(ValueError, match="0 < shortest"):
        Pushback(shortest=0.0)


ARRIVES, ANSWERED = "arrives", "answered"


@dataclass
class Outcome:
    admitted: int
    refused: int
    seconds: float


def simulate(wait: Pushback | float, clients: int, bound: int, rate: float, seconds: float,
             clock: Clock) -> Outcome:  # fmt: skip
    """`clients` closed-loop clients against a server that answers `rate` calls a second,
    one at a time, from a queue of at most `bound` calls; a refused client sleeps the wait
    it is told and calls again; an answered one calls again at once. Counts over the second
    half (the first is the warm-up)."""
    events = [(0.0, i, ARRIVES, i) for i in range(clients)]  # (time, order, what, client)
    heapq.heapify(events)
    queue, busy_until, order = 0, 0.0, clients
    counted = Outcome(0, 0, seconds / 2)
    while events and events[0][0] <= seconds:
        time, _, what, client = heapq.heappop(events)
        clock.now = time
        measured = time >= seconds / 2
        if what == ANSWERED:  # the client calls again at once
            queue -= 1
            at = time
        elif queue >= bound:
            at = time + (wait.refused() if isinstance(wait, Pushback) else wait)
            counted.refused += measured
        else:
            if isinstance(wait, Pushback):
                wait.admitted()
            counted.admitted += measured
            queue += 1
            busy_until = max(busy_until, time) + 1 / rate  # served in arrival order
            heapq.heappush(events, (busy_until, order, ANSWERED, client))
            order += 1
            continue
        heapq.heappush(events, (at, order, ARRIVES, client))
        order += 1
    return counted


def test_under_ten_times_the_bound_refusals_stay_a_small_share_and_the_server_stays_busy() -> None:
    clients, bound, rate, seconds = 640, 64, 3000.0, 20.0
    clock = Clock()
    adaptive = simulate(pushback(clock), clients, bound, rate, seconds, clock)
    constant = simulate(0.05, clients, bound, rate, seconds, Clock())
    # What the server could do in the window, what it was asked to do and refuse:
    assert adaptive.admitted >= 0.97 * rate * adaptive.seconds  # never idle for want of calls
    assert adaptive.refused <= 0.2 * adaptive.admitted
    assert constant.admitted >= 0.97 * rate * constant.seconds
    assert constant.refused >= 2 * constant.admitted  # the constant wait: mostly refusals
