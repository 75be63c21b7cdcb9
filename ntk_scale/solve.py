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
    identity,
    jacobi,
    nystrom,
    resolve_ridge,
    solve_pcg,
)
from ntk_scale.linalg import checkpoint as ckpt
from ntk_scale.linalg.distributed import DistributedOperator
from ntk_scale.linalg.matrixfree import MatrixFreeOperator
from ntk_scale.linalg.stored import StoredOperator
from ntk_scale.options import RunOptions, SolveOptions
from ntk_scale.panels import open_symmetric
from ntk_scale.progress import SolveProgress
from ntk_scale.store import GramStore

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
    options: SolveOptions | None = None,
    run: RunOptions | None = None,
    *,
    out_dir: str | None = None,
    overwrite: bool = False,
    callback: Callable[[PCGState], object] | None = None,
    **overrides: Any,
) -> SolveReport:
    """Solve (K + λI) A = Y for the Gram matrix K stored at ``store_url``.

    Y: (N,) or (N, C) finite targets, N = the store's rows. options: the solver's settings
    (SolveOptions; ``overrides`` such as ridge=1e-3 or workers=2 replace fields of it or of
    ``run``). operator "auto" must be resolved before (:func:`ntk_scale.stages.solve` does).
    out_dir: where the PCG state is checkpointed; an existing checkpoint there is resumed, or
    refused if it belongs to another problem (unless ``overwrite``). callback: called with each
    new PCGState. Progress (iteration, worst residual, columns converged, s/iteration, ETA) is
    shown unless run.progress is False.
    """
    opts, run = merge_options(options or SolveOptions(), run or RunOptions(), overrides)
    if opts.operator == "auto":
        raise ValueError("operator='auto' is resolved by ntk_scale.stages.solve; call that")
    start = time.perf_counter()
    store = open_symmetric(store_url, complete=opts.operator != "matrixfree")
    Y2, vector = check_targets(Y, store.shape[0])
    opts = opts.with_rank_at_most(store.shape[0])
    with contextlib.ExitStack() as stack:
        op = _make_operator(store, opts, run, stack)
        lam = resolve_ridge(opts.ridge, op, opts.ridge_absolute)
        meta = _checkpoint_meta(store, Y2, lam, opts)
        path = None if out_dir is None else os.path.join(out_dir, CHECKPOINT_NAME)
        state = _load_state(path, meta, overwrite)
        M = _make_preconditioner(op, opts, meta["rank"], lam)
        setup = time.perf_counter() - start
        bar = stack.enter_context(_progress(opts, run))
        result, last = _run(op, Y2, lam, M, opts, state, path, meta, _both(bar, callback))
        iterating = time.perf_counter() - start - setup
    if path is not None and last is not None:
        ckpt.save_checkpoint(path, last, meta)
    if vector:
        result = result._replace(x=result.x[:, 0])
    resumed = None if state is None else state.iteration
    eig = np.asarray(getattr(M, "eigenvalues", np.zeros(0)), dtype=np.float64)
    return SolveReport(result, lam, M.name, getattr(M, "rank", 0), setup, iterating, resumed, eig)


def merge_options(
    options: SolveOptions, run: RunOptions, overrides: dict[str, Any]
) -> tuple[SolveOptions, RunOptions]:
    """Apply keyword overrides to the SolveOptions / RunOptions field of the same name."""
    names = {f.name for f in dataclasses.fields(SolveOptions)}
    run_names = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(overrides) - names - run_names)
    if unknown:
        raise TypeError(
            f"unknown solver options {unknown}; SolveOptions has {sorted(names)} and "
            f"RunOptions {sorted(run_names)}"
        )
    opts = dataclasses.replace(options, **{k: v for k, v in overrides.items() if k in names})
    run = dataclasses.replace(run, **{k: v for k, v in overrides.items() if k in run_names})
    return opts, run


def _checkpoint_meta(store: GramStore, Y: np.ndarray, lam: float, o: SolveOptions) -> dict:
    """What identifies a solve: a checkpoint made for anything else is refused."""
    return {
        "store": store.fingerprint,
        "targets": targets_fingerprint(Y),
        "lam": lam,
        "tol": float(o.tol),
        "preconditioner": o.preconditioner,
        "rank": int(o.rank if o.preconditioner in ("rpcholesky", "nystrom") else 0),
        "seed": int(o.seed),
        "pivot_block": int(o.pivot_block),
    }


def _progress(o: SolveOptions, run: RunOptions) -> SolveProgress:
    return SolveProgress(o.tol, o.max_iter, enabled=run.show_progress)


def _both(bar: SolveProgress, callback: Callable | None) -> Callable[[PCGState], None]:
    def on_state(state: PCGState) -> None:
        bar(state)
        if callback is not None:
            callback(state)

    return on_state


def _run(op, Y, lam, M, o: SolveOptions, state, path, meta, callback):
    """solve_pcg with checkpoints; returns (result, the last new state or None)."""
    saver = None if path is None else ckpt.checkpoint_every(path, meta, o.checkpoint_every)
    last: list[PCGState] = []

    def on_iteration(st: PCGState) -> None:
        last[:] = [st]
        if saver is not None:
            saver(st)
        callback(st)

    result = solve_pcg(op, Y, lam, M, o.tol, o.max_iter, callback=on_iteration, state=state)
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
    store: GramStore, o: SolveOptions, run: RunOptions, stack: contextlib.ExitStack
) -> GramOperator:
    if o.operator == "stored":
        return StoredOperator(store)
    if o.operator == "matrixfree":
        x = np.vstack([store.x_block("rows", b) for b in range(store.plan.row_blocks)])
        m = store.meta
        mf = MatrixFreeOperator(m.spec, x, m.kind, m.dtype, tile=m.tile, run=run)
        return stack.enter_context(mf)
    if o.operator == "dense":
        # Converted to float64 once: the in-memory mode trades memory (8 N² bytes) for products
        # that are one BLAS call, with no per-product conversion of a float32 matrix.
        return DenseOperator(np.asarray(store.to_dask().compute(), dtype=np.float64))
    dist = DistributedOperator(store.url, memory_budget_bytes=o.memory_budget_bytes, run=run)
    return stack.enter_context(dist)


def _make_preconditioner(op: GramOperator, o: SolveOptions, rank: int, lam: float):
    if o.preconditioner == "none":
        return identity()
    if o.preconditioner == "jacobi":
        return jacobi(op, lam)
    pivots = "rpcholesky" if o.preconditioner == "rpcholesky" else "uniform"
    return nystrom(op, rank, lam, pivots=pivots, seed=o.seed, block=o.pivot_block)


def _load_state(path: str | None, meta: dict[str, Any], overwrite: bool) -> PCGState | None:
    if path is None:
        return None
    if overwrite:
        fs, fpath = fsspec.core.url_to_fs(path)
        if fs.exists(fpath):
            fs.rm_file(fpath)
        return None
    return ckpt.load_checkpoint(path, meta)
