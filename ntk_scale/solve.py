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
import warnings
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np

from ntk_scale.errors import RidgeEdgeWarning
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
from ntk_scale.linalg.preconditioners import per_group
from ntk_scale.linalg.stored import StoredOperator
from ntk_scale.options import (
    AUTO_RIDGE_BOUNDS,
    AUTO_RIDGE_STEP,
    AUTO_RIDGES,
    RunOptions,
    SolveOptions,
)
from ntk_scale.panels import open_symmetric
from ntk_scale.progress import Progress, SolveProgress
from ntk_scale.store import GramStore
from ntk_scale.store.fsio import atomic_put

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
    #: Every absolute ridge of a regularization path (result.x then holds (N, R·C) columns,
    #: ridge k's in columns k·C .. k·C + C - 1: :meth:`alpha`); targets: C; vector: y was (N,).
    lams: tuple[float, ...] = ()
    targets: int = 1
    vector: bool = False

    def alpha(self, k: int = 0) -> np.ndarray:
        """The solution at ridge k: (N,) for vector targets, else (N, C)."""
        if len(self.lams) <= 1:
            return self.result.x
        x = self.result.x[:, k * self.targets : (k + 1) * self.targets]
        return x[:, 0] if self.vector else x

    def iterations_per_ridge(self, tol: float) -> list[int]:
        """The iterations each ridge's slowest column took to reach tol."""
        return column_iterations(self.result.residuals, tol, len(self.lams) or 1)

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
    x0: np.ndarray | None = None,
    sketch_dir: str | None = None,
    **overrides: Any,
) -> SolveReport:
    """Solve (K + λI) A = Y for the Gram matrix K stored at ``store_url``.

    Y: (N,) or (N, C) finite targets, N = the store's rows. options: the solver's settings
    (SolveOptions; ``overrides`` such as ridge=1e-3 or workers=2 replace fields of it or of
    ``run``). operator "auto" must be resolved before (:func:`ntk_scale.stages.solve` does).
    out_dir: where the PCG state is checkpointed; an existing checkpoint there is resumed, or
    refused if it belongs to another problem (unless ``overwrite``). callback: called with each
    new PCGState. x0: (N, C) a starting guess (a fold-averaged solution from select_ridge);
    ignored when a checkpoint is resumed. sketch_dir: where the Nyström sketch is cached
    (default out_dir; None for both: built here and not kept). Progress (iteration, worst
    residual, columns converged, s/iteration, ETA) is shown unless run.progress is False.
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
        lams = tuple(resolve_ridge(r, op, opts.ridge_absolute) for r in opts.ridges)
        meta = _checkpoint_meta(store, Y2, lams[0] if len(lams) == 1 else list(lams), opts)
        path = None if out_dir is None else os.path.join(out_dir, CHECKPOINT_NAME)
        state = _load_state(path, meta, overwrite)
        # One sketch for every ridge (it reads K only); each ridge gets its own core.
        M = _make_preconditioner(op, opts, meta["rank"], min(lams), run, sketch_dir or out_dir,
                                 store)  # fmt: skip
        setup = time.perf_counter() - start
        bar = stack.enter_context(_progress(opts, run))
        Yp, lam_cols = path_columns(Y2, lams)
        if x0 is not None and state is None:
            x0 = np.tile(np.asarray(x0, dtype=np.float64).reshape(Y2.shape), (1, len(lams)))
        else:
            x0 = None
        result, last = _run(op, Yp, lam_cols, M, opts, state, path, meta, _both(bar, callback),
                            x0=x0)  # fmt: skip
        iterating = time.perf_counter() - start - setup
    if path is not None and last is not None:
        ckpt.save_checkpoint(path, last, meta)
    if vector and len(lams) == 1:
        result = result._replace(x=result.x[:, 0])
    resumed = None if state is None else state.iteration
    eig = np.asarray(getattr(M, "eigenvalues", np.zeros(0)), dtype=np.float64)
    return SolveReport(result, lams[0], M.name, getattr(M, "rank", 0), setup, iterating, resumed,
                       eig, lams, Y2.shape[1], vector)  # fmt: skip


def path_columns(Y: np.ndarray, lams: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Y (N, C) repeated once per ridge -> ((N, R·C) targets, (R·C,) ridges): column
    k·C + j is target j at ridge k."""
    return np.tile(Y, (1, len(lams))), np.repeat(np.asarray(lams, dtype=np.float64), Y.shape[1])


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


