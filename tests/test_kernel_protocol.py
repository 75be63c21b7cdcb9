"""The kernel protocol's contract: the same checks on every kernel kind (ntk_scale.kernels.Kernel).

Each case is a kernel with Neural Tangents 0.6.5 fixtures (tests/fixtures/): its tile, diagonal
and panel product are checked against those float64 references (an independent oracle), then
against each other, and its JSON, fingerprint and input-shape contract are checked the same way
for a FullyConnected spec and for stax networks (dense and convolutional).
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from ntk_scale.kernels import (
    FullyConnected,
    Kernel,
    KernelCost,
    bind,
    check_spec,
    diag_blocks,
    spec_from_json,
)
from ntk_scale.kernels.products import panel_matmul_function
from ntk_scale.kernels.stax import layer_from_dict
from ntk_scale.plan import rows_in_block, split_blocks

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-8  # float64 against Neural Tangents' float64 (relative)


def _fc_case():
    with np.load(FIXTURES / "nt_fc_kernels.npz", allow_pickle=False) as f:
        x1, x2 = f["x1"], f["x2"]
        k12, k11 = f["ntk|2|relu|1.4|0.1|x1x2"], f["ntk|2|relu|1.4|0.1|x1x1"]
    spec = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)
    return spec, x1, x2, k12, k11


def _stax_case(name):
    with np.load(FIXTURES / "nt_stax_kernels.npz", allow_pickle=False) as f:
        layer = layer_from_dict(json.loads(str(f[f"{name}|spec"])))
        x1, x2 = f[f"{name}|x1"], f[f"{name}|x2"]
        k12, k11 = f[f"{name}|ntk|12"], f[f"{name}|ntk|11"]
    spec = bind(layer, x1.shape[1:])
    rows = lambda x: x.reshape(len(x), -1)  # noqa: E731 - inputs travel as (n, d) rows
    return spec, rows(x1), rows(x2), k12, k11


CASES = {
    "fully-connected": _fc_case,
    "stax-dense": lambda: _stax_case("dense_only_mixed"),
    "stax-conv": lambda: _stax_case("valid3_relu_flatten"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return CASES[request.param]()


def _rel(got, ref):
    return float(np.max(np.abs(np.asarray(got) - ref) / np.maximum(np.abs(ref), 1e-300)))


def test_is_a_kernel(case):
    spec = case[0]
    assert isinstance(spec, Kernel)
    check_spec(spec)  # accepted by every stage


def test_tile_matches_the_oracle_and_its_diagonal(case):
    spec, x1, x2, k12, k11 = case
    got = np.asarray(spec.tile_function("ntk", "float64")(x1, x2), dtype=np.float64)
    assert got.shape == k12.shape
    assert _rel(got, k12) < TOL
    sym = np.asarray(spec.tile_function("ntk", "float64", symmetric=True)(x1, x1))
    np.testing.assert_array_equal(sym, sym.T)
    assert _rel(sym, k11) < TOL
    diag = np.asarray(spec.diag_function("ntk", "float64")(x1))
    np.testing.assert_array_equal(diag, np.diag(sym))  # the exact formula on the diagonal
    assert _rel(spec.diag(x1, "ntk", "float64"), np.diag(k11)) < TOL
    # the full (non-symmetric) tile of x1 with itself agrees with the symmetric one
    full = np.asarray(spec.tile_function("ntk", "float64")(x1, x1))
    assert _rel(full, k11) < TOL


@pytest.mark.parametrize("block", [1, 3, 64])
def test_diagonal_in_blocks_matches_the_oracle(case, block):
    spec, x1, _, _, k11 = case
    got = diag_blocks(spec, x1, "ntk", "float64", block=block)
    assert got.dtype == np.float64 and got.shape == (len(x1),)
    assert _rel(got, np.diag(k11)) < TOL


@pytest.mark.parametrize("t", [2, 3])
def test_panel_product_is_tile_times_p(case, t):
    """Square K(X, X) @ P block by block (diagonal blocks i) and rectangular K(X*, X) @ P
    (i = -1), against the Neural Tangents matrices times P in float64."""
    spec, x1, x2, k12, k11 = case
    n, c = len(x1), 3
    P = np.random.default_rng(1).standard_normal((n, c))
    xs, ps = split_blocks(x1, t, "float64"), split_blocks(P, t, np.float64)
    with jax.enable_x64(True):
        panel = panel_matmul_function(spec, "ntk", "float64", n_rows=n)
        square = [
            np.asarray(panel(xs[i], i, xs, ps))[: rows_in_block(n, t, i)] for i in range(len(xs))
        ]
        rect = []
        for r0 in range(0, len(x2), t):
            part = x2[r0 : r0 + t]
            got = np.asarray(panel(spec.pad_block(part, t), -1, xs, ps))
            rect.append(got[: len(part)])
    np.testing.assert_allclose(
        np.concatenate(square), k11 @ P, rtol=0, atol=TOL * np.abs(k11).max()
    )
    np.testing.assert_allclose(
        np.concatenate(rect), k12.T @ P, rtol=0, atol=TOL * np.abs(k12).max()
    )


def test_self_pass_changes_nothing(case):
    spec, x1, x2, k12, _ = case
    before = np.asarray(spec.tile_function("ntk", "float64")(x1, x2))
    stats = spec.self_stats(x1, "ntk", "float64")  # None where the kernel needs none
    if isinstance(spec, FullyConnected):
        assert stats is None
    after = np.asarray(spec.tile_function("ntk", "float64")(x1, x2))
    np.testing.assert_array_equal(before, after)
    assert _rel(after, k12) < TOL


def test_pad_block_crops_to_the_same_values(case):
    spec, x1, x2, _, _ = case
    padded = spec.pad_block(x1, len(x1) + 5)
    assert len(padded) == (len(x1) + 5 if spec.fixed_shape else len(x1))
    np.testing.assert_array_equal(padded[: len(x1)], x1)
    fn = spec.tile_function("ntk", "float64")
    got = np.asarray(fn(padded, x2))[: len(x1)]
    np.testing.assert_allclose(got, np.asarray(fn(x1, x2)), rtol=1e-12, atol=0)


def test_json_round_trip_and_fingerprint(case):
    spec = case[0]
    text = spec.to_json()
    assert json.loads(text) == spec.to_dict()
    again = spec_from_json(text)
    assert again == spec and again.to_json() == text
    assert again.fingerprint() == spec.fingerprint()
    fp = spec.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    # rebuilt from scratch (a new object, a new process's view) it is the same key
    rebuilt = CASES[_name(spec)]()[0]
    assert rebuilt is not spec and rebuilt.fingerprint() == fp


def test_fingerprint_changes_with_a_hyperparameter(case):
    spec = case[0]
    d = spec.to_dict()
    text = json.dumps(d)
    changed = spec_from_json(text.replace('"W_std": 1.', '"W_std": 2.', 1))
    assert changed != spec and changed.fingerprint() != spec.fingerprint()


def test_shape_contract(case):
    spec, x1, _, _, _ = case
    d = x1.shape[1]
    assert spec.d in (None, d)
    spec.check_input((d,), "x")  # feature rows of the right width always fit
    rows = spec.rows(x1)
    assert len(rows) == len(x1)
    with pytest.raises(ValueError, match="x_star"):
        spec.check_input((d + 1,) if spec.d else (2, 2, d), "x_star")
    with pytest.raises(ValueError):
        spec.rows(x1[0])  # one sample without its leading axis
    bad = x1.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        spec.rows(bad)
    with pytest.raises(ValueError):
        diag_blocks(spec, np.ones((3, d + 1)) if spec.d else np.ones(3), "ntk", "float64")


def test_cost_and_chunking(case):
    spec, x1, _, _, _ = case
    d, t = x1.shape[1], 64
    cost = spec.cost(d, "ntk", "float32", t)
    assert isinstance(cost, KernelCost)
    assert cost.flops_per_entry > 0 and cost.memory_bytes > 0
    c1, c2 = spec.tile_chunk("ntk", "float32", t, t)
    assert 1 <= c1 <= t and 1 <= c2 <= t
    assert cost.chunk_pairs in (None, (c1, c2))
    if cost.chunk_pairs is None:
        assert (c1, c2) == (t, t)  # computed whole


def test_tile_seconds(case):
    spec, x1, x2, _, _ = case
    t = min(len(x1), len(x2))
    a, b = (np.asarray(x[:t], dtype="float32") for x in (x1, x2))
    off, diagonal = spec.tile_seconds("ntk", "float32", a, b)
    assert off > 0 and diagonal > 0


def _name(spec):
    for name, make in CASES.items():
        if make()[0] == spec:
            return name
    raise AssertionError(spec)


def _nngp_fixtures(name):
    """NT's NNGP tiles (x1, x2) and (x1, x1) of each case."""
    if name == "fully-connected":
        with np.load(FIXTURES / "nt_fc_kernels.npz", allow_pickle=False) as f:
            return f["nngp|2|relu|1.4|0.1|x1x2"], f["nngp|2|relu|1.4|0.1|x1x1"]
    key = {"stax-dense": "dense_only_mixed", "stax-conv": "valid3_relu_flatten"}[name]
    with np.load(FIXTURES / "nt_stax_kernels.npz", allow_pickle=False) as f:
        return f[f"{key}|nngp|12"], f[f"{key}|nngp|11"]


