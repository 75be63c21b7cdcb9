"""Fully-connected NTK / NNGP recursions in JAX (pure functions, no I/O, no Ray).

The recursion follows Neural Tangents' NTK parameterization (see ``shared/REFERENCES.md``):

    c = W² x·x'/d + b²,  q = W² |x|²/d + b²,  Θ = c
    for each hidden layer:  Θ ← Θ ṡ;  c ← W² s + b²;  q ← W² s(q, q) + b²;  Θ ← W² Θ + c

The angle is never taken from cos θ = c/√(q q'). Beside c the recursion carries the gap
δ = 1 − cos θ (and σ = 1 + cos θ), which every layer maps to the next layer's gap without
subtracting nearly equal numbers, so δ keeps its *relative* accuracy for close pairs (rows far
from the origin, clustered rows, raw table columns: every cosine within a few ulps of 1):

* input layer: c, q and δ, σ from one matmul in float64 (the inputs are exact in float64; a
  float32 tile upcasts them for this product only and rounds the results once);
* ABReLU: √(s s') − s₁₂ = √(q q')·[ab·δ + (b − a)²/(2π)·((π − θ)δ + (θ − sin θ))], every term
  ≥ 0 (ab < 0 loses at most a factor 2), θ − sin θ by its series for θ < 1;
* erf: √(S S') − S₁₂ = [√(S S') − asin m] + [asin m − asin(m cos θ)], the second bracket as
  asin(m sin²θ / (p + cos θ·r)) with r = √(1 − m²), p = √(1 − m² cos²θ) from per-row terms;
* the bias: √((A + β)(B + β)) − (√(AB) + β) = β(√A − √B)² / (√((A+β)(B+β)) + √(AB) + β).

Then θ = arccos(1 − δ) = √δ·P(1 − δ) is accurate to a few ulps relative, and so are sin θ,
π − θ and ṡ. :mod:`ntk_scale.kernels.precision` bounds the float32 error of every entry.

Per-row quantities (the ``q`` chain, √q) are computed once per row block in :func:`row_stats`
and :func:`fc_tile`; the per-entry work is one matmul and one fused elementwise chain.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_TWO_PI = 2.0 * math.pi
_HALF_PI = 0.5 * math.pi
_ASIN_DIRECT = 0.7  # asin(x) directly for x <= 0.7, else π/2 − asin(√(1 − x²)) from exact terms

# Abramowitz & Stegun 4.4.46: acos(x) = sqrt(1 - x) * P(x) on [0, 1], |error| <= 2e-8, and
# relative error <= 3.2 ulp in float32 when sqrt(1 - x) is given exactly (here √δ, from δ).
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
# θ − sin θ = θ³ Σ_k (−1)^k θ^(2k) / (2k + 3)!, six terms: relative error < 1e-9 for θ < 1.
_TMS_COEFFS = tuple((-1) ** k / math.factorial(2 * k + 3) for k in range(5, -1, -1))


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


class _Pair(NamedTuple):
    """Per-entry state entering a layer: c (value), δ = 1 − cos θ, σ = 1 + cos θ."""

    c: jax.Array
    delta: jax.Array
    sigma: jax.Array


class _Rows(NamedTuple):
    """Per-row state of one side at one layer: q, √q, and √(q_next − b²) = √(W² s(q, q))."""

    q: jax.Array
    h: jax.Array
    v: jax.Array
    h_next: jax.Array


# -- scalar helpers ------------------------------------------------------------------------------
def _acos_parts(delta: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(θ, π − θ) from δ = 1 − cos θ and σ = 1 + cos θ, each accurate relative to itself."""
    if delta.dtype != jnp.float32:
        small = 2.0 * jnp.arcsin(jnp.sqrt(0.5 * jnp.minimum(delta, sigma)))
        theta = jnp.where(delta <= 1.0, small, math.pi - small)
        return theta, jnp.where(delta <= 1.0, math.pi - small, small)
    near = delta <= 1.0
    x = jnp.where(near, 1.0 - delta, delta - 1.0)  # |cos θ| in [0, 1]
    poly = jnp.full_like(x, _ACOS_COEFFS[0])
    for coeff in _ACOS_COEFFS[1:]:
        poly = poly * x + coeff
    small = jnp.sqrt(jnp.where(near, delta, sigma)) * poly  # θ (near) or π − θ (far)
    return jnp.where(near, small, math.pi - small), jnp.where(near, math.pi - small, small)


