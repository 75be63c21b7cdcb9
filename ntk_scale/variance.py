"""The posterior's uncertainty at scale: standard deviations (or a covariance) of test rows from
a fitted store, by multi-right-hand-side PCG (ntk_scale.posterior holds the arithmetic).

For a block of t test rows X*_b (t = the store's tile, padded as every tile is):

1. S* = K_s(X*_b, X) (t, N), the kernel the fit inverted, computed in the driver tile by tile
   against the store's copy of X (one compiled tile shape);
2. Z = (K_s + λ)⁻¹ S*ᵀ (N, t): one PCG solve with t columns in lockstep, so each iteration
   is one pass over the stored Gram for all of them; the operator and the preconditioner are
   built once and shared by every block;
3. the variance (posterior.variance); for ``"ntk"`` also K(X*_b, X) and K(X, X)·Z from the
   NNGP store of the same rows (``prior_store``), one more pass over it per block;
4. with ``out``, the block's standard deviations are written as a chunked, checksummed Zarr
   array (ntk_scale.store.predictions), so a rerun computes only the blocks not yet written.

Memory: X, one block's S* and Z (2·t·N float64), the preconditioner's N x rank factor.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import numpy as np

from ntk_scale import posterior as post
from ntk_scale.linalg.pcg import solve_pcg
from ntk_scale.options import RunOptions, SolveOptions
from ntk_scale.panels import open_symmetric
from ntk_scale.predict import flat_samples
from ntk_scale.progress import Progress
from ntk_scale.store import GramStore
from ntk_scale.store.meta import fingerprint_rows
from ntk_scale.store.predictions import PredictionArray


def cross_kernel(store: GramStore, x_b: np.ndarray, kind: str | None = None) -> np.ndarray:
    """K(x_b, X) (t, N) float64 for t <= tile rows x_b (t, d), X the store's rows, in the
    store's kernel and dtype (``kind`` overrides the kernel's kind: the other one of the same
    network), one compiled tile shape."""
    meta, spec = store.meta, store.meta.spec
    kind, t, tile = kind or meta.kind, x_b.shape[0], meta.tile
    fn = spec.tile_function(kind, meta.dtype)
    x1 = spec.pad_block(np.asarray(x_b, dtype=meta.dtype), tile)
    out = np.empty((t, meta.n_cols))
    for b in range(meta.plan.row_blocks):
        xc = store.x_block("rows", b)
        c0 = b * tile
        vals = np.asarray(fn(x1, spec.pad_block(np.asarray(xc, dtype=meta.dtype), tile)))
        out[:, c0 : c0 + len(xc)] = vals[:t, : len(xc)]
    return out


def self_kernel(store: GramStore, x_b: np.ndarray, kind: str, full: bool) -> np.ndarray:
    """K(x_b, x_b) (t, t) with ``full``, else its diagonal (t,), float64, in the store's dtype."""
    meta, spec = store.meta, store.meta.spec
    if full:
        return np.asarray(spec.tile_function(kind, meta.dtype, symmetric=True)(x_b, x_b),
                          dtype=np.float64)[: len(x_b), : len(x_b)]  # fmt: skip
    x1 = spec.pad_block(np.asarray(x_b, dtype=meta.dtype), meta.tile)
    return np.asarray(spec.diag_function(kind, meta.dtype)(x1), dtype=np.float64)[: len(x_b)]


def check_prior_store(store: GramStore, prior: GramStore | None, posterior: str) -> None:
    """Raise ValueError naming the fix unless ``prior`` is the NNGP store of the same rows and
    network that ``posterior`` = "ntk" needs (None is refused there, ignored otherwise)."""
    if not post.needs_prior_train(posterior):
        return
    if prior is None:
        raise ValueError("posterior 'ntk' needs the NNGP Gram of the training rows beside the "
                         "NTK store: compute it (ntk-scale gram --kind nngp, or fit with "
                         "posterior='ntk') and pass its store, or ask for posterior='ntkgp'")
    a, b = store.meta, prior.meta
    net, rows = b.kernel == a.kernel, b.x_rows_fingerprint == a.x_rows_fingerprint
    if b.kind != "nngp" or not net or not rows:
        raise ValueError(f"store {prior.url} holds kind={b.kind!r} of "
                         f"{'the same' if net else 'another'} network on "
                         f"{'the same' if rows else 'other'} rows; posterior 'ntk' needs the NNGP "
                         f"Gram of {store.url}'s network and rows: compute that store")  # fmt: skip


