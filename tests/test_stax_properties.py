"""Properties of the composable kernels: symmetry, positive semi-definiteness, tiles equal to
one large call whatever the chunking, FullyConnected equal to its stax form, the contract's
errors, JSON round trips and fingerprints."""

import math

import numpy as np
import pytest

from ntk_scale import FullyConnected, Myrtle, stax
from ntk_scale.kernels import Network, bind, spec_from_json, tile_function
from ntk_scale.kernels.network import Compiled, chunk_shape
from ntk_scale.kernels.stax import layer_from_dict

RESIDUAL = stax.serial(
    stax.Conv(8, (3, 3), padding="SAME", W_std=1.3, b_std=0.1), stax.Relu(), stax.FanOut(2),
    stax.parallel(stax.serial(stax.Conv(8, (3, 3), strides=(2, 2), padding="SAME"), stax.Relu(),
                              stax.Conv(8, (3, 3), padding="SAME")),
                  stax.Conv(8, (1, 1), strides=(2, 2))),
    stax.FanInSum(), stax.Erf(), stax.AvgPool((2, 2), padding="SAME", normalize_edges=True),
    stax.GlobalAvgPool(), stax.Dense(1, W_std=1.1, b_std=0.2),
)  # fmt: skip
FLAT = stax.serial(stax.Conv(4, (3, 3), padding="CIRCULAR"), stax.LeakyRelu(0.2),
                   stax.Conv(4, (2, 2)), stax.Abs(), stax.Flatten(), stax.Dense(1))  # fmt: skip


def _images(n, shape=(7, 6, 2), seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape))


