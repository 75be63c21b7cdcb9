"""The one path through the system: gram, solve, predict and fit, each with frozen options.

The CLI, the TOML config, the estimators and the demo all call these functions, and nothing else
orchestrates a run. Every input is validated before the first byte is written. All stages share
the process's persistent worker pool (:mod:`ntk_scale.pool`): actors start once and serve
gram, solve and predict, and estimator refits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np

from ntk_scale import posterior, variance
from ntk_scale.errors import PrecisionWarning, SolverError
from ntk_scale.io import as_rows
from ntk_scale.kernels import Kernel, Layer, bind, diag_blocks, precision
from ntk_scale.linalg import PCGState
from ntk_scale.model import Model, load_model, save_model
from ntk_scale.options import GramOptions, RunOptions, SolveOptions, default, to_json
from ntk_scale.plan import BlockPlan
from ntk_scale.pool import cluster_operator_for, pool_for, release_for_solve
from ntk_scale.predict import predict_from_store
from ntk_scale.scheduler import GramReport, run_store
from ntk_scale.sizing import choose_operator, measure_read_rate, plan_gram
from ntk_scale.solve import (
    CV_CHECKPOINT_NAME,
    Folds,
    RidgeSelection,
    SolveReport,
    check_targets,
    make_folds,
    merge_options,
    ridge_path_meta,
    round_checkpoint,
    select_auto,
    select_ridge,
    solve_store,
)
from ntk_scale.store import GramStore, read_meta, url_fs
from ntk_scale.store import exists as store_exists
from ntk_scale.store.fsio import is_local
from ntk_scale.store.space import check_free_space, gram_bytes, predict_bytes, solve_bytes
from ntk_scale.tables import TableTransform

__all__ = [
    "FitReport",
    "SolveResult",
    "choose_solver_operator",
    "fit",
    "gram",
    "predict",
    "precision_check",
    "resolve_dtype",
    "solve",
]


# -- gram ---------------------------------------------------------------------------------------
def gram(
    x: Any,
    spec: Kernel | Layer,
    store: str,
    options: GramOptions | None = None,
    run: RunOptions | None = None,
    *,
    x_cols: Any = None,
    compute_tiles: bool = True,
    on_tile: Callable[[dict[str, Any]], None] | None = None,
) -> GramReport:
    """K(x, x) (or K(x, x_cols)) into the store at ``store``; resumes what is there.

    x: (n, d) features or (n, H, W, C) images, array-like (numpy, memmap, Zarr, dask); x_cols:
    (m, ...) like x, or None. spec: FullyConnected or a stax network. compute_tiles:
    False creates the store (X, fingerprints, diagonal) without computing a tile, for the
    matrix-free solver. Returns a GramReport (0 computed when nothing was missing).
    """
    o, run = options or GramOptions(), run or RunOptions()
    x, shape = as_rows(x, "x")
    spec = bind(spec, shape)
    if x_cols is not None:
        x_cols, shape_cols = as_rows(x_cols, "x_cols")
        if shape_cols != shape:
            raise ValueError(f"x_cols has samples of shape {shape_cols}, x has {shape}")
    o, why = resolve_dtype(x, spec, o, store=store)

    ray_s = [0.0]

    def boot() -> None:
        """A new store: start Ray and the hosts now, so that they boot while the driver
        computes the diagonal and writes X (run_store then waits for them)."""
        if compute_tiles:
            t = time.perf_counter()
            pool = pool_for(run)
            ray_s[0] = time.perf_counter() - t
            tiles = BlockPlan.square(x.shape[0], min(o.tile, x.shape[0])).n_tiles
            pool.prestart(run.workers, limit=tiles)

    def diag() -> np.ndarray:
        # In blocks of the tile: XLA rounds by shape, so this equals the tiles' own diagonal.
        boot()
        return diag_blocks(spec, x, o.kind, o.dtype, block=o.tile)

    if o.also_nngp and (o.kind != "ntk" or x_cols is not None):
        raise ValueError(f"also_nngp writes the NNGP Gram beside a symmetric NTK store; this is "
                         f"kind={o.kind!r}{', rectangular' if x_cols is not None else ''}: "
                         "drop also_nngp, or use kind='ntk' on K(x, x)")  # fmt: skip
    twins = 2 if o.also_nngp else 1
    n_cols = None if x_cols is None else x_cols.shape[0]
    resumes = not o.overwrite and store_exists(store)
    if not resumes:  # before a byte is written (a resumed store is checked below)
        check_free_space(store, twins * gram_bytes(x.shape[0], n_cols, x.shape[1], o.tile,
                                                   o.dtype), "the Gram store", GRAM_SMALLER)
    companion = None
    if o.also_nngp:  # checked and created first: nothing of the NTK store before its twin
        companion = GramStore.create(
            nngp_store_url(store), spec, x, kind="nngp", dtype=o.dtype, tile=o.tile,
            overwrite=o.overwrite, diag=lambda: diag_blocks(spec, x, "nngp", o.dtype, block=o.tile))
    t_store = time.perf_counter()
    g = GramStore.create(
        store, spec, x, x_cols, kind=o.kind, dtype=o.dtype, tile=o.tile,
        overwrite=o.overwrite, diag=None if x_cols is not None else diag,
    )  # fmt: skip
    store_s = time.perf_counter() - t_store - ray_s[0]
    if resumes and compute_tiles and is_local(store):  # (listing a bucket's markers: skipped)
        left = len(g.missing()) + (0 if companion is None else len(companion.missing()))
        check_free_space(store, gram_bytes(x.shape[0], n_cols, x.shape[1], g.meta.tile, o.dtype,
                                           tiles=left), "the Gram's missing tiles", GRAM_SMALLER)
    if not compute_tiles:
        total = g.plan.n_tiles
        report = GramReport(g.url, total, 0, total - len(g.missing()), 0, 0, 0.0, 0)
    else:
        report = run_store(g, run, on_tile, companion)
    phases = (("ray", ray_s[0]), ("store", store_s), *report.phases)
    return dataclasses.replace(report, dtype=o.dtype, dtype_reason=why, phases=phases)


#: How a Gram job writes less (the disk check's advice).
GRAM_SMALLER = "use dtype float32 (half of float64's bytes), or fewer rows (method='nystrom')"


def nngp_store_url(store: str) -> str:
    """Where the NNGP twin of an NTK store lives: ``<store>-nngp.zarr`` beside it."""
    return store.rstrip("/").removesuffix(".zarr") + "-nngp.zarr"


def complete_nngp_store(store: str) -> str | None:
    """The NNGP twin of ``store`` (:func:`nngp_store_url`) if it exists with every tile."""
    url = nngp_store_url(store)
    try:
        return url if store_exists(url) and not GramStore.open(url).missing() else None
    except (OSError, ValueError):
        return None


def resolve_dtype(
    x: Any, spec: Kernel, o: GramOptions, ridge: float | None = None,
    ridge_absolute: bool = False, store: str | None = None,
) -> tuple[GramOptions, str]:  # fmt: skip
    """``o`` with ``dtype="auto"`` resolved, and why: float32 only where its per-entry error
    bound is far below λ (:func:`ntk_scale.kernels.precision.choose_dtype`), else float64.

    x: (n, d) rows (array-like; read once for the float64 diagonal); spec: a bound kernel.
    ridge: the smallest ridge the Gram will be solved at (relative to mean(diag K) unless
    ridge_absolute); None: SolveOptions' default (a Gram computed before its solve). A store
    already at ``store`` for these inputs keeps its dtype.
    """
    if o.dtype != "auto":
        return o, "asked for"
    if store is not None and not o.overwrite and store_exists(store):
        held = read_meta(store).dtype
        return dataclasses.replace(o, dtype=held), f"auto: the store already holds {held}"
    r = default(SolveOptions, "ridge") if ridge is None else float(ridge)
    diag = diag_blocks(spec, x, o.kind, "float64", block=o.tile)
    if not np.all(np.isfinite(diag)):  # bad rows: the store's own checks name them
        return dataclasses.replace(o, dtype="float64"), "auto: float64 (non-finite diagonal)"
    lam = r if ridge_absolute else r * float(np.mean(diag))
    choice = precision.choose_dtype(spec, o.kind, diag, lam)
    return dataclasses.replace(o, dtype=choice.dtype), choice.reason


# -- operator choice ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OperatorDecision:
    """The operator a solve uses; reason: why ("auto" measured it, or it was asked for)."""

    operator: str
    reason: str


def choose_solver_operator(
    operator: str, spec: Kernel, n: int, d: int, o: GramOptions, run: RunOptions,
    store: str,
) -> OperatorDecision:  # fmt: skip
    """The solver operator for ``operator`` (resolving "auto": the cheaper per product of
    reading the stored Gram from the store's disk, or recomputing its tiles on the workers,
    from one tile timed here and the read rate measured where the store lives)."""
    if operator != "auto":
        return OperatorDecision(operator, "asked for")
    workers = run.workers or _default_workers(run)
    picked = cluster_operator_for(run, spec, n, d, o.kind, o.dtype, o.tile, workers)
    if picked is not None:  # on a cluster: plan's cost model for its GPUs, not a tile timed here
        return OperatorDecision(*picked)
    return _auto_choice(spec, n, d, o, workers, _store_parent(store))


@functools.lru_cache(maxsize=32)
def _auto_choice(
    spec: Kernel, n: int, d: int, o: GramOptions, workers: int, where: str
) -> OperatorDecision:
    """Measured once per process and problem: refits (GridSearchCV) do not time a tile and
    write a read-rate probe again."""

    plan = plan_gram(n, d, spec, o.kind, o.dtype, o.tile, workers, measure=True)
    pick = choose_operator(plan, measure_read_rate(where))
    return OperatorDecision(pick.choice, f"auto: {pick.reason}")


#: method="auto" off a cluster takes the exact method while its store takes at most this share
#: of the free disk where the store lives (the rest for X's copy, the model, other files).
EXACT_DISK_SHARE = 0.8


def choose_method(so: SolveOptions, spec: Kernel, n: int, d: int, o: GramOptions,
                  run: RunOptions, store: str) -> tuple[str, str]:  # fmt: skip
    """(method, reason) for ``so.method`` ("auto" resolved). On a cluster joined by address:
    plan's cost model, the cheapest of the exact operators and a Nyström fit of
    ``so.centers`` within run.deadline_hours (:func:`ntk_scale.sizing.cluster_operator`).
    Elsewhere: exact while its store (store.space.gram_bytes) fits EXACT_DISK_SHARE of the free
    disk where it lives (an object store: always), else Nyström."""
    if so.method != "auto":
        return so.method, "asked for"
    if so.centers >= n:
        return "exact", f"auto: centers={so.centers:,} >= N={n:,}, the exact system is no larger"
    workers = run.workers or _default_workers(run)
    if o.dtype == "auto":
        o = dataclasses.replace(o, dtype="float64")  # unresolved: price the larger store
    picked = cluster_operator_for(run, spec, n, d, o.kind, o.dtype, o.tile, workers,
                                  centers=so.centers)  # fmt: skip
    if picked is not None:
        return ("nystrom" if picked[0] == "nystrom" else "exact"), picked[1]
    need = gram_bytes(n, None, d, o.tile, o.dtype)  # what the disk check will ask for
    where = _store_parent(store)
    if "://" in where:
        return "exact", f"auto: the exact store ({need / 1e9:.3g} GB) goes to object storage"
    free = shutil.disk_usage(where).free
    fits = need <= EXACT_DISK_SHARE * free
    verdict = "fits in" if fits else "is more than"
    reason = (f"auto: the exact store ({need / 1e9:.3g} GB) {verdict} {EXACT_DISK_SHARE:.0%} of "
              f"the {free / 1e9:.3g} GB free in {where}")  # fmt: skip
    return ("exact", reason) if fits else ("nystrom", f"{reason}: Nyström, {so.centers:,} centres")


def _default_workers(run: RunOptions) -> int:
    return pool_for(run).default_workers()


def _store_parent(url: str) -> str:
    """The directory (or URL prefix) a store lives in; a local one is created, since "auto"
    measures its disk before the store exists."""
    head = url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
    if "://" not in url:
        os.makedirs(head or ".", exist_ok=True)
    return head or "."


# -- solve --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SolveResult:
    """report: the solver's SolveReport; meta: what the model directory records (model.json);
    decision: the operator used and why."""

    report: SolveReport
    meta: dict[str, Any]
    decision: OperatorDecision
    #: The ridge path scored on held-out rows, when the ridge was chosen there (else None).
    selection: RidgeSelection | None = None

    @property
    def alpha(self) -> np.ndarray:
        return self.report.result.x


def solve(
    store: str,
    y: Any,
    options: SolveOptions | None = None,
    run: RunOptions | None = None,
    *,
    model_dir: str | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    callback: Callable[[PCGState], object] | None = None,
    folds: Folds | None = None,
    transform: TableTransform | None = None,
    x0: np.ndarray | None = None,
    sketch_dir: str | None = None,
    **overrides: Any,
) -> SolveResult:
    """(K + λI) A = Y on the stored Gram at ``store``. With ``model_dir`` the model (A, model.json,
    plots) is written there and the PCG state checkpointed under it (a rerun resumes).

    y: (N,) or (N, C) targets. overrides: fields of SolveOptions / RunOptions (ridge=1e-3, ...).
    extra: more fields for model.json (task, classes). Several ridges with cv (or holdout, or
    explicit ``folds``): every ridge is scored on held-out rows of this store in one PCG run
    (MSE, or accuracy for task "classification"), and the model is the refit on all rows at
    the best one, started from that ridge's fold solutions; model.json records the whole path
    and the plot validation.png shows it.
    transform: the table transform of the inputs (``ntk-scale ingest``); saved with the model,
    it maps y to the solve's units (a standardised target) and predictions back.
    x0: (N,) or (N, C) a starting guess (``warm_start="nystrom"`` in fit); the folds'
    solutions replace it when the ridge is chosen on held-out rows.
    """
    opts, run = merge_options(options or SolveOptions(), run or RunOptions(), overrides)
    if opts.method == "nystrom":
        raise ValueError("method='nystrom' solves from the rows X (it computes K(C, C) and "
                         "K(X, C) itself): use fit (ntk-scale fit with [solver] method = "
                         "\"nystrom\", or NTKRegressor(method='nystrom')), not solve on a "
                         "stored Gram")  # fmt: skip
    if transform is not None:
        if transform.target is not None:
            y = transform.to_model_units(y)
        extra = {**(extra or {}), "transform": transform.to_dict()}
    g = GramStore.open(store)
    posterior.check_posterior(opts.posterior, g.meta.kind)  # a misfit fails before the solve
    decision = choose_solver_operator(
        opts.operator, g.meta.spec, g.meta.n_rows, g.meta.d,
        GramOptions(g.meta.kind, g.meta.dtype, g.meta.tile), run, store,
    )  # fmt: skip
    opts = dataclasses.replace(opts, operator=decision.operator)
    release_for_solve(opts.operator, run)  # on a cluster, GPU nodes leave a driver-side solve
    ckpt = None if model_dir is None else f"{model_dir.rstrip('/')}/checkpoint"
    if model_dir is not None:
        shape = np.shape(y)
        fits = 1 + (opts.cv or (1 if opts.holdout else 0)) if opts.selects else 1
        columns = (1 if len(shape) < 2 else shape[1]) * len(opts.ridges) * fits
        check_free_space(model_dir, solve_bytes(g.meta.n_rows, columns, opts.rank),
                         "the solve's checkpoint, sketch and model",
                         "a lower rank or fewer ridges")  # fmt: skip
    rounding = precision_check(g, opts)
    selection = None
    try:
        if opts.selects or folds is not None:
            selection = _select(store, y, opts, run, folds, extra, ckpt, overwrite,
                                g.meta.n_rows, sketch_dir)  # fmt: skip
            opts = dataclasses.replace(opts, ridge=selection.ridge, cv=None, holdout=None)
        else:
            _check_ridges(opts)
        warm = x0 if selection is None else selection.warm_start  # the folds' solutions
        report = solve_store(store, y, opts, run, out_dir=ckpt, overwrite=overwrite,
                             callback=callback, x0=warm, sketch_dir=sketch_dir)  # fmt: skip
    except SolverError as err:
        if "positive definite" not in str(err):
            raise
        raise SolverError(f"{err}. {rounding['explain']}") from err
    meta = model_meta(g, report, opts, decision, extra)
    meta["rounding"] = {k: v for k, v in rounding.items() if k != "explain"}
    if selection is not None:
        meta["ridge_path"] = ridge_path_meta(selection)
    if model_dir is not None:
        save_model(model_dir, report.result.x, meta)
        meta["plots"] = _plots(model_dir, report, opts.tol)
        if selection is not None and "://" not in model_dir:
            from ntk_scale.plots import plot_ridge_path  # matplotlib only when plotting

            meta["plots"].append(plot_ridge_path(selection.ridges, selection.scores,
                                                 selection.metric, selection.best,
                                                 f"{model_dir}/validation.png"))  # fmt: skip
    return SolveResult(report, meta, decision, selection)


def precision_check(g: GramStore, opts: SolveOptions) -> dict[str, Any]:
    """How the store's rounding compares with the smallest ridge λ of ``opts`` (model.json's
    "rounding"); warns (PrecisionWarning) where a float32 store's bound is not small against λ.
    "explain": the likely cause of a 'not positive definite' failure, and its fix."""
    diag, spec, kind = g.diagonal(), g.meta.spec, g.meta.kind
    r = min(opts.ridges)
    lam = r if opts.ridge_absolute else r * float(np.mean(diag))
    bound = precision.entry_bound(spec, kind, float(np.max(diag)))
    risk = precision.float32_risk(spec, kind, diag, lam)
    if risk is not None and g.meta.dtype == "float32":
        warnings.warn(risk, PrecisionWarning, stacklevel=3)
    return {
        "dtype": g.meta.dtype,
        "float32_entry_bound": bound,
        "lam": lam,
        "float32_ok": risk is None,
        "explain": precision.explain_indefinite(spec, kind, g.meta.dtype, diag, lam),
    }


def _check_ridges(opts: SolveOptions) -> None:
    if len(opts.ridges) > 1 and not opts.selects:
        raise ValueError(
            f"ridge={list(opts.ridges)}: several ridges need cv= (folds) or holdout= (a "
            "fraction of rows) to choose one on held-out data; ntk_scale.solve.solve_store "
            "returns the whole path"
        )


def _select(store, y, opts, run, folds, extra, ckpt, overwrite, n,
            sketch_dir=None) -> RidgeSelection:  # fmt: skip
    """Every ridge scored on held-out rows (MSE, or accuracy for classification)."""
    if folds is None:
        folds = make_folds(n, opts.cv, opts.holdout, opts.seed)
    metric = "accuracy" if (extra or {}).get("task") == "classification" else "mse"
    def one_round(ridges: tuple[float, ...], k: int) -> RidgeSelection:
        return select_ridge(store, y, dataclasses.replace(opts, ridge=ridges), run, folds=folds,
                            metric=metric, out_dir=ckpt, overwrite=overwrite,
                            checkpoint_name=round_checkpoint(CV_CHECKPOINT_NAME, k),
                            sketch_dir=sketch_dir)  # fmt: skip

    return select_auto(one_round) if opts.auto_ridge else one_round(opts.ridges, 0)


def model_meta(
    g: GramStore, report: SolveReport, o: SolveOptions, decision: OperatorDecision,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """model.json's fields: kernel, store and its fingerprint, the ridge and the solver's report."""
    res = report.result
    return {
        "kernel": g.meta.kernel,
        "kind": g.meta.kind,
        "dtype": g.meta.dtype,
        "ridge": o.ridge,
        "ridge_absolute": o.ridge_absolute,
        "lam": report.lam,
        "store": g.url,
        "store_fingerprint": g.fingerprint,
        # predict's std / cov (ntk_scale.posterior); "ntk" also needs the NNGP store, made
        # on the first such predict (nngp_store_for) and recorded here once it exists
        "posterior": posterior.check_posterior(o.posterior, g.meta.kind),
        "nngp_store": complete_nngp_store(g.url) if g.meta.kind == "ntk" else None,
        # every solver option as its record holds it (the one definition: ntk_scale.options)
        "options": {"solver": to_json(o)},
        "solver": {
            "operator": decision.operator,
            "operator_reason": decision.reason,
            "preconditioner": report.preconditioner,
            "rank": report.rank,
            "tol": o.tol,
            "iterations": int(res.iterations),
            "converged": np.asarray(res.converged).tolist(),
            "final_relative_residuals": np.asarray(res.residuals)[-1].tolist(),
            "setup_seconds": report.setup_seconds,
            "iteration_seconds": report.iteration_seconds,
            "resumed_from": report.resumed_from,
        },
        **(extra or {}),
    }


def _plots(model_dir: str, report: SolveReport, tol: float) -> list[str]:
    if "://" in model_dir:
        return []
    from ntk_scale.plots import plot_residuals, plot_spectrum  # matplotlib only when plotting

    plots = [plot_residuals(report.result.residuals, tol, f"{model_dir}/residuals.png")]
    if len(report.eigenvalues):
        plots.append(plot_spectrum(report.eigenvalues, report.lam, f"{model_dir}/spectrum.png"))
    return plots


# -- predict ------------------------------------------------------------------------------------
def predict(
    model: str | Model,
    x_star: Any,
    run: RunOptions | None = None,
    *,
    store: str | None = None,
    out: str | None = None,
    overwrite: bool = False,
) -> Any:
    """K(x_star, X) @ A for a model (its directory, or a Model); ``store`` overrides the store
    recorded in it (its fingerprint must match). x_star: (M, d) or (M, *S), any array-like,
    read block by block. Returns (M,) or (M, C), in the target's units when the model has a
    table transform; with ``out`` (a path or URL) the (M, C) predictions are written there as
    Zarr, resumably, and returned as the lazy Zarr array."""
    m = load_model(model) if isinstance(model, str) else model
    url = store or m.store_url
    g = GramStore.open(url)
    if m.meta.get("store_fingerprint") != g.fingerprint:
        raise ValueError(
            f"the model was fitted on store {m.meta.get('store_fingerprint', '?')[:12]}…, but "
            f"{url} holds {g.fingerprint[:12]}…; use the store the model was fitted on (see "
            "model.json) or fit again"
        )
    transform = transform_of(m.meta)
    finish = None if transform is None or not transform.target else transform.from_model_units
    of = {} if transform is None else {"transform": transform.fingerprint()}
    if out is not None and (overwrite or not _written(out)):
        columns = 1 if m.alpha.ndim == 1 else m.alpha.shape[1]
        check_free_space(out, predict_bytes(_n_rows(x_star), columns), "the predictions",
                         "predict fewer rows at a time")  # fmt: skip
    return predict_from_store(url, m.alpha, x_star, run, out=out, overwrite=overwrite,
                              finish=finish, of=of)  # fmt: skip


def _n_rows(x: Any) -> int:
    """Rows of an array-like without reading it (numpy, memmap, Zarr, dask, or a sequence)."""
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape else len(x)


def _written(url: str) -> bool:
    """Whether anything exists at ``url`` yet (a resumed output is not checked for space)."""
    fs, root = url_fs(url)
    return bool(fs.exists(root))


def predict_uncertainty(
    model: str | Model,
    x_star: Any,
    run: RunOptions | None = None,
    *,
    store: str | None = None,
    full_cov: bool = False,
    out: str | None = None,
    overwrite: bool = False,
    model_dir: str | None = None,
) -> Any:
    """The posterior standard deviations (M,) of x_star for a model (its directory, or a
    Model), or with ``full_cov`` its covariance (M, M): model.json's ``posterior`` at its λ,
    by multi-right-hand-side PCG with the fit's solver options (:mod:`ntk_scale.variance`).
    out: a path or URL where the (M, 1) standard deviations are written resumably. Posterior
    "ntk" first makes the NNGP store of the training rows if the model has none
    (:func:`nngp_store_for`), and records it in model.json when ``model_dir`` (or the model's
    own directory) is given. In the target's units: a table transform's scale applies."""
    m = load_model(model) if isinstance(model, str) else model
    model_dir = model_dir or (model if isinstance(model, str) else None)
    url = store or m.store_url
    if "nystrom" in m.meta:
        raise ValueError("predict --std needs the exact method's store; this model was fitted "
                         "with method='nystrom': refit with method='exact'")  # fmt: skip
    if out is not None and (overwrite or not _written(out)):
        check_free_space(out, predict_bytes(_n_rows(x_star), 1), "the standard deviations",
                         "predict fewer rows at a time")  # fmt: skip
    which = m.meta.get("posterior") or posterior.check_posterior(None, m.meta["kind"])
    prior = None
    if posterior.needs_prior_train(which):
        prior = m.meta.get("nngp_store") or nngp_store_for(url, run)
        if model_dir is not None and m.meta.get("nngp_store") != prior:
            save_model(model_dir, m.alpha, {**m.meta, "nngp_store": prior})
    so = SolveOptions(**{k: v for k, v in m.meta["options"]["solver"].items()
                         if k in ("preconditioner", "rank", "tol", "max_iter", "seed",
                                  "pivot_block", "memory_budget_bytes")},
                      operator=m.meta["solver"]["operator"])  # fmt: skip
    result = variance.posterior_uncertainty(
        url, x_star, which, ridge=m.meta["lam"], ridge_absolute=True, prior_store=prior,
        options=so, run=run, full_cov=full_cov, out=out, overwrite=overwrite,
        sketch_dir=None if model_dir is None else f"{model_dir.rstrip('/')}/checkpoint")
    transform = transform_of(m.meta)
    scale = 1.0 if transform is None or not transform.target else float(transform.target_std)
    if scale != 1.0:
        if out is not None:
            raise ValueError("a standardised target's std is written in model units only; "
                             "predict without --out (a .npy) to get them in the target's")
        result = result * (scale**2 if full_cov else scale)
    return result


def nngp_store_for(store_url: str, run: RunOptions | None = None) -> str:
    """The NNGP Gram of the NTK store's training rows (its copy of X), same network, dtype and
    tile, at ``<store>-nngp.zarr`` (reused when it is there): posterior "ntk" needs it."""
    g = GramStore.open(store_url)
    url = nngp_store_url(store_url)
    x = np.vstack([g.x_block("rows", b) for b in range(g.plan.row_blocks)])
    gram(x, g.meta.spec, url, GramOptions(kind="nngp", dtype=g.meta.dtype, tile=g.meta.tile),
         run or RunOptions())  # fmt: skip
    return url


def transform_of(meta: dict[str, Any]) -> TableTransform | None:
    """The table transform a model was fitted with (model.json's "transform"), or None."""
    raw = meta.get("transform")
    return None if raw is None else TableTransform.from_dict(raw)


# -- fit ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Inputs:
    """Validated inputs: y as (N, C) float64 (one-hot for classification)."""

    x_train: Any
    y_train: np.ndarray
    classes: np.ndarray | None
    x_test: Any | None
    y_test: np.ndarray | None
    sample_shape: tuple[int, ...] = ()


def prepare_inputs(x_train, y_train, x_test=None, y_test=None, task="regression") -> Inputs:
    """Validate everything up front: shapes, widths, NaN, labels."""
    x_train, shape = as_rows(x_train, "x_train")
    n, d = x_train.shape
    classes, y = None, np.asarray(y_train)
    if task == "classification":
        if y.ndim != 1:
            raise ValueError(f"y_train must be 1-D class labels for classification, got {y.shape}")
        classes, codes = np.unique(y, return_inverse=True)
        y = np.eye(len(classes))[codes]
    check_targets(y, n)
    if x_test is not None:
        test_shape = tuple(getattr(x_test, "shape", np.shape(x_test)))
        x_test, t_shape = as_rows(x_test, "x_test")
        if t_shape != shape:
            raise ValueError(
                f"x_test has shape {test_shape} but the training samples have shape {shape}; "
                "test inputs must have the training shape"
            )
    if y_test is not None and x_test is not None and len(y_test) != x_test.shape[0]:
        raise ValueError(f"y_test has {len(y_test)} rows but x_test has {x_test.shape[0]}")
    return Inputs(x_train, np.asarray(y, dtype=np.float64), classes, x_test, y_test, shape)


@dataclasses.dataclass(frozen=True)
class FitReport:
    """gram: the GramReport; solve: the SolveResult; seconds: per stage; predictions and test
    metrics when test inputs were given."""

    gram: GramReport
    solve: SolveResult
    seconds: dict[str, float]
    predictions: np.ndarray | None = None
    test: dict[str, float] | None = None


def fit(
    inputs: Inputs,
    spec: Kernel | Layer,
    store: str,
    gram_options: GramOptions | None = None,
    solve_options: SolveOptions | None = None,
    run: RunOptions | None = None,
    *,
    model_dir: str | None = None,
    extra: dict[str, Any] | None = None,
    transform: TableTransform | None = None,
    sketch_dir: str | None = None,
) -> FitReport:
    """gram -> solve -> (predict on inputs.x_test): the whole regression, one store.

    The solver operator is chosen first, so a matrix-free fit computes no stored tile.
    sketch_dir: where the solve caches its Nyström sketch (default model_dir's checkpoint).
    """
    go, so, run = (
        gram_options or GramOptions(),
        solve_options or SolveOptions(),
        run or RunOptions(),
    )
    n, d = inputs.x_train.shape
    spec = bind(spec, inputs.sample_shape or (d,))
    go, why = resolve_dtype(inputs.x_train, spec, go, min(so.ridges), so.ridge_absolute, store)
    method, method_why = choose_method(so, spec, n, d, go, run, store)
    so = dataclasses.replace(so, method=method)
    extra = {"method_choice": method_why, **(extra or {})}
    if not (so.method == "nystrom" and so.selects):
        _check_ridges(so)  # before the Gram is computed
    if so.method == "nystrom":
        return _fit_nystrom(inputs, spec, store, go, so, run, model_dir,
                            {"dtype_choice": why, **extra}, transform)  # fmt: skip
    decision = choose_solver_operator(so.operator, spec, n, d, go, run, store)
    so = dataclasses.replace(so, operator=decision.operator)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    g = gram(inputs.x_train, spec, store, go, run, compute_tiles=so.operator != "matrixfree")
    g = dataclasses.replace(g, dtype_reason=why)
    seconds["gram"] = time.perf_counter() - t0
    classes = None if inputs.classes is None else inputs.classes.tolist()
    more = {"classes": classes, "dtype_choice": why, **extra}
    x0 = None
    if so.warm_start == "nystrom" and not so.selects:
        x0, more["warm_start"] = _nystrom_start(inputs, spec, store, go, so, run, transform)
    s = solve(store, inputs.y_train, so, run, model_dir=model_dir, extra=more, transform=transform,
              x0=x0, sketch_dir=sketch_dir)  # fmt: skip
    s = dataclasses.replace(s, decision=decision)
    seconds["solve"] = time.perf_counter() - t0 - seconds["gram"]
    if inputs.x_test is None:
        return FitReport(g, s, seconds)
    t2 = time.perf_counter()
    pred = predict(Model(s.alpha, s.meta), inputs.x_test, run, store=store)
    seconds["predict"] = time.perf_counter() - t2
    test = None if inputs.y_test is None else metrics(pred, inputs.y_test, inputs.classes)
    return FitReport(g, s, seconds, pred, test)


def _fit_nystrom(inputs: Inputs, spec: Kernel, store: str, go: GramOptions, so: SolveOptions,
                 run: RunOptions, model_dir: str | None, extra: dict[str, Any],
                 transform: TableTransform | None) -> FitReport:  # fmt: skip
    """fit with method "nystrom" (:func:`ntk_scale.nystrom.fit`): the store holds K(C, C),
    the model α on the centres, so predict is the exact method's."""
    from ntk_scale import nystrom  # import cycle: nystrom builds on this module's gram

    y = inputs.y_train
    if transform is not None:
        if transform.target is not None:
            y = transform.to_model_units(y)
        extra = {**extra, "transform": transform.to_dict()}
    classes = None if inputs.classes is None else inputs.classes.tolist()
    t0 = time.perf_counter()
    s, g = nystrom.fit(inputs.x_train, y, spec, store, go, so, run, model_dir=model_dir,
                       extra={"classes": classes, **extra})  # fmt: skip
    g = dataclasses.replace(g, dtype_reason=extra.get("dtype_choice", g.dtype_reason))
    seconds = {"gram+solve": time.perf_counter() - t0}
    if inputs.x_test is None:
        return FitReport(g, s, seconds)
    t1 = time.perf_counter()
    pred = predict(Model(s.alpha, s.meta), inputs.x_test, run, store=store)
    seconds["predict"] = time.perf_counter() - t1
    test = None if inputs.y_test is None else metrics(pred, inputs.y_test, inputs.classes)
    return FitReport(g, s, seconds, pred, test)


def _nystrom_start(inputs: Inputs, spec: Kernel, store: str, go: GramOptions, so: SolveOptions,
                   run: RunOptions, transform: TableTransform | None) -> tuple[np.ndarray, dict]:
    """x0 = (y - K_nm α)/λ for the exact solve from a Nyström fit of ``so.centers`` centres (its
    K(C, C) store beside ``store``): the exact A satisfies λA = y - K A, and K_nm α ≈ K A."""
    from ntk_scale import nystrom  # import cycle: nystrom builds on this module's gram

    y = inputs.y_train
    if transform is not None and transform.target is not None:
        y = transform.to_model_units(y)
    ns = dataclasses.replace(so, method="nystrom", warm_start="none", knm="auto")
    s, _ = nystrom.fit(inputs.x_train, y, spec, nystrom.start_url(store), go, ns, run)
    fitted = predict(Model(s.alpha, s.meta), inputs.x_train, run, store=s.meta["store"])
    if not s.report.lam > 0:
        raise ValueError("warm_start='nystrom' needs a ridge > 0 (x0 = (y - K_nm α)/λ)")
    info = {"method": "nystrom", "centers": s.meta["nystrom"]["centers"],
            "nystrom_iterations": s.meta["solver"]["iterations"]}  # fmt: skip
    return (np.asarray(y, np.float64) - fitted) / s.report.lam, info


def metrics(pred: np.ndarray, y: np.ndarray, classes: np.ndarray | None) -> dict[str, float]:
    """Accuracy (classification: argmax of the decision values) or MSE and R²."""
    if classes is not None:
        labels = classes[np.argmax(pred, axis=1)]
        return {"accuracy": float(np.mean(labels == np.asarray(y)))}
    y = np.asarray(y, dtype=np.float64).reshape(pred.shape)
    mse = float(np.mean((pred - y) ** 2))
    return {"mse": mse, "r2": float(1 - mse / np.mean((y - y.mean(axis=0)) ** 2))}


def write_npy(path: str, array: np.ndarray) -> None:
    """array to a .npy file at a path or URL (never pickled)."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(root), exist_ok=True)
    with fs.open(root, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def write_json(path: str, obj: Any) -> None:
    """obj as indented JSON at a path or URL."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(root), exist_ok=True)
    with fs.open(root, "w") as f:
        json.dump(obj, f, indent=2, default=str)


# -- verify -------------------------------------------------------------------------------------
def verify(store: str, repair: bool = False, run: RunOptions | None = None) -> tuple[Any, Any]:
    """Re-read every tile's checksum: (VerifyReport, None), or with ``repair`` the missing and
    corrupted tiles recomputed: (the VerifyReport before, the GramReport of the repair)."""
    g = GramStore.open(store, mode="r+" if repair else "r")
    found = g.verify()
    if found.ok or not repair:
        return found, None
    g.invalidate(found.corrupted)
    return found, run_store(g, run or RunOptions(progress=False))
