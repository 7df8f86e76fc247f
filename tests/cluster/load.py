"""Sessions under load through Envoy, each with a client that records every acknowledged
call and when it was acknowledged (as tests/serving/test_durability.py's soak does): calls
carry request ids and the session header, and are sent again after UNAVAILABLE or
DEADLINE_EXCEEDED (or INTERNAL for a Generate whose stream Envoy reset when its replica died
mid-reply) until answered. `check` replays every session's acknowledged calls in order on a
lone server that never failed, with tests/serving's oracle: the same answers bit for bit
and the same final state, so no acknowledged step was lost or doubled."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from bench.child_cluster import Cluster, session_metadata
from bench.child_server import ServerProcess
from protos import memserve_pb2
from tests.cluster.conftest import CHAT
from tests.serving import oracle

RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_SECONDS = 30.0


def new_id() -> str:
    return uuid.uuid4().hex


class Client:
    """One session's caller, in its own thread: one call at a time, each retried with its
    request id until answered."""

    def __init__(self, load: Load, model: str, session: str, seed: int) -> None:
        self.load, self.model, self.session = load, model, session
        self.rng = np.random.default_rng(seed)
        self.metadata = session_metadata(session)
        self.calls: list[oracle.Call] = []  # acknowledged: kind, request, answer
        self.acked_at: list[float] = []  # when each was acknowledged (monotonic)
        self.sent_at: list[float] = []  # when the try that was acknowledged was sent
        self.retries = 0  # calls sent again
        self.codes: set[str] = set()  # the codes they were sent again after
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.load.stopping.is_set():
                request: Any
                if self.model == CHAT:
                    turn = len(self.calls)
                    kind, request = "generate", (f"turn {turn} : what do you do for fun ?", turn)
                else:
                    kind = "step"
                    request = self.rng.random((int(self.rng.integers(1, 40)), 9), dtype=np.float32)
                answer, sent = self._retried(kind, request)
                with self.load.changed:
                    self.calls.append((kind, request, answer))
                    self.acked_at.append(time.monotonic())
                    self.sent_at.append(sent)
                    self.load.changed.notify_all()
        except BaseException as error:  # reported by the test
            self.error = error
            with self.load.changed:
                self.load.changed.notify_all()

    def _retried(self, kind: str, request: Any) -> tuple[Any, float]:
        """The answer, and when the try that got it was sent."""
        request_id, stub = new_id(), self.load.stub
        while True:
            sent = time.monotonic()
            try:
                if kind == "step":
                    return oracle.step(stub, self.session, request, request_id,
                                       self.metadata, CALL_SECONDS), sent  # fmt: skip
                text, seed = request
                return oracle.generate(stub, self.session, text, seed, request_id,
                                       self.metadata, CALL_SECONDS), sent  # fmt: skip
            except grpc.RpcError as error:
                reset = kind == "generate" and error.code() == grpc.StatusCode.INTERNAL
                if error.code() not in RETRIED and not reset:
                    raise
                self.codes.add(error.code().name)
            self.retries += 1
            time.sleep(0.01)  # the client's back-off before it sends the call again

    def acks_after(self, moment: float) -> int:
        return sum(1 for t in self.acked_at if t > moment)


class Load:
    """Sessions of `models` made through the cluster's Envoy, each called by a Client."""

    def __init__(self, cluster: Cluster, models: Sequence[str], seed: int = 0) -> None:
        self.cluster = cluster
        self.stub = cluster.stub()
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.clients = [
            Client(self, model, self._create(model), seed + i) for i, model in enumerate(models)
        ]
        self.threads = [threading.Thread(target=c.run, daemon=True) for c in self.clients]

    def _create(self, model: str) -> str:
        request = memserve_pb2.CreateSessionRequest(model=model, request_id=new_id())
        session_id: str = self.stub.CreateSession(request, timeout=CALL_SECONDS).session_id
        return session_id

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def acked(self) -> int:
        return sum(len(c.calls) for c in self.clients)

    def wait(self, condition: Any, seconds: float, what: str) -> None:
        with self.changed:
            self.changed.wait_for(
                lambda: condition() or any(c.error for c in self.clients), seconds
            )
        assert not any(c.error for c in self.clients), [c.error for c in self.clients]
        assert condition(), f"the load stalled: no {what} in {seconds} s"

    def settled(self, calls: int = 2, seconds: float = 120.0) -> None:
        """Until every session has had `calls` calls acknowledged from now on."""
        now = time.monotonic()
        self.wait(lambda: all(c.acks_after(now) >= calls for c in self.clients), seconds,
                  f"{calls} calls of every session")  # fmt: skip

    def answered_again(self, client: Client, moment: float, seconds: float = 60.0) -> float:
        """When `client`'s session was first answered to a call sent after `moment` (waits
        for it): an answer on its way when a replica was killed at `moment` does not count,
        the call after it, which finds the session's new replica, does."""

        def again() -> float | None:
            return next((t for t, sent in zip(client.acked_at, client.sent_at, strict=True)
                         if sent > moment), None)  # fmt: skip

        self.wait(lambda: again() is not None, seconds, "answer")
        found = again()
        assert found is not None
        return found

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(120)
        assert not any(c.error for c in self.clients), [c.error for c in self.clients]
        assert not any(t.is_alive() for t in self.threads), "a client is still calling"


def check(load: Load, reference: ServerProcess, cluster: Cluster) -> None:
    """Each session's acknowledged calls, replayed in order on `reference`, answer the same
    bit for bit, and the session read through Envoy ends where the reference's does."""
    envoy = cluster.stub()
    for client in load.clients:
        oracle.replay(reference.stub(), client.model, client.calls, envoy, client.session,
                      client.metadata)  # fmt: skip


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (the largest value for p99 of fewer than 100)."""
    ordered = sorted(values)
    rank = max(1, int(np.ceil(fraction * len(ordered))))
    return ordered[rank - 1]
