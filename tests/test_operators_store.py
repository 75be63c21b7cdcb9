"""Operators over a Gram store: StoredOperator (one machine) and DistributedOperator (Ray actors).

Each passes the operator contract against its dense twin (the store's full matrix, upcast to
float64), and block PCG on it matches scipy.linalg.cho_solve of that matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from operator_contract import OperatorContract

from ntk_scale import FullyConnected, stages
from ntk_scale.linalg import identity, nystrom, solve_pcg
from ntk_scale.linalg.distributed import DistributedOperator
from ntk_scale.linalg.stored import StoredOperator
from ntk_scale.options import GramOptions, RunOptions
from ntk_scale.panels import partition_blocks, tiles_touching
from ntk_scale.plan import BlockPlan
from ntk_scale.roles import PanelWorker
from ntk_scale.store import GramStore

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
OPTS = RunOptions(workers=2, progress=False, wait_seconds=1.0)
#: name -> (N, dtype): 5 and 3 row blocks of tile 128, each with a short last block.
STORES = {"f64": (600, "float64"), "f32": (333, "float32")}


@pytest.fixture(scope="module")
def stores(ray_local, tmp_path_factory):
    """name -> (url, K (N, N) float64): two small stores made by the Gram engine, and the dense
    twin computed from X by the kernel in one call."""
    root = tmp_path_factory.mktemp("operator-stores")
    out = {}
    for name, (n, dtype) in STORES.items():
        x = np.random.default_rng(n).standard_normal((n, 6))
        url = str(root / f"{name}.zarr")
        stages.gram(x, SPEC, url, GramOptions(dtype=dtype, tile=128), OPTS)
        # The twin is the kernel of X in one call, not the store's own chunks read back.
        out[name] = (url, SPEC.kernel(x, dtype=dtype).astype(np.float64))
    return out


def tile_bytes(store: GramStore, tiles) -> int:
    return sum(t.shape[0] * t.shape[1] for t in tiles) * store.dtype.itemsize


class StoreOperatorContract(OperatorContract):
    """The operator contract plus PCG against a dense Cholesky solve."""

    pcg_rtol = 1e-8

    @pytest.mark.parametrize("name", ["rpcholesky", "none"])
    def test_pcg_matches_cholesky(self, pair, name):
        op, K = pair
        n = K.shape[0]
        Y = np.random.default_rng(5).standard_normal((n, 2))
        lam = 1e-2 * np.mean(np.diag(K))
        ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(n)), Y)
        M = nystrom(op, 60, lam, pivots="rpcholesky", seed=0) if name != "none" else identity()
        res = solve_pcg(op, Y, lam, M, tol=1e-10)
        assert res.converged.all()
        assert np.linalg.norm(res.x - ref) / np.linalg.norm(ref) <= self.pcg_rtol


class TestStoredOperator(StoreOperatorContract):
    @pytest.fixture
    def pair(self, stores):
        url, K = stores["f64"]
        return StoredOperator(url), K

    def test_each_stored_tile_read_once_per_product(self, pair):
        op, K = pair
        reads: list[tuple[int, int]] = []
        read_tile = op.store.read_tile
        op.store.read_tile = lambda i, j: reads.append((i, j)) or read_tile(i, j)
        P = np.ones((K.shape[0], 2))
        for _ in range(2):
            before = op.bytes_read
            op.matmat(P)
            assert op.bytes_read - before == op.stored_bytes
        tiles = [(t.i, t.j) for t in op.store.plan.tiles()]
        assert sorted(reads) == sorted(tiles * 2)
        assert op.stored_bytes == tile_bytes(op.store, op.store.plan.tiles())
        assert op.stored_bytes < K.size * 8  # the upper triangle only: 15 of 25 tiles
        assert op.last_product_seconds > 0

    @pytest.mark.parametrize("read_ahead", [0, 1, 5])
    def test_read_ahead_gives_the_same_bits(self, pair, read_ahead):
        op, K = pair
        P = np.random.default_rng(0).standard_normal((K.shape[0], 3))
        other = StoredOperator(op.store, read_ahead=read_ahead)
        assert np.array_equal(other.matmat(P), op.matmat(P))


class TestStoredOperatorFloat32(StoreOperatorContract):
    # The twin is the float32 kernel of X in one call; the store's tiles were computed tile by
    # tile, so entries differ by float32 rounding (~1e-7 relative). Measured here: products
    # 7e-8 of their scale, PCG 1.9e-6 relative (cond(K + λI) = 2.5e3); bounds ~10x above.
    rtol = 1e-6
    columns_rtol = 1e-6
    pcg_rtol = 2e-5

    @pytest.fixture
    def pair(self, stores):
        url, K = stores["f32"]
        return StoredOperator(GramStore.open(url), read_ahead=1), K

    def test_dtype_is_the_storage_dtype(self, pair):
        assert pair[0].dtype == np.float32


class DistributedContract(StoreOperatorContract):
    budget = 0

    @pytest.fixture(scope="class")
    @classmethod
    def pair(cls, stores):
        url, K = stores["f64"]
        with DistributedOperator(url, n_actors=2, memory_budget_bytes=cls.budget) as op:
            yield op, K

    def test_two_actors_own_every_row_block_once(self, pair):
        op, K = pair
        stats = op.stats()
        assert [s["blocks"] for s in stats] == op.ranges == [(0, 2), (2, 5)]
        assert stats[0]["rows"][0] == 0 and stats[-1]["rows"][1] == K.shape[0]
        assert stats[0]["rows"][1] == stats[1]["rows"][0]
        assert len({s["pid"] for s in stats}) == 2


class TestDistributedInMemory(DistributedContract):
    budget = 2**30

    def test_panels_in_memory_read_once(self, pair):
        op, K = pair
        before = op.stats()
        op.matmat(np.ones((K.shape[0], 1)))
        for s, (a, b) in zip(op.stats(), op.ranges, strict=True):
            assert s["in_memory"]
            needed = tile_bytes(op.store, tiles_touching(op.store.plan, a, b))
            assert s["bytes_read"] == needed  # at startup, and not again
        assert [s["bytes_read"] for s in before] == [s["bytes_read"] for s in op.stats()]


class TestDistributedStreaming(DistributedContract):
    budget = 0

    def test_streams_each_needed_tile_once_per_product(self, pair):
        op, K = pair
        before = op.stats()
        op.matmat(np.ones((K.shape[0], 1)))
        for s0, s1, (a, b) in zip(before, op.stats(), op.ranges, strict=True):
            assert not s1["in_memory"]
            needed = tile_bytes(op.store, tiles_touching(op.store.plan, a, b))
            assert s1["bytes_read"] - s0["bytes_read"] == needed


@pytest.mark.parametrize("budget", [0, 2**30])
def test_panel_worker_without_ray(stores, budget):
    url, K = stores["f32"]
    P = np.random.default_rng(1).standard_normal((K.shape[0], 2))
    for a, b in [(0, 1), (1, 3)]:
        worker = PanelWorker(url, a, b, budget)
        r0, r1 = worker.stats()["rows"]
        assert worker.stats()["in_memory"] == (budget > 0)
        want = K[r0:r1] @ P  # float32 tiles vs the one-call twin: float32 rounding (see above)
        np.testing.assert_allclose(worker.matmat(P), want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(
    "n,tile,parts", [(600, 128, 2), (1000, 100, 3), (1000, 100, 7), (90, 128, 3)]
)
def test_partition_blocks_is_contiguous_and_balanced(n, tile, parts):
    plan = BlockPlan.square(n, tile)
    ranges = partition_blocks(plan, parts)
    assert len(ranges) == min(parts, plan.row_blocks)
    assert ranges[0][0] == 0 and ranges[-1][1] == plan.row_blocks
    assert all(a < b for a, b in ranges)
    assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:], strict=False))
    rows = [plan.row_range(b - 1)[1] - plan.row_range(a)[0] for a, b in ranges]
    assert max(rows) - min(rows) <= 2 * tile


def test_operators_refuse_a_rectangular_store(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 3))
    url = str(tmp_path / "rect.zarr")
    GramStore.create(url, SPEC, x[:10], x_cols=x, dtype="float64", tile=32)
    with pytest.raises(ValueError, match="rectangular.*symmetric training Gram"):
        StoredOperator(url)


def test_operators_refuse_an_unfinished_store(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 3))
    url = str(tmp_path / "partial.zarr")
    GramStore.create(url, SPEC, x, dtype="float64", tile=32, diag=np.ones(40))
    with pytest.raises(ValueError, match="lacks 3 of 3 tiles.*stages.gram"):
        StoredOperator(url)
