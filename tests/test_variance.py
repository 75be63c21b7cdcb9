"""Posterior standard deviations and covariances from stores (ntk_scale.variance): Neural
Tangents' gp_inference covariances (tests/fixtures/nt_posteriors.npz) reproduced through
Zarr stores and multi-right-hand-side PCG, blocks of test rows resumable, and the errors that
name the fix. The stores' tiles are written here from the kernel (the Gram engine has its own
tests), so no Ray is needed."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from ntk_scale import posterior as post
from ntk_scale import variance
from ntk_scale.kernels import bind, diag_blocks
from ntk_scale.kernels.stax import layer_from_dict
from ntk_scale.options import RunOptions, SolveOptions
from ntk_scale.store import GramStore

FIXTURES = Path(__file__).parent / "fixtures" / "nt_posteriors.npz"
RUN = RunOptions(progress=False)
#: tol 1e-12 and a full-rank preconditioner: the solve is exact to rounding here.
OPTS = SolveOptions(tol=1e-12, rank=8, operator="stored")


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURES, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def fill(url, spec, x, kind, tile=8):
    """A complete float64 store of K(x, x), its tiles written from the kernel."""
    store = GramStore.create(url, spec, x, kind=kind, dtype="float64", tile=tile,
                             diag=diag_blocks(spec, x, kind, "float64", block=tile))  # fmt: skip
    for t in store.missing():
        (r0, r1), (c0, c1) = store.plan.row_range(t.i), store.plan.col_range(t.j)
        store.write_tile(t, spec.kernel(x[r0:r1], x[c0:c1], kind=kind, dtype="float64"))
    return url


#: make test-fast checks the FC case; the conv case (its compilation) runs in make test.
PARAMS = ["fc_relu_erf", pytest.param("conv_relu_avgpool", marks=pytest.mark.slow)]


class _Stores(dict):
    """case -> {kind: store url}, both kinds' stores of the case's training rows, made on
    first use."""

    def __init__(self, fx, root):
        super().__init__()
        self.fx, self.root = fx, root

    def __missing__(self, name):
        layer = layer_from_dict(json.loads(str(self.fx[f"{name}|spec"])))
        x = self.fx[f"{name}|x_train"]
        spec = bind(layer, x.shape[1:])
        flat = x.reshape(len(x), -1)
        self[name] = {k: fill(str(self.root / f"{name}-{k}.zarr"), spec, flat, k)
                      for k in ("nngp", "ntk")}  # fmt: skip
        return self[name]


@pytest.fixture(scope="module")
def stores(fx, tmp_path_factory):
    return _Stores(fx, tmp_path_factory.mktemp("posterior-stores"))


def _rel(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _run(stores, fx, name, g, r, **kw):
    s = stores[name]
    return variance.posterior_uncertainty(
        s[post.solved_kind(g)], fx[f"{name}|x_test"], g, ridge=float(fx[f"{name}|diag_reg"][r]),
        prior_store=s["nngp"] if g == "ntk" else None, options=OPTS, run=RUN, **kw)


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("g", post.POSTERIORS)
def test_std_and_covariance_from_stores_equal_neural_tangents(stores, fx, name, g):
    for r in (0, 1):
        want = fx[f"{name}|{g}|{r}|cov"]
        std = _run(stores, fx, name, g, r)
        assert std.shape == (len(want),)
        assert _rel(std**2, np.diag(want)) <= 1e-6, (g, r)
        cov = _run(stores, fx, name, g, r, full_cov=True)
        assert _rel(cov, want) <= 1e-6, (g, r)


def test_std_written_resumably_block_by_block(stores, fx, tmp_path, monkeypatch):
    name, g = "fc_relu_erf", "ntkgp"
    x = np.vstack([fx[f"{name}|x_test"]] * 3)  # 21 rows: blocks of 8, 8, 5
    out = str(tmp_path / "std.zarr")
    s = stores[name]
    kw = dict(ridge=1e-2, options=OPTS, run=RUN, out=out)
    first = np.asarray(variance.posterior_uncertainty(s["ntk"], x, g, **kw)[...])
    want = np.sqrt(np.diag(fx[f"{name}|{g}|0|cov"]))
    np.testing.assert_allclose(first[:, 0], np.tile(want, 3), rtol=1e-6)
    # Lose block 1's marker (a killed run): the rerun computes that block only.
    (tmp_path / "std.zarr" / "tiles" / "1.0.json").unlink()
    calls = []
    real = variance.cross_kernel
    monkeypatch.setattr(variance, "cross_kernel", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = np.asarray(variance.posterior_uncertainty(s["ntk"], x, g, **kw)[...])
    assert len(calls) == 1
    np.testing.assert_array_equal(again, first)
    with pytest.raises(ValueError, match="--overwrite"):
        variance.posterior_uncertainty(s["ntk"], x, g, **{**kw, "ridge": 1e-3})


def test_the_ntk_posterior_needs_the_nngp_store_of_the_same_rows(stores, fx):
    s, x = stores["fc_relu_erf"], fx["fc_relu_erf|x_test"]
    with pytest.raises(ValueError, match="needs the NNGP Gram"):
        variance.posterior_uncertainty(s["ntk"], x, "ntk", ridge=1e-2, options=OPTS, run=RUN)
    other = str(Path(s["nngp"]).parent / "other-nngp.zarr")  # another network, same rows
    from ntk_scale import FullyConnected

    fill(other, FullyConnected(depth=1), fx["fc_relu_erf|x_train"], "nngp")
    with pytest.raises(ValueError, match="another network"):
        variance.posterior_uncertainty(s["ntk"], x, "ntk", ridge=1e-2, prior_store=other,
                                       options=OPTS, run=RUN)  # fmt: skip
    with pytest.raises(ValueError, match="fit with kind='nngp'"):
        variance.posterior_uncertainty(s["ntk"], x, "nngp", ridge=1e-2, options=OPTS, run=RUN)


@pytest.fixture(scope="module")
def fc_store(tmp_path_factory):
    """N = 300 rows (d = 5, 5 blocks of 64), an FC NTK store, and 40 test rows."""
    from ntk_scale import FullyConnected

    rng = np.random.default_rng(5)
    x, xs = rng.standard_normal((300, 5)), rng.standard_normal((40, 5))
    xs[:5] = x[:5] + 0.01 * rng.standard_normal((5, 5))  # near training rows: small variance
    spec = FullyConnected(depth=2, W_std=1.5, b_std=0.1)
    url = fill(str(tmp_path_factory.mktemp("fc") / "g.zarr"), spec, x, "ntk", tile=64)
    return url, xs


def test_sketch_std_equals_the_exact_one_with_every_row_a_pivot(fc_store):
    url, xs = fc_store
    exact = variance.posterior_uncertainty(url, xs, "ntkgp", ridge=1e-3,
                                           options=SolveOptions(tol=1e-12, rank=300), run=RUN)
    sketch = variance.sketch_std(url, xs, "ntkgp", ridge=1e-3, rank=300, run=RUN)
    assert _rel(sketch, exact) <= 1e-6


def test_sketch_std_error_at_lower_ranks_shrinks_with_the_rank(fc_store):
    """How far the DTC estimate is from the exact std at rank r of N = 300 (ridge 1e-3): the
    median relative error over 40 test rows falls with r (measured: 0.66, 0.21, 0.036 at
    r = 25, 100, 200), and every estimate is a real std. The worst rows are test rows next to
    a training row that is not a pivot: their exact std is small, the sketch's is not (3.4x at
    r = 200, 0.05 at r = 280): the estimate errs on the side of more uncertainty there."""
    url, xs = fc_store
    exact = variance.posterior_uncertainty(url, xs, "ntkgp", ridge=1e-3,
                                           options=SolveOptions(tol=1e-12, rank=300), run=RUN)
    errs = {}
    for r in (25, 100, 200):
        got = variance.sketch_std(url, xs, "ntkgp", ridge=1e-3, rank=r, run=RUN)
        assert np.all(np.isfinite(got)) and np.all(got >= 0)
        errs[r] = float(np.median(np.abs(got - exact) / exact))
        assert np.all(got[5:] > 0.5 * exact[5:])  # far from the data, never far below
    print("sketch std, median relative error by rank:", errs)
    assert errs[25] > errs[100] > errs[200]
    assert errs[200] < 0.06


@pytest.mark.slow
def test_sketch_std_of_the_ntk_posterior(stores, fx):
    """The "ntk" sketch (Θ and K* by their Nyström approximations on the same pivots) equals
    the exact std with every training row a pivot, and at half the rows stays a real std
    (measured relative errors 0.17-0.53 on FC, 0.08-0.29 on conv; 14x and 5.6x on the test row
    that sits on a training row, whose exact std is near 0); it needs the NNGP store."""
    for name in ("fc_relu_erf", "conv_relu_avgpool"):
        s, xs = stores[name], fx[f"{name}|x_test"]
        n = len(fx[f"{name}|x_train"])
        want = np.sqrt(np.diag(fx[f"{name}|ntk|0|cov"]))
        kw = dict(ridge=float(fx[f"{name}|diag_reg"][0]), prior_store=s["nngp"], run=RUN)
        full = variance.sketch_std(s["ntk"], xs, "ntk", rank=n, **kw)
        assert _rel(full, want) <= 1e-5, name
        half = variance.sketch_std(s["ntk"], xs, "ntk", rank=n // 2, **kw)
        assert np.all(np.isfinite(half)) and np.all(half >= 0)
        print(name, "ntk sketch at rank N/2, relative error:", np.abs(half - want) / want)
    with pytest.raises(ValueError, match="needs the NNGP Gram"):
        variance.sketch_std(s["ntk"], xs, "ntk", ridge=1e-2, rank=4, run=RUN)


def test_the_fits_sketch_serves_the_refit_and_the_variance_solves(stores, fx, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """solve_store with a checkpoint directory saves its Nyström sketch there; the variance
    solves load it (no column of K read again) and give NT's covariance; a sketch made for
    other options is not used (rebuilt and replaced)."""
    solve_mod = importlib.import_module("ntk_scale.solve")  # the package's solve is a function

    name, g, r = "fc_relu_erf", "ntkgp", 0
    url, ckpt = stores[name]["ntk"], str(tmp_path / "checkpoint")
    lam = float(fx[f"{name}|diag_reg"][r])
    opts = SolveOptions(tol=1e-12, rank=6, operator="stored", ridge=lam)
    solve_mod.solve_store(url, fx[f"{name}|y_train"], opts, RUN, out_dir=ckpt)
    with np.load(tmp_path / "checkpoint" / solve_mod.SKETCH_NAME, allow_pickle=False) as z:
        assert z["U"].shape == (len(fx[f"{name}|x_train"]), 6)

    def no_sketch(*a, **k):
        raise AssertionError("the sketch was built again")

    monkeypatch.setattr(solve_mod, "nystrom", no_sketch)
    cov = variance.posterior_uncertainty(url, fx[f"{name}|x_test"], g, ridge=lam,
                                         options=opts, run=RUN, full_cov=True,
                                         sketch_dir=ckpt)  # fmt: skip
    assert _rel(cov, fx[f"{name}|{g}|{r}|cov"]) < 1e-6
    monkeypatch.undo()
    other = SolveOptions(tol=1e-12, rank=5, operator="stored")  # another rank: another sketch
    variance.posterior_uncertainty(url, fx[f"{name}|x_test"], g, ridge=lam, options=other,
                                   run=RUN, sketch_dir=ckpt)  # fmt: skip
    with np.load(tmp_path / "checkpoint" / solve_mod.SKETCH_NAME, allow_pickle=False) as z:
        assert z["U"].shape[1] == 5
