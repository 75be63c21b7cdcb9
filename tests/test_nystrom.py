"""Nyström kernel ridge regression with Falkon's preconditioner (ntk_scale.linalg.falkon).

Oracles: dense float64 linear algebra with numpy/scipy on the kernel matrix from
``kernel.kernel(x)`` (its symmetric path, not the row blocks the solver uses): at M = N the
exact solve ``scipy.linalg.cho_solve((K + λI), y)``; at M < N the M x M normal equations
(K[:, S]ᵀ K[:, S] + λ K[S, S]) α = K[:, S]ᵀ y solved by ``scipy.linalg.solve``; for a fold, the
same on the fold's rows only.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import zarr

from ntk_scale import FullyConnected, stax
from ntk_scale.kernels import bind
from ntk_scale.linalg import ConvergenceWarning, solve_pcg
from ntk_scale.linalg import falkon as F
from ntk_scale.store import GramStore

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
N, M, D, RIDGE, TOL = 240, 40, 3, 1e-3, 1e-12


def _data(n: int = N, d: int = D, seed: int = 0, c: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.stack([np.sin(x[:, 0]) + x[:, 1], np.cos(x[:, 2 % d])], axis=1)[:, :c]
    return x, y


def _lam(K: np.ndarray, ridge: float = RIDGE) -> float:
    return ridge * np.trace(K) / len(K)


def _dense_nystrom(K: np.ndarray, S: np.ndarray, y: np.ndarray, lam: float,
                   rows: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The M x M normal equations on the rows ``rows`` (default all), in float64."""
    rows = np.arange(len(K)) if rows is None else rows
    Knm = K[np.ix_(rows, S)]
    A = Knm.T @ Knm + lam * K[np.ix_(S, S)]
    return scipy.linalg.solve(A, Knm.T @ y[rows], assume_a="pos")


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def fc():
    x, y = _data()
    return x, y, SPEC.kernel(x, dtype="float64")


@pytest.fixture(scope="module")
def knm(fc):
    """M = 40 uniform centres; K(X, C) computed once by KernelBlocks and held (ArrayBlocks),
    and K_mm, for the tests of the solve's columns (ridges, folds, preconditioners)."""
    x, y, K = fc
    S = F.select_centers(SPEC, x, M, method="uniform", seed=3)
    blocks = F.KernelBlocks(SPEC, x, x[S], block=64, center_index=S)
    return S, F.ArrayBlocks(F.materialize(blocks), block=64), F.kernel_kmm(SPEC, x[S], block=64)


# -- the solve against dense oracles --------------------------------------------------------
def test_every_row_a_centre_is_the_exact_solve(fc):
    x, y, K = fc
    lam = _lam(K)
    exact = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(N)), y)
    fit = F.fit_nystrom(SPEC, x, y, np.arange(N), lam, block=64, tol=TOL)
    assert fit.pcg.converged.all()
    assert fit.pcg.iterations <= 3  # at M = N Falkon's P is the system itself
    assert _rel(fit.alpha, exact) < 1e-8


@pytest.mark.parametrize("method", ["uniform", "rpcholesky"])
def test_fewer_centres_match_the_dense_nystrom_solve(fc, method):
    x, y, K = fc
    lam = _lam(K)
    S = F.select_centers(SPEC, x, M, method=method, seed=3)
    fit = F.fit_nystrom(SPEC, x, y, S, lam, block=64, tol=TOL)
    want = _dense_nystrom(K, S, y, lam)
    assert fit.pcg.converged.all()
    assert _rel(fit.alpha, want) < 1e-7
    xs, _ = _data(50, seed=9)
    pred = F.predict_nystrom(SPEC, xs, x[S], fit.alpha, block=32)
    assert _rel(pred, SPEC.kernel(xs, x[S], dtype="float64") @ want) < 1e-7


def test_float32_blocks_agree_with_float64(fc):
    x, y, K = fc
    lam = _lam(K, 1e-2)
    S = F.select_centers(SPEC, x, M, method="uniform", seed=1)
    fit = F.fit_nystrom(SPEC, x, y, S, lam, dtype="float32", block=64, tol=1e-10, keep=True)
    want = _dense_nystrom(K, S, y, lam)
    pred, ref = K[:, S] @ fit.alpha, K[:, S] @ want
    assert _rel(pred, ref) < 1e-3


