"""Composable stax kernels against Neural Tangents 0.6.5 (tests/fixtures/nt_stax_kernels.npz,
made by tests/fixtures/make_stax_fixtures.py in the oracle environment).

Bounds: float64 <= 1e-8 relative per entry, float32 <= 1e-4 relative per entry (measured
against Neural Tangents' float64 values, the stricter comparison)."""

import json
from pathlib import Path

import numpy as np
import pytest

from ntk_scale.kernels.stax import layer_from_dict

FIXTURES = Path(__file__).parent / "fixtures" / "nt_stax_kernels.npz"
FAST = [
    "valid3_relu_flatten", "same2_even_gap", "circular5_erf_flatten", "circular4_even_stride2",
    "valid4_stride2_abs", "same1_leaky_pool", "pool_same_normalized", "pool_same_unnormalized_s2",
    "pool_circular_valid", "pool_input_first", "abrelu_identity_dense_on_images",
    "residual_strided_shortcut", "residual_identity_shortcut", "dense_only_mixed",
    "dense_flatten_first",
]  # fmt: skip
MYRTLE = ["myrtle5", "myrtle7", "myrtle10"]
BOUND = {"float64": 1e-8, "float32": 1e-4}
#: The (network, dtype) pairs make test-fast checks: one per layout family (dense, circular
#: conv + Flatten, strided VALID, pool first, residual) in one dtype or the other. make test
#: checks every pair; each costs ~5 s of compilation.
QUICK = {
    ("dense_flatten_first", "float64"), ("dense_flatten_first", "float32"),
    ("pool_input_first", "float64"), ("circular5_erf_flatten", "float32"),
    ("valid4_stride2_abs", "float64"), ("residual_identity_shortcut", "float32"),
}  # fmt: skip


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURES, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _case(fx, name):
    spec = layer_from_dict(json.loads(str(fx[f"{name}|spec"])))
    return spec, fx[f"{name}|x1"], fx[f"{name}|x2"]


def _worst(got, ref):
    return float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-300)))


def test_fixture_grid_covers_the_contract(fx):
    names = {k.split("|")[0] for k in fx}
    assert names == set(FAST) | set(MYRTLE)
    text = " ".join(str(fx[f"{n}|spec"]) for n in names)
    for needle in (
        '"VALID"',
        '"SAME"',
        '"CIRCULAR"',
        '"AvgPool"',
        '"GlobalAvgPool"',
        '"Flatten"',
        '"FanOut"',
        '"FanInSum"',
        '"parallel"',
        '"LeakyRelu"',
        '"Abs"',
        '"ABRelu"',
        '"Erf"',
        '"Identity"',
        '"normalize_edges": true',
        '"strides": [2, 2]',
    ):
        assert needle in text, needle
    filters = {
        tuple(json.loads(m))
        for m in __import__("re").findall(r'"filter_shape": (\[\d+, \d+\])', text)
    }
    assert {f[0] for f in filters} >= {1, 2, 3, 4, 5}
    shapes = {fx[f"{n}|x1"].shape[1:] for n in names}
    assert any(s[0] != s[1] for s in shapes if len(s) == 3)  # non-square images
    assert {s[2] for s in shapes if len(s) == 3} >= {1, 2, 3, 4, 5}  # channel counts


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        pytest.param(n, d, marks=() if (n, d) in QUICK else pytest.mark.slow, id=f"{n}-{d}")
        for n in FAST
        for d in ("float64", "float32")
    ],
)
def test_matches_neural_tangents(fx, name, dtype):
    spec, x1, x2 = _case(fx, name)
    for kind in ("nngp", "ntk"):
        k12 = spec.kernel(x1, x2, kind=kind, dtype=dtype)
        k11 = spec.kernel(x1, kind=kind, dtype=dtype)
        assert _worst(k12, fx[f"{name}|{kind}|12"]) <= BOUND[dtype], (kind, "12")
        assert _worst(k11, fx[f"{name}|{kind}|11"]) <= BOUND[dtype], (kind, "11")
        np.testing.assert_array_equal(k11, k11.T)
        diag = spec.diag(x1, kind=kind, dtype=dtype)
        assert _worst(diag, np.diag(fx[f"{name}|{kind}|11"])) <= BOUND[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("name", MYRTLE)
def test_myrtle_matches_neural_tangents(fx, name):
    from ntk_scale import Myrtle

    spec, x1, x2 = _case(fx, name)
    assert spec == Myrtle(int(name[len("myrtle") :]))  # the preset is the notebook's network
    for dtype in ("float64", "float32"):
        for kind in ("nngp", "ntk"):
            got = spec.kernel(x1, x2, kind=kind, dtype=dtype)
            assert _worst(got, fx[f"{name}|{kind}|12"]) <= BOUND[dtype], (dtype, kind)
    got = spec.kernel(x1, kind="ntk", dtype="float64")
    assert _worst(got, fx[f"{name}|ntk|11"]) <= BOUND["float64"]
