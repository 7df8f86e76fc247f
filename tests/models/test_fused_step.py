"""The fused CPU step (`kernels.cpu_step`, `models.fused`): what a model steps with on a
CPU, checked against the plain eager step in float64 (bench/eager.py, written apart from
the model), against the PyTorch path for shapes the bundled models do not have, with
padding rows, and rebuilt when the weights change; each row's bits its own whatever the
launch; safe against slots and tensors that do not fit; built into a cache keyed by what
went into it, and the PyTorch path, with one log line, where it cannot be built; served
through the worker with the same bits. tests/serving/test_engine.py serves it through a
real model process."""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from bench import eager
from kernels import backend, cpu_step
from kernels.backend import BACKEND_ENV, FUSED_ENV
from models import checkpoint
from models.controller import ControllerMemoryModel
from models.dnc import DNC, DNCConfig
from models.fused import controller_sizes, fused_step, packed_parameters
from models.ntm import NTM, NTMConfig
from models.state import StatePool
from serving.protocol import Launch, Operation, StepBatch
from serving.worker import run_launch
from tests.conftest import relative_error
from tests.models.agreement import fill_random, randomize

STEPS = 30


@pytest.fixture(autouse=True)
def cpu_backend() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, "torch")
        patch.delenv(FUSED_ENV, raising=False)
        yield


def bundled(name: str) -> ControllerMemoryModel:
    model = checkpoint.load(name)
    assert isinstance(model, ControllerMemoryModel)
    return model