def _theta_minus_sin(theta: jax.Array, sin: jax.Array) -> jax.Array:
    """θ − sin θ without cancellation: the series for θ < 1, the difference otherwise."""
    t2 = theta * theta
    poly = jnp.full_like(theta, _TMS_COEFFS[0])
    for coeff in _TMS_COEFFS[1:]:
        poly = poly * t2 + coeff
    return jnp.where(theta < 1.0, theta * t2 * poly, theta - sin)


def _asin_accurate(x: jax.Array, comp: jax.Array) -> jax.Array:
    """asin(x) for x in [0, 1] given comp = √(1 − x²) computed without cancellation."""
    direct = x <= _ASIN_DIRECT
    s = jnp.arcsin(jnp.where(direct, x, comp))
    return jnp.where(direct, s, _HALF_PI - s)


def _safe_div(num: jax.Array, den: jax.Array, default: float) -> jax.Array:
    """num / den, and ``default`` where den == 0 (no NaN in either branch)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), default)


def _inv(h: jax.Array) -> jax.Array:
    """1/h per row, and 0 where h == 0 (a zero-norm row with b_std = 0 has cos θ := 0)."""
    return jnp.where(h > 0, 1.0 / jnp.where(h > 0, h, 1.0), 0.0)


def _wide_dtype(dtype: Any) -> Any:
    """float64 where 64-bit types are enabled (the input layer's product), else ``dtype``."""
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)
    return wide if jnp.dtype(wide).itemsize > jnp.dtype(dtype).itemsize else dtype


# -- per-row recursions --------------------------------------------------------------------------
def _erf_self(q: jax.Array) -> jax.Array:
    """asin(2q / (1 + 2q)) accurately also for large q (√(1 − ρ²) = √(1 + 4q) / (1 + 2q))."""
    g = 1.0 + 2.0 * q
    return _asin_accurate(2.0 * q / g, jnp.sqrt(1.0 + 4.0 * q) / g)


def _diag_step(p: FCParams, q: jax.Array) -> jax.Array:
    """s(q, q, q): the activation's second moment on the diagonal."""
    if p.act == "abrelu":
        return 0.5 * (p.a**2 + p.b**2) * q
    if p.act == "erf":
        return (2.0 / math.pi) * _erf_self(q)
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


def _rows(p: FCParams, qs: jax.Array) -> list[_Rows]:
    """_Rows for every hidden layer from :func:`row_stats`' (depth + 1, n) output."""
    out = []
    for layer in range(p.depth):
        q = qs[layer]
        v = jnp.sqrt(jnp.maximum(p.w_var * _diag_step(p, q), 0.0))
        out.append(_Rows(q, jnp.sqrt(q), v, jnp.sqrt(qs[layer + 1])))
    return out


# -- per-entry layers ----------------------------------------------------------------------------
def _input_layer(p: FCParams, x1: jax.Array, x2: jax.Array) -> _Pair:
    """c, δ, σ of the input layer: one matmul in float64 (where enabled), rounded once."""
    dtype, wide = x1.dtype, _wide_dtype(x1.dtype)
    a, b = x1.astype(wide), x2.astype(wide)
    w, beta, d = jnp.asarray(p.w_var, wide), jnp.asarray(p.b_var, wide), x1.shape[1]
    c = w * jnp.dot(a, b.T, precision=_HIGHEST) / d + beta
    h1 = jnp.sqrt(w * jnp.sum(a * a, axis=1) / d + beta)
    h2 = jnp.sqrt(w * jnp.sum(b * b, axis=1) / d + beta)
    cos = jnp.clip(_safe_div(c, h1[:, None] * h2[None, :], 0.0), -1.0, 1.0)
    return _Pair(c.astype(dtype), (1.0 - cos).astype(dtype), (1.0 + cos).astype(dtype))


