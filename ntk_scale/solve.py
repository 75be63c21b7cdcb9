"""The solve stage: (K + λI) A = Y on a stored Gram matrix, with checkpoints and resume.

``solve_store`` opens the store, builds an operator (streamed, distributed or dense), resolves
the ridge, builds the preconditioner and runs block PCG. With ``out_dir`` the PCG state is saved
every ``checkpoint_every`` iterations and at the end; running the same solve again resumes from
the last checkpoint. The preconditioner is rebuilt deterministically from ``seed`` and PCG
continues on the same trajectory, so a resumed solve returns what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np

from ntk_scale.linalg import (
    DenseOperator,
    GramOperator,
    PCGResult,
    PCGState,
    Preconditioner,
    identity,
    jacobi,
    nystrom,
    resolve_ridge,
    solve_pcg,
)
from ntk_scale.linalg import checkpoint as ckpt
from ntk_scale.linalg.stored import StoredOperator, open_symmetric
from ntk_scale.store import GramStore

PRECONDITIONERS = ("rpcholesky", "nystrom", "jacobi", "none")
OPERATORS = ("stored", "distributed", "dense", "matrixfree")
CHECKPOINT_NAME = "pcg_state.npz"


@dataclasses.dataclass(frozen=True)
class SolveReport:
    """result: the PCGResult (x is (N,) for vector targets, else (N, C)); lam: the absolute
    ridge; preconditioner: its name; rank: its rank (0 for none/jacobi); setup_seconds: operator,
    ridge and preconditioner; iteration_seconds: the PCG loop of this run; resumed_from: the
    checkpoint's iteration, or None for a fresh start."""

    result: PCGResult
    lam: float
    preconditioner: str
    rank: int
    setup_seconds: float
    iteration_seconds: float
    resumed_from: int | None
    #: The Nyström sketch's estimates of K's top eigenvalues (descending), for the spectrum plot;
    #: empty for identity / Jacobi.
    eigenvalues: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

    @property
    def seconds(self) -> tuple[float, float]:
        """(setup, iterations) wall seconds."""
        return (self.setup_seconds, self.iteration_seconds)


def solve_store(
    store_url: str,
    Y: Any,
    ridge: float = 1e-4,
    ridge_absolute: bool = False,
    preconditioner: str = "rpcholesky",
    rank: int = 500,
    tol: float = 1e-6,
    max_iter: int | None = None,
    operator: str = "stored",
    workers: int = 2,
    out_dir: str | None = None,
    checkpoint_every: int = 10,
    seed: int = 0,
    overwrite: bool = False,
    pivot_block: int = 1,
    callback: Callable[[PCGState], object] | None = None,
) -> SolveReport:
    """Solve (K + λI) A = Y for the Gram matrix K stored at ``store_url``.

    Y: (N,) or (N, C) finite targets, N = the store's rows. ridge: λ = ridge · mean(diag K), or
    λ = ridge with ridge_absolute. preconditioner: "rpcholesky" or "nystrom" (uniform pivots) of
    ``rank`` columns (pivot_block > 1: accelerated RPCholesky, fewer column reads), "jacobi" or
    "none". operator: "stored" (tiles streamed here), "distributed" (``workers`` Ray actors) or
    "dense" (the whole matrix loaded here). out_dir: where the PCG state is checkpointed; an
    existing checkpoint there is resumed, or refused if it belongs to another problem (unless
    ``overwrite``). callback: called with each new PCGState (e.g. progress).
    """
    _check_choice("preconditioner", preconditioner, PRECONDITIONERS)
    _check_choice("operator", operator, OPERATORS)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1 (iterations)")
    start = time.perf_counter()
    store = open_symmetric(store_url, complete=operator != "matrixfree")
    Y2, vector = check_targets(Y, store.shape[0])
    with contextlib.ExitStack() as stack:
        op = _make_operator(store, operator, workers, stack)
        lam = resolve_ridge(ridge, op, ridge_absolute)
        used_rank = rank if preconditioner in ("rpcholesky", "nystrom") else 0
        meta = {
            "store": store.fingerprint,
            "targets": targets_fingerprint(Y2),
            "lam": lam,
            "tol": float(tol),
            "preconditioner": preconditioner,
            "rank": int(used_rank),
            "seed": int(seed),
            "pivot_block": int(pivot_block),
        }
        path = None if out_dir is None else os.path.join(out_dir, CHECKPOINT_NAME)
        state = _load_state(path, meta, overwrite)
        M = _make_preconditioner(op, preconditioner, used_rank, lam, seed, pivot_block)
        setup = time.perf_counter() - start
        result, last = _run(
            op, Y2, lam, M, tol, max_iter, state, path, meta, checkpoint_every, callback
        )
        iterating = time.perf_counter() - start - setup
    if path is not None and last is not None:
        ckpt.save_checkpoint(path, last, meta)
    if vector:
        result = result._replace(x=result.x[:, 0])
    resumed = None if state is None else state.iteration
    eig = np.asarray(getattr(M, "eigenvalues", np.zeros(0)), dtype=np.float64)
    return SolveReport(result, lam, M.name, getattr(M, "rank", 0), setup, iterating, resumed, eig)


