"""The three GP posteriors of Neural Tangents' ``predict.gp_inference`` (infinite time), as
arithmetic on blocks of test rows (pure numpy; no Ray, no store: the callers bring the solves).

With K the NNGP kernel, Θ the NTK, X the N training rows, X* a block of t test rows and
λ_g = ridge · trace(K_g(X, X))/N the relative ridge of the kernel g that is inverted
(``diag_reg`` with ``diag_reg_absolute_scale=False``, this package's ridge everywhere):

- ``"nngp"``: the GP posterior with the NNGP kernel: mean K*(K + λ)⁻¹y,
  covariance K** − K*(K + λ)⁻¹K*ᵀ.
- ``"ntkgp"``: the GP posterior with the NTK as the covariance (He, Lakshminarayanan & Teh
  2020): mean Θ*(Θ + λ)⁻¹y, covariance Θ** − Θ*(Θ + λ)⁻¹Θ*ᵀ.
- ``"ntk"``: an infinite ensemble of infinite-width networks trained to convergence on MSE
  (Lee et al. 2019): mean Θ*(Θ + λ)⁻¹y, covariance
  K** + Θ*(Θ + λ)⁻¹K(Θ + λ)⁻¹Θ*ᵀ − (Θ*(Θ + λ)⁻¹K*ᵀ + its transpose), K unregularised.

Every posterior needs Z = (K_s + λ)⁻¹ S*ᵀ (N, t), one solve with t right-hand sides against the
kernel the fit inverted (``solved_kind``), S* = K_s(X*, X). The covariance's other kernel
(``prior_kind``) gives K**; for ``"ntk"`` it also gives K* and the product K(X, X)·Z. Several
targets share one covariance: the kernels are traced over outputs, as in Neural Tangents.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ntk_scale.options import POSTERIOR_CHOICES

#: The posteriors of ``gp_inference``'s ``get`` (the option's choices less "auto").
POSTERIORS = tuple(p for p in POSTERIOR_CHOICES if p != "auto")
#: A kernel kind's own posterior, and the posteriors its store can serve.
DEFAULT_POSTERIOR = {"nngp": "nngp", "ntk": "ntk"}
ALLOWED = {"nngp": ("nngp",), "ntk": ("ntk", "ntkgp")}
#: A variance is "below zero beyond rounding" where var < -NEGATIVE_SLACK · tol · K**_ii:
#: the solve's relative residual tol bounds the error of S*·Z by about tol · K**_ii.
NEGATIVE_SLACK = 10.0


class NegativeVarianceError(ValueError):
    """A posterior variance below zero by more than the solve's rounding."""


def check_posterior(posterior: str | None, kind: str) -> str:
    """The posterior to compute for a store of kernel ``kind``: ``posterior``, or the kind's
    own where None or "auto". Raises ValueError naming the fix where it does not fit the kind."""
    if kind not in ALLOWED:
        raise ValueError(f"kind={kind!r} has no posterior; use kind 'nngp' or 'ntk'")
    if posterior is None or posterior == "auto":
        return DEFAULT_POSTERIOR[kind]
    if posterior not in POSTERIORS:
        raise ValueError(f"posterior={posterior!r} is not one of {POSTERIORS}; pass one of "
                         f"them, or 'auto' for the kind's own ({DEFAULT_POSTERIOR[kind]!r})")
    if posterior not in ALLOWED[kind]:
        fits = [k for k, allowed in ALLOWED.items() if posterior in allowed][0]
        raise ValueError(f"posterior={posterior!r} inverts the {fits.upper()} kernel, but this "
                         f"model's kernel is kind={kind!r}; fit with kind={fits!r}, or ask for "
                         f"posterior in {ALLOWED[kind]}")  # fmt: skip
    return posterior


def solved_kind(posterior: str) -> str:
    """The kernel whose (K + λ)⁻¹ the posterior applies: the fit's store."""
    return "nngp" if posterior == "nngp" else "ntk"


def prior_kind(posterior: str) -> str:
    """The kernel of K** (and, for ``"ntk"``, of K* and K(X, X)): the network at init."""
    return "ntk" if posterior == "ntkgp" else "nngp"


def needs_prior_train(posterior: str) -> bool:
    """Whether the covariance needs the prior kernel's training Gram K(X, X) (a second store)."""
    return posterior == "ntk"


