"""`ntk-scale`: parsing and messages only; the work is done by the library.

Exit codes: 0 success, 2 bad usage or input (the message names the value and the fix), 3 GPUs
asked for (on a cluster, by default) never joined within --gpu-wait, 1 failure (a numerical
SolverError too: it is not bad usage).

The option flags come from the option records' fields (:func:`ntk_scale.options.add_arguments`):
one argparse group per TOML section, each flag's dest the field's name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ntk_scale import cost, stages
from ntk_scale.cluster import joins_cluster
from ntk_scale.config import load_config, run_config, schema
from ntk_scale.cost import CloudAssumptions as C
from ntk_scale.demo import run_demo
from ntk_scale.errors import GPUUnavailableError, StoreLockedError
from ntk_scale.ingest import IngestOptions, ingest, table_features
from ntk_scale.io import load_array, load_kernel_spec, load_targets
from ntk_scale.kernels import FullyConnected, Layer, bind
from ntk_scale.kernels.stax import PRESETS
from ntk_scale.linalg import SolverError
from ntk_scale.measure import probe_location
from ntk_scale.model import load_model
from ntk_scale.options import (
    GramOptions,
    RunOptions,
    SolveOptions,
    add_arguments,
    default,
    pick,
    toml_help,
)
from ntk_scale.sizing import (
    LOCAL_RAY_START_S,
    LOCAL_RAY_STOP_S,
    choose_operator,
    cloud_workload,
    gemm_rate,
    measure_read_rate,
    plan_gram,
    plan_nystrom,
)
from ntk_scale.solve import check_targets
from ntk_scale.store import GramStore
from ntk_scale.tables import is_table, load_transform


def _kernel_args(p: argparse.ArgumentParser, gram_exclude: tuple[str, ...] = ()) -> None:
    """The kernel spec's flags, then GramOptions' (--kind; --dtype, --tile, --overwrite)."""
    g = p.add_argument_group("kernel")
    g.add_argument("--kernel", default="fc", choices=("fc", *PRESETS),
                   help="fc (FullyConnected: --depth ...) or a preset stax network")  # fmt: skip
    g.add_argument("--kernel-spec", default=None, metavar="SPEC.json",
                   help="a kernel written by spec.to_json() (instead of --kernel)")  # fmt: skip
    add_arguments(p, FullyConnected, groups={"FullyConnected": g})
    add_arguments(p, GramOptions, exclude=gram_exclude, groups={"kernel": g})


def _spec(a: argparse.Namespace) -> FullyConnected | Layer:
    if a.kernel_spec is not None:
        if a.kernel != "fc":
            raise ValueError(f"--kernel {a.kernel} and --kernel-spec both name a kernel; use one")

        return load_kernel_spec(a.kernel_spec)
    if a.kernel != "fc":
        return PRESETS[a.kernel]()
    return pick(FullyConnected, a)


def _gram_options(a: argparse.Namespace) -> GramOptions:
    return pick(GramOptions, a)


def _worker_args(p: argparse.ArgumentParser) -> None:
    """RunOptions' flags: --workers, --address, --no-progress, --accelerator, --allow-cpu,
    --gpu-wait, ... (GPUs where promised)."""
    add_arguments(p, RunOptions)


def _run(a: argparse.Namespace) -> RunOptions:
    return pick(RunOptions, a)


def cmd_plan(a: argparse.Namespace) -> int:
    measure, probe = not a.no_measure, int(a.probe_mb * 2**20) if a.probe_mb else None
    store = a.store_dir if measure else None
    deadline = None if a.deadline is None else cost.parse_duration(a.deadline)
    assume = pick(cost.CloudAssumptions, a)
    centers = SolveOptions(centers=a.centers).centers  # checked before anything is measured
    spec, d = _plan_spec(a)
    # dtype auto: the plan assumes the larger float64 (float32 is taken only where its error
    # bound is far below λ, which needs the data): --dtype float32 plans the smaller store.
    dtype = "float64" if a.dtype == "auto" else a.dtype
    local = not joins_cluster(getattr(a, "address", None))
    plan = plan_gram(a.n, d, spec, a.kind, dtype, a.tile, a.workers or 1, measure,
                     store_url=store, probe_bytes=probe,
                     ray_start_s=LOCAL_RAY_START_S if local else 0.0,
                     ray_stop_s=LOCAL_RAY_STOP_S if local else 0.0)  # fmt: skip
    rows, read = plan.rows(), None
    if a.dtype == "auto":
        rows.append(("dtype", "float64 assumed by dtype auto (--dtype float32 to plan float32)"))
    if measure:
        read = measure_read_rate(a.store_dir, **({"nbytes": probe} if probe else {}))
        pick_op = choose_operator(plan, read)
        where = probe_location(a.store_dir)
        at = where if where == a.store_dir else f"{where}, the nearest existing directory of " \
            f"{a.store_dir}"  # fmt: skip
        rows.append(("store read rate", f"{read / 1e6:.1f} MB/s (measured at {at})"))
        rows.append(("solver operator", f"{pick_op.choice} ({pick_op.reason})"))
    _print_rows(rows)
    rates = {}
    if measure:
        rates = {"entry_seconds": plan.entry_seconds, "read_bytes_per_s": read,
                 "gemm_flops_per_s": gemm_rate(centers, "float64")}  # fmt: skip
    nystrom = plan_nystrom(a.n, centers, d, spec, a.kind, dtype, a.tile, a.workers or 1,
                           **rates)  # fmt: skip
    print(f"\nNyström (M = {nystrom.m:,}; fit with --method nystrom --centers {nystrom.m})")
    _print_rows(nystrom.rows(), indent="  ")
    catalog = cost.load_catalog(a.catalog)
    work = cloud_workload(plan, spec, a.kind, d, a.store_dir, read, measure, catalog)
    work = dataclasses.replace(work, nystrom=cost.nystrom_work(nystrom))
    for line in cost.report_lines(work, catalog, assume, deadline):
        print(line)
    if a.json:
        print(json.dumps(dataclasses_asdict(plan)))
    return 0


def _print_rows(rows: list[tuple[str, str]], indent: str = "") -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{indent}{key:<{width}}  {value}")


def _cloud_args(p: argparse.ArgumentParser) -> None:
    """The cost table's assumptions (ntk_scale.cost.CloudAssumptions) and the deadline."""
    g = p.add_argument_group("cloud cost (figures and prices: ntk_scale/data/accelerators.toml)")
    g.add_argument("--deadline", default=None, metavar="T",
                   help="recommend the cheapest pool done within T: 24h, 2d, 90m")  # fmt: skip
    for flag, kind, help_ in [
        ("iterations", int, "PCG iterations"),
        ("gpus", int, "GPUs of the table's pool (whole nodes)"),
        ("gpu-efficiency", float, "fraction of peak FLOP/s a tile reaches"),
        ("network-efficiency", float, "fraction of a node's network rate reached to the bucket"),
        ("network-gbps", float, "a GPU node's bucket rate, Gbit/s (default: published)"),
        ("head-gbps", float, "the head's bucket rate, Gbit/s (default: measured or published)"),
        ("keep-months", float, "months the bucket keeps the store"),
        ("startup-minutes", float, "minutes from a GPU node's launch to joining Ray"),
        ("idle-minutes", float, "minutes the autoscaler keeps an idle GPU node"),
    ]:
        name = flag.replace("-", "_")
        value = default(C, name)
        g.add_argument(f"--{flag}", type=kind, default=value,
                       help=help_ if value is None else f"{help_} (default {value:g})")  # fmt: skip
    g.add_argument("--bucket-path", choices=cost.BUCKET_PATHS, default=default(C, "bucket_path"),
                   help="endpoint (S3 gateway endpoint / Private Google Access) or internet "
                   "(AWS caps it at 5 Gbit/s below 32 vCPUs)")  # fmt: skip
    g.add_argument("--catalog", default=None, metavar="TOML",
                   help="a copy of the accelerator data file with your prices")  # fmt: skip


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
    x = load_array(a.x)
    x_cols = load_array(a.x_cols) if a.x_cols else None
    report = stages.gram(x, _spec(a), a.store, _gram_options(a), _run(a), x_cols=x_cols)
    print(report.summary())
    if report.phases:
        print(f"  time: {report.phase_line()}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    found, repair = stages.verify(a.store, a.repair, _run(a))
    print(found.summary())
    if found.ok:
        return 0
    if repair is None:
        print("run again with --repair to recompute the missing and corrupted tiles")
        return 1
    print(f"repaired: {repair.summary()}")
    return 0 if stages.verify(a.store)[0].ok else 1


def _solve_options(a: argparse.Namespace) -> SolveOptions:
    return pick(SolveOptions, a)


def cmd_solve(a: argparse.Namespace) -> int:
    y = load_targets(a.y)
    check_targets(y, GramStore.open(a.store).shape[0])  # before anything is written
    transform = None
    if a.transform:
        transform = load_transform(a.transform)
    result = stages.solve(a.store, y, _solve_options(a), _run(a), model_dir=a.model_dir,
                          transform=transform)  # fmt: skip
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
    model = load_model(a.model_dir)
    with _inputs(a.x, stages.transform_of(model.meta)) as x:
        pred = stages.predict(model, x, _run(a), store=a.store,
                              out=None if a.out.endswith(".npy") else a.out,
                              overwrite=a.overwrite)  # fmt: skip
    if a.out.endswith(".npy"):
        stages.write_npy(a.out, pred)
    print(f"wrote {pred.shape} predictions to {a.out}")
    if a.std:
        out = std_path(a.out)
        with _inputs(a.x, stages.transform_of(model.meta)) as x:
            std = stages.predict_uncertainty(
                a.model_dir, x, _run(a), store=a.store, overwrite=a.overwrite,
                out=None if out.endswith(".npy") else out)  # fmt: skip
        if out.endswith(".npy"):
            stages.write_npy(out, np.asarray(std).reshape(-1, 1))
        which = load_model(a.model_dir).meta.get("posterior")
        print(f"wrote {tuple(std.shape)} posterior standard deviations ({which}) to {out}")
    return 0


def std_path(out: str) -> str:
    """Where ``predict --std`` writes the standard deviations: beside the means at ``out``,
    ``preds.zarr`` -> ``preds-std.zarr``, ``preds.npy`` -> ``preds-std.npy``."""
    for ext in (".npy", ".zarr"):
        if out.rstrip("/").endswith(ext):
            return out.rstrip("/")[: -len(ext)] + "-std" + ext
    return out.rstrip("/") + "-std"


@contextlib.contextmanager
def _inputs(source: str, transform: Any):
    """X* from an array file, or from a table (CSV / Parquet) through the model's transform:
    written as Zarr features in a temporary directory first (one pass over the table), then
    read block by block."""

    if transform is None or not is_table(source):
        yield load_array(source)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ntk-scale-predict-") as tmp:
        yield table_features(source, transform, f"{tmp}/x.zarr")


def cmd_ingest(a: argparse.Namespace) -> int:
    report = ingest(a.source, a.out, pick(IngestOptions, a), address=a.address,
                    progress=a.progress is not False)  # fmt: skip
    print(report.summary())
    return 0


#: [solver] keys `ntk-scale fit` also takes as flags (--method nystrom --centers M ...).
FIT_SOLVER_FLAGS = ("method", "centers", "center_selection", "knm", "warm_start")


def cmd_fit(a: argparse.Namespace) -> int:
    cfg = load_config(a.config)
    if a.allow_cpu:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, allow_cpu=True))
    given = {k: getattr(a, k) for k in FIT_SOLVER_FLAGS if getattr(a, k, None) is not None}
    if given:
        cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, **given))
    result = run_config(cfg)
    keys = ("method", "gram", "timings", "test")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    return run_demo(a.out, workers=a.workers, n=a.n, kernel=a.kernel)