@pytest.mark.slow
def test_conv_kernel_on_image_rows():
    net = stax.serial(stax.Conv(4, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
                      stax.Flatten(), stax.Dense(1, W_std=1.4, b_std=0.1))  # fmt: skip
    shape = (5, 5, 1)
    kernel = bind(net, shape)
    rng = np.random.default_rng(2)
    n = 40
    x = rng.standard_normal((n, *shape)).reshape(n, -1)  # image rows (n, H·W·C)
    y = x[:, :3].sum(axis=1, keepdims=True)
    K = np.asarray(kernel.kernel(x.reshape(n, *shape), dtype="float64"), dtype=np.float64)
    lam = _lam(K, 1e-2)
    exact = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(n)), y)
    full = F.fit_nystrom(kernel, x, y, np.arange(n), lam, block=16, tol=TOL, keep=True)
    assert _rel(full.alpha, exact) < 1e-8
    S = F.select_centers(kernel, x, 12, method="rpcholesky", seed=0)
    fit = F.fit_nystrom(kernel, x, y, S, lam, block=16, tol=TOL, keep=True)
    assert _rel(fit.alpha, _dense_nystrom(K, S, y, lam)) < 1e-7


def test_many_ridges_in_one_solve_equal_separate_solves(fc, knm):
    _, y, K = fc
    S, blocks, K_mm = knm
    lams = np.array([_lam(K, r) for r in (1e-4, 1e-3, 1e-1)])
    Y = np.repeat(y[:, :1], len(lams), axis=1)
    fit = F.solve_nystrom(F.BlockProducts(blocks), K_mm, Y, lams, tol=TOL)
    assert fit.pcg.converged.all()
    for j, lam in enumerate(lams):
        assert _rel(fit.alpha[:, j], _dense_nystrom(K, S, y[:, :1], lam)[:, 0]) < 1e-7


def test_cross_validation_masks_equal_solves_on_each_fold(fc, knm):
    _, y, K = fc
    S, blocks, K_mm = knm
    lams = np.array([_lam(K, 1e-3), _lam(K, 1e-1)])
    folds = np.random.default_rng(0).permutation(N) % 3
    cols = [(f, k) for f in range(3) for k in range(len(lams))]
    mask = np.stack([folds != f for f, _ in cols], axis=1)
    Y = np.repeat(y[:, :1], len(cols), axis=1)
    lam_c = np.array([lams[k] for _, k in cols])
    fit = F.solve_nystrom(F.BlockProducts(blocks, mask), K_mm, Y, lam_c, tol=TOL)
    assert fit.pcg.converged.all()
    for j, (f, k) in enumerate(cols):
        want = _dense_nystrom(K, S, y[:, :1], lams[k], rows=np.flatnonzero(folds != f))
        assert _rel(fit.alpha[:, j], want[:, 0]) < 1e-7


def test_falkon_cuts_iterations_against_identity(fc, knm):
    _, y, K = fc
    _, blocks, K_mm = knm
    counts = {}
    for name in ("falkon", "identity"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit = F.solve_nystrom(F.BlockProducts(blocks), K_mm, y, _lam(K, 1e-4), name,
                                  tol=1e-8, max_iter=2000)  # fmt: skip
        counts[name] = fit.pcg.iterations
    assert counts["falkon"] * 4 <= counts["identity"], counts


def test_resume_from_a_saved_state_is_bitwise_the_same(fc, knm):
    _, y, K = fc
    _, blocks, K_mm = knm
    products, lam = F.BlockProducts(blocks), _lam(K)
    states = []
    full = F.solve_nystrom(products, K_mm, y, lam, tol=TOL, callback=states.append)
    resumed = F.solve_nystrom(products, K_mm, y, lam, tol=TOL, state=states[2])
    assert full.pcg.iterations == resumed.pcg.iterations > 3
    np.testing.assert_array_equal(full.alpha, resumed.alpha)


# -- K(X, C) sources --------------------------------------------------------------------------
def test_blocks_from_a_rectangular_store_and_from_zarr_rows(fc, knm, tmp_path):
    x, y, K = fc
    lam = _lam(K)
    S = knm[0]
    store = GramStore.create(str(tmp_path / "knm.zarr"), SPEC, x, x_cols=x[S],
                             dtype="float64", tile=64)  # fmt: skip
    for t in store.plan.tiles():
        store.write_tile(t, K[t.rows][:, S[t.cols]])
    stored = F.StoreBlocks(store)
    got = F.solve_nystrom(F.BlockProducts(stored), F.rows_of(stored, S), y, lam, tol=TOL)
    want = _dense_nystrom(K, S, y, lam)
    assert _rel(got.alpha, want) < 1e-7
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=x.shape, chunks=(50, D), dtype="f8")
    z[...] = x
    lazy = zarr.open_array(str(tmp_path / "x.zarr"), mode="r")
    np.testing.assert_array_equal(F.take_rows(lazy, S, block=32), x[S])
    fit = F.fit_nystrom(SPEC, lazy, y, S, lam, block=64, tol=TOL, keep=True)
    assert _rel(fit.alpha, want) < 1e-7


