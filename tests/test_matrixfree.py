"""MatrixFreeOperator: the operator contract (in-process and on 2 Ray actors) against the dense
kernel, equality with a float32 StoredOperator, the same PCG solve, and the float32 error.
"""

from __future__ import annotations

import numpy as np
import pytest
from operator_contract import OperatorContract

from ntk_scale import FullyConnected, stages
from ntk_scale.kernels.products import panel_matmul_function
from ntk_scale.linalg import nystrom, solve_pcg
from ntk_scale.linalg.matrixfree import MatrixFreeOperator, precision_report
from ntk_scale.linalg.stored import StoredOperator
from ntk_scale.options import GramOptions, RunOptions
from ntk_scale.roles import ProductWorker

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
#: 3 row blocks of tile 128, the last one short (77 rows): padding is exercised.
N, D, TILE = 333, 6, 128


@pytest.fixture(scope="module")
def data():
    """X (N, D) and its dense Gram twins: float32 tiles upcast, and float64."""
    X = np.random.default_rng(N).standard_normal((N, D))
    K32 = SPEC.kernel(X, None, "ntk", "float32").astype(np.float64)
    return X, K32, SPEC.kernel(X, None, "ntk", "float64")


@pytest.fixture(scope="module")
def stored(ray_local, data, tmp_path_factory):
    """A float32 StoredOperator of the same X, made by the Gram engine."""
    url = str(tmp_path_factory.mktemp("matrixfree") / "f32.zarr")
    opts = RunOptions(workers=2, progress=False, wait_seconds=1.0)
    stages.gram(data[0], SPEC, url, GramOptions(dtype="float32", tile=TILE), opts)
    return StoredOperator(url)


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


class MatrixFreeContract(OperatorContract):
    # float32 tiles recomputed in another compiled function than the dense twin's: entries agree
    # to float32 rounding (~1e-7 relative), products are float64.
    rtol = 1e-6
    storage_dtypes = (np.float32,)


class TestMatrixFreeLocal(MatrixFreeContract):
    @pytest.fixture
    def pair(self, data):
        return MatrixFreeOperator(SPEC, data[0], tile=TILE, local=True), data[1]

    def test_one_worker_owns_every_row(self, pair):
        op, K = pair
        (s,) = op.stats()
        assert s["blocks"] == (0, 3) and s["rows"] == (0, K.shape[0])
        op.matmat(np.ones((K.shape[0], 2)))
        assert op.stats()[0]["products"] == 1 and op.last_product_seconds > 0


class TestMatrixFreeFloat64(MatrixFreeContract):
    rtol = 1e-12
    storage_dtypes = (np.float64,)

    @pytest.fixture
    def pair(self, data):
        return MatrixFreeOperator(SPEC, data[0], dtype="float64", tile=TILE, local=True), data[2]