def dataclasses_asdict(obj: object) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-scale",
        description="Kernel regression with infinite-width neural tangent kernels at scale.",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of ntk-scale, JAX, Ray, Zarr and the backend")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="size a Gram job: tiles, bytes, FLOPs, memory, time")
    p.add_argument("--n", type=int, required=True, help="training samples N")
    p.add_argument("--d", type=int, default=None, help="features d")
    p.add_argument("--sample-shape", default=None, metavar="H,W,C",
                   help="image shape for a conv kernel (not --d), e.g. 32,32,3")  # fmt: skip
    p.add_argument("--no-measure", action="store_true", help="skip timing a tile here")
    p.add_argument("--store", "--store-dir", dest="store_dir", default=".", metavar="URL",
                   help="where the store would live: a directory or s3://, gs:// (write and "
                   "read rates are measured there)")  # fmt: skip
    p.add_argument("--probe-mb", type=float, default=None,
                   help="MB written and read to time the store (default 256-1024)")  # fmt: skip
    _cloud_args(p)
    add_arguments(p, SolveOptions, only=("centers",))  # the Nyström block's M
    p.add_argument("--json", action="store_true", help="also print the plan as JSON")
    _kernel_args(p, gram_exclude=("overwrite",))
    _worker_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("gram", help="compute K(X, X) (or K(X, X_cols)) into a Zarr store")
    p.add_argument("--x", required=True, help="features: .npy, .npz[:key], .csv or Zarr")
    p.add_argument("--x-cols", default=None, help="second input for a rectangular K(X, X_cols)")
    p.add_argument("--store", required=True, help="store path or URL (s3://…, memory://…)")
    _kernel_args(p)
    _worker_args(p)
    p.set_defaults(func=cmd_gram)

    p = sub.add_parser("solve", help="solve (K + λI) A = Y on a stored Gram; write a model dir")
    p.add_argument("--store", required=True, help="Gram store path or URL")
    p.add_argument("--y", required=True, help="targets (N,) or (N, C): .npy, .npz[:key], .csv")
    p.add_argument("--model-dir", required=True, help="output: A (Zarr) + model.json + plots")
    p.add_argument("--transform", default=None, metavar="TRANSFORM.json",
                   help="the table transform of `ingest` (saved with the model: a standardised "
                   "target is solved in its standard units, predicted in its own)")  # fmt: skip
    add_arguments(p, SolveOptions)
    _worker_args(p)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("predict", help="K(X*, X) @ A for a model directory")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--x", required=True,
                   help="X*: an array file or Zarr, or (for a model with a table transform) "
                   "CSV / Parquet files, transformed as the training rows were")  # fmt: skip
    p.add_argument("--out", required=True,
                   help="predictions: .npy, or a Zarr path / URL (written block by block, "
                   "resumably: a rerun skips the blocks already written)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace other predictions at --out")
    p.add_argument("--store", default=None, help="override the store recorded in the model")
    p.add_argument("--std", action="store_true",
                   help="also the posterior's standard deviations (model.json's posterior), "
                   "written beside --out as <out>-std (Zarr: resumably)")  # fmt: skip
    _worker_args(p)
    p.set_defaults(func=cmd_predict)

    _ingest_parser(sub)

    p = sub.add_parser("fit", help="all stages from one TOML config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="CONFIG.toml sections and keys (defaults shown):\n\n"
                       + toml_help(schema()))  # fmt: skip
    p.add_argument("config", help="CONFIG.toml: the sections and keys below")
    add_arguments(p, RunOptions, only=("allow_cpu",))
    add_arguments(p, SolveOptions, only=FIT_SOLVER_FLAGS)
    # given flags override the config's [solver] keys; absent ones leave them as they are
    p.set_defaults(func=cmd_fit, **dict.fromkeys(FIT_SOLVER_FLAGS))

    p = sub.add_parser("verify", help="re-read every tile; report (and --repair) bad ones")
    p.add_argument("store", help="store path or URL")
    p.add_argument("--repair", action="store_true", help="recompute missing/corrupted tiles")
    _worker_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="the embedded default: local Ray, local store, bundled data")
    p.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    add_arguments(p, RunOptions, only=("workers",))
    p.add_argument("--n", type=int, default=None, help="use only the first n training samples")
    p.add_argument("--kernel", default="fc", choices=("fc", "conv"),
                   help="fc on the 64 pixels, or conv on the 8x8x1 images")  # fmt: skip
    p.set_defaults(func=cmd_demo)
    return parser


