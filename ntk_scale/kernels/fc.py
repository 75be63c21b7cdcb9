"""Fully-connected NTK / NNGP recursions in JAX (pure functions, no I/O, no Ray).

The recursion follows Neural Tangents' NTK parameterization (see ``shared/REFERENCES.md``):

    c = W² x·x'/d + b²,  q = W² |x|²/d + b²,  Θ = c
    for each hidden layer:  Θ ← Θ ṡ;  c ← W² s + b²;  q ← W² s(q, q) + b²;  Θ ← W² Θ + c

Per-row quantities (the ``q`` chain and ``1/√q``) are computed once per row block in
:func:`row_stats`; the per-entry work is a single fused elementwise chain after one matmul.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_SNAP_F32 = 8 * float(jnp.finfo(jnp.float32).eps)
_TWO_PI = 2.0 * math.pi

# Abramowitz & Stegun 4.4.46: acos(x) = sqrt(1 - x) * P(x) on [0, 1], |error| <= 2e-8.
# Cheaper than XLA's atan2-based acos and exact to float32 rounding; used for float32 tiles only.
_ACOS_COEFFS = (
    -0.0012624911,
    0.0066700901,
    -0.0170881256,
    0.0308918810,
    -0.0501743046,
    0.0889789874,
    -0.2145988016,
    1.5707963050,
)


class FCParams(NamedTuple):
    """Hyper-parameters of a fully-connected kernel.

    ``depth`` and ``act`` ("abrelu" for relu / abs / leaky_relu, "erf", "identity") are static
    (they shape the computation); ``a``, ``b`` (ABReLU slopes), ``w_var`` and ``b_var`` are traced
    scalars, so one compiled tile function serves every W_std, b_std and slope.
    """

    depth: int
    act: str
    a: Any
    b: Any
    w_var: Any
    b_var: Any

    def split(self) -> tuple[tuple[int, str], tuple[Any, Any, Any, Any]]:
        """(static part, traced part) for jit."""
        return (self.depth, self.act), (self.a, self.b, self.w_var, self.b_var)

    @classmethod
    def join(cls, static: tuple[int, str], traced: tuple[Any, Any, Any, Any]) -> FCParams:
        return cls(*static, *traced)


def _pi_minus_theta(cos: jax.Array) -> jax.Array:
    """π − arccos(cos) for cos in [-1, 1]; polynomial in float32, exact arccos otherwise."""
    if cos.dtype != jnp.float32:
        return math.pi - jnp.arccos(cos)
    ax = jnp.abs(cos)
    poly = jnp.full_like(ax, _ACOS_COEFFS[0])
    for coeff in _ACOS_COEFFS[1:]:
        poly = poly * ax + coeff
    acos_abs = jnp.sqrt(1.0 - ax) * poly
    return jnp.where(cos < 0, acos_abs, math.pi - acos_abs)


def _inv_sqrt(q: jax.Array) -> jax.Array:
    """1/√q, and 0 where q == 0 (a zero-norm row with b_std = 0 has cos θ := 0, not NaN)."""
    safe = jnp.where(q > 0, q, 1.0)
    return jnp.where(q > 0, jax.lax.rsqrt(safe), 0.0)


def _diag_step(p: FCParams, q: jax.Array) -> jax.Array:
    """s(q, q, q): the activation's second moment on the diagonal."""
    if p.act == "abrelu":
        return 0.5 * (p.a**2 + p.b**2) * q
    if p.act == "erf":
        return (2.0 / math.pi) * jnp.arcsin(2.0 * q / (1.0 + 2.0 * q))
    return q


def row_stats(p: FCParams, x: jax.Array) -> jax.Array:
    """Per-row variances before each hidden activation.

    x: (n, d) -> (depth + 1, n): q[l] is the variance entering layer l's activation (q[depth] is
    the readout's input variance, kept for the diagonal).
    """
    d = x.shape[1]
    q = p.w_var * jnp.sum(x * x, axis=1) / d + p.b_var
    qs = [q]
    for _ in range(p.depth):
        q = p.w_var * _diag_step(p, q) + p.b_var
        qs.append(q)
    return jnp.stack(qs)