def test_block_normal_is_knm_transpose_mask_knm_p():
    rng = np.random.default_rng(0)
    K_b = rng.standard_normal((7, 4)).astype(np.float32)
    P, mask = rng.standard_normal((4, 3)), rng.random((7, 3)) < 0.5
    K = K_b.astype(np.float64)
    np.testing.assert_allclose(F.block_normal(K_b, P, mask), K.T @ (mask * (K @ P)), rtol=1e-12)
    np.testing.assert_allclose(F.block_rhs(K_b, P[:, :1].repeat(7, 0)[:7], None),
                               K.T @ P[:, :1].repeat(7, 0)[:7], rtol=1e-12)  # fmt: skip


@pytest.mark.parametrize("m, panel, order",
                         [(37, 8, "C"), (29, 8, "F"), (16, 16, "F"), (5, 64, "C")])  # fmt: skip
def test_add_gram_and_mirror_equal_the_float64_product(m, panel, order):
    """H accumulated block by block on its upper triangle (one syrk into a C- or F-ordered H
    in place; or, wider than ``panel``, column panels: OpenBLAS's dsyrk segfaults at
    n = 20,000 here), then mirrored, is KᵀK to 1e-12, for float64 blocks and for float32 ones
    (upcast: their products are float64, so H stays positive semi-definite however small λK_mm is),
    against numpy's float64 product; an empty block adds nothing."""
    rng = np.random.default_rng(7)
    K = rng.normal(size=(90, m)) + 3.0
    for blocks in (K, K.astype(np.float32)):
        H = np.zeros((m, m), order=order)
        for r0 in range(0, 90, 40):
            F.add_gram(H, blocks[r0 : r0 + 40], panel)  # panel < m: syrk blocks + GEMMs
        F.add_gram(H, blocks[:0])
        assert not np.any(np.tril(H, -1)), "add_gram writes the upper triangle only"
        want = blocks.astype(np.float64).T @ blocks.astype(np.float64)
        np.testing.assert_allclose(F.mirror_upper(H, panel), want, rtol=1e-12)
    with pytest.raises(TypeError, match="contiguous float64"):
        F.add_gram(np.zeros((m, m), np.float32), K)


# -- centre selection -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["uniform", "rpcholesky"])
def test_centres_are_deterministic_distinct_sorted_in_range(fc, method):
    x, _, _ = fc
    a = F.select_centers(SPEC, x, M, method=method, seed=11)
    b = F.select_centers(SPEC, x, M, method=method, seed=11)
    c = F.select_centers(SPEC, x, M, method=method, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64 and len(np.unique(a)) == len(a) and np.all(np.diff(a) > 0)
    assert 0 <= a.min() and a.max() < N
    assert len(a) == M


def _residual_trace(K: np.ndarray, S: np.ndarray) -> float:
    """trace(K − K_nS K_SS⁺ K_Sn), densely."""
    Knm = K[:, S]
    return float(np.trace(K) - np.trace(Knm @ np.linalg.pinv(K[np.ix_(S, S)], hermitian=True)
                                        @ Knm.T))  # fmt: skip


def test_rpcholesky_centres_leave_less_residual_than_uniform_on_clustered_data():
    rng = np.random.default_rng(0)
    means = rng.standard_normal((12, D)) * 3.0
    sizes = [300] + [5] * 11  # one big tight cluster and eleven small ones
    parts = [m + 0.05 * rng.standard_normal((s, D)) for m, s in zip(means, sizes, strict=True)]
    x = np.concatenate(parts)
    K = SPEC.kernel(x, dtype="float64")
    m = 20
    uni = np.mean([_residual_trace(K, F.select_centers(SPEC, x, m, "uniform", seed=s))
                   for s in range(3)])  # fmt: skip
    rpc = np.mean([_residual_trace(K, F.select_centers(SPEC, x, m, "rpcholesky", seed=s))
                   for s in range(3)])  # fmt: skip
    assert rpc < 0.5 * uni, (rpc, uni)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0, -1, N + 1, 2.5])
def test_bad_centre_counts_name_the_value_and_the_fix(fc, m):
    x, _, _ = fc
    with pytest.raises(ValueError, match=rf"centers={m}.*\[1, N={N}\]"):
        F.select_centers(SPEC, x, m)


def test_unknown_selection_method_names_the_choices(fc):
    x, _, _ = fc
    with pytest.raises(ValueError, match="method='kmeans'.*'rpcholesky' or 'uniform'"):
        F.select_centers(SPEC, x, 10, method="kmeans")


def test_solve_pcg_refuses_a_mask_with_a_ridge_operator(fc):
    x, y, _ = fc
    T = np.eye(3)
    system = F.NystromSystem(F.BlockProducts(F.KernelBlocks(SPEC, x, x[:3])), T)
    with pytest.raises(ValueError, match="mask=None"):
        solve_pcg(system, y[:3], 1.0, mask=np.ones((3, 2), dtype=bool))
