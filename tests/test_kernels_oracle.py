"""The fully-connected kernels against Neural Tangents 0.6.5 (fixtures in tests/fixtures/)."""

from pathlib import Path

import numpy as np
import pytest

from ntk_scale import FullyConnected

FIXTURES = Path(__file__).parent / "fixtures" / "nt_fc_kernels.npz"


def _cases():
    with np.load(FIXTURES, allow_pickle=False) as f:
        keys = [k for k in f.files if "|" in k]
    return keys


@pytest.fixture(scope="module")
def fixture_file():
    with np.load(FIXTURES, allow_pickle=False) as f:
        yield {k: f[k] for k in f.files}


def _spec(depth, act, w, b):
    extra = {"negative_slope": 0.2} if act == "leaky_relu" else {}
    return FullyConnected(depth=int(depth), activation=act, W_std=float(w), b_std=float(b), **extra)


def _input_cosines(x1, x2, w, b):
    """Layer-0 cosines c / sqrt(q q') in float64, to tell which pairs float32 cannot resolve."""
    w2, b2, d = float(w) ** 2, float(b) ** 2, x1.shape[1]
    c = w2 * x1 @ x2.T / d + b2
    q1 = w2 * (x1 * x1).sum(1) / d + b2
    q2 = w2 * (x2 * x2).sum(1) / d + b2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(c / np.sqrt(np.outer(q1, q2)))


def _rel_err(got, ref):
    return np.abs(got - ref) / np.maximum(np.abs(ref), 1e-300)


def test_fixture_grid_is_complete(fixture_file):
    keys = _cases()
    acts = {k.split("|")[2] for k in keys}
    depths = {int(k.split("|")[1]) for k in keys}
    assert acts == {"relu", "erf", "abs", "identity", "leaky_relu"}
    assert set(range(1, 6)) <= depths
    assert len(keys) == 1080


#: make test-fast compares the float64 ReLU family (abs and leaky ReLU share its compiled
#: kernels) and identity in both dtypes; make test compares every activation in both. Each new
#: activation or dtype costs ~12 s of compilation (54 networks).
def _acts(dtype):
    quick = {"float64": ("relu", "abs", "identity", "leaky_relu"), "float32": ("identity",)}
    return [
        pytest.param(a, marks=() if a in quick[dtype] else pytest.mark.slow)
        for a in ("relu", "erf", "abs", "identity", "leaky_relu")
    ]


@pytest.mark.parametrize("act", _acts("float64"))
def test_float64_matches_neural_tangents(fixture_file, act):
    x1, x2 = fixture_file["x1"], fixture_file["x2"]
    worst = 0.0
    for key in _cases():
        kind, depth, a, w, b, which = key.split("|")
        if a != act:
            continue
        got = _spec(depth, a, w, b).kernel(x1, None if which == "x1x1" else x2, kind, "float64")
        worst = max(worst, _rel_err(got, fixture_file[key]).max())
    assert worst <= 1e-6, f"{act}: max relative error {worst:.2e} against Neural Tangents"


@pytest.mark.parametrize("act", _acts("float32"))
def test_float32_matches_neural_tangents(fixture_file, act):
    """float32 within 1e-4 relative, except pairs whose input angle float32 cannot resolve.

    θ = arccos(cos θ) ≈ √(2(1 − cos θ)) near 1, so an O(ε) rounding of cos θ moves θ by O(√ε)
    ≈ 3e-4. Pairs with 1 − cos θ < 1e-5 at the input (here: a 1e-3-norm row against the zero
    row, both dominated by b²) are held to 1e-3 instead. Identical rows are exact (snapped).
    """
    x1, x2 = fixture_file["x1"], fixture_file["x2"]
    worst, worst_collinear = 0.0, 0.0
    for key in _cases():
        kind, depth, a, w, b, which = key.split("|")
        if a != act:
            continue
        other = x1 if which == "x1x1" else x2
        got = _spec(depth, a, w, b).kernel(x1, None if which == "x1x1" else x2, kind, "float32")
        err = _rel_err(got.astype(np.float64), fixture_file[key])
        cos = _input_cosines(x1, other, w, b)
        collinear = (1 - cos < 1e-5) & ~np.all(x1[:, None, :] == other[None, :, :], axis=2)
        worst = max(worst, err[~collinear].max())
        if collinear.any():
            worst_collinear = max(worst_collinear, err[collinear].max())
    assert worst <= 1e-4, f"{act}: max relative error {worst:.2e} (float32)"
    assert worst_collinear <= 1e-3, f"{act}: near-collinear pairs {worst_collinear:.2e}"
