"""The Nyström stage: centres, K(C, C) as a Gram store, K(X, C) on one of three routes, Falkon.

The whole method behind ``stages.fit`` with ``method = "nystrom"`` (the core arithmetic is
:mod:`ntk_scale.linalg.falkon`):

1. centres: M rows of X (:func:`ntk_scale.linalg.falkon.select_centers`, rpcholesky or uniform;
   M capped at N with a warning);
2. K(C, C) as a symmetric GramStore at the run's ``store`` URL, computed by the actors through
   :func:`ntk_scale.stages.gram`. The model's "training rows" are the centres and α is (M, C),
   so ``predict`` (K(X*, C)·α by blocks, resumable) works unchanged;
3. K(X, C) (N, M), where ``knm`` says:
   - ``stored``: a rectangular store beside it (``<store>-knm.zarr``, through stages.gram with
     x_cols = C), read back here one row panel per iteration;
   - ``recompute``: :class:`ntk_scale.roles.NystromWorker` actors, each holding its rows of X,
     recompute their K(X_b, C) blocks on every iteration and return K_bᵀ(mask_b ⊙ (K_b P));
   - ``normal``: the same actors accumulate H = K_nmᵀK_nm (one M x M float64 matrix per
     distinct row mask) and b = K_nmᵀy in ONE pass; an iteration then costs O(M²) here;
   - ``auto``: the cheapest by :func:`ntk_scale.sizing.choose_knm`, from one block timed here;
4. PCG on (K_nmᵀ mask K_nm + λ K_mm) α = K_nmᵀ (mask ⊙ y) with Falkon's preconditioner,
   checkpointed under the model directory (a rerun resumes); several ridges with cv / holdout
   are (fold, ridge, target) columns of one solve, one pass over K_nm per iteration for all,
   scored on the validation rows, and the chosen ridge refitted on all rows.

λ is the exact method's: ridge · mean(diag K(X, X)) (of the fold's training rows under cv).
Memory on the driver: K_mm and Falkon's factors (M² float64 each), one block of K(X, C) (or H
on the normal route), the diagonal (N,) and the targets; X is read one part at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ntk_scale import stages
from ntk_scale.io import row_range
from ntk_scale.kernels import Kernel, diag_blocks
from ntk_scale.linalg import PCGState
from ntk_scale.linalg import checkpoint as ckpt
from ntk_scale.linalg.falkon import (
    BLOCK,
    BlockProducts,
    KernelBlocks,
    StoreBlocks,
    select_centers,
    solve_nystrom,
    symmetrize,
    take_rows,
)
from ntk_scale.options import GramOptions, RunOptions, SolveOptions, to_json
from ntk_scale.pool import pool_for
from ntk_scale.progress import Progress, SolveProgress
from ntk_scale.roles import NystromWorker, node_id
from ntk_scale.sizing import choose_knm, gemm_rate, measure_read_rate
from ntk_scale.solve import (
    Folds,
    RidgeSelection,
    SolveReport,
    best_ridge,
    column_iterations,
    make_folds,
    ridge_path_meta,
    round_checkpoint,
    score,
    select_auto,
    targets_fingerprint,
    warn_at_edge,
)
from ntk_scale.store import GramStore
from ntk_scale.tasks import RoleGroup

CHECKPOINT_NAME = "nystrom_state.npz"
CV_CHECKPOINT_NAME = "nystrom_cv_state.npz"


# -- K(X, C) routes ---------------------------------------------------------------------------
class ExactDiagonal:
    """Row blocks of a stored K(X, C) with K(x_i, x_i) put where centre j is row i (as
    :class:`ntk_scale.linalg.falkon.KernelBlocks` does): blocks: a KnmBlocks; center_index
    (M,) int; diag (M,) the centres' exact diagonal (the K(C, C) store's)."""

    def __init__(self, blocks: Any, center_index: np.ndarray, diag: np.ndarray) -> None:
        self.blocks, self.shape = blocks, blocks.shape
        self.index, self.diag = np.asarray(center_index, np.int64), np.asarray(diag)

    def __iter__(self) -> Iterator[tuple[slice, np.ndarray]]:
        for rows, K_b in self.blocks:
            j = np.flatnonzero((self.index >= rows.start) & (self.index < rows.stop))
            if j.size:
                K_b = np.array(K_b)
                K_b[self.index[j] - rows.start, j] = self.diag[j]
            yield rows, K_b


class WorkerProducts:
    """:class:`ntk_scale.linalg.falkon.KnmProducts` on :class:`ntk_scale.roles.NystromWorker`
    actors ("recompute"): every call is one pass over K(X, C), each actor its own rows. A host
    that dies is replaced and its part computed again (RoleGroup.call_all). mask: (N, C) bool
    or None, shipped once (each actor its rows)."""

    def __init__(self, group: RoleGroup, shape: tuple[int, int], mask: np.ndarray | None):
        self.group, self.shape, self.mask = group, shape, mask

    def _sum(self, method: str, *args: Any) -> np.ndarray:
        refs = [self.group.ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
        return np.sum(self.group.call_all(method, *refs, what=f"K(X, C) {method}"), axis=0)

    def normal(self, P: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """K_nmᵀ (mask[:, columns] ⊙ (K_nm P)): P (M, c) -> (M, c) float64."""
        return self._sum("normal", np.asarray(P, np.float64), np.asarray(columns))

    def rhs(self, Y: np.ndarray) -> np.ndarray:
        """K_nmᵀ (mask ⊙ Y): Y (N, C) -> (M, C) float64."""
        return self._sum("rhs", np.asarray(Y, np.float64))

    def matmat(self, A: np.ndarray) -> np.ndarray:
        """K_nm A: A (M, c) -> (N, c) float64."""
        ref = self.group.ray.put(np.asarray(A, np.float64))
        return np.concatenate(self.group.call_all("matmat", ref, what="K(X, C) A"), axis=0)


class NormalProducts:
    """:class:`ntk_scale.linalg.falkon.KnmProducts` from H_s = K_nmᵀ diag(mask_s) K_nm
    accumulated once ("normal"): H (S, M, M) float64, system (C,) int the H of each column,
    b (M, C) = K_nmᵀ(mask ⊙ Y) of the targets Y it was accumulated with. An iteration costs
    2·M²·c flops here, no pass over K(X, C)."""

    def __init__(self, H: np.ndarray, system: np.ndarray, b: np.ndarray, n: int,
                 mask: np.ndarray | None) -> None:  # fmt: skip
        self.H, self.system, self.b, self.mask = H, np.asarray(system), b, mask
        self.shape = (int(n), int(H.shape[1]))

    def normal(self, P: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """H_{system[columns]} P column by column group: P (M, c) -> (M, c) float64."""
        P, sys = np.asarray(P, np.float64), self.system[np.asarray(columns)]
        out = np.empty_like(P)
        for s in np.unique(sys):
            cols = np.flatnonzero(sys == s)
            out[:, cols] = self.H[s] @ P[:, cols]
        return out

    def rhs(self, Y: np.ndarray) -> np.ndarray:
        """b, accumulated in the same pass as H, for the same Y (N, C)."""
        if np.shape(Y)[1] != self.b.shape[1]:
            raise ValueError(f"NormalProducts holds b for {self.b.shape[1]} columns, got "
                             f"{np.shape(Y)[1]}; accumulate H and b with these "
                             "targets")  # fmt: skip
        return self.b


def distinct_masks(mask: np.ndarray | None, c: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(reps (S,) the first column of each distinct row mask, or None without a mask;
    system (c,) each column's index into reps)."""
    if mask is None:
        return None, np.zeros(c, dtype=np.int64)
    _, first, system = np.unique(mask.T, axis=0, return_index=True, return_inverse=True)
    return np.asarray(first), np.asarray(system).reshape(-1)


