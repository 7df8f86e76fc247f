"""Calls cut short by the caller, against the stand-in server (tests/clients/fake_server.py),
which holds a reply until the test lets it go: Ctrl-C in a blocking step or step stream,
a cancelled asyncio task, a stream past its deadline. Each leaves the stream closed (never
answering a step with an earlier step's reply) and the session's step count marked for a
re-read, so the next step goes through. Streams left open are ended by their session or
client, and gRPC's thread that feeds a stream its requests ends with them (against a real
server: nothing there needs a cue). `memserve chat` interrupted while it starts or while it
deletes its sessions."""

from __future__ import annotations

import _thread
import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.child_server import ServerProcess
from clients import AsyncClient, Client, MemserveError
from tests.clients.fake_server import FakeServer, Hold
from tests.clients.servers import DIRECT, ROOT, served, subprocess_env

FIRST = np.ones((3, 2), np.float32)  # the stand-in's model: 2 inputs, outputs twice them
SECOND = np.full((2, 2), 5.0, np.float32)
NTM_FIRST = np.ones((3, 9), np.float32)  # ntm-copy on the real server: 9 inputs, 8 outputs
NTM_SECOND = np.zeros((2, 9), np.float32)
STREAM_DEADLINE = 2.0  # seconds: far longer than a step on loopback takes


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory) as process:
        yield process


def interrupt_when_held(hold: Hold) -> threading.Thread:
    """Ctrl-C in the main thread once the held call has reached the server."""

    def interrupt() -> None:
        hold.wait_entered()
        _thread.interrupt_main()

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


def request_feeders() -> int:
    """gRPC's client threads: while a blocking stream is open, the one that feeds it its
    requests, and the channel's poller (the stand-in server's threads are named otherwise)."""
    return sum(thread.name.endswith("(_run)") for thread in threading.enumerate())


def wait_for_feeders(count: int) -> int:
    deadline = time.monotonic() + 5
    while request_feeders() != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return request_feeders()


# ---------------------------------------------------------------------------- blocking


def test_ctrl_c_in_a_stream_step_ends_the_stream(fake: FakeServer) -> None:
    with Client(fake.target(), options=DIRECT) as client, client.session("fake") as session:
        stream = session.step_stream()
        hold = fake.service.hold("StepStream")
        interrupter = interrupt_when_held(hold)
        with pytest.raises(KeyboardInterrupt):
            stream.step(FIRST)
        interrupter.join()
        hold.release.set()
        assert stream.closed and session.stale
        # The first step's reply must never answer a later step.
        with pytest.raises(MemserveError, match="closed") as closed:
            stream.step(SECOND)
        assert closed.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with session.step_stream() as fresh:
            result = fresh.step(SECOND)  # the count was re-read: the first step ran
        assert np.array_equal(result.outputs, SECOND * 2) and result.step == 5
        assert session.step_count == 5 and not session.stale


def test_ctrl_c_in_a_step_marks_the_count_for_a_re_read(fake: FakeServer) -> None:
    with Client(fake.target(), options=DIRECT) as client, client.session("fake") as session:
        hold = fake.service.hold("Step")  # the step runs; its reply waits
        interrupter = interrupt_when_held(hold)
        with pytest.raises(KeyboardInterrupt):
            session.step(FIRST)
        interrupter.join()
        hold.release.set()
        assert session.stale
        assert np.array_equal(session.step(SECOND), SECOND * 2)  # sent with expected_step 3
        assert session.step_count == fake.service.steps[session.id] == 5


