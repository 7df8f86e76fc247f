"""`rowwise_product`: each row's result is the same bit for bit whatever rows share its
launch, on one thread and on two, and equals the plain matrix product to float32 rounding."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from models.controller import ROW_TILE, rowwise_product


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# Narrow products (few outputs, an odd width) are where an AVX2 CPU's BLAS once gave a row
# other bits at another place in its tile.
SHAPES = [(137, 2000), (129, 400), (2000, 64), (9, 7), (13, 9), (33, 3), (65, 1), (17, 15)]


@pytest.mark.parametrize(("width", "outputs"), SHAPES)
def test_a_row_does_not_depend_on_the_others(width: int, outputs: int, threads: int) -> None:
    generator = torch.Generator().manual_seed(width)
    weight = torch.randn(outputs, width, generator=generator)
    rows = torch.randn(3 * ROW_TILE + 5, width, generator=generator)
    together = rowwise_product(rows, weight)
    for index in range(rows.shape[0]):
        alone = rowwise_product(rows[index : index + 1], weight)[0]
        assert torch.equal(alone, together[index]), index
        others = torch.randn(ROW_TILE - 1, width, generator=generator)
        place = index % ROW_TILE  # every place in a tile, each row at another than before
        mixed = torch.cat([others[:place], rows[index : index + 1], others[place:]])
        assert torch.equal(rowwise_product(mixed, weight)[place], together[index]), index
    exact = (rows.double() @ weight.double().t()).float()  # float64, then rounded once
    torch.testing.assert_close(together, exact, rtol=1e-5, atol=1e-5 * width**0.5)


def test_strided_inputs_give_the_same_rows() -> None:
    """The controller passes h[:, layer], a strided view."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 12, generator=generator)
    state = torch.randn(20, 3, 12, generator=generator)
    assert torch.equal(
        rowwise_product(state[:, 1], weight), rowwise_product(state[:, 1].contiguous(), weight)
    )