def row_parts(n: int, parts: int, block: int) -> list[tuple[int, int]]:
    """[r0, r1) of ``parts`` contiguous runs of whole blocks covering [0, n)."""
    blocks = math.ceil(n / block)
    edges = np.linspace(0, blocks, min(parts, blocks) + 1).round().astype(int)
    return [(int(a) * block, min(int(b) * block, n)) for a, b in zip(edges[:-1], edges[1:],
                                                                 strict=True)]


@contextlib.contextmanager
def nystrom_workers(spec: Kernel, x: Any, centers: np.ndarray, index: np.ndarray, kind: str,
                    dtype: str, run: RunOptions, mask: np.ndarray | None,
                    block: int = BLOCK) -> Iterator[RoleGroup]:  # fmt: skip
    """NystromWorker actors on the pool's hosts, each its contiguous rows of x. A worker reads
    its rows from x's source one block at a time where it can (:func:`ntk_scale.io.row_range`:
    a Zarr array, a dask array or an .npy file that the worker's machine reads); otherwise the
    driver sends it its rows when the part is attached (a replacement is sent them again).
    Yields the RoleGroup."""
    pool = pool_for(run)
    n = int(x.shape[0])
    block = min(block, n)
    slots = pool.take(run.workers, limit=math.ceil(n / block))
    ranges = row_parts(n, len(slots), block)
    c_ref = pool.ray.put(np.asarray(centers))
    here = node_id()
    same_machine = all(s.info.get("node") == here for s in slots)

    def args(k: int) -> tuple:
        r0, r1 = ranges[k]
        part = None if mask is None else mask[r0:r1]
        rows = row_range(x, r0, r1, same_machine)
        return (spec, rows, c_ref, index, kind, dtype, block, r0, part)

    group = RoleGroup(pool, slots[: len(ranges)], NystromWorker, args, run, "nystrom")
    try:
        group.start()
        yield group
    finally:
        group.close()


