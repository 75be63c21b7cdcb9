"""`ntk-scale demo`: the embedded default end to end, on scikit-learn's bundled digits.

A local Ray on 127.0.0.1 started by the program, a local Zarr store, gram -> PCG -> predict, and
beside it an exact dense solve (scipy's Cholesky) of the same regression for comparison.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ntk_scale import stages
from ntk_scale.cluster import STARTED_S
from ntk_scale.kernels import FullyConnected
from ntk_scale.kernels.stax import SmallConv
from ntk_scale.model import Model
from ntk_scale.options import GramOptions, RunOptions, SolveOptions

SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
#: The demo's solver: SolveOptions' defaults (ridge, preconditioner, ...) but for a smaller
#: rank (1,500 rows) and a tight tol, so the PCG answer can be compared with the dense one.
SOLVER = SolveOptions(rank=300, tol=1e-8)
RIDGE = SOLVER.ridge


def load_digits_split(n: int | None = None):
    """Digits (1,797 x 64, bundled with scikit-learn: no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order] / 16.0, y[order]
    n_train = n or 1500
    return x[:n_train], y[:n_train], x[1500:], y[1500:]


#: The demo's kernels: "fc" on the 64 pixels, "conv" on the 8x8x1 images.
KERNELS = ("fc", "conv")
#: Training rows of the conv demo unless --n says otherwise (a conv pair costs ~1000x an FC
#: entry: 600 rows keep the demo, with its dense float64 reference, near a minute).
CONV_DEFAULT_N = 600


def dense_reference(x_train, y_onehot, x_test, ridge: float, spec=SPEC) -> np.ndarray:
    """Exact kernel ridge regression in float64 with scipy's Cholesky (the oracle)."""
    from scipy.linalg import cho_factor, cho_solve

    k = spec.kernel(x_train, dtype="float64")
    lam = ridge * np.mean(np.diag(k))
    alpha = cho_solve(cho_factor(k + lam * np.eye(len(k))), y_onehot)
    return spec.kernel(x_test, x_train, dtype="float64") @ alpha


def run_demo(out: str = "demo-output", workers: int | None = None, n: int | None = None,
             kernel: str = "fc") -> int:  # fmt: skip

    if kernel not in KERNELS:
        raise ValueError(f"demo kernel={kernel!r}; use one of {', '.join(KERNELS)}")
    run = RunOptions(workers=workers)
    # `ntk-scale demo` started Ray beside its imports (ntk_scale.launch): boot the hosts now,
    # while the driver loads the data and builds the store (the gram stage waits for them)
    early_ray = STARTED_S.get("launch")
    if early_ray is not None:
        from ntk_scale.pool import pool_for

        pool_for(run).prestart(run.workers)
    conv = kernel == "conv"
    x_train, y_train, x_test, y_test = load_digits_split(n or (CONV_DEFAULT_N if conv else None))
    spec = SmallConv() if conv else SPEC
    if conv:  # the same pixels as (n, 8, 8, 1) NHWC images
        x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)
    classes = np.arange(10)
    onehot = np.eye(10)[y_train]
    os.makedirs(out, exist_ok=True)
    # One store per kernel (each reused by a rerun); another --n replaces it.
    name, model = "gram-conv.zarr" if conv else "gram.zarr", os.path.join(out, "model")
    store = os.path.join(out, name)
    shape = "8x8x1 images" if conv else "64 features"
    print(f"digits: {len(x_train)} train / {len(x_test)} test, {shape}, 10 classes")
    print(f"kernel: {spec.to_json()} (NTK; tile dtype auto: float32 only far below λ)")
    if early_ray is not None:
        print(f"ray:     a local Ray on 127.0.0.1, started at launch beside the imports in "
              f"{early_ray:.1f} s")  # fmt: skip
    t0 = time.perf_counter()
    gram = stages.gram(x_train, spec, store, GramOptions(tile=512, overwrite=True), run)
    t1 = time.perf_counter()
    solved = stages.solve(
        store, onehot, SOLVER, run, model_dir=model, extra={"task": "classification"}
    )
    meta = solved.meta
    t2 = time.perf_counter()
    pred = stages.predict(Model(solved.alpha, meta), x_test, run, store=store)
    t3 = time.perf_counter()
    dense = dense_reference(x_train, onehot, x_test, RIDGE, spec)
    t4 = time.perf_counter()
    ours, exact = stages.metrics(pred, y_test, classes), stages.metrics(dense, y_test, classes)
    s = meta["solver"]
    agree = float(np.mean(np.argmax(pred, 1) == np.argmax(dense, 1)))
    rel = float(np.max(np.abs(pred - dense)) / np.max(np.abs(dense)))
    lines = [
        f"gram:    {gram.summary()}  [{t1 - t0:.1f} s]",
        f"         of which {gram.phase_line(without=('ray',) if early_ray else ())}",
        f"solve:   PCG {s['iterations']} iterations, preconditioner {s['preconditioner']} "
        f"rank {s['rank']}, λ = {meta['lam']:.3g} ({RIDGE:g} x mean diag), converged "
        f"{all(s['converged'])}, final ‖r‖/‖y‖ <= {max(s['final_relative_residuals']):.1e}  "
        f"[{t2 - t1:.1f} s]",
        f"predict: {len(x_test)} rows on Ray (the same worker processes)  [{t3 - t2:.1f} s]",
        "",
        f"test accuracy  ntk_scale ({gram.dtype} store + PCG): {ours['accuracy']:.4f}",
        f"test accuracy  exact dense solve (float64 Cholesky): {exact['accuracy']:.4f}  "
        f"[{t4 - t3:.1f} s]",
        f"same predicted class on {agree:.1%} of test rows; max |Δ prediction| / max |pred| "
        f"= {rel:.1e}",
        "",
        f"store: {store}",
        f"model: {model} (alpha as Zarr + model.json)",
    ] + [f"plot:  {p}" for p in meta.get("plots", [])]
    print("\n".join(lines))
    stages.write_json(
        os.path.join(out, "metrics.json"),
        {
            "ntk_scale": ours,
            "dense": exact,
            "agreement": agree,
            "max_rel_diff": rel,
            "solver": s,
            "seconds": {"ray_at_launch": early_ray, "gram": t1 - t0, "solve": t2 - t1,
                        "predict": t3 - t2, "gram_phases": dict(gram.phases)},
        },
    )
    return 0
