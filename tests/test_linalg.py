"""Operators, preconditioners, block PCG and checkpoints (ntk_scale.linalg).

The oracle is scipy.linalg.cho_solve on a real FC-3 ReLU NTK Gram in float64. The inputs are
3-dimensional Gaussians: their NTK spectrum decays (smallest eigenvalue ~1e-2 of a mean
diagonal ~7), so a small ridge makes a genuinely ill-conditioned system.
"""

from __future__ import annotations

import os
import warnings

import fsspec
import numpy as np
import pytest
import scipy.linalg
from operator_contract import OperatorContract

from ntk_scale import FullyConnected
from ntk_scale.linalg import (
    ConvergenceWarning,
    DenseOperator,
    KernelOperator,
    PCGState,
    SolverError,
    checkpoint_every,
    identity,
    jacobi,
    load_checkpoint,
    nystrom,
    resolve_ridge,
    save_checkpoint,
    solve_pcg,
)
from ntk_scale.linalg.preconditioners import per_group

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
PRECONDITIONERS = ("identity", "jacobi", "nystrom-uniform", "rpcholesky")
RANK = 200


def features(n: int, d: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def make_preconditioner(name: str, op, lam: float):
    if name == "identity":
        return identity()
    if name == "jacobi":
        return jacobi(op, lam)
    pivots = "uniform" if name == "nystrom-uniform" else "rpcholesky"
    return nystrom(op, RANK, lam, pivots=pivots, seed=0)


class CountingOperator(DenseOperator):
    """A DenseOperator that records the width of every matmat and every columns request."""

    def __init__(self, K):
        super().__init__(K)
        self.widths: list[int] = []
        self.columns_read = 0

    def matmat(self, P):
        self.widths.append(P.shape[1])
        return super().matmat(P)

    def columns(self, idx):
        self.columns_read += len(idx)
        return super().columns(idx)


# -- the operator contract -------------------------------------------------------------------


class TestDenseOperator(OperatorContract):
    def make_pair(self):
        K = SPEC.kernel(features(120), dtype="float64")
        return DenseOperator(K), K


class TestDenseOperatorFloat32(OperatorContract):
    rtol = 1e-12  # float32 entries, products accumulated in float64: exact vs the upcast twin

    def make_pair(self):
        K = SPEC.kernel(features(120), dtype="float32")
        return DenseOperator(K, block=50), K.astype(np.float64)


class TestKernelOperator(OperatorContract):
    def make_pair(self):
        X = features(150)
        return KernelOperator(SPEC, X, block=64), SPEC.kernel(X, dtype="float64")


class TestKernelOperatorFloat32(OperatorContract):
    rtol = 1e-5

    def make_pair(self):
        X = features(150)
        op = KernelOperator(SPEC, X, dtype="float32", block=64)
        return op, SPEC.kernel(X, dtype="float32").astype(np.float64)


# -- PCG against a dense Cholesky solve ------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    """N -> (K, Y): a real NTK Gram K (N, N) float64 and targets Y, (600, 2) or (1500, 1)
    (one column at N=1500 keeps the run short: thin products are slow on a loaded 2-core box)."""
    out = {}
    for n, c in ((600, 2), (1500, 1)):
        K = SPEC.kernel(features(n, seed=n), dtype="float64")
        out[n] = (K, np.random.default_rng(n).standard_normal((n, c)))
    return out


@pytest.fixture(scope="module")
def solved(problems):
    """(N, relative ridge, preconditioner name) -> (PCGResult, λ, dense solution), memoised."""
    cache = {}

    def get(n, rel, name):
        if (n, rel, name) not in cache:
            K, Y = problems[n]
            op = DenseOperator(K)
            lam = resolve_ridge(rel, op)
            ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(n)), Y)
            M = make_preconditioner(name, op, lam)
            cache[n, rel, name] = (solve_pcg(op, Y, lam, M, tol=1e-10), lam, ref)
        return cache[n, rel, name]

    return get


#: make test-fast solves at N=600; make test also at N=1500 (~1,200 unpreconditioned iterations).
N_SIZES = [600, pytest.param(1500, marks=pytest.mark.slow)]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", PRECONDITIONERS)
@pytest.mark.parametrize("n", N_SIZES)
def test_pcg_matches_cholesky_at_moderate_ridge(solved, n, name):
    res, _, ref = solved(n, 1e-2, name)
    assert res.converged.all()
    assert rel_err(res.x, ref) <= 1e-8


@pytest.mark.parametrize("name", PRECONDITIONERS)
@pytest.mark.parametrize("n", N_SIZES)
def test_pcg_fitted_values_match_cholesky_at_tiny_ridge(problems, solved, n, name):
    res, lam, ref = solved(n, 1e-6, name)
    K, Y = problems[n]
    assert res.converged.all()
    assert res.residuals.shape == (res.iterations + 1, Y.shape[1])
    assert np.all(res.residuals[-1] <= 1e-10)
    true_residual = np.linalg.norm(Y - K @ res.x - lam * res.x, axis=0) / np.linalg.norm(Y, axis=0)
    assert np.all(true_residual <= 1e-8)
    assert rel_err(K @ res.x, K @ ref) <= 1e-6


@pytest.mark.slow  # solves N=1500 with every preconditioner
def test_rpcholesky_cuts_iterations_at_tiny_ridge(solved):
    its = {name: solved(1500, 1e-6, name)[0].iterations for name in PRECONDITIONERS}
    # Observed (N=1500, one column, rank 200): identity 1182, jacobi 790, uniform 312,
    # rpcholesky 278 (seeds 1-4: 275-291), i.e. a factor >= 4.0; 3 leaves a safe margin.
    assert its["identity"] >= 3 * its["rpcholesky"], its
    assert its["jacobi"] > its["rpcholesky"], its


def test_pcg_float32_storage_solves_its_own_matrix(problems):
    K32 = problems[600][0].astype(np.float32)
    Y = problems[600][1]
    op = DenseOperator(K32)
    lam = resolve_ridge(1e-2, op)
    res = solve_pcg(op, Y, lam, jacobi(op, lam), tol=1e-10)
    K64 = K32.astype(np.float64)
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K64 + lam * np.eye(600)), Y)
    assert res.x.dtype == np.float64
    assert rel_err(res.x, ref) <= 1e-8


# -- failure modes -----------------------------------------------------------------------------


def test_nonconvergence_warns_and_names_the_fix(problems):
    K, Y = problems[600]
    op = DenseOperator(K)
    with pytest.warns(ConvergenceWarning, match="raise max_iter.*preconditioner.*larger ridge"):
        res = solve_pcg(op, Y, resolve_ridge(1e-6, op), tol=1e-10, max_iter=3)
    assert res.iterations == 3
    assert not res.converged.any()
    assert res.residuals.shape == (4, 2)


def test_indefinite_matrix_raises():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    eigenvalues = np.linspace(1.0, 10.0, 50)
    eigenvalues[0] = -1.0
    K = (Q * eigenvalues) @ Q.T
    Y = np.column_stack([Q[:, 0], rng.standard_normal(50)])  # column 0: pᵀKp = -1 at once
    with pytest.raises(SolverError, match="larger ridge"):
        solve_pcg(DenseOperator(K), Y, lam=0.0)


def test_nan_in_matrix_raises(problems):
    K = problems[600][0].copy()
    K[3, 5] = K[5, 3] = np.nan
    with pytest.raises(SolverError, match="NaN"):
        solve_pcg(DenseOperator(K), problems[600][1], lam=1e-3)


def test_nan_targets_and_bad_shapes_are_refused(problems):
    K, Y = problems[600]
    op = DenseOperator(K)
    bad = Y.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="column 1"):
        solve_pcg(op, bad, lam=1e-3)
    with pytest.raises(ValueError, match="reshape"):
        solve_pcg(op, Y[:, 0], lam=1e-3)
    with pytest.raises(ValueError, match="lam"):
        solve_pcg(op, Y, lam=-1.0)


def test_resolve_ridge(problems):
    op = DenseOperator(problems[600][0])
    mean_diag = np.mean(np.diag(problems[600][0]))
    assert resolve_ridge(1e-3, op) == pytest.approx(1e-3 * mean_diag, rel=1e-15)
    assert resolve_ridge(0.5, op, absolute=True) == 0.5
    with pytest.raises(ValueError, match="ridge"):
        resolve_ridge(-1.0, op)


# -- frozen columns, resume, checkpoints ----------------------------------------------------


def test_converged_columns_are_frozen_and_not_multiplied(problems):
    K, Y = problems[600]
    op = CountingOperator(K)
    lam = resolve_ridge(1e-2, op)
    x0 = np.zeros_like(Y)
    x0[:, 0] = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(600)), Y[:, 0])
    res = solve_pcg(op, Y, lam, jacobi(op, lam), tol=1e-8, x0=x0)
    assert res.converged.all()
    assert np.array_equal(res.x[:, 0], x0[:, 0])  # bit-identical
    assert np.all(res.residuals[:, 0] == res.residuals[0, 0])
    assert op.widths[0] == 2  # the initial residual, then only the active column
    assert op.widths[1:] == [1] * res.iterations


def test_zero_target_column_gives_zero(problems):
    K, Y = problems[600]
    Y = np.column_stack([Y[:, 0], np.zeros(600)])
    res = solve_pcg(DenseOperator(K), Y, lam=1e-2, tol=1e-8)
    assert res.converged.all()
    assert not res.x[:, 1].any()


def test_resume_from_midway_state_is_bitwise_identical(problems, tmp_path):
    K, Y = problems[600]
    op = DenseOperator(K)
    lam = resolve_ridge(1e-6, op)
    M = nystrom(op, 50, lam, pivots="rpcholesky", seed=3)
    states: list[PCGState] = []
    full = solve_pcg(op, Y, lam, M, tol=1e-10, callback=states.append)
    assert [s.iteration for s in states] == list(range(1, full.iterations + 1))
    midway = states[full.iterations // 2]
    save_checkpoint(str(tmp_path / "state.npz"), midway, {"lam": lam})
    loaded = load_checkpoint(str(tmp_path / "state.npz"), {"lam": lam})
    for start in (midway, loaded):
        resumed = solve_pcg(op, Y, lam, M, tol=1e-10, state=start)
        assert resumed.iterations == full.iterations
        assert np.array_equal(resumed.x, full.x)
        assert np.array_equal(resumed.residuals, full.residuals)
        assert np.array_equal(resumed.converged, full.converged)


def test_resume_refuses_state_of_another_shape(problems):
    K, Y = problems[600]
    op = DenseOperator(K)
    states: list[PCGState] = []
    solve_pcg(op, Y, 1e-2, tol=1e-3, callback=states.append)
    with pytest.raises(ValueError, match="another problem"):
        solve_pcg(op, Y[:, :1], 1e-2, state=states[0])


def make_state(n: int = 40, c: int = 3, it: int = 5) -> PCGState:
    rng = np.random.default_rng(it)
    vec = [rng.standard_normal((n, c)) for _ in range(4)]
    return PCGState(
        *vec,
        rz=rng.random(c),
        iteration=it,
        active=np.array([True, False, True]),
        residuals=rng.random((it + 1, c)),
    )


def assert_same_state(a: PCGState, b: PCGState) -> None:
    for name in ("x", "r", "z", "p", "rz", "active", "residuals"):
        got, want = getattr(a, name), getattr(b, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert a.iteration == b.iteration and isinstance(a.iteration, int)


def test_checkpoint_round_trip_and_refusal(tmp_path):
    path = str(tmp_path / "out" / "pcg.npz")
    meta = {"store": "3f9a", "targets": "81c2", "lam": 1.25e-3, "shape": (40, 3)}
    assert load_checkpoint(path, meta) is None
    state = make_state()
    save_checkpoint(path, state, meta)
    save_checkpoint(path, state, meta)  # overwriting is fine
    assert_same_state(load_checkpoint(path, meta), state)
    assert os.listdir(tmp_path / "out") == ["pcg.npz"]  # no temporary files left behind
    with np.load(path, allow_pickle=False) as z:
        assert {"x", "r", "z", "p", "rz", "iteration", "active", "residuals"} <= set(z.files)
    for key, other in [("store", "ffff"), ("targets", "0000"), ("lam", 1.3e-3)]:
        with pytest.raises(ValueError, match=f"{key}=.*new output dir or pass overwrite"):
            load_checkpoint(path, {**meta, key: other})
    with pytest.raises(ValueError, match="preconditioner"):
        load_checkpoint(path, {**meta, "preconditioner": "rpcholesky"})


def test_checkpoint_through_fsspec_url():
    url = "memory://ntk-scale-test/run/pcg.npz"
    state = make_state()
    save_checkpoint(url, state, {"lam": 0.1})
    assert_same_state(load_checkpoint(url, {"lam": 0.1}), state)
    assert load_checkpoint("memory://ntk-scale-test/absent.npz", {}) is None
    fsspec.filesystem("memory").rm("/ntk-scale-test", recursive=True)


def test_checkpoint_every_callback(problems, tmp_path):
    K, Y = problems[600]
    path = str(tmp_path / "pcg.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        solve_pcg(
            DenseOperator(K), Y, 1e-2, tol=1e-12, max_iter=7, callback=checkpoint_every(path, {}, 3)
        )
    assert load_checkpoint(path, {}).iteration == 6


# -- preconditioners ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_gram():
    return SPEC.kernel(features(300, seed=7), dtype="float64")


@pytest.mark.parametrize("pivots,block", [("uniform", 1), ("rpcholesky", 1), ("rpcholesky", 16)])
def test_nystrom_sketch_properties(small_gram, pivots, block):
    K = small_gram
    op = CountingOperator(K)
    M = nystrom(op, 40, lam=1e-3, pivots=pivots, seed=0, block=block)
    assert M.rank == 40 and M.name == f"nystrom-{pivots}"
    assert len(np.unique(M.pivots)) == 40
    assert op.columns_read == M.columns_read >= 40
    if block == 1:
        assert M.columns_read == 40
    approx = (M.U * M.eigenvalues) @ M.U.T  # F Fᵀ
    # Interpolates K on the pivot columns, and never exceeds K (K − F Fᵀ is PSD).
    np.testing.assert_allclose(approx[:, M.pivots], K[:, M.pivots], atol=1e-8 * K.max())
    assert np.linalg.eigvalsh(K - approx).min() >= -1e-9 * np.trace(K)
    assert np.all(np.diff(M.eigenvalues) <= 0)
    assert np.all(M.eigenvalues <= np.linalg.eigvalsh(K)[::-1][:40] * (1 + 1e-9))


def test_nystrom_apply_inverts_the_preconditioner(small_gram):
    lam = 1e-2
    M = nystrom(DenseOperator(small_gram), 30, lam, seed=1)
    U, s2 = M.U, M.eigenvalues
    # Frangella et al.: F Fᵀ + λI on the sketched directions, σ_r² + λ on their complement.
    P = (U * (s2 + lam)) @ U.T + (s2[-1] + lam) * (np.eye(300) - U @ U.T)
    R = np.random.default_rng(0).standard_normal((300, 3))
    np.testing.assert_allclose(M.apply(R), np.linalg.solve(P, R), rtol=1e-9, atol=1e-9)
    assert M.tail == pytest.approx(s2[-1] + lam)
    lams = np.array([1e-4, 1e-2, 1.0])  # one ridge per column: a regularization path
    for j, lj in enumerate(lams):
        Pj = (U * (s2 + lj)) @ U.T + (s2[-1] + lj) * (np.eye(300) - U @ U.T)
        np.testing.assert_allclose(M.apply(R, lam=lams)[:, j], np.linalg.solve(Pj, R[:, j]),
                                   rtol=1e-9, atol=1e-9)  # fmt: skip


def test_nystrom_restricted_to_rows_is_the_sketch_of_the_submatrix(small_gram):
    K = small_gram
    M = nystrom(DenseOperator(K), 40, 1e-3, seed=2)
    S = np.sort(np.random.default_rng(3).choice(300, size=220, replace=False))
    sub = M.restrict(S)
    P = M.pivots  # some lie outside S
    assert not np.isin(P, S).all()
    want = K[np.ix_(S, P)] @ np.linalg.solve(K[np.ix_(P, P)], K[np.ix_(P, S)])
    # The sketch of K[S, S]: the Nyström approximation from the same pivots, less the
    # directions below the full sketch's last eigenvalue (they take the tail's scaling).
    w, V = np.linalg.eigh(want)
    top = w >= M.eigenvalues[-1]
    assert 20 < top.sum() < 40  # some directions were dropped
    np.testing.assert_allclose(sub.eigenvalues, w[top][::-1], rtol=1e-6)
    got = (sub.U * sub.eigenvalues) @ sub.U.T
    np.testing.assert_allclose(got, (V[:, top] * w[top]) @ V[:, top].T, atol=1e-7 * K.max())
    np.testing.assert_allclose(sub.U.T @ sub.U, np.eye(sub.rank), atol=1e-10)
    assert sub.U.shape == (220, top.sum()) and np.all(np.diff(sub.eigenvalues) <= 0)
    # Groups of columns, each on its own rows, each with its own ridge; zero elsewhere.
    R = np.random.default_rng(4).standard_normal((300, 4))
    T = np.setdiff1d(np.arange(300), S)
    pg = per_group(M, [S, T], np.array([0, 1, 0, 1]))
    lams = np.array([1e-3, 1e-2, 1e-1, 1.0])
    out = pg.apply_columns(R, lams, np.arange(4))
    for j, (rows, part) in enumerate([(S, sub), (T, M.restrict(T))] * 2):
        np.testing.assert_allclose(out[rows, j], part.apply(R[rows, j : j + 1],
                                                            lam=lams[j : j + 1])[:, 0])  # fmt: skip
        assert not out[np.setdiff1d(np.arange(300), rows), j].any()
    assert per_group(jacobi(DenseOperator(K), 1e-3), [S, T], np.array([0, 1])).name == "jacobi"


def test_nystrom_complement_scaling_beats_plain_woodbury_when_ridge_is_tiny():
    """With λ far below K's smallest eigenvalue, P = F Fᵀ + λI leaves the complement's
    eigenvalues near λ_{r+1}/λ; the σ_r² + λ scaling keeps them near 1: fewer iterations."""
    X = np.random.default_rng(3).standard_normal((600, 3))  # low dimension: ill-conditioned K
    K = FullyConnected(depth=2, b_std=0.1).kernel(X, dtype="float64")
    lam = 1e-8 * np.mean(np.diag(K))
    op, Y = DenseOperator(K), X[:, :2].copy()
    M = nystrom(op, 60, lam, seed=0)

    class PlainWoodbury:  # (F Fᵀ + λI)⁻¹, the same sketch
        name = "plain"

        def apply(self, R):
            UtR = M.U.T @ R
            return M.U @ (UtR / (M.eigenvalues + lam)[:, None]) + (R - M.U @ UtR) / lam

    plain = PlainWoodbury()
    ours = solve_pcg(op, Y, lam, M, tol=1e-8, max_iter=3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        woodbury = solve_pcg(op, Y, lam, plain, tol=1e-8, max_iter=3000)
    assert ours.converged.all()
    assert ours.iterations < 0.8 * woodbury.iterations, (ours.iterations, woodbury.iterations)


def test_jacobi_and_identity_apply(small_gram):
    R = np.random.default_rng(0).standard_normal((300, 2))
    np.testing.assert_allclose(
        jacobi(DenseOperator(small_gram), 0.5).apply(R), R / (np.diag(small_gram) + 0.5)[:, None]
    )
    out = identity().apply(R)
    assert np.array_equal(out, R) and out is not R


def test_rpcholesky_stops_at_the_numerical_rank():
    B = np.random.default_rng(0).standard_normal((100, 5))
    M = nystrom(DenseOperator(B @ B.T), 20, lam=1e-3, pivots="rpcholesky", seed=0)
    assert M.rank == 5


def test_rpcholesky_on_kernel_operator_matches_dense():
    X = features(200, seed=11)
    dense = nystrom(DenseOperator(SPEC.kernel(X, dtype="float64")), 30, 1e-3, block=8)
    matrix_free = nystrom(KernelOperator(SPEC, X, block=64), 30, 1e-3, block=8)
    assert np.array_equal(dense.pivots, matrix_free.pivots)
    np.testing.assert_allclose(matrix_free.eigenvalues, dense.eigenvalues, rtol=1e-10)


def test_nystrom_rejects_bad_arguments(small_gram):
    op = DenseOperator(small_gram)
    with pytest.raises(ValueError, match="pivots"):
        nystrom(op, 10, 1e-3, pivots="greedy")
    with pytest.raises(ValueError, match="rank"):
        nystrom(op, 0, 1e-3)
