"""`ntk-scale`: parsing and messages only; the work is done by the library.

Exit codes: 0 success, 2 bad usage or input (the message names the value and the fix), 1 failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from ntk_scale.kernels import ACTIVATIONS, FullyConnected


class UsageError(ValueError):
    """Bad usage or input: exit code 2."""


def _kernel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kernel")
    g.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    g.add_argument("--activation", default="relu", choices=ACTIVATIONS)
    g.add_argument("--W-std", dest="W_std", type=float, default=2**0.5, help="weight std (√2)")
    g.add_argument("--b-std", dest="b_std", type=float, default=0.0, help="bias std (0)")
    g.add_argument("--negative-slope", type=float, default=None, help="for leaky_relu")
    g.add_argument("--kind", default="ntk", choices=("ntk", "nngp"))
    g.add_argument("--dtype", default="float32", choices=("float32", "float64"))


def _spec(a: argparse.Namespace) -> FullyConnected:
    return FullyConnected(a.depth, a.activation, a.W_std, a.b_std, a.negative_slope)


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--tile", type=int, default=2048, help="tile side (default 2048)")
    g.add_argument("--workers", type=int, default=None, help="actors (default: GPUs or CPUs)")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_plan(a: argparse.Namespace) -> int:
    from ntk_scale.planning import plan_gram

    plan = plan_gram(a.n, a.d, _spec(a), a.kind, a.dtype, a.tile, a.workers or 1, not a.no_measure)
    rows = plan.rows()
    if not a.no_measure:
        from ntk_scale.planning import choose_operator, measure_read_rate

        pick = choose_operator(plan, measure_read_rate(a.store_dir))
        rows.append(("solver operator", f"{pick.choice} ({pick.reason})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if a.json:
        print(json.dumps(dataclasses_asdict(plan)))
    return 0


def cmd_gram(a: argparse.Namespace) -> int:
    from ntk_scale.io import load_array
    from ntk_scale.scheduler import RunOptions, compute_gram

    x = load_array(a.x)
    x_cols = load_array(a.x_cols) if a.x_cols else None
    opts = RunOptions(workers=a.workers, address=a.address, progress=not a.no_progress)
    report = compute_gram(
        x,
        _spec(a),
        a.store,
        x_cols=x_cols,
        kind=a.kind,
        dtype=a.dtype,
        tile=a.tile,
        overwrite=a.overwrite,
        options=opts,
    )
    print(report.summary())
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from ntk_scale.scheduler import RunOptions, run_store
    from ntk_scale.store import GramStore

    store = GramStore.open(a.store, mode="r+" if a.repair else "r")
    report = store.verify()
    print(report.summary())
    if report.ok:
        return 0
    if not a.repair:
        print("run again with --repair to recompute the missing and corrupted tiles")
        return 1
    store.invalidate(report.corrupted)
    rerun = run_store(store, RunOptions(workers=a.workers, address=a.address, progress=False))
    print(f"repaired: {rerun.summary()}")
    return 0 if store.verify().ok else 1


def _solver_opts(a: argparse.Namespace) -> dict:
    return {
        "ridge": a.ridge,
        "ridge_absolute": a.ridge_absolute,
        "preconditioner": a.preconditioner,
        "rank": a.rank,
        "tol": a.tol,
        "max_iter": a.max_iter,
        "operator": a.operator,
        "checkpoint_every": a.checkpoint_every,
    }


def cmd_solve(a: argparse.Namespace) -> int:
    from ntk_scale.io import load_targets
    from ntk_scale.pipeline import stage_solve, write_json
    from ntk_scale.solve import check_targets
    from ntk_scale.store import GramStore

    store = GramStore.open(a.store)
    y = load_targets(a.y)
    check_targets(y, store.shape[0])
    meta = stage_solve(a.store, y, a.model_dir, _solver_opts(a), a.workers)
    write_json(f"{a.model_dir}/solve_report.json", meta["solver"])
    s = meta["solver"]
    print(
        f"solved: {s['iterations']} PCG iterations, converged {all(s['converged'])}, "
        f"preconditioner {s['preconditioner']} (rank {s['rank']}); model in {a.model_dir}"
    )
    for plot in meta.get("plots", []):
        print(f"plot: {plot}")
    return 0 if all(s["converged"]) else 1


def cmd_predict(a: argparse.Namespace) -> int:
    from ntk_scale.io import load_array
    from ntk_scale.pipeline import stage_predict, write_npy

    x = load_array(a.x)
    pred = stage_predict(a.model_dir, x, a.store, a.workers, a.address)
    write_npy(a.out, pred)
    print(f"wrote {pred.shape} predictions to {a.out}")
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    from ntk_scale.config import load_config
    from ntk_scale.pipeline import run_fit

    result = run_fit(load_config(a.config))
    print(json.dumps({k: result[k] for k in ("gram", "timings", "test") if k in result}, indent=2))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from ntk_scale.demo import run_demo

    return run_demo(a.out, workers=a.workers, n=a.n)


def dataclasses_asdict(obj: object) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-scale",
        description="Kernel regression with infinite-width neural tangent kernels at scale.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="size a Gram job: tiles, bytes, FLOPs, memory, time")
    p.add_argument("--n", type=int, required=True, help="training samples N")
    p.add_argument("--d", type=int, required=True, help="features d")
    p.add_argument("--no-measure", action="store_true", help="skip timing a tile here")
    p.add_argument("--store-dir", default=".", help="where the store would live (read rate)")
    p.add_argument("--json", action="store_true", help="also print the plan as JSON")
    _kernel_args(p)
    _run_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("gram", help="compute K(X, X) (or K(X, X_cols)) into a Zarr store")
    p.add_argument("--x", required=True, help="features: .npy, .npz[:key], .csv or Zarr")
    p.add_argument("--x-cols", default=None, help="second input for a rectangular K(X, X_cols)")
    p.add_argument("--store", required=True, help="store path or URL (s3://…, memory://…)")
    p.add_argument("--overwrite", action="store_true", help="replace a store made for other inputs")
    _kernel_args(p)
    _run_args(p)
    p.set_defaults(func=cmd_gram)

    p = sub.add_parser("solve", help="solve (K + λI) A = Y on a stored Gram; write a model dir")
    p.add_argument("--store", required=True, help="Gram store path or URL")
    p.add_argument("--y", required=True, help="targets (N,) or (N, C): .npy, .npz[:key], .csv")
    p.add_argument("--model-dir", required=True, help="output: A (Zarr) + model.json + plots")
    g = p.add_argument_group("solver")
    g.add_argument("--ridge", type=float, default=1e-4, help="λ / mean(diag K) (default 1e-4)")
    g.add_argument("--ridge-absolute", action="store_true", help="take --ridge as λ itself")
    g.add_argument(
        "--preconditioner",
        default="rpcholesky",
        choices=("rpcholesky", "nystrom", "jacobi", "none"),
    )
    g.add_argument("--rank", type=int, default=500, help="Nyström / RPCholesky rank")
    g.add_argument("--tol", type=float, default=1e-6, help="‖r‖/‖y‖ per column")
    g.add_argument("--max-iter", type=int, default=None)
    g.add_argument(
        "--operator", default="stored", choices=("stored", "distributed", "dense", "matrixfree")
    )
    g.add_argument("--checkpoint-every", type=int, default=10, help="iterations")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("predict", help="K(X*, X) @ A for a model directory")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--x", required=True, help="test features X*")
    p.add_argument("--out", required=True, help="predictions .npy")
    p.add_argument("--store", default=None, help="override the store recorded in the model")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("fit", help="all stages from one TOML config")
    p.add_argument("config", help="CONFIG.toml (see README: [data] [kernel] [store] …)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("verify", help="re-read every tile; report (and --repair) bad ones")
    p.add_argument("store", help="store path or URL")
    p.add_argument("--repair", action="store_true", help="recompute missing/corrupted tiles")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="the embedded default: local Ray, local store, bundled data")
    p.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="use only the first n training samples")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from ntk_scale.store import StoreLockedError

    try:
        return func(args)
    except (ValueError, FileNotFoundError, StoreLockedError) as err:
        print(f"ntk-scale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ntk-scale {args.command}: interrupted; run again to resume", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - the CLI reports every failure as exit code 1
        print(f"ntk-scale {args.command}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
