"""The client library against a real server, each test once per face (blocking and asyncio,
tests/clients/faces.py): every RPC, numpy and torch steps equal to the model stepped in
process, the session object (step count, deletion on exit with its open streams, re-sync
after a failure), step streams, forks, export/import, the token iterator of Generate and its
cancel, deadlines, errors as MemserveError; and the README's example."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

import clients
from bench.child_server import ServerProcess
from clients import AsyncClient, MemserveError
from clients.messages import decode_outputs
from models.base import MemoryModel
from protos import tensors
from tests.clients.faces import Face
from tests.clients.servers import (
    DIRECT,
    LIMIT,
    MAX_STEPS,
    ROOT,
    TINY,
    same_bits,
    served,
    subprocess_env,
)
from tests.serving.conftest import Reference, random_inputs

# Any deadline will do for the calls made while the server is held: none can be answered.
HASTY = 0.1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory, "vmed-chat") as process:  # vmed-chat: the README's example
        yield process


def connect(face: Face, server: ServerProcess, timeout: float | None = 60) -> AsyncClient:
    return face.client(server.target, timeout=timeout, options=DIRECT)


def test_every_public_name_resolves() -> None:
    """`__all__` names what `from clients import *` gives: each loads from the module that
    defines it (classes under their own name), and other names are refused."""
    assert len(set(clients.__all__)) == len(clients.__all__)
    namespace: dict[str, object] = {}
    exec("from clients import *", namespace)
    for name in clients.__all__:
        value = namespace[name]
        kind = value if isinstance(value, type) else type(value)
        assert kind.__module__.startswith("clients."), (name, kind.__module__)
        assert not isinstance(value, type) or value.__name__ == name
    assert isinstance(clients.NO_RETRIES, clients.RetryPolicy) and clients.NO_RETRIES.attempts == 1
    with pytest.raises(AttributeError, match="no attribute 'Sessions'"):
        _ = clients.Sessions


def test_both_faces_have_the_same_methods() -> None:
    """Each public method of a blocking class is on its asyncio twin, and the other way."""
    twins = [
        (clients.Client, clients.AsyncClient),
        (clients.Session, clients.AsyncSession),
        (clients.StepStream, clients.AsyncStepStream),
        (clients.Generation, clients.AsyncGeneration),
    ]
    for blocking, asynchronous in twins:

        def public(kind: type) -> set[str]:
            return {name for name in dir(kind) if not name.startswith("_")}

        assert public(blocking) == public(asynchronous), (blocking, asynchronous)


def test_list_models_describes_the_served_models(server: ServerProcess, face: Face) -> None:
    async def body() -> None:
        async with connect(face, server) as client:
            models = {model.name: model for model in await client.list_models()}
        assert set(models) == {"ntm-copy", "vmed-chat", TINY}
        ntm = models["ntm-copy"]
        assert (ntm.type, ntm.input_size, ntm.output_size) == ("ntm", 9, 8)
        assert ntm.memory_shape == (128, 20) and ntm.state_bytes > 0
        assert models[TINY].type == "vmed"

    face.run(body)


def test_numpy_steps_equal_the_model_in_process(
    server: ServerProcess, face: Face, ntm: MemoryModel
) -> None:
    rng = np.random.default_rng()
    reference = Reference(ntm)

    async def body() -> None:
        async with connect(face, server) as client, await client.session("ntm-copy") as session:
            assert session.step_count == 0
            for steps in (1, 5, 3):
                inputs = random_inputs(rng, steps, 9)
                outputs = await session.step(inputs)
                assert isinstance(outputs, np.ndarray) and outputs.dtype == np.float32
                assert same_bits(outputs, reference.step(inputs))
                assert session.step_count == reference.steps
            outputs[0, 0] = 1.0  # the library hands out writable arrays
            inputs = random_inputs(rng, 2, 9).astype(np.float64)  # sent as float32
            result = await client.step(session.id, inputs, expected_step=reference.steps)
            assert same_bits(result.outputs, reference.step(inputs.astype(np.float32)))
            # A step around the session object: the session must re-read its count.
            assert session.step_count == reference.steps - 2
            assert result.step == reference.steps == (await session.info()).step
            assert session.step_count == reference.steps

    face.run(body)


def test_torch_in_gives_torch_out(server: ServerProcess, face: Face, ntm: MemoryModel) -> None:
    reference = Reference(ntm)

    async def body() -> None:
        async with connect(face, server) as client, await client.session("ntm-copy") as session:
            inputs = torch.rand(4, 9, dtype=torch.float64, requires_grad=True)
            outputs = await session.step(inputs)
            assert isinstance(outputs, torch.Tensor) and outputs.dtype == torch.float32
            expected = reference.step(inputs.detach().float().numpy())
            assert same_bits(outputs.numpy(), expected)
            result = await client.step(session.id, torch.zeros(1, 9))
            assert isinstance(result.outputs, torch.Tensor) and result.step == 5

    face.run(body)


def test_torch_outputs_go_to_the_device_of_the_inputs() -> None:
    # Without an accelerator, the "meta" device stands in for one: the outputs are not on
    # the CPU, where the wire's numpy array is, but where the inputs were.
    wire = tensors.encode(np.arange(16, dtype=np.float32).reshape(2, 8))
    like = torch.empty(2, 9, device="meta")
    outputs = decode_outputs(wire, like)
    assert isinstance(outputs, torch.Tensor) and outputs.device.type == "meta"
    assert outputs.shape == (2, 8) and outputs.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_inputs_give_cuda_outputs(server: ServerProcess, face: Face, ntm: MemoryModel) -> None:
    reference = Reference(ntm)

    async def body() -> None:
        async with connect(face, server) as client, await client.session("ntm-copy") as session:
            inputs = torch.rand(3, 9, device="cuda")
            outputs = await session.step(inputs)
            assert isinstance(outputs, torch.Tensor) and outputs.device == inputs.device
            assert same_bits(outputs.cpu().numpy(), reference.step(inputs.cpu().numpy()))

    face.run(body)


def test_numpy_callers_never_import_torch(server: ServerProcess) -> None:
    code = f"""
