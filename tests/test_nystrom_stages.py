"""Nyström through the system: stages.fit with method nystrom on a real local Ray, every K(X, C)
route against a dense float64 Nyström oracle (numpy), M = N against the exact dense solve,
cross-validation against the oracle's own CV, predict unchanged, a killed worker, bad options,
the estimator, the route arithmetic, and the warm start of the exact solver."""

import math
import os
import signal

import numpy as np
import pytest
from scipy.linalg import cho_factor, cho_solve

from ntk_scale import FullyConnected, NTKRegressor, stages
from ntk_scale.cli import main
from ntk_scale.model import load_model
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.pool import pool_for
from ntk_scale.sizing import choose_knm

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
RUN = RunOptions(workers=2, progress=False)
GO = GramOptions(dtype="float64", tile=128)
RIDGE = 1e-3


def _data(n=500, m=60, d=6, c=2, seed=0):
    rng = np.random.default_rng(seed)
    x, xs = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    return x, np.sin(x @ rng.normal(size=(d, c))), xs


def _oracle(x, y, idx, ridge=RIDGE, rows=None):
    """Dense float64 Nyström: α = (K_nmᵀK_nm + λK_mm)⁻¹ K_nmᵀ y on rows (default all), λ =
    ridge · mean(diag K) of those rows."""
    rows = np.arange(len(x)) if rows is None else rows
    C = x[idx]
    Knm, Kmm = SPEC.kernel(x[rows], C, dtype="float64"), SPEC.kernel(C, dtype="float64")
    lam = ridge * np.mean([SPEC.kernel(x[i : i + 1], dtype="float64")[0, 0] for i in rows])
    return np.linalg.solve(Knm.T @ Knm + lam * Kmm, Knm.T @ y[rows])


def _fit(tmp_path, x, y, name, xs=None, run=RUN, **solve):
    so = SolveOptions(method="nystrom", tol=1e-10, ridge=RIDGE, **solve)
    inputs = stages.prepare_inputs(x, y, xs)
    return stages.fit(inputs, SPEC, str(tmp_path / f"{name}.zarr"), GO, so, run,
                      model_dir=str(tmp_path / f"model-{name}"))  # fmt: skip


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# -- the route arithmetic (pure) ----------------------------------------------------------------
def test_choose_knm_prices_each_route():
    kw = dict(entry_seconds=1e-6, workers=2, gemm_flops_per_s=1e10, read_bytes_per_s=1e9,
              iterations=30)  # fmt: skip
    few = choose_knm(10**6, 1000, **kw)  # H (8 MB) costs N·M·(M+1)/(1e10 · 2) = 50 s, once
    one_pass = 1e6 * 1000 * 1e-6 / 2
    assert math.isclose(few.seconds["recompute"], 30 * one_pass)
    normal = one_pass + 1e6 * 1000 * 1001 / 2e10 + 30 * 2e6 / 1e10
    assert math.isclose(few.seconds["normal"], normal)
    assert math.isclose(few.seconds["stored"], one_pass + 31 * 4e9 / 1e9)
    assert few.choice == "normal" and "normal is cheapest" in few.reason  # 556 s vs 624 s
    assert choose_knm(10**6, 1000, **kw, memory_bytes=1e6).choice == "stored"  # H: no room
    assert choose_knm(10**6, 1000, **kw, memory_bytes=1e6, disk_bytes=1e9).choice == "recompute"
    # a fast kernel and a huge M: H (8·M² = 3.2 GB x 2) does not fit 4 GB, recompute wins
    big = choose_knm(10**6, 20000, **{**kw, "entry_seconds": 1e-9}, memory_bytes=4e9,
                     disk_bytes=1e9)  # fmt: skip
    assert big.choice == "recompute" and big.seconds["normal"] == math.inf
    with pytest.raises(ValueError, match="positive sizes"):
        choose_knm(0, 10, **kw)


