"""The tile arithmetic of convolutional kernels: pure JAX maps on pair tensors.

The tensors hold the pair distance D = E(z1 − z2)² (the network's interpreter carries D, not
the covariance; see :mod:`ntk_scale.kernels.network`), or Θ; the linear maps are the same for
either, except a SAME convolution's zero-padded frame and pooling's self terms, which D needs.
Two layouts hold the tensor of a chunk of c1 x c2 pairs of images:

- ``full``: (c1, H, W, c2, H, W), entry [a, h1, w1, b, h2, w2] = cov(z_a(h1, w1), z_b(h2, w2)).
  Needed by pooling and global average pooling, which mix positions.
- ``diag``: (c1, c2, H, W), the same-position entries only. Exact for a network whose layers
  before its Flatten readout are convolutions, dense layers and activations: a convolution
  maps same-position entries to same-position entries, so O(HW) per pair suffices.

A dense state (after a readout, or a dense-only network) is (c1, c2). Every map here is linear
in the tensor except the activations, which also take the per-position variances of each side,
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

# Axes of the two positions of each spatial dimension, per layout: ((h1, h2), (w1, w2)).
FULL_AXES = ((1, 4), (2, 5))
DIAG_AXES = ((2,), (3,))
_MAP_AXES = ((1,), (2,))  # a per-position map (c, H, W)


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


def conv(t: jax.Array, layout: str, hw: tuple[int, int], filt: tuple[int, int],
         strides: tuple[int, int], padding: str, edges: tuple[jax.Array, jax.Array] | None = None,
         ) -> tuple[jax.Array, tuple[int, int]]:  # fmt: skip
    """A shared-weight convolution's covariance map, divided by the filter size.

    out[i1, j1, i2, j2] = Σ_ab t[s·i1 + a, s·j1 + b, s·i2 + a, s·j2 + b] / (fh·fw) over the
    zero- (or periodically) padded input: the filter moves both positions of a pair together.
    edges: the per-position variances (v1, v2) of a pair distance tensor in the full layout,
    whose zero-padded frame is not zero (:func:`_edge_fill`).
    The input is padded once (one pass) and all taps are summed in one more pass, which
    measured 2.5x faster on CPU than one pass per spatial dimension, and 4x faster than
    zero-filled taps without the padded copy (XLA then bounds-checks every element). Returns
    (the map, the output positions)."""
    axes = FULL_AXES if layout == "full" else DIAG_AXES
    ps = [pads(n, f, s, padding) for n, f, s in zip(hw, filt, strides, strict=True)]
    tp = pad_layout(t, axes, ps)
    if edges is not None and layout == "full" and not ps[0].wrap and tp.shape != t.shape:
        tp = tp + _edge_fill(edges[0], edges[1], ps)
    acc = tap_sum(tp, axes, filt, strides, ps)
    return acc / (filt[0] * filt[1]), (ps[0].out, ps[1].out)


def _edge_fill(v1: jax.Array, v2: jax.Array, ps: list[Padded]) -> jax.Array:
    """What a pair distance tensor holds on the zero-padded frame of the full layout: z(p) = 0
    outside the image, so v1[p1] where only p1 is inside, v2[p2] where only p2 is, 0 where both
    are outside: v1 ⊗ out + out ⊗ v2 with v zero-padded. Added to the padded tensor in the
    pad's own pass (the same terms added after the tap sum ran 3x slower: XLA then fused the
    tap sums of the broadcasts into the activation)."""
    out = 1.0 - pad_layout(jnp.ones((1,) + v1.shape[1:], v1.dtype), _MAP_AXES, ps)[0]
    v1p, v2p = pad_layout(v1, _MAP_AXES, ps), pad_layout(v2, _MAP_AXES, ps)
    return (v1p[:, :, :, None, None, None] * out[None, None, None, None]
            + out[None, :, :, None, None, None] * v2p[None, None, None])  # fmt: skip


def pad_layout(t: jax.Array, axes: tuple, ps: list[Padded]) -> jax.Array:
    """t padded on every position axis of ``axes`` (zeros, or periodically for CIRCULAR)."""
    widths = [(0, 0)] * t.ndim
    for dim_axes, p in zip(axes, ps, strict=True):
        for ax in dim_axes:
            widths[ax] = (p.lo, p.hi)
    if ps[0].wrap:
        return jnp.pad(t, widths, mode="wrap")
    return jax.lax.pad(t, jnp.zeros((), t.dtype), [(lo, hi, 0) for lo, hi in widths])


def tap_sum(tp: jax.Array, axes: tuple, filt: tuple[int, int], strides: tuple[int, int],
            ps: list[Padded]) -> jax.Array:  # fmt: skip
    """Σ over the filter's taps of the padded tensor, both positions of a pair moved together."""
    acc = None
    for a in range(filt[0]):
        for b in range(filt[1]):
            start, limit, step = [0] * tp.ndim, list(tp.shape), [1] * tp.ndim
            for dim, k in enumerate((a, b)):
                for ax in axes[dim]:
                    start[ax] = k
                    limit[ax] = k + strides[dim] * (ps[dim].out - 1) + 1
                    step[ax] = strides[dim]
            tap = jax.lax.slice(tp, start, limit, step)
            acc = tap if acc is None else acc + tap
    return acc


