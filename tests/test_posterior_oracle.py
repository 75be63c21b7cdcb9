"""The three posteriors of Neural Tangents' ``gp_inference`` (tests/fixtures/nt_posteriors.npz,
made by tests/fixtures/make_nt_posterior_fixtures.py with Neural Tangents 0.6.5): mean and full
covariance for nngp, ntk and ntkgp, for a fully-connected network and a conv network with
pooling, two ridges, float64 to 1e-6 relative. ntk_scale's kernels and its posterior
arithmetic (ntk_scale.posterior) against Neural Tangents' kernels and its own."""

import json
from pathlib import Path

import numpy as np
import pytest

from ntk_scale import posterior as post
from ntk_scale.kernels.stax import layer_from_dict

FIXTURES = Path(__file__).parent / "fixtures" / "nt_posteriors.npz"
CASES = ["fc_relu_erf", "conv_relu_avgpool"]
#: make test-fast checks the FC case; the conv case (its compilation ~20 s) runs in make test.
PARAMS = ["fc_relu_erf", pytest.param("conv_relu_avgpool", marks=pytest.mark.slow)]
RTOL = 1e-6


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURES, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


class _Kernels(dict):
    """case -> the NNGP and NTK blocks dd, td, tt from ntk_scale's kernels (float64), each
    case computed on first use."""

    def __init__(self, fx):
        super().__init__()
        self.fx = fx

    def __missing__(self, name):
        fx = self.fx
        spec = layer_from_dict(json.loads(str(fx[f"{name}|spec"])))
        xd, xt = fx[f"{name}|x_train"], fx[f"{name}|x_test"]
        self[name] = {
            kind: {"dd": spec.kernel(xd, kind=kind, dtype="float64"),
                   "td": spec.kernel(xt, xd, kind=kind, dtype="float64"),
                   "tt": spec.kernel(xt, kind=kind, dtype="float64")}
            for kind in ("nngp", "ntk")
        }  # fmt: skip
        return self[name]


@pytest.fixture(scope="module")
def kernels(fx):
    return _Kernels(fx)


def _rel(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _posterior(k, g, ridge, y):
    s, p = k[post.solved_kind(g)], k[post.prior_kind(g)]
    solve = post.dense_solver(s["dd"], post.relative_lam(ridge, np.diag(s["dd"])))
    mean = s["td"] @ solve(y)
    Z = solve(s["td"].T)
    extra = {}
    if post.needs_prior_train(g):
        extra = {"prior_td": p["td"], "prior_dd_Z": p["dd"] @ Z}
    cov = post.covariance(g, s["td"], Z, p["tt"], **extra)
    var = post.variance(g, s["td"], Z, np.diag(p["tt"]), **extra)
    return mean, cov, var


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("g", post.POSTERIORS)
def test_mean_and_covariance_equal_neural_tangents(fx, kernels, name, g):
    y = fx[f"{name}|y_train"]
    for r, ridge in enumerate(fx[f"{name}|diag_reg"]):
        mean, cov, var = _posterior(kernels[name], g, float(ridge), y)
        want_mean, want_cov = fx[f"{name}|{g}|{r}|mean"], fx[f"{name}|{g}|{r}|cov"]
        assert mean.shape == want_mean.shape == (len(fx[f"{name}|x_test"]), 2)
        assert _rel(mean, want_mean) <= RTOL, (g, ridge, "mean")
        assert _rel(cov, want_cov) <= RTOL, (g, ridge, "cov")
        assert _rel(var, np.diag(want_cov)) <= RTOL, (g, ridge, "variance")
        # the test row on a training row: the GP posteriors' variance there is ~λ-small
        if g != "ntk":
            assert var[0] < 0.05 * np.max(np.diag(kernels[name][post.prior_kind(g)]["tt"]))


def test_posteriors_differ_so_the_comparison_can_fail(fx):
    """The three fixtures are distinct (a test comparing against any one of them for another
    would fail): the ntk covariance is not the ntkgp one, nor the nngp one."""
    name = CASES[0]
    covs = [fx[f"{name}|{g}|0|cov"] for g in post.POSTERIORS]
    for a in range(3):
        for b in range(a + 1, 3):
            assert _rel(covs[a], covs[b]) > 1e-2


def test_check_posterior_names_the_fix():
    assert post.check_posterior(None, "nngp") == "nngp"
    assert post.check_posterior(None, "ntk") == "ntk"
    assert post.check_posterior("ntkgp", "ntk") == "ntkgp"
    with pytest.raises(ValueError, match="fit with kind='nngp'"):
        post.check_posterior("nngp", "ntk")
    with pytest.raises(ValueError, match="fit with kind='ntk'"):
        post.check_posterior("ntkgp", "nngp")
    with pytest.raises(ValueError, match="not one of"):
        post.check_posterior("gp", "ntk")


def test_a_negative_variance_beyond_rounding_is_an_error():
    prior = np.array([2.0, 2.0, 2.0])
    std = post.checked_std(np.array([1.0, 0.0, -1e-9]), prior, tol=1e-6)
    np.testing.assert_array_equal(std, [1.0, 0.0, 0.0])  # -1e-9 is within 10·tol·2
    with pytest.raises(post.NegativeVarianceError, match="row 2.*lower the solver tolerance"):
        post.checked_std(np.array([1.0, 0.0, -1e-3]), prior, tol=1e-6)