def posterior_uncertainty(
    store_url: str,
    x_star: Any,
    posterior: str | None = None,
    *,
    ridge: float,
    ridge_absolute: bool = False,
    prior_store: str | None = None,
    options: SolveOptions | None = None,
    run: RunOptions | None = None,
    full_cov: bool = False,
    out: str | None = None,
    overwrite: bool = False,
    sketch_dir: str | None = None,
) -> Any:
    """The posterior standard deviations (M,) of x_star (M, d) or (M, *S) (any array-like,
    read a block at a time), or with ``full_cov`` the covariance (M, M), for the model fitted
    on the symmetric store at ``store_url`` with ``ridge`` (relative to mean diag K, as the fit
    defines it; ``ridge_absolute``: λ itself). posterior: None for the store kind's own.

    options: the solver's operator, preconditioner, rank and tol (the fit's; operator "auto"
    is taken as "stored"). out: a path or URL where the (M, 1) standard deviations are written
    resumably (not with full_cov). sketch_dir: the fit's checkpoint directory, whose Nyström
    sketch (``solve.SKETCH_NAME``) the solves reuse when it was made for this store and these
    options (else it is built and saved there). Raises posterior.NegativeVarianceError where a
    variance is below zero beyond the solve's rounding.
    """
    run = run or RunOptions()
    opts = options or SolveOptions()
    if opts.operator == "auto":
        opts = replace(opts, operator="stored")
    store = open_symmetric(store_url, complete=opts.operator != "matrixfree")
    posterior = post.check_posterior(posterior, store.meta.kind)
    prior = None if prior_store is None else open_symmetric(prior_store)
    check_prior_store(store, prior, posterior)
    if full_cov and out is not None:
        raise ValueError("out writes standard deviations; pass full_cov=False, or out=None to "
                         "get the covariance back")  # fmt: skip
    meta = store.meta
    x_star = flat_samples(x_star, meta.spec, meta.d)
    m, tile = int(x_star.shape[0]), meta.tile
    sink = None
    if out is not None:
        of = {"store": store.fingerprint, "posterior": posterior, "ridge": float(ridge),
              "ridge_absolute": bool(ridge_absolute), "tol": float(opts.tol),
              "prior_store": None if prior is None else prior.fingerprint,
              "x_star": fingerprint_rows(x_star, "float64", tile, "x_star")}  # fmt: skip
        sink = PredictionArray.open_or_create(out, (m, 1), tile, of, overwrite)
    blocks = [(r0, min(r0 + tile, m)) for r0 in range(0, m, tile)]
    done = set() if sink is None else sink.done()
    todo = [i for i in range(len(blocks)) if i not in done]
    cov = np.zeros((m, m)) if full_cov else None
    std = None if sink is not None else np.empty(m)
    if todo or full_cov:
        with contextlib.ExitStack() as stack:
            solver = _BlockSolver(store, opts, run, ridge, ridge_absolute, stack, sketch_dir)
            slack = max(float(opts.tol), _kernel_eps(store))
            keep: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]] = []
            show = run.show_progress
            with Progress("posterior variance", len(todo), "blocks", enabled=show) as bar:
                for k, i in enumerate(todo):
                    r0, r1 = blocks[i]
                    x_b = np.asarray(x_star[r0:r1], dtype=np.float64)
                    S, Z, extra = _block_terms(store, prior, posterior, solver, x_b)
                    pk = post.prior_kind(posterior)
                    diag = self_kernel(store, x_b, pk, full=False)
                    var = post.variance(posterior, S, Z, diag, **extra)
                    sd = post.checked_std(var, diag, slack)
                    if sink is not None:
                        sink.write(i, sd[:, None])
                    else:
                        std[r0:r1] = sd
                    if full_cov:
                        keep.append((r0, r1, S, Z, extra.get("prior_td")))
                    bar.update(done=k + 1)
            if full_cov:
                cov = _full_cov(store, prior, posterior, x_star, keep)
    if full_cov:
        return cov
    return sink.read() if sink is not None else std


