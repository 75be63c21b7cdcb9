"""Monte-Carlo oracle for a convolutional kernel: wide, finite, randomly initialised CNNs.

The network (NTK parameterization, as Neural Tangents' stax; n channels per hidden layer):

    Conv(n, 3x3, SAME) -> Relu -> Conv(n, 3x3, SAME) -> Relu -> AvgPool(2x2, stride 2)
      -> GlobalAvgPool -> Dense(1)

with ``z = W_std / sqrt(fh·fw·C_in) · conv(h, W) + b_std · b`` and standard-normal W, b. Its
empirical NTK Θ̂(x, x') = Σ_θ ∂f(x)/∂θ · ∂f(x')/∂θ is computed by autodiff alone (a column
J Jᵀ e_j is one ``jax.vjp`` then one ``jax.jvp``): no code or formula is shared with the
analytic recursion under test. The NNGP estimate is exact given the hidden weights: the readout
is a Gaussian linear map of the pooled features, K̂ = W_std²/n · <φ̄(x), φ̄(x')> + b_std².

Error model (that of tests/test_kernels_montecarlo.py, with L = 2 hidden layers of n channels,
m = N_SEEDS independent networks, s_ij = sqrt(K_ii K_jj) the entry's natural scale):

1. Per-network fluctuation, a priori: each layer's empirical kernel averages n i.i.d. channels,
   so it deviates by O(s/sqrt(n)) and through L + 1 layers by O(s·sqrt((L + 1)/n)). Pooling only
   averages positions of the same channels, so it cannot shrink this below the channel count's
   rate. σ_prior = C_PRIOR · s · sqrt((L + 1)/n); the observed std over seeds must stay below it
   (observed: <= 0.27 of it): the oracle fluctuates as a width-n network must.
2. Standard error of the mean: stderr = std_over_seeds / sqrt(m), floored by the a-priori order
   C_FLOOR · s · sqrt((L + 1)/n) / sqrt(m) (m - 1 degrees of freedom are few).
3. Finite-width bias O(1/n): slack C_BIAS · s · (L + 1)/n.

Criterion: |mean − K| <= Z·σ + bias for every entry, Z = 5. Over 3 seed bases the largest |z|
of the correct kernels was 1.1. Negative controls through the same criterion and samples must
be rejected: the analytic kernel of the same network with a Flatten readout instead of
GlobalAvgPool (the readout that averages only same-position entries; smallest max |z| seen:
9.7) and with W_std x 1.1 (23.5).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_scale import stax

WIDTH = 512
N_SEEDS = 6
SEED_BASE = 20261201
W_STD, B_STD = 1.4, 0.1
SHAPE = (6, 6, 2)
N_ROWS = 4
DEPTH = 2

Z, C_PRIOR, C_FLOOR, C_BIAS = 5.0, 4.0, 1.0, 2.0


def _net(readout=stax.GlobalAvgPool, w_std=W_STD):
    conv = functools.partial(stax.Conv, WIDTH, (3, 3), padding="SAME", W_std=w_std, b_std=B_STD)
    return stax.serial(conv(), stax.Relu(), conv(), stax.Relu(),
                       stax.AvgPool((2, 2), strides=(2, 2)), readout(),
                       stax.Dense(1, W_std=w_std, b_std=B_STD))  # fmt: skip


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N_ROWS, *SHAPE))
    return x * np.array([0.5, 1.0, 1.5, 2.0])[:, None, None, None]


def _conv(h, w, b):
    fan_in = w.shape[0] * w.shape[1] * w.shape[2]
    out = jax.lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    return W_STD / math.sqrt(fan_in) * out + B_STD * b


def _forward(params, x):
    (w1, b1), (w2, b2), (wo, bo) = params
    h = jnp.maximum(_conv(x, w1, b1), 0.0)
    h = jnp.maximum(_conv(h, w2, b2), 0.0)
    n, hh, ww, c = h.shape
    h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))  # AvgPool 2x2, stride 2
    feats = h.mean(axis=(1, 2))  # GlobalAvgPool
    return W_STD / math.sqrt(c) * feats @ wo + B_STD * bo, feats


@jax.jit
def _empirical(params, x):
    def f(p):
        return _forward(p, x)[0]

    _, vjp = jax.vjp(f, params)

    def column(e):
        (jt_e,) = vjp(e)
        return jax.jvp(f, (params,), (jt_e,))[1]

    ntk = jax.lax.map(column, jnp.eye(x.shape[0], dtype=x.dtype))
    feats = _forward(params, x)[1]
    nngp = W_STD**2 / feats.shape[1] * feats @ feats.T + B_STD**2
    return 0.5 * (ntk + ntk.T), nngp


def _params(rng):
    c_in = SHAPE[2]
    return [
        (rng.standard_normal((3, 3, c_in, WIDTH)), rng.standard_normal(WIDTH)),
        (rng.standard_normal((3, 3, WIDTH, WIDTH)), rng.standard_normal(WIDTH)),
        (rng.standard_normal(WIDTH), rng.standard_normal(())),
    ]


@pytest.fixture(scope="module")
def samples():
    x = _inputs()
    ntks, nngps = [], []
    with jax.enable_x64(True):
        for s in range(N_SEEDS):
            params = jax.tree_util.tree_map(
                jnp.asarray, _params(np.random.default_rng(SEED_BASE + s))
            )
            ntk, nngp = _empirical(params, jnp.asarray(x))
            ntks.append(np.asarray(ntk))
            nngps.append(np.asarray(nngp))
    return {"ntk": np.stack(ntks), "nngp": np.stack(nngps)}


def _compare(samples, kernel, scale_kernel):
    m = samples.shape[0]
    d = np.diag(scale_kernel)
    scale = np.sqrt(np.outer(d, d))
    rate = math.sqrt((DEPTH + 1) / WIDTH)
    std = samples.std(axis=0, ddof=1)
    sigma = np.maximum(std / math.sqrt(m), C_FLOOR * scale * rate / math.sqrt(m))
    bias = C_BIAS * scale * (DEPTH + 1) / WIDTH
    err = np.abs(samples.mean(axis=0) - kernel)
    return (
        bool(np.all(err <= Z * sigma + bias)),
        float(np.max(err / sigma)),
        float(np.max(std / (C_PRIOR * scale * rate))),
    )


@pytest.mark.slow  # the samples fixture takes ~40 s
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_empirical_conv_kernel_matches_analytic(samples, kind):
    k = _net().kernel(_inputs(), kind=kind, dtype="float64")
    ok, z, spread = _compare(samples[kind], k, k)
    assert spread <= 1.0, f"the oracle fluctuates more than a width-{WIDTH} net may ({spread})"
    assert ok, f"max |z| = {z:.2f} > {Z}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("wrong", ["flatten_readout", "w_std_x1.1"])
def test_negative_controls_are_rejected(samples, kind, wrong):
    x, right = _inputs(), _net().kernel(_inputs(), kind=kind, dtype="float64")
    net = _net(readout=stax.Flatten) if wrong == "flatten_readout" else _net(w_std=W_STD * 1.1)
    ok, z, _ = _compare(samples[kind], net.kernel(x, kind=kind, dtype="float64"), right)
    assert not ok, f"a wrong kernel ({wrong}) passed with max |z| = {z:.2f}"
