"""A model and its state pool in a process of their own: the worker that `WorkerClient`
starts and drives over a pipe (`serving.protocol` says what crosses it).

Why a process: a launch is a few hundred small torch calls, and every one of them gives up
the GIL and must win it back; in the server's process the event loop, busy with gRPC, wins
it first (docs/performance.md, "Why the model runs in a process of its own"). In its own
process the step has an interpreter to itself, as vLLM's engine core does.

The worker trusts what the server sends: the server built every launch's slots (unique, in
the pool, no padding) and decoded every input with its checks, so a launch gets one cheap
check of its slots on the host and no model-side validation, and nothing in it waits on the
device but the copy of its outputs back. It ignores SIGINT and SIGTERM (the server drains
first, then closes the pipe) and exits when the pipe closes, also when the server is killed.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from models.base import MemoryModel
from models.state import StatePool
from serving.protocol import (
    BeginBatch,
    Close,
    CopySlot,
    DecodeBatch,
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
)
from serving.sampling import sample_tokens

TEXT_OPERATIONS = ("encode", "begin_reply", "decode")


def describe(model: MemoryModel, backend: str) -> ModelCard:
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
        tokenizer_json=None if tokenizer is None else tokenizer.to_str(),
        text_operations=tokenizer is not None
        and all(hasattr(model, name) for name in TEXT_OPERATIONS),
    )


def host_state(state: dict[str, torch.Tensor]) -> HostState:
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}


def check_launch(launch: Launch, capacity: int) -> None:
    """The one check a launch gets, on the host: its slots are in the pool, no slot appears
    twice (two rows on one slot would race in a kernel), and a STEP batch's step counts are
    what `StepBatch` says."""
    slots = np.concatenate([batch.slots for batch in launch.batches] or [np.empty(0, np.int64)])
    if slots.size and (slots.min() < 0 or slots.max() >= capacity):
        raise ValueError(f"a launch's slots must be in [0, {capacity}), got {slots.tolist()}")
    if np.unique(slots).size != slots.size:
        raise ValueError(f"a launch names a slot twice: {slots.tolist()}")
    for batch in launch.batches:
        if isinstance(batch, StepBatch) and batch.steps.size:
            steps, most = batch.steps, batch.inputs.shape[1]
            if steps.min() < 1 or steps.max() > most or np.any(np.diff(steps) > 0):
                raise ValueError(
                    f"a STEP batch's step counts must be non-increasing, in [1, {most}], "
                    f"got {steps.tolist()}"
                )


def run_batch(model: Any, pool: StatePool, batch: OperationBatch) -> np.ndarray | None:
    """The one place that maps an operation to the model's call; host outputs or None."""
    device = pool.device
    slots = torch.from_numpy(batch.slots).to(device)

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device)

    if isinstance(batch, StepBatch):
        return run_steps(model, pool, slots, on_device(batch.inputs), batch.steps)
    if isinstance(batch, EncodeBatch):
        model.encode(pool, slots, on_device(batch.tokens), check=False)
        return None
    if isinstance(batch, BeginBatch):
        model.begin_reply(
            pool, slots, on_device(batch.noise), on_device(batch.uniform), check=False
        )
        return None
    if isinstance(batch, DecodeBatch):  # sampling settings stay on the host
        logits = model.decode(pool, slots, on_device(batch.previous), check=False).cpu().numpy()
        return sample_tokens(logits, batch.temperature, batch.top_k, batch.top_p, batch.uniform)
    raise TypeError(f"unknown operation batch {type(batch).__name__}")


def run_steps(
    model: Any, pool: StatePool, slots: torch.Tensor, inputs: torch.Tensor, steps: np.ndarray
) -> np.ndarray:
    """K steps of `model.step`, back to back: at step k the rows with more than k steps,
    which come first (`StepBatch`), so each step takes a prefix of the batch. The outputs
    stay on the device until all K are done."""
    batch, most, _ = inputs.shape
    outputs = torch.zeros(batch, most, model.output_size, device=inputs.device)
    for k in range(most):
        live = batch if k == 0 else int(np.count_nonzero(steps > k))  # on the host
        outputs[:live, k] = model.step(pool, slots[:live], inputs[:live, k], check=False)
    result: np.ndarray = outputs.cpu().numpy()
    return result


def run_launch(model: MemoryModel, pool: StatePool, launch: Launch) -> Landed:
    """Parks out, restores in, then each operation's batch; see `protocol.Launch`."""
    start = time.perf_counter()
    check_launch(launch, pool.capacity)
    saved = tuple(host_state(pool.read(slot)) for slot in launch.save)
    parked = tuple(host_state(pool.read(slot)) for slot in launch.park)
    for slot, state in launch.restore:
        pool.write(slot, device_state(state, pool.device))
    outputs = {}
    for batch in launch.batches:
        result = run_batch(model, pool, batch)
        if result is not None:
            outputs[batch.operation] = result
    return Landed(outputs, parked, time.perf_counter() - start, saved)


def replay(model: MemoryModel, scratch: StatePool, request: Replay) -> HostState:
    """Run a stored session's operations on its stored state in a pool of one slot."""
    if request.state is None:
        model.reset(scratch, [0])
    else:
        scratch.write(0, device_state(request.state, scratch.device))
    slot = np.zeros(1, np.int64)
    for operation, group in itertools.groupby(request.rows, key=lambda row: row[0]):
        arguments = [argument for _, argument in group]
        if operation is Operation.STEP:  # a run of steps, back to back in one batch
            run_batch(model, scratch, StepBatch.of(slot, [np.stack(arguments)]))
            continue
        for argument in arguments:
            run_batch(model, scratch, batch_of(operation, slot, [argument]))
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
        model = checkpoint.load(directory, device)
        try:
            pool = model.new_pool(slots)
        except (RuntimeError, MemoryError) as error:
            raise MemoryError(
                f"a pool of {slots} slots of {model.state_bytes} bytes does not fit: {error}"
            ) from error
        scratch = model.new_pool(1)
        card = describe(model, select_backend(pool.device))
    except BaseException as error:  # said to the server, which refuses to start
        connection.send(Reply(False, portable(error)))
        return
    connection.send(Reply(True, card))
    with torch.inference_mode():
        while True:
            try:
                request = connection.recv()
            except (EOFError, OSError):  # the server is gone
                return
            if isinstance(request, Close):
                return
            try:
                reply = Reply(True, answer(model, pool, scratch, request))
            except Exception as error:
                reply = Reply(False, portable(error))
            connection.send(reply)


def portable(error: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
