"""The blocking client against a real server: every RPC, numpy and torch steps equal to the
model stepped in process, the session object (step count, deletion on exit, re-sync after
a failure), step streams, forks, export/import, the token iterator of Generate and its
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
from clients import Client, MemserveError, Session
from clients.messages import decode_outputs
from models.base import MemoryModel
from protos import tensors
from tests.clients.servers import (
    DIRECT,
    LIMIT,
    MAX_STEPS,
    ROOT,
    TINY,
    close_to,
    served,
    subprocess_env,
)
from tests.serving.conftest import Reference, random_inputs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory, "vmed-chat") as process:  # vmed-chat: the README's example
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=60, options=DIRECT) as connection:
        yield connection


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


def test_list_models_describes_the_served_models(client: Client) -> None:
    models = {model.name: model for model in client.list_models()}
    assert set(models) == {"ntm-copy", "vmed-chat", TINY}
    ntm = models["ntm-copy"]
    assert (ntm.type, ntm.input_size, ntm.output_size) == ("ntm", 9, 8)
    assert ntm.memory_shape == (128, 20) and ntm.state_bytes > 0
    assert models[TINY].type == "vmed"


def test_numpy_steps_equal_the_model_in_process(client: Client, ntm: MemoryModel) -> None:
    rng = np.random.default_rng()
    reference = Reference(ntm)
    with client.session("ntm-copy") as session:
        assert session.step_count == 0
        for steps in (1, 5, 3):
            inputs = random_inputs(rng, steps, 9)
            outputs = session.step(inputs)
            assert isinstance(outputs, np.ndarray) and outputs.dtype == np.float32
            assert close_to(outputs, reference.step(inputs))
            assert session.step_count == reference.steps
        outputs[0, 0] = 1.0  # the library hands out writable arrays
        inputs = random_inputs(rng, 2, 9).astype(np.float64)  # sent as float32
        result = client.step(session.id, inputs, expected_step=reference.steps)
        assert close_to(result.outputs, reference.step(inputs.astype(np.float32)))
        assert result.step == reference.steps == session.info().step == session.step_count


def test_torch_in_gives_torch_out(client: Client, ntm: MemoryModel) -> None:
    reference = Reference(ntm)
    with client.session("ntm-copy") as session:
        inputs = torch.rand(4, 9, dtype=torch.float64, requires_grad=True)
        outputs = session.step(inputs)
        assert isinstance(outputs, torch.Tensor) and outputs.dtype == torch.float32
        expected = reference.step(inputs.detach().float().numpy())
        assert close_to(outputs.numpy(), expected)
        result = client.step(session.id, torch.zeros(1, 9))
        assert isinstance(result.outputs, torch.Tensor) and result.step == 5


def test_torch_outputs_go_to_the_device_of_the_inputs() -> None:
    # Without an accelerator, the "meta" device stands in for one: the outputs are not on
    # the CPU, where the wire's numpy array is, but where the inputs were.
    wire = tensors.encode(np.arange(16, dtype=np.float32).reshape(2, 8))
    like = torch.empty(2, 9, device="meta")
    outputs = decode_outputs(wire, like)
    assert isinstance(outputs, torch.Tensor) and outputs.device.type == "meta"
    assert outputs.shape == (2, 8) and outputs.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_inputs_give_cuda_outputs(client: Client, ntm: MemoryModel) -> None:
    reference = Reference(ntm)
    with client.session("ntm-copy") as session:
        inputs = torch.rand(3, 9, device="cuda")
        outputs = session.step(inputs)
        assert isinstance(outputs, torch.Tensor) and outputs.device == inputs.device
        assert close_to(outputs.cpu().numpy(), reference.step(inputs.cpu().numpy()))


def test_numpy_callers_never_import_torch(server: ServerProcess) -> None:
    code = f"""
