"""`ntk-scale`: parsing and messages only; the work is done by the library.

Exit codes: 0 success, 2 bad usage or input (the message names the value and the fix), 1 failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ntk_scale.kernels import ACTIVATIONS, FullyConnected, Layer, bind
from ntk_scale.kernels.stax import PRESETS
from ntk_scale.kernels.validate import DTYPES, KINDS
from ntk_scale.options import (
    OPERATORS,
    PRECONDITIONERS,
    GramOptions,
    RunOptions,
    SolveOptions,
    default,
    pick,
)


def _kernel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kernel")
    spec = FullyConnected()
    g.add_argument("--kernel", default="fc", choices=("fc", *PRESETS),
                   help="fc (FullyConnected: --depth ...) or a preset stax network")  # fmt: skip
    g.add_argument("--kernel-spec", default=None, metavar="SPEC.json",
                   help="a kernel written by spec.to_json() (instead of --kernel)")  # fmt: skip
    g.add_argument("--depth", type=int, default=spec.depth, help="hidden layers (default 3)")
    g.add_argument("--activation", default=spec.activation, choices=ACTIVATIONS)
    g.add_argument("--W-std", dest="W_std", type=float, default=spec.W_std, help="weight std")
    g.add_argument("--b-std", dest="b_std", type=float, default=spec.b_std, help="bias std")
    g.add_argument("--negative-slope", type=float, default=None, help="for leaky_relu")
    g.add_argument("--kind", default=default(GramOptions, "kind"), choices=KINDS)
    g.add_argument("--dtype", default=default(GramOptions, "dtype"), choices=DTYPES)


def _spec(a: argparse.Namespace) -> FullyConnected | Layer:
    if a.kernel_spec is not None:
        if a.kernel != "fc":
            raise ValueError(f"--kernel {a.kernel} and --kernel-spec both name a kernel; use one")
        from ntk_scale.io import load_kernel_spec

        return load_kernel_spec(a.kernel_spec)
    if a.kernel != "fc":
        return PRESETS[a.kernel]()
    return FullyConnected(a.depth, a.activation, a.W_std, a.b_std, a.negative_slope)


def _gram_options(a: argparse.Namespace) -> GramOptions:
    return GramOptions(a.kind, a.dtype, a.tile, getattr(a, "overwrite", False))


def _worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=None, help="actors (default: GPUs or CPUs)")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    g.add_argument("--no-progress", action="store_true", help="no progress output")


def _run_args(p: argparse.ArgumentParser) -> None:
    tile = default(GramOptions, "tile")
    p.add_argument("--tile", type=int, default=tile, help=f"tile side (default {tile})")
    _worker_args(p)


def _run(a: argparse.Namespace) -> RunOptions:
    return RunOptions(
        workers=a.workers, address=a.address, progress=False if a.no_progress else None
    )


def cmd_plan(a: argparse.Namespace) -> int:
    from ntk_scale.sizing import choose_operator, measure_read_rate, plan_gram

    measure = not a.no_measure
    store = a.store_dir if measure else None
    spec, d = _plan_spec(a)
    plan = plan_gram(
        a.n, d, spec, a.kind, a.dtype, a.tile, a.workers or 1, measure, store_url=store
    )
    rows = plan.rows()
    if measure:
        pick = choose_operator(plan, measure_read_rate(a.store_dir))
        rows.append(("solver operator", f"{pick.choice} ({pick.reason})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if a.json:
        print(json.dumps(dataclasses_asdict(plan)))
    return 0


def _plan_spec(a: argparse.Namespace) -> tuple[Any, int]:
    """(the spec bound to the planned inputs, d): --d for features, --sample-shape H,W,C for
    images (a network with Conv or pooling layers needs it)."""
    spec = _spec(a)
    if a.sample_shape is None:
        if a.d is None:
            raise ValueError("give --d (features) or --sample-shape H,W,C (images)")
        shape: tuple[int, ...] = (a.d,)
    else:
        try:
            shape = tuple(int(v) for v in a.sample_shape.split(","))
        except ValueError:
            raise ValueError(f"--sample-shape {a.sample_shape!r} must be integers, e.g. "
                             "32,32,3") from None  # fmt: skip
    bound = bind(spec, shape)
    return bound, int(np.prod(shape))


def cmd_gram(a: argparse.Namespace) -> int:
    from ntk_scale import stages
    from ntk_scale.io import load_array

    x = load_array(a.x)
    x_cols = load_array(a.x_cols) if a.x_cols else None
    report = stages.gram(x, _spec(a), a.store, _gram_options(a), _run(a), x_cols=x_cols)
    print(report.summary())
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from ntk_scale import stages

    found, repair = stages.verify(a.store, a.repair, _run(a))
    print(found.summary())
    if found.ok:
        return 0
    if repair is None:
        print("run again with --repair to recompute the missing and corrupted tiles")
        return 1
    print(f"repaired: {repair.summary()}")
    return 0 if stages.verify(a.store)[0].ok else 1


def _ridge_arg(text: str) -> float | tuple[float, ...]:
    """--ridge 1e-4 or --ridge 1e-6,1e-5,1e-4."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ridge or a comma-separated list "
            "of ridges, e.g. 1e-4 or 1e-6,1e-5,1e-4"
        ) from None
    return values if len(values) > 1 else values[0]


