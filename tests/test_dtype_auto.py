"""dtype="auto" and the float32 warnings: the defaults never return a silently wrong answer.

Oracles: the per-entry bound of ntk_scale.kernels.precision (tested against float64 in
tests/test_float32.py), and dense float64 Cholesky solves of the same kernel ridge regression.
"""

import json

import numpy as np
import pytest
from scipy.linalg import cho_factor, cho_solve

from ntk_scale import NTKRegressor, stages
from ntk_scale.cli import main
from ntk_scale.errors import PrecisionWarning, SolverError
from ntk_scale.kernels import FullyConnected, precision
from ntk_scale.options import GramOptions, RunOptions, SolveOptions

SPEC = FullyConnected()  # the estimators' default kernel
QUIET = RunOptions(progress=False)


def far(n=60, seed=0):
    """scikit-learn's estimator checks draw rows like these: two features around 100."""
    rng = np.random.default_rng(seed)
    x = 100 + rng.standard_normal((n, 2))
    return x, x[:, 0] - x[:, 1]


def test_auto_takes_float32_only_far_below_lambda():
    diag = SPEC.diag(np.random.default_rng(0).standard_normal((50, 5)), dtype="float64")
    bound = precision.entry_bound(SPEC, "ntk", float(diag.max()))
    assert 0 < bound < 1e-4 * diag.max()  # not vacuous
    edge = bound * precision.AUTO_MARGIN
    assert precision.choose_dtype(SPEC, "ntk", diag, edge).dtype == "float32"
    assert precision.choose_dtype(SPEC, "ntk", diag, 0.99 * edge).dtype == "float64"
    assert "not 100x below" in precision.choose_dtype(SPEC, "ntk", diag, edge / 2).reason


def test_resolve_dtype_at_the_ridge_it_will_be_solved_at():
    x = np.random.default_rng(1).standard_normal((40, 4))
    o = GramOptions(tile=16)
    assert o.dtype == "auto"
    # the default ridge (1e-4 relative) is below 100x float32's bound for the default kernel
    assert stages.resolve_dtype(x, SPEC, o)[0].dtype == "float64"
    big, why = stages.resolve_dtype(x, SPEC, o, ridge=0.5)
    assert big.dtype == "float32" and why.startswith("auto: float32")
    absolute = stages.resolve_dtype(x, SPEC, o, ridge=1e-12, ridge_absolute=True)[0]
    assert absolute.dtype == "float64"
    asked = stages.resolve_dtype(x, SPEC, GramOptions(dtype="float32"), ridge=1e-12)
    assert asked == (GramOptions(dtype="float32"), "asked for")


def test_explain_names_float32_or_the_ridge():
    diag = np.full(1000, 2.0)
    bound = precision.entry_bound(SPEC, "ntk", 2.0)
    f32 = precision.explain_indefinite(SPEC, "ntk", "float32", diag, lam=bound)
    assert "float32 rounding" in f32 and "float64" in f32
    f64 = precision.explain_indefinite(SPEC, "ntk", "float64", diag, lam=1e-20)
    assert "below the kernel's float64 rounding" in f64 and "ridge >=" in f64
    other = precision.explain_indefinite(SPEC, "ntk", "float64", diag, lam=1.0)
    assert "cannot explain" in other and "verify" in other


def dense_prediction(x, y, xs, ridge):
    k = SPEC.kernel(x, dtype="float64")
    lam = ridge * np.mean(np.diag(k))
    alpha = cho_solve(cho_factor(k + lam * np.eye(len(x))), y)
    return SPEC.kernel(xs, x, dtype="float64") @ alpha


@pytest.mark.parametrize("ridge", [1e-4, 1e-8])
def test_default_fit_on_raw_data_equals_a_dense_float64_solve(ray_local, tmp_path, ridge):
    """The issue's case: rows around 100 failed (float32 not PD at λ = 8) or drifted; the
    default now takes float64 there and equals the dense float64 answer."""
    x, y = far()
    xs = far(20, seed=1)[0]
    est = NTKRegressor(ridge=ridge, tol=1e-10, tile=32, rank=40, workdir=str(tmp_path))
    est.fit(x, y)
    assert est.dtype_ == "float64" and est.dtype_choice_.startswith("auto: float64")
    want = dense_prediction(x, y, xs, ridge)
    assert np.max(np.abs(est.predict(xs) - want)) <= 1e-6 * np.max(np.abs(want))
    assert est.solve_result_.meta["dtype_choice"] == est.dtype_choice_
    assert est.solve_result_.meta["rounding"]["float32_ok"] is False


def test_a_float32_store_at_a_small_ridge_warns_and_its_failure_says_why(ray_local, tmp_path):
    """One feature, as scikit-learn's check_fit2d_1feature: the float32 Gram is not positive
    definite at ridge 1e-8; the warning and then the SolverError name float32 and the fix."""
    rng = np.random.default_rng(0)
    x = 3 * rng.uniform(size=(10, 1))
    y = np.floor(x[:, 0])
    url = str(tmp_path / "g.zarr")
    rep = stages.gram(x, SPEC, url, GramOptions(dtype="float32", tile=16), QUIET)
    assert rep.dtype == "float32" and rep.dtype_reason == "asked for"
    with pytest.warns(PrecisionWarning, match="float32 rounding.*dtype='float64'"):
        try:
            stages.solve(url, y, SolveOptions(ridge=1e-8, rank=5), QUIET)
        except SolverError as err:
            assert "float32 rounding" in str(err) and "float64" in str(err)
    # the same data solve in float64 at that ridge and equal the dense solve
    url64 = str(tmp_path / "g64.zarr")
    stages.gram(x, SPEC, url64, GramOptions(dtype="float64", tile=16), QUIET)
    res = stages.solve(url64, y, SolveOptions(ridge=1e-8, rank=5, tol=1e-12), QUIET)
    k = SPEC.kernel(x, dtype="float64")
    want = cho_solve(cho_factor(k + 1e-8 * np.mean(np.diag(k)) * np.eye(10)), y)
    assert np.allclose(k @ res.alpha, k @ want, rtol=1e-6, atol=1e-6 * np.abs(y).max())


def test_cli_says_which_dtype_it_took(ray_local, tmp_path, capsys):
    x, y = far(40)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    store = str(tmp_path / "g.zarr")
    assert main(["gram", "--x", str(tmp_path / "x.npy"), "--store", store, "--tile", "32",
                 "--no-progress"]) == 0  # fmt: skip
    assert "float64 (auto: float64 (float32's entry error bound" in capsys.readouterr().out
    model = tmp_path / "m"
    assert main(["solve", "--store", store, "--y", str(tmp_path / "y.npy"), "--model-dir",
                 str(model), "--no-progress"]) == 0  # fmt: skip
    meta = json.loads((model / "model.json").read_text())
    assert meta["dtype"] == "float64" and meta["rounding"]["float32_ok"] is False
