"""A model and its state pool in a process of their own: the worker that `WorkerClient`
starts and drives over a pipe (`serving.protocol` says what crosses it).

Why a process: a launch is a few hundred small torch calls, and every one of them gives up
the GIL and must win it back; in the server's process the event loop, busy with gRPC, wins
it first (docs/performance.md, "Why the model runs in a process of its own"). In its own
process the step has an interpreter to itself, as vLLM's engine core does.

The worker trusts what the server sends: the server built every launch's slots (unique, in
the pool, no padding) and decoded every input with its checks, so a launch gets one cheap
check of its slots and of the states it restores, on the host, and no model-side
validation. Nothing in a launch waits on the device but its one copy back (`to_host`): the
launch's host arrays go to the device in one transfer (`serving.staging`: through a pinned
buffer, asynchronously, on a GPU), the states it parks or saves are copied on the device and
come back with the outputs, and a DECODE's tokens are sampled on the host after that copy.
tests/serving/test_worker_syncs.py runs launches under a mode that fails on any operation
that would make the host wait for a GPU. It ignores SIGINT and SIGTERM (the server drains
first, then closes the pipe) and exits when the pipe closes; the kernel kills it when the
server dies (`serving.worker_process.die_with_server`).
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from models.base import MemoryModel
from models.state import StatePool, StateSpec
from serving.protocol import (
    BeginBatch,
    BeginRow,
    Close,
    CopySlot,
    DecodeBatch,
    DecodeRow,
    EncodeBatch,
    HostState,
    Landed,
    Launch,
    ModelCard,
    Operation,
    OperationBatch,
    ReadSlot,
    Replay,
    Reply,
    Request,
    ResetSlot,
    StepBatch,
    WriteSlot,
    batch_of,
    read_frame,
)
from serving.sampling import sample_tokens
from serving.staging import Staging, staging_for
from serving.staging import to_host as to_host  # re-exported: tests count its calls

TEXT_OPERATIONS = ("encode", "begin_reply", "decode")


def pick_device(setting: str) -> torch.device:
    """The device of a `--device` setting: "auto" is CUDA where there is one."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} asked for, but this machine has no CUDA device")
    return device


def describe(model: MemoryModel, backend: str, device: torch.device) -> ModelCard:
    """The card the worker sends the server once the model is loaded."""
    tokenizer = getattr(model, "tokenizer", None)
    return ModelCard(
        model_type=model.model_type,
        input_size=model.input_size,
        output_size=model.output_size,
        state_specs=model.state_specs(),
        initial_state=host_state(model.initial_state()),
        weights_digest=model.weights_digest,
        backend=backend,
        device=str(device),
        tokenizer_json=None if tokenizer is None else tokenizer.to_str(),
        text_operations=tokenizer is not None
        and all(hasattr(model, name) for name in TEXT_OPERATIONS),
    )


def host_state(state: dict[str, torch.Tensor]) -> HostState:
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}


def check_launch(launch: Launch, capacity: int) -> None:
    """The one check a launch gets, on the host: its slots are in the pool, no slot appears
    twice (two rows on one slot would race in a kernel), and a STEP batch's step counts are
    what `StepBatch` says. On Python lists: numpy calls between launches run cold and cost
    more than the check (docs/performance.md, "Again after the worker's launch ...")."""
    slots = [slot for batch in launch.batches for slot in batch.slots.tolist()]
    if slots and (min(slots) < 0 or max(slots) >= capacity):
        raise ValueError(f"a launch's slots must be in [0, {capacity}), got {slots}")
    if len(set(slots)) != len(slots):
        raise ValueError(f"a launch names a slot twice: {slots}")
    for batch in launch.batches:
        if isinstance(batch, StepBatch) and len(batch.steps):
            steps, most = batch.steps.tolist(), batch.inputs.shape[1]
            ordered = all(a >= b for a, b in itertools.pairwise(steps))
            if steps[-1] < 1 or steps[0] > most or not ordered:
                raise ValueError(
                    f"a STEP batch's step counts must be non-increasing, in [1, {most}], "
                    f"got {steps}"
                )


