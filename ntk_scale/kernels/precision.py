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
A conservative formula from the number L of layers in the tree (leaves, combinators excluded):
every layer may lose 256u relative (filter sums, pooling and readout means over up to 2¹⁶ terms
with XLA's pairwise reductions), and an NTK may in addition lose √(8u) per layer, the arccos
floor of a cosine rounded near 1 (the fully-connected analysis above without the δ recursion).
entry_bound = L·(256u + [NTK]·√(8u))·diag_max. It does not try to be tight.
"""

from __future__ import annotations

import math
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
    if hasattr(spec, "params") and hasattr(spec, "depth"):
        return SAFETY * fc_relative_error(spec.params, kind) * float(diag_max)
    return _stax_relative_error(spec, kind) * float(diag_max)


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


def _stax_relative_error(spec: Any, kind: str) -> float:
    """L·(256u + [NTK]·√(8u)) for a stax network with L layers (docstring, Stax networks)."""
    tree = getattr(spec, "spec", None) or getattr(spec, "layer", None) or spec
    if not hasattr(tree, "layers"):
        raise ValueError(
            f"entry_bound takes a FullyConnected spec or a stax network, got {type(spec).__name__}"
        )
    n_layers = _count_layers(tree)
    per_layer = 256 * _U + (math.sqrt(8 * _U) if kind == "ntk" else 0.0)
    return max(n_layers, 1) * per_layer


def _count_layers(layer: Any) -> int:
    children = tuple(getattr(layer, "layers", ()) or ())
    if not children:
        return 1
    return sum(_count_layers(child) for child in children)


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
