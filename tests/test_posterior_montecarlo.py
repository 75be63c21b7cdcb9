"""Monte-Carlo oracle for the ``"ntk"`` posterior: an ensemble of wide finite networks trained by
gradient descent on MSE to convergence (issue N).

The claim (Lee et al. 2019, "Wide neural networks of any depth evolve as linear models"): the
outputs at test rows X* of infinitely many infinitely wide networks, each initialised at random
and trained by full-batch gradient descent on 1/2 Σ (f(x_i) − y_i)² until it fits the training
rows, are Gaussian with

    mean  Θ*Θ⁻¹y
    cov   K** + Θ*Θ⁻¹ K Θ⁻¹Θ*ᵀ − (Θ*Θ⁻¹K*ᵀ + its transpose)

(Θ the NTK, K the NNGP kernel; the ridge → 0 limit of gp_inference's ``get="ntk"``). Here E
networks (one hidden ReLU layer of width n, NTK parameterization as in stax, weights from numpy's
generator) are trained in lockstep (``jax.vmap``) with the step 1/λ_max(Θ) for
ln(10⁶)·cond(Θ) steps, which shrinks the training residual by 10⁶ along Θ's slowest direction; the
kernels and the covariance are the package's (``FullyConnected.kernel``, ``posterior.covariance``
and ``posterior.variance``), which share no code with the networks.

Error model. For E independent Gaussian outputs with covariance C, the sample mean has standard
error sqrt(C_ii / E), and the sample covariance entry Ĉ_ij has variance
(C_ij² + C_ii C_jj) / (E − 1) (Wishart). With 4 + 10 statistics, |z| ≤ Z_MAX = 4.5 is exceeded by
chance with probability ~1e-4 in all. Finite width adds a bias of order 1/n (each network's Θ̂
deviates from Θ by O(1/sqrt n) and enters f∞ nonlinearly; the lazy-training correction is also
O(1/n)): measured here with E = 2,000 networks, max |z| was 1.6 (cov) and 2.0 (mean) at n = 512 and
1.2 / 0.7 at n = 2,048, and 1.9 (mean) / 1.8 (cov) at this test's n = 1,024: inside the
Monte-Carlo error. The rows are
chosen with cond(Θ) = 5.8 (81 steps); an ill-conditioned Θ amplifies the finite-width bias through
Θ⁻¹ (at cond 90 the mean's z reached 8 with these E and n).

Negative controls, through the same statistics: the ntkgp covariance Θ** − Θ*Θ⁻¹Θ*ᵀ (the GP with
the NTK as prior: z = 25.3 here) and the ``"ntk"`` covariance without its cross terms (a plausible
slip: z = 30.3) are both rejected, so the test has the power to tell the posteriors apart.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_scale import posterior
from ntk_scale.kernels.spec import FullyConnected

W_STD, B_STD = math.sqrt(2.0), 0.1
N_TRAIN, N_TEST, DIM = 5, 4, 3
ENSEMBLE, WIDTH = 2_000, 1_024
Z_MAX = 4.5

pytestmark = pytest.mark.slow  # ~20 s: trains 2,000 networks


def _data():
    x = np.random.default_rng(12).standard_normal((N_TRAIN, DIM))  # cond(Θ) = 5.8
    r = np.random.default_rng(99)
    return x, r.standard_normal((N_TEST, DIM)), 0.5 * r.standard_normal(N_TRAIN)


def _forward(params, x):
    """One network: (N, DIM) -> (N,); params W1 (DIM, n), b1 (n,), W2 (n, 1), b2 (1,)."""
    w1, b1, w2, b2 = params
    h = jax.nn.relu(W_STD / math.sqrt(x.shape[1]) * (x @ w1) + B_STD * b1)
    return (W_STD / math.sqrt(w1.shape[1]) * (h @ w2) + B_STD * b2)[:, 0]


def _trained_outputs(x, x_star, y, eta, steps, seed=11):
    """Outputs (E, N_TEST) at x_star of ENSEMBLE networks after ``steps`` of gradient descent,
    and the worst training residual."""
    r = np.random.default_rng(seed)
    shapes = [(DIM, WIDTH), (WIDTH,), (WIDTH, 1), (1,)]
    params = tuple(jnp.asarray(r.standard_normal((ENSEMBLE,) + s)) for s in shapes)
    x, x_star, y = jnp.asarray(x), jnp.asarray(x_star), jnp.asarray(y)
    grad = jax.vmap(jax.grad(lambda p: 0.5 * jnp.sum((_forward(p, x) - y) ** 2)))

    @jax.jit
    def train(p):
        step = lambda _, p: jax.tree.map(lambda a, g: a - eta * g, p, grad(p))  # noqa: E731
        return jax.lax.fori_loop(0, steps, step, p)

    params = train(params)
    outputs = jax.vmap(_forward, (0, None))
    residual = float(jnp.max(jnp.abs(outputs(params, x) - y)))
    return np.asarray(outputs(params, x_star)), residual


def _z_scores(samples, mean, cov):
    """max |z| of the sample mean and of the sample covariance's upper triangle against
    (mean, cov), with the Gaussian standard errors of the module docstring."""
    e = samples.shape[0]
    d = np.diag(cov)
    z_mean = (samples.mean(axis=0) - mean) / np.sqrt(d / e)
    se = np.sqrt((cov**2 + np.outer(d, d)) / (e - 1))
    iu = np.triu_indices(len(d))
    z_cov = ((np.cov(samples.T) - cov) / se)[iu]
    return float(np.abs(z_mean).max()), float(np.abs(z_cov).max())


@pytest.fixture(scope="module")
def ensemble():
    x, x_star, y = _data()
    spec = FullyConnected(depth=1, activation="relu", W_std=W_STD, b_std=B_STD)
    with jax.enable_x64(True):
        xx = np.vstack([x, x_star])
        theta = spec.kernel(xx, None, "ntk", "float64")
        nngp = spec.kernel(xx, None, "nngp", "float64")
        ev = np.linalg.eigvalsh(theta[:N_TRAIN, :N_TRAIN])
        eta, steps = 1.0 / ev[-1], int(math.ceil(math.log(1e6) * ev[-1] / ev[0]))
        samples, residual = _trained_outputs(x, x_star, y, eta, steps)
    tr, te = slice(0, N_TRAIN), slice(N_TRAIN, None)
    lam = posterior.relative_lam(1e-12, np.diag(theta[tr, tr]))  # the GD limit: ridge -> 0
    solve = posterior.dense_solver(theta[tr, tr], lam)
    S, Z = theta[te, tr], solve(theta[te, tr].T)
    parts = {"S": S, "Z": Z, "theta_tt": theta[te, te], "K_tt": nngp[te, te],
             "K_td": nngp[te, tr], "KZ": nngp[tr, tr] @ Z}  # fmt: skip
    return {"samples": samples, "residual": residual, "mean": S @ solve(y), "parts": parts,
            "cond": ev[-1] / ev[0]}  # fmt: skip


def _ntk_cov(p):
    return posterior.covariance("ntk", p["S"], p["Z"], p["K_tt"], p["K_td"], p["KZ"])


def test_networks_are_trained_to_convergence(ensemble):
    assert ensemble["cond"] < 10  # the rows the error model was sized for
    assert ensemble["residual"] < 1e-4


def test_ntk_posterior_equals_the_trained_ensemble(ensemble):
    p = ensemble["parts"]
    cov = _ntk_cov(p)
    var = posterior.variance("ntk", p["S"], p["Z"], np.diag(p["K_tt"]), p["K_td"], p["KZ"])
    np.testing.assert_allclose(var, np.diag(cov), rtol=1e-12, atol=1e-14)
    z_mean, z_cov = _z_scores(ensemble["samples"], ensemble["mean"], cov)
    assert z_mean < Z_MAX and z_cov < Z_MAX, (z_mean, z_cov)


@pytest.mark.parametrize("wrong", ["ntkgp", "ntk_without_cross_terms"])
def test_other_covariances_are_rejected(ensemble, wrong):
    p = ensemble["parts"]
    if wrong == "ntkgp":
        cov = posterior.covariance("ntkgp", p["S"], p["Z"], p["theta_tt"])
    else:
        cov = p["K_tt"] + p["Z"].T @ p["KZ"]
    _, z_cov = _z_scores(ensemble["samples"], ensemble["mean"], cov)
    assert z_cov > 2 * Z_MAX, z_cov