@pytest.mark.parametrize(
    "net",
    [
        pytest.param(RESIDUAL, id="residual-pool", marks=pytest.mark.slow),
        pytest.param(FLAT, id="flatten"),
    ],
)
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_symmetric_and_positive_semidefinite(net, kind):
    x = _images(12)
    x[5] = x[2]  # a duplicate row: the kernel is singular there, never negative
    k = net.kernel(x, kind=kind, dtype="float64")
    np.testing.assert_array_equal(k, k.T)
    eig = np.linalg.eigvalsh(k)
    assert eig.min() >= -1e-10 * eig.max()
    # equal rows up to the arc-cosine's resolution at θ ≈ 0 (√ε ≈ 1e-8 rad in float64)
    assert np.allclose(k[5], k[2], rtol=1e-7, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tiles_and_chunks_equal_one_large_call(dtype):
    x = _images(11)
    big = Compiled(RESIDUAL, x.shape[1:], "ntk", dtype, budget=1 << 30).tile(x)
    assert chunk_shape(RESIDUAL, x.shape[1:], "ntk", dtype, 11, 11, 1 << 30) == (11, 11)
    tol = 1e-12 if dtype == "float64" else 1e-5
    for budget in (1, 3 * 16 * 16 * 8 * 8, 1 << 20):  # one pair, a few pairs, many pairs
        c = Compiled(RESIDUAL, x.shape[1:], "ntk", dtype, budget=budget)
        np.testing.assert_allclose(c.tile(x), big, rtol=tol)
        np.testing.assert_allclose(c.tile(x[:4], x[4:]), big[:4, 4:], rtol=tol)
    # tiles of a larger matrix, as the Gram engine computes them
    fn = tile_function(bind(RESIDUAL, x.shape[1:]), "ntk", dtype)
    np.testing.assert_allclose(fn(x[6:].reshape(5, -1), x[:6].reshape(6, -1)), big[6:, :6],
                               rtol=tol)  # fmt: skip


@pytest.mark.parametrize(
    "activation",
    [pytest.param(a, marks=() if a == "identity" else pytest.mark.slow)
     for a in ("relu", "erf", "abs", "identity", "leaky_relu")],
)  # fmt: skip
def test_fully_connected_equals_its_stax_form(activation):
    extra = {"negative_slope": 0.3} if activation == "leaky_relu" else {}
    fc = FullyConnected(depth=3, activation=activation, W_std=1.3, b_std=0.2, **extra)
    act = {"relu": stax.Relu(), "erf": stax.Erf(), "abs": stax.Abs(),
           "identity": stax.Identity(), "leaky_relu": stax.LeakyRelu(0.3)}[activation]  # fmt: skip
    dense = stax.Dense(512, W_std=1.3, b_std=0.2)
    net = stax.serial(*[dense, act] * 3, dense)
    x = np.random.default_rng(1).standard_normal((9, 13))
    for kind in ("ntk", "nngp"):
        ours = net.kernel(x, kind=kind, dtype="float64")
        np.testing.assert_allclose(ours, fc.kernel(x, kind=kind, dtype="float64"), rtol=1e-12)
        np.testing.assert_allclose(net.kernel(x[:4], x[4:], kind=kind, dtype="float32"),
                                   fc.kernel(x[:4], x[4:], kind=kind, dtype="float32"),
                                   rtol=2e-5)  # fmt: skip


def test_widths_do_not_change_the_kernel():
    x = _images(3)
    a = stax.serial(stax.Conv(1, (3, 3)), stax.Relu(), stax.Flatten(), stax.Dense(1))
    b = stax.serial(stax.Conv(4096, (3, 3)), stax.Relu(), stax.Flatten(), stax.Dense(10))
    np.testing.assert_array_equal(a.kernel(x), b.kernel(x))


def test_json_round_trip_and_fingerprints():
    for net in (RESIDUAL, FLAT, Myrtle(7)):
        again = spec_from_json(net.to_json())
        assert again == net and again.fingerprint() == net.fingerprint()
        assert layer_from_dict(net.layer_dict()) == net
    assert Myrtle(5).fingerprint() != Myrtle(7).fingerprint()
    assert Myrtle(5, W_std=1.0).fingerprint() != Myrtle(5).fingerprint()
    bound = bind(Myrtle(5), (32, 32, 3))
    assert isinstance(bound, Network) and bound.d == 32 * 32 * 3
    assert spec_from_json(bound.to_json()) == bound


def test_myrtle_structure():
    layers = [layer.name for layer in Myrtle(10).layers]
    assert layers.count("Conv") == 9 and layers.count("AvgPool") == 5
    assert layers[-2:] == ["Flatten", "Dense"]
    assert [layer.name for layer in Myrtle(5).layers].count("Conv") == 4
    with pytest.raises(ValueError, match="5, 7, 10"):
        Myrtle(6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: stax.Dense(10, parameterization="standard"), "parameterization='ntk'"),
        (lambda: stax.Conv(8, (3, 3), dimension_numbers=("NCHW", "OIHW", "NCHW")), "NHWC"),
        (lambda: stax.Conv(8, (3, 3), padding="FULL"), "VALID, SAME, CIRCULAR"),
        (lambda: stax.Conv(8, (3, 3, 3)), "2-D spatial"),
        (lambda: stax.AvgPool((2, 2), channel_axis=1), "NHWC"),
        (lambda: stax.LayerNorm(), "supported: serial"),
        (lambda: stax.Dense(0), "positive integer"),
        (lambda: stax.serial(stax.Dense(1), "relu"), "ntk_scale stax layer"),
    ],
)
def test_unsupported_arguments_and_layers_name_what_is_supported(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_shape_errors_name_the_expected_shape():
    conv = stax.serial(stax.Conv(1, (3, 3)), stax.Relu(), stax.Flatten(), stax.Dense(1))
    with pytest.raises(ValueError, match=r"\(n, H, W, C\)"):
        conv.kernel(np.zeros((2, 12)))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        stax.serial(stax.Dense(1), stax.Relu(), stax.Dense(1)).kernel(np.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        conv.kernel(np.zeros((2, 2, 2, 1)))
    with pytest.raises(ValueError, match="still spatial"):
        stax.serial(stax.Conv(1, (3, 3)), stax.Relu()).kernel(np.zeros((2, 5, 5, 1)))
    with pytest.raises(ValueError, match="expected"):
        conv.kernel(np.zeros((2, 5, 5, 1)), np.zeros((2, 5, 6, 1)))
    with pytest.raises(ValueError, match="FanInSum"):
        stax.serial(stax.FanOut(2), stax.Dense(1)).kernel(np.zeros((2, 3)))


def test_memory_per_chunk_is_bounded():
    """A 2048 x 2048 tile of Myrtle pairs is never held at once: chunks fit the budget."""
    from ntk_scale.kernels.network import DEFAULT_KERNEL_MEMORY, pair_bytes

    c1, c2 = chunk_shape(Myrtle(5), (32, 32, 3), "ntk", "float64", 2048, 2048)
    per_pair = pair_bytes(Myrtle(5), (32, 32, 3), "ntk", "float64")
    assert per_pair >= 32**4 * 8  # one full (32, 32, 32, 32) covariance in float64
    assert c1 * c2 == max(1, DEFAULT_KERNEL_MEMORY // per_pair) or c1 * c2 == 1
    assert c1 * c2 * per_pair <= max(DEFAULT_KERNEL_MEMORY, per_pair)
    assert math.prod(chunk_shape(FLAT, (7, 6, 2), "ntk", "float32", 2048, 2048)) > 1000