def assert_deleted(client: Client, session_id: str) -> None:
    with pytest.raises(MemserveError) as gone:
        client.get_session(session_id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


def test_streams_left_open_end_with_their_session_and_client(server: ServerProcess) -> None:
    before = request_feeders()
    with Client(server.target, options=DIRECT) as client:
        with client.session("ntm-copy") as session:
            stream = session.step_stream()
            stream.step(NTM_FIRST)
            assert wait_for_feeders(before + 2) == before + 2
        assert stream.closed and wait_for_feeders(before) == before
        assert_deleted(client, session.id)

        with pytest.raises(ZeroDivisionError), client.session("ntm-copy") as failing:
            kept = failing.step_stream()
            kept.step(NTM_FIRST)
            _ = 1 / 0
        assert kept.closed and wait_for_feeders(before) == before
        assert_deleted(client, failing.id)

        session_id = client.create_session("ntm-copy").session_id
        raw = client.step_stream(session_id)  # no session to end it: the client does
        raw.step(NTM_FIRST)
    assert raw.closed and wait_for_feeders(before) == before
    with Client(server.target, options=DIRECT) as other:
        assert other.get_session(session_id).step == 3  # the stream ended, not the session
        other.delete_session(session_id)


def test_a_stream_block_that_raises_cancels_the_stream(server: ServerProcess) -> None:
    before = request_feeders()
    with (
        Client(server.target, options=DIRECT) as client,
        client.session("ntm-copy") as session,
    ):
        with pytest.raises(ZeroDivisionError), session.step_stream() as stream:
            stream.step(NTM_FIRST)
            _ = 1 / 0
        assert stream.closed and wait_for_feeders(before) == before
        assert session.step(NTM_SECOND).shape == (2, 8) and session.step_count == 5


# ---------------------------------------------------------------------------- asyncio


def test_a_cancelled_async_stream_step_closes_the_stream(fake: FakeServer) -> None:
    async def main() -> None:
        async with (
            AsyncClient(fake.target(), options=DIRECT) as client,
            await client.session("fake") as session,
        ):
            hold = fake.service.hold("StepStream")
            async with session.step_stream() as stream:
                step = asyncio.create_task(stream.step(FIRST))
                await asyncio.to_thread(hold.wait_entered)
                step.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await step
                hold.release.set()
                assert stream.closed and session.stale
                with pytest.raises(MemserveError, match="closed"):
                    await stream.step(SECOND)
            # Leaving the block raised nothing; a new stream steps on from the re-read count.
            async with session.step_stream() as fresh:
                result = await fresh.step(SECOND)
            assert np.array_equal(result.outputs, SECOND * 2) and result.step == 5

    asyncio.run(main())


def test_an_async_stream_past_its_deadline_says_so(fake: FakeServer) -> None:
    async def main() -> None:
        async with (
            AsyncClient(fake.target(), options=DIRECT) as client,
            await client.session("fake") as session,
        ):
            stream = session.step_stream(timeout=STREAM_DEADLINE)
            assert (await stream.step(FIRST)).step == 3
            # The second step runs, but its reply is held until the deadline has passed.
            hold = fake.service.hold("StepStream")
            with pytest.raises(MemserveError) as late:
                await stream.step(SECOND)
            assert hold.entered.is_set()
            hold.release.set()
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert stream.closed and session.stale
            await stream.close()
            # The count is re-read (the held step ran: 5), so the next step goes through.
            assert np.array_equal(await session.step(SECOND), SECOND * 2)
            assert session.step_count == fake.service.steps[session.id] == 7

    asyncio.run(main())


def test_a_cancelled_async_step_marks_the_count_for_a_re_read(fake: FakeServer) -> None:
    async def main() -> None:
        async with (
            AsyncClient(fake.target(), options=DIRECT) as client,
            await client.session("fake") as session,
        ):
            hold = fake.service.hold("Step")  # the step runs; its reply waits
            step = asyncio.create_task(session.step(FIRST))
            await asyncio.to_thread(hold.wait_entered)
            step.cancel()
            with pytest.raises(asyncio.CancelledError):
                await step
            hold.release.set()
            assert session.stale
            assert np.array_equal(await session.step(SECOND), SECOND * 2)
            assert session.step_count == 5

    asyncio.run(main())


# ---------------------------------------------------------------------------- memserve chat


def chat_until_held(fake: FakeServer, method: str, lines: str) -> subprocess.Popen[str]:
    """`memserve chat` with `lines` piped in, once it waits on the held `method` (its
    output is small: it waits in the pipes until `finish`)."""
    hold = fake.service.hold(method)
    process = subprocess.Popen(
        [sys.executable, "-m", "memserve", "chat", "--target", fake.target(), "--model", "fake"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=subprocess_env(),
    )  # fmt: skip
    assert process.stdin is not None
    process.stdin.write(lines)
    process.stdin.close()
    hold.wait_entered(60)
    return process


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """The exit status, stdout and stderr of a process started by `chat_until_held`."""
    code = process.wait(60)
    assert process.stdout is not None and process.stderr is not None
    return code, process.stdout.read(), process.stderr.read()


def test_ctrl_c_while_the_chat_starts_exits_130(fake: FakeServer) -> None:
    process = chat_until_held(fake, "CreateSession", "hello\n")
    process.send_signal(signal.SIGINT)
    fake.service.release_all()
    code, stdout, stderr = finish(process)
    assert code == 130 and stdout == ""
    assert "Traceback" not in stderr


def ignores_sigint(pid: int) -> bool:
    """Whether process `pid` ignores SIGINT now (the SigIgn mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    raise AssertionError(f"no SigIgn line in /proc/{pid}/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_ctrl_c_while_the_chat_deletes_its_sessions_deletes_them_all(fake: FakeServer) -> None:
    # A reply, a fork (the original is kept), then the end of the input: two deletions,
    # the first of them held while Ctrl-C comes.
    process = chat_until_held(fake, "DeleteSession", "hello\n/fork\n")
    # The chat ignores SIGINT while it deletes; an ignored signal is discarded as it is
    # sent, so once send_signal returns there is nothing left to arrive later.
    assert ignores_sigint(process.pid)
    process.send_signal(signal.SIGINT)
    fake.service.release_all()
    code, stdout, stderr = finish(process)
    assert code == 0, stderr
    assert stdout == "you said: hello\n" and "Traceback" not in stderr
    assert "could not delete" not in stderr
    assert fake.service.attempts["DeleteSession"] == 2 and fake.service.steps == {}