# -- the stage --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Problem:
    """What every solve of one Nyström fit shares. x: (N, d) rows; spec: bound kernel; go:
    GramOptions (dtype resolved); so: SolveOptions; centers: (M,) sorted row indices; C: (M, d)
    their rows; K_mm: (M, M) float64; diag: (N,) exact diagonal of K(X, X); store: the K(C, C)
    GramStore; knm: the route; knm_reason; knm_store: the rectangular store (stored route)."""

    x: Any
    spec: Kernel
    go: GramOptions
    so: SolveOptions
    run: RunOptions
    centers: np.ndarray
    C: np.ndarray
    K_mm: np.ndarray
    diag: np.ndarray
    store: GramStore
    knm: str
    knm_reason: str
    knm_store: GramStore | None
    gram: Any = None  # the K(C, C) GramReport

    @property
    def centers_fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.centers, np.int64).tobytes()).hexdigest()


def prepare(x: Any, spec: Kernel, store: str, go: GramOptions, so: SolveOptions,
            run: RunOptions, systems: int = 1, columns: int = 1) -> Problem:  # fmt: skip
    """Centres, the K(C, C) store (actors, stages.gram), K_mm here, the diagonal and the
    K(X, C) route (the stored route's store computed by the actors too)."""
    n = int(x.shape[0])
    m = so.centers
    if m > n:
        warnings.warn(f"centers={m} > N={n} rows: using every row as a centre (M = N); pass "
                      f"--centers {n} or fewer", stacklevel=3)  # fmt: skip
        m = n
    idx = select_centers(spec, x, m, so.center_selection, go.kind, go.dtype, seed=so.seed)
    C = take_rows(x, idx)
    gram = stages.gram(C, spec, store, go, run)
    g = GramStore.open(store)
    K_mm = symmetrize(np.asarray(g.to_dask().compute(), dtype=np.float64))
    diag = np.asarray(diag_blocks(spec, x, go.kind, go.dtype, block=go.tile), dtype=np.float64)
    route, reason = choose_route(so, spec, x, C, idx, go, run, store, systems, columns)
    knm_store = None
    if route == "stored":
        url = knm_url(store)
        stages.gram(x, spec, url, go, run, x_cols=C)
        knm_store = GramStore.open(url)
    return Problem(x, spec, go, so, run, idx, C, K_mm, diag, g, route, reason, knm_store, gram)


def knm_url(store: str) -> str:
    """Where the stored route keeps K(X, C): beside the K(C, C) store."""
    base = store.rstrip("/")
    return (base[: -len(".zarr")] if base.endswith(".zarr") else base) + "-knm.zarr"


def start_url(store: str) -> str:
    """Where a warm start's Nyström fit keeps its K(C, C): beside the exact store."""
    base = store.rstrip("/")
    return (base[: -len(".zarr")] if base.endswith(".zarr") else base) + "-nystrom-start.zarr"


