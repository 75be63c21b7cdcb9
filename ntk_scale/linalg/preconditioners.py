"""Preconditioners for (K + λI) A = Y: small factories returning frozen objects.

Each result has ``apply(R)``: R (N, C) float64 -> (N, C) float64 ≈ (K + λI)⁻¹ R, and metadata
(``name``, ``rank``, ``pivots``). See shared/REFERENCES.md, "Solvers and preconditioners".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import scipy.linalg

from ntk_scale.linalg.operators import GramOperator
from ntk_scale.options import SolveOptions

_EMPTY_INT = np.zeros(0, dtype=np.int64)
#: A residual diagonal entry below this fraction of K's diagonal is rounding noise (~5000 eps).
_NOISE = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class Identity:
    """No preconditioning: apply(R) = R."""

    name: str = "identity"
    rank: int = 0
    pivots: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_INT)

    def apply(self, R: np.ndarray, lam: np.ndarray | None = None) -> np.ndarray:
        """R: (N, C) -> (N, C) float64 (a copy, so callers may update either freely)."""
        return np.array(R, dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Jacobi:
    """Diagonal preconditioner: apply(R) = R / (diag(K) + λ). inv_diag: (N,) float64;
    diag: (N,) diag(K), for other ridges (``apply(R, lam)``)."""

    inv_diag: np.ndarray
    name: str = "jacobi"
    rank: int = 0
    pivots: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_INT)
    diag: np.ndarray | None = None

    def apply(self, R: np.ndarray, lam: np.ndarray | None = None) -> np.ndarray:
        """R: (N, C) -> (N, C) float64; lam: (C,) a ridge per column (default: its own)."""
        R = np.asarray(R, dtype=np.float64)
        if lam is None:
            return R * self.inv_diag[:, None]
        return R / (self.diag[:, None] + np.asarray(lam, dtype=np.float64)[None, :])


@dataclasses.dataclass(frozen=True, eq=False)
class Nystrom:
    """Nyström preconditioner of K + λI from a sketch K ≈ F Fᵀ, F = U diag(σ) Vᵀ (thin SVD):

        P = U diag(σ² + λ) Uᵀ + (σ_r² + λ)(I − U Uᵀ),
        P⁻¹ R = U diag(1/(σ² + λ)) UᵀR + (R − U UᵀR) / (σ_r² + λ),

    applied in float64 with N x r memory (Frangella, Tropp, Udell 2023, eq. 5.3). On the
    sketched directions P is the Woodbury form of F Fᵀ + λI; on their complement, where K's
    eigenvalues lie below about σ_r², it divides by σ_r² + λ rather than by λ. With
    P = F Fᵀ + λI the preconditioned spectrum reaches (λ_{r+1} + λ)/λ even when K's own
    smallest eigenvalue is far above λ; here it stays within [(λ_min + λ)/(σ_r² + λ), ~1],
    which at N = 4,000 (FC-3 ReLU NTK, λ = 1e-6·mean diag, rank 1,000) cut the iterations from
    94 to 57 (and from 329 to 189 at rank 100).

    U: (N, r) orthonormal; eigenvalues: (r,) σ² descending, the sketch's estimates of K's top
    eigenvalues; pivots: (r,) the columns of K read into the sketch (in pivot order);
    columns_read: how many columns of K were read in all (more than r for blocked RPCholesky).
    """

    U: np.ndarray
    eigenvalues: np.ndarray
    lam: float
    pivots: np.ndarray
    name: str
    columns_read: int

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    @property
    def tail(self) -> float:
        """σ_r² + λ: what P is on the complement of the sketched directions."""
        return float(self.eigenvalues[-1]) + self.lam

    def apply(self, R: np.ndarray, lam: np.ndarray | None = None) -> np.ndarray:
        """R: (N, C) -> (N, C) float64. lam: (C,) a ridge per column: the sketch does not
        depend on λ, only this core does, so one sketch serves a whole regularization path."""
        R = np.asarray(R, dtype=np.float64)
        UtR = self.U.T @ R
        # U (UᵀR / (σ² + λ)) + (R − U UᵀR) / tail, as one product with U: U (UᵀR ⊙ w) + R / tail
        # with w = 1/(σ² + λ) − 1/tail (two N x r x C products per apply rather than three).
        if lam is None:
            lam_c, tail = np.full((1, R.shape[1]), self.lam), self.tail
        else:
            lam_c = np.asarray(lam, dtype=np.float64)[None, :]
            tail = float(self.eigenvalues[-1]) + lam_c
        weights = 1.0 / (self.eigenvalues[:, None] + lam_c) - 1.0 / tail
        out = self.U @ (UtR * weights)
        out += R / tail
        return out

    def restrict(self, rows: np.ndarray) -> Nystrom:
        """The sketch of K[S, S] for the rows S = ``rows`` ((m,) int), reading no column of K.

        F Fᵀ = U Σ² Uᵀ restricted to S is (U_S Σ)(U_S Σ)ᵀ = K[S, P] K[P, P]⁻¹ K[P, S], the
        Nyström approximation of K[S, S] from the same pivots P (pivots outside S included),
        so K[S, S] minus it is still positive semi-definite. A thin SVD of U_S Σ, (m, r),
        makes it orthonormal again. Directions whose σ² fell below the full sketch's last
        σ_r² (mostly carried by pivots outside S) are dropped: K[S, S] − the sketch is about
        σ_r² there, as on the complement, so they take the tail's scaling σ_r² + λ. Kept,
        their tiny σ² made the tail tiny; 5 folds of N = 1,500 (rank 500) took 131 PCG
        iterations at ridge 1e-6 where the full problem takes 43; dropped, 41 (N = 3,000:
        63, the full problem 64).
        """
        rows = np.asarray(rows, dtype=np.int64)
        F = self.U[rows] * np.sqrt(self.eigenvalues)[None, :]
        U, s, _ = scipy.linalg.svd(F, full_matrices=False, check_finite=True)
        keep = max(1, int(np.sum(s**2 >= self.eigenvalues[-1])))
        return dataclasses.replace(self, U=U[:, :keep], eigenvalues=s[:keep] ** 2)


@dataclasses.dataclass(frozen=True, eq=False)
class PerGroup:
    """Column groups, each preconditioned on its own rows (k-fold selection: a group is a fold).

    rows: per group, its rows (m_g,) int; parts: per group, a preconditioner of
    K[rows_g, rows_g] + λI on m_g unknowns; group: (C,) int, each column's group. A column's
    result is zero outside its group's rows.
    """

    rows: tuple[np.ndarray, ...]
    parts: tuple[Preconditioner, ...]
    group: np.ndarray
    name: str

    @property
    def rank(self) -> int:
        return max(int(getattr(p, "rank", 0)) for p in self.parts)

    def apply_columns(self, R: np.ndarray, lam: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """R: (N, c) the columns ``columns`` (c,) of the system, lam: (c,) their ridges ->
        (N, c) float64, each column preconditioned by its group's part on its group's rows."""
        R = np.asarray(R, dtype=np.float64)
        out = np.zeros_like(R)
        groups = self.group[columns]
        for g in np.unique(groups):
            cols = np.flatnonzero(groups == g)
            at = np.ix_(self.rows[g], cols)
            out[at] = self.parts[g].apply(R[at], lam=lam[cols])
        return out


@runtime_checkable
class ColumnPreconditioner(Protocol):
    """A preconditioner whose columns differ by more than their ridge (PerGroup's folds,
    Falkon's per-column n): solve_pcg calls ``apply_columns`` with the columns' indices."""

    name: str

    def apply_columns(self, R: np.ndarray, lam: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """R: (n, c) the columns ``columns`` (c,) int of the system, lam: (c,) their ridges
        -> (n, c) float64."""
        ...


def per_group(M: Preconditioner, rows: list[np.ndarray], group: np.ndarray) -> Preconditioner:
    """M restricted to each group's rows (see PerGroup). A Nyström sketch is restricted by
    :meth:`Nystrom.restrict`; a diagonal or identity preconditioner restricted to rows is
    itself masked to them, so it comes back unchanged."""
    if not isinstance(M, Nystrom):
        return M
    parts = tuple(M.restrict(r) for r in rows)
    return PerGroup(tuple(np.asarray(r, dtype=np.int64) for r in rows), parts,
                    np.asarray(group, dtype=np.int64), M.name)  # fmt: skip


@runtime_checkable
class Preconditioner(Protocol):
    """What solve_pcg needs: apply(R (N, C) float64) -> (N, C) float64 ≈ (K + λI)⁻¹ R, and
    for a regularization path apply(R, lam=(C,) ridges) ≈ (K + λ_j I)⁻¹ r_j per column."""

    name: str

    def apply(self, R: np.ndarray, lam: np.ndarray | None = None) -> np.ndarray: ...


def identity() -> Identity:
    """The identity preconditioner (plain CG)."""
    return Identity()


def jacobi(op: GramOperator, lam: float) -> Jacobi:
    """Diagonal (Jacobi) preconditioner of K + λI. Reads only diag(K)."""
    d = op.diag() + _check_lam(lam)
    if not np.all(d > 0):
        raise ValueError(
            f"diag(K) + λ has {int(np.sum(~(d > 0)))} non-positive or NaN entries; K is not a "
            "valid Gram matrix there (check the store) or use a larger ridge"
        )
    return Jacobi(inv_diag=1.0 / d, diag=d - lam)


def nystrom(
    op: GramOperator,
    rank: int,
    lam: float,
    pivots: Literal["uniform", "rpcholesky"] = "rpcholesky",
    seed: int | np.random.Generator | None = SolveOptions.seed,
    block: int = SolveOptions.pivot_block,
    on_pivots: Callable[[int], None] | None = None,
) -> Nystrom:
    """Nyström preconditioner of K + λI from ``rank`` columns of K.

    pivots="uniform" reads ``rank`` uniformly sampled columns in one batch; "rpcholesky" picks
    them by randomly pivoted Cholesky (Chen, Epperly, Tropp, Webber). ``block`` > 1 selects the
    accelerated variant (Epperly, Tropp, Webber 2024): ``block`` candidate columns are read per
    ``op.columns`` call and near-duplicates rejected, so a few more than ``rank`` columns are read.
    The rank may come out below ``rank`` if K is numerically of lower rank.
    """
    lam = _check_lam(lam)
    n = op.shape[0]
    if not 1 <= rank <= n:
        raise ValueError(
            f"rank={rank} must be in [1, N={n}]; Frangella et al.: near the "
            "effective dimension at λ, e.g. a few hundred"
        )
    rng = np.random.default_rng(seed)
    if pivots == "uniform":
        F, piv, read = _uniform_factor(op, rank, rng)
    elif pivots == "rpcholesky":
        F, piv, read = rpcholesky(op, rank, rng, block=block, on_pivots=on_pivots)
    else:
        raise ValueError(f"pivots={pivots!r} is not supported; use 'uniform' or 'rpcholesky'")
    if F.shape[1] == 0:
        raise ValueError("diag(K) is zero: there is nothing to sketch; check the Gram matrix")
    U, s, _ = scipy.linalg.svd(F, full_matrices=False, check_finite=True)
    return Nystrom(
        U=U, eigenvalues=s**2, lam=lam, pivots=piv, name=f"nystrom-{pivots}", columns_read=read
    )


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lam={lam!r} must be a finite ridge >= 0 (see resolve_ridge)")
    return lam


def _uniform_factor(
    op: GramOperator, rank: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """F = K[:, S] L⁻ᵀ with L Lᵀ = K[S, S] + shift, S uniform without replacement."""
    S = np.sort(rng.choice(op.shape[0], size=rank, replace=False))
    C = op.columns(S)
    L = _shifted_cholesky(C[S])
    return scipy.linalg.solve_triangular(L, C.T, lower=True).T, S, rank


def _shifted_cholesky(W: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of W + shift·I, shift = eps·tr(W), grown until W is factorable."""
    W = 0.5 * (W + W.T)
    shift = np.finfo(np.float64).eps * max(float(np.trace(W)), np.finfo(np.float64).tiny)
    for _ in range(8):
        try:
            return scipy.linalg.cholesky(W + shift * np.eye(len(W)), lower=True)
        except np.linalg.LinAlgError:
            shift *= 100.0
    raise ValueError(
        "a pivot block K[S, S] is not positive definite even after a diagonal shift: the Gram "
        "matrix is not positive semi-definite; check the store (or the kernel) for corruption"
    )


def rpcholesky(
    op: GramOperator, rank: int, rng: np.random.Generator, block: int = SolveOptions.pivot_block,
    on_pivots: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """Randomly pivoted Cholesky: K ≈ F Fᵀ from ``rank`` pivot columns.

    Keeps the residual diagonal d = diag(K − F Fᵀ) and samples pivots with probability ∝ d.
    block=1 is the sequential algorithm (Chen et al.); block=b samples b candidates at once,
    reads their columns in one call and accepts each by rejection sampling against the residual
    updated for the candidates already accepted (accelerated RPCholesky, Epperly et al. 2024).
    Returns F: (N, r) float64, pivots: (r,) int64, and the number of columns read.
    on_pivots: called with the pivots accepted so far after every round (progress).
    """
    n = op.shape[0]
    d = op.diag()
    if not np.all(np.isfinite(d)):
        raise ValueError("diag(K) holds NaN/Inf; the Gram matrix is corrupt (verify the store)")
    floor = _NOISE * np.abs(d)
    d = np.where(d > floor, d, 0.0)
    F = np.zeros((n, rank), dtype=np.float64)
    piv: list[int] = []
    read = 0
    while len(piv) < rank and d.sum() > 0:
        cand = rng.choice(n, size=min(block, rank - len(piv)), p=d / d.sum())
        read += len(cand)
        new, keep, resid = _rpc_round(op, F[:, : len(piv)], cand, d, floor, rng)
        F[:, len(piv) : len(piv) + len(keep)] = new
        piv.extend(int(c) for c in cand[keep])
        d = d - np.sum(new**2, axis=1)
        d[cand[resid <= floor[cand]]] = 0.0  # the tracked residual was stale: it is noise
        d[cand[keep]] = 0.0
        d[d <= floor] = 0.0
        if on_pivots is not None:
            on_pivots(len(piv))
    return F[:, : len(piv)], np.asarray(piv, dtype=np.int64), read


def _rpc_round(
    op: GramOperator,
    F: np.ndarray,
    cand: np.ndarray,
    d: np.ndarray,
    floor: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read the candidates' columns (one ``op.columns`` call) and accept some of them.

    F: (N, k) factor so far; cand: (b,) candidate pivots. Returns the new factor columns
    (N, a), the accepted positions in ``cand`` (a,), and the candidates' residuals (b,).
    """
    G = op.columns(cand) - F @ F[cand].T
    H = G[cand]
    keep = _accept(H, d[cand], floor[cand], rng)
    if not keep.size:
        return np.zeros((len(G), 0)), keep, np.diag(H)
    L = _shifted_cholesky(H[np.ix_(keep, keep)])
    return scipy.linalg.solve_triangular(L, G[:, keep].T, lower=True).T, keep, np.diag(H)


def _accept(
    H: np.ndarray, d: np.ndarray, floor: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Rejection step of accelerated RPCholesky on the candidates' residual block H (b, b).

    Candidate i is accepted with probability (its residual given the accepted ones) / d_i, which
    rejects duplicates and near-duplicates; a residual at or below ``floor`` (rounding noise) is
    never accepted. Returns the accepted positions (k,) int64.
    """
    H = 0.5 * (H + H.T)
    S = H.copy()
    keep: list[int] = []
    for i in range(len(H)):
        if S[i, i] > floor[i] and rng.random() * d[i] < S[i, i]:
            keep.append(i)
            S = S - np.outer(S[:, i], S[i, :]) / S[i, i]
    return np.asarray(keep, dtype=np.int64)
