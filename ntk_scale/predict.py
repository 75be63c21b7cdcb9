"""Predictions K(X*, X) @ A on the pool's hosts: rectangular tiles computed and multiplied at once.

Nothing of K(X*, X) is stored: each host holds a :class:`ntk_scale.roles.ProductWorker` (X and
A, the same fused tile-times-matrix path as the matrix-free operator) and takes one row block of
X* at a time. Row blocks are queued on the hosts; a block on a host that dies runs again on
another. Memory per host: X, A and one tile; on the driver, one row block of X* (it is read
lazily) and, with a Zarr output, one block of predictions (a rerun skips the blocks written).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ntk_scale.io import as_rows
from ntk_scale.kernels import check_features
from ntk_scale.options import RunOptions
from ntk_scale.plan import BlockPlan
from ntk_scale.pool import pool_for
from ntk_scale.progress import Progress
from ntk_scale.roles import ProductWorker
from ntk_scale.store import GramStore, fingerprint_rows
from ntk_scale.store.meta import shift_row
from ntk_scale.store.predictions import PredictionArray
from ntk_scale.tasks import RoleGroup, run_queue


def predict_from_store(
    store_url: str,
    alpha: np.ndarray,
    x_star: Any,
    run: RunOptions | None = None,
    on_block: Callable[[int], None] | None = None,
    *,
    out: str | None = None,
    overwrite: bool = False,
    finish: Callable[[np.ndarray], np.ndarray] | None = None,
    of: dict[str, Any] | None = None,
) -> Any:
    """K(x_star, X) @ alpha with X the store's training inputs.

    alpha: (N,) or (N, C); x_star: (M, d) or (M, *S) array-like (numpy, memory map, Zarr,
    dask), read one row block at a time. finish: applied to each block's (rows, C) values (a
    target transform's inverse). out: None returns (M,) or (M, C) float64; a path or URL writes
    the (M, C) predictions there as a chunked Zarr array, resumably (blocks already written and
    checksummed are skipped; ``of`` names what else they depend on), and returns it (lazy).
    Memory: X, A and one block of X*. on_block: called on the driver with each finished row
    block's index (tests inject faults).
    """
    run = run or RunOptions()
    store = GramStore.open(store_url)
    meta = store.meta
    x_star = flat_samples(x_star, meta.spec, meta.d)
    a = np.asarray(alpha, dtype=np.float64)
    a2 = a[:, None] if a.ndim == 1 else a
    if a2.shape[0] != meta.n_cols:
        raise ValueError(f"alpha has {a2.shape[0]} rows, the store's X has {meta.n_cols}")
    plan = BlockPlan(x_star.shape[0], meta.n_cols, meta.tile, symmetric=False)
    shape = (x_star.shape[0], a2.shape[1])
    sink = None
    if out is not None:
        of = {"store": store.fingerprint, "alpha": _sha(a2), **(of or {}),
              "x_star": fingerprint_rows(x_star, "float64", meta.tile, "x_star")}  # fmt: skip
        sink = PredictionArray.open_or_create(out, shape, meta.tile, of, overwrite)
    done = set() if sink is None else sink.done()  # one listing of the markers, not one a block
    todo = [i for i in range(plan.row_blocks) if i not in done]
    values = np.empty(shape) if sink is None else None
    if todo:
        _predict_blocks(
            store, a2, x_star, plan, todo, run, _Output(shape[1], values, sink, finish), on_block
        )
    if sink is not None:
        return sink.read()
    return values[:, 0] if a.ndim == 1 else values


def _predict_blocks(store, a2, x_star, plan, todo, run, output, on_block) -> None:
    """Row blocks ``todo`` of K(x_star, X) @ a2 on the pool's ProductWorkers, into output."""
    meta = store.meta
    X = np.vstack([store.x_block("cols", b) for b in range(store.plan.col_blocks)])
    pool = pool_for(run)
    slots = pool.take(run.workers, limit=len(todo))
    refs = (pool.ray.put(X), pool.ray.put(a2))

    def args(k: int) -> tuple:
        return (meta.spec, refs[0], meta.kind, meta.dtype, meta.tile, 0, None, refs[1])

    with RoleGroup(pool, slots, ProductWorker, args, run, "predict").start() as group:
        _run_blocks(group, plan, todo, x_star, output, run, on_block)


@dataclasses.dataclass
class _Output:
    """Where finished blocks go: ``values`` (M, C) in memory, or the Zarr ``sink``."""

    columns: int
    values: np.ndarray | None
    sink: PredictionArray | None
    finish: Callable[[np.ndarray], np.ndarray] | None

    def put(self, i: int, rows: tuple[int, int], block: np.ndarray) -> None:
        if self.finish is not None:
            block = self.finish(block)
        if self.sink is not None:
            self.sink.write(i, block)
        else:
            self.values[rows[0] : rows[1]] = block


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f8").tobytes()).hexdigest()


def flat_samples(x_star: Any, spec: Any, d: int) -> Any:
    """x_star as (M, d) rows, lazily (values are checked block by block as they are read):
    (M, d) features, or (M, *S) samples of a network bound to S."""
    rows, sample = as_rows(x_star, "x_star")
    if len(sample) > 1:
        spec.check_input(tuple(sample), "x_star")
    if rows.shape[1] != d:
        raise ValueError(
            f"x_star has {rows.shape[1]} features but the model's X has {d}; predict on inputs "
            "transformed as the training inputs were"
        )
    if not np.issubdtype(np.dtype(rows.dtype), np.number):
        raise ValueError(f"x_star must hold real numbers, got dtype {rows.dtype}; convert it")
    return rows


def _block(x_star: Any, r0: int, r1: int, d: int) -> np.ndarray:
    """Rows r0:r1 of x_star as checked float64 (M_block, d)."""
    part = np.asarray(x_star[r0:r1], dtype=np.float64)
    try:
        return check_features(part, "x_star", dim=d)
    except ValueError as err:
        raise ValueError(shift_row(str(err), r0)) from None


def _run_blocks(group: RoleGroup, plan: BlockPlan, todo, x_star, output, run, on_block) -> None:
    """output gets K(x*_i, X) @ A for every row block i in todo, with progress."""
    start, rows = time.perf_counter(), [0]
    total = sum(plan.row_range(i)[1] - plan.row_range(i)[0] for i in todo)
    bar = Progress("predict", total, "rows", enabled=run.show_progress)

    def block_args(i: int) -> tuple:
        r0, r1 = plan.row_range(i)
        return (_block(x_star, r0, r1, x_star.shape[1]), output.columns)

    def finished(i: int, values: np.ndarray) -> None:
        r0, r1 = plan.row_range(i)
        output.put(i, (r0, r1), values)
        rows[0] += r1 - r0
        bar.update(advance=r1 - r0, rate=f"{rows[0] / (time.perf_counter() - start):.3g} rows/s")
        if on_block is not None:
            on_block(i)

    with bar:
        run_queue(group, todo, "product", block_args, finished,
                  name_of=lambda i: f"predict row block {i}")  # fmt: skip