class TestMatrixFreeTwoActors(MatrixFreeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def pair(cls, ray_local, data):
        with MatrixFreeOperator(SPEC, data[0], tile=TILE, n_actors=2) as op:
            yield op, data[1]

    def test_two_actors_own_every_row_block_once(self, pair):
        op, K = pair
        stats = op.stats()
        assert [s["blocks"] for s in stats] == op.ranges == [(0, 1), (1, 3)]
        assert [s["rows"] for s in stats] == [(0, TILE), (TILE, K.shape[0])]
        assert len({s["pid"] for s in stats}) == 2


def test_closed_operator_refuses(ray_local, data):
    # After the class above has released its two actors (each holds one of the two CPUs).
    op = MatrixFreeOperator(SPEC, data[0][:50], tile=TILE, n_actors=1)
    op.close()
    op.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed; build a new one"):
        op.matmat(np.ones((50, 1)))


def test_equals_the_stored_operator(stored, data):
    op = MatrixFreeOperator(SPEC, data[0], tile=TILE, local=True)
    P = np.random.default_rng(3).standard_normal((N, 4))
    got, want = op.matmat(P), stored.matmat(P)
    assert rel(got, want) <= 1e-6
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    np.testing.assert_array_equal(op.diag(), stored.diag())
    idx = np.array([0, 200, 332, 127, 128])
    assert rel(op.columns(idx), stored.columns(idx)) <= 1e-6


def test_pcg_solve_equals_the_stored_solve(stored, data):
    """solve_pcg with an RPCholesky Nyström preconditioner, on each operator."""
    op = MatrixFreeOperator(SPEC, data[0], tile=TILE, local=True)
    Y = np.random.default_rng(5).standard_normal((N, 2))
    lam = 1e-2 * np.mean(op.diag())
    solves = [
        solve_pcg(o, Y, lam, nystrom(o, 60, lam, pivots="rpcholesky", seed=0), tol=1e-10)
        for o in (op, stored)
    ]
    assert all(s.converged.all() for s in solves)
    # The operators differ by float32 rounding (~1e-7 relative); κ(K + λI) ≈ 2500 here bounds
    # how much the solutions may differ, and they differ by ~1e-6.
    assert rel(solves[0].x, solves[1].x) <= 1e-5
    # Normwise backward error: the matrix-free solution solves the stored system to float32
    # rounding of K, ||Y - (K + λI) x|| <= 1e-6 ||K + λI|| ||x||.
    x = solves[0].x
    residual = Y - (stored.matmat(x) + lam * x)
    scale = np.linalg.norm(data[1], 2) + lam
    assert np.linalg.norm(residual, axis=0).max() <= 1e-6 * scale * np.linalg.norm(x, axis=0).min()
    # At tol 1e-10, within ~1e3 of float32 rounding, the two take about as many iterations.
    assert abs(solves[0].iterations - solves[1].iterations) <= 0.1 * solves[1].iterations


def test_float32_error_against_float64_is_small(data):
    X, _, K64 = data
    P = np.random.default_rng(7).standard_normal((N, 3))
    report = precision_report(SPEC, X, P, tile=TILE)
    assert report.rows == N
    assert 0 < report.max_rel <= 1e-5 and report.fro_rel <= 1e-5
    first = precision_report(SPEC, X, P, tile=TILE, row_blocks=1)
    assert first.rows == TILE
    op64 = MatrixFreeOperator(SPEC, X, dtype="float64", tile=TILE, local=True)
    assert rel(op64.matmat(P), K64 @ P) <= 1e-13


@pytest.mark.parametrize("a,b", [(0, 1), (1, 3), (2, 3)])
def test_worker_rows_without_ray(data, a, b):
    X, K, _ = data
    w = ProductWorker(SPEC, X, "ntk", "float32", TILE, a, b)
    r0, r1 = w.stats()["rows"]
    P = np.random.default_rng(a).standard_normal((N, 5))  # 5 columns: padded to 8
    np.testing.assert_allclose(w.matmat(P), K[r0:r1] @ P, rtol=0, atol=1e-6 * np.abs(K @ P).max())
    idx = np.arange(r0 - 3 if r0 else 0, min(r1 + 3, N))  # straddles the owned rows
    np.testing.assert_allclose(w.columns(idx), K[r0:r1][:, idx], rtol=0, atol=1e-6 * K.max())


def test_panel_function_holds_one_shape_per_row_block(data):
    """One compiled panel serves every row block: the row index is traced, not static."""
    import jax

    X, K, _ = data
    xs = np.zeros((3, TILE, D), dtype=np.float32)
    xs.reshape(-1, D)[:N] = X
    ps = np.zeros((3, TILE, 1))
    ps.reshape(-1, 1)[:N] = 1.0
    fn = panel_matmul_function(SPEC)
    with jax.enable_x64(True):
        rows = np.concatenate([np.asarray(fn(xs[i], i, xs, ps)) for i in range(3)])[:N, 0]
    np.testing.assert_allclose(rows, K.sum(axis=1), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"tile": 0}, "tile=0"), ({"dtype": "float16"}, "dtype"), ({"kind": "cntk"}, "kind")],
)
def test_rejects_bad_arguments(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MatrixFreeOperator(SPEC, data[0], local=True, **kwargs)


def test_estimator_matrixfree_and_auto_match_stored(ray_local, tmp_path):
    """operator="matrixfree" stores no tile and predicts what the stored path predicts."""
    from ntk_scale import NTKRegressor
    from ntk_scale.store import GramStore

    rng = np.random.default_rng(5)
    x, xs = rng.normal(size=(300, 6)), rng.normal(size=(20, 6))
    y = np.sin(x[:, 0])
    spec = FullyConnected(depth=2, W_std=1.4, b_std=0.1)
    kw = dict(kernel=spec, tile=128, tol=1e-10, rank=100, ridge=1e-3, workers=2)
    stored = NTKRegressor(operator="stored", workdir=str(tmp_path / "s"), **kw).fit(x, y)
    free = NTKRegressor(operator="matrixfree", workdir=str(tmp_path / "m"), **kw).fit(x, y)
    assert GramStore.open(free.store_).completed() == set()
    np.testing.assert_allclose(free.predict(xs), stored.predict(xs), rtol=1e-4, atol=1e-6)
    auto = NTKRegressor(operator="auto", workdir=str(tmp_path / "a"), **kw).fit(x, y)
    assert auto.operator_ in ("stored", "matrixfree")
    assert "cheaper" in auto.operator_choice_