def _abrelu_step(p: FCParams, c, r1, r2, q1s, q2s):
    cos = jnp.clip(c * r1[:, None] * r2[None, :], -1.0, 1.0)
    if cos.dtype == jnp.float32:
        # θ = √(2(1 − cos θ)) near cos θ = 1, so a rounding error of a few ulps in cos θ becomes
        # θ ≈ 5e-4 for identical rows (1e-3 relative error after five layers). Within that
        # noise a cosine is indistinguishable from 1: snap it, so that repeated rows are exact.
        cos = jnp.where(cos > 1.0 - _SNAP_F32, 1.0, cos)
    sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, 0.0))
    pmt = _pi_minus_theta(cos)
    scale = (p.b - p.a) ** 2 / _TWO_PI
    j = (q1s[:, None] * q2s[None, :]) * (sin + pmt * cos)
    s = p.a * p.b * c + scale * j
    sdot = p.a * p.b + scale * pmt
    return s, sdot


def _erf_step(c, q1, q2):
    g1, g2 = 1.0 + 2.0 * q1, 1.0 + 2.0 * q2
    prod = g1[:, None] * g2[None, :]
    ratio = jnp.clip(2.0 * c * jax.lax.rsqrt(prod), -1.0, 1.0)
    s = (2.0 / math.pi) * jnp.arcsin(ratio)
    sdot = (4.0 / math.pi) * jax.lax.rsqrt(jnp.maximum(prod - 4.0 * c * c, jnp.finfo(c.dtype).tiny))
    return s, sdot


def _layer(p: FCParams, c, theta, q1, q2, compute_ntk: bool):
    if p.act == "abrelu":
        s, sdot = _abrelu_step(p, c, _inv_sqrt(q1), _inv_sqrt(q2), jnp.sqrt(q1), jnp.sqrt(q2))
    elif p.act == "erf":
        s, sdot = _erf_step(c, q1, q2)
    else:
        s, sdot = c, 1.0
    c_new = p.w_var * s + p.b_var
    theta_new = p.w_var * theta * sdot + c_new if compute_ntk else None
    return c_new, theta_new


def fc_tile(p: FCParams, x1: jax.Array, x2: jax.Array, kind: str) -> jax.Array:
    """One kernel tile. x1: (n1, d), x2: (n2, d) -> (n1, n2), dtype of the inputs.

    kind: "ntk" or "nngp". Rows need not be distinct; cosines are clipped to [-1, 1].
    """
    d = x1.shape[1]
    qs1, qs2 = row_stats(p, x1), row_stats(p, x2)
    c = p.w_var * jnp.dot(x1, x2.T, precision=_HIGHEST) / d + p.b_var
    compute_ntk = kind == "ntk"
    theta = c
    for layer in range(p.depth):
        c, theta_next = _layer(p, c, theta, qs1[layer], qs2[layer], compute_ntk)
        theta = theta_next if compute_ntk else c
    return theta if compute_ntk else c


def fc_diag(p: FCParams, x: jax.Array, kind: str) -> jax.Array:
    """The diagonal K(x_i, x_i). x: (n, d) -> (n,). Exact (no arccos near 1)."""
    qs = row_stats(p, x)
    if kind == "nngp":
        return qs[-1]
    theta = qs[0]
    for layer in range(p.depth):
        theta = p.w_var * theta * _diag_sdot(p, qs[layer]) + qs[layer + 1]
    return theta


def _diag_sdot(p: FCParams, q: jax.Array) -> jax.Array:
    """ṡ(q, q, q): the derivative expectation on the diagonal (cos θ = 1)."""
    if p.act == "abrelu":
        return p.a * p.b + (p.b - p.a) ** 2 / 2.0 + 0.0 * q
    if p.act == "erf":
        return (4.0 / math.pi) * jax.lax.rsqrt(1.0 + 4.0 * q)
    return jnp.ones_like(q)


def fc_tile_symmetric(p: FCParams, x: jax.Array, kind: str) -> jax.Array:
    """A diagonal tile K(x, x): (n, d) -> (n, n), exactly symmetric, diagonal from :func:`fc_diag`.

    arccos loses precision for cos θ ≈ 1 (θ ≈ √(2ε)); the diagonal entries are exact this way.
    """
    # The barrier materialises the tile once: XLA may otherwise recompute the transposed copy in
    # another fusion, with other rounding, and the result would not be exactly symmetric.
    tile = jax.lax.optimization_barrier(fc_tile(p, x, x, kind))
    tile = 0.5 * (tile + tile.T)  # exactly symmetric, whatever the rounding of each entry
    idx = jnp.arange(x.shape[0])
    return tile.at[idx, idx].set(fc_diag(p, x, kind))
