"""Nyström kernel ridge regression with Falkon's preconditioner (pure numpy/scipy/JAX; no Ray).

With centres C = X[S], |S| = M ≪ N, the coefficients α (M, c) solve the normal equations

    (K_nmᵀ K_nm + λ K_mm) α = K_nmᵀ y,        K_nm = K(X, C) (N, M),  K_mm = K(C, C),

and predictions are K(X*, C) α. λ is the exact method's absolute ridge (λ = ridge · trace(K)/N,
:func:`ntk_scale.linalg.pcg.resolve_ridge`), so with every row a centre (M = N) α is the exact
(K + λI)⁻¹ y. The system is solved by :func:`ntk_scale.linalg.pcg.solve_pcg` (checkpoints,
resume, ConvergenceWarning, a ridge per column) with the preconditioner of Falkon (Rudi,
Carratino & Rosasco 2017): with T upper triangular, K_mm = TᵀT, and A = chol(T Tᵀ/M + (λ/n) I),

    P = n Tᵀ Aᵀ A T = (n/M) K_mm² + λ K_mm,     P⁻¹ = (1/n) T⁻¹ A⁻¹ A⁻ᵀ T⁻ᵀ,

(K_nmᵀK_nm ≈ (n/M) K_mm² for centres drawn from the n training rows), applied by four
triangular solves. At M = N, P is the system itself.

K_nm is seen through :class:`KnmProducts`: ``normal(P, columns)`` = K_nmᵀ (mask ⊙ (K_nm P))
and ``rhs(Y)`` = K_nmᵀ (mask ⊙ Y), one pass over K_nm serving every column (ridges, folds,
targets). Here it is computed by row blocks (:class:`KernelBlocks`, X streamed block by block)
or read from a rectangular Gram store (:class:`StoreBlocks`), and summed by
:func:`block_normal` / :func:`block_rhs`, the one place that does that arithmetic.

Memory (float64): M² for T, M² per distinct λ/n for A (so M²·(1 + distinct ridges) in all;
M = 20,000: 3.2 GB each), M² transiently while K_mm is factored in place, plus O(block · M) for
one block of K_nm (its dtype, and a float64 copy) and O(M · C) for the PCG vectors; the row
masks, when given, are (N, C) bool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dsyrk as _syrk

from ntk_scale.kernels import Kernel, diag_blocks
from ntk_scale.linalg.operators import KernelOperator
from ntk_scale.linalg.pcg import PCGResult, PCGState, solve_pcg
from ntk_scale.linalg.preconditioners import Preconditioner, identity, rpcholesky
from ntk_scale.options import SolveOptions

#: Rows of X per block of K(X, C): a block costs block · M of its dtype plus a float64 copy.
BLOCK = 1024
#: RPCholesky selects centres among a uniform pool of POOL_FACTOR · M rows ...
POOL_FACTOR = 4
#: ... capped so that its (pool, M) float64 factor fits in POOL_BYTES (never below M rows).
POOL_BYTES = 2 << 30
#: Candidate centres per RPCholesky round (accelerated RPCholesky, Epperly et al. 2024).
PIVOT_BLOCK = 128
#: K_mm is factored as K_mm + jitter·I, jitter starting at eps·trace(K_mm) and grown ×100 until
#: it factors; the system then uses TᵀT = K_mm + jitter·I for K_mm everywhere.
JITTER_TRIES = 8

Method = Literal["rpcholesky", "uniform"]


# -- centre selection ---------------------------------------------------------------------------
def select_centers(
    kernel: Kernel,
    x: Any,
    m: int,
    method: Method = "rpcholesky",
    kind: str = "ntk",
    dtype: str = "float64",
    seed: int = SolveOptions.seed,
    pool: int | None = None,
    block: int = PIVOT_BLOCK,
) -> np.ndarray:
    """M centre rows of x: sorted (≤ m,) int64 indices, distinct, deterministic by ``seed``.

    x: (N, d) rows (numpy, memmap, Zarr, dask: rows are read by index, see :func:`take_rows`).
    method="uniform": ``numpy.random.default_rng(seed).choice(N, m, replace=False)``.
    method="rpcholesky": randomly pivoted Cholesky (Chen, Epperly, Tropp, Webber 2022) of the
    kernel matrix of a uniform candidate pool (its (pool, m) factor would be too big on all N
    rows): pool = min(N, POOL_FACTOR · m) rows by default, capped so the factor fits in
    POOL_BYTES, never below m (where the cap leaves only m rows, every pool row is a centre:
    uniform). The kernel is computed in ``dtype`` on the pool only. RPCholesky may return
    fewer than m centres where the pool's kernel matrix is numerically of lower rank (more
    would add only rounding noise); callers use ``len`` of the result.
    """
    n = int(x.shape[0])
    m = _check_m(m, n)
    rng = np.random.default_rng(seed)
    if method == "uniform":
        return np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)
    if method != "rpcholesky":
        raise ValueError(f"method={method!r} is not a centre selection; use 'rpcholesky' or "
                         "'uniform'")  # fmt: skip
    size = default_pool(n, m) if pool is None else int(pool)
    if not m <= size <= n:
        raise ValueError(f"pool={pool!r} must lie in [m={m}, N={n}]; omit it for the default")
    cand = np.sort(rng.choice(n, size=size, replace=False))
    op = KernelOperator(kernel, take_rows(x, cand), kind, dtype, block=BLOCK)
    _, piv, _ = rpcholesky(op, m, rng, block=block)
    return np.sort(cand[piv]).astype(np.int64)


def default_pool(n: int, m: int) -> int:
    """Rows of RPCholesky's candidate pool: min(N, POOL_FACTOR · m, POOL_BYTES / (8 m)), ≥ m."""
    return max(m, min(n, POOL_FACTOR * m, POOL_BYTES // (8 * m)))


def _check_m(m: Any, n: int) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= n:
        raise ValueError(f"centers={m!r} must be an integer in [1, N={n}]; use fewer centres "
                         "than rows (a few thousand to tens of thousands)")  # fmt: skip
    return int(m)


def take_rows(x: Any, idx: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """x[idx] as an (m, d) array for sorted idx (m,) int. numpy arrays and memory maps are
    indexed directly; other sources (Zarr, dask, FlatRows) are read ``block`` rows at a time,
    only the blocks holding a selected row."""
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(x, np.ndarray):
        return np.asarray(x[idx])
    parts = []
    for b in np.unique(idx // block):
        r0 = int(b) * block
        rows = np.asarray(x[r0 : min(r0 + block, int(x.shape[0]))])
        parts.append(rows[idx[(idx >= r0) & (idx < r0 + block)] - r0])
    return np.concatenate(parts) if parts else np.asarray(x[0:0])


# -- K(X, C) by row blocks ------------------------------------------------------------------
@runtime_checkable
class KnmBlocks(Protocol):
    """K_nm = K(X, C) as row blocks. shape: (N, M). Iterating yields (rows, K_b): rows a
    slice of [0, N), K_b (rows, M) float32 or float64, covering [0, N) once, in order."""

    shape: tuple[int, int]

    def __iter__(self) -> Iterator[tuple[slice, np.ndarray]]: ...


@runtime_checkable
class KnmProducts(Protocol):
    """What the Nyström system needs of K_nm (N, M); a Ray implementation sums
    :func:`block_normal` over its workers' blocks. mask: (N, C) bool or None, the rows each of
    the system's C columns trains on (a cross-validation fold), held by the implementation."""

    shape: tuple[int, int]
    mask: np.ndarray | None

    def normal(self, P: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """K_nmᵀ (mask[:, columns] ⊙ (K_nm P)). P: (M, c) float64, columns: (c,) int, the
        system's columns P holds -> (M, c) float64."""
        ...

    def rhs(self, Y: np.ndarray) -> np.ndarray:
        """K_nmᵀ (mask ⊙ Y). Y: (N, C) float64 -> (M, C) float64."""
        ...


def block_normal(K_b: np.ndarray, P: np.ndarray, mask_b: np.ndarray | None) -> np.ndarray:
    """One block's share of K_nmᵀ (mask ⊙ (K_nm P)): K_b (b, M) any float dtype (upcast),
    P (M, c) float64, mask_b (b, c) bool or None -> (M, c) float64."""
    K = np.asarray(K_b, dtype=np.float64)
    KP = K @ P
    if mask_b is not None:
        KP *= mask_b
    return K.T @ KP


#: Widest block one BLAS syrk call forms. OpenBLAS (0.3.30 in scipy, 0.3.31 in numpy, on this
#: machine's SkylakeX kernels) segfaults in dsyrk for n = 20,000 (k = 1,024 and k = 20,000;
#: n = 10,000 is fine), and numpy sends A @ A.T to syrk: wider products go in column panels
#: of this width, a syrk for each diagonal block and a GEMM for the rest of its column panel.
SYRK_PANEL = 4096


def add_gram(H: np.ndarray, K_b: np.ndarray, panel: int = SYRK_PANEL) -> None:
    """H += K_bᵀK_b on H's upper triangle, in place (n·m² flops, half a GEMM's; 1.4x the
    column-panel GEMMs it replaced at m = 6000 here): H (M, M) float64, C- or F-contiguous;
    K_b (b, M) any float dtype, upcast (one Fortran-order copy, which syrk's transposed form
    reads fastest). Up to ``panel`` columns one BLAS dsyrk call; wider H in column panels
    (:data:`SYRK_PANEL`).

    The products run in float64 even for a float32 Gram: K̃ᵀK̃ of rounded entries K̃ is still
    positive semi-definite, but float32 products round H by ~√b·u·‖H‖, while λK_mm, what keeps
    (H + λK_mm) positive definite, is ~λ/(N·diag) of ‖H‖ (1e-8 at N = 10⁶). With float32
    products PCG met negative curvature on 10⁶ rows (benchmarks/million_rows.py).
    :func:`mirror_upper` fills the lower triangle once all blocks are in."""
    if H.dtype != np.float64 or not (H.flags.c_contiguous or H.flags.f_contiguous):
        raise TypeError(f"add_gram needs a contiguous float64 H, got {H.dtype} "
                        f"(flags {H.flags}); allocate it with np.zeros((m, m))")  # fmt: skip
    K = np.asfortranarray(K_b, dtype=np.float64)
    m = K.shape[1]
    if K.shape[0] == 0:
        return
    if m <= panel:
        # BLAS sees a C-contiguous H as its transpose: its lower triangle is H's upper one.
        c, lower = (H, 0) if H.flags.f_contiguous else (H.T, 1)
        out = _syrk(1.0, K, beta=1.0, c=c, trans=1, lower=lower, overwrite_c=1)
        if not np.shares_memory(out, H):  # pragma: no cover - scipy copied c: keep the sum
            np.copyto(c, out)
        return
    for j0 in range(0, m, panel):
        j1 = min(j0 + panel, m)
        cols = K[:, j0:j1]  # a Fortran-order column slice: contiguous
        diag = _syrk(1.0, cols, trans=1, lower=0)  # (p, p), its upper triangle
        block = H[j0:j1, j0:j1]
        block += np.triu(diag)
        if j0:
            H[:j0, j0:j1] += K[:, :j0].T @ cols


def mirror_upper(H: np.ndarray, panel: int = 2048) -> np.ndarray:
    """The lower triangle of H copied from the upper one (what :func:`add_gram` leaves), in
    place, panel by panel; returns H."""
    m = H.shape[0]
    for j0 in range(0, m, panel):
        j1 = min(j0 + panel, m)
        H[j1:, j0:j1] = H[j0:j1, j1:].T
        blk = H[j0:j1, j0:j1]
        blk[np.tril_indices(j1 - j0, -1)] = blk.T[np.tril_indices(j1 - j0, -1)]
    return H


def block_rhs(K_b: np.ndarray, Y_b: np.ndarray, mask_b: np.ndarray | None) -> np.ndarray:
    """One block's share of K_nmᵀ (mask ⊙ Y): K_b (b, M), Y_b (b, C) float64, mask_b (b, C)
    bool or None -> (M, C) float64."""
    Y = np.asarray(Y_b, dtype=np.float64)
    if mask_b is not None:
        Y = Y * mask_b
    return np.asarray(K_b, dtype=np.float64).T @ Y


@dataclasses.dataclass(frozen=True, eq=False)
class BlockProducts:
    """:class:`KnmProducts` from row blocks, in this process: one pass over ``blocks`` per call.
    blocks: a :class:`KnmBlocks`; mask: (N, C) bool or None."""

    blocks: KnmBlocks
    mask: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape

    def normal(self, P: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """K_nmᵀ (mask[:, columns] ⊙ (K_nm P)): P (M, c) -> (M, c) float64."""
        P = np.asarray(P, dtype=np.float64)
        out = np.zeros_like(P)
        for rows, K_b in self.blocks:
            out += block_normal(K_b, P, self._mask(rows, columns))
        return out

    def rhs(self, Y: np.ndarray) -> np.ndarray:
        """K_nmᵀ (mask ⊙ Y): Y (N, C) -> (M, C) float64."""
        Y = np.asarray(Y, dtype=np.float64)
        out = np.zeros((self.shape[1], Y.shape[1]))
        for rows, K_b in self.blocks:
            out += block_rhs(K_b, Y[rows], self._mask(rows, slice(None)))
        return out

    def _mask(self, rows: slice, columns: Any) -> np.ndarray | None:
        return None if self.mask is None else self.mask[rows, columns]


class KernelBlocks:
    """K(X, C) computed block by block in this process with the kernel's tile function.

    kernel: any :class:`ntk_scale.kernels.Kernel` (stax networks included); x: (N, d) rows,
    any sliceable source read ``block`` rows at a time; centers: (M, d) the centre rows
    (:func:`take_rows`). center_index: (M,) int, where the centres sit in x (when they are rows
    of x), so that K(x_i, x_i) is the exact diagonal there, as in a symmetric Gram; None for
    other inputs (X* in predict). Edge blocks are padded (:meth:`Kernel.pad_block`) where the
    kernel compiles per shape. Blocks come in ``dtype`` (float32 or float64). Memory: one
    (block, M) block and the kernel's working set for it.
    """

    def __init__(self, kernel: Kernel, x: Any, centers: Any, kind: str = "ntk",
                 dtype: str = "float64", block: int = BLOCK,
                 center_index: np.ndarray | None = None) -> None:  # fmt: skip
        if block < 1:
            raise ValueError(f"block={block} must be >= 1 (rows of X per block of K(X, C))")
        self.kernel, self.x, self.kind, self.dtype = kernel, x, kind, dtype
        self.centers = np.asarray(centers, dtype=dtype)
        self.block = int(min(block, max(int(x.shape[0]), 1)))
        self.shape = (int(x.shape[0]), int(self.centers.shape[0]))
        self.center_index = None if center_index is None else np.asarray(center_index, np.int64)
        self._diag = None
        if self.center_index is not None:
            self._diag = diag_blocks(kernel, self.centers, kind, dtype, block=self.block)

    def __iter__(self) -> Iterator[tuple[slice, np.ndarray]]:
        return self.rows(0)

    def rows(self, start: int, stop: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """The blocks of rows [start, stop) (stop None: to N); start a multiple of block."""
        fn = self.kernel.tile_function(self.kind, self.dtype)
        n = self.shape[0] if stop is None else min(int(stop), self.shape[0])
        for r0 in range(int(start), n, self.block):
            r1 = min(r0 + self.block, n)
            xb = self.kernel.pad_block(np.asarray(self.x[r0:r1], dtype=self.dtype), self.block)
            K_b = np.array(np.asarray(fn(xb, self.centers))[: r1 - r0])
            self._exact_diagonal(K_b, r0, r1)
            yield slice(r0, r1), K_b

    def _exact_diagonal(self, K_b: np.ndarray, r0: int, r1: int) -> None:
        """Put K(x_i, x_i) where a centre meets its own row."""
        if self.center_index is None:
            return
        j = np.flatnonzero((self.center_index >= r0) & (self.center_index < r1))
        K_b[self.center_index[j] - r0, j] = self._diag[j]


class StoreBlocks:
    """K(X, C) read from a rectangular Gram store (``GramStore.create(url, spec, x, x_cols=C)``)
    one row panel at a time: store is a GramStore (n_rows N, n_cols M). Memory: one panel."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.shape = tuple(int(v) for v in store.shape)

    def __iter__(self) -> Iterator[tuple[slice, np.ndarray]]:
        plan = self.store.plan
        for i in range(plan.row_blocks):
            r0, r1 = plan.row_range(i)
            yield slice(r0, r1), self.store.row_panel(i)


class ArrayBlocks:
    """K(X, C) held as an (N, M) array (in memory, or a memory map on disk), served ``block``
    rows at a time: computed once (:func:`materialize`) where N · M fits, instead of on every
    iteration."""

    def __init__(self, K_nm: Any, block: int = BLOCK) -> None:
        if len(getattr(K_nm, "shape", ())) != 2:
            raise ValueError(f"K_nm must be an (N, M) array, got shape {np.shape(K_nm)}")
        self.K_nm, self.block = K_nm, int(block)
        self.shape = (int(K_nm.shape[0]), int(K_nm.shape[1]))

    def __iter__(self) -> Iterator[tuple[slice, np.ndarray]]:
        for r0 in range(0, self.shape[0], self.block):
            rows = slice(r0, min(r0 + self.block, self.shape[0]))
            yield rows, np.asarray(self.K_nm[rows])


def materialize(blocks: KnmBlocks, out: Any = None) -> Any:
    """All of K_nm (N, M) in the blocks' dtype, one pass; out: an (N, M) array to fill (a
    memory map, say), default a new one."""
    for rows, K_b in blocks:
        if out is None:
            out = np.empty(blocks.shape, dtype=K_b.dtype)
        out[rows] = K_b
    return out


def rows_of(blocks: KnmBlocks, rows: np.ndarray) -> np.ndarray:
    """K_nm[rows] as (len(rows), M) float64, in one pass (K_mm from a store: rows = S)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.size, blocks.shape[1]))
    for sl, K_b in blocks:
        j = np.flatnonzero((rows >= sl.start) & (rows < sl.stop))
        if j.size:
            out[j] = K_b[rows[j] - sl.start]
    return out


def kernel_kmm(kernel: Kernel, centers: Any, kind: str = "ntk", dtype: str = "float64",
               block: int = BLOCK) -> np.ndarray:  # fmt: skip
    """K_mm = K(C, C) (M, M) float64 by blocks of the same path as K_nm's rows (its diagonal
    the exact formula), symmetrised. centers: (M, d)."""
    index = np.arange(int(np.shape(centers)[0]))
    blocks = KernelBlocks(kernel, centers, centers, kind, dtype, block, center_index=index)
    K = np.empty(blocks.shape)
    for sl, K_b in blocks:
        K[sl] = K_b
    return symmetrize(K)


def symmetrize(K: np.ndarray, block: int = 2048) -> np.ndarray:
    """(K + Kᵀ)/2 in place for a square float64 K, block pair by block pair (no second
    M x M array)."""
    m = K.shape[0]
    for i in range(0, m, block):
        for j in range(i, m, block):
            upper, lower = K[i : i + block, j : j + block], K[j : j + block, i : i + block]
            s = 0.5 * (upper + lower.T)
            upper[...], lower[...] = s, s.T
    return K


# -- the system and Falkon's preconditioner ---------------------------------------------------
def kmm_factor(K_mm: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """T upper triangular with TᵀT = K_mm + jitter·I: (M, M) float64. The jitter starts at
    eps·trace(K_mm) and grows ×100 (JITTER_TRIES times) until K_mm factors (duplicate or
    nearly dependent centres make it singular). overwrite: factor K_mm's own memory."""
    K = np.asarray(K_mm, dtype=np.float64)
    trace = float(np.trace(K))
    if not np.isfinite(trace) or trace <= 0:
        raise ValueError(f"trace(K_mm) = {trace!r}: the centres' kernel matrix is not a valid "
                         "Gram matrix; check the kernel and the centre rows")  # fmt: skip
    jitter = 0.0
    for k in range(JITTER_TRIES + 1):
        try:
            W = K + jitter * np.eye(len(K)) if jitter else K
            return scipy.linalg.cholesky(W, lower=False, overwrite_a=overwrite and k > 0)
        except np.linalg.LinAlgError:
            jitter = np.finfo(np.float64).eps * trace * 100.0**k
    raise ValueError(
        "K_mm is not positive definite even with a jitter of "
        f"{jitter:.1e}: the centres' kernel matrix is not PSD; check the kernel or the data"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class NystromSystem:
    """(K_nmᵀ mask_j K_nm + λ_j TᵀT) α_j, an M x M SPD operator for solve_pcg
    (:class:`ntk_scale.linalg.pcg.RidgeOperator`). products: a :class:`KnmProducts`;
    T: (M, M) upper, TᵀT = K_mm (with its jitter)."""

    products: KnmProducts
    T: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        m = self.T.shape[0]
        return (m, m)

    def ridge_matmat(self, P: np.ndarray, lam: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """P (M, c) float64, lam (c,), columns (c,) int -> (M, c) float64."""
        out = self.products.normal(P, columns)
        out += np.asarray(lam)[None, :] * (self.T.T @ (self.T @ P))
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Falkon:
    """Falkon's preconditioner P⁻¹ = (1/n) T⁻¹ A⁻¹ A⁻ᵀ T⁻ᵀ of (n/M) K_mm² + λ K_mm, one A per
    distinct λ/n (see the module docstring). T: (M, M) upper; factors: λ/n -> A (M, M) upper;
    n: (C,) float, each column's number of training rows."""

    T: np.ndarray
    factors: dict[float, np.ndarray]
    n: np.ndarray
    name: str = "falkon"

    @property
    def rank(self) -> int:
        return int(self.T.shape[0])

    def apply(self, R: np.ndarray, lam: np.ndarray | None = None) -> np.ndarray:
        """R: (M, c) -> (M, c) float64 for the first c columns (lam: (c,) their ridges; None:
        one ridge for all, which needs one factor)."""
        R = np.asarray(R, dtype=np.float64)
        if lam is None:
            if len(self.factors) != 1 or len(np.unique(self.n)) != 1:
                raise ValueError("Falkon.apply without lam needs one ridge and one n; pass lam")
            lam = np.full(R.shape[1], next(iter(self.factors)) * float(self.n[0]))
        return self.apply_columns(R, np.asarray(lam, np.float64), np.arange(R.shape[1]))

    def apply_columns(self, R: np.ndarray, lam: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """R: (M, c) the system's columns ``columns`` (c,) int, lam: (c,) -> (M, c) float64."""
        R = np.asarray(R, dtype=np.float64)
        n = self.n[np.asarray(columns)]
        keys = np.asarray(lam, dtype=np.float64) / n
        out = np.empty_like(R)
        for key in np.unique(keys):
            cols = np.flatnonzero(keys == key)
            A = self.factors.get(float(key))
            if A is None:
                A = falkon_factor(self.T, float(key))
            out[:, cols] = _falkon_solve(self.T, A, R[:, cols]) / n[cols]
        return out


def falkon_factor(T: np.ndarray, ratio: float) -> np.ndarray:
    """A upper with AᵀA = T Tᵀ / M + ratio · I, ratio = λ/n: (M, M) float64."""
    m = T.shape[0]
    W = np.zeros((m, m))
    add_gram(W, T.T)  # T Tᵀ's upper triangle, all Cholesky reads (not numpy's T @ T.T: syrk)
    W /= m
    W[np.diag_indices(m)] += ratio
    return scipy.linalg.cholesky(W, lower=False, overwrite_a=True)


def _falkon_solve(T: np.ndarray, A: np.ndarray, R: np.ndarray) -> np.ndarray:
    """T⁻¹ A⁻¹ A⁻ᵀ T⁻ᵀ R by four triangular solves."""
    solve = scipy.linalg.solve_triangular
    Z = solve(T, R, trans="T", lower=False)
    Z = solve(A, Z, trans="T", lower=False)
    Z = solve(A, Z, lower=False)
    return solve(T, Z, lower=False)


def falkon(T: np.ndarray, lam: Any, n: Any) -> Falkon:
    """Falkon's preconditioner for columns with ridges lam (C,) (or one) and training-row
    counts n (C,) (or one: N without masks). T: (M, M) upper, TᵀT = K_mm."""
    lam, n = np.broadcast_arrays(
        np.atleast_1d(np.asarray(lam, dtype=np.float64)),
        np.atleast_1d(np.asarray(n, dtype=np.float64)),
    )
    n = n.copy()
    if not (np.all(n > 0) and np.all(np.isfinite(lam)) and np.all(lam >= 0)):
        raise ValueError(f"falkon needs n > 0 and finite ridges >= 0, got n={n}, lam={lam}")
    ratios = {float(r) for r in lam / n}
    return Falkon(T, {r: falkon_factor(T, r) for r in sorted(ratios)}, n)


# -- solving ----------------------------------------------------------------------------------
class NystromResult(NamedTuple):
    """What :func:`solve_nystrom` returns: alpha (M, C) float64 coefficients on the centres,
    and pcg, the PCGResult (iterations, residuals of the normal equations, converged)."""

    alpha: np.ndarray
    pcg: PCGResult


def solve_nystrom(
    products: KnmProducts,
    K_mm: np.ndarray,
    Y: np.ndarray,
    lam: Any,
    preconditioner: Literal["falkon", "identity"] | Preconditioner = "falkon",
    tol: float = SolveOptions.tol,
    max_iter: int | None = None,
    x0: np.ndarray | None = None,
    callback: Any = None,
    state: PCGState | None = None,
) -> NystromResult:
    """α solving (K_nmᵀ mask_j K_nm + λ_j K_mm) α_j = K_nmᵀ (mask_j ⊙ y_j) for every column j.

    products: K_nm (N, M) (:class:`BlockProducts` in process; its mask (N, C) bool selects
    each column's training rows, None: all). K_mm: (M, M) float64 (factored with a jitter, see
    :func:`kmm_factor`). Y: (N, C) targets. lam: absolute ridge(s), one or (C,) (see
    resolve_ridge: the exact method's convention). Falkon's preconditioner takes each column's
    λ and its own n (its number of training rows). tol, max_iter, x0 (M, C), callback, state:
    as for solve_pcg, on the normal equations (‖r‖ / ‖K_nmᵀ y‖). One pass over K_nm per
    iteration serves every active column.
    """
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[0] != products.shape[0]:
        raise ValueError(f"Y must have shape ({products.shape[0]}, C), got {Y.shape}; pass a "
                         "vector as y.reshape(-1, 1)")  # fmt: skip
    T = kmm_factor(K_mm)
    system = NystromSystem(products, T)
    mask = products.mask
    n = np.full(Y.shape[1], float(Y.shape[0])) if mask is None else mask.sum(axis=0)
    lam_c = np.broadcast_to(np.asarray(lam, dtype=np.float64), (Y.shape[1],))
    if isinstance(preconditioner, str):
        if preconditioner not in ("falkon", "identity"):
            raise ValueError(f"preconditioner={preconditioner!r}: use 'falkon' or 'identity'")
        M = falkon(T, lam_c, n) if preconditioner == "falkon" else identity()
    else:
        M = preconditioner
    b = products.rhs(Y)
    result = solve_pcg(system, b, lam_c.copy(), M, tol, max_iter, x0=x0, callback=callback,
                       state=state)  # fmt: skip
    return NystromResult(result.x, result)


def fit_nystrom(
    kernel: Kernel, x: Any, Y: np.ndarray, centers: np.ndarray, lam: Any, kind: str = "ntk",
    dtype: str = "float64", block: int = BLOCK, mask: np.ndarray | None = None,
    keep: bool = False, **solve: Any,
) -> NystromResult:  # fmt: skip
    """In-process Nyström fit: x (N, d) rows, Y (N, C), centers (M,) sorted row indices of x
    (:func:`select_centers`), lam one or (C,) absolute ridges, mask (N, C) bool or None;
    ``solve``: keywords of :func:`solve_nystrom`. keep=False: K_nm is recomputed on every
    iteration (memory O(block · M)); True: computed once and held, N · M of ``dtype``."""
    C = take_rows(x, centers)
    blocks = KernelBlocks(kernel, x, C, kind, dtype, block, center_index=centers)
    if keep:
        blocks = ArrayBlocks(materialize(blocks), block)
    K_mm = kernel_kmm(kernel, C, kind, dtype, block)
    return solve_nystrom(BlockProducts(blocks, mask), K_mm, Y, lam, **solve)


def predict_nystrom(kernel: Kernel, x_star: Any, centers_x: np.ndarray, alpha: np.ndarray,
                    kind: str = "ntk", dtype: str = "float64",
                    block: int = BLOCK) -> np.ndarray:  # fmt: skip
    """K(X*, C) α by row blocks: x_star (N*, d), centers_x (M, d) the centre rows, alpha
    (M, C) -> (N*, C) float64. (The resumable distributed path is ntk_scale.predict with the
    centres as its training rows.)"""
    alpha = np.asarray(alpha, dtype=np.float64)
    out = np.empty((int(x_star.shape[0]), alpha.shape[1]))
    for rows, K_b in KernelBlocks(kernel, x_star, centers_x, kind, dtype, block):
        out[rows] = np.asarray(K_b, dtype=np.float64) @ alpha
    return out


def mean_diagonal(kernel: Kernel, x: Any, kind: str = "ntk", dtype: str = "float64",
                  block: int = BLOCK) -> float:  # fmt: skip
    """trace(K)/N of the full K(X, X) from its exact diagonal (one pass over x): the scale of
    the relative ridge, λ = ridge · mean_diagonal (resolve_ridge's convention)."""
    return float(np.mean(diag_blocks(kernel, x, kind, dtype, block=block)))