# -- bad options --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"method": "falkon"}, "method='falkon' is not supported; use one of exact, nystrom"),
    ({"centers": 0}, "centers=0 must be a positive integer"),
    ({"knm": "disk"}, "knm='disk' is not supported; use one of auto, stored, recompute"),
    ({"center_selection": "kmeans"}, "use one of rpcholesky, uniform"),
    ({"method": "nystrom", "warm_start": "nystrom"}, "use it with method='exact'"),
])  # fmt: skip
def test_bad_options_name_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        SolveOptions(**kw)


def test_cli_refuses_a_bad_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["solve", "--store", "s.zarr", "--y", "y.npy", "--model-dir", "m", "--method", "x"])
    assert exit_.value.code == 2
    assert "invalid choice: 'x'" in capsys.readouterr().err


# -- through stages.fit on a real local Ray -----------------------------------------------------
@pytest.mark.parametrize("knm", ["recompute", "normal", "stored"])
def test_routes_equal_the_dense_nystrom_oracle(ray_local, tmp_path, capfd, knm):
    x, y, xs = _data()
    run = RunOptions(workers=2, progress=knm == "stored")
    rep = _fit(tmp_path, x, y, knm, xs, run=run, centers=80, knm=knm)
    meta = rep.solve.meta
    idx = np.array(meta["nystrom"]["center_indices"])
    assert meta["method"] == "nystrom" and meta["nystrom"]["knm"] == knm and len(idx) == 80
    alpha = _oracle(x, y, idx)
    assert rep.solve.alpha.shape == (80, 2)
    assert _rel(rep.solve.alpha, alpha) < 1e-6
    # predict, unchanged: K(X*, C)·α from the K(C, C) store the model names
    ref = SPEC.kernel(xs, x[idx], dtype="float64") @ alpha
    assert _rel(rep.predictions, ref) < 1e-6
    model = load_model(str(tmp_path / f"model-{knm}"))
    assert _rel(stages.predict(model, xs, RUN), ref) < 1e-6
    if knm == "stored":
        assert meta["nystrom"]["knm_store_fingerprint"]
        # its K_nmᵀy pass reads the whole stored K(X, C) (minutes at scale): shown, as the
        # normal route's pass is (it showed nothing)
        assert "K_nmᵀy: 500/500 rows (100.0%)" in capfd.readouterr().err


def test_every_row_a_centre_equals_the_exact_solve(ray_local, tmp_path):
    x, y, xs = _data(n=200)
    rep = _fit(tmp_path, x, y, "full", xs, centers=500, knm="normal")  # capped at N, warned
    K = SPEC.kernel(x, dtype="float64")
    lam = RIDGE * np.mean(np.diag(K))
    ref = SPEC.kernel(xs, x, dtype="float64") @ cho_solve(cho_factor(K + lam * np.eye(200)), y)
    assert rep.solve.meta["nystrom"]["centers"] == 200
    assert _rel(rep.predictions, ref) < 1e-5


def test_cv_picks_the_oracles_ridge(ray_local, tmp_path):
    from ntk_scale.solve import make_folds

    x, y, _ = _data(n=300, c=1)
    ridges = (1e-6, 1e-3, 1e-1, 10.0)
    so = SolveOptions(method="nystrom", centers=40, knm="recompute", tol=1e-10, ridge=ridges,
                      cv=3, center_selection="uniform")  # fmt: skip
    rep = stages.fit(stages.prepare_inputs(x, y[:, 0]), SPEC, str(tmp_path / "cv.zarr"), GO, so,
                     RUN, model_dir=str(tmp_path / "model-cv"))  # fmt: skip
    idx = np.array(rep.solve.meta["nystrom"]["center_indices"])
    folds = make_folds(300, cv=3, seed=so.seed)
    mse = np.zeros(len(ridges))
    for tr, val in folds:
        for k, r in enumerate(ridges):
            a = _oracle(x, y, idx, r, rows=tr)
            mse[k] += np.mean((SPEC.kernel(x[val], x[idx], dtype="float64") @ a - y[val]) ** 2)
    table = rep.solve.meta["ridge_path"]["ridges"]
    np.testing.assert_allclose([row["mean_mse"] for row in table], mse / 3, rtol=1e-5)
    assert rep.solve.selection.best == int(np.argmin(mse))
    assert _rel(rep.solve.alpha, _oracle(x, y, idx, ridges[int(np.argmin(mse))])[:, 0]) < 1e-6