def validate_host_state(specs: Sequence[StateSpec], state: HostState) -> None:
    """`models.state.validate_state` for a state still on the host, in numpy: a state a
    launch restores is checked before anything changes, and without waiting on the device."""
    expected = {spec.name for spec in specs}
    if set(state) != expected:
        raise ValueError(f"session state must hold tensors {sorted(expected)}; got {sorted(state)}")
    for spec in specs:
        array = state[spec.name]
        try:
            dtype = torch.from_numpy(array.reshape(-1)[:0]).dtype  # no tensor operation
        except TypeError:  # a dtype torch has not
            dtype = None
        if tuple(array.shape) != spec.shape or dtype != spec.dtype:
            raise ValueError(
                f"state tensor {spec.name!r} must be {spec.dtype} {list(spec.shape)}, "
                f"got {array.dtype} {list(array.shape)}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"state tensor {spec.name!r} holds NaN or Inf")


# A batch's result on the device and what the host makes of it once copied back.
Pending = tuple[torch.Tensor, Callable[[np.ndarray], np.ndarray] | None]


def batch_arrays(batch: OperationBatch) -> list[np.ndarray]:
    """The host arrays of `batch` that its operation reads on the device, slots first."""
    if isinstance(batch, StepBatch):
        return [batch.slots, batch.inputs]
    if isinstance(batch, EncodeBatch):
        return [batch.slots, batch.tokens]
    if isinstance(batch, BeginBatch):
        return [batch.slots, batch.noise, batch.uniform]
    if isinstance(batch, DecodeBatch):  # sampling settings but the penalty stay on the host
        return [batch.slots, batch.previous, batch.presence_penalty]
    raise TypeError(f"unknown operation batch {type(batch).__name__}")


def run_batch(
    model: Any, pool: StatePool, batch: OperationBatch, staged: Sequence[torch.Tensor]
) -> Pending | None:
    """The one place that maps an operation to the model's call, on `staged` (the device
    copies of `batch_arrays(batch)`); what comes back, still on the device, or None."""
    slots, *arguments = staged
    if isinstance(batch, StepBatch):
        return run_steps(model, pool, slots, arguments[0], batch.steps), None
    if isinstance(batch, EncodeBatch):
        model.encode(pool, slots, arguments[0], check=False)
        return None
    if isinstance(batch, BeginBatch):
        model.begin_reply(pool, slots, arguments[0], arguments[1], check=False)
        return None
    if isinstance(batch, DecodeBatch):
        penalty = arguments[1] if batch.presence_penalty.any() else None  # none: no work
        logits = model.decode(pool, slots, arguments[0], penalty, check=False)

        def sample(host: np.ndarray, batch: DecodeBatch = batch) -> np.ndarray:
            return sample_tokens(host, batch.temperature, batch.top_k, batch.top_p, batch.uniform)

        return logits, sample
    raise TypeError(f"unknown operation batch {type(batch).__name__}")


def run_steps(
    model: Any, pool: StatePool, slots: torch.Tensor, inputs: torch.Tensor, steps: np.ndarray
) -> torch.Tensor:
    """K steps of `model.step`, back to back: at step k the rows with more than k steps,
    which come first (`StepBatch`), so each step takes a prefix of the batch. The outputs
    stay on the device."""
    batch, most, _ = inputs.shape
    counts = steps.tolist()
    if counts[-1] == most:  # every row takes every step, as most launches do: no padding
        outputs = [model.step(pool, slots, inputs[:, k], check=False) for k in range(most)]
        return torch.stack(outputs, dim=1)
    padded = torch.zeros(batch, most, model.output_size, device=inputs.device)
    for k in range(most):
        live = sum(count > k for count in counts)  # the rows with more than k steps
        padded[:live, k] = model.step(pool, slots[:live], inputs[:live, k], check=False)
    return padded


def slot_copy(pool: StatePool, slot: int) -> list[torch.Tensor]:
    """A copy of one slot's state on the device, as it is now (one tensor per spec)."""
    return [tensor[slot].clone() for tensor in pool.tensors.values()]


def run_launch(
    model: MemoryModel, pool: StatePool, launch: Launch, staging: Staging | None = None
) -> Landed:
    """Parks out, restores in, then each operation's batch; see `protocol.Launch`. Every
    check is made before anything changes, on the host; then the host's arrays go to the
    device in one transfer, and everything comes back in one copy at the end."""
    start = time.perf_counter()
    check_launch(launch, pool.capacity)
    for _, state in launch.restore:
        validate_host_state(pool.specs, state)
    names = list(pool.tensors)
    arrays = [state[name] for _, state in launch.restore for name in names]
    per_batch = [batch_arrays(batch) for batch in launch.batches]
    staged = iter((staging or staging_for(pool.device)).stage(
        [*arrays, *itertools.chain.from_iterable(per_batch)]
    ))  # fmt: skip
    saved = [slot_copy(pool, slot) for slot in launch.save]
    parked = [slot_copy(pool, slot) for slot in launch.park]
    for slot, _ in launch.restore:
        for name in names:
            pool.tensors[name][slot].copy_(next(staged))
    pending: list[tuple[Operation, Pending]] = []
    for batch, inputs in zip(launch.batches, per_batch, strict=True):
        result = run_batch(model, pool, batch, [next(staged) for _ in inputs])
        if result is not None:
            pending.append((batch.operation, result))
    states = [*saved, *parked]
    hosts = iter(to_host([
        *itertools.chain.from_iterable(states), *(result for _, (result, _) in pending)
    ]))  # fmt: skip
    copied = [{name: next(hosts) for name in names} for _ in states]
    outputs = {}
    for operation, (_, finish) in pending:
        host = next(hosts)
        outputs[operation] = host if finish is None else finish(host)
    return Landed(
        outputs,
        tuple(copied[len(saved) :]),
        time.perf_counter() - start,
        tuple(copied[: len(saved)]),
    )


def replay(model: MemoryModel, scratch: StatePool, request: Replay) -> HostState:
    """Run a stored session's operations on its stored state in a pool of one slot."""
    if request.state is None:
        model.reset(scratch, [0])
    else:
        scratch.write(0, device_state(request.state, scratch.device))
    slot = np.zeros(1, np.int64)
    staging = staging_for(scratch.device)
    for operation, group in itertools.groupby(request.rows, key=lambda row: row[0]):
        arguments = [argument for _, argument in group]
        if operation is Operation.STEP:  # a run of steps, back to back in one batch
            batches: list[OperationBatch] = [StepBatch.of(slot, [np.concatenate(arguments)])]
        else:
            batches = [batch_of(operation, slot, [argument]) for argument in arguments]
        for batch in batches:
            run_batch(model, scratch, batch, staging.stage(batch_arrays(batch)))
    return host_state(scratch.read(0))


def device_state(state: HostState, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array).to(device) for name, array in state.items()}