def choose_route(so: SolveOptions, spec: Kernel, x: Any, C: np.ndarray, idx: np.ndarray,
                 go: GramOptions, run: RunOptions, store: str, systems: int,
                 columns: int) -> tuple[str, str]:  # fmt: skip
    """(route, reason): ``so.knm`` as asked, or "auto" priced by sizing.choose_knm from one
    block of K(X, C) and one GEMM timed here and the read rate where the store lives."""
    if so.knm != "auto":
        return so.knm, "asked for"
    n, m = int(x.shape[0]), int(C.shape[0])
    rows = min(BLOCK, n)
    blocks = iter(KernelBlocks(spec, x[:rows], C, go.kind, go.dtype, rows))
    next(blocks)  # compiles
    t0 = time.perf_counter()
    _, K_b = next(iter(KernelBlocks(spec, x[:rows], C, go.kind, go.dtype, rows)))
    entry = (time.perf_counter() - t0) / K_b.size
    gemm = gemm_rate(m, "float64", rows)  # H's products are float64 (falkon.add_gram)
    workers = run.workers or pool_for(run).default_workers()
    parent = os.path.dirname(store.rstrip("/")) or "."
    read = measure_read_rate(parent, nbytes=32 << 20)
    pick = choose_knm(n, m, entry_seconds=entry, workers=workers, gemm_flops_per_s=gemm,
                      read_bytes_per_s=read, iterations=so.max_iter or 30,
                      itemsize=np.dtype(go.dtype).itemsize, systems=systems,
                      columns=columns)  # fmt: skip
    return pick.choice, f"auto: {pick.reason}"


@contextlib.contextmanager
def products(p: Problem, Y: np.ndarray, mask: np.ndarray | None) -> Iterator[Any]:
    """The KnmProducts of p's route for targets Y (N, C) and row masks mask (N, C) or None;
    each also has ``matmat(A)`` = K_nm A (the validation predictions)."""
    if p.knm == "stored":
        blocks = ExactDiagonal(StoreBlocks(p.knm_store), p.centers, p.store.diagonal())
        bp = BlockProducts(blocks, mask)
        # K_nmᵀy is one read of the whole stored K(X, C) (minutes at N·M = 10⁹·⁸): shown.
        b = BlockProducts(ShownBlocks(blocks, "K_nmᵀy", p.run.show_progress), mask).rhs(Y)
        yield _with_matmat(bp, blocks, (Y, b))
        return
    o = p.go
    with nystrom_workers(p.spec, p.x, p.C, p.centers, o.kind, o.dtype, p.run, mask) as group:
        wp = WorkerProducts(group, (int(p.x.shape[0]), len(p.centers)), mask)
        if p.knm == "recompute":
            yield wp
            return
        H, b, system = normal_pass(group, Y, mask, p.run, len(p.centers))
        normal = NormalProducts(H, system, b, p.x.shape[0], mask)
        normal.matmat = wp.matmat  # validation predictions: one more pass on the actors
        yield normal


#: Calls a normal-route pass is cut into, so that the driver shows its progress between them.
NORMAL_ROUNDS = 20

#: Bytes of H one worker returns per call when the driver sums the workers' parts of H.
STRIP_BYTES = 256 * 2**20