def _bias_gap(p: FCParams, r1: _Rows, r2: _Rows, hh_next: jax.Array) -> jax.Array:
    """√((A + β)(B + β)) − (√(AB) + β) for A = W² s(q, q), B = W² s(q', q'), without cancelling."""
    dv = r1.v[:, None] - r2.v[None, :]
    den = hh_next + r1.v[:, None] * r2.v[None, :] + p.b_var
    return _safe_div(p.b_var * dv * dv, den, 0.0)


def _next_pair(p, c_new, g, r1: _Rows, r2: _Rows) -> _Pair:
    """The next layer's state from c' and g = √(s s') − s₁₂ ≥ 0 (computed without cancelling)."""
    hh_next = r1.h_next[:, None] * r2.h_next[None, :]
    inv = _inv(r1.h_next)[:, None] * _inv(r2.h_next)[None, :]  # no per-entry division
    gap = p.w_var * jnp.maximum(g, 0.0) + _bias_gap(p, r1, r2, hh_next)
    delta = jnp.where(inv > 0, jnp.clip(gap * inv, 0.0, 2.0), 1.0)
    return _Pair(c_new, delta, 2.0 - delta)


def _abrelu_layer(p: FCParams, st: _Pair, r1: _Rows, r2: _Rows, need_gap: bool):
    theta, pmt = _acos_parts(st.delta, st.sigma)
    cos = jnp.where(st.delta <= 1.0, 1.0 - st.delta, st.sigma - 1.0)
    sin = jnp.sqrt(st.delta * st.sigma)
    hh = r1.h[:, None] * r2.h[None, :]
    scale = (p.b - p.a) ** 2 / _TWO_PI
    ab = p.a * p.b
    s = ab * st.c + scale * hh * (sin + pmt * cos)
    sdot = ab + scale * pmt
    c_new = p.w_var * s + p.b_var
    if not need_gap:
        return _Pair(c_new, st.delta, st.sigma), sdot
    # √(s s') − s₁₂ over √(q q'): every term >= 0 when ab >= 0. When ab < 0 (abs, leaky slopes
    # < 0) and θ > π/2, the same value written in π − θ and σ cancels by at most a small factor.
    far = (ab < 0) & (st.delta > 1.0)
    tms = _theta_minus_sin(jnp.where(far, pmt, theta), sin)
    g_near = ab * st.delta + scale * (pmt * st.delta + tms)
    g_far = 0.5 * (p.a + p.b) ** 2 - ab * st.sigma - scale * (pmt * st.sigma - tms)
    g = hh * jnp.where(far, g_far, g_near)
    return _next_pair(p, c_new, g, r1, r2), sdot


def _erf_layer(p: FCParams, st: _Pair, r1: _Rows, r2: _Rows, need_gap: bool):
    t1, t2 = jax.lax.rsqrt(1.0 + 2.0 * r1.q), jax.lax.rsqrt(1.0 + 2.0 * r2.q)
    tt = t1[:, None] * t2[None, :]
    m = 2.0 * (r1.h * t1)[:, None] * (r2.h * t2)[None, :]  # 2c / √(g g') at cos θ = 1
    r = jnp.sqrt(1.0 + 2.0 * r1.q[:, None] + 2.0 * r2.q[None, :]) * tt  # √(1 − m²)
    ds = st.delta * st.sigma  # sin²θ
    pp = jnp.sqrt(r * r + m * m * ds)  # √(1 − m² cos²θ)
    sdot = (4.0 / math.pi) * _safe_div(tt, pp, 0.0)
    mu = jnp.minimum(st.delta, st.sigma)
    # 2c / √(g g') from the carried c, relatively accurate also where cos θ ≈ 0 (1 − δ is not).
    y = jnp.clip(2.0 * st.c * tt, -1.0, 1.0)
    big_m = _asin_accurate(jnp.minimum(m, 1.0), r)
    a_x = jnp.arcsin(jnp.clip(_safe_div(m * ds, pp + (1.0 - mu) * r, 0.0), 0.0, 1.0))
    near_one = jnp.where(st.delta <= 1.0, big_m - a_x, a_x - big_m)  # |y| close to m
    s12 = jnp.where(jnp.abs(y) <= 0.5, jnp.arcsin(y), near_one)
    c_new = p.w_var * (2.0 / math.pi) * s12 + p.b_var
    if not need_gap:
        return _Pair(c_new, st.delta, st.sigma), sdot
    self1, self2 = jnp.sqrt(_erf_self(r1.q)), jnp.sqrt(_erf_self(r2.q))
    gap1 = jnp.maximum(self1[:, None] * self2[None, :] - big_m, 0.0)
    gap2 = jnp.where(st.delta < 0.5, a_x, big_m - s12)
    return _next_pair(p, c_new, (2.0 / math.pi) * (gap1 + gap2), r1, r2), sdot