import asyncio
import sys
import numpy as np
from clients import AsyncClient, Client
with Client({server.target!r}) as client, client.session("ntm-copy") as session:
    assert session.step(np.zeros((2, 9), np.float32)).shape == (2, 8)
    pieces = list(client.session({TINY!r}).generate("hi", max_tokens=2))
async def main():
    async with AsyncClient({server.target!r}) as client:
        async with await client.session("ntm-copy") as session:
            assert (await session.step(np.zeros((2, 9), np.float32))).shape == (2, 8)
asyncio.run(main())
assert "torch" not in sys.modules, "torch was imported"
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_session_is_deleted_when_its_block_ends(server: ServerProcess, face: Face) -> None:
    async def body() -> None:
        async with connect(face, server) as client:
            async with await client.session("ntm-copy", ttl_seconds=120, seed=3) as session:
                info = await session.info()
                assert (info.model, info.step, info.ttl_seconds) == ("ntm-copy", 0, 120)
                assert info.residence == "active"
            with pytest.raises(MemserveError) as gone:
                await client.get_session(session.id)
            assert gone.value.code == grpc.StatusCode.NOT_FOUND
            assert session.id in gone.value.message and session.deleted

            with pytest.raises(ZeroDivisionError):
                async with await client.session("ntm-copy") as failing:
                    _ = 1 / 0  # the block's own error comes out; the session is deleted anyway
            with pytest.raises(MemserveError, match="NOT_FOUND"):
                await client.get_session(failing.id)
            await failing.delete()  # deleting again is fine

    face.run(body)


def test_streams_left_open_end_with_the_session_block(server: ServerProcess, face: Face) -> None:
    """A session's block ends the streams it opened as their own blocks would: closed (the
    server ends the call: OK), or cancelled when the block raised; then the session is
    deleted. The same in both faces."""
    one = np.zeros((1, 9), np.float32)

    async def body() -> None:
        async with connect(face, server) as client:
            async with await client.session("ntm-copy") as session:
                left_open = session.step_stream()
                assert (await left_open.step(one)).step == 1
            assert left_open.closed and session.deleted
            assert await face.status(left_open) == grpc.StatusCode.OK

            with pytest.raises(ZeroDivisionError):
                async with await client.session("ntm-copy") as failing:
                    cut = failing.step_stream()
                    await cut.step(one)
                    _ = 1 / 0
            assert cut.closed and failing.deleted
            assert await face.status(cut) == grpc.StatusCode.CANCELLED

            async with await client.session("ntm-copy") as session:
                with pytest.raises(ZeroDivisionError):
                    async with session.step_stream() as stream:  # its own block raises
                        await stream.step(one)
                        _ = 1 / 0
                assert stream.closed and await face.status(stream) == grpc.StatusCode.CANCELLED
                assert (await session.step(one)).shape == (1, 8) and session.step_count == 2

    face.run(body)


