"""NTKRegressor(posterior=...).predict(X, return_std=True / return_cov=True) and
NTKRegressorCV's, end to end on a local Ray (the Gram engine, the store, PCG), against Neural
Tangents' gp_inference (tests/fixtures/nt_posteriors.npz): mean and covariance to 1e-6."""

import json
from pathlib import Path

import numpy as np
import pytest

from ntk_scale import NTKRegressor, NTKRegressorCV
from ntk_scale.kernels.stax import layer_from_dict

FIXTURES = Path(__file__).parent / "fixtures" / "nt_posteriors.npz"
NAME = "fc_relu_erf"


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURES, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _est(fx, tmp_path, cls=NTKRegressor, **kw):
    layer = layer_from_dict(json.loads(str(fx[f"{NAME}|spec"])))
    base = dict(kernel=layer, dtype="float64", tile=8, tol=1e-12, rank=8, workers=1,
                workdir=str(tmp_path))  # fmt: skip
    return cls(**{**base, **kw})


def _rel(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("g, kind", [("ntk", "ntk"), ("ntkgp", "ntk"), ("nngp", "nngp")])
def test_estimator_std_and_cov_equal_neural_tangents(ray_local, fx, tmp_path, g, kind):
    x, y, xs = fx[f"{NAME}|x_train"], fx[f"{NAME}|y_train"], fx[f"{NAME}|x_test"]
    # the ntk posterior's NNGP store: written by the fit's own pass over the tiles
    both = {"also_nngp": True} if g == "ntk" else {}
    est = _est(fx, tmp_path, kind=kind, posterior=g, ridge=float(fx[f"{NAME}|diag_reg"][0]),
               **both)  # fmt: skip
    est.fit(x, y)
    assert (est.solve_result_.meta["nngp_store"] is not None) == bool(both)
    mean, std = est.predict(xs, return_std=True)
    mean2, cov = est.predict(xs, return_cov=True)
    want = fx[f"{NAME}|{g}|0|cov"]
    assert mean.shape == (len(xs), 2) and std.shape == (len(xs),) and cov.shape == want.shape
    assert _rel(mean, fx[f"{NAME}|{g}|0|mean"]) <= 1e-6
    np.testing.assert_array_equal(mean, mean2)
    assert _rel(std**2, np.diag(want)) <= 1e-6
    assert _rel(cov, want) <= 1e-6
    assert (est.prior_store_ is not None) == (g == "ntk")
    with pytest.raises(ValueError, match="at most one"):
        est.predict(xs, return_std=True, return_cov=True)


def test_cv_estimator_gives_the_posterior_at_the_chosen_ridge(ray_local, fx, tmp_path):
    x, y, xs = fx[f"{NAME}|x_train"], fx[f"{NAME}|y_train"], fx[f"{NAME}|x_test"]
    grid = tuple(float(r) for r in fx[f"{NAME}|diag_reg"])
    est = _est(fx, tmp_path, NTKRegressorCV, posterior="ntkgp", ridges=grid, cv=3).fit(x, y)
    r = grid.index(est.ridge_)
    _, cov = est.predict(xs, return_cov=True)
    assert _rel(cov, fx[f"{NAME}|ntkgp|{r}|cov"]) <= 1e-6


def test_the_estimators_std_reuses_the_fits_sketch(ray_local, fx, tmp_path, monkeypatch):
    """The fit keeps its Nyström sketch beside the store; predict(return_std=True) and a refit
    load it instead of pivoting again (one sketch in all), and the std still equals NT's."""
    import importlib

    solve_mod = importlib.import_module("ntk_scale.solve")
    built = []
    real = solve_mod.nystrom
    monkeypatch.setattr(solve_mod, "nystrom", lambda *a, **k: built.append(1) or real(*a, **k))
    x, y, xs = fx[f"{NAME}|x_train"], fx[f"{NAME}|y_train"], fx[f"{NAME}|x_test"]
    est = _est(fx, tmp_path, kind="ntk", posterior="ntkgp",
               ridge=float(fx[f"{NAME}|diag_reg"][0])).fit(x, y)  # fmt: skip
    assert len(built) == 1 and Path(est._sketch_dir(), "preconditioner.npz").exists()
    _, std = est.predict(xs, return_std=True)
    est.fit(x, 2 * y)  # a refit of the same rows: the same store, the same sketch
    assert len(built) == 1
    assert _rel(std**2, np.diag(fx[f"{NAME}|ntkgp|0|cov"])) <= 1e-6


def test_a_posterior_that_does_not_fit_the_kind_is_refused_before_any_work(fx, tmp_path):
    x, y = fx[f"{NAME}|x_train"], fx[f"{NAME}|y_train"]
    with pytest.raises(ValueError, match="fit with kind='nngp'"):
        _est(fx, tmp_path, kind="ntk", posterior="nngp").fit(x, y)
    assert not list(tmp_path.iterdir())


def test_cli_predict_std_writes_them_beside_the_means(ray_local, fx, tmp_path):
    """gram, solve --posterior ntk, predict --std on the conv + pooling case: the standard
    deviations (a second resumable Zarr array, p-std.zarr) equal Neural Tangents' ntk
    posterior's; model.json records the posterior and the NNGP store made on the way."""
    import zarr

    from ntk_scale.cli import main

    name, t = "conv_relu_avgpool", tmp_path
    layer = layer_from_dict(json.loads(str(fx[f"{name}|spec"])))
    (t / "spec.json").write_text(layer.to_json())
    for key in ("x_train", "y_train", "x_test"):
        np.save(t / f"{key}.npy", fx[f"{name}|{key}"])
    common = ["--kernel-spec", str(t / "spec.json"), "--dtype", "float64", "--tile", "8"]
    assert main(["gram", "--x", str(t / "x_train.npy"), "--store", str(t / "g.zarr"),
                 *common]) == 0  # fmt: skip
    solve = ["solve", "--store", str(t / "g.zarr"), "--y", str(t / "y_train.npy"),
             "--ridge", "1e-2", "--tol", "1e-12", "--rank", "8"]  # fmt: skip
    assert main([*solve, "--model-dir", str(t / "bad"), "--posterior", "nngp"]) == 2
    assert not (t / "bad").exists()
    assert main([*solve, "--model-dir", str(t / "m"), "--posterior", "ntk"]) == 0
    assert main(["predict", "--model-dir", str(t / "m"), "--x", str(t / "x_test.npy"),
                 "--out", str(t / "p.zarr"), "--std"]) == 0  # fmt: skip
    std = np.asarray(zarr.open_array(str(t / "p-std.zarr"), mode="r")[...])[:, 0]
    mean = np.asarray(zarr.open_array(str(t / "p.zarr"), mode="r")[...])
    assert _rel(std**2, np.diag(fx[f"{name}|ntk|0|cov"])) <= 1e-6
    assert _rel(mean, fx[f"{name}|ntk|0|mean"]) <= 1e-6
    meta = json.loads((t / "m" / "model.json").read_text())
    assert meta["posterior"] == "ntk" and meta["nngp_store"].endswith("g-nngp.zarr")


def test_one_pass_over_the_tiles_writes_the_ntk_and_nngp_stores(ray_local, tmp_path):
    """gram with also_nngp: every tile computed once, by one task, in both kinds; both stores
    hold the kernels of X in one call; a run stopped midway resumes both; a tile missing from
    the NNGP store alone is computed again; kind nngp with also_nngp is refused first."""
    from ntk_scale import FullyConnected, stages
    from ntk_scale.options import GramOptions, RunOptions
    from ntk_scale.store import GramStore

    spec = FullyConnected(depth=2, W_std=1.4, b_std=0.1)
    x = np.random.default_rng(2).standard_normal((40, 5))
    url, run = str(tmp_path / "g.zarr"), RunOptions(workers=2, progress=False)
    go = GramOptions(kind="ntk", dtype="float64", tile=8, also_nngp=True)
    with pytest.raises(ValueError, match="kind='ntk'"):
        stages.gram(x, spec, str(tmp_path / "n.zarr"), GramOptions(kind="nngp", also_nngp=True))
    assert not list(tmp_path.iterdir())

    def stop_after_five(record, seen=[]):  # noqa: B006 - counts the finished tiles
        seen.append(record)
        if len(seen) == 5:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        stages.gram(x, spec, url, go, run, on_tile=stop_after_five)
    report = stages.gram(x, spec, url, go, run)
    ntk, nngp = GramStore.open(url), GramStore.open(stages.nngp_store_url(url))
    assert not ntk.missing() and not nngp.missing() and nngp.meta.kind == "nngp"
    assert 0 < report.computed < ntk.plan.n_tiles  # the rest, not all again
    for store, kind in ((ntk, "ntk"), (nngp, "nngp")):
        dense = np.asarray(store.to_dask().compute())
        np.testing.assert_allclose(dense, spec.kernel(x, kind=kind, dtype="float64"),
                                   rtol=1e-12, atol=0)  # fmt: skip
    (Path(nngp.url) / "tiles" / "1.2.json").unlink()
    again = stages.gram(x, spec, url, go, run)
    assert again.computed == 1 and not GramStore.open(nngp.url).missing()
    assert stages.complete_nngp_store(url) == nngp.url