def covariance(posterior: str, solved_td: np.ndarray, Z: np.ndarray, prior_tt: np.ndarray,
               prior_td: np.ndarray | None = None,
               prior_dd_Z: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The posterior covariance (t, t) of a block of test rows.

    solved_td: S* (t, N); Z: (K_s + λ)⁻¹ S*ᵀ (N, t); prior_tt: K** (t, t) of the prior kernel;
    for ``"ntk"`` also prior_td: K* (t, N) and prior_dd_Z: K(X, X)·Z (N, t)."""
    S, Z = np.asarray(solved_td, np.float64), np.asarray(Z, np.float64)
    cov = np.array(prior_tt, dtype=np.float64)
    if posterior in ("nngp", "ntkgp"):
        cov -= S @ Z
    elif posterior == "ntk":
        _need(prior_td, prior_dd_Z)
        cross = np.asarray(prior_td, np.float64) @ Z  # K*(Θ + λ)⁻¹Θ*ᵀ, its transpose the other
        cov += Z.T @ np.asarray(prior_dd_Z, np.float64) - cross - cross.T
    else:
        check_posterior(posterior, "ntk")
    return 0.5 * (cov + cov.T)


def variance(posterior: str, solved_td: np.ndarray, Z: np.ndarray, prior_diag: np.ndarray,
             prior_td: np.ndarray | None = None,
             prior_dd_Z: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The diagonal of :func:`covariance` (t,) without forming it: prior_diag K**_ii (t,),
    the other arguments as there. O(t·N) beyond the solve."""
    S, Z = np.asarray(solved_td, np.float64), np.asarray(Z, np.float64)
    var = np.array(prior_diag, dtype=np.float64).reshape(-1)
    if posterior in ("nngp", "ntkgp"):
        var -= np.einsum("tn,nt->t", S, Z)
    elif posterior == "ntk":
        _need(prior_td, prior_dd_Z)
        var += np.einsum("nt,nt->t", Z, np.asarray(prior_dd_Z, np.float64))
        var -= 2.0 * np.einsum("tn,nt->t", np.asarray(prior_td, np.float64), Z)
    else:
        check_posterior(posterior, "ntk")
    return var


def checked_std(var: np.ndarray, prior_diag: np.ndarray, tol: float) -> np.ndarray:
    """sqrt(var) (t,), with values within the solve's rounding below zero (down to
    -NEGATIVE_SLACK · max(tol, 1e-12) · K**_ii) taken as 0. Raises NegativeVarianceError
    naming the rows beyond it: a kernel, ridge or solve that is wrong, not a number to clip."""
    var = np.asarray(var, np.float64)
    slack = NEGATIVE_SLACK * max(float(tol), 1e-12) * np.abs(np.asarray(prior_diag, np.float64))
    bad = np.flatnonzero(var < -slack)
    if bad.size:
        i = int(bad[np.argmin(var[bad])])
        raise NegativeVarianceError(
            f"{bad.size} posterior variances are below zero beyond the solve's rounding (row "
            f"{i}: {var[i]:.3e}, allowed down to {-slack[i]:.3e} at tol={tol:g}); lower the "
            "solver tolerance (tol), raise the ridge, or check that the model's kernel is the "
            "one its store holds (ntk-scale verify)")
    return np.sqrt(np.maximum(var, 0.0))


def dense_solver(K_dd: np.ndarray, lam: float) -> Any:
    """B (N, c) -> (K + λI)⁻¹B by one Cholesky factor of K_dd (N, N) (the in-memory path and
    small problems)."""
    import scipy.linalg

    A = np.array(K_dd, dtype=np.float64)
    A[np.diag_indices_from(A)] += lam
    factor = scipy.linalg.cho_factor(A, lower=True)
    return lambda B: scipy.linalg.cho_solve(factor, np.asarray(B, np.float64))


def relative_lam(ridge: float, K_diag: np.ndarray) -> float:
    """λ = ridge · trace(K)/N from the training diagonal K_diag (N,) (gp_inference's diag_reg
    with diag_reg_absolute_scale=False)."""
    return float(ridge) * float(np.mean(np.asarray(K_diag, np.float64)))


def _need(prior_td: Any, prior_dd_Z: Any) -> None:
    if prior_td is None or prior_dd_Z is None:
        raise ValueError("posterior 'ntk' needs the NNGP test-train kernel prior_td and "
                         "K_nngp(X, X)·Z (prior_dd_Z): fit with both stores (posterior='ntk')")
