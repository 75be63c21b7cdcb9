"""float32 stax (convolutional) kernels on inputs that cost the covariance form its digits.

Oracle: the same network in float64 (equal to Neural Tangents to 1e-8, tests/test_stax_oracle.py).
Families: raw digits (0-16), images far from the origin (100 + noise), clustered images (one image
+ 1e-3 noise: cos θ ≈ 1 - 1e-6) and raw-pixel-like 0-255 data. Before the kernels carried the pair
distance D (ntk_scale/kernels/network.py), the clustered NTK was off by 5.4e-5 (conv + Flatten),
1.9e-5 (conv + pools), 1.9e-5 (SmallConv) and 4.0e-6 (Myrtle-5) of the largest diagonal entry:
θ = arccos(c/√(v1 v2)) lost half its digits. Now every measured error is below 2e-6 (about 4u
per layer, u = 2⁻²⁴), and the test asserts both ntk_scale.kernels.precision.entry_bound and the
tighter L·32u·diag_max (L layers) that these measurements support.
"""

import numpy as np
import pytest

from ntk_scale.kernels import bind, stax
from ntk_scale.kernels.precision import entry_bound

U = 2.0**-24


def _families(n: int, hw: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    digits = load_digits().images[:n, :, :, None].astype(np.float64)
    digits = np.kron(digits, np.ones((1, hw // 8, hw // 8, 1)))
    one = rng.normal(size=(1, hw, hw, 1))
    return {
        "digits_raw": digits,
        "offset100": 100 + rng.normal(size=(n, hw, hw, 1)),
        "clustered": one + 1e-3 * rng.normal(size=(n, hw, hw, 1)),
        "pixels255": np.round(rng.uniform(0, 255, size=(n, hw, hw, 1))),
    }


def _conv(padding: str = "SAME", strides=(1, 1)) -> stax.Layer:
    return stax.Conv(8, (3, 3), strides, padding=padding, W_std=1.4, b_std=0.1)


NETS = {
    # diag layout: no pooling, SAME edges and a VALID layer
    "conv_flatten": stax.serial(
        _conv(), stax.Relu(), _conv("VALID"), stax.Relu(), stax.Flatten(), stax.Dense(1)
    ),  # fmt: skip
    # full layout: SAME edges, an unnormalised SAME pool (window sums differ at the edges),
    # a strided conv, Erf-free
    "conv_pools": stax.serial(
        _conv(),
        stax.Relu(),
        stax.AvgPool((3, 3), (1, 1), "SAME"),
        _conv(strides=(2, 2)),
        stax.LeakyRelu(0.1),
        stax.GlobalAvgPool(),
        stax.Dense(1),
    ),  # fmt: skip
    "smallconv": stax.SmallConv(),
}
FAMILIES = _families(5, 8)


def _layers(layer: stax.Layer) -> int:
    return 1 if not layer.layers else sum(_layers(c) for c in layer.layers)


def _check(layer: stax.Layer, x: np.ndarray, kind: str, x2: np.ndarray | None = None) -> float:
    net = bind(layer, x.shape[1:])
    exact = net.kernel(x, x2, kind=kind, dtype="float64")
    got = net.kernel(x, x2, kind=kind, dtype="float32").astype(np.float64)
    diag = net.diag(x if x2 is None else np.concatenate([x, x2]), kind=kind, dtype="float64")
    diag_max = float(np.max(diag))
    err = float(np.max(np.abs(got - exact)))
    assert err <= entry_bound(net, kind, diag_max)
    assert err <= _layers(layer) * 32 * U * diag_max, (err / diag_max, _layers(layer))
    return err / diag_max


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("net", list(NETS))
def test_float32_conv_matches_float64(net, family, kind):
    _check(NETS[net], FAMILIES[family], kind)


def test_float32_conv_cross_tile_clustered():
    """x1 != x2 (a rectangular tile, both self passes) on the hardest family."""
    x = FAMILIES["clustered"]
    _check(NETS["conv_pools"], x[:2], "ntk", x[2:])


def test_float32_myrtle5_clustered():
    """Myrtle-5 needs 32 x 32 images (five 2 x 2 pools); three clustered images."""
    x = _families(3, 32)["clustered"]
    _check(stax.Myrtle(5), x, "ntk")
