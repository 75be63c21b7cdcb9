"""Image inputs (n, H, W, C) and stax kernels through the whole system: the store, tiles on
Ray actors, the solver's operators, predict, the estimators and GridSearchCV, each against a
dense float64 solve of the same kernel (scipy cho_solve)."""

import json

import numpy as np
import pytest
from scipy.linalg import cho_factor, cho_solve
from sklearn.model_selection import GridSearchCV

from ntk_scale import FullyConnected, NTKClassifier, NTKRegressor, stages, stax
from ntk_scale.kernels import Network, bind, spec_from_json
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.store import GramStore

#: The small conv kernel of the digits case (conv, relu, pooling, GlobalAvgPool readout).
CONV = stax.serial(
    stax.Conv(32, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
    stax.AvgPool((2, 2), strides=(2, 2)),
    stax.Conv(32, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
    stax.GlobalAvgPool(), stax.Dense(10, W_std=1.4, b_std=0.1),
)  # fmt: skip
FC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)


def _digits(n_train, n_test, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))
    x = (d.images / 16.0)[:, :, :, None]  # (1797, 8, 8, 1) NHWC
    tr, te = idx[:n_train], idx[n_train : n_train + n_test]
    return x[tr], d.target[tr], x[te], d.target[te]


def _dense_decision(spec, x, y_onehot, xs, ridge):
    k = spec.kernel(x, dtype="float64")
    lam = ridge * np.mean(np.diag(k))
    alpha = cho_solve(cho_factor(k + lam * np.eye(len(k))), y_onehot)
    return spec.kernel(xs, x, dtype="float64") @ alpha


def test_conv_digits_equal_dense_solve(ray_local, tmp_path, record_property):
    x, y, xs, ys = _digits(400, 200)
    assert x.shape[1:] == (8, 8, 1)
    clf = NTKClassifier(kernel=CONV, dtype="float64", tile=256, tol=1e-10, rank=300,
                        workdir=str(tmp_path), workers=2).fit(x, y)  # fmt: skip
    assert clf.solve_report_.result.converged.all()
    ours = clf.decision_function(xs)
    ref = _dense_decision(CONV, x, np.eye(10)[y], xs, 1e-4)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-5
    store = GramStore.open(clf.store_)
    assert store.meta.kernel["sample_shape"] == [8, 8, 1]  # X kept with its shape
    assert isinstance(store.meta.spec, Network) and store.meta.spec.layer == CONV
    conv_acc = clf.score(xs, ys)
    fc = NTKClassifier(kernel=FC, tile=256, workdir=str(tmp_path), workers=2).fit(x, y)
    fc_acc = fc.score(xs, ys)  # the same images, flattened, through the FC kernel
    record_property("digits_accuracy", {"conv": conv_acc, "fully_connected": fc_acc})
    print(f"\ndigits (400 train / 200 test): conv kernel {conv_acc:.3f}, FC kernel {fc_acc:.3f}")
    assert conv_acc >= 0.95 and fc_acc >= 0.9


@pytest.mark.parametrize("operator", ["distributed", "matrixfree"])
def test_conv_operators_equal_dense_solve(ray_local, tmp_path, operator):
    x, y, xs, _ = _digits(100, 40, seed=1)
    targets = np.eye(10)[y]
    inputs = stages.prepare_inputs(x, targets, xs)
    report = stages.fit(
        inputs, CONV, str(tmp_path / "g.zarr"), GramOptions(dtype="float64", tile=64),
        SolveOptions(ridge=1e-3, tol=1e-11, operator=operator, rank=100), RunOptions(workers=2),
    )  # fmt: skip
    ref = _dense_decision(CONV, x, targets, xs, 1e-3)
    assert np.max(np.abs(report.predictions - ref)) / np.max(np.abs(ref)) <= 1e-5
    if operator == "matrixfree":
        assert report.gram.computed == 0  # nothing stored: every product recomputes its tiles


def test_grid_search_over_ridge_with_a_conv_kernel(ray_local, tmp_path):
    x, y, _, _ = _digits(120, 1, seed=2)
    est = NTKRegressor(kernel=CONV, tile=64, workdir=str(tmp_path), workers=2)
    search = GridSearchCV(est, {"ridge": [1e-3, 1e-1]}, cv=2).fit(x, np.eye(10)[y])
    assert search.best_params_["ridge"] in (1e-3, 1e-1)
    assert len(list(tmp_path.glob("gram-*.zarr"))) == 3  # per fold and the refit, not per ridge


def test_image_shape_errors_name_the_shape(ray_local, tmp_path):
    x, y, _, _ = _digits(40, 1)
    reg = NTKRegressor(kernel=CONV, tile=64, workdir=str(tmp_path)).fit(x, np.eye(10)[y])
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
        reg.predict(np.zeros((3, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"\(n, H, W, C\)"):
        NTKRegressor(kernel=CONV, workdir=str(tmp_path)).fit(x.reshape(40, -1), y)
    with pytest.raises(ValueError, match="bound to its input shape"):
        GramStore.create(str(tmp_path / "s.zarr"), CONV, x.reshape(40, -1))


def test_bound_spec_round_trips_through_json():
    net = bind(CONV, (8, 8, 1))
    again = spec_from_json(net.to_json())
    assert again == net and again.fingerprint() == net.fingerprint()
    assert json.loads(net.to_json())["sample_shape"] == [8, 8, 1]
    assert bind(CONV, (8, 8, 2)).fingerprint() != net.fingerprint()