@pytest.mark.parametrize("name", list(CASES))
def test_pair_tile_is_both_kinds(name):
    """pair_tile_function (the "ntk" posterior's one pass for two stores) gives NT's NNGP and
    NTK tiles, and exactly what each kind's own tile function gives (float64 and float32)."""
    spec, x1, x2, k12, k11 = CASES[name]()
    n12, n11 = _nngp_fixtures(name)
    nngp, ntk = spec.pair_tile_function("float64")(x1, x2)
    assert _rel(nngp, n12) < TOL and _rel(ntk, k12) < TOL
    s_nngp, s_ntk = spec.pair_tile_function("float64", symmetric=True)(x1, x1)
    np.testing.assert_array_equal(s_nngp, s_nngp.T)
    np.testing.assert_array_equal(s_ntk, s_ntk.T)
    assert _rel(s_nngp, n11) < TOL and _rel(s_ntk, k11) < TOL
    for dtype in ("float64", "float32"):
        for sym, b in ((False, x2), (True, x1)):
            pair = spec.pair_tile_function(dtype, symmetric=sym)(x1, b)
            for kind, got in zip(("nngp", "ntk"), pair, strict=True):
                alone = np.asarray(spec.tile_function(kind, dtype, symmetric=sym)(x1, b))
                assert got.dtype == np.dtype(dtype)
                np.testing.assert_allclose(got, alone, rtol=4 * np.finfo(dtype).eps, atol=0)