def conv_map(v: jax.Array, hw: tuple[int, int], filt: tuple[int, int],
             strides: tuple[int, int], padding: str) -> jax.Array:  # fmt: skip
    """A convolution's map of per-position variances v (c, H, W) -> (c, Ho, Wo), divided by
    the filter size (the same-position entries of :func:`conv`)."""
    return conv(v[:, None], "diag", hw, filt, strides, padding)[0][:, 0]


def pool_map(v: jax.Array, hw: tuple[int, int], window: tuple[int, int],
             strides: tuple[int, int], padding: str,
             normalize_edges: bool) -> jax.Array:  # fmt: skip
    """Σ_i w_i v[p_i] over each window of one image's map v (c, H, W) -> (c, Ho, Wo)."""
    for dim, ax in enumerate((1, 2)):
        v = pool_axis(v, ax, hw[dim], window[dim], strides[dim], padding, normalize_edges)[0]
    return v


def pool_weights_vary(hw: tuple[int, int], window: tuple[int, int], strides: tuple[int, int],
                      padding: str, normalize_edges: bool) -> bool:  # fmt: skip
    """Whether the window weights' sums s_P differ between output positions (SAME zero padding
    without ``normalize_edges``)."""
    if padding != "SAME" or normalize_edges:
        return False
    return any(pads(n, f, s, padding)[:2] != (0, 0)
               for n, f, s in zip(hw, window, strides, strict=True))  # fmt: skip