def _ingest_parser(sub: Any) -> None:
    p = sub.add_parser("ingest", help="CSV / Parquet tables -> Zarr X, y and their transform")
    p.add_argument("source", help="a CSV or Parquet file, a glob, or a directory (or s3://…)")
    p.add_argument("--out", required=True, help="output directory or URL prefix")
    add_arguments(p, IngestOptions)
    add_arguments(p, RunOptions, only=("address", "progress"))
    p.set_defaults(func=cmd_ingest)


def version_text() -> str:
    """ntk-scale's version, the versions it runs on, and JAX's backend and devices (as
    ``ray --version`` and ``jax.print_environment_info()`` users expect)."""
    import platform

    import jax
    import jaxlib
    import ray
    import zarr

    from ntk_scale import __version__

    devices = jax.devices()
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
    return "\n".join([
        f"ntk-scale {__version__}",
        f"jax {jax.__version__} (jaxlib {jaxlib.__version__}); backend "
        f"{jax.default_backend()}: {len(devices)} device(s), {', '.join(kinds)}",
        f"ray {ray.__version__}", f"zarr {zarr.__version__}", f"numpy {np.__version__}",
        f"python {platform.python_version()} ({sys.executable})",
    ])  # fmt: skip


class _VersionAction(argparse.Action):
    """--version, computed when asked (importing JAX and Ray is not free)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:  # fmt: skip
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_text())
        parser.exit()


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
    try:
        return func(args)
    except GPUUnavailableError as err:
        print(f"ntk-scale {args.command}: error: {err}", file=sys.stderr)
        return 3
    except SolverError as err:  # a numerical failure, not bad usage (before ValueError)
        print(f"ntk-scale {args.command}: failed: {err}", file=sys.stderr)
        return 1
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