import sys
import numpy as np
from clients import Client
with Client({server.target!r}) as client, client.session("ntm-copy") as session:
    assert session.step(np.zeros((2, 9), np.float32)).shape == (2, 8)
    pieces = list(client.session({TINY!r}).generate("hi", max_tokens=2))
assert "torch" not in sys.modules, "torch was imported"
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_session_is_deleted_when_its_block_ends(client: Client) -> None:
    with client.session("ntm-copy", ttl_seconds=120, seed=3) as session:
        info = session.info()
        assert (info.model, info.step, info.ttl_seconds) == ("ntm-copy", 0, 120)
        assert info.residence == "active"
    with pytest.raises(MemserveError) as gone:
        client.get_session(session.id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND and session.id in gone.value.message

    with pytest.raises(ZeroDivisionError), client.session("ntm-copy") as failing:
        _ = 1 / 0  # the block's own error comes out; the session is deleted anyway
    with pytest.raises(MemserveError, match="NOT_FOUND"):
        client.get_session(failing.id)
    failing.delete()  # deleting again is fine


def test_step_stream_matches_the_model_in_process(client: Client, ntm: MemoryModel) -> None:
    rng = np.random.default_rng()
    reference = Reference(ntm)
    with client.session("ntm-copy") as session:
        with session.step_stream() as stream:
            for steps in (1, 3, 1, 7):
                inputs = random_inputs(rng, steps, 9)
                result = stream.step(inputs)
                assert close_to(result.outputs, reference.step(inputs))
                assert result.step == reference.steps == session.step_count
        inputs = random_inputs(rng, 2, 9)  # unary steps continue where the stream stopped
        assert close_to(session.step(inputs), reference.step(inputs))

        stream = client.step_stream(session.id)  # the raw stream: no expected_step
        assert stream.step(torch.zeros(1, 9)).step == reference.steps + 1
        with pytest.raises(MemserveError) as refused:
            stream.step(np.zeros((1, 4), np.float32))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs.shape must be [T, 9]" in refused.value.message
        with pytest.raises(MemserveError, match="closed"):  # an error ends the stream
            stream.step(np.zeros((1, 9), np.float32))
        stream.close()


def test_fork_evolves_independently(client: Client, ntm: MemoryModel) -> None:
    rng = np.random.default_rng()
    parent_reference = Reference(ntm)
    with client.session("ntm-copy") as parent:
        first = random_inputs(rng, 4, 9)
        assert close_to(parent.step(first), parent_reference.step(first))
        child_reference = parent_reference.fork()
        with parent.fork(ttl_seconds=60) as child:
            assert child.id != parent.id and child.step_count == 4
            for _ in range(2):
                one, other = random_inputs(rng, 3, 9), random_inputs(rng, 2, 9)
                assert close_to(child.step(one), child_reference.step(one))
                assert close_to(parent.step(other), parent_reference.step(other))
            assert (child.step_count, parent.step_count) == (10, 8)
        raw = client.fork_session(parent.id)
        assert raw.step == 8 and raw.model == "ntm-copy"
        client.delete_session(raw.session_id)


def test_export_then_import_continues_bit_identically(client: Client) -> None:
    rng = np.random.default_rng()
    with client.session("ntm-copy") as original:
        original.step(random_inputs(rng, 5, 9))
        state = original.export()
        exported = client.export_session(original.id)
        assert (exported.model, exported.step) == ("ntm-copy", 5) and exported.state
        with Session(client, client.import_session(state, ttl_seconds=60)) as copy:
            assert copy.id != original.id and copy.step_count == 5
            inputs = random_inputs(rng, 3, 9)
            np.testing.assert_array_equal(copy.step(inputs), original.step(inputs))


def test_generate_streams_pieces_that_join_to_the_reply(client: Client) -> None:
    with client.session(TINY) as session:
        generation = session.generate("hi ! how are you ?", max_tokens=12, temperature=0.0,
                                      seed=1)  # fmt: skip
        pieces = list(generation)
        done = generation.done
        assert done is not None and len(pieces) >= 2
        assert "".join(pieces).strip() == done.text
        assert (done.finish_reason, done.completion_tokens) == ("length", 12)
        assert done.prompt_tokens > 1 and session.step_count == done.step
        assert session.info().step == done.step
        again = client.generate(session.id, "and you ?", max_tokens=3, stop=["zzz"], top_k=5,
                                top_p=0.9, temperature=0.5)  # fmt: skip
        assert again.result().step > done.step


def test_cancel_ends_the_reply_and_the_session_stays_usable(client: Client) -> None:
    with client.session(TINY) as session:
        generation = session.generate("tell me a long story", max_tokens=LIMIT)
        first = next(generation)
        assert isinstance(first, str)
        generation.cancel()
        assert list(generation) == [] and generation.cancelled and generation.done is None
        with pytest.raises(MemserveError) as cancelled:
            generation.result()
        assert cancelled.value.code == grpc.StatusCode.CANCELLED
        assert session.stale  # the step count is re-read before the next call needs it
        done = session.generate("ok , shorter", max_tokens=4).result()
        assert done.completion_tokens == 4 and session.step_count == done.step


def test_deadlines_default_per_client_and_per_call(server: ServerProcess) -> None:
    long_inputs = np.zeros((MAX_STEPS, 9), np.float32)  # 256 launches: far more than 0.1 ms
    with Client(server.target, timeout=1e-4, options=DIRECT) as hasty:
        with pytest.raises(MemserveError) as late:
            hasty.create_session("ntm-copy")
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with hasty.session("ntm-copy", timeout=30) as session:  # a call's own deadline wins
            with pytest.raises(MemserveError) as cut:
                session.step(long_inputs, timeout=1e-4)
            assert cut.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            # Some of those steps ran, and more until the server notices the cut at its next
            # launch. A step without expected_step waits behind the cut call in the session's
            # queue: once it is answered, the cut call has stopped and the count holds still.
            after = hasty.step(session.id, np.zeros((1, 9), np.float32), timeout=30)
            assert 1 <= after.step <= MAX_STEPS + 1
            # The session (which re-reads the count) steps on, with the right expected_step.
            outputs = session.step(np.zeros((1, 9), np.float32), timeout=30)
            assert outputs.shape == (1, 8) and session.step_count == after.step + 1
            assert session.info(timeout=30).step == after.step + 1
            session.delete(timeout=30)
        with hasty.session(TINY, timeout=30) as chat:
            generation = chat.generate("hello", max_tokens=LIMIT, timeout=1e-4)
            with pytest.raises(MemserveError, match="DEADLINE_EXCEEDED"):
                list(generation)
            chat.delete(timeout=30)


def test_errors_carry_the_code_and_the_server_message(client: Client) -> None:
    with pytest.raises(MemserveError) as unknown:
        client.session("no-such-model")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    assert "no model 'no-such-model'" in unknown.value.message
    assert unknown.value.attempts == 1
    with client.session("ntm-copy") as session:
        with pytest.raises(MemserveError) as bad_shape:
            session.step(np.zeros((2, 3), np.float32))
        assert bad_shape.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs.shape must be [T, 9]" in bad_shape.value.message
        with pytest.raises(MemserveError) as out_of_order:
            client.step(session.id, np.zeros((1, 9), np.float32), expected_step=7)
        assert out_of_order.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(MemserveError) as no_text:
            session.generate("hello").result()
        assert no_text.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not generate text" in no_text.value.message
    with pytest.raises(MemserveError) as bad_state:
        client.import_session(b"not safetensors")
    assert bad_state.value.code == grpc.StatusCode.INVALID_ARGUMENT


README = ROOT / "README.md"


def test_readme_clients_example_runs(server: ServerProcess) -> None:
    section = README.read_text().split("## Clients", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    code = code.replace("127.0.0.1:50051", server.target)
    exec(compile(code, str(README), "exec"), {})