def avg_pool(t: jax.Array, hw: tuple[int, int], window: tuple[int, int],
             strides: tuple[int, int], padding: str, normalize_edges: bool,
             ) -> tuple[jax.Array, tuple[int, int]]:  # fmt: skip
    """AvgPool's covariance map (full layout): each image is pooled on its own, so the window
    runs over each of the four position axes independently."""
    if (
        padding == "VALID"
        and window == strides
        and all(n % w == 0 for n, w in zip(hw, window, strict=True))
    ):
        # Non-overlapping windows tiling the image (Myrtle's pools): one contiguous reduction
        # over a reshape, where strided slices measured 2-3x slower inside a segment.
        (h, w), (fh, fw) = hw, window
        c1, c2 = t.shape[0], t.shape[3]
        t = t.reshape(c1, h // fh, fh, w // fw, fw, c2, h // fh, fh, w // fw, fw)
        return t.sum(axis=(2, 4, 7, 9)) / (fh * fw) ** 2, (h // fh, w // fw)
    out = list(hw)
    for dim, (a1, a2) in enumerate(FULL_AXES):
        for ax in (a1, a2):
            t, out[dim] = pool_axis(t, ax, hw[dim], window[dim], strides[dim], padding,
                                    normalize_edges)  # fmt: skip
    return t, (out[0], out[1])


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
    return v1[:, None] * v2[None, :]  # diag (c1, c2, H, W) and dense (c1, c2)


# -- activations ----------------------------------------------------------------------------------
# asin(x) / x as a polynomial in t = 4x² - 1 for x in [0, 1/√2] (chebinterpolate, then
# cheb2poly; analytic for |t| < 3, so the monomial form is well conditioned). Max error of
# x·P: 1e-14 (float64, degree 16), 1.5e-8 (float32, degree 7).
_ASIN_F64 = (
    1.0471975511965965, 0.05375149359131808, 0.00779890223915337, 0.001519668540045634,
    0.0003408637192756529, 8.30231715418127e-05, 2.134558883950597e-05, 5.701823716390681e-06,
    1.5668094070944513e-06, 4.4006289088400063e-07, 1.2618980313475825e-07,
    3.6744134989488594e-08, 1.0288329124797182e-08, 2.908314741885917e-09,
    1.1958941951481268e-09, 4.278321358133533e-10, 4.2485231523001796e-11,
)  # fmt: skip
_ASIN_F32 = (
    1.0471975367315989, 0.05375148950585337, 0.007799363945653991, 0.0015197989332157436,
    0.00033858676816289623, 8.238040211328013e-05, 2.486407566282267e-05, 6.693968700233199e-06,
)  # fmt: skip


def estrin(coeffs: tuple[float, ...], t: jax.Array) -> jax.Array:
    """Σ coeffs[k]·t^k by Estrin's scheme: pairs, then pairs of pairs with t², t⁴, ...

    The dependency chain is log2(degree) deep instead of Horner's degree."""
    terms = [coeffs[k] + coeffs[k + 1] * t if k + 1 < len(coeffs) else coeffs[k] + 0.0 * t
             for k in range(0, len(coeffs), 2)]  # fmt: skip
    power = t * t
    while len(terms) > 1:
        terms = [terms[k] + terms[k + 1] * power if k + 1 < len(terms) else terms[k]
                 for k in range(0, len(terms), 2)]  # fmt: skip
        power = power * power
    return terms[0]


# -- activations on pair distances ------------------------------------------------------------
# The tensors carry D = E(z1 - z2)² (and Θ), not the covariance: 1 - cos θ comes from D without
# the cancellation of v1·v2 - c², which costs θ half its digits when cos θ ≈ 1.
def outer_sum(v1: jax.Array, v2: jax.Array, layout: str) -> jax.Array:
    """v1 (c1, *S), v2 (c2, *S) -> v1 + v2 broadcast to the layout's tensor shape."""
    if layout == "full":
        return v1[:, :, :, None, None, None] + v2[None, None, None, :, :, :]
    return v1[:, None] + v2[None, :]


def _angles(dist: jax.Array, v1: jax.Array, v2: jax.Array, layout: str):
    """(D as a matrix or its own shape, √(v1 v2), (√v1 − √v2)², δ = 1 − cos θ, θ).

    δ = (D − (√v1 − √v2)²) / (2√(v1 v2)), and θ = 2·asin(√(δ/2)) (or π − 2·asin(√(1 − δ/2))
    for δ > 1) from the one polynomial on [0, 1/√2]: θ keeps its relative accuracy as θ → 0."""
    r1, r2 = jnp.sqrt(v1), jnp.sqrt(v2)
    q1 = jnp.where(v1 > 0, 1.0 / jnp.where(v1 > 0, r1, 1.0), 0.0)
    q2 = jnp.where(v2 > 0, 1.0 / jnp.where(v2 > 0, r2, 1.0), 0.0)
    if layout == "full":
        m = dist.reshape(v1.size, v2.size)
        r1, r2, q1, q2 = (a.reshape(-1) for a in (r1, r2, q1, q2))
        rr, gap, inv = (
            r1[:, None] * r2[None, :],
            r1[:, None] - r2[None, :],
            q1[:, None] * q2[None, :],
        )
    else:
        m, rr, inv = dist, outer(r1, r2, layout), outer(q1, q2, layout)
        gap = (r1[:, None] - r2[None, :]) if layout != "full" else None
    gap2 = gap * gap
    delta = jnp.clip((m - gap2) * inv * 0.5, 0.0, 2.0)
    h = 0.5 * jnp.minimum(delta, 2.0 - delta)
    u = jnp.sqrt(h)
    asin_u = u * estrin(_ASIN_F32 if m.dtype == jnp.float32 else _ASIN_F64, 4.0 * h - 1.0)
    theta = jnp.where(delta <= 1.0, 2.0 * asin_u, math.pi - 2.0 * asin_u)
    return m, rr, gap2, delta, theta


def abrelu_dist(dist: jax.Array, v1: jax.Array, v2: jax.Array, layout: str, a: float,
                b: float) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """ABRelu(a, b) on pair distances -> (D after the activation, ṡ).

    With δ = 1 − cos θ: √(s11 s22) − s12 = √(v1 v2)·[ab·δ + (b−a)²/(2π)·((π−θ)δ + θ − sin θ)]
    (both terms ≥ 0), and D' = (a²+b²)/2·(√v1 − √v2)² + 2(√(s11 s22) − s12)."""
    shape = dist.shape
    m, rr, gap2, delta, theta = _angles(dist, v1, v2, layout)
    sin = jnp.sqrt(delta * (2.0 - delta))
    f = (b - a) ** 2 / (2 * math.pi)
    excess = a * b * delta + f * ((math.pi - theta) * delta + jnp.maximum(theta - sin, 0.0))
    out = (a * a + b * b) / 2 * gap2 + 2.0 * rr * excess
    sdot = (a * a + b * b) / 2 - f * theta
    return jnp.maximum(out, 0.0).reshape(shape), sdot.reshape(shape)


def erf_dist(dist: jax.Array, v1: jax.Array, v2: jax.Array, layout: str, a: float, b: float,
             c: float) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """Erf(a, b, c) = a·erf(b·x) + c on pair distances -> (D after the activation, ṡ).

    (1 + 2b²v1)(1 + 2b²v2) − 4b⁴c12² = 1 + 2b²(v1 + v2) + 4b⁴v1v2·δ(2 − δ) without
    cancellation; D' = s11 + s22 − 2 s12 (c cancels)."""
    shape = dist.shape
    m, rr, gap2, delta, _ = _angles(dist, v1, v2, layout)
    b2 = b * b
    if layout == "full":
        w1, w2 = v1.reshape(-1)[:, None], v2.reshape(-1)[None, :]
    else:
        w1, w2 = v1[:, None], v2[None, :]
    cov = (w1 + w2 - m) * 0.5
    root = jnp.sqrt(1.0 + 2 * b2 * (w1 + w2) + 4 * b2 * b2 * rr * rr * delta * (2.0 - delta))
    s12 = jnp.arctan2(2 * b2 * cov, root)
    s1 = jnp.arcsin(2 * b2 * w1 / (1 + 2 * b2 * w1))
    s2 = jnp.arcsin(2 * b2 * w2 / (1 + 2 * b2 * w2))
    out = a * a * (2 / math.pi) * (s1 + s2 - 2 * s12)
    sdot = a * a * b2 * (4 / math.pi) / root
    return jnp.maximum(out, 0.0).reshape(shape), sdot.reshape(shape)


def erf_variance(v: jax.Array, a: float, b: float, c: float) -> jax.Array:
    """The variance after Erf(a, b, c): a²·(2/π)·asin(2b²v / (1 + 2b²v)) + c²."""
    return a * a * (2 / math.pi) * jnp.arcsin(2 * b * b * v / (1 + 2 * b * b * v)) + c * c