def normal_pass(group: RoleGroup, Y: np.ndarray, mask: np.ndarray | None, run: RunOptions,
                m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The normal route's one pass over K(X, C) (M = m centres) on the actors, in NORMAL_ROUNDS
    calls with a progress line between them: (H (S, M, M), b (M, C), system (C,)) for targets
    Y (N, C) and row masks mask (N, C) or None (:func:`distinct_masks`)."""
    reps, system = distinct_masks(mask, Y.shape[1])
    ref = group.ray.put(np.asarray(Y, np.float64))
    token = os.urandom(8).hex()
    n = int(Y.shape[0])
    with Progress("K_nmᵀK_nm", n, "rows", enabled=run.show_progress) as bar:
        for k in range(1, NORMAL_ROUNDS):
            done = group.call_all("normal_pass", reps, ref, k / NORMAL_ROUNDS, token,
                                  what="K_nmᵀK_nm")  # fmt: skip
            bar.update(done=sum(done))  # each part's rows done
        H, b = _sum_parts(group, reps, ref, token, m, int(Y.shape[1]))
        bar.update(done=n)
    return H, b, system


def _sum_parts(group: RoleGroup, reps: np.ndarray | None, ref: Any, token: str, m: int,
               c: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Σ over workers of their (H (S, M, M), b (M, C)) of pass ``token`` (M = m centres, C = c
    targets), fetched in row strips of about STRIP_BYTES per worker: the driver holds H once
    and the object store one strip per worker at a time (whole parts, M² · 8 bytes each, ran
    M = 20,000 out of memory)."""
    s = 1 if reps is None else len(reps)
    H, b = np.empty((s, m, m)), np.zeros((m, c))
    step = max(1, STRIP_BYTES // (8 * s * m))
    for r0 in range(0, m, step):
        rows = (r0, min(m, r0 + step))
        parts = group.call_all("gram_normal", reps, ref, token, rows, what="K_nmᵀK_nm")
        H[:, rows[0] : rows[1]] = parts[0][0]
        for h_k, _ in parts[1:]:
            H[:, rows[0] : rows[1]] += h_k
        b = sum(b_k for _, b_k in parts)  # each call's b: the pass's whole b (M, C)
        del parts  # frees this strip in the object store before the next is made
    return H, b


class ShownBlocks:
    """Row blocks of ``blocks`` (a KnmBlocks) with a progress line per pass (stage, rows)."""

    def __init__(self, blocks: Any, stage: str, enabled: bool = True) -> None:
        self.blocks, self.shape, self.stage, self.enabled = blocks, blocks.shape, stage, enabled

    def __iter__(self) -> Iterator[tuple[slice, np.ndarray]]:
        with Progress(self.stage, self.shape[0], "rows", enabled=self.enabled) as bar:
            for rows, K_b in self.blocks:
                yield rows, K_b
                bar.update(done=rows.stop)


def _with_matmat(bp: BlockProducts, blocks: Any, known: tuple | None = None) -> Any:
    """A BlockProducts with ``matmat(A)`` = K_nm A (N, c) by one pass over ``blocks``; known:
    (Y, K_nmᵀ(mask ⊙ Y)) already computed, which ``rhs(Y)`` returns for that same Y."""

    def known_rhs(Y: np.ndarray) -> np.ndarray:
        if known is not None and (Y is known[0] or np.array_equal(Y, known[0])):
            return known[1]
        return bp.rhs(Y)

    class Products:
        shape, mask, normal = bp.shape, bp.mask, bp.normal
        rhs = staticmethod(known_rhs)

        @staticmethod
        def matmat(A: np.ndarray) -> np.ndarray:
            out = np.empty((bp.shape[0], A.shape[1]))
            for rows, K_b in blocks:
                out[rows] = np.asarray(K_b, np.float64) @ A
            return out

    return Products()


def run_solve(p: Problem, Y: np.ndarray, lam: np.ndarray, mask: np.ndarray | None,
              path: str | None, x0: np.ndarray | None = None, overwrite: bool = False,
              callback: Any = None) -> tuple[Any, dict[str, Any], Any]:  # fmt: skip
    """One PCG run: Y (N, C), lam (C,), mask (N, C) or None; checkpointed at ``path``.
    Returns (NystromResult, checkpoint meta, products' matmat or None)."""
    meta = {"store": p.store.fingerprint, "centers": p.centers_fingerprint,
            "targets": targets_fingerprint(Y), "lam": np.asarray(lam).tolist(),
            "tol": float(p.so.tol),
            "folds": None if mask is None else targets_fingerprint(mask.astype(np.float64))}
    state = _load(path, meta, overwrite)
    saver = None if path is None else ckpt.checkpoint_every(path, meta, p.so.checkpoint_every)
    last: list[PCGState] = []

    bar = SolveProgress(p.so.tol, p.so.max_iter, enabled=p.run.show_progress)

    def on_state(st: PCGState) -> None:
        last[:] = [st]
        bar(st)  # "solve: N iterations | worst residual ..." in a terminal and in the log
        if saver is not None:
            saver(st)
        if callback is not None:
            callback(st)

    with products(p, Y, mask) as prod, bar:
        res = solve_nystrom(prod, p.K_mm, Y, lam, tol=p.so.tol, max_iter=p.so.max_iter,
                            x0=x0 if state is None else None, callback=on_state,
                            state=state)  # fmt: skip
        pred = prod.matmat(res.alpha) if mask is not None else None
    if path is not None and last:
        ckpt.save_checkpoint(path, last[0], meta)
    return res, {**meta, "resumed_from": None if state is None else state.iteration}, pred


def _load(path: str | None, meta: dict[str, Any], overwrite: bool) -> PCGState | None:
    if path is None:
        return None
    if overwrite and os.path.exists(path):
        os.remove(path)
        return None
    return ckpt.load_checkpoint(path, meta)


def select(p: Problem, Y: np.ndarray, folds: Folds, metric: str, ckpt_dir: str | None,
           overwrite: bool) -> RidgeSelection:  # fmt: skip
    """The ridge path of p's ridges (or ridge="auto"'s growing grid: select_auto) on folds."""

    def one_round(ridges: tuple[float, ...], k: int) -> RidgeSelection:
        return select_ridges(p, Y, folds, metric, ckpt_dir, overwrite, ridges,
                             round_checkpoint(CV_CHECKPOINT_NAME, k))  # fmt: skip

    return select_auto(one_round) if p.so.auto_ridge else one_round(p.so.ridges, 0)


def select_ridges(p: Problem, Y: np.ndarray, folds: Folds, metric: str, ckpt_dir: str | None,
                  overwrite: bool, ridges: tuple[float, ...],
                  name: str = CV_CHECKPOINT_NAME) -> RidgeSelection:  # fmt: skip
    """Every (fold, ridge, target) a column of one Nyström solve on the fold's training rows;
    scored on its validation rows (columns laid out as :func:`ntk_scale.solve.select_ridge`);
    checkpointed as ckpt_dir/name."""
    start, c, so = time.perf_counter(), Y.shape[1], p.so
    lam = np.array([[r if so.ridge_absolute else r * float(np.mean(p.diag[tr])) for r in ridges]
                    for tr, _ in folds])  # fmt: skip
    Yp = np.concatenate([np.tile(Y, (1, len(ridges))) for _ in folds], axis=1)
    mask = np.zeros(Yp.shape, dtype=bool)
    for f, (tr, _) in enumerate(folds):
        mask[tr, f * len(ridges) * c : (f + 1) * len(ridges) * c] = True
    path = None if ckpt_dir is None else os.path.join(ckpt_dir, name)
    res, _, pred = run_solve(p, Yp, np.repeat(lam.reshape(-1), c), mask, path,
                             overwrite=overwrite)  # fmt: skip
    scores = np.empty((len(folds), len(ridges)))
    for f, (_, val) in enumerate(folds):
        for k in range(len(ridges)):
            col = (f * len(ridges) + k) * c
            scores[f, k] = score(pred[val, col : col + c], Y[val], metric)
    per = np.array(column_iterations(res.pcg.residuals, so.tol, len(folds) * len(ridges)))
    iterations = per.reshape(len(folds), len(ridges)).max(axis=0).tolist()
    best = best_ridge(scores, metric)
    cols = [(f * len(ridges) + best) * c + np.arange(c) for f in range(len(folds))]
    warm = np.mean([res.alpha[:, cc] for cc in cols], axis=0)  # (M, c): α lives on the centres
    return warn_at_edge(RidgeSelection(tuple(ridges), metric, scores, iterations, best,
                                       time.perf_counter() - start, len(folds), warm))  # fmt: skip


def fit(
    x: Any, y: np.ndarray, spec: Kernel, store: str, go: GramOptions, so: SolveOptions,
    run: RunOptions, *, model_dir: str | None = None, extra: dict[str, Any] | None = None,
    folds: Folds | None = None, overwrite: bool = False, callback: Any = None,
) -> tuple[stages.SolveResult, Any]:  # fmt: skip
    """The Nyström fit of x (N, d) rows to y (N,) or (N, C) float64: returns (SolveResult whose
    alpha is (M,) or (M, C) on the centres and meta is model.json's, the K(C, C) GramReport).
    go: dtype resolved (stages.fit does).
    With ``model_dir`` the model is written there and the PCG state checkpointed under it.
    Several ridges need cv / holdout in ``so`` (or explicit ``folds``)."""
    Y = np.asarray(y, dtype=np.float64)
    vector = Y.ndim == 1
    Y = Y[:, None] if vector else Y
    n = int(x.shape[0])
    if len(so.ridges) > 1 and not (so.selects or folds is not None):
        stages._check_ridges(so)
    if folds is None and so.selects:
        folds = make_folds(n, so.cv, so.holdout, so.seed)
    t0 = time.perf_counter()
    systems = 1 if folds is None else len(folds)
    cols = Y.shape[1] * (1 if folds is None else len(folds) * len(so.ridges))
    p = prepare(x, spec, store, go, so, run, systems, cols)
    ckpt_dir = None if model_dir is None else f"{model_dir.rstrip('/')}/checkpoint"
    metric = "accuracy" if (extra or {}).get("task") == "classification" else "mse"
    selection, x0 = None, None
    if folds is not None:
        selection = select(p, Y, folds, metric, ckpt_dir, overwrite)
        so = dataclasses.replace(so, ridge=selection.ridge, cv=None, holdout=None)
        p = dataclasses.replace(p, so=so)
        x0 = selection.warm_start
    setup = time.perf_counter() - t0
    r = so.ridges[0]
    lam = r if so.ridge_absolute else r * float(np.mean(p.diag))
    path = None if ckpt_dir is None else os.path.join(ckpt_dir, CHECKPOINT_NAME)
    t1 = time.perf_counter()
    res, meta_ck, _ = run_solve(p, Y, np.full(Y.shape[1], lam), None, path, x0, overwrite,
                                callback)  # fmt: skip
    pcg = res.pcg._replace(x=res.alpha[:, 0] if vector else res.alpha)
    solve_report = SolveReport(pcg, lam, "falkon", len(p.centers), setup,
                               time.perf_counter() - t1, meta_ck["resumed_from"],
                               lams=(lam,), targets=Y.shape[1], vector=vector)  # fmt: skip
    meta = model_meta(p, solve_report, extra)
    if selection is not None:
        meta["ridge_path"] = ridge_path_meta(selection)
    if model_dir is not None:
        stages.save_model(model_dir, pcg.x, meta)
    decision = stages.OperatorDecision("nystrom", f"knm {p.knm}: {p.knm_reason}")
    return stages.SolveResult(solve_report, meta, decision, selection), p.gram


def model_meta(p: Problem, report: SolveReport, extra: dict[str, Any] | None) -> dict[str, Any]:
    """model.json of a Nyström fit: the K(C, C) store (predict's), method, centres, route."""
    g, res, o = p.store, report.result, p.so
    return {
        "kernel": g.meta.kernel, "kind": g.meta.kind, "dtype": g.meta.dtype,
        "ridge": o.ridge, "ridge_absolute": o.ridge_absolute, "lam": report.lam,
        "store": g.url, "store_fingerprint": g.fingerprint,
        "options": {"solver": to_json(o)},
        "method": "nystrom",
        "nystrom": {
            "centers": int(len(p.centers)), "center_indices": p.centers.tolist(),
            "center_selection": o.center_selection, "knm": p.knm, "knm_reason": p.knm_reason,
            "knm_store": None if p.knm_store is None else p.knm_store.url,
            "knm_store_fingerprint": None if p.knm_store is None else p.knm_store.fingerprint,
        },
        "solver": {
            "operator": "nystrom", "operator_reason": f"knm {p.knm}: {p.knm_reason}",
            "preconditioner": "falkon", "rank": int(len(p.centers)), "tol": o.tol,
            "iterations": int(res.iterations),
            "converged": np.atleast_1d(np.asarray(res.converged)).tolist(),
            "final_relative_residuals": np.atleast_1d(np.asarray(res.residuals)[-1]).tolist(),
            "setup_seconds": report.setup_seconds,
            "iteration_seconds": report.iteration_seconds,
            "resumed_from": report.resumed_from,
        },
        **(extra or {}),
    }
