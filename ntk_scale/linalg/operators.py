"""Gram operators: what the solver and the preconditioners see of a kernel matrix K (N, N).

The solver needs only ``matmat``; Nyström / RPCholesky need ``diag`` and ``columns``. Every
operator returns float64 whatever its storage dtype, so all solver arithmetic is float64.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ntk_scale.kernels import Kernel, check_features
from ntk_scale.linalg.columns import kernel_columns
from ntk_scale.plan import DEFAULT_TILE, BlockPlan


@runtime_checkable
class GramOperator(Protocol):
    """A symmetric positive semi-definite N x N Gram matrix K, seen through products.

    shape: (N, N). dtype: the numpy dtype K is stored (or computed) in.
    """

    shape: tuple[int, int]
    dtype: np.dtype

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """K @ P. P: (N, C) float64 -> (N, C) float64."""
        ...

    def diag(self) -> np.ndarray:
        """diag(K): (N,) float64."""
        ...

    def columns(self, idx: Any) -> np.ndarray:
        """K[:, idx]. idx: (m,) int -> (N, m) float64."""
        ...


def check_block(P: Any, n: int) -> np.ndarray:
    """Validate a right-hand block for an (n, n) operator. Returns it as (n, C) float64."""
    arr = np.asarray(P, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(
            f"matmat expects an (N, C) block with N={n}, got shape {arr.shape}; "
            "pass vectors as P.reshape(-1, 1)"
        )
    return arr


def check_indices(idx: Any, n: int) -> np.ndarray:
    """Validate column indices for an (n, n) operator. Returns them as (m,) int64."""
    arr = np.asarray(idx)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"columns expects a 1-D integer index array, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(
            f"column indices must lie in [0, {n}), got min {arr.min()} max {arr.max()}"
        )
    return arr


class DenseOperator:
    """An in-memory Gram matrix. K: (N, N) float32 or float64 array (kept as given, not copied).

    Products with float32 storage are taken in float64 one row block at a time, so the extra
    memory is ``block`` x N float64 rather than a float64 copy of K.
    """

    def __init__(self, K: Any, block: int = DEFAULT_TILE) -> None:
        K = np.asarray(K)
        if K.ndim != 2 or K.shape[0] != K.shape[1]:
            raise ValueError(f"K must be a square (N, N) matrix, got shape {K.shape}")
        if K.dtype not in (np.float32, np.float64):
            raise ValueError(f"K must be float32 or float64, got {K.dtype}; convert it first")
        self.K = K
        self.shape = (int(K.shape[0]), int(K.shape[1]))
        self.dtype = K.dtype
        self.block = int(block)

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """K @ P. P: (N, C) float64 -> (N, C) float64."""
        P = check_block(P, self.shape[0])
        if self.K.dtype == np.float64:
            return self.K @ P
        out = np.empty_like(P)
        for i in range(0, self.shape[0], self.block):
            out[i : i + self.block] = self.K[i : i + self.block].astype(np.float64) @ P
        return out

    def diag(self) -> np.ndarray:
        """diag(K): (N,) float64."""
        return np.diagonal(self.K).astype(np.float64)

    def columns(self, idx: Any) -> np.ndarray:
        """K[:, idx]. idx: (m,) int -> (N, m) float64."""
        return self.K[:, check_indices(idx, self.shape[0])].astype(np.float64)

    def __repr__(self) -> str:
        return f"DenseOperator(shape={self.shape}, dtype={self.dtype})"


class KernelOperator:
    """Matrix-free K = spec.kernel(X, X, kind, dtype), computed on demand (never stored).

    X: (N, d) features. ``columns`` computes only the requested columns; ``matmat`` computes K
    one (block, N) row block at a time, so memory is bounded by ``block`` x N. Column and row
    requests are padded to a power of two (at most ``block``) so the jitted tile function is
    compiled for a handful of shapes only. Diagonal entries always come from ``spec.diag``
    (the exact formula), so every access path agrees with the symmetric dense Gram.
    """

    def __init__(
        self,
        spec: Kernel,
        X: Any,
        kind: str = "ntk",
        dtype: str = "float64",
        block: int = 1024,
    ) -> None:
        if block < 1:
            raise ValueError(f"block={block} must be >= 1 (rows per on-the-fly row block)")
        self.spec = spec
        self.X = check_features(X, "X")
        self.kind = kind
        self.dtype = np.dtype(dtype)
        self.block = int(block)
        n = int(self.X.shape[0])
        self.shape = (n, n)
        self._diag = np.asarray(spec.diag(self.X, kind, dtype), dtype=np.float64)

    def _tile(self, rows: np.ndarray) -> np.ndarray:
        """K[rows, :] as float64. rows: (m,) int with m <= block -> (m, N)."""
        m = len(rows)
        padded = np.resize(rows, _bucket(m, self.block))  # repeats rows: one compiled shape
        tile = self.spec.kernel(self.X[padded], self.X, self.kind, str(self.dtype))
        tile = np.array(tile[:m], dtype=np.float64)  # a writable copy
        tile[np.arange(m), rows] = self._diag[rows]
        return tile

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """K @ P. P: (N, C) float64 -> (N, C) float64, one (block, N) row block at a time."""
        P = check_block(P, self.shape[0])
        out = np.empty_like(P)
        for i in range(0, self.shape[0], self.block):
            rows = np.arange(i, min(i + self.block, self.shape[0]))
            out[rows] = self._tile(rows) @ P
        return out

    def diag(self) -> np.ndarray:
        """diag(K): (N,) float64."""
        return self._diag.copy()

    def columns(self, idx: Any) -> np.ndarray:
        """K[:, idx]. idx: (m,) int -> (N, m) float64 (the one columns path, blocks of
        ``block`` rows: :func:`ntk_scale.linalg.columns.kernel_columns`)."""
        idx = check_indices(idx, self.shape[0])
        plan = BlockPlan.square(self.shape[0], min(self.block, self.shape[0]))
        rows = lambda b: self.X[slice(*plan.row_range(b))]  # noqa: E731
        return kernel_columns(self.spec, self.kind, str(self.dtype), plan, rows, self._diag, idx)

    def __repr__(self) -> str:
        return (
            f"KernelOperator(N={self.shape[0]}, kind={self.kind!r}, dtype={self.dtype}, "
            f"block={self.block})"
        )


def _bucket(m: int, cap: int) -> int:
    """The smallest power of two >= m, capped at ``cap`` (and at least m)."""
    return max(m, min(cap, 1 << max(m - 1, 0).bit_length()))
