"""Kernel regression end to end against an exact dense solve; the estimator's sklearn contract."""

import numpy as np
import pytest
from scipy.linalg import cho_factor, cho_solve
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from ntk_scale import FullyConnected, NTKClassifier, NTKRegressor
from ntk_scale.store import GramStore

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)


def _dense_predict(x, y, xs, ridge):
    k = SPEC.kernel(x, dtype="float64")
    lam = ridge * np.mean(np.diag(k))
    return SPEC.kernel(xs, x, dtype="float64") @ cho_solve(cho_factor(k + lam * np.eye(len(k))), y)


def _regression_data(n, m, d=8, c=2, seed=0):
    rng = np.random.default_rng(seed)
    x, xs = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    w = rng.normal(size=(d, c))
    return x, np.sin(x @ w), xs


def test_predictions_equal_dense_solve_float64(ray_local, tmp_path):
    x, y, xs = _regression_data(900, 150)
    model = NTKRegressor(
        kernel=SPEC,
        ridge=1e-3,
        dtype="float64",
        tile=256,
        tol=1e-12,
        rank=300,
        workdir=str(tmp_path),
        workers=2,
    ).fit(x, y)
    assert model.solve_report_.result.converged.all()
    pred = model.predict(xs)
    ref = _dense_predict(x, y, xs, 1e-3)
    assert pred.shape == ref.shape == (150, 2)
    assert np.max(np.abs(pred - ref)) / np.max(np.abs(ref)) <= 1e-5


def test_vector_targets_give_vector_predictions(ray_local, tmp_path):
    x, y, xs = _regression_data(120, 10, c=1)
    model = NTKRegressor(kernel=SPEC, dtype="float64", tile=64, workdir=str(tmp_path)).fit(
        x, y[:, 0]
    )
    assert model.predict(xs).shape == (10,)
    assert model.score(x, y[:, 0]) > 0.99  # ridge 1e-4: nearly interpolates the training set


def test_digits_accuracy_equals_dense_solve(ray_local, tmp_path):
    from ntk_scale.demo import load_digits_split

    x, y, xs, ys = load_digits_split()
    clf = NTKClassifier(kernel=SPEC, tile=512, rank=300, tol=1e-8, workdir=str(tmp_path)).fit(x, y)
    ours = clf.score(xs, ys)
    dense = np.argmax(_dense_predict(x, np.eye(10)[y], xs, 1e-4), axis=1)
    assert ours == np.mean(dense == ys)
    assert ours > 0.97


def test_clone_and_grid_search_reuse_the_gram(ray_local, tmp_path):
    x, y, _ = _regression_data(160, 1, c=1)
    y = y[:, 0]
    # a fixed dtype: with "auto" a ridge far above float32's bound takes float32, a small one
    # float64, so a grid across that edge keeps one store per (fold, dtype)
    est = NTKRegressor(kernel=SPEC, ridge=1e-2, dtype="float64", tile=64, workdir=str(tmp_path))
    twin = clone(est)
    assert twin.get_params() == est.get_params()
    search = GridSearchCV(est, {"ridge": [1e-4, 1e-2, 1.0]}, cv=2).fit(x, y)
    assert search.best_params_["ridge"] in (1e-4, 1e-2, 1.0)
    stores = list(tmp_path.glob("gram-*.zarr"))
    assert len(stores) == 3  # one per CV fold and one for the refit on all data, not per ridge
    again = clone(est).set_params(ridge=1.0).fit(x, y)
    assert again.gram_report_.reused == again.gram_report_.tiles_total
    assert again.gram_report_.computed == 0


def test_estimator_bad_input(ray_local, tmp_path):
    x, y, _ = _regression_data(50, 1, c=1)
    est = NTKRegressor(kernel=SPEC, tile=32, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="49"):
        est.fit(x, y[:49])
    bad = y.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.fit(x, bad)
    est.fit(x, y)
    with pytest.raises(
        ValueError, match="X has 5 features, but NTKRegressor is expecting 8 features"
    ):
        est.predict(np.ones((2, 5)))
    assert len(list(tmp_path.glob("gram-*.zarr"))) == 1
    assert GramStore.open(str(next(tmp_path.glob("gram-*.zarr")))).verify().ok
