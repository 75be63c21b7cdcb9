"""How far a float32 kernel entry can be from the exact kernel: a derived per-entry bound.

``entry_bound(spec, kind, diag_max)`` bounds |K32[i, j] − K[i, j]| for every entry of a Gram or
cross-Gram whose diagonal entries are at most ``diag_max``, where K32 is what this package
computes with ``dtype="float32"`` and K the exact kernel of the same (float32) inputs.

Derivation for FullyConnected (:mod:`ntk_scale.kernels.fc`)
-------------------------------------------------------------
Model. u = 2⁻²⁴ (float32 unit roundoff). Every float32 operation (+, ×, /, √) is correctly
rounded, |fl(a∘b) − a∘b| ≤ u|a∘b|; library asin / rsqrt are within 2u, the float32 arccos
polynomial within 4u relative (A&S 4.4.46 times √δ, measured 3.2 ulp). The analysis is first
order in u; the result is multiplied by ``SAFETY`` = 2 for second-order and unmodelled terms.

Assumptions. (A1) The input layer's float64 product x·x' has relative error ≤ d·2⁻⁵³ ≤ 2⁻⁴⁰,
i.e. d ≤ 8192 features at worst-case rounding (far more at the usual √d growth); it leaves an
absolute error e₀ ≤ 2⁻⁴⁰ on δ₀ = 1 − cos θ₀ and so an angle floor √(2e₀) = 2^-19.5 for pairs
closer than that. (A2) erf only: the input variance q₀ = W²|x|²/d + b² ≤ 2¹⁶ (raw data up to
|x|/√d ≈ 180 with W = √2); ṡ's sensitivity to e₀ is q₀e₀ ≤ u under (A2). W_std, b_std are
rounded to float32 (relative u each); that perturbation is counted like a rounding error.

Scales. Every error is measured relative to the geometric mean of the diagonals it can reach:
|c| ≤ H = √(q q'), |Θ| ≤ T = √(Θᵢᵢ Θⱼⱼ) (positive semi-definite kernels), |ṡ| ≤ √(ṡᵢᵢ ṡⱼⱼ).
Then H' = √((W²s + b²)(W²s' + b²)) ≥ W²√(s s') + b² and T' ≥ W²√(ṡᵢᵢṡⱼⱼ)·T + H' (Cauchy–
Schwarz), so a layer's relative error is at most the larger of its two inputs' relative errors
plus its own rounding: the bound is max(ε_Θ + ε_ṡ, ε_c') per layer, never a sum over N.

Per-entry state, per layer l: ρ (relative error of the per-row q, hence of H), η (relative
error of δ = 1 − cos θ, or of σ = 1 + cos θ past π/2), e (absolute floor on δ), ε_c = |Δc|/H,
ε_Θ = |ΔΘ|/T. Start (input layer, float64 then rounded once): ρ = η = ε_c = ε_Θ = 3u, e = e₀.

ABReLU (relu a=0, b=1; abs a=−1; leaky a=α), k = (a²+b²)/2, κa = |ab|/k, κb = (b−a)²/(2k):
  angle:  |Δθ| ≤ η + √(2e) + 13u        (θ = arccos(1−δ), dθ/dδ·δ = tan(θ/2) ≤ 1 on each branch)
  value:  φ = sin θ + (π−θ)cos θ has |φ'| ≤ 1.82, so
          ε_c' ≤ κa ε_c + κb (2|Δθ| + 16u)/π + κb (ρ + 3u) + u(κa + κb) + 4u
  slope:  ṡ = ab + (b−a)²(π−θ)/(2π), ṡᵢᵢ = k:  ε_ṡ ≤ κb |Δθ|/π + 2u(κa + κb)
  gap:    g/H = ab δ + (b−a)²/(2π)((π−θ)δ + θ − sin θ) has d log g / d log δ ∈ [0, 1] for
          θ ≤ π/2 (every term ≥ 0 when ab ≥ 0); for ab < 0 past π/2 the σ form is used, whose
          terms cancel by ≤ 2. Rounding is amplified by the cancellation factor C (1 for
          ab ≥ 0, 6 for ab < 0): η' ≤ ρ + G η + 15 C u + 6u with G = 2 for ab < 0 at the input
          layer, else 1: after one ABReLU layer with ab < 0, cos θ' ≥ −2ab/(a²+b²) > 0.
  bias:   β(v − v')²/(H' + v v' + β) has relative error ≤ (ρ + 4u)·H/|v − v'|, an angle error
          ≤ (ρ + 4u)/2 after dividing by H' (AM-GM, β W² k q ≤ q'²/4): e' = e + ((ρ + 4u)/2)²/2.
erf, Q = W² + b² (the largest variance after an erf layer; Q₀ = 2¹⁶ at the input, A2):
  S₁₂ = asin(m cos θ) evaluated as asin(y), y = 2c/√(g g') from the carried c (|y| ≤ ½), or as
          ±(asin m − asin X) with X = m sin²θ/(p + |cos θ| r) ≤ 0.87 from δ: its error
          relative to √(S S') is ≤ 2(3ρ + 2η + 28u) + √Q e, so ε_c' ≤ 2(3ρ + 2η + 28u) + √Q e + 4u
  slope:  ṡ = (4/π) t t'/p: ε_ṡ ≤ 2ρ + η + 12u + Q e
  gap:    asin m − asin(m(1 − δ)) is concave in δ and 0 at δ = 0, so it passes η on with
          factor ≤ 1; its rounding (asin on [0, 0.87], condition ≤ 1.65) adds ≤ 30u; the
          √(S S') − asin m part is a plain difference, an absolute δ error ≤ ρ + 8u:
          η' ≤ η + 2ρ + 30u, e' = e + ρ + 8u.
identity: ε_c' ≤ ε_c + 4u, ε_ṡ = 0.
Every layer: ρ' = ρ + 4u; ε_Θ' ≤ max(ε_Θ + ε_ṡ + 4u, ε_c' + 3u).

Result: entry_bound = SAFETY · ε_K · diag_max with ε_K = ε_Θ (NTK) or ε_c (NNGP) after the
last layer. With W_std = √2, b_std ≤ 0.5, bound / diag_max at depth 1 → 5 (NTK; NNGP alike):
relu and leaky relu 5e-6 → 2.5e-5, identity 1e-6 → 3e-6, erf 1e-5 → 1.4e-4, abs 1e-5 → 2.2e-4
(ab < 0: the gap's terms cancel by up to 6, so rounding counts 6 times). It grows with W_std
for erf (Q). Measured on far-from-origin, clustered, raw-table and standard inputs
(tests/test_float32.py): 1e-7 to 3e-6 of diag_max, 10-300 times below the bound. Before the δ
recursion (cos θ rounded near 1, then arccos) the error grew like √u·diag_max: 7e-4 on
100 + N(0, 1) rows, 1.4e-3 for abs on clustered rows.

Stax networks (:class:`ntk_scale.kernels.network.Network`)
-----------------------------------------------------------
The interpreter carries, per entry of a chunk's tensor (a pair of positions of a pair of
images), the pair distance D = E(z1 − z2)² (and Θ for the NTK) beside each image's variance
map v from the self pass; K = (v1 + v2 − D)/2 only at the end (network.py, spatial.py). Same
model as above (u, correctly rounded operations, first order, SAFETY = 2), walked over the
layer tree: each layer record's ``float32`` step (one of this module's ``*_step`` functions, in
:mod:`ntk_scale.kernels.layers`), composed by :func:`ntk_scale.kernels.shapes.float32_error`.

Scales. Per entry, A = (v1 + v2)/2 and T = (Θ11 + Θ22)/2 (arithmetic means, not the FC's
geometric ones: D ≤ 4A always, so D's rounding is bounded by A while v1/v2 may be anything,
e.g. SAME edges on zero-bordered digits). Every linear layer maps A linearly (a conv's A' is
the filter mean of the A's), so a relative error in A-units passes through unchanged.
State, per branch: ε_v (relative error of v), ε_D = |ΔD|/A, ε_Θ = |ΔΘ|/T, [lo, hi] ∋ Θᵢᵢ/vᵢ
over positions and inputs, and ρ, a floor on the correlation of two positions of one image.
Start: ε_v = (C + 1)u, ε_D = 4(C + 2)u (C channels: direct differences).

Assumptions beyond (A1), (A2). (A3) a centred product (dense inputs, the first conv's patches)
has |x − m|² ≤ 2 x the pair's mean square (m the chunk mean): ε_D = 8(n + 3)u over n
features. (A4) a pooled variance is ≥ 1/κ of its window's mean variance with
κ = k/(1 + (k − 1)ρ) over k positions; with ρ ≥ 0 this is exact (v' ≥ Σ wᵢ² vᵢ), and ρ is
first order in that it treats the variances inside one window as equal. ρ: unknown at the
input; ReLU makes it 0 (J₁ ≥ 0), and ABReLU with ab ≥ 0 on ρ ≥ 0 (θ ≤ π/2) makes it
(b − a)²/(π(a² + b²)) (1/π for ReLU); conv, pooling keep it; erf keeps its sign. (A5) erf
inputs: A ≤ 4√(v1 v2) per entry (a variance ratio ≤ 62); erf's sensitivity to c is 1/√(v1v2).

Per layer (k taps of a filter or window, sequential sums: (k − 1)u, no pairwise assumption):
  Dense / Conv: D' = W²·S(D), v' = W²S(v) + b² (A' ≥ W²S(A)); a SAME frame of the full layout
          holds v1 or v2: ε_D' ≤ max(ε_D, 2ε_v) + (k + 2)u, ε_v' ≤ ε_v + (k + 3)u;
          Θ' = W²S(Θ) + K', K' = (v1' + v2' − D')/2: ε_K = ε_v' + ε_D'/2 + 2u,
          ε_Θ' ≤ max(ε_Θ + (k + 2)u, ε_K) + 3u (T' ≥ W²S(T) and T' ≥ A'); lo' = 1 (with a
          bias) or 1 + lo, hi' = 1 + hi (Θ' / v' ∈ [1, 1 + Θ/v]).
  AvgPool / GlobalAvgPool: D' = L(D12) − g1 − g2 (g = ½L(D11) at equal positions, from the
          self pass) and v' = s·L(v) − g: the window sums' errors (2(fh + fw)u per pool,
          (HW)²u for the global mean) and the self terms' errors add up to 2ε_D·L(A), on an
          A' ≥ L(A)/κ (A4): ε_D' ≤ κ(2ε_D + [SAME edges] 3ε_v + sums + 8u),
          ε_v' ≤ κ(ε_v + ε_D/2 + sums/2 + 4u), ε_Θ' ≤ κ(ε_Θ + sums + 2u).
  Flatten: the mean over positions of D and of A: + HW·u to each, no cancellation.
  ABReLU (relu a=0, b=1; leaky; abs a=−1), k = (a² + b²)/2: D' = k·gap² + 2√(v1v2)·g(δ),
          δ = (D − gap²)/(2√(v1v2)), gap = √v1 − √v2, and dg/dδ = ṡ ∈ [ab, k] (the FC gap,
          the same algebra): ΔD' ≤ ṡΔD + Σᵢ |∂D'/∂vᵢ| vᵢ ε_v ≤ kA(ε_D + 6ε_v) plus rounding
          (2|ab| + 40(b − a)²)u/k + 20u (θ − sin θ to 16uθ, as in the FC value step):
          ε_D' ≤ ε_D + 6ε_v + (2|ab| + 40(b − a)²)u/k + 20u, ε_v' = ε_v + 2u (A' = kA).
          NTK: Θ' = Θ·ṡ, ṡ = k − (b − a)²θ/(2π). δ's own error, in units of A/√(v1v2), is
          ε_δ = ε_D + 8ε_v + 28u; θ from δ has |Δθ| ≤ √(2Δδ) (the arccos floor: D carries no
          relative accuracy through a pool, so this is the FC's √(2e) with e from ε_δ), and
          T_H·√(A/H) ≤ √(hi/lo)·T: ε_Θ' ≤ ε_Θ + (b − a)²/(2πk)·(√(hi/lo)·√ε_δ + 13πu) + 4u.
  Erf(a, b, c): D' = a²(2/π)(s1 + s2 − 2s12), s12 = atan2(2b²c, root): |∂s12/∂c| ≤ 1/√(v1v2)
          and (s1 + s2)/2 ≥ 2b²√(v1v2)/√(g1g2) (AM-GM), so relative to A' the c error counts
          A/√(v1v2) ≤ 4 times (A5); root's relative error ε_r = ε_v + 2ε_δ + 4u;
          ε_D' ≤ 2(ε_v + 4u) + 2(4(ε_v + ε_D/2 + 9u) + ε_r + 2u) + 4u, ε_v' = ε_v + 6u;
          NTK ṡ ∝ 1/root: ε_Θ' ≤ ε_Θ + ε_r + 6u (FC's slope step). Θᵢᵢ/vᵢ is no longer
          tracked through erf: [lo, hi] becomes [1, 8] (the √(hi/lo) of a later ABReLU).
  FanOut copies the state; FanInSum adds nonnegative D, v, Θ: the largest ε plus (n − 1)u.
  Identity: unchanged.
Result: entry_bound = SAFETY · ε_K · diag_max, ε_K = ε_Θ (NTK) or ε_v + ε_D/2 + 2u (NNGP,
K = (v1 + v2 − D)/2 at the readout, A ≤ diag_max).

What it gives (bound / diag_max, benchmarks/float32_bound.py --conv): see the table there and
tests/test_float32_conv.py, which checks every family against it. The NNGP of a network
without pooling is O(Lu); the NTK carries the √ε_δ angle floor of every activation (the old
layer-count formula's √(8u) per layer, now √ of the accumulated error, once per activation);
pooling multiplies by 2κ per pool, so a chain of pools (Myrtle-5: five) is where the walk is
loosest, and it is the honest worst case of the D form, not a measured one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

UNIT_ROUNDOFF_F32 = 2.0**-24
SAFETY = 2.0

_U = UNIT_ROUNDOFF_F32
_E0 = 2.0**-40  # (A1): absolute error of δ₀ from the float64 input product
_Q0_ERF = 2.0**16  # (A2): largest input variance assumed for erf networks


def entry_bound(spec: Any, kind: str, diag_max: float) -> float:
    """Upper bound on |K32[i, j] − K[i, j]| over a (cross-)Gram with diagonal entries ≤ diag_max.

    spec: a FullyConnected spec or a stax Network (or its layer tree); kind: "ntk" or "nngp";
    diag_max: the largest diagonal entry K(x, x) of the rows involved (both sides of a
    cross-Gram). Returns a float in the kernel's units (the derivation is this module's
    docstring).
    """
    if kind not in ("ntk", "nngp"):
        raise ValueError(f"kind={kind!r} is not supported; use one of ntk, nngp")
    if not math.isfinite(diag_max) or diag_max < 0:
        raise ValueError(f"diag_max={diag_max!r} must be a finite number >= 0")
    relative = getattr(spec, "float32_relative_error", None)
    if relative is None:
        raise ValueError(
            f"entry_bound takes a kernel (FullyConnected or a bound stax Network), got "
            f"{type(spec).__name__}; bind a layer tree first (ntk_scale.kernels.bind)"
        )
    eps = relative(kind)
    return math.inf if eps is None else SAFETY * eps * float(diag_max)


def fc_relative_error(p: Any, kind: str) -> float:
    """ε_K of the docstring for FCParams ``p``: |ΔK| ≤ ε_K·√(Kᵢᵢ Kⱼⱼ), before SAFETY."""
    u = _U
    rho = eta = eps_c = eps_t = 3 * u
    e = _E0
    for layer in range(p.depth):
        if p.act == "abrelu":
            eps_c_new, eps_s, eta, e = _abrelu_step(p, rho, eta, e, eps_c, layer == 0)
        elif p.act == "erf":
            eps_c_new, eps_s, eta, e = _erf_step(p, rho, eta, e, layer == 0)
        else:
            eps_c_new, eps_s = eps_c + 4 * u, 0.0
        eps_t = max(eps_t + eps_s + 4 * u, eps_c_new + 3 * u)
        eps_c, rho = eps_c_new, rho + 4 * u
    return eps_t if kind == "ntk" else eps_c


def _abrelu_step(p: Any, rho: float, eta: float, e: float, eps_c: float, first: bool):
    """(ε_c', ε_ṡ, η', e') of one ABReLU layer (docstring, ABReLU)."""
    u, a, b = _U, float(p.a), float(p.b)
    k = 0.5 * (a * a + b * b)
    ka, kb = abs(a * b) / k, (b - a) ** 2 / (2 * k)
    dtheta = eta + math.sqrt(2 * e) + 13 * u
    eps_c_new = ka * eps_c + kb * (2 * dtheta + 16 * u) / math.pi + kb * (rho + 3 * u)
    eps_c_new += u * (ka + kb) + 4 * u
    eps_s = kb * dtheta / math.pi + 2 * u * (ka + kb)
    cancel, growth = (1.0, 1.0) if a * b >= 0 else (6.0, 2.0 if first else 1.0)
    eta_new = rho + growth * eta + 15 * cancel * u + 6 * u
    e_new = e + 0.5 * ((rho + 4 * u) / 2) ** 2
    return eps_c_new, eps_s, eta_new, e_new


def _erf_step(p: Any, rho: float, eta: float, e: float, first: bool):
    """(ε_c', ε_ṡ, η', e') of one erf layer (docstring, erf)."""
    u = _U
    q = _Q0_ERF if first else float(p.w_var) + float(p.b_var)
    eps_c_new = 2 * (3 * rho + 2 * eta + 28 * u) + math.sqrt(q) * e + 4 * u
    eps_s = 2 * rho + eta + 12 * u + q * e
    return eps_c_new, eps_s, eta + 2 * rho + 30 * u, e + rho + 8 * u


# -- stax networks ------------------------------------------------------------------------------
#: (A3) centred inputs: |x − m|² of a chunk's rows (or patches) about the chunk mean m is at most
#: this many times a pair's mean square (every row within a factor 2 in norm of the others).
_CENTRE = 2.0
#: (A5) erf inputs: at every entry, (v1 + v2) / 2 ≤ this times √(v1 v2) (a variance ratio ≤ 62).
_R_AH = 4.0


class _Err(NamedTuple):
    """The per-branch state of the stax walk (docstring, Stax networks), all before SAFETY.

    ev: relative error of the variance maps v; ed: |ΔD| / A (A = (v1 + v2)/2 per entry);
    et: |ΔΘ| / T (T = (Θ11 + Θ22)/2), None before the first weighted layer; lo, hi: bounds on
    Θᵢᵢ / vᵢ over positions and inputs; hw: positions, None once a vector; fresh: no layer
    has consumed the raw input yet; corr: a floor on the correlation of two positions of one
    image (None: covariances of either sign)."""

    ev: float
    ed: float
    et: float | None
    lo: float
    hi: float
    hw: tuple[int, int] | None
    fresh: bool
    corr: float | None = None


def stax_start(sample_shape: tuple[int, ...]) -> _Err:
    """The walk's state on the raw input of ``sample_shape`` ((H, W, C) or (d,))."""
    u = _U
    hw = tuple(sample_shape[:2]) if len(sample_shape) == 3 else None
    chans = int(sample_shape[-1])
    return _Err((chans + 1) * u, 4 * (chans + 2) * u, None, 1.0, 1.0, hw, True)


def stax_finish(st: _Err, kind: str) -> float:
    """ε_K of the walk's final state: |ΔK| ≤ ε_K · diag_max, before SAFETY."""
    if kind == "ntk":
        return st.et if st.et is not None else 0.0
    return st.ev + st.ed / 2 + 2 * _U


def fan_in_step(branches: tuple) -> _Err:
    """Σ of the branches' D, v, Θ: nonnegative sums, the largest relative error plus n − 1 adds."""
    u, n = _U, len(branches)
    ets = [b.et for b in branches if b.et is not None]
    return _Err(max(b.ev for b in branches) + (n - 1) * u,
                max(b.ed for b in branches) + (n - 1) * u,
                max(ets) + (n - 1) * u if ets else None,
                min(b.lo for b in branches), max(b.hi for b in branches),
                branches[0].hw, all(b.fresh for b in branches),
                None if any(b.corr is None for b in branches)
                else min(b.corr for b in branches))  # fmt: skip


def _input_error(p: dict, st: _Err, chans: int, taps: int) -> float:
    """ed of the raw input's distance as the first linear layer computes it (A3)."""
    u = _U
    if st.hw is None or taps > 1:  # a centred product over d features or conv patches
        n = chans * max(taps, 1)
        return 4 * _CENTRE * (n + 3) * u
    return st.ed


def _weighted(p: dict, st: _Err, taps: int, chans: int, hw_out: Any) -> _Err:
    """Dense (taps 0) or Conv (taps = fh·fw): D' = W²·S(D), v' = W²·S(v) + b², Θ' = W²S(Θ) + K'."""
    u = _U
    ed = _input_error(p, st, chans, taps) if st.fresh else st.ed
    k = max(taps, 1)
    edge = 2 * st.ev if taps > 1 else 0.0  # SAME frames of the full layout hold v1 or v2
    ed = max(ed, edge) + (k + 2) * u
    ev = st.ev + (k + 3) * u
    eps_k = ev + ed / 2 + 2 * u  # K' = (v1' + v2' − D')/2 relative to A'
    et = eps_k + 3 * u if st.et is None else max(st.et + (k + 2) * u, eps_k) + 3 * u
    bias = bool(p.get("b_std"))
    lo = 1.0 if (bias or st.et is None) else 1.0 + st.lo
    hi = 1.0 if st.et is None else 1.0 + st.hi
    return _Err(ev, ed, et, lo, hi, hw_out, False, st.corr)


def conv_step(p: dict, st: _Err, chans: int) -> _Err:
    fh, fw = p["filter_shape"]
    return _weighted(p, st, fh * fw, chans, _window_out(st.hw, (fh, fw), p))


def dense_step(p: dict, st: _Err, chans: int) -> _Err:
    return _weighted(p, st, 0, chans, st.hw)


def _window_out(hw: tuple[int, int], window: tuple[int, int], p: dict) -> tuple[int, int]:
    """Output positions of a conv or pool (lax's VALID / SAME sizes)."""
    out = [(n - f) // s + 1 if p["padding"] == "VALID" else -(-n // s)
           for n, f, s in zip(hw, window, p["strides"], strict=True)]  # fmt: skip
    return out[0], out[1]


def avg_pool_step(p: dict, st: _Err, chans: int) -> _Err:
    """D' = L(D12) − g1 − g2 (+ edge terms): a cancellation by up to κ (A4)."""
    u = _U
    fh, fw = p["window_shape"]
    hw = _window_out(st.hw, (fh, fw), p)
    edges = p["padding"] == "SAME" and not p.get("normalize_edges")
    return _pooled(st, fh * fw, 2 * (fh + fw) * u, hw, edges)


def global_pool_step(p: dict, st: _Err, chans: int) -> _Err:
    n = st.hw[0] * st.hw[1]
    return _pooled(st, n, n * n * _U, None, False)


def _pooled(st: _Err, window: int, sums: float, hw_out: Any, edges: bool) -> _Err:
    """A pooling layer's map: window sums with rounding ``sums``, then the self terms subtracted;
    the pooled variance is at least 1/κ of the window's mean variance (A4)."""
    u, st = _U, _fresh_input(st)
    kappa = window / (1 + (window - 1) * st.corr) if st.corr is not None else float(window)
    ed = kappa * (2 * st.ed + (3 * st.ev if edges else 0.0) + sums + 8 * u)
    ev = kappa * (st.ev + st.ed / 2 + sums / 2 + 4 * u)
    et = None if st.et is None else kappa * (st.et + sums + 2 * u)
    return _Err(ev, ed, et, st.lo, st.hi, hw_out, False, st.corr)


def _fresh_input(st: _Err) -> _Err:
    """A non-linear layer on the raw input takes its distance from direct differences."""
    return st._replace(fresh=False) if st.fresh else st


def flatten_step(p: dict, st: _Err, chans: int) -> _Err:
    """The mean over same-position entries: A' is the mean of A, no cancellation."""
    if st.hw is None:
        return st
    st, n = _fresh_input(st), st.hw[0] * st.hw[1]
    et = None if st.et is None else st.et + n * _U
    return st._replace(ed=st.ed + n * _U, ev=st.ev + n * _U, et=et, hw=None)


def identity_step(p: dict, st: _Err, chans: int) -> _Err:
    return st


def abrelu_step(ab: Callable[[dict], tuple[float, float]]) -> Callable:
    """The step of a·min(x, 0) + b·max(x, 0), (a, b) = ab(params) (the layer record's)."""
    return lambda p, st, chans: _abrelu(*ab(p), st)


def _abrelu(a: float, b: float, st: _Err) -> _Err:
    """D' = k·gap² + 2√(v1v2)·excess(δ), d excess/dδ = ṡ ∈ [ab, k]; Θ' = Θ·ṡ."""
    u, st = _U, _fresh_input(st)
    k = 0.5 * (a * a + b * b)
    eff = st.ed + 8 * st.ev + 28 * u  # δ's numerator D − gap² and its scaling, over A
    rounding = (2 * abs(a * b) + 40 * (b - a) ** 2) * u / k
    ed = st.ed + 6 * st.ev + rounding + 20 * u
    et = None
    if st.et is not None:
        spread = math.sqrt(st.hi / st.lo)  # T_H·√(A/H) ≤ √(hi/lo)·T
        f_k = (b - a) ** 2 / (2 * math.pi * k)
        et = st.et + f_k * (spread * math.sqrt(eff) + 13 * math.pi * u) + 4 * u
    return _Err(st.ev + 2 * u, ed, et, st.lo, st.hi, st.hw, False, _abrelu_corr(a, b, st.corr))


def _abrelu_corr(a: float, b: float, corr: float | None) -> float | None:
    """Position correlation floor after ABReLU: c' ≥ 0 for a = 0 (J₁ ≥ 0); for ab ≥ 0 and
    input covariances ≥ 0 (θ ≤ π/2), c'/√(v1'v2') ≥ (b − a)²/(2π k) (1/π for ReLU)."""
    if corr is not None and a * b >= 0:
        return (b - a) ** 2 / (math.pi * (a * a + b * b))
    return 0.0 if a == 0 else None


def erf_step(p: dict, st: _Err, chans: int) -> _Err:
    """D' = a²(2/π)(s1 + s2 − 2 s12), s12 = atan2(2b²c, root); Θ' = Θ·ṡ, ṡ ∝ 1/root (A5)."""
    u, st = _U, _fresh_input(st)
    eff = st.ed + 8 * st.ev + 28 * u
    e_root = st.ev + eff * _R_AH / 2 + 4 * u
    e_s12 = _R_AH * (st.ev + st.ed / 2 + 9 * u) + e_root + 2 * u
    ed = 2 * (st.ev + 4 * u) + 2 * e_s12 + 4 * u
    et = None if st.et is None else st.et + e_root + 6 * u
    # Θᵢᵢ/vᵢ is not followed through erf: a later ABReLU takes √(hi/lo) = √8 (docstring)
    corr = None if st.corr is None else 0.0  # erf is odd and increasing: signs kept
    return _Err(st.ev + 6 * u, ed, et, 1.0, 2 * _R_AH, st.hw, False, corr)


# -- what the stages do with the bound ----------------------------------------------------------
#: dtype="auto" takes float32 only where its entry bound is at least this many times below λ.
#: Measured (benchmarks/float32_bound.py): the relative gap between float32 and float64 kernel
#: ridge predictions stayed below about 4 x (max entry error) / λ, so at this margin float32
#: predictions are within a few percent of float64's in the worst case and far closer typically.
AUTO_MARGIN = 100.0

#: float64's unit roundoff over float32's: the float64 bound is the float32 one scaled by this.
_F64_OVER_F32 = 2.0**-53 / UNIT_ROUNDOFF_F32


class DtypeChoice(NamedTuple):
    """dtype: "float32" or "float64"; bound: entry_bound (absolute); lam: the ridge λ it was
    compared with; reason: one line for logs, the CLI and model.json."""

    dtype: str
    bound: float
    lam: float
    reason: str


def choose_dtype(spec: Any, kind: str, diag: Any, lam: float) -> DtypeChoice:
    """What ``dtype="auto"`` takes for a Gram with diagonal ``diag`` (n,) solved at ridge λ
    (absolute): float32 where entry_bound · AUTO_MARGIN <= λ, else float64."""
    bound = entry_bound(spec, kind, float(np.max(diag)))
    if bound * AUTO_MARGIN <= lam:
        why = f"float32's entry error bound {bound:.3g} is {lam / bound:.3g}x below λ = {lam:.3g}"
        return DtypeChoice("float32", bound, lam, f"auto: float32 ({why})")
    why = (f"float32's entry error bound {bound:.3g} is not {AUTO_MARGIN:.0f}x below "
           f"λ = {lam:.3g}")  # fmt: skip
    return DtypeChoice("float64", bound, lam, f"auto: float64 ({why})")


def float32_risk(spec: Any, kind: str, diag: Any, lam: float) -> str | None:
    """None where a float32 Gram is accurate enough at λ, else what to do (a warning's text)."""
    diag = np.asarray(diag, dtype=np.float64)
    bound = entry_bound(spec, kind, float(np.max(diag)))
    if bound * AUTO_MARGIN <= lam:
        return None
    ridge = AUTO_MARGIN * bound / float(np.mean(diag))
    return (
        f"this float32 Gram's entries may be off by up to {bound:.3g} (float32 rounding), not "
        f"small against λ = {lam:.3g}: the solution may be inaccurate, or PCG may stop on a "
        "matrix that is not positive definite. Recompute the Gram in float64 (dtype='float64' "
        f"or 'auto'; --dtype float64; [store] dtype) or use a relative ridge >= {ridge:.2g}"
    )


def explain_indefinite(spec: Any, kind: str, dtype: str, diag: Any, lam: float) -> str:
    """The likely cause of 'K + λI is not positive definite' on a Gram with diagonal ``diag``
    (n,) stored in ``dtype``, and its fix."""
    diag = np.asarray(diag, dtype=np.float64)
    n, bound = len(diag), entry_bound(spec, kind, float(np.max(diag)))
    if dtype == "float64":
        bound *= _F64_OVER_F32
    # ||E||_2 <= n · max |E_ij|: rounding can move an eigenvalue by up to n · bound.
    if n * bound < lam:
        return ("the kernel's rounding cannot explain it (n x the entry error bound = "
                f"{n * bound:.2g} < λ = {lam:.3g}): check the Gram (ntk-scale verify)")  # fmt: skip
    ridge = n * bound / float(np.mean(diag))
    if dtype == "float32":
        return (
            f"likely cause: float32 rounding at this ridge (entries off by up to {bound:.3g}; "
            f"over {n} rows that moves eigenvalues by up to {n * bound:.2g} >= λ = {lam:.3g}). "
            "Fix: compute the Gram in float64 (dtype='float64' or 'auto'; --dtype float64) or "
            f"use a relative ridge >= {ridge:.2g}"
        )
    return (
        f"likely cause: a ridge below the kernel's float64 rounding (entries off by up to "
        f"{bound:.3g}; over {n} rows up to {n * bound:.2g} >= λ = {lam:.3g}). Fix: use a "
        f"relative ridge >= {ridge:.2g}"
    )
