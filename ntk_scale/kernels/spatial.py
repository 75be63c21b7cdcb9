"""The tile arithmetic of convolutional kernels: pure JAX maps on covariance tensors.

Two layouts hold the covariance of a chunk of c1 x c2 pairs of images:

- ``full``: (c1, H, W, c2, H, W), entry [a, h1, w1, b, h2, w2] = cov(z_a(h1, w1), z_b(h2, w2)).
  Needed by pooling and global average pooling, which mix positions.
- ``diag``: (c1, c2, H, W), the same-position entries only. Exact for a network whose layers
  before its Flatten readout are convolutions, dense layers and activations: a convolution
  maps same-position entries to same-position entries, so O(HW) per pair suffices.

A dense state (after a readout, or a dense-only network) is (c1, c2). Every map here is linear
in the tensor except the activations, which take the per-position variances of each side,
``v1`` (c1, H, W) and ``v2`` (c2, H, W) ((c1,) and (c2,) for a dense state).

Conventions follow Neural Tangents' NTK parameterization exactly: a convolution divides by
the full filter size even where the filter overlaps zero padding; CIRCULAR pads periodically
with the SAME amounts; AvgPool divides by the window size (or, with ``normalize_edges`` and
SAME padding, by the number of real pixels in each window).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_SNAP_F32 = 8 * float(jnp.finfo(jnp.float32).eps)
_HIGHEST = jax.lax.Precision.HIGHEST

# Axes of the two positions of each spatial dimension, per layout: ((h1, h2), (w1, w2)).
FULL_AXES = ((1, 4), (2, 5))
DIAG_AXES = ((2,), (3,))


class Padded(NamedTuple):
    """One spatial dimension of a conv or pool: pads (lo, hi), output size, periodic or zero."""

    lo: int
    hi: int
    out: int
    wrap: bool


def pads(size: int, window: int, stride: int, padding: str) -> Padded:
    """lax's padding of one dimension ('VALID', 'SAME'; 'CIRCULAR' pads like SAME, periodically).

    Raises ValueError when a VALID window does not fit the input."""
    if padding == "VALID":
        if window > size:
            raise ValueError(
                f"a window of {window} does not fit an input of size {size} with padding='VALID';"
                " use padding='SAME' or a smaller filter / window"
            )
        return Padded(0, 0, (size - window) // stride + 1, False)
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return Padded(total // 2, total - total // 2, out, padding == "CIRCULAR")


def _pad(t: jax.Array, axes: tuple[int, ...], p: Padded) -> jax.Array:
    if p.lo == 0 and p.hi == 0:
        return t
    widths = [(0, 0)] * t.ndim
    for a in axes:
        widths[a] = (p.lo, p.hi)
    return jnp.pad(t, widths, mode="wrap" if p.wrap else "constant")


def _window_slice(t: jax.Array, axes: tuple[int, ...], offsets: tuple[int, ...], stride: int,
                  out: int) -> jax.Array:  # fmt: skip
    start, limit, step = [0] * t.ndim, list(t.shape), [1] * t.ndim
    for a, k in zip(axes, offsets, strict=True):
        start[a], limit[a], step[a] = k, k + stride * (out - 1) + 1, stride
    return jax.lax.slice(t, start, limit, step)


def conv_axis(t: jax.Array, axes: tuple[int, ...], size: int, f: int, s: int, padding: str):
    """Σ_k t[s·i + k - lo, ...] over the filter taps k, shifted jointly on all ``axes``.

    For the full layout ``axes`` are the two positions (h1, h2) of one dimension: a shared
    filter moves both. Returns (the unnormalised sum, the output size)."""
    p = pads(size, f, s, padding)
    tp = _pad(t, axes, p)
    acc = _window_slice(tp, axes, (0,) * len(axes), s, p.out)
    for k in range(1, f):
        acc = acc + _window_slice(tp, axes, (k,) * len(axes), s, p.out)
    return acc, p.out


def pool_axis(t: jax.Array, axis: int, size: int, f: int, s: int, padding: str,
              normalize_edges: bool) -> tuple[jax.Array, int]:  # fmt: skip
    """The mean over a window of one position axis (each image pooled on its own).

    Divides by the window size, or with ``normalize_edges`` and SAME padding by the number of
    real (unpadded) positions in each window, as Neural Tangents' AvgPool."""
    p = pads(size, f, s, padding)
    tp = _pad(t, (axis,), p)
    acc = sum(_window_slice(tp, (axis,), (k,), s, p.out) for k in range(f))
    if normalize_edges and padding == "SAME" and (p.lo or p.hi):
        starts = [s * i - p.lo for i in range(p.out)]
        counts = [min(st + f, size) - max(st, 0) for st in starts]
        shape = [1] * t.ndim
        shape[axis] = p.out
        return acc / jnp.asarray(counts, dtype=t.dtype).reshape(shape), p.out
    return acc / f, p.out