def _checkpoint_meta(store: GramStore, Y: np.ndarray, lam: Any, o: SolveOptions) -> dict:
    """What identifies a solve: a checkpoint made for anything else is refused."""
    return {
        "store": store.fingerprint,
        "targets": targets_fingerprint(Y),
        "lam": lam,
        "tol": float(o.tol),
        "preconditioner": o.preconditioner,
        "rank": sketch_rank(o),
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


def _run(op, Y, lam, M, o: SolveOptions, state, path, meta, callback, mask=None, x0=None):
    """solve_pcg with checkpoints; returns (result, the last new state or None)."""
    saver = None if path is None else ckpt.checkpoint_every(path, meta, o.checkpoint_every)
    last: list[PCGState] = []

    def on_iteration(st: PCGState) -> None:
        last[:] = [st]
        if saver is not None:
            saver(st)
        callback(st)

    result = solve_pcg(op, Y, lam, M, o.tol, o.max_iter, x0=x0, callback=on_iteration,
                       state=state, mask=mask)  # fmt: skip
    return result, (last[0] if last else None)


def column_iterations(residuals: np.ndarray, tol: float, groups: int) -> list[int]:
    """Iterations until each group of columns (consecutive, equal sizes) was within tol."""
    reached = residuals <= tol
    first = np.where(reached.any(axis=0), reached.argmax(axis=0), residuals.shape[0] - 1)
    return [int(g.max()) for g in np.split(first, groups)]


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


#: The Nyström sketch of a fit, kept beside its checkpoint: the refit after a ridge selection
#: and the posterior's variance solves reuse it instead of reading its columns again.
SKETCH_NAME = "preconditioner.npz"


def _make_preconditioner(
    op: GramOperator, o: SolveOptions, rank: int, lam: float, run: RunOptions | None = None,
    cache_dir: str | None = None, store: GramStore | None = None,
):  # fmt: skip
    """The preconditioner of ``o``; building a Nyström sketch shows its pivots' progress.
    cache_dir (with ``store``): the sketch is loaded from cache_dir/SKETCH_NAME when it was made
    for this store, preconditioner, rank, seed and pivot block (it does not depend on λ), else
    built and saved there."""
    if o.preconditioner == "none":
        return identity()
    if o.preconditioner == "jacobi":
        return jacobi(op, lam)
    path = None if cache_dir is None or store is None else f"{cache_dir.rstrip('/')}/{SKETCH_NAME}"
    key = None if path is None else sketch_key(store, o, rank)
    cached = None if path is None else load_sketch(path, key, lam)
    if cached is not None:
        return cached
    pivots = "rpcholesky" if o.preconditioner == "rpcholesky" else "uniform"
    show = run is not None and run.show_progress
    with Progress("preconditioner", rank, "pivots", enabled=show) as bar:
        M = nystrom(op, rank, lam, pivots=pivots, seed=o.seed, block=o.pivot_block,
                    on_pivots=lambda k: bar.update(done=k))  # fmt: skip
    if path is not None:
        save_sketch(path, M, key)
    return M


def sketch_rank(o: SolveOptions) -> int:
    """The rank of o's Nyström sketch; 0 for a preconditioner without one."""
    return int(o.rank if o.preconditioner in ("rpcholesky", "nystrom") else 0)


def sketch_key(store: GramStore, o: SolveOptions, rank: int) -> dict[str, Any]:
    """What a Nyström sketch depends on (not λ: only its core does)."""
    return {"store": store.fingerprint, "preconditioner": o.preconditioner, "rank": int(rank),
            "seed": int(o.seed), "pivot_block": int(o.pivot_block)}  # fmt: skip


def save_sketch(path: str, M: Any, key: dict[str, Any]) -> None:
    """U (N, r), eigenvalues (r,), pivots and key as one .npz, written whole or not at all."""
    import io
    import json

    buf = io.BytesIO()
    np.savez(buf, U=M.U, eigenvalues=M.eigenvalues, pivots=np.asarray(M.pivots),
             columns_read=np.int64(M.columns_read), name=np.str_(M.name),
             key=np.str_(json.dumps(key, sort_keys=True)))  # fmt: skip
    fs, fpath = fsspec.core.url_to_fs(path)
    atomic_put(fs, fpath, buf.getbuffer())


def load_sketch(path: str, key: dict[str, Any], lam: float) -> Any:
    """The sketch saved at ``path`` for ``key``, with ridge ``lam``; None if there is none or
    it was made for another key (then it is rebuilt and replaced)."""
    import json

    from ntk_scale.linalg.preconditioners import Nystrom

    fs, fpath = fsspec.core.url_to_fs(path)
    if not fs.exists(fpath):
        return None
    with fs.open(fpath, "rb") as f, np.load(f, allow_pickle=False) as z:
        if str(z["key"]) != json.dumps(key, sort_keys=True):
            return None
        return Nystrom(U=z["U"], eigenvalues=z["eigenvalues"], lam=float(lam),
                       pivots=z["pivots"], name=str(z["name"]),
                       columns_read=int(z["columns_read"]))  # fmt: skip


def _load_state(path: str | None, meta: dict[str, Any], overwrite: bool) -> PCGState | None:
    if path is None:
        return None
    if overwrite:
        fs, fpath = fsspec.core.url_to_fs(path)
        if fs.exists(fpath):
            fs.rm_file(fpath)
        return None
    return ckpt.load_checkpoint(path, meta)


# -- choosing the ridge on held-out rows -----------------------------------------------------------
METRICS = ("mse", "accuracy")
CV_CHECKPOINT_NAME = "cv_state.npz"


@dataclasses.dataclass(frozen=True)
class RidgeSelection:
    """Every ridge scored on held-out rows of one store, in one PCG run.

    ridges: as given (relative, or absolute with ridge_absolute); metric: "mse" (lower is
    better) or "accuracy" (higher); scores: (folds, ridges) validation score of each fold;
    iterations: per ridge, its slowest column's PCG iterations; best: the chosen ridge's index
    (the best mean score; the larger ridge on a tie); seconds: the whole selection.
    warm_start: (N, C) the chosen ridge's fold solutions averaged row by row over the folds
    that trained on the row (zero for a row no fold trained on): a starting guess for the
    refit on all rows (``solve_store(..., x0=...)``). rounds: the PCG runs of the path (more
    than one where ridge="auto" grew the grid); bounds: ridge="auto"'s bounds, else None.
    """

    ridges: tuple[float, ...]
    metric: str
    scores: np.ndarray
    iterations: list[int]
    best: int
    seconds: float
    folds: int
    warm_start: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    rounds: int = 1
    bounds: tuple[float, float] | None = None

    @property
    def mean_scores(self) -> np.ndarray:
        return self.scores.mean(axis=0)

    @property
    def ridge(self) -> float:
        return self.ridges[self.best]

    @property
    def edge(self) -> str | None:
        """"smallest" or "largest" where the chosen ridge is that end of a grid of several
        ridges (the best may lie beyond it), else None."""
        if len(set(self.ridges)) < 2:
            return None
        if self.ridge == max(self.ridges):
            return "largest"
        return "smallest" if self.ridge == min(self.ridges) else None

    def table(self) -> list[dict[str, Any]]:
        """One row per ridge: ridge, mean and per-fold scores, iterations, chosen."""
        return [
            {"ridge": r, f"mean_{self.metric}": float(self.mean_scores[k]),
             f"fold_{self.metric}": self.scores[:, k].tolist(),
             "iterations": self.iterations[k], "chosen": k == self.best}
            for k, r in enumerate(self.ridges)
        ]  # fmt: skip


Folds = list[tuple[np.ndarray, np.ndarray]]


def warn_at_edge(sel: RidgeSelection) -> RidgeSelection:
    """sel, after a RidgeEdgeWarning when its ridge is the grid's end, naming a grid that goes
    three decades further that way (or, for ridge="auto", the bound it stopped at)."""
    if sel.edge is not None:
        r, lo, hi = sel.ridge, min(sel.ridges), max(sel.ridges)
        if sel.bounds is not None:
            msg = (f"ridge='auto' chose {r:g}, the {sel.edge} ridge it may try (its grid grew "
                   f"to {lo:g} … {hi:g} in {sel.rounds} rounds, bounds {sel.bounds[0]:g} … "
                   f"{sel.bounds[1]:g}): the data want a ridge beyond the bound; check the "
                   "targets' scale and the kernel, or give absolute ridges (ridge_absolute)")
        else:
            step = 10.0 if sel.edge == "largest" else 0.1
            wider = ", ".join(f"{r * step**k:g}" for k in range(4))
            msg = (f"the ridge chosen on held-out rows, {r:g}, is the {sel.edge} of the grid "
                   f"({lo:g} … {hi:g}): the best may lie beyond it; try a grid that goes "
                   f"further, e.g. ridges = [{wider}], or ridge='auto'")
        warnings.warn(RidgeEdgeWarning(msg), stacklevel=3)
    return sel


def best_ridge(scores: np.ndarray, metric: str) -> int:
    """The index of the best mean score over folds of scores (folds, ridges), ridges ascending:
    the lowest MSE or the highest accuracy, the larger ridge on a tie."""
    means = scores.mean(axis=0) * (1 if metric == "mse" else -1)
    return int(np.flatnonzero(means == means.min()).max())


def ridge_path_meta(sel: RidgeSelection) -> dict[str, Any]:
    """model.json's "ridge_path": metric, folds, seconds, per-ridge table, the edge the best is
    at (None inside; "smallest" / "largest": the best may lie beyond the grid) and, for
    ridge="auto", its rounds and bounds."""
    auto = None if sel.bounds is None else {"rounds": sel.rounds, "bounds": list(sel.bounds)}
    return {"metric": sel.metric, "folds": sel.folds, "seconds": sel.seconds,
            "ridges": sel.table(), "edge": sel.edge, "auto": auto}  # fmt: skip


def round_checkpoint(name: str, k: int) -> str:
    """The checkpoint file of round k of a ridge path (round 0: ``name`` itself)."""
    if k == 0:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_round{k}.{ext}" if dot else f"{name}_round{k}"


def grow_ridges(sel: RidgeSelection, bounds: tuple[float, float] = AUTO_RIDGE_BOUNDS,
                step: int = AUTO_RIDGE_STEP) -> tuple[float, ...]:
    """The next ridges of ridge="auto": ``step`` decades past the edge sel's best is at, within
    bounds; () where the best is inside the grid or the bound is reached."""
    if sel.edge is None:
        return ()
    sign, end = (1, max(sel.ridges)) if sel.edge == "largest" else (-1, min(sel.ridges))
    more = (float(f"{end * 10.0 ** (sign * k):.6g}") for k in range(1, step + 1))
    return tuple(r for r in more if bounds[0] <= r <= bounds[1] and r not in sel.ridges)


def merge_selections(a: RidgeSelection, b: RidgeSelection) -> RidgeSelection:
    """One path from two on the same folds and metric: ridges ascending, the best chosen again
    (the best mean score; the larger ridge on a tie), its warm start from the run that had it."""
    if (a.folds, a.metric) != (b.folds, b.metric):
        raise ValueError("merge_selections needs two paths on the same folds and metric")
    ridges = np.array(a.ridges + b.ridges)
    order = np.argsort(ridges, kind="stable")
    scores = np.concatenate([a.scores, b.scores], axis=1)[:, order]
    iterations = [(a.iterations + b.iterations)[k] for k in order]
    best = best_ridge(scores, a.metric)
    ridge = float(ridges[order][best])
    warm = a.warm_start if ridge == a.ridge else b.warm_start if ridge == b.ridge else None
    return RidgeSelection(tuple(float(r) for r in ridges[order]), a.metric, scores, iterations,
                          best, a.seconds + b.seconds, a.folds, warm, a.rounds + b.rounds,
                          a.bounds or b.bounds)  # fmt: skip


def select_auto(select_round: Callable[[tuple[float, ...], int], RidgeSelection],
                grid: tuple[float, ...] = AUTO_RIDGES,
                bounds: tuple[float, float] = AUTO_RIDGE_BOUNDS) -> RidgeSelection:  # fmt: skip
    """ridge="auto": ``select_round(ridges, k)`` (round k's path on the same folds: the same
    store and preconditioner sketch) on ``grid``, then on :func:`grow_ridges` while the best is
    at an edge and the bounds allow. Warns (RidgeEdgeWarning) only where a bound stops it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RidgeEdgeWarning)  # an edge here is a cue to grow
        sel = dataclasses.replace(select_round(tuple(grid), 0), bounds=tuple(bounds))
        while more := grow_ridges(sel, bounds):
            sel = merge_selections(sel, select_round(more, sel.rounds))
    return warn_at_edge(sel)


def make_folds(n: int, cv: int | None = None, holdout: float | None = None,
               seed: int = SolveOptions.seed, splitter: Any = None,
               y: Any = None) -> Folds:  # fmt: skip
    """(train rows, validation rows) per fold: k shuffled folds, one held-out fraction, or a
    scikit-learn splitter's ``split(range(n), y)``."""
    if splitter is not None:
        return [(np.asarray(a), np.asarray(b)) for a, b in splitter.split(np.zeros((n, 1)), y)]
    order = np.random.default_rng(seed).permutation(n)
    if holdout is not None:
        k = max(1, int(round(holdout * n)))
        if k >= n:
            raise ValueError(f"holdout={holdout} leaves no training rows of {n}")
        return [(np.sort(order[k:]), np.sort(order[:k]))]
    if cv is None or not 2 <= cv <= n:
        raise ValueError(f"cv={cv!r} must be an integer in [2, N={n}] (folds)")
    parts = np.array_split(order, cv)
    return [(np.sort(np.concatenate(parts[:f] + parts[f + 1:])), np.sort(parts[f]))
            for f in range(cv)]  # fmt: skip


def score(pred: np.ndarray, y: np.ndarray, metric: str) -> float:
    """MSE over every target, or accuracy of the argmax (one-hot targets)."""
    if metric == "accuracy":
        return float(np.mean(np.argmax(pred, axis=1) == np.argmax(y, axis=1)))
    return float(np.mean((pred - y) ** 2))


def select_ridge(
    store_url: str,
    Y: Any,
    options: SolveOptions,
    run: RunOptions | None = None,
    *,
    folds: Folds,
    metric: str = "mse",
    out_dir: str | None = None,
    overwrite: bool = False,
    callback: Callable[[PCGState], object] | None = None,
    checkpoint_name: str = CV_CHECKPOINT_NAME,
    sketch_dir: str | None = None,
) -> RidgeSelection:
    """Score every ridge of ``options.ridges`` on held-out rows of the Gram stored at
    ``store_url``, without computing a tile: every (fold, ridge, target) is a column of one
    PCG run on the training rows of its fold (one product with the stored K per iteration for
    all), and the validation predictions K[val, train]·A come from one more product.

    A relative ridge is relative to the mean diagonal of the fold's training rows, as a fit on
    those rows alone would take it. With ``out_dir`` the run is checkpointed there (as
    ``checkpoint_name``) and resumed; sketch_dir as for solve_store. For ridge="auto" see
    :func:`select_auto`.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; use one of {', '.join(METRICS)}")
    run, start = run or RunOptions(), time.perf_counter()
    store = open_symmetric(store_url, complete=options.operator != "matrixfree")
    Y2, _ = check_targets(Y, store.shape[0])
    opts = options.with_rank_at_most(store.shape[0])
    ridges, c = opts.ridges, Y2.shape[1]
    with contextlib.ExitStack() as stack:
        op = _make_operator(store, opts, run, stack)
        diag = op.diag()
        lam = np.array([[r if opts.ridge_absolute else r * float(np.mean(diag[tr])) for r in ridges]
                        for tr, _ in folds])  # fmt: skip
        Yp = np.concatenate([np.tile(Y2, (1, len(ridges))) for _ in folds], axis=1)
        mask = np.zeros(Yp.shape, dtype=bool)
        for f, (tr, _) in enumerate(folds):
            mask[tr, f * len(ridges) * c : (f + 1) * len(ridges) * c] = True
        meta = {**_checkpoint_meta(store, Y2, lam.tolist(), opts),
                "folds": targets_fingerprint(mask.astype(np.float64))}  # fmt: skip
        path = None if out_dir is None else os.path.join(out_dir, checkpoint_name)
        state = _load_state(path, meta, overwrite)
        M = _make_preconditioner(op, opts, meta["rank"], float(lam.min()), run,
                                 sketch_dir or out_dir, store)  # fmt: skip
        # Each fold's columns get the one sketch restricted to the fold's training rows.
        groups = np.repeat(np.arange(len(folds)), len(ridges) * c)
        M = per_group(M, [tr for tr, _ in folds], groups)
        bar = stack.enter_context(_progress(opts, run))
        result, last = _run(op, Yp, np.repeat(lam.reshape(-1), c), M, opts, state, path, meta,
                            _both(bar, callback), mask=mask)  # fmt: skip
        pred = op.matmat(result.x)  # every column's K·A: its validation rows are K[val, train]·A
    if path is not None and last is not None:
        ckpt.save_checkpoint(path, last, meta)
    scores = np.empty((len(folds), len(ridges)))
    for f, (_, val) in enumerate(folds):
        for k in range(len(ridges)):
            col = (f * len(ridges) + k) * c
            scores[f, k] = score(pred[val, col : col + c], Y2[val], metric)
    per = np.array(column_iterations(result.residuals, opts.tol, len(folds) * len(ridges)))
    iterations = per.reshape(len(folds), len(ridges)).max(axis=0).tolist()
    best = best_ridge(scores, metric)
    warm = _fold_average(result.x, mask, len(folds), len(ridges), c, best)
    return warn_at_edge(RidgeSelection(tuple(ridges), metric, scores, iterations, best,
                                       time.perf_counter() - start, len(folds), warm))  # fmt: skip


def _fold_average(x: np.ndarray, mask: np.ndarray, folds: int, ridges: int, c: int,
                  k: int) -> np.ndarray:  # fmt: skip
    """Ridge k's (N, c) solutions of every fold, averaged per row over the folds that trained
    on it. x, mask: (N, folds·ridges·c), column (f·ridges + k)·c + j is target j of fold f."""
    cols = [(f * ridges + k) * c + np.arange(c) for f in range(folds)]
    total = sum(x[:, cc] for cc in cols)
    count = sum(mask[:, cc].astype(np.float64) for cc in cols)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)