def _layer(p: FCParams, st: _Pair, r1: _Rows, r2: _Rows, need_gap: bool):
    if p.act == "abrelu":
        return _abrelu_layer(p, st, r1, r2, need_gap)
    if p.act == "erf":
        return _erf_layer(p, st, r1, r2, need_gap)
    return _Pair(p.w_var * st.c + p.b_var, st.delta, st.sigma), 1.0


def fc_tile(p: FCParams, x1: jax.Array, x2: jax.Array, kind: str) -> jax.Array:
    """One kernel tile. x1: (n1, d), x2: (n2, d) -> (n1, n2), dtype of the inputs.

    kind: "ntk" or "nngp". Rows need not be distinct; zero rows (q = 0) have cos θ := 0.
    """
    if kind == "ntk":
        return fc_tile_pair(p, x1, x2)[1]
    return _recursion(p, x1, x2, compute_ntk=False)[0]


def fc_tile_pair(p: FCParams, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(NNGP, NTK) tiles, each (n1, n2), from one recursion: the NTK's carries the NNGP."""
    return _recursion(p, x1, x2, compute_ntk=True)


def _recursion(p: FCParams, x1: jax.Array, x2: jax.Array, compute_ntk: bool):
    rows1, rows2 = _rows(p, row_stats(p, x1)), _rows(p, row_stats(p, x2))
    st = _input_layer(p, x1, x2)
    theta = st.c
    for layer in range(p.depth):
        need_gap = p.act != "identity" and layer + 1 < p.depth
        st, sdot = _layer(p, st, rows1[layer], rows2[layer], need_gap)
        theta = p.w_var * theta * sdot + st.c if compute_ntk else st.c
    return st.c, theta


def fc_diag(p: FCParams, x: jax.Array, kind: str) -> jax.Array:
    """The diagonal K(x_i, x_i). x: (n, d) -> (n,). Exact (cos θ = 1 by construction)."""
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
    """A diagonal tile K(x, x): (n, d) -> (n, n), exactly symmetric, diagonal from
    :func:`fc_diag`."""
    return _symmetric(p, x, fc_tile(p, x, x, kind), kind)


def fc_tile_pair_symmetric(p: FCParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(NNGP, NTK) diagonal tiles from one recursion, each as :func:`fc_tile_symmetric`."""
    nngp, ntk = fc_tile_pair(p, x, x)
    return _symmetric(p, x, nngp, "nngp"), _symmetric(p, x, ntk, "ntk")


def _symmetric(p: FCParams, x: jax.Array, tile: jax.Array, kind: str) -> jax.Array:
    # The barrier materialises the tile once: XLA may otherwise recompute the transposed copy in
    # another fusion, with other rounding, and the result would not be exactly symmetric.
    tile = jax.lax.optimization_barrier(tile)
    tile = 0.5 * (tile + tile.T)  # exactly symmetric, whatever the rounding of each entry
    idx = jnp.arange(x.shape[0])
    return tile.at[idx, idx].set(fc_diag(p, x, kind))