def _run(op, Y, lam, M, tol, max_iter, state, path, meta, every, callback):
    """solve_pcg with checkpoints; returns (result, the last new state or None)."""
    saver = None if path is None else ckpt.checkpoint_every(path, meta, every)
    last: list[PCGState] = []

    def on_iteration(st: PCGState) -> None:
        last[:] = [st]
        if saver is not None:
            saver(st)
        if callback is not None:
            callback(st)

    result = solve_pcg(op, Y, lam, M, tol, max_iter, callback=on_iteration, state=state)
    return result, (last[0] if last else None)


def check_targets(Y: Any, n: int) -> tuple[np.ndarray, bool]:
    """Y as (N, C) float64 (a new array), and whether it was a vector. Raises ValueError."""
    arr = np.array(Y, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ValueError(
            f"Y has shape {arr.shape} but the store holds N={n} rows; pass targets of shape "
            f"({n},) or ({n}, C), in the order of the store's rows"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"Y holds {int(bad.sum())} NaN/Inf values (first in row {row}); remove or impute "
            "those targets before solving"
        )
    return (arr[:, None], True) if arr.ndim == 1 else (arr, False)


def targets_fingerprint(Y: np.ndarray) -> str:
    """sha256 of Y (N, C) as float64 C-order bytes, with its shape."""
    Y = np.ascontiguousarray(Y, dtype=np.float64)
    h = hashlib.sha256(f"{Y.shape}|float64|".encode())
    h.update(Y.tobytes())
    return h.hexdigest()


def _make_operator(
    store: GramStore, kind: str, workers: int, stack: contextlib.ExitStack
) -> GramOperator:
    if kind == "stored":
        return StoredOperator(store)
    if kind == "matrixfree":
        from ntk_scale.linalg.matrixfree import MatrixFreeOperator

        x = np.vstack([store.x_block("rows", b) for b in range(store.plan.row_blocks)])
        m = store.meta
        mf = MatrixFreeOperator(m.spec, x, m.kind, m.dtype, tile=m.tile, n_actors=workers)
        return stack.enter_context(mf)
    if kind == "dense":
        # Converted to float64 once: the in-memory mode trades memory (8 N² bytes) for products
        # that are one BLAS call, with no per-product conversion of a float32 matrix.
        return DenseOperator(np.asarray(store.to_dask().compute(), dtype=np.float64))
    from ntk_scale.linalg.distributed import DistributedOperator

    return stack.enter_context(DistributedOperator(store.url, n_actors=workers))


def _make_preconditioner(
    op: GramOperator, name: str, rank: int, lam: float, seed: int, block: int
) -> Preconditioner:
    if name == "none":
        return identity()
    if name == "jacobi":
        return jacobi(op, lam)
    pivots = "rpcholesky" if name == "rpcholesky" else "uniform"
    return nystrom(op, rank, lam, pivots=pivots, seed=seed, block=block)


def _load_state(path: str | None, meta: dict[str, Any], overwrite: bool) -> PCGState | None:
    if path is None:
        return None
    if overwrite:
        fs, fpath = fsspec.core.url_to_fs(path)
        if fs.exists(fpath):
            fs.rm_file(fpath)
        return None
    return ckpt.load_checkpoint(path, meta)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(choices)}")
