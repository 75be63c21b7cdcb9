"""Block preconditioned conjugate gradients for (K + λI) A = Y with C right-hand sides.

An operator with its own ridge term (:class:`RidgeOperator`, e.g. the Nyström normal equations
(K_nmᵀK_nm + λ K_mm) α = K_nmᵀ y of :mod:`ntk_scale.linalg.falkon`) supplies (H + λ_j S) p_j
itself; the iteration is the same.

Per-column CG sharing one ``op.matmat`` per iteration over the still-active columns (O'Leary
1980, in its simple per-column form). Converged columns are frozen: neither updated nor
multiplied. All vectors and reductions are float64 whatever the operator's storage dtype.

The whole iteration state is a :class:`PCGState` of plain arrays and ints; every iteration makes
a new one (the old one is never mutated), so ``callback(state)`` may keep or save it, and
``solve_pcg(..., state=saved)`` continues on the bitwise-identical trajectory.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from ntk_scale.errors import ConvergenceWarning, SolverError
from ntk_scale.linalg.operators import GramOperator
from ntk_scale.linalg.preconditioners import ColumnPreconditioner, Preconditioner, identity
from ntk_scale.options import SolveOptions

STATE_FIELDS = ("x", "r", "z", "p", "rz", "iteration", "active", "residuals")


@dataclasses.dataclass(frozen=True, eq=False)
class PCGState:
    """The complete PCG iteration state (C right-hand sides, N unknowns each).

    x, r, z, p: (N, C) float64 iterate, residual, preconditioned residual, search direction.
    rz: (C,) float64 rᵀz per column. iteration: completed iterations. active: (C,) bool, the
    columns still iterating. residuals: (iteration + 1, C) float64 history of ||r_j|| / ||y_j||
    (a frozen column repeats its last value).
    """

    x: np.ndarray
    r: np.ndarray
    z: np.ndarray
    p: np.ndarray
    rz: np.ndarray
    iteration: int
    active: np.ndarray
    residuals: np.ndarray


@runtime_checkable
class RidgeOperator(Protocol):
    """An SPD system H + λ S other than K + λI: solve_pcg calls ``ridge_matmat`` instead of
    ``matmat`` + λ p. shape: (n, n), the unknowns."""

    shape: tuple[int, int]

    def ridge_matmat(self, P: np.ndarray, lam: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """(H + λ_j S) p_j for the system's columns ``columns`` (c,) int (a column may carry
        its own data, such as a row mask). P: (n, c) float64, lam: (c,) -> (n, c) float64."""
        ...


class PCGResult(NamedTuple):
    """x: (N, C) float64 solution; iterations: int; residuals: (iterations + 1, C) float64
    relative-residual history; converged: (C,) bool."""

    x: np.ndarray
    iterations: int
    residuals: np.ndarray
    converged: np.ndarray


def resolve_ridge(ridge: float, op: GramOperator, absolute: bool = False) -> float:
    """The ridge λ added to K. absolute=False: λ = ridge · mean(diag K), Neural Tangents'
    ``diag_reg`` convention (diag_reg · trace(K) / N); absolute=True: λ = ridge."""
    ridge = float(ridge)
    if not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge={ridge!r} must be a finite number >= 0, e.g. 1e-4")
    if absolute:
        return ridge
    scale = float(np.mean(op.diag()))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"mean(diag K) = {scale!r} is not a positive number, so a relative ridge is "
            "undefined; check the Gram matrix or pass an absolute ridge"
        )
    return ridge * scale


def solve_pcg(
    op: GramOperator,
    Y: np.ndarray,
    lam: float | np.ndarray,
    preconditioner: Preconditioner | None = None,
    tol: float = SolveOptions.tol,
    max_iter: int | None = None,
    x0: np.ndarray | None = None,
    callback: Callable[[PCGState], object] | None = None,
    state: PCGState | None = None,
    mask: np.ndarray | None = None,
) -> PCGResult:
    """Solve (K + λI) A = Y column by column to ||r_j|| / ||y_j|| <= tol.

    op: an (N, N) GramOperator. Y: (N, C) targets. lam: the absolute ridge (see resolve_ridge),
    one for all columns or (C,) one per column: many ridges share each ``op.matmat`` (a
    regularization path in one solve); the preconditioner then gets each column's ridge.
    op may instead be a :class:`RidgeOperator` (its own H + λS, e.g. the Nyström system); mask
    must then be None (the operator holds any per-column data itself).
    preconditioner: ``apply(R[, lam])`` ≈ (K + λI)⁻¹ R, default identity. max_iter: default
    2N. x0: (N, C) starting guess (columns already within tol are never touched). callback:
    called with the new PCGState after every iteration. state: a saved PCGState to resume from.
    mask: (N, C) bool, column j solves on the rows mask[:, j] only, (K[S, S] + λI) a_S = y_S
    with a zero elsewhere (a cross-validation fold's training rows: every fold shares the
    product with the full K). Warns (ConvergenceWarning) and returns converged=False columns
    when max_iter is reached; raises SolverError on non-positive curvature or NaN/Inf.
    """
    Y = _check_targets(Y, op.shape[0])
    lam, tol = _check_lams(lam, Y.shape[1]), _check_positive("tol", tol)
    M = identity() if preconditioner is None else preconditioner
    if mask is not None:
        if isinstance(op, RidgeOperator):
            raise ValueError("mask is for K + λI systems; a RidgeOperator holds its columns' "
                             "masks itself: pass mask=None")  # fmt: skip
        mask = _check_mask(mask, Y.shape)
        M = _Masked(M, mask)
        Y = Y * mask
    max_iter = 2 * op.shape[0] if max_iter is None else int(max_iter)
    ynorm = np.linalg.norm(Y, axis=0)
    if state is not None and x0 is not None:
        raise ValueError("pass either x0 or state (a saved PCGState to resume), not both")
    if state is not None:
        st = _resume(state, Y.shape, tol)
    else:
        st = _initial_state(op, Y, lam, M, x0, ynorm, tol, mask)
    while st.active.any() and st.iteration < max_iter:
        st = _step(op, lam, M, st, ynorm, tol, mask)
        if callback is not None:
            callback(st)
    converged = ~st.active
    if not converged.all():
        _warn_not_converged(st, max_iter, tol)
    return PCGResult(st.x, st.iteration, st.residuals, converged)


def _product(op: GramOperator, p: np.ndarray, lam: np.ndarray, idx: np.ndarray,
             mask: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """(K + λ_j I) p_j for the columns idx (restricted to each column's rows with a mask), or
    a RidgeOperator's own (H + λ_j S) p_j."""
    if isinstance(op, RidgeOperator):
        return op.ridge_matmat(p, lam[idx], idx)
    Kp = op.matmat(p)
    if mask is not None:
        Kp *= mask[:, idx]
    Kp += lam[idx] * p
    return Kp


def _apply(M: Preconditioner, R: np.ndarray, lam: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """M applied to the columns idx, each with its own ridge when the ridges differ, and
    restricted to each column's rows when masked."""
    mask = None
    if isinstance(M, _Masked):
        M, mask = M.M, M.mask[:, idx]
        R = R * mask
    if isinstance(M, ColumnPreconditioner):
        out = M.apply_columns(R, lam[idx], idx)
    else:
        out = M.apply(R) if np.all(lam == lam[0]) else M.apply(R, lam=lam[idx])
    return out if mask is None else out * mask


def _step(
    op: GramOperator, lam: np.ndarray, M: Preconditioner, st: PCGState, ynorm: np.ndarray,
    tol: float, mask: np.ndarray | None = None,
) -> PCGState:  # fmt: skip
    """One PCG iteration over the active columns; returns a new state (``st`` is untouched).

    The active columns are gathered once into compact (N, c) arrays, updated there, and
    scattered into the new state's copies once: with 120 columns of 20,000 rows, indexing the
    full arrays column by column at every update cost a fifth of the stored product."""
    idx = np.flatnonzero(st.active)
    p = _gather(st.p, idx)
    Ap = _product(op, p, lam, idx, mask)
    pAp = _colsum(p, Ap)
    _check_curvature(pAp, Ap, idx, st.iteration, lam[idx])
    alpha = st.rz[idx] / pAp
    xa, ra = _gather(st.x, idx), _gather(st.r, idx)
    xa += alpha * p
    ra -= alpha * Ap
    rel = st.residuals[-1].copy()
    rel[idx] = np.linalg.norm(ra, axis=0) / ynorm[idx]
    keep = rel[idx] > tol
    active = st.active.copy()
    active[idx] = keep
    x, r = _scatter(st.x, idx, xa), _scatter(st.r, idx, ra)
    z, p_new, rz = st.z, st.p, st.rz.copy()
    still = idx[keep]
    if still.size:
        every = bool(keep.all())
        rs = ra if every else ra[:, keep]
        zs = _apply(M, rs, lam, still)
        rz_new = _colsum(rs, zs)
        _check_rz(rz_new, still, st.iteration + 1)
        zs_p = p if every else p[:, keep]
        p_still = zs + (rz_new / rz[still]) * zs_p
        z, p_new = _scatter(st.z, still, zs), _scatter(st.p, still, p_still)
        rz[still] = rz_new
    residuals = np.vstack([st.residuals, rel[None, :]])
    return PCGState(x, r, z, p_new, rz, st.iteration + 1, active, residuals)


def _gather(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[:, idx] as a new compact array (a plain copy when idx is every column)."""
    return a.copy() if idx.size == a.shape[1] else a[:, idx]


def _scatter(a: np.ndarray, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A new array equal to ``a`` with columns idx replaced by ``values`` (taken as they are
    when idx is every column: callers pass arrays they own)."""
    if idx.size == a.shape[1]:
        return values
    out = a.copy()
    out[:, idx] = values
    return out


def _initial_state(
    op: GramOperator,
    Y: np.ndarray,
    lam: np.ndarray,
    M: Preconditioner,
    x0: np.ndarray | None,
    ynorm: np.ndarray,
    tol: float,
    mask: np.ndarray | None = None,
) -> PCGState:
    """x0 (default 0), r = Y − (K + λI) x0, z = M r, p = z. Zero targets get x = 0."""
    if x0 is None:
        x, r = np.zeros_like(Y), Y.copy()
    else:
        x = _check_targets(x0, Y.shape[0], name="x0", shape=Y.shape).copy()
        x[:, ynorm == 0] = 0.0
        if mask is not None:
            x *= mask
        r = Y - _product(op, x, lam, np.arange(Y.shape[1]), mask)
        _check_finite(r, "the initial residual Y − (K + λI) x0", 0)
    rel = np.linalg.norm(r, axis=0) / np.where(ynorm > 0, ynorm, 1.0)
    active = rel > tol
    z = np.zeros_like(Y)
    idx = np.flatnonzero(active)
    if idx.size:
        z[:, idx] = _apply(M, r[:, idx], lam, idx)
    rz = _colsum(r, z)
    _check_rz(rz[idx], idx, 0)
    return PCGState(x, r, z, z.copy(), rz, 0, active, rel[None, :])


def _resume(state: PCGState, shape: tuple[int, int], tol: float) -> PCGState:
    """Validate a saved state against the problem; columns now within ``tol`` are frozen."""
    n, c = shape
    for name in ("x", "r", "z", "p"):
        if getattr(state, name).shape != shape:
            raise ValueError(
                f"saved PCG state has {name} of shape {getattr(state, name).shape} but the "
                f"targets are {shape}; it belongs to another problem: start without state "
                "(or use a new output dir)"
            )
    if state.residuals.shape != (state.iteration + 1, c):
        raise ValueError(
            f"saved PCG state is inconsistent: residuals {state.residuals.shape} after "
            f"{state.iteration} iterations of {c} columns; delete the checkpoint and start again"
        )
    active = np.asarray(state.active, dtype=bool) & (state.residuals[-1] > tol)
    return dataclasses.replace(state, active=active)


def _colsum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise dot products aᵀb: (N, C), (N, C) -> (C,) float64."""
    return np.einsum("ij,ij->j", a, b)


class _Masked(NamedTuple):
    """A preconditioner restricted to each column's rows, mask ⊙ M(mask ⊙ R) (see _apply):
    SPD on the subspace whenever M is SPD."""

    M: Preconditioner
    mask: np.ndarray


def _check_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape or mask.dtype != bool:
        raise ValueError(f"mask must be a bool array of shape {shape} (rows x columns), got "
                         f"{mask.dtype} {mask.shape}")  # fmt: skip
    return mask


def _check_lams(lam: float | np.ndarray, c: int) -> np.ndarray:
    """The ridges as (C,) float64, each finite and >= 0."""
    arr = np.asarray(lam, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(c, float(_check_positive("lam", float(arr), allow_zero=True)))
    if arr.shape != (c,):
        raise ValueError(f"lam must be one ridge or one per column ({c},), got shape {arr.shape}")
    for v in arr:
        _check_positive("lam", v, allow_zero=True)
    return arr


def _check_curvature(pAp: np.ndarray, Ap: np.ndarray, idx: np.ndarray, it: int,
                     lam: np.ndarray):  # fmt: skip
    _check_finite(Ap, "the operator product (K + λI) p", it)
    bad = ~(pAp > 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise SolverError(
            f"non-positive curvature pᵀ(K + λI)p = {pAp[j]:.3e} in column {int(idx[j])} at "
            f"iteration {it}: K + λI is not positive definite at λ={lam[j]:.3e}; use a larger "
            "ridge (or check that the Gram matrix is a valid kernel matrix)"
        )


def _check_rz(rz: np.ndarray, idx: np.ndarray, it: int) -> None:
    bad = ~(rz > 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise SolverError(
            f"rᵀM⁻¹r = {rz[j]:.3e} in column {int(idx[j])} at iteration {it}: the preconditioner "
            "is not positive definite or produced NaN/Inf; use a larger ridge, or another "
            "preconditioner (e.g. jacobi)"
        )


def _check_finite(a: np.ndarray, what: str, it: int) -> None:
    if not np.all(np.isfinite(a)):
        raise SolverError(
            f"{what} holds NaN/Inf at iteration {it}: the Gram matrix has non-finite entries "
            "(verify the store) or K + λI is too ill-conditioned; use a larger ridge"
        )


def _check_targets(
    Y: np.ndarray, n: int, name: str = "Y", shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Y as (N, C) finite float64 (a new array)."""
    Y = np.array(Y, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[0] != n or (shape is not None and Y.shape != shape):
        want = shape if shape is not None else f"({n}, C)"
        raise ValueError(
            f"{name} must have shape {want}, got {Y.shape}; pass a vector as y.reshape(-1, 1)"
        )
    bad = ~np.isfinite(Y).all(axis=0)
    if bad.any():
        raise ValueError(
            f"{name} column {int(np.argmax(bad))} holds NaN/Inf; remove or impute those targets"
        )
    return Y


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be a finite number {bound}")
    return v


def _warn_not_converged(st: PCGState, max_iter: int, tol: float) -> None:
    last = st.residuals[-1]
    warnings.warn(
        f"PCG stopped at max_iter={max_iter} with {int(st.active.sum())} of {len(last)} "
        f"columns above tol={tol:g} (worst relative residual {last[st.active].max():.2e}); "
        "raise max_iter, use a stronger preconditioner (nystrom with pivots='rpcholesky' "
        "and a larger rank), or a larger ridge",
        ConvergenceWarning,
        stacklevel=3,
    )