def test_auto_ridges_grow_to_the_oracles_choice(ray_local, tmp_path):
    """ridge="auto" on the Nyström method: rounds of the path on one K(C, C) store, each ridge
    scored as the dense Nyström oracle scores it, the grid grown past AUTO_RIDGES' top."""
    from ntk_scale.options import AUTO_RIDGES
    from ntk_scale.solve import make_folds

    x, y, _ = _data(n=300, c=1)
    # (these targets want a large ridge: test_cv_picks_the_oracles_ridge's best is its top, 10)
    so = SolveOptions(method="nystrom", centers=40, knm="recompute", tol=1e-10, ridge="auto",
                      cv=3, center_selection="uniform")  # fmt: skip
    rep = stages.fit(stages.prepare_inputs(x, y[:, 0]), SPEC, str(tmp_path / "auto.zarr"), GO,
                     so, RUN, model_dir=str(tmp_path / "model-auto"))  # fmt: skip
    idx = np.array(rep.solve.meta["nystrom"]["center_indices"])
    sel = rep.solve.selection
    assert sel.rounds >= 2 and set(AUTO_RIDGES) < set(sel.ridges) and sel.edge is None
    mse = np.zeros(len(sel.ridges))
    for tr, val in make_folds(300, cv=3, seed=so.seed):
        for k, r in enumerate(sel.ridges):
            a = _oracle(x, y, idx, r, rows=tr)
            mse[k] += np.mean((SPEC.kernel(x[val], x[idx], dtype="float64") @ a - y[val]) ** 2)
    np.testing.assert_allclose(sel.mean_scores, mse / 3, rtol=1e-5)
    assert sel.best == int(np.argmin(mse)) and sel.ridge > max(AUTO_RIDGES)
    assert rep.solve.meta["ridge_path"]["auto"]["rounds"] == sel.rounds
    assert (tmp_path / "model-auto" / "checkpoint" / "nystrom_cv_state_round1.npz").exists()


def test_a_conv_kernel_on_images(ray_local, tmp_path):
    from ntk_scale.kernels import stax

    net = stax.serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu(), stax.Flatten(),
                      stax.Dense(1))  # fmt: skip
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5, 5, 1))
    y = x.reshape(60, -1)[:, :3].sum(axis=1)
    so = SolveOptions(method="nystrom", centers=25, knm="recompute", tol=1e-10, ridge=RIDGE)
    go = GramOptions(dtype="float64", tile=32)
    rep = stages.fit(stages.prepare_inputs(x, y), net, str(tmp_path / "conv.zarr"), go, so, RUN)
    spec = rep.solve.meta["kernel"]
    assert spec
    idx = np.array(rep.solve.meta["nystrom"]["center_indices"])
    bound = stages.bind(net, (5, 5, 1))
    flat = x.reshape(60, -1)
    Knm, Kmm = bound.kernel(flat, flat[idx], dtype="float64"), bound.kernel(flat[idx],
                                                                             dtype="float64")
    lam = RIDGE * np.mean(np.diag(bound.kernel(flat, dtype="float64")))
    alpha = np.linalg.solve(Knm.T @ Knm + lam * Kmm, Knm.T @ y)
    assert _rel(rep.solve.alpha, alpha) < 1e-6