def sketch_std(
    store_url: str,
    x_star: Any,
    posterior: str | None = None,
    *,
    ridge: float,
    ridge_absolute: bool = False,
    prior_store: str | None = None,
    rank: int = SolveOptions.rank,
    seed: int = SolveOptions.seed,
    run: RunOptions | None = None,
) -> np.ndarray:
    """A cheap estimate of the posterior standard deviations (M,) for very many test rows,
    from the Nyström approximation on ``rank`` pivots P drawn by randomly pivoted Cholesky (as
    the preconditioner draws them); S the solved kernel, A = S(X, P), B = S(P, P),
    G = AᵀA + λB, s* = S(P, x*):

    - "nngp", "ntkgp": the deterministic-training-conditional (DTC) variance
      var = s** − s*ᵀB⁻¹s* + λ s*ᵀG⁻¹s*, >= 0 (both differences are Schur complements);
    - "ntk": (Θ + λ)⁻¹Θ*ᵀ ≈ A G⁻¹θ* (Θ replaced by its Nyström approximation), and the NNGP
      kernel K* by its Nyström approximation on the same pivots:
      var = K** + uᵀ(AᵀK A)u − 2 k*ᵀ K_PP⁻¹(K_PX A) u, u = G⁻¹θ*; needs the NNGP store
      ``prior_store`` (K·A is one pass over it).

    Both equal the exact variance when P holds every row. Costs S(X, P) once (N·r entries)
    and r kernel entries a test row (2r for "ntk"): no solve, no pass over a Gram per block.
    tests/test_variance.py measures how far it is at lower ranks."""
    import scipy.linalg

    from ntk_scale.linalg.pcg import resolve_ridge
    from ntk_scale.linalg.preconditioners import rpcholesky
    from ntk_scale.linalg.stored import StoredOperator

    run = run or RunOptions()
    store = open_symmetric(store_url, complete=False)
    posterior = post.check_posterior(posterior, store.meta.kind)
    prior = None if prior_store is None else open_symmetric(prior_store)
    check_prior_store(store, prior, posterior)
    meta = store.meta
    x_star = flat_samples(x_star, meta.spec, meta.d)
    op = StoredOperator(store)
    lam = resolve_ridge(ridge, op, ridge_absolute)
    _, piv, _ = rpcholesky(op, min(int(rank), store.shape[0]), np.random.default_rng(seed))
    A = op.columns(piv)  # S(X, P) (N, r)
    B = A[piv]
    eye = np.eye(len(piv))
    jitter = 1e-12 * float(np.trace(B)) / len(piv)
    Gf = scipy.linalg.cho_factor(A.T @ A + lam * (B + jitter * eye), lower=True)
    ntk = post.needs_prior_train(posterior)
    if ntk:
        Kop = StoredOperator(prior)
        KA = Kop.matmat(A)  # K(X, X) A (N, r): the one pass over the NNGP store
        C = A.T @ KA
        Kxp = Kop.columns(piv)  # K(X, P)
        Kpp = Kxp[piv]
        Kf = scipy.linalg.cho_factor(Kpp + 1e-12 * float(np.trace(Kpp)) / len(piv) * eye,
                                     lower=True)  # fmt: skip
        D = scipy.linalg.cho_solve(Kf, Kxp.T @ A)  # K_PP⁻¹ K_PX A (r, r)
    else:
        Bf = scipy.linalg.cho_factor(B + jitter * eye, lower=True)
    x_p = np.vstack([store.x_block("rows", b) for b in range(meta.plan.row_blocks)])[piv]
    m, tile = int(x_star.shape[0]), meta.tile
    xp_pad = meta.spec.pad_block(np.asarray(x_p, dtype=meta.dtype), max(len(x_p), tile))
    prior_kind = post.prior_kind(posterior)

    def against_pivots(x1: np.ndarray, t: int, kind: str) -> np.ndarray:
        fn = meta.spec.tile_function(kind, meta.dtype)
        return np.asarray(fn(x1, xp_pad), dtype=np.float64)[:t, : len(x_p)].T  # (r, t)

    out = np.empty(m)
    with Progress("posterior variance (sketch)", m, "rows", enabled=run.show_progress) as bar:
        for r0 in range(0, m, tile):
            x_b = np.asarray(x_star[r0 : r0 + tile], dtype=np.float64)
            x1 = meta.spec.pad_block(np.asarray(x_b, dtype=meta.dtype), tile)
            s = against_pivots(x1, len(x_b), meta.kind)
            diag = self_kernel(store, x_b, prior_kind, full=False)
            if ntk:
                u = scipy.linalg.cho_solve(Gf, s)
                k = against_pivots(x1, len(x_b), "nngp")
                var = (diag + np.einsum("rt,rt->t", u, C @ u)
                       - 2.0 * np.einsum("rt,rt->t", k, D @ u))  # fmt: skip
            else:
                var = (diag - np.einsum("rt,rt->t", s, scipy.linalg.cho_solve(Bf, s))
                       + lam * np.einsum("rt,rt->t", s, scipy.linalg.cho_solve(Gf, s)))  # fmt: skip
            out[r0 : r0 + len(x_b)] = post.checked_std(var, diag, _kernel_eps(store))
            bar.update(done=min(r0 + tile, m))
    return out


