"""float32 fully-connected kernels on raw, unstandardised data, against a float64 oracle and the
derived per-entry bound of ntk_scale.kernels.precision.

The oracle is the REFERENCES.md recursion written here in numpy float64 with arccos, fed the
same float32-rounded inputs: independent of ntk_scale's code path. Before the δ = 1 − cos θ
recursion, inputs far from the origin gave errors of 7e-4·diag_max and a float32 Gram whose
smallest eigenvalue was −879 against a ridge of 8.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_scale import FullyConnected
from ntk_scale.kernels.precision import UNIT_ROUNDOFF_F32, entry_bound

ACTS = ["relu", "erf", "abs", "leaky_relu"]
N = 72


def _far(rng, n):  # scikit-learn's estimator checks: 100 + N(0, 1), d = 2
    return 100.0 + rng.normal(size=(n, 2))


def _clustered(rng, n):  # rows around one point, noise 1e-3
    return rng.normal(size=(1, 10)) + 1e-3 * rng.normal(size=(n, 10))


def _table(rng, n):  # years of education 0-20, of experience 0-50, two one-hot columns
    edu, exp = rng.integers(0, 21, size=n), rng.integers(0, 51, size=n)
    one_hot = np.hstack([np.eye(5)[rng.integers(0, 5, size=n)], np.eye(3)[rng.integers(0, 3, n)]])
    return np.column_stack([edu, exp, one_hot]).astype(float)


def _standard(rng, n):
    return rng.normal(size=(n, 10))


FAMILIES = {"far": _far, "clustered": _clustered, "table": _table, "standard": _standard}


def _inputs(family, n=N, seed=0):
    x = FAMILIES[family](np.random.default_rng(seed), n).astype(np.float32)
    x[5] = x[7]  # an exact duplicate: cos θ = 1 off the diagonal
    return x


def oracle(x1, x2, depth, act, w_std, b_std, kind, slope=0.01):
    """K(x1, x2) by the REFERENCES.md recursion in numpy float64 (arccos, no δ recursion)."""
    w, b2 = w_std**2, b_std**2
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    d = x1.shape[1]
    c = w * x1 @ x2.T / d + b2
    q1, q2 = w * (x1 * x1).sum(1) / d + b2, w * (x2 * x2).sum(1) / d + b2
    theta = c.copy()
    a, b = {"relu": (0.0, 1.0), "abs": (-1.0, 1.0), "leaky_relu": (slope, 1.0)}.get(act, (0, 1))
    for _ in range(depth):
        if act == "erf":
            g = np.outer(1 + 2 * q1, 1 + 2 * q2)
            s = 2 / np.pi * np.arcsin(np.clip(2 * c / np.sqrt(g), -1, 1))
            sdot = 4 / np.pi / np.sqrt(g - 4 * c * c)
            s1, s2 = (2 / np.pi * np.arcsin(2 * q / (1 + 2 * q)) for q in (q1, q2))
        elif act == "identity":
            s, sdot, s1, s2 = c, 1.0, q1, q2
        else:
            hh = np.sqrt(np.outer(q1, q2))
            cos = np.clip(np.divide(c, hh, out=np.zeros_like(c), where=hh > 0), -1, 1)
            t = np.arccos(cos)
            s = a * b * c + (b - a) ** 2 * hh / (2 * np.pi) * (np.sin(t) + (np.pi - t) * cos)
            sdot = a * b + (b - a) ** 2 * (np.pi - t) / (2 * np.pi)
            s1, s2 = 0.5 * (a * a + b * b) * q1, 0.5 * (a * a + b * b) * q2
        c = w * s + b2
        theta = w * theta * sdot + c
        q1, q2 = w * s1 + b2, w * s2 + b2
    return theta if kind == "ntk" else c


def _errors(spec, x, kind):
    """(max |K32 − K| / diag_max, entry_bound / diag_max) of the Gram K(x, x)."""
    k32 = spec.kernel(x, kind=kind, dtype="float32").astype(np.float64)
    ref = oracle(x, x, spec.depth, spec.activation, spec.W_std, spec.b_std, kind)
    diag_max = float(np.diag(ref).max())
    return float(np.abs(k32 - ref).max()) / diag_max, entry_bound(spec, kind, diag_max) / diag_max


def test_oracle_matches_float64_path():
    """The oracle is worth trusting: it agrees with the package's float64 kernel (to 1e-7: its
    own arccos of a float64 cosine near 1 is off by √(2·2⁻⁵³) ≈ 1.5e-8 in θ)."""
    x = _inputs("standard")
    for act in ACTS:
        spec = FullyConnected(depth=3, activation=act, b_std=0.2)
        for kind in ("ntk", "nngp"):
            ref = oracle(x, x, 3, act, spec.W_std, 0.2, kind)
            got = spec.kernel(x, kind=kind, dtype="float64")
            np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("depth", [1, 2, 3, pytest.param(4, marks=pytest.mark.slow),
                                   pytest.param(5, marks=pytest.mark.slow)])  # fmt: skip
def test_float32_within_entry_bound(family, depth):
    x = _inputs(family)
    worst = []
    for act in ACTS:
        for b_std in (0.0, 0.3):
            spec = FullyConnected(depth=depth, activation=act, b_std=b_std)
            for kind in ("ntk", "nngp"):
                err, bound = _errors(spec, x, kind)
                assert err <= bound, (
                    f"{family} {act} b={b_std} depth={depth} {kind}: {err:.2e} > {bound:.2e}"
                )
                worst.append(err)
    # Far below the old float32 errors on these inputs (7e-4 far, 1.4e-3 clustered abs).
    assert max(worst) <= 1e-5, f"{family} depth {depth}: {max(worst):.2e}"


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "abs", "erf", "identity"])
def test_bound_is_not_vacuous(act):
    """The derived bound stays below 1e-4·diag_max where the derivation says so: relu-family
    (ab >= 0) and identity networks at every depth up to 5, abs and erf up to depth 3."""
    top = 5 if act in ("relu", "leaky_relu", "identity") else 3
    for depth in range(1, top + 1):
        for b_std in (0.0, 0.5):
            spec = FullyConnected(depth=depth, activation=act, b_std=b_std)
            for kind in ("ntk", "nngp"):
                rel = entry_bound(spec, kind, 1.0)
                assert 10 * UNIT_ROUNDOFF_F32 < rel <= 1e-4, (act, depth, b_std, kind, rel)


def test_bound_scales_with_diag_and_grows_with_depth():
    spec = FullyConnected(depth=3, activation="relu")
    assert entry_bound(spec, "ntk", 7.4e4) == pytest.approx(7.4e4 * entry_bound(spec, "ntk", 1.0))
    deeper = [entry_bound(FullyConnected(depth=L), "ntk", 1.0) for L in range(1, 6)]
    assert deeper == sorted(deeper)
    with pytest.raises(ValueError, match="kind='ntk2'"):
        entry_bound(spec, "ntk2", 1.0)
    with pytest.raises(ValueError, match="diag_max"):
        entry_bound(spec, "ntk", float("nan"))


def test_ridge_8_gram_positive_definite_where_the_bound_guarantees_it():
    """Weyl: λ_min(K32 + λI) ≥ λ_min(K) + λ − n·bound. Far-from-origin rows (diag 4e4) at a
    size where n·bound < λ = 8: the bound promises a positive definite K32 + 8I."""
    x, lam = _inputs("far", n=32), 8.0
    spec = FullyConnected(depth=1, activation="relu")
    ref = oracle(x, x, 1, "relu", spec.W_std, 0.0, "ntk")
    bound = entry_bound(spec, "ntk", float(np.diag(ref).max()))
    assert len(x) * bound < lam + min(np.linalg.eigvalsh(ref).min(), 0.0)
    k32 = spec.kernel(x, kind="ntk", dtype="float32").astype(np.float64)
    assert np.linalg.eigvalsh(k32 + lam * np.eye(len(x))).min() > 0


def test_ridge_8_far_from_origin_gram_at_depth_3():
    """The case that broke PCG: 300 far-from-origin rows, relu depth 3 (diag 8.3e4). The old
    float32 Gram had λ_min = −879; now it is within 1 of float64's (≈ 0)."""
    x = _inputs("far", n=300)
    spec = FullyConnected(depth=3, activation="relu")
    k32 = spec.kernel(x, kind="ntk", dtype="float32").astype(np.float64)
    ref = oracle(x, x, 3, "relu", spec.W_std, 0.0, "ntk")
    assert abs(np.linalg.eigvalsh(k32).min() - np.linalg.eigvalsh(ref).min()) < 1.0
    assert np.linalg.eigvalsh(k32 + 8.0 * np.eye(len(x))).min() > 0


