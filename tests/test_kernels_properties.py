"""Properties of the kernels: symmetry, PSD, tiles vs one call, spec contract, bad input."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_scale import FullyConnected
from ntk_scale.kernels import diag_function, spec_from_json, tile_function

SPECS = [
    FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1),
    FullyConnected(depth=2, activation="erf", W_std=1.2, b_std=0.3),
    FullyConnected(depth=4, activation="leaky_relu", W_std=1.5, b_std=0.0, negative_slope=0.1),
    FullyConnected(depth=1, activation="abs"),
]


def _data(n=40, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.activation)
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_gram_symmetric_psd(spec, kind):
    k = spec.kernel(_data(), kind=kind, dtype="float64")
    np.testing.assert_array_equal(k, k.T)
    eig = np.linalg.eigvalsh(k)
    assert eig.min() >= -1e-10 * eig.max()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.activation)
def test_tiles_equal_one_call(spec):
    x = _data(n=50)
    full = spec.kernel(x, kind="ntk", dtype="float64")
    f = tile_function(spec, "ntk", "float64")
    for rows, cols in [(slice(0, 16), slice(16, 50)), (slice(30, 50), slice(0, 7))]:
        np.testing.assert_allclose(np.asarray(f(x[rows], x[cols])), full[rows, cols], rtol=1e-12)
    np.testing.assert_allclose(spec.diag(x, dtype="float64"), np.diag(full), rtol=1e-12)


def test_diagonal_tile_uses_exact_diagonal():
    spec = SPECS[0]
    x = _data(n=20)
    sym = np.asarray(tile_function(spec, "ntk", "float32", symmetric=True)(x, x))
    exact = np.asarray(diag_function(spec, "ntk", "float32")(x))
    np.testing.assert_array_equal(np.diag(sym), exact)
    np.testing.assert_array_equal(sym, sym.T)


def test_float32_close_to_float64():
    spec = SPECS[0]
    x = _data(n=64, d=32)
    k32, k64 = spec.kernel(x, dtype="float32"), spec.kernel(x, dtype="float64")
    assert k32.dtype == np.float32 and k64.dtype == np.float64
    np.testing.assert_allclose(k32, k64, rtol=1e-4)


def test_numerically_awkward_rows_are_finite():
    x = _data(n=6, d=5)
    x[0] = 0.0
    x[1] *= 1e-30
    x[2] *= 1e15
    x[3] = x[4]
    for b_std in (0.0, 0.1):
        for act in ("relu", "erf", "abs"):
            spec = FullyConnected(depth=3, activation=act, W_std=1.4, b_std=b_std)
            for dtype in ("float32", "float64"):
                k = spec.kernel(x, dtype=dtype)
                assert np.isfinite(k).all(), (act, b_std, dtype)
                # Identical rows give identical kernel rows.
                np.testing.assert_allclose(k[3], k[4], rtol=1e-6)


@given(
    depth=st.integers(0, 6),
    act=st.sampled_from(["relu", "erf", "abs", "identity", "leaky_relu"]),
    w=st.floats(0.1, 3.0),
    b=st.floats(0.0, 2.0),
)
@settings(max_examples=50, deadline=None)
def test_spec_json_round_trip_and_fingerprint(depth, act, w, b):
    spec = FullyConnected(depth=depth, activation=act, W_std=w, b_std=b)
    again = spec_from_json(spec.to_json())
    assert again == spec
    assert again.fingerprint() == spec.fingerprint()
    assert json.loads(spec.to_json())["type"] == "FullyConnected"


def test_fingerprint_distinguishes_specs():
    a = FullyConnected(depth=3, W_std=1.4, b_std=0.1)
    assert a.fingerprint() == FullyConnected(depth=3, W_std=1.4, b_std=0.1).fingerprint()
    assert a.fingerprint() != FullyConnected(depth=3, W_std=1.4, b_std=0.2).fingerprint()
    assert a.fingerprint() != FullyConnected(depth=2, W_std=1.4, b_std=0.1).fingerprint()


def test_spec_is_frozen():
    spec = SPECS[0]
    with pytest.raises(AttributeError):
        spec.depth = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "tanh"}, "relu, erf, abs, identity, leaky_relu"),
        ({"W_std": 0.0}, "W_std=0.0 must be > 0"),
        ({"W_std": -1.0}, "W_std=-1.0 must be > 0"),
        ({"b_std": -0.1}, "b_std=-0.1 must be >= 0"),
        ({"depth": -1}, "depth=-1"),
        ({"depth": 2.5}, "depth=2.5"),
        ({"negative_slope": 0.1}, "only to activation='leaky_relu'"),
        ({"W_std": float("nan")}, "W_std=nan"),
    ],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FullyConnected(**kwargs)


def test_bad_inputs_name_the_problem():
    spec = SPECS[0]
    x = _data(n=10, d=4)
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="row 7 contains NaN or Inf"):
        spec.kernel(bad)
    bad[7, 2] = np.inf
    with pytest.raises(ValueError, match="x2 row 7"):
        spec.kernel(x, bad)
    with pytest.raises(ValueError, match="x2 has 5 features but 4 were expected"):
        spec.kernel(x, _data(n=3, d=5))
    with pytest.raises(ValueError, match="must be a 2-D array"):
        spec.kernel(x[0])
    with pytest.raises(ValueError, match="kind='ntk2'"):
        spec.kernel(x, kind="ntk2")
    with pytest.raises(ValueError, match="dtype='float16'"):
        spec.kernel(x, dtype="float16")
