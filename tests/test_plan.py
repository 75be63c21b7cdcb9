"""BlockPlan: every entry covered exactly once, for any N, N* and tile size."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_scale.plan import BlockPlan, locate, n_blocks, pad_rows, rows_in_block, split_blocks

#: Hypothesis examples per property: make test-fast draws a fifth (the coverage checks walk every
#: tile in Python, up to 90,000 of them at tile 1).
EXAMPLES = 40 if os.environ.get("NTK_SCALE_TEST_TIER") == "fast" else 200


def _coverage(plan: BlockPlan) -> np.ndarray:
    count = np.zeros((plan.n_rows, plan.n_cols), dtype=np.int64)
    for t in plan.tiles():
        count[t.rows, t.cols] += 1
        if plan.symmetric and not t.diagonal:
            count[t.cols, t.rows] += 1
    return count


@given(n=st.integers(1, 300), tile=st.integers(1, 128))
@settings(max_examples=EXAMPLES, deadline=None)
def test_symmetric_tiles_cover_every_entry_once(n, tile):
    plan = BlockPlan.square(n, tile)
    assert (_coverage(plan) == 1).all()
    tiles = list(plan.tiles())
    assert len(tiles) == plan.n_tiles == len(set(tiles))
    assert all(t.i <= t.j for t in tiles)
    assert all(t.shape[0] <= tile and t.shape[1] <= tile for t in tiles)


@given(n_star=st.integers(1, 300), n=st.integers(1, 300), tile=st.integers(1, 128))
@settings(max_examples=EXAMPLES, deadline=None)
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


@given(n=st.integers(1, 300), tile=st.integers(1, 128), data=st.data())
@settings(max_examples=EXAMPLES, deadline=None)
def test_index_arithmetic_agrees_with_the_plan(n, tile, data):
    """locate / rows_in_block / n_blocks / split_blocks against the plan's own row ranges (a
    brute-force oracle: the block whose range holds each row)."""
    plan = BlockPlan.square(n, tile)
    assert n_blocks(n, tile) == plan.row_blocks
    ranges = [plan.row_range(b) for b in range(plan.row_blocks)]
    assert [rows_in_block(n, tile, b) for b in range(plan.row_blocks)] == [
        r1 - r0 for r0, r1 in ranges
    ]
    assert rows_in_block(n, tile, plan.row_blocks) == 0
    idx = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=40)), dtype=np.int64)
    blocks, offsets = locate(idx, tile)
    want = [next(b for b, (r0, r1) in enumerate(ranges) if r0 <= i < r1) for i in idx]
    assert blocks.tolist() == want
    assert [ranges[b][0] + o for b, o in zip(blocks, offsets, strict=True)] == idx.tolist()
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    xs = split_blocks(x, tile, np.float32)
    assert xs.shape == (plan.row_blocks, tile, 2) and xs.dtype == np.float32
    np.testing.assert_array_equal(xs[blocks, offsets], x[idx].astype(np.float32))
    assert not xs.reshape(-1, 2)[n:].any()  # the padding is zeros


def test_locate_refuses_negative_indices():
    with pytest.raises(IndexError, match="negative"):
        locate([3, -1], 4)