def test_streams_left_open_are_cancelled_when_the_client_closes(
    server: ServerProcess, face: Face
) -> None:
    async def body() -> None:
        async with connect(face, server) as client:
            session_id = (await client.create_session("ntm-copy")).session_id
            raw = client.step_stream(session_id)  # no session to end it: the client does
            assert (await raw.step(np.zeros((3, 9), np.float32))).step == 3
        assert raw.closed and await face.status(raw) == grpc.StatusCode.CANCELLED
        async with connect(face, server) as other:
            assert (await other.get_session(session_id)).step == 3  # the stream ended, not it
            await other.delete_session(session_id)

    face.run(body)


def test_step_stream_matches_the_model_in_process(
    server: ServerProcess, face: Face, ntm: MemoryModel
) -> None:
    rng = np.random.default_rng()
    reference = Reference(ntm)

    async def body() -> None:
        async with connect(face, server) as client, await client.session("ntm-copy") as session:
            async with session.step_stream() as stream:
                for steps in (1, 3, 1, 7):
                    inputs = random_inputs(rng, steps, 9)
                    result = await stream.step(inputs)
                    assert same_bits(result.outputs, reference.step(inputs))
                    assert result.step == reference.steps == session.step_count
            assert stream.closed and await face.status(stream) == grpc.StatusCode.OK
            inputs = random_inputs(rng, 2, 9)  # unary steps continue where the stream stopped
            assert same_bits(await session.step(inputs), reference.step(inputs))

            raw = client.step_stream(session.id)  # the raw stream: no expected_step
            assert (await raw.step(torch.zeros(1, 9))).step == reference.steps + 1
            with pytest.raises(MemserveError) as refused:
                await raw.step(np.zeros((1, 4), np.float32))
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "inputs.shape must be [T, 9]" in refused.value.message
            with pytest.raises(MemserveError, match="closed") as closed:  # an error ends it
                await raw.step(np.zeros((1, 9), np.float32))
            assert closed.value.code == grpc.StatusCode.FAILED_PRECONDITION
            await raw.close()

    face.run(body)


def test_fork_evolves_independently(server: ServerProcess, face: Face, ntm: MemoryModel) -> None:
    rng = np.random.default_rng()
    parent_reference = Reference(ntm)

    async def body() -> None:
        async with connect(face, server) as client, await client.session("ntm-copy") as parent:
            first = random_inputs(rng, 4, 9)
            assert same_bits(await parent.step(first), parent_reference.step(first))
            child_reference = parent_reference.fork()
            async with await parent.fork(ttl_seconds=60) as child:
                assert child.id != parent.id and child.step_count == 4
                for _ in range(2):
                    one, other = random_inputs(rng, 3, 9), random_inputs(rng, 2, 9)
                    assert same_bits(await child.step(one), child_reference.step(one))
                    assert same_bits(await parent.step(other), parent_reference.step(other))
                assert (child.step_count, parent.step_count) == (10, 8)
            raw = await client.fork_session(parent.id, ttl_seconds=30)
            assert (raw.step, raw.model, raw.ttl_seconds) == (8, "ntm-copy", 30)
            await client.delete_session(raw.session_id)
            with pytest.raises(MemserveError, match="NOT_FOUND"):
                await client.delete_session(raw.session_id)  # a first attempt: raised

    face.run(body)


def test_export_then_import_continues_bit_identically(server: ServerProcess, face: Face) -> None:
    rng = np.random.default_rng()

    async def body() -> None:
        async with connect(face, server) as client, await client.session("ntm-copy") as original:
            await original.step(random_inputs(rng, 5, 9))
            state = await original.export()
            exported = await client.export_session(original.id)
            assert (exported.model, exported.step) == ("ntm-copy", 5) and exported.state
            info = await client.import_session(state, ttl_seconds=60)
            async with face.session(client, info) as copy:
                assert copy.id != original.id and copy.step_count == 5
                inputs = random_inputs(rng, 3, 9)
                copied, stepped = await copy.step(inputs), await original.step(inputs)
                np.testing.assert_array_equal(copied, stepped)

    face.run(body)


def test_generate_streams_pieces_that_join_to_the_reply(server: ServerProcess, face: Face) -> None:
    async def body() -> None:
        async with connect(face, server) as client, await client.session(TINY) as session:
            generation = session.generate("hi ! how are you ?", max_tokens=12, temperature=0.0,
                                          seed=1)  # fmt: skip
            pieces = [piece async for piece in generation]
            done = generation.done
            assert done is not None and len(pieces) >= 2
            assert "".join(pieces).strip() == done.text
            assert (done.finish_reason, done.completion_tokens) == ("length", 12)
            assert done.prompt_tokens > 1 and session.step_count == done.step
            assert (await session.info()).step == done.step
            again = client.generate(session.id, "and you ?", max_tokens=3, stop=["zzz"],
                                    top_k=5, top_p=0.9, temperature=0.5)  # fmt: skip
            assert (await again.result()).step > done.step

    face.run(body)


