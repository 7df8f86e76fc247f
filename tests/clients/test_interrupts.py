"""Calls cut short by the caller, each test once per face where the faces share it: a step
or a stream step interrupted while the stand-in server (tests/clients/fake_server.py) holds
its reply (Ctrl-C in the blocking face, a cancelled task in asyncio), a stream past its
deadline. Each leaves the stream closed (never answering a step with an earlier step's
reply) and the session's step count marked for a re-read, so the next step goes through.
The blocking face's own: gRPC's thread that feeds a stream its requests ends with the
stream, however it ends (against a real server: nothing there needs a cue). `memserve chat`
interrupted while it replies, while it starts or while it deletes its sessions."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.child_server import ServerProcess
from clients import Client, MemserveError
from tests.clients.faces import Face
from tests.clients.fake_server import FakeServer
from tests.clients.servers import DIRECT, ROOT, Watched, served, subprocess_env

FIRST = np.ones((3, 2), np.float32)  # the stand-in's model: 2 inputs, outputs twice them
SECOND = np.full((2, 2), 5.0, np.float32)
NTM_FIRST = np.ones((3, 9), np.float32)  # ntm-copy on the real server: 9 inputs, 8 outputs
NTM_SECOND = np.zeros((2, 9), np.float32)
STREAM_DEADLINE = 0.5  # seconds; any will do: the step is held until the client has given up
JOIN_SECONDS = 60  # how long a thread may take to end (only a failing test waits that long)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory) as process:
        yield process


# ---------------------------------------------------------------------------- both faces


def test_an_interrupted_stream_step_ends_the_stream(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with (
            face.client(fake.target(), options=DIRECT) as client,
            await client.session("fake") as session,
        ):
            async with session.step_stream() as stream:
                hold = fake.service.hold("StepStream")  # the step runs; its reply waits
                await face.interrupt(lambda: stream.step(FIRST), hold)
                assert stream.closed and session.stale
                # The first step's reply must never answer a later step.
                with pytest.raises(MemserveError, match="closed") as closed:
                    await stream.step(SECOND)
                assert closed.value.code == grpc.StatusCode.FAILED_PRECONDITION
            # Leaving the block raised nothing; a new stream steps on from the re-read count.
            async with session.step_stream() as fresh:
                result = await fresh.step(SECOND)  # the first step ran: 3 + 2
            assert np.array_equal(result.outputs, SECOND * 2) and result.step == 5
            assert session.step_count == 5 and not session.stale

    face.run(body)


def test_an_interrupted_step_marks_the_count_for_a_re_read(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with (
            face.client(fake.target(), options=DIRECT) as client,
            await client.session("fake") as session,
        ):
            hold = fake.service.hold("Step")  # the step runs; its reply waits
            await face.interrupt(lambda: session.step(FIRST), hold)
            assert session.stale
            assert np.array_equal(await session.step(SECOND), SECOND * 2)  # expected_step 3
            assert session.step_count == fake.service.steps[session.id] == 5

    face.run(body)


def test_a_stream_past_its_deadline_says_so(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with (
            face.client(fake.target(), options=DIRECT) as client,
            await client.session("fake") as session,
        ):
            stream = session.step_stream(timeout=STREAM_DEADLINE)
            fake.service.hold("StepStream")  # if the step gets there, its reply waits
            with pytest.raises(MemserveError) as late:
                await stream.step(FIRST)
            fake.service.release_all()
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert stream.closed and session.stale
            await stream.close()
            # The count is re-read (whether the step got to run or not), so the next goes on.
            assert np.array_equal(await session.step(SECOND), SECOND * 2)
            assert session.step_count == fake.service.steps[session.id]

    face.run(body)


# ---------------------------------------------------------------------------- blocking


def request_feeders() -> set[threading.Thread]:
    """gRPC's client threads that end with a blocking stream: the one that feeds it its
    requests, and the channel's poller (the stand-in server's threads are named otherwise)."""
    return {thread for thread in threading.enumerate() if thread.name.endswith("(_run)")}


def assert_ended(threads: set[threading.Thread]) -> None:
    for thread in threads:
        thread.join(JOIN_SECONDS)
        assert not thread.is_alive(), thread.name


def assert_deleted(client: Client, session_id: str) -> None:
    with pytest.raises(MemserveError) as gone:
        client.get_session(session_id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


def test_a_blocking_stream_s_request_thread_ends_with_it(server: ServerProcess) -> None:
    """However a blocking stream ends (its session's block, a block that raised, its client
    closing, its own block raising), gRPC's thread that reads its requests ends with it."""
    before = request_feeders()
    with Client(server.target, options=DIRECT) as client:
        with client.session("ntm-copy") as session:
            stream = session.step_stream()
            stream.step(NTM_FIRST)
            started = request_feeders() - before
            assert started  # the stream's own thread, at least
        assert stream.closed
        assert_ended(started)
        assert_deleted(client, session.id)

        with pytest.raises(ZeroDivisionError), client.session("ntm-copy") as failing:
            kept = failing.step_stream()
            kept.step(NTM_FIRST)
            started = request_feeders() - before
            _ = 1 / 0
        assert kept.closed
        assert_ended(started)
        assert_deleted(client, failing.id)

        with client.session("ntm-copy") as session:
            with pytest.raises(ZeroDivisionError), session.step_stream() as own:
                own.step(NTM_FIRST)
                started = request_feeders() - before
                _ = 1 / 0
            assert own.closed
            assert_ended(started)
            assert session.step(NTM_SECOND).shape == (2, 8) and session.step_count == 5

        session_id = client.create_session("ntm-copy").session_id
        raw = client.step_stream(session_id)  # no session to end it: the client does
        raw.step(NTM_FIRST)
        started = request_feeders() - before
    assert raw.closed
    assert_ended(started)
    with Client(server.target, options=DIRECT) as other:
        assert other.get_session(session_id).step == 3  # the stream ended, not the session
        other.delete_session(session_id)


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


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(fake: FakeServer) -> None:
    fake.service.hold("Generate")  # the first reply stops after its first piece
    command = [sys.executable, "-m", "memserve", "chat", "--target", fake.target(), "--model",
               "fake"]  # fmt: skip
    with Watched(command) as chat:
        chat.send("tell me everything")
        # The first piece is out: the chat is in the reply, which cannot end by itself.
        chat.wait_for(lambda: chat.text() != "")
        chat.process.send_signal(signal.SIGINT)
        chat.wait_for(lambda: "(reply stopped)" in chat.text("stderr"))
        fake.service.release_all()
        assert chat.text() == "you\n"  # the cut reply, ended by a newline
        chat.send("and now ?")
        chat.wait_for(lambda: chat.text().count("\n") == 2)
        assert chat.text().splitlines() == ["you", "you said: and now ?"]
        assert chat.finish() == 0
        assert "Traceback" not in chat.text("stderr")


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