def test_it_is_what_a_cpu_model_steps_with(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_step.available(), "the fused CPU step needs a C compiler: make system-deps"
    model = bundled("ntm-copy")
    pool = model.new_pool(2)
    assert fused_step(model, pool) is not None
    monkeypatch.setenv(FUSED_ENV, "0")
    assert fused_step(model, pool) is None
    monkeypatch.setenv(FUSED_ENV, "1")
    monkeypatch.setenv(BACKEND_ENV, "triton")  # the interpreter: the kernels' own path
    assert fused_step(model, pool) is None


@pytest.mark.parametrize("name", ["ntm-copy", "dnc-recall"])
def test_each_step_matches_the_eager_step_in_float64(name: str, generator: torch.Generator) -> None:
    """13 sessions in scattered slots of a larger pool, 30 steps: each step's outputs and
    new state against bench/eager.py's step of the same weights in float64 from the same
    state. Step by step, because over a trajectory float32 and float64 part: the DNC's
    allocation follows the order of the usages, and rounding reorders close ones (the
    PyTorch path parts from float64 as far, 1e-5 to 1e-4 in 30 steps from one seed in ten).
    For the same reason a session whose new usages come within 1e-6 of each other (a tie
    at float32's resolution) is left out of that step's comparison: 0-7 of a run's 390
    session-steps in 41 seeds, up to 3 in one step, so the run as a whole must compare at
    least 90 % of them. A DNC's memory and usage start random: from equal usages all are
    ties."""
    model = bundled(name)
    model64 = copy.deepcopy(model).double()
    step = eager.ntm_step if isinstance(model, NTM) else eager.dnc_step
    sessions = 13
    pool = model.new_pool(sessions + 4)
    fill_random(pool, generator)
    slots = torch.randperm(sessions + 4, generator=generator)[:sessions]
    model.reset(pool, slots.tolist())
    if isinstance(model, DNC):
        pool["usage"][slots] = torch.rand(pool["usage"][slots].shape, generator=generator)
        pool["memory"][slots] = torch.randn(pool["memory"][slots].shape, generator=generator)
    left_out = 0
    with torch.no_grad():
        for _ in range(STEPS):
            before = {name: pool[name][slots].double() for name in pool}
            inputs = torch.rand(sessions, model.input_size, generator=generator)
            outputs = model.step(pool, slots, inputs, check=False)
            state, expected = step(model64, before, inputs.double())  # type: ignore[arg-type]
            compared = torch.ones(sessions, dtype=torch.bool)
            if isinstance(model, DNC):
                ordered = state["usage"].sort(dim=-1).values
                compared = (ordered[:, 1:] - ordered[:, :-1]).amin(dim=-1) >= 1e-6
                left_out += sessions - int(compared.sum())
                if not compared.any():
                    continue
            assert relative_error(outputs[compared], expected[compared]) < 1e-5
            for tensor, want in state.items():
                got = pool[tensor][slots][compared]
                assert relative_error(got, want[compared]) < 1e-5, tensor
    assert left_out <= sessions * STEPS // 10, f"{left_out} session-steps were ties"


def test_a_trajectory_of_the_ntm_stays_with_float64(generator: torch.Generator) -> None:
    """The NTM over 30 steps in float32 against float64 from the same start: no ordering
    to reorder, so the two stay together."""
    model = bundled("ntm-copy")
    model64 = copy.deepcopy(model).double()
    pool = model.new_pool(9)
    slots = torch.tensor([8, 1, 4, 0, 6])
    model.reset(pool, slots.tolist())
    state = {name: pool[name][slots].double() for name in pool}
    outputs, expected = [], []
    with torch.no_grad():
        for _ in range(STEPS):
            inputs = torch.rand(len(slots), model.input_size, generator=generator)
            outputs.append(model.step(pool, slots, inputs, check=False))
            state, want = eager.ntm_step(model64, state, inputs.double())  # type: ignore[arg-type]
            expected.append(want)
    assert relative_error(torch.stack(outputs), torch.stack(expected)) < 1e-5
    assert relative_error(pool["reads"][slots], state["reads"]) < 1e-4


SHAPES = {
    "ntm: two write heads, shift radius 2, two layers": NTMConfig(
        input_size=5, output_size=3, memory_rows=17, memory_width=7, read_heads=2,
        write_heads=2, shift_radius=2, controller_size=21, controller_layers=2,
        output_activation="identity",
    ),
    "ntm: write heads only": NTMConfig(
        input_size=4, output_size=6, memory_rows=9, memory_width=3, read_heads=0,
        write_heads=1, shift_radius=0, controller_size=8,
    ),
    "dnc: no links, three read heads": DNCConfig(
        input_size=6, output_size=2, memory_rows=11, word_size=5, read_heads=3,
        controller_size=19, use_links=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("config", SHAPES.values(), ids=SHAPES.keys())
def test_other_shapes_match_the_pytorch_path(
    config: NTMConfig | DNCConfig, monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """Random weights and states; padding rows among the live ones: the same outputs and
    reads as the PyTorch path, zeros on padding rows, other slots bit-identical."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model: ControllerMemoryModel = NTM(config) if isinstance(config, NTMConfig) else DNC(config)
    randomize(model, generator)
    pools = {fused: model.new_pool(7) for fused in ("1", "0")}
    fill_random(pools["1"], generator)
    slots = torch.tensor([5, -1, 0, 3, -1])
    model.reset(pools["1"], [5, 0, 3])
    for name in pools["0"]:
        pools["0"][name].copy_(pools["1"][name])
    untouched = {name: pools["1"][name][[1, 2, 4, 6]].clone() for name in pools["1"]}
    for _ in range(10):
        inputs = torch.randn(len(slots), model.input_size, generator=generator)
        results = {}
        for fused, pool in pools.items():
            monkeypatch.setenv(FUSED_ENV, fused)
            assert (fused_step(model, pool) is not None) == (fused == "1")
            results[fused] = model.step(pool, slots, inputs)
        assert torch.equal(results["1"][slots < 0], torch.zeros(2, model.output_size))
        assert relative_error(results["1"], results["0"]) < 1e-5
    assert relative_error(pools["1"]["reads"], pools["0"]["reads"]) < 1e-5
    for name in pools["1"]:
        assert torch.equal(pools["1"][name][[1, 2, 4, 6]], untouched[name]), name


def test_a_changed_weight_is_stepped_with(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """The packed weights follow the model's: a training step between two serving steps
    changes the next step as it changes the PyTorch path's (a stale packing would be off by
    far more than rounding)."""
    model = bundled("ntm-copy")
    pool, twin = model.new_pool(3), model.new_pool(3)
    model.reset(pool, range(3))
    inputs = torch.rand(3, model.input_size, generator=generator)
    model.step(pool, torch.arange(3), inputs)  # packs the weights
    with torch.no_grad():
        model.output.bias.add_(0.5)
    for name in pool:
        twin[name].copy_(pool[name])
    stepped = model.step(pool, torch.arange(3), inputs)
    monkeypatch.setenv(FUSED_ENV, "0")
    assert relative_error(stepped, model.step(twin, torch.arange(3), inputs)) < 1e-5


@pytest.mark.parametrize("name", ["ntm-copy", "dnc-recall"])
def test_each_row_gets_the_bits_it_gets_alone_in_any_tile(name: str) -> None:
    """The fused step called directly, padding rows (-1) and all: 21 sessions stepped in
    launches of 1 to 40 rows, padding scattered among them, so that a session sits at every
    position of full and short tiles; every output and every state is, bit for bit, that
    of the session stepped alone."""
    model = bundled(name)
    rng = np.random.default_rng()
    sessions = 21
    alone, shared = model.new_pool(sessions), model.new_pool(sessions + 6)
    model.reset(alone, range(sessions))
    home = rng.permutation(sessions + 6)[:sessions]
    model.reset(shared, home.tolist())
    alone_step, shared_step = fused_step(model, alone), fused_step(model, shared)
    assert alone_step is not None and shared_step is not None
    for _ in range(6):
        inputs = torch.from_numpy(rng.random((sessions, model.input_size), dtype=np.float32))
        expected = [alone_step(torch.tensor([s]), inputs[s : s + 1]) for s in range(sessions)]
        order = rng.permutation(sessions)
        cuts = sorted(rng.choice(np.arange(1, sessions), rng.integers(0, 4), replace=False))
        for launch in np.split(order, cuts):
            padding = int(rng.integers(0, 20))
            rows = [*launch.tolist(), *[-1] * padding]
            rng.shuffle(rows)
            slots = torch.tensor([-1 if r < 0 else int(home[r]) for r in rows])
            batch = torch.stack(
                [inputs[r] if r >= 0 else torch.rand(model.input_size) for r in rows]
            )
            got = shared_step(slots, batch)
            for position, session in enumerate(rows):
                want = torch.zeros(model.output_size) if session < 0 else expected[session][0]
                assert torch.equal(got[position], want), (session, position, len(rows))
    for session in range(sessions):
        mine, reference = shared.read(int(home[session])), alone.read(session)
        for tensor in mine:
            assert torch.equal(mine[tensor], reference[tensor]), (session, tensor)


def test_threads_stepping_other_slots_get_the_bits_of_one_thread() -> None:
    """The step is reentrant (its scratch is on the stack) and lets go of the GIL: four
    threads stepping disjoint slots of one pool at once end where one thread ends."""
    model = bundled("ntm-copy")
    pools = {mode: model.new_pool(32) for mode in ("threads", "one")}
    for pool in pools.values():
        model.reset(pool, range(32))
    inputs = torch.rand(50, 32, model.input_size)
    groups = [torch.arange(start, 32, 4) for start in range(4)]

    def run(pool: StatePool, group: Tensor) -> None:
        step = fused_step(model, pool)
        assert step is not None
        for k in range(inputs.shape[0]):
            step(group, inputs[k, group])

    threads = [threading.Thread(target=run, args=(pools["threads"], g)) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for group in groups:
        run(pools["one"], group)
    for name in pools["one"]:
        assert torch.equal(pools["threads"][name], pools["one"][name]), name


def test_slots_outside_the_pool_and_misfits_are_refused_before_anything_changes() -> None:
    """With `check=False` nothing in Python looks at the slots: the C step itself refuses
    one outside the pool, before it writes anything, so that no launch reads or writes
    past the pools; arguments of the wrong type or shape never reach it."""
    model = bundled("ntm-copy")
    pool = model.new_pool(3)
    model.reset(pool, range(3))
    before = {name: pool[name].clone() for name in pool}
    step = fused_step(model, pool)
    assert step is not None
    inputs = torch.rand(2, model.input_size)
    for slots in ([0, 3], [-2, 1], [1, 2**40]):
        with pytest.raises(ValueError, match="slots must be -1"):
            model.step(pool, torch.tensor(slots), inputs, check=False)
    with pytest.raises(ValueError, match="int64"):
        step(torch.tensor([0, 1], dtype=torch.int32), inputs)
    with pytest.raises(ValueError, match="inputs must be"):
        step(torch.tensor([0, 1]), torch.rand(2, model.input_size + 1))
    with pytest.raises(ValueError, match="inputs must be"):
        step(torch.tensor([0, 1, 2]), inputs)
    for name in pool:
        assert torch.equal(pool[name], before[name]), name


def test_a_pool_that_does_not_fit_the_build_is_refused(generator: torch.Generator) -> None:
    """The build says what it reads (floats per slot of each pool tensor, of each packed
    parameter): a tensor of another size is refused before any call."""
    model = bundled("ntm-copy")
    pool = model.new_pool(2)
    kind, sizes, names = model.fused_layout()
    state = [pool[name] for name in names if name is not None]
    params = packed_parameters(model)
    full = {**controller_sizes(model), **sizes}
    cpu_step.FusedStep(kind, full, params, state)  # fits
    with pytest.raises(ValueError, match="state tensor 0"):
        cpu_step.FusedStep(kind, full, params, [state[0][:, :-1].contiguous(), *state[1:]])
    with pytest.raises(ValueError, match="parameter 2"):
        cpu_step.FusedStep(kind, full, [*params[:2], params[2][:-1], *params[3:]], state)
    with pytest.raises(ValueError, match="more than"):
        cpu_step.FusedStep(kind, full, params[:-1], state)


@pytest.fixture
def fresh_build_state(tmp_path: Path) -> Iterator[Path]:
    """A cache folder of the test's own, and the compiler looked up afresh before and after."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cpu_step.CACHE_ENV, str(tmp_path / "cache"))
        cpu_step.reset()
        yield tmp_path
    cpu_step.reset()


def kernel_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "memserve.kernels"]


def test_without_a_compiler_the_pytorch_path_steps_and_one_line_says_so(
    fresh_build_state: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = bundled("ntm-copy")
    twin = model.new_pool(2)
    model.reset(twin, range(2))
    inputs = torch.rand(2, model.input_size)
    monkeypatch.setenv(FUSED_ENV, "0")
    expected = model.step(twin, torch.arange(2), inputs)
    monkeypatch.setenv(FUSED_ENV, "1")
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(fresh_build_state))  # no cc, no gcc
    cpu_step.reset()
    pool = model.new_pool(2)
    model.reset(pool, range(2))
    with caplog.at_level(logging.WARNING, logger="memserve.kernels"):
        assert not cpu_step.available() and fused_step(model, pool) is None
        outputs = model.step(pool, torch.arange(2), inputs)
        for _ in range(2):
            model.step(pool, torch.arange(2), inputs)
    assert torch.equal(outputs, expected)  # the PyTorch path, as with MEMSERVE_FUSED_STEP=0
    (line,) = kernel_warnings(caplog)
    assert "PyTorch path" in line and "no C compiler" in line
    assert "torch reference" in backend.describe() and "fused" not in backend.describe()


def test_a_compiler_that_fails_leaves_the_pytorch_path_and_one_line(
    fresh_build_state: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = fresh_build_state / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no headers here' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    cpu_step.reset()
    model = bundled("dnc-recall")
    pool = model.new_pool(3)
    model.reset(pool, range(3))
    with caplog.at_level(logging.WARNING, logger="memserve.kernels"):
        for _ in range(3):
            assert fused_step(model, pool) is None
            model.step(pool, torch.arange(3), torch.rand(3, model.input_size))
    (line,) = kernel_warnings(caplog)
    assert "compiling dnc.c failed" in line and "no headers here" in line
    assert not list((fresh_build_state / "cache").glob("*.so"))


def test_builds_are_cached_outside_the_tree_by_source_shape_flags_and_compiler(
    fresh_build_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {**controller_sizes(bundled("ntm-copy")), **bundled("ntm-copy").fused_layout()[1]}
    first = cpu_step.build("ntm", sizes)
    assert first.parent == fresh_build_state / "cache" and first.exists()
    made = first.stat().st_mtime_ns
    assert cpu_step.build("ntm", sizes) == first and first.stat().st_mtime_ns == made
    another_process = subprocess.run(
        [sys.executable, "-c", "import sys; from kernels import cpu_step; "
         f"print(cpu_step.library_path('ntm', {sizes!r}))"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert another_process.stdout.strip() == str(first)  # found there, not built again
    assert cpu_step.build("ntm", {**sizes, "HID": 7}) != first  # another shape
    monkeypatch.setattr(cpu_step, "FLAGS", (*cpu_step.FLAGS, "-DUNUSED_FLAG"))
    assert cpu_step.library_path("ntm", sizes) != first
    monkeypatch.undo()
    monkeypatch.setenv(cpu_step.CACHE_ENV, str(fresh_build_state / "cache"))
    edited = fresh_build_state / "sources"
    shutil.copytree(cpu_step.SOURCES, edited)
    with (edited / "cell.h").open("a") as source:
        source.write("/* edited */\n")
    monkeypatch.setattr(cpu_step, "SOURCES", edited)
    assert cpu_step.library_path("ntm", sizes) != first
    # and where nothing is set: the user's cache folder, never the source tree
    monkeypatch.delenv(cpu_step.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(fresh_build_state / "xdg"))
    assert cpu_step.cache_dir() == fresh_build_state / "xdg" / "memserve"
    blocked = fresh_build_state / "file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # not a folder: the temporary one
    assert cpu_step.cache_dir().parent == Path(tempfile.gettempdir())
    root = Path(__file__).resolve().parents[2]
    assert root not in cpu_step.cache_dir().parents


def test_the_worker_serves_the_fused_step_bits(generator: torch.Generator) -> None:
    """A launch through the worker's trusted path (`run_launch`, multi-step rows) gives the
    bits of the in-process fused step with each session alone, and agrees with the PyTorch
    path to rounding."""
    for name in ("ntm-copy", "dnc-recall"):
        model = bundled(name)
        pool = model.new_pool(5)
        model.reset(pool, range(5))
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
        inputs = [rng.random((steps, model.input_size), dtype=np.float32) for steps in (4, 2, 1)]
        slots = np.array([3, 0, 4], np.int64)
        twin = model.new_pool(5)
        model.reset(twin, range(5))
        landed = run_launch(model, pool, Launch(batches=(StepBatch.of(slots, inputs),)))
        outputs = landed.outputs[Operation.STEP]
        for row, (slot, rows) in enumerate(zip(slots, inputs, strict=True)):
            for k, step_inputs in enumerate(rows):
                want = model.step(
                    twin, torch.tensor([int(slot)]), torch.from_numpy(step_inputs[None])
                )
                assert np.array_equal(outputs[row, k], want[0].numpy()), (name, row, k)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(FUSED_ENV, "0")
            torch_pool = model.new_pool(5)
            model.reset(torch_pool, range(5))
            again = run_launch(model, torch_pool, Launch(batches=(StepBatch.of(slots, inputs),)))
        assert (
            relative_error(
                torch.from_numpy(outputs), torch.from_numpy(again.outputs[Operation.STEP])
            )
            < 1e-5
        )


def test_a_build_another_user_could_have_written_is_not_loaded(
    fresh_build_state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A library is code the process runs: a cached one (or a cache folder) that is
    writable by others is refused, and the model steps in PyTorch."""
    model = bundled("ntm-copy")
    sizes = {**controller_sizes(model), **model.fused_layout()[1]}
    library = cpu_step.build("ntm", sizes)
    library.chmod(0o666)
    cpu_step.reset()
    pool = model.new_pool(2)
    with caplog.at_level(logging.WARNING, logger="memserve.kernels"):
        assert fused_step(model, pool) is None
        model.step(pool, torch.arange(2), torch.rand(2, model.input_size))
    (line,) = kernel_warnings(caplog)
    assert "not private to this user" in line
    library.chmod(0o755)
    library.parent.chmod(0o777)
    cpu_step.reset()
    with pytest.raises(cpu_step.BuildError, match="not private"):
        cpu_step.build("ntm", sizes)
