"""The asyncio client against a real server: the same calls as the blocking client, with
the same results (steps equal to the model in process, numpy and torch), the async session,
step stream and token iterator, cancel, deadlines and errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import grpc
import numpy as np
import pytest
import torch

from bench.child_server import ServerProcess
from clients import AsyncClient, AsyncSession, MemserveError
from models.base import MemoryModel
from tests.clients.servers import DIRECT, LIMIT, MAX_STEPS, TINY, close_to, served
from tests.serving.conftest import Reference, random_inputs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory) as process:
        yield process


def run(server: ServerProcess, body: Callable[[AsyncClient], Awaitable[None]]) -> None:
    """Run `body` with a fresh AsyncClient in a fresh event loop."""

    async def main() -> None:
        async with AsyncClient(server.target, timeout=60, options=DIRECT) as client:
            await body(client)

    asyncio.run(main())


def test_list_models(server: ServerProcess) -> None:
    async def body(client: AsyncClient) -> None:
        models = {model.name: model for model in await client.list_models()}
        assert set(models) == {"ntm-copy", TINY} and models["ntm-copy"].output_size == 8

    run(server, body)


def test_steps_numpy_and_torch_equal_the_model_in_process(
    server: ServerProcess, ntm: MemoryModel
) -> None:
    rng = np.random.default_rng()
    reference = Reference(ntm)

    async def body(client: AsyncClient) -> None:
        async with await client.session("ntm-copy") as session:
            inputs = random_inputs(rng, 3, 9)
            outputs = await session.step(inputs)
            assert isinstance(outputs, np.ndarray) and close_to(outputs, reference.step(inputs))
            tensor = torch.from_numpy(random_inputs(rng, 2, 9))
            result = await client.step(session.id, tensor, expected_step=3)
            assert isinstance(result.outputs, torch.Tensor) and result.step == 5
            assert close_to(result.outputs.numpy(), reference.step(tensor.numpy()))
            assert session.step_count == 3  # a step around the session object: it must re-read
            assert (await session.info()).step == session.step_count == 5
            async with session.step_stream() as stream:
                for steps in (1, 4):
                    inputs = random_inputs(rng, steps, 9)
                    streamed = await stream.step(inputs)
                    assert close_to(streamed.outputs, reference.step(inputs))
                    assert streamed.step == reference.steps
            assert (await session.info()).step == reference.steps == session.step_count
        with pytest.raises(MemserveError) as gone:
            await client.get_session(session.id)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND

    run(server, body)


def test_fork_export_import_and_delete(server: ServerProcess) -> None:
    rng = np.random.default_rng()

    async def body(client: AsyncClient) -> None:
        async with await client.session("ntm-copy") as parent:
            await parent.step(random_inputs(rng, 4, 9))
            async with await parent.fork() as child:
                one, other = random_inputs(rng, 2, 9), random_inputs(rng, 2, 9)
                a, b = await child.step(one), await parent.step(other)
                assert not np.array_equal(a, b) and child.step_count == parent.step_count == 6
                state = await child.export()
                exported = await client.export_session(child.id)
                assert exported.step == 6 and exported.model == "ntm-copy"
                info = await client.import_session(state)
                async with AsyncSession(client, info) as copy:
                    inputs = random_inputs(rng, 3, 9)
                    np.testing.assert_array_equal(await copy.step(inputs), await child.step(inputs))
            raw = await client.fork_session(parent.id, ttl_seconds=30)
            assert raw.ttl_seconds == 30
            await client.delete_session(raw.session_id)
            with pytest.raises(MemserveError, match="NOT_FOUND"):
                await client.delete_session(raw.session_id)  # a first attempt: raised

    run(server, body)


def test_generate_async_iterator_and_cancel(server: ServerProcess) -> None:
    async def body(client: AsyncClient) -> None:
        async with await client.session(TINY) as session:
            generation = session.generate("hi ! how are you ?", max_tokens=10, seed=2)
            pieces = [piece async for piece in generation]
            done = generation.done
            assert done is not None and "".join(pieces).strip() == done.text
            assert done.completion_tokens == 10 and session.step_count == done.step
            long = client.generate(session.id, "a long one", max_tokens=LIMIT)
            assert isinstance(await long.__anext__(), str)
            long.cancel()
            assert [piece async for piece in long] == [] and long.done is None
            with pytest.raises(MemserveError, match="CANCELLED"):
                await long.result()
            assert (await session.generate("again", max_tokens=3).result()).completion_tokens == 3

    run(server, body)


def test_deadlines_and_errors(server: ServerProcess) -> None:
    async def body(client: AsyncClient) -> None:
        with pytest.raises(MemserveError) as unknown:
            await client.session("no-such-model")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert "no model 'no-such-model'" in unknown.value.message
        async with await client.session("ntm-copy") as session:
            with pytest.raises(MemserveError) as late:
                await session.step(np.zeros((MAX_STEPS, 9), np.float32), timeout=1e-4)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            stream = client.step_stream(session.id)
            with pytest.raises(MemserveError, match="INVALID_ARGUMENT"):
                await stream.step(np.zeros((1, 2), np.float32))
            with pytest.raises(MemserveError, match="closed"):
                await stream.step(np.zeros((1, 9), np.float32))
            await stream.close()
        async with await client.session(TINY) as chat:
            generation = chat.generate("hello", max_tokens=LIMIT, timeout=1e-4)
            with pytest.raises(MemserveError, match="DEADLINE_EXCEEDED"):
                await generation.result()

    run(server, body)