def _solve_options(a: argparse.Namespace) -> SolveOptions:
    return pick(SolveOptions, a)


def cmd_solve(a: argparse.Namespace) -> int:
    from ntk_scale import stages
    from ntk_scale.io import load_targets
    from ntk_scale.solve import check_targets
    from ntk_scale.store import GramStore

    y = load_targets(a.y)
    check_targets(y, GramStore.open(a.store).shape[0])  # before anything is written
    result = stages.solve(a.store, y, _solve_options(a), _run(a), model_dir=a.model_dir)
    stages.write_json(f"{a.model_dir}/solve_report.json", result.meta["solver"])
    s = result.meta["solver"]
    print(
        f"solved: {s['iterations']} PCG iterations, converged {all(s['converged'])}, "
        f"preconditioner {s['preconditioner']} (rank {s['rank']}), operator {s['operator']}; "
        f"model in {a.model_dir}"
    )
    if result.selection is not None:
        sel = result.selection
        for row in sel.table():
            mark = "  <- chosen" if row["chosen"] else ""
            print(
                f"ridge {row['ridge']:<10g} validation {sel.metric} "
                f"{row[f'mean_{sel.metric}']:.6g} ({row['iterations']} iterations){mark}"
            )
        print(f"chosen ridge {sel.ridge:g} ({sel.folds} fold(s) in {sel.seconds:.1f} s); "
              "the model is its refit on all rows")  # fmt: skip
    for plot in result.meta.get("plots", []):
        print(f"plot: {plot}")
    return 0 if all(s["converged"]) else 1


def cmd_predict(a: argparse.Namespace) -> int:
    from ntk_scale import stages
    from ntk_scale.io import load_array

    x = load_array(a.x)
    pred = stages.predict(a.model_dir, x, _run(a), store=a.store)
    stages.write_npy(a.out, pred)
    print(f"wrote {pred.shape} predictions to {a.out}")
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    from ntk_scale.config import load_config, run_config

    result = run_config(load_config(a.config))
    print(json.dumps({k: result[k] for k in ("gram", "timings", "test") if k in result}, indent=2))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from ntk_scale.demo import run_demo

    return run_demo(a.out, workers=a.workers, n=a.n, kernel=a.kernel)


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
    p.add_argument("--d", type=int, default=None, help="features d")
    p.add_argument("--sample-shape", default=None, metavar="H,W,C",
                   help="image shape for a conv kernel (not --d), e.g. 32,32,3")  # fmt: skip
    p.add_argument("--no-measure", action="store_true", help="skip timing a tile here")
    p.add_argument(
        "--store-dir", default=".", help="where the store would live (write and read rates)"
    )
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
    ridge = default(SolveOptions, "ridge")
    g.add_argument(
        "--ridge",
        type=_ridge_arg,
        default=ridge,
        metavar="R[,R...]",
        help=f"λ / mean(diag K) ({ridge:g}); several: chosen by --cv / --holdout",
    )
    g.add_argument(
        "--cv",
        type=int,
        default=default(SolveOptions, "cv"),
        help="choose among the ridges by k-fold validation on the store's rows",
    )
    g.add_argument("--holdout", type=float, default=default(SolveOptions, "holdout"),
                   help="... or on one held-out fraction of the rows (e.g. 0.1)")  # fmt: skip
    g.add_argument("--ridge-absolute", action="store_true", help="take --ridge as λ itself")
    g.add_argument(
        "--preconditioner", default=default(SolveOptions, "preconditioner"), choices=PRECONDITIONERS
    )
    g.add_argument("--rank", type=int, default=default(SolveOptions, "rank"), help="pivots")
    g.add_argument("--tol", type=float, default=default(SolveOptions, "tol"), help="‖r‖/‖y‖")
    g.add_argument("--max-iter", type=int, default=default(SolveOptions, "max_iter"))
    g.add_argument("--operator", default=default(SolveOptions, "operator"), choices=OPERATORS)
    every = default(SolveOptions, "checkpoint_every")
    g.add_argument("--checkpoint-every", type=int, default=every, help="iterations")
    _worker_args(p)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("predict", help="K(X*, X) @ A for a model directory")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--x", required=True, help="test features X*")
    p.add_argument("--out", required=True, help="predictions .npy")
    p.add_argument("--store", default=None, help="override the store recorded in the model")
    _worker_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("fit", help="all stages from one TOML config")
    p.add_argument("config", help="CONFIG.toml (see README: [data] [kernel] [store] …)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("verify", help="re-read every tile; report (and --repair) bad ones")
    p.add_argument("store", help="store path or URL")
    p.add_argument("--repair", action="store_true", help="recompute missing/corrupted tiles")
    _worker_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="the embedded default: local Ray, local store, bundled data")
    p.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="use only the first n training samples")
    p.add_argument("--kernel", default="fc", choices=("fc", "conv"),
                   help="fc on the 64 pixels, or conv on the 8x8x1 images")  # fmt: skip
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = build_parser().parse_args(argv)
    shown, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _dispatch(args.func, args)
    finally:
        warnings.formatwarning = shown


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI shows it: one line naming the problem and the fix, no source."""
    return f"ntk-scale: warning: {message}\n"


def _dispatch(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from ntk_scale.errors import StoreLockedError

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
