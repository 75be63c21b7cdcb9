"""BlockPlan: every entry covered exactly once, for any N, N* and tile size."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_scale.plan import BlockPlan, pad_rows


def _coverage(plan: BlockPlan) -> np.ndarray:
    count = np.zeros((plan.n_rows, plan.n_cols), dtype=np.int64)
    for t in plan.tiles():
        count[t.rows, t.cols] += 1
        if plan.symmetric and not t.diagonal:
            count[t.cols, t.rows] += 1
    return count


@given(n=st.integers(1, 300), tile=st.integers(1, 128))
@settings(max_examples=200, deadline=None)
def test_symmetric_tiles_cover_every_entry_once(n, tile):
    plan = BlockPlan.square(n, tile)
    assert (_coverage(plan) == 1).all()
    tiles = list(plan.tiles())
    assert len(tiles) == plan.n_tiles == len(set(tiles))
    assert all(t.i <= t.j for t in tiles)
    assert all(t.shape[0] <= tile and t.shape[1] <= tile for t in tiles)


@given(n_star=st.integers(1, 300), n=st.integers(1, 300), tile=st.integers(1, 128))
@settings(max_examples=200, deadline=None)
def test_rectangular_tiles_cover_every_entry_once(n_star, n, tile):
    plan = BlockPlan(n_star, n, tile, symmetric=False)
    assert (_coverage(plan) == 1).all()
    assert len(list(plan.tiles())) == plan.n_tiles
    assert plan.entries() == n_star * n


@given(n=st.integers(1, 200), tile=st.integers(1, 64))
@settings(max_examples=100, deadline=None)
def test_row_panels_reassemble_the_matrix(n, tile):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, n))
    k = a + a.T
    plan = BlockPlan.square(n, tile)
    stored = {t.key: k[t.rows, t.cols] for t in plan.tiles()}
    rebuilt = np.vstack(
        [
            np.hstack([stored[t.key].T if tr else stored[t.key] for t, tr in plan.panel_tiles(i)])
            for i in range(plan.row_blocks)
        ]
    )
    np.testing.assert_array_equal(rebuilt, k)


def test_edge_cases_and_errors():
    plan = BlockPlan.square(1003, 256)
    assert plan.row_blocks == 4 and plan.n_tiles == 10
    assert plan.tile_at(3, 3).shape == (235, 235)
    assert plan.block_of(3, 1) == (plan.tile_at(1, 3), True)
    with pytest.raises(IndexError):
        plan.tile_at(2, 1)
    with pytest.raises(ValueError, match="symmetric plan needs a square"):
        BlockPlan(10, 11, 4, symmetric=True)
    with pytest.raises(ValueError, match="tile=0"):
        BlockPlan.square(10, 0)


def test_pad_rows():
    x = np.ones((3, 2), np.float32)
    p = pad_rows(x, 5)
    assert p.shape == (5, 2) and p.dtype == np.float32 and (p[3:] == 0).all()
    assert pad_rows(x, 3) is x