def test_cancel_ends_the_reply_and_the_session_stays_usable(
    server: ServerProcess, face: Face
) -> None:
    async def body() -> None:
        async with connect(face, server) as client, await client.session(TINY) as session:
            generation = session.generate("tell me a long story", max_tokens=LIMIT)
            first = await generation.__anext__()
            assert isinstance(first, str)
            generation.cancel()  # whatever of the reply has arrived meanwhile is not read
            assert [piece async for piece in generation] == []
            assert generation.cancelled and generation.done is None
            with pytest.raises(MemserveError) as cancelled:
                await generation.result()
            assert cancelled.value.code == grpc.StatusCode.CANCELLED
            assert session.stale  # the step count is re-read before the next call needs it
            done = await session.generate("ok , shorter", max_tokens=4).result()
            assert done.completion_tokens == 4 and session.step_count == done.step

    face.run(body)


def test_deadlines_default_per_client_and_per_call(server: ServerProcess, face: Face) -> None:
    """The client's timeout bounds each call, a call's own timeout replaces it, and a call
    past its deadline fails with DEADLINE_EXCEEDED: certain, not a race, because the server
    is held (stopped) while those calls wait. (Which deadline goes on the wire is checked
    exactly against the stand-in server, in test_channel.py.)"""
    long_inputs = np.zeros((MAX_STEPS, 9), np.float32)
    one = np.zeros((1, 9), np.float32)

    async def body() -> None:
        async with connect(face, server, timeout=HASTY) as hasty:
            await hasty.list_models(timeout=60)  # connected: what follows waits on the server
            session = await hasty.session("ntm-copy", timeout=60)  # a call's own deadline
            chat = await hasty.session(TINY, timeout=60)
            with server.held():
                with pytest.raises(MemserveError) as late:  # the client's deadline
                    await hasty.create_session("ntm-copy")
                assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                with pytest.raises(MemserveError) as cut:
                    await session.step(long_inputs, timeout=HASTY)
                assert cut.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and session.stale
                generation = chat.generate("hello", max_tokens=LIMIT, timeout=HASTY)
                with pytest.raises(MemserveError, match="DEADLINE_EXCEEDED"):
                    await generation.result()
            # The cut step may have reached the server, and may run some of its steps until
            # the server notices the cut at its next launch. A step without expected_step
            # waits behind it in the session's queue: once it is answered, the cut call has
            # stopped and the count holds still.
            after = await hasty.step(session.id, one, timeout=60)
            assert 1 <= after.step <= MAX_STEPS + 1
            # The session (which re-reads the count) steps on, with the right expected_step.
            outputs = await session.step(one, timeout=60)
            assert outputs.shape == (1, 8) and session.step_count == after.step + 1
            assert (await session.info(timeout=60)).step == after.step + 1
            await session.delete(timeout=60)
            await chat.delete(timeout=60)

    face.run(body)


def test_errors_carry_the_code_and_the_server_message(server: ServerProcess, face: Face) -> None:
    async def body() -> None:
        async with connect(face, server) as client:
            with pytest.raises(MemserveError) as unknown:
                await client.session("no-such-model")
            assert unknown.value.code == grpc.StatusCode.NOT_FOUND
            assert "no model 'no-such-model'" in unknown.value.message
            assert unknown.value.attempts == 1
            async with await client.session("ntm-copy") as session:
                with pytest.raises(MemserveError) as bad_shape:
                    await session.step(np.zeros((2, 3), np.float32))
                assert bad_shape.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "inputs.shape must be [T, 9]" in bad_shape.value.message
                with pytest.raises(MemserveError) as out_of_order:
                    await client.step(session.id, np.zeros((1, 9), np.float32), expected_step=7)
                assert out_of_order.value.code == grpc.StatusCode.FAILED_PRECONDITION
                with pytest.raises(MemserveError) as no_text:
                    await session.generate("hello").result()
                assert no_text.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert "does not generate text" in no_text.value.message
            with pytest.raises(MemserveError) as bad_state:
                await client.import_session(b"not safetensors")
            assert bad_state.value.code == grpc.StatusCode.INVALID_ARGUMENT

    face.run(body)


README = ROOT / "README.md"


def test_readme_clients_example_runs(server: ServerProcess) -> None:
    section = README.read_text().split("## Clients", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    code = code.replace("127.0.0.1:50051", server.target)
    exec(compile(code, str(README), "exec"), {})