def _kill(pid):
    assert pid > 0, pid  # never os.kill(-1, ...)
    os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_mid_solve_gives_the_oracles_answer(ray_local, tmp_path):
    from ntk_scale import nystrom

    x, y, _ = _data(n=400)
    pool, killed = pool_for(RUN), []

    def kill_at_three(state):
        if state.iteration == 3 and not killed:
            killed.append(pool.pids()[0])
            _kill(killed[0])

    so = SolveOptions(method="nystrom", centers=60, knm="recompute", tol=1e-10, ridge=RIDGE)
    res, _ = nystrom.fit(x, y, SPEC, str(tmp_path / "k.zarr"), GO, so, RUN,
                         callback=kill_at_three)  # fmt: skip
    assert killed and killed[0] not in pool.pids()
    idx = np.array(res.meta["nystrom"]["center_indices"])
    assert res.report.result.iterations > 3
    assert _rel(res.alpha, _oracle(x, y, idx)) < 1e-6


def test_the_estimator_fits_nystrom(ray_local, tmp_path):
    x, y, xs = _data(n=300, c=1)
    est = NTKRegressor(kernel=SPEC, method="nystrom", centers=50, knm="normal", dtype="float64",
                       tile=128, tol=1e-10, ridge=RIDGE, workdir=str(tmp_path), workers=2)
    est.fit(x, y[:, 0])
    idx = np.array(est.solve_result_.meta["nystrom"]["center_indices"])
    assert est.alpha_.shape == (50,)
    ref = SPEC.kernel(xs, x[idx], dtype="float64") @ _oracle(x, y, idx)[:, 0]
    assert _rel(est.predict(xs), ref) < 1e-6


def test_a_nystrom_warm_start_saves_exact_iterations(ray_local, tmp_path):
    """x0 = (y - K_nm α)/λ: the exact solve starts near its answer when K_nm α is near K A
    (here every row a centre). The error of x0 is (K A - K_nm α)/λ: at M = N/2 and ridge
    1e-3 it is larger than A itself and the warm start cost 21 iterations (127 vs 106)."""
    x, y, _ = _data(n=400)
    inputs = stages.prepare_inputs(x, y)
    base = dict(tol=1e-10, ridge=RIDGE, preconditioner="jacobi", operator="dense")
    cold = stages.fit(inputs, SPEC, str(tmp_path / "e.zarr"), GO, SolveOptions(**base), RUN)
    warm = stages.fit(inputs, SPEC, str(tmp_path / "e.zarr"), GO,
                      SolveOptions(**base, warm_start="nystrom", centers=400), RUN)  # fmt: skip
    n_cold = cold.solve.meta["solver"]["iterations"]
    n_warm = warm.solve.meta["solver"]["iterations"]
    print(f"exact PCG iterations: cold {n_cold}, Nyström warm start {n_warm} "
          f"(saved {n_cold - n_warm}; the Nyström fit took "
          f"{warm.solve.meta['warm_start']['nystrom_iterations']})")
    assert n_cold - n_warm > 0
    K = SPEC.kernel(x, dtype="float64")
    ref = cho_solve(cho_factor(K + RIDGE * np.mean(np.diag(K)) * np.eye(400)), y)
    assert _rel(warm.solve.alpha, ref) < 1e-6 and _rel(cold.solve.alpha, ref) < 1e-6


@pytest.mark.parametrize("check_name", [
    "check_regressors_train", "check_regressor_multioutput", "check_fit2d_predict1d",
    "check_estimators_fit_returns_self", "check_n_features_in", "check_fit_check_is_fitted",
])  # fmt: skip
def test_scikit_learn_checks_of_a_nystrom_regressor(ray_local, tmp_path, check_name):
    """A few of scikit-learn's own estimator checks on NTKRegressor(method="nystrom")."""
    from sklearn.utils import estimator_checks

    est = NTKRegressor(method="nystrom", centers=15, knm="normal", tile=64,
                       workdir=str(tmp_path))  # fmt: skip
    getattr(estimator_checks, check_name)("NTKRegressor", est)