def same_position(t: jax.Array) -> jax.Array:
    """(c1, H, W, c2, H, W) -> (c1, c2, H, W): the entries at equal positions."""
    return jnp.einsum("ahwbhw->abhw", t)


def flatten(t: jax.Array, layout: str) -> jax.Array:
    """The Flatten readout: the mean over same-position entries -> (c1, c2)."""
    d = same_position(t) if layout == "full" else t
    return jnp.mean(d, axis=(2, 3))


def global_mean(t: jax.Array) -> jax.Array:
    """The GlobalAvgPool readout of a full tensor: the mean over all position pairs."""
    return jnp.mean(t, axis=(1, 2, 4, 5))


def outer(v1: jax.Array, v2: jax.Array, layout: str) -> jax.Array:
    """v1 (c1, *S), v2 (c2, *S) -> the product broadcast to the layout's tensor shape."""
    if layout == "full":
        return v1[:, :, :, None, None, None] * v2[None, None, None, :, :, :]
    if layout == "diag":
        return v1[:, None] * v2[None, :]
    return v1[:, None] * v2[None, :]


def self_variance(t: jax.Array, layout: str) -> jax.Array:
    """The variance map of a self-covariance (one image paired with itself): (1, *S) -> (1, *S)
    per-position variances, taken from the tensor's same-position entries."""
    if layout == "full":
        return same_position(t)[:, 0]
    return t[:, 0]


# -- activations ----------------------------------------------------------------------------------
def _acos_f32(cos: jax.Array) -> jax.Array:
    from ntk_scale.kernels.fc import _pi_minus_theta

    return math.pi - _pi_minus_theta(cos)


def abrelu(c: jax.Array, prod: jax.Array, a: float, b: float):
    """Neural Tangents' ABRelu(a, b) on covariances c with prod = v1·v2 -> (s, ṡ).

    float64 follows Neural Tangents' formula (θ = atan2(√(prod − c²), c): exactly 0 for a
    position paired with itself); float32 uses the polynomial arccos and snaps cos θ ≈ 1."""
    f = (a - b) ** 2 / (2 * math.pi)
    if c.dtype == jnp.float32:
        safe = jnp.where(prod > 0, prod, 1.0)
        r = jnp.where(prod > 0, jax.lax.rsqrt(safe), 0.0)
        cos = jnp.clip(c * r, -1.0, 1.0)
        cos = jnp.where(cos > 1.0 - _SNAP_F32, 1.0, cos)
        theta = jnp.where(prod > 0, _acos_f32(cos), math.pi / 2)
        root = jnp.sqrt(jnp.maximum(prod, 0.0)) * jnp.sqrt(jnp.maximum(1.0 - cos * cos, 0.0))
    else:
        root = jnp.sqrt(jnp.maximum(prod - c * c, 0.0))
        zero = (root == 0) & (c == 0)
        theta = jnp.where(zero, math.pi / 2, jnp.arctan2(root, jnp.where(zero, 1.0, c)))
    sdot = (a * a + b * b) / 2 - f * theta
    return f * root + sdot * c, sdot


def erf(c: jax.Array, prod: jax.Array, a: float, b: float, cc: float):
    """Neural Tangents' Erf(a, b, c): a·erf(b·x) + c, with prod = (1 + 2b²v1)(1 + 2b²v2).

    c must already be scaled by b². Returns (s, ṡ) before the a² (and c²) output scaling."""
    root = jnp.sqrt(jnp.maximum(prod - 4 * c * c, 0.0))
    s = (2 / math.pi) * jnp.arctan2(2 * c, root)
    sdot = (4 / math.pi) / jnp.where(root > 0, root, jnp.finfo(c.dtype).tiny)
    return s, sdot