def answer(model: MemoryModel, pool: StatePool, scratch: StatePool, request: Request) -> Any:
    """Carry out one request other than `Close`; `scratch` is a pool of one slot for
    replays."""
    if isinstance(request, Launch):
        return run_launch(model, pool, request)
    if isinstance(request, Replay):
        return replay(model, scratch, request)
    if isinstance(request, ResetSlot):
        model.reset(pool, [request.slot])
        return None
    if isinstance(request, CopySlot):
        pool.copy(request.source, request.destination)
        return None
    if isinstance(request, ReadSlot):
        return host_state(pool.read(request.slot))
    if isinstance(request, WriteSlot):
        pool.write(request.slot, device_state(request.state, pool.device))
        return None
    raise TypeError(f"unknown request {type(request).__name__}")


def serve(
    connection: Connection, directory: str, device: str, slots: int, threads: int, nice: int
) -> None:
    """The worker's main: load the model, allocate the pool, send the card, then answer
    requests in order until told to stop or the pipe closes.

    It runs `nice` steps below the server: on a CPU with fewer cores than busy processes,
    the server's event loop, which turns RPCs into launches, is what limits throughput, and
    at equal priority the model takes the core from it for every launch (docs/performance.md,
    "model_nice")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    from kernels.backend import retain_freed_memory, select_backend
    from models import checkpoint

    retain_freed_memory()
    try:
        if threads:
            torch.set_num_threads(threads)
        model = checkpoint.load(directory, pick_device(device))
        try:
            pool = model.new_pool(slots)
        except (RuntimeError, MemoryError) as error:
            raise MemoryError(
                f"a pool of {slots} slots of {model.state_bytes} bytes does not fit: {error}"
            ) from error
        scratch = model.new_pool(1)
        fused = build_fused_step(model, pool)
        card = describe(model, "fused-cpu" if fused else select_backend(pool.device), pool.device)
        warm_up(model, scratch, card)
    except BaseException as error:  # said to the server, which refuses to start
        tell(connection, Reply(False, portable(error)))
        return
    if not tell(connection, Reply(True, card)):
        return
    requests = socket.socket(fileno=os.dup(connection.fileno()))  # framed by the server
    with torch.inference_mode():
        while True:
            try:
                request = read_frame(requests)
            except (EOFError, OSError):  # the server is gone
                return
            if isinstance(request, Close):
                return
            try:
                reply = Reply(True, answer(model, pool, scratch, request))
            except Exception as error:
                reply = Reply(False, portable(error))
            if not tell(connection, reply):
                return


def tell(connection: Connection, reply: Reply) -> bool:
    """Send the server `reply`; False if it is gone (it stopped, or failed to start)."""
    try:
        connection.send(reply)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def build_fused_step(model: MemoryModel, pool: StatePool) -> bool:
    """Build (or find in its cache) the fused CPU step now, while the server waits for the
    card, rather than in the first launch: compiling takes seconds. Whether the model steps
    through it."""
    from models.controller import ControllerMemoryModel
    from models.fused import fused_step

    return isinstance(model, ControllerMemoryModel) and fused_step(model, pool) is not None


def warm_up(model: MemoryModel, scratch: StatePool, card: ModelCard) -> None:
    """Run each operation the model serves once, on the scratch slot, before the card goes
    to the server: on a GPU the first call of a kernel compiles it (Triton) and the first of
    a library sets it up (cuBLAS), seconds that would otherwise fall in the first launch,
    which must answer within the server's `model_timeout`. The scratch slot is reset by
    every replay, so nothing of this reaches a session."""
    rows: list[tuple[Operation, Any]] = [
        (Operation.STEP, np.zeros((1, card.input_size), np.float32))
    ]
    if card.text_operations:
        noise = np.zeros(card.spec("z").shape[0], np.float32)
        rows += [
            (Operation.ENCODE, 0),
            (Operation.BEGIN, BeginRow(noise, 0.0)),
            (Operation.DECODE, DecodeRow(0, 0.0, 0, 1.0, 0.0)),
        ]
    replay(model, scratch, Replay(None, tuple(rows)))


def portable(error: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