def test_cross_gram_and_awkward_rows_within_bound():
    """A rectangular tile, zero rows (q = 0 without bias), antipodal and collinear rows."""
    rng = np.random.default_rng(3)
    x1 = (50.0 + rng.normal(size=(20, 4))).astype(np.float32)
    x2 = np.vstack([x1[:5], -x1[:3], 2 * x1[:3], np.zeros((1, 4)), rng.normal(size=(8, 4))])
    x2 = x2.astype(np.float32)
    for act in ACTS:
        for b_std in (0.0, 0.3):
            spec = FullyConnected(depth=3, activation=act, b_std=b_std)
            for kind in ("ntk", "nngp"):
                k32 = spec.kernel(x1, x2, kind=kind, dtype="float32").astype(np.float64)
                ref = oracle(x1, x2, 3, act, spec.W_std, b_std, kind)
                d1 = np.diag(oracle(x1, x1, 3, act, spec.W_std, b_std, kind))
                d2 = np.diag(oracle(x2, x2, 3, act, spec.W_std, b_std, kind))
                diag_max = float(max(d1.max(), d2.max()))
                assert np.abs(k32 - ref).max() <= entry_bound(spec, kind, diag_max), (
                    act,
                    b_std,
                    kind,
                )


@given(
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-3, 1e2),
    b_std=st.sampled_from([0.0, 0.1, 1.0]),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=15, deadline=None)
def test_property_offsets_and_scales(offset, scale, b_std, act, seed):
    rng = np.random.default_rng(seed)
    x = (offset + scale * rng.normal(size=(16, 3))).astype(np.float32)
    spec = FullyConnected(depth=3, activation=act, b_std=b_std)
    for kind in ("ntk", "nngp"):
        err, bound = _errors(spec, x, kind)
        assert err <= bound and math.isfinite(err), (kind, err, bound)