class _BlockSolver:
    """(K + λI)⁻¹ B for blocks B (N, c), on one operator and one preconditioner for all."""

    def __init__(self, store: GramStore, opts: SolveOptions, run: RunOptions, ridge: float,
                 absolute: bool, stack: contextlib.ExitStack,
                 sketch_dir: str | None = None) -> None:  # fmt: skip
        from ntk_scale.linalg.pcg import resolve_ridge
        from ntk_scale.solve import _make_operator, _make_preconditioner, sketch_rank

        opts = opts.with_rank_at_most(store.shape[0])
        self.op = _make_operator(store, opts, run, stack)
        self.lam = resolve_ridge(ridge, self.op, absolute)
        self.M = _make_preconditioner(self.op, opts, sketch_rank(opts), self.lam, run,
                                      sketch_dir, store)  # fmt: skip
        self.tol, self.max_iter, self.iterations = opts.tol, opts.max_iter, []

    def __call__(self, B: np.ndarray) -> np.ndarray:
        res = solve_pcg(self.op, np.asarray(B, np.float64), self.lam, self.M, self.tol,
                        self.max_iter)  # fmt: skip
        self.iterations.append(int(res.iterations))
        return res.x


def _block_terms(store, prior, posterior, solver, x_b):
    """(S* (t, N), Z (N, t), the "ntk" extras) of one block of test rows."""
    S = cross_kernel(store, x_b)
    Z = solver(S.T)
    extra: dict[str, np.ndarray] = {}
    if post.needs_prior_train(posterior):
        from ntk_scale.linalg.stored import StoredOperator

        extra = {"prior_td": cross_kernel(prior, x_b),
                 "prior_dd_Z": StoredOperator(prior).matmat(Z)}  # fmt: skip
    return S, Z, extra


def _full_cov(store, prior, posterior, x_star, keep) -> np.ndarray:
    """The (M, M) covariance from every block's S* and Z (kept in memory: M is small here)."""
    m = int(x_star.shape[0])
    S = np.vstack([k[2] for k in keep])
    Z = np.hstack([k[3] for k in keep])
    x = np.asarray(x_star[:m], dtype=np.float64)
    tt = self_kernel(store, x, post.prior_kind(posterior), full=True)
    extra = {}
    if post.needs_prior_train(posterior):
        from ntk_scale.linalg.stored import StoredOperator

        extra = {"prior_td": np.vstack([k[4] for k in keep]),
                 "prior_dd_Z": StoredOperator(prior).matmat(Z)}  # fmt: skip
    return post.covariance(posterior, S, Z, tt, **extra)


def _kernel_eps(store: GramStore) -> float:
    """The relative rounding of the stored entries: the kernel's float32 bound, or float64's."""
    if store.meta.dtype == "float64":
        return 1e-12
    eps = store.meta.spec.float32_relative_error(store.meta.kind)
    return float(eps) if eps is not None else 1e-5
