"""Sessions through a real server agree with the same sessions stepped alone in process:
under concurrency, across forks, parking (host and disk), export/import between servers,
expected_step and TTL expiry."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bench.child_server import ServerProcess
from models.base import MemoryModel
from protos import memserve_pb2
from tests.serving.client import create, info, metric, scrape, step
from tests.serving.conftest import Reference, random_inputs


def test_32_concurrent_sessions_match_each_stepped_alone(
    server: ServerProcess, models: dict[str, MemoryModel]
) -> None:
    stub = server.stub()
    before = scrape(server.metrics_url)
    rng = np.random.default_rng()
    sessions = []
    for index in range(32):
        model = "ntm-copy" if index % 4 else "dnc-recall"  # both models at once
        width = models[model].input_size
        calls = [random_inputs(rng, int(t), width) for t in rng.integers(1, 21, size=4)]
        sessions.append((model, create(stub, model), calls))

    def run(session: tuple[str, str, list[np.ndarray]]) -> list[tuple[np.ndarray, int]]:
        _, session_id, calls = session
        return [step(stub, session_id, inputs) for inputs in calls]

    with ThreadPoolExecutor(32) as pool:
        served = list(pool.map(run, sessions))

    for (model, _, calls), results in zip(sessions, served, strict=True):
        reference = Reference(models[model])
        for inputs, (outputs, count) in zip(calls, results, strict=True):
            expected = reference.step(inputs)
            assert outputs.shape == expected.shape
            assert np.array_equal(outputs, expected)
            assert count == reference.steps
    after = scrape(server.metrics_url)
    launches = metric(after, "memserve_batch_size_count") - metric(
        before, "memserve_batch_size_count"
    )
    single = metric(after, "memserve_batch_size_bucket", le="1.0") - metric(
        before, "memserve_batch_size_bucket", le="1.0"
    )
    assert launches > 0 and single < launches, "no launch stepped more than one session"


def test_step_stream_matches_unary_steps(
    server: ServerProcess, models: dict[str, MemoryModel]
) -> None:
    stub = server.stub()
    session_id = create(stub)
    rng = np.random.default_rng()
    calls = [random_inputs(rng, t, 9) for t in (1, 3, 1, 7)]
    requests = iter(
        [memserve_pb2.StepRequest(session_id=session_id, inputs=_wire(calls[0]))]
        + [memserve_pb2.StepRequest(inputs=_wire(inputs)) for inputs in calls[1:]]
    )
    reference = Reference(models["ntm-copy"])
    for inputs, response in zip(calls, stub.StepStream(requests), strict=True):
        expected = reference.step(inputs)
        assert np.array_equal(_unwire(response.outputs), expected)
        assert response.step == reference.steps


def test_fork_evolves_independently(server: ServerProcess, models: dict[str, MemoryModel]) -> None:
    stub = server.stub()
    rng = np.random.default_rng()
    parent = create(stub, "dnc-recall")
    parent_reference = Reference(models["dnc-recall"])
    history = random_inputs(rng, 9, 8)
    step(stub, parent, history)
    parent_reference.step(history)
    child = stub.ForkSession(memserve_pb2.ForkSessionRequest(session_id=parent))
    assert child.step == 9 and child.model == "dnc-recall" and child.session_id != parent
    child_reference = parent_reference.fork()
    for _ in range(3):  # interleaved, different inputs
        for session_id, reference in (
            (parent, parent_reference),
            (child.session_id, child_reference),
        ):
            inputs = random_inputs(rng, 4, 8)
            outputs, count = step(stub, session_id, inputs)
            assert np.array_equal(outputs, reference.step(inputs))
            assert count == reference.steps


def test_expected_step_mismatch_is_refused_and_changes_nothing(
    server: ServerProcess, models: dict[str, MemoryModel]
) -> None:
    stub = server.stub()
    session_id = create(stub)
    reference = Reference(models["ntm-copy"])
    rng = np.random.default_rng()
    first = random_inputs(rng, 3, 9)
    step(stub, session_id, first, expected_step=0)
    reference.step(first)
    with pytest.raises(grpc.RpcError) as refused:
        step(stub, session_id, random_inputs(rng, 2, 9), expected_step=2)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected_step is 2" in refused.value.details() and "at step 3" in (
        refused.value.details()
    )
    assert info(stub, session_id).step == 3
    then = random_inputs(rng, 2, 9)
    outputs, count = step(stub, session_id, then, expected_step=3)
    assert np.array_equal(outputs, reference.step(then)) and count == 5


def test_session_expires_after_its_idle_ttl(server: ServerProcess) -> None:
    stub = server.stub()
    rng = np.random.default_rng()
    idle = create(stub, ttl_seconds=0.6)
    busy = create(stub, ttl_seconds=0.6)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # `busy` keeps being used; `idle` is not
        step(stub, busy, random_inputs(rng, 1, 9))
        time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as gone:
        step(stub, idle, random_inputs(rng, 1, 9))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert "expired" in gone.value.details()
    assert info(stub, busy).step > 10
    samples = scrape(server.metrics_url)
    assert metric(samples, "memserve_session_evictions_total", reason="expired") >= 1


def test_parked_sessions_continue_exactly(
    tmp_path: Path, models: dict[str, MemoryModel], reference_backend: None
) -> None:
    """Two slots, six sessions: four are parked at any time, one in host memory (the
    budget holds one NTM state) and the rest on disk; each continues as if never parked."""
    park_dir = tmp_path / "parked"
    state_bytes = models["ntm-copy"].state_bytes
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--slots", "2",
        "--park-host-bytes", str(state_bytes + 100), "--park-dir", str(park_dir),
    ) as parking:  # fmt: skip
        stub = parking.stub()
        rng = np.random.default_rng()
        sessions = [(create(stub), Reference(models["ntm-copy"])) for _ in range(6)]
        residences = set()
        for round_ in range(4):  # forward, then backward: active, host and disk all come up
            for session_id, reference in sessions if round_ % 2 == 0 else sessions[::-1]:
                residences.add(info(stub, session_id).residence)
                inputs = random_inputs(rng, 5, 9)
                outputs, count = step(stub, session_id, inputs)
                assert np.array_equal(outputs, reference.step(inputs))
                assert count == reference.steps
        assert residences == {"active", "parked_host", "parked_disk"}
        assert len(list(park_dir.glob("*.safetensors"))) >= 1
        samples = scrape(parking.metrics_url)
        for source in ("host", "disk"):
            assert metric(samples, "memserve_session_restores_total", source=source) >= 1
        assert metric(samples, "memserve_slots_used") == 2
        assert metric(samples, "memserve_sessions", state="parked_disk") >= 1
        # Fork and export work on a parked session too.
        parked_id, parked_reference = next(
            (s, r) for s, r in sessions if info(stub, s).residence != "active"
        )
        child = stub.ForkSession(memserve_pb2.ForkSessionRequest(session_id=parked_id))
        inputs = random_inputs(rng, 3, 9)
        outputs, _ = step(stub, child.session_id, inputs)
        assert np.array_equal(outputs, parked_reference.fork().step(inputs))


def test_export_import_between_servers(
    server: ServerProcess, tmp_path: Path, models: dict[str, MemoryModel]
) -> None:
    stub = server.stub()
    rng = np.random.default_rng()
    original = create(stub, "dnc-recall")
    reference = Reference(models["dnc-recall"])
    history = random_inputs(rng, 11, 8)
    step(stub, original, history)
    reference.step(history)
    exported = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=original))
    assert exported.model == "dnc-recall" and exported.step == 11
    with ServerProcess(tmp_path, "--models", "dnc-recall") as second:
        other = second.stub()
        imported = other.ImportSession(memserve_pb2.ImportSessionRequest(state=exported.state))
        assert imported.step == 11 and imported.model == "dnc-recall"
        for _ in range(2):
            inputs = random_inputs(rng, 6, 8)
            here, count_here = step(stub, original, inputs)
            there, count_there = step(other, imported.session_id, inputs)
            np.testing.assert_array_equal(here, there)
            assert np.array_equal(there, reference.step(inputs))
            assert count_here == count_there == reference.steps
        # A server without the model refuses the import by name.
    with ServerProcess(tmp_path, "--models", "ntm-copy") as third:
        with pytest.raises(grpc.RpcError) as refused:
            third.stub().ImportSession(memserve_pb2.ImportSessionRequest(state=exported.state))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "dnc-recall" in refused.value.details()


def test_delete_ends_the_session(server: ServerProcess) -> None:
    stub = server.stub()
    session_id = create(stub)
    stub.DeleteSession(memserve_pb2.DeleteSessionRequest(session_id=session_id))
    for call in (
        lambda: info(stub, session_id),
        lambda: stub.DeleteSession(memserve_pb2.DeleteSessionRequest(session_id=session_id)),
    ):
        with pytest.raises(grpc.RpcError) as gone:
            call()
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert "deleted" in gone.value.details()


def test_list_models_describes_both(server: ServerProcess, models: dict[str, MemoryModel]) -> None:
    listed = {m.name: m for m in server.stub().ListModels(memserve_pb2.ListModelsRequest()).models}
    assert set(listed) == {"ntm-copy", "dnc-recall"}
    for name, model in models.items():
        entry = listed[name]
        assert entry.type == model.model_type
        assert (entry.input_size, entry.output_size) == (model.input_size, model.output_size)
        assert tuple(entry.memory_shape) == model.memory_shape
        assert entry.state_bytes == model.state_bytes


def _wire(array: np.ndarray) -> memserve_pb2.Tensor:
    from serving import wire

    return wire.encode(array)


def _unwire(tensor: memserve_pb2.Tensor) -> np.ndarray:
    from serving import wire

    return wire.decode(tensor, "outputs")


def test_resource_exhausted_only_when_nothing_can_be_parked(
    tmp_path: Path, models: dict[str, MemoryModel], reference_backend: None
) -> None:
    """One slot, no host budget, and a park directory that stops being one: a second
    session cannot be made room for; the first is untouched and keeps stepping."""
    park_dir = tmp_path / "parked"
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--slots", "1", "--park-host-bytes", "0",
        "--park-dir", str(park_dir),
    ) as full:  # fmt: skip
        stub = full.stub()
        rng = np.random.default_rng()
        first = create(stub)
        reference = Reference(models["ntm-copy"])
        inputs = random_inputs(rng, 4, 9)
        step(stub, first, inputs)
        reference.step(inputs)
        park_dir.rmdir()
        park_dir.write_text("not a directory any more")
        with pytest.raises(grpc.RpcError) as refused:
            create(stub)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(park_dir) in refused.value.details()
        assert info(stub, first).residence == "active"
        inputs = random_inputs(rng, 4, 9)
        outputs, count = step(stub, first, inputs)
        assert np.array_equal(outputs, reference.step(inputs)) and count == 8
        samples = scrape(full.metrics_url)
        assert metric(samples, "memserve_sessions", state="active") == 1
        assert metric(samples, "memserve_requests_rejected_total",
                      reason="resource_exhausted") == 1  # fmt: skip


def test_a_parked_session_gets_a_slot_while_every_active_one_is_busy(
    tmp_path: Path, models: dict[str, MemoryModel], reference_backend: None
) -> None:
    """One slot held by a session that always has calls queued: another session's call is
    still served (the busy one is parked between launches), and no step is lost."""
    with ServerProcess(tmp_path, "--models", "ntm-copy", "--slots", "1") as one_slot:
        stub = one_slot.stub()
        rng = np.random.default_rng()
        waiting = create(stub)
        busy = create(stub)
        stop = threading.Event()
        busy_steps: list[int] = []

        def keep_busy() -> None:
            while not stop.is_set():
                busy_steps.append(len(step(stub, busy, random_inputs(rng, 5, 9))[0]))

        with ThreadPoolExecutor(3) as pool:
            workers = [pool.submit(keep_busy) for _ in range(3)]  # 3 calls always queued
            deadline = time.monotonic() + 60
            while len(busy_steps) < 3:
                for worker in workers:
                    if worker.done():
                        worker.result()  # a worker that died says why
                assert time.monotonic() < deadline, "the busy session never stepped"
                time.sleep(0.01)
            reference = Reference(models["ntm-copy"])
            inputs = random_inputs(rng, 4, 9)
            outputs, count = step(stub, waiting, inputs)
            stop.set()
            for worker in workers:
                worker.result(timeout=60)
        assert np.array_equal(outputs, reference.step(inputs)) and count == 4
        assert info(stub, busy).step == sum(busy_steps)


def test_export_and_fork_during_a_long_call_match_their_step_count(
    tmp_path: Path, models: dict[str, MemoryModel]
) -> None:
    """Launches are pipelined (several rows of one Step call in flight at once), so an
    export or fork taken while a long call runs must still see a state that has taken
    exactly the steps its count says: each is compared with the session stepped alone."""
    from serving.export import import_state

    model = models["ntm-copy"]
    rng = np.random.default_rng()
    inputs = random_inputs(rng, 1000, 9)
    reference = Reference(model)
    states = [reference.pool.read(0)]  # states[k]: the state after k steps
    expected = []
    for row in inputs:
        expected.append(reference.step(row[None])[0])
        states.append(reference.pool.read(0))
    with ServerProcess(tmp_path, "--models", "ntm-copy", "--max-steps-per-call", "1000") as server:
        stub = server.stub()
        session_id = create(stub)
        caller = ThreadPoolExecutor(1).submit(step, stub, session_id, inputs)
        counts: list[int] = []
        forks: list[tuple[str, int]] = []
        while not caller.done() and len(counts) < 50:
            exported = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=session_id))
            state = import_state(exported.state)
            assert state.step == exported.step
            for name, tensor in state.tensors.items():
                assert torch.equal(tensor, states[state.step][name]), (state.step, name)
            counts.append(state.step)
            if len(forks) < 3:
                fork = stub.ForkSession(memserve_pb2.ForkSessionRequest(session_id=session_id))
                forks.append((fork.session_id, fork.step))
        outputs, count = caller.result(timeout=120)
        assert count == 1000
        assert np.array_equal(outputs, np.stack(expected))
        assert any(0 < k < 1000 for k in counts), counts  # some were taken mid-call
        for fork_id, fork_step in forks:
            twin = Reference(model)
            twin.pool.write(0, states[fork_step])
            twin.steps = fork_step
            more = random_inputs(rng, 5, 9)
            served, served_count = step(stub, fork_id, more)
            assert served_count == fork_step + 5
            assert np.array_equal(served, twin.step(more))
