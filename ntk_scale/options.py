"""The frozen options of every stage: ONE definition per option.

Each field is declared with :func:`option`: its type (the annotation), its default, and in its
metadata the help, the TOML section and key, the CLI flag, the choices and whether it is an
estimator keyword. Everything else is derived from those fields:

- the CLI's argparse groups and flags (:func:`add_arguments`; a flag defaults to
  ``--field-name``, a trailing ``_s`` (seconds) dropped),
- the TOML schema and its type checks (:func:`toml_schema`, :func:`check_toml`,
  :func:`from_toml`),
- what model.json records of a record (:func:`to_json`),
- the estimators' explicit ``__init__`` (:func:`estimator_init`),
- the choices a record accepts (:func:`check_choices` in its ``__post_init__``).

So a new option is one field here (plus the code that uses it), and a new choice or default is
an edit of that field alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import keyword
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice
from ntk_scale.plan import DEFAULT_TILE

PRECONDITIONERS = ("rpcholesky", "nystrom", "jacobi", "none")
#: "auto" picks stored or matrixfree from a tile timed here and the store disk's read rate.
OPERATORS = ("stored", "distributed", "dense", "matrixfree", "auto")
#: SolveOptions.method: the exact N x N system, or Nyström's M x M one on M centres.
METHODS = ("exact", "nystrom", "auto")
CENTER_SELECTIONS = ("rpcholesky", "uniform")
#: Where Nyström's K(X, C) lives (see ntk_scale.nystrom and ntk_scale.sizing.choose_knm).
KNM_ROUTES = ("auto", "stored", "recompute", "normal")
WARM_STARTS = ("none", "nystrom")
#: predict's posterior (ntk_scale.posterior): auto is the kernel kind's own.
POSTERIOR_CHOICES = ("auto", "nngp", "ntk", "ntkgp")

# -- declaring an option --------------------------------------------------------------------------
_MISSING = dataclasses.MISSING
#: The metadata keys of :func:`option` (a flag or key left out is derived from the field's name).
META_KEYS = ("help", "section", "flag", "key", "parse", "choices", "metavar", "const", "keyword",
             "record")  # fmt: skip


def option(default: Any = _MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with its option metadata (the one definition of that option).

    default: the default (left out: required). help: one line for --help and the docs.
    section: the TOML section (and the CLI's argument group). flag: the CLI flag (default
    ``--name`` with ``_`` as ``-`` and a trailing ``_s`` dropped; None: no flag). key: the TOML
    key (default the name; None: not in TOML). parse: str -> value for the CLI (default from
    the annotation: int, float, str, or comma-separated names for a tuple of str). choices: the
    values allowed (checked by :func:`check_choices`, offered by argparse). metavar: the CLI's
    placeholder. const: what a bare flag stores (``--no-progress`` stores False; a bool field
    defaulting to False is a plain switch). keyword: an estimator keyword (default True).
    record: written to model.json by :func:`to_json` (default True).
    """
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise TypeError(f"option(): unknown metadata {unknown}; use {list(META_KEYS)}")
    if "choices" in meta:
        meta["choices"] = tuple(meta["choices"])
    return dataclasses.field(default=default, metadata={"help": help, **meta})


_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Option:
    """One option as every face sees it (built from a dataclass field by :func:`options`)."""

    record: type
    name: str  # the field, the argparse dest and the estimator keyword
    type: Any  # the resolved annotation
    default: Any  # dataclasses.MISSING: required
    help: str
    section: str | None
    key: str | None  # TOML key, None: not in TOML
    flag: str | None  # CLI flag, None: no flag
    parse: Callable[[str], Any] | None
    choices: tuple[Any, ...] | None
    metavar: str | None
    const: Any
    keyword: bool
    recorded: bool

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    @property
    def optional(self) -> bool:
        """None is a value (``int | None``)."""
        return type(None) in _members(self.type)

    @property
    def switch(self) -> bool:
        """A CLI flag without a value: stores ``const`` (or True for a bool defaulting to False)."""
        return self.const is not _UNSET or (
            _members(self.type) == (bool,) and self.default is False
        )


@functools.cache
def options(record: type, section: str | None = None) -> tuple[Option, ...]:
    """The options of a dataclass ``record``, in field order. ``section`` is the TOML section
    of fields whose metadata names none (a record without option metadata, e.g. a kernel spec)."""
    hints = _hints(record)
    out = []
    for f in dataclasses.fields(record):
        m = f.metadata
        flag = m.get("flag", "--" + re.sub(r"_s$", "", f.name).replace("_", "-"))
        out.append(Option(
            record=record, name=f.name, type=hints[f.name], default=f.default,
            help=m.get("help", ""), section=m.get("section", section),
            key=m.get("key", f.name), flag=flag, parse=m.get("parse"),
            choices=m.get("choices"), metavar=m.get("metavar"), const=m.get("const", _UNSET),
            keyword=m.get("keyword", True), recorded=m.get("record", True),
        ))  # fmt: skip
    return tuple(out)


def _hints(record: type) -> dict[str, Any]:
    """The fields' resolved annotations; one that does not resolve (a name imported only for
    type checkers) is Any: any TOML value, checked by the record itself."""
    try:
        return typing.get_type_hints(record)
    except (NameError, TypeError):
        space = vars(sys.modules[record.__module__])
        out = {}
        for f in dataclasses.fields(record):
            try:
                out[f.name] = eval(f.type, space) if isinstance(f.type, str) else f.type
            except Exception:  # noqa: BLE001 - unresolvable: the record validates the value
                out[f.name] = Any
        return out


def _members(tp: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None`` -> (int, NoneType)), else (tp,)."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return tuple(m for arg in typing.get_args(tp) for m in _members(arg))
    return (tp,)


def check_choices(obj: Any) -> None:
    """Raise a ValueError naming the choices for every field of ``obj`` outside its choices."""
    for opt in options(type(obj)):
        if opt.choices is not None:
            check_choice(opt.name, getattr(obj, opt.name), opt.choices)


def default(record: type, name: str) -> Any:
    """The default of field ``name`` of an options record."""
    for field in dataclasses.fields(record):
        if field.name == name:
            return field.default
    raise KeyError(f"{record.__name__} has no field {name!r}")


def pick(record: type, source: Any, **extra: Any) -> Any:
    """An options record from the same-named attributes of ``source`` (parsed CLI arguments, an
    estimator's parameters); fields ``source`` lacks keep their defaults; ``extra`` overrides."""
    names = [f.name for f in dataclasses.fields(record)]
    values = {n: getattr(source, n) for n in names if hasattr(source, n)}
    return record(**{**values, **extra})


#: ridge="auto": the first grid (relative ridges, one per decade) ...
AUTO_RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: ... which grows by AUTO_RIDGE_STEP decades past the edge the best ridge is at, while the best
#: stays at an edge, never past these bounds (relative to mean diag K) ...
AUTO_RIDGE_BOUNDS = (1e-12, 1e4)
AUTO_RIDGE_STEP = 3
#: ... chosen on this held-out fraction when neither cv nor holdout is given.
AUTO_RIDGE_HOLDOUT = 0.1


def parse_ridges(text: str) -> float | tuple[float, ...] | str:
    """A CLI ridge: ``1e-4``, several ``1e-6,1e-5,1e-4`` (a tuple), or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a ridge or a comma-separated list of ridges, e.g. "
                         "1e-4 or 1e-6,1e-5,1e-4") from None  # fmt: skip
    return values if len(values) > 1 else values[0]


# -- the records ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where and how actors run ([run] in a config; the CLI's run flags).

    accelerator: what each actor runs on. "auto": on a cluster joined by address (``address``
    or RAY_ADDRESS) one GPU per actor, required; on a local Ray, GPUs if it has them, else CPUs.
    "gpu": one GPU per actor, required. A GPU model ("A10G", "L4", "A100", "H100", any Ray
    ``accelerator_type``): one GPU of that model per actor, required. "cpu": CPU actors.
    Required GPUs are waited for up to gpu_wait_s (the autoscaler is asked for them meanwhile);
    then the run fails with GPUUnavailableError, unless allow_cpu: then it goes on with CPU
    actors and warns. Nothing falls back to CPUs silently. Fewer GPUs than ``workers`` after
    the wait fail the same way, unless allow_fewer_workers: then it goes on with those, warning.
    """

    workers: int | None = option(None, "actors (default: one per GPU of the cluster, else one "
                                 "per CPU slot)", section="run")  # fmt: skip
    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, else a local "
                                 "Ray on 127.0.0.1)", section="run")  # fmt: skip
    threads_per_worker: int | None = option(None, "cores each CPU actor is pinned to (default 1)",
                                            section="run")  # fmt: skip
    tasks_per_worker: int = option(2, "tiles queued on each actor (2 overlaps a tile's write "
                                   "with the next tile's compute)", section="run")  # fmt: skip
    max_retries: int = option(3, "times a task that raised is tried again", section="run")
    max_task_deaths: int = option(3, "actor deaths one task may cause before the run stops "
                                  "(a tile that runs its actor out of memory)",
                                  section="run")  # fmt: skip
    placement_timeout_s: float = option(120.0, "seconds an actor may take to be placed and "
                                        "started", section="run", metavar="S")  # fmt: skip
    wait_seconds: float = option(5.0, "the driver's polling interval, seconds", section="run",
                                 metavar="S")  # fmt: skip
    stall_seconds: float = option(900.0, "no finished task in this many seconds ends the run",
                                  section="run", metavar="S")  # fmt: skip
    call_timeout_s: float = option(3600.0, "seconds one call to an actor may take",
                                   section="run", metavar="S")  # fmt: skip
    progress: bool | None = option(None, "false (--no-progress): no progress output (default: "
                                   "where it helps, a live bar in a terminal or a line every "
                                   "few seconds in a log)", section="run", flag="--no-progress",
                                   const=False, record=False)  # fmt: skip
    accelerator: str = option("auto", "auto (GPUs required on a cluster; CPUs on a local Ray "
                              "without GPUs), gpu, cpu, or a GPU model: A10G, L4, A100, H100",
                              section="run", metavar="KIND")  # fmt: skip
    allow_cpu: bool = option(False, "go on with CPU workers if no GPU joins within --gpu-wait",
                             section="run")  # fmt: skip
    gpu_wait_s: float = option(600.0, "seconds to wait for GPU nodes to join", section="run",
                               metavar="S")  # fmt: skip
    allow_fewer_workers: bool = option(False, "go on with the GPUs that joined within "
                                       "--gpu-wait when fewer than --workers did (default: "
                                       "exit 3)", section="run")  # fmt: skip
    deadline_hours: float | None = option(None, "on a cluster, operator auto takes plan's "
                                          "cheapest route that finishes within this many hours "
                                          "(the RayJob's activeDeadlineSeconds / 3600; default: "
                                          "the cheapest)", section="run",
                                          metavar="H")  # fmt: skip

    def __post_init__(self) -> None:
        _check_accelerator(self.accelerator)
        h = self.deadline_hours
        if h is not None and (isinstance(h, bool) or not isinstance(h, (int, float))
                              or not 0 < h < math.inf):  # fmt: skip
            raise ValueError(f"deadline_hours={h!r} must be a number of hours > 0, e.g. 6, or "
                             "unset for the cheapest route")  # fmt: skip
        for name in ("allow_cpu", "allow_fewer_workers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if isinstance(self.gpu_wait_s, bool) or not (
            isinstance(self.gpu_wait_s, (int, float)) and self.gpu_wait_s >= 0
        ):
            raise ValueError(f"gpu_wait_s={self.gpu_wait_s!r} must be >= 0 seconds, e.g. 600")
        _positive_int_or_none("workers", self.workers, "e.g. workers=2, or None for one per CPU")
        _positive_int_or_none("threads_per_worker", self.threads_per_worker, "e.g. 1")
        for name in ("tasks_per_worker", "max_task_deaths"):
            _positive_int_or_none(name, getattr(self, name), "e.g. 2")
        for name in ("placement_timeout_s", "wait_seconds", "stall_seconds", "call_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0 seconds")

    @property
    def show_progress(self) -> bool:
        return self.progress is not False


#: RunOptions.accelerator keywords; anything else matching _ACCELERATOR_TYPE names a GPU model.
ACCELERATORS = ("auto", "gpu", "cpu")
_ACCELERATOR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_accelerator(value: Any) -> None:
    if isinstance(value, str) and (value in ACCELERATORS or _ACCELERATOR_TYPE.match(value)):
        return
    raise ValueError(
        f"accelerator={value!r} is not one of {ACCELERATORS} or a GPU model name "
        "(Ray's accelerator_type, e.g. A10G, L4, A100, H100)"
    )


@dataclasses.dataclass(frozen=True)
class GramOptions:
    """The stored Gram matrix ([kernel] kind, [store] dtype / tile / overwrite)."""

    kind: str = option("ntk", "ntk (the neural tangent kernel) or nngp (the network's Gaussian "
                       "process kernel)", section="kernel", choices=KINDS)  # fmt: skip
    dtype: str = option("auto", "dtype of the stored tiles: auto (float32 only where its error "
                        "bound is far below λ, else float64), float32 or float64",
                        section="store", choices=("auto", *DTYPES))  # fmt: skip
    tile: int = option(DEFAULT_TILE, "tile side: rows and columns per chunk (edge tiles are "
                       "padded)", section="store")  # fmt: skip
    overwrite: bool = option(False, "replace a store made for other inputs", section="store",
                             keyword=False, record=False)  # fmt: skip
    also_nngp: bool = option(False, "with kind ntk, also write the NNGP Gram of the same rows "
                             "in the same pass over the tiles, at <store>-nngp.zarr (posterior "
                             "'ntk' std and cov need it)", section="store")  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"tile={self.tile!r} must be a positive integer, e.g. 2048")


@dataclasses.dataclass(frozen=True)
class SolveOptions:
    """(K + λI) A = Y by preconditioned CG ([solver] in a config; the CLI's solver flags).

    ridge: a sequence of ridges solves them all in one PCG run (one product per iteration for
    all); cv / holdout then choose one on held-out rows of the same store, and the model is
    refitted at the chosen ridge. operator: stored (tiles streamed here) | distributed (row
    panels on the actors) | dense (all in memory here) | matrixfree (tiles recomputed every
    product, nothing stored) | auto (the cheaper of stored and matrixfree, timed here).
    """

    ridge: float | tuple[float, ...] | str = option(
        1e-4, "λ / mean(diag K) (Neural Tangents' diag_reg), or λ itself with ridge_absolute; "
        "several (R,R,...): chosen by cv / holdout; auto: a log grid 1e-6 … 1e-1 that grows "
        "past an edge the best ridge is at, within 1e-12 … 1e4 (a 10 % holdout unless cv or "
        "holdout is given)", section="solver", parse=parse_ridges,
        metavar="R[,R...]")  # fmt: skip
    ridge_absolute: bool = option(False, "take the ridge as λ itself", section="solver")
    cv: int | None = option(None, "choose among the ridges by k-fold validation on the store's "
                            "rows", section="solver", keyword=False)  # fmt: skip
    holdout: float | None = option(None, "... or on one held-out fraction of the rows (e.g. "
                                   "0.1)", section="solver", keyword=False)  # fmt: skip
    preconditioner: str = option("rpcholesky", "of rank pivots: rpcholesky, nystrom (uniform "
                                 "pivots), jacobi or none", section="solver",
                                 choices=PRECONDITIONERS)  # fmt: skip
    rank: int = option(500, "preconditioner pivots", section="solver")
    tol: float = option(1e-6, "‖r‖ / ‖y‖ per column to stop at", section="solver")
    max_iter: int | None = option(None, "PCG iterations at most (default 2N)", section="solver")
    operator: str = option("stored", "the product with K: stored, distributed, dense, "
                           "matrixfree or auto", section="solver", choices=OPERATORS)  # fmt: skip
    checkpoint_every: int = option(10, "iterations between saved PCG states (resume)",
                                   section="solver", keyword=False)  # fmt: skip
    seed: int = option(0, "seed of the pivots and the folds", section="solver")
    pivot_block: int = option(1, "RPCholesky pivots per round (>1: accelerated, fewer passes)",
                              section="solver")  # fmt: skip
    memory_budget_bytes: int = option(2 * 2**30, "bytes of row panels per distributed actor",
                                      section="solver", metavar="BYTES")  # fmt: skip
    method: str = option("exact", "exact (the N x N system), nystrom (M centres: "
                         "(K_nmᵀK_nm + λK_mm) α = K_nmᵀy, Falkon's preconditioner) or auto "
                         "(plan's choice: on a cluster the cheapest within the deadline, here "
                         "exact where its store fits the disk)",
                         section="solver", choices=METHODS)  # fmt: skip
    centers: int = option(10_000, "Nyström centres M (capped at N, with a warning)",
                          section="solver", metavar="M")  # fmt: skip
    center_selection: str = option("rpcholesky", "how the Nyström centres are drawn: "
                                   "rpcholesky or uniform", section="solver",
                                   choices=CENTER_SELECTIONS)  # fmt: skip
    knm: str = option("auto", "where Nyström's K(X, C) lives: stored (a rectangular store), "
                      "recompute (every iteration, on the actors), normal (KᵀK accumulated "
                      "once, M x M) or auto (the cheapest by ntk_scale.sizing.choose_knm)",
                      section="solver", choices=KNM_ROUTES)  # fmt: skip
    warm_start: str = option("none", "the exact solve's starting point: none, or nystrom "
                             "(x0 = (y - K_nm α)/λ from a Nyström fit of --centers)",
                             section="solver", choices=WARM_STARTS)  # fmt: skip
    posterior: str = option("auto", "the posterior of predict's std and cov (Neural Tangents' "
                            "gp_inference): nngp, ntk (an ensemble of trained networks; needs "
                            "the NNGP store too), ntkgp (the GP with the NTK), or auto (the "
                            "kind's own: nngp for nngp, ntk for ntk)", section="solver",
                            choices=POSTERIOR_CHOICES)  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.warm_start, bool):  # scikit-learn's checks set warm_start=False on
            # any estimator with that parameter (its convention: a bool); False is no warm start
            object.__setattr__(self, "warm_start", "nystrom" if self.warm_start else "none")
        check_choices(self)
        for name in ("rank", "checkpoint_every", "pivot_block"):
            _positive_int_or_none(name, getattr(self, name), "e.g. 10")
        _positive_int_or_none("max_iter", self.max_iter, "or None for the solver's default")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"tol={self.tol!r} must lie in (0, 1), e.g. 1e-6")
        object.__setattr__(self, "ridge", _ridges(self.ridge))
        if self.ridge == "auto":
            if self.ridge_absolute:
                raise ValueError("ridge='auto' grows a grid of ridges relative to mean(diag K); "
                                 "give ridge_absolute=False, or a list of absolute "
                                 "ridges")  # fmt: skip
            if self.cv is None and self.holdout is None:
                object.__setattr__(self, "holdout", AUTO_RIDGE_HOLDOUT)
        if self.cv is not None and (isinstance(self.cv, bool) or not isinstance(self.cv, int)
                                    or self.cv < 2):  # fmt: skip
            raise ValueError(f"cv={self.cv!r} must be an integer >= 2 (folds), or None")
        if self.holdout is not None and not (isinstance(self.holdout, (int, float))
                                             and 0 < self.holdout < 1):  # fmt: skip
            raise ValueError(f"holdout={self.holdout!r} must be a fraction in (0, 1), e.g. 0.1")
        if self.cv is not None and self.holdout is not None:
            raise ValueError("give cv= (k folds) or holdout= (one held-out fraction), not both")
        _positive_int_or_none("centers", self.centers, "Nyström centres M, e.g. 10000")
        if self.warm_start == "nystrom" and self.method != "exact":
            raise ValueError("warm_start='nystrom' starts the exact solver from a Nyström fit; "
                             "use it with method='exact', or warm_start='none'")  # fmt: skip

    @property
    def ridges(self) -> tuple[float, ...]:
        """The ridges as a tuple (one for a single ridge; AUTO_RIDGES, the first grid, for
        "auto")."""
        if self.ridge == "auto":
            return AUTO_RIDGES
        return self.ridge if isinstance(self.ridge, tuple) else (self.ridge,)

    @property
    def auto_ridge(self) -> bool:
        """Whether the grid of ridges grows past an edge (ridge="auto")."""
        return self.ridge == "auto"

    @property
    def selects(self) -> bool:
        """Whether the ridge is chosen on held-out rows (cv or holdout given)."""
        return self.cv is not None or self.holdout is not None

    def with_rank_at_most(self, n: int) -> SolveOptions:
        """The same options with rank capped at n (a preconditioner cannot pick more pivots)."""
        return dataclasses.replace(self, rank=min(self.rank, n))


def _ridges(value: Any) -> float | tuple[float, ...] | str:
    """A ridge (a float), several (a tuple of distinct floats), each finite and >= 0, or
    "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    many = isinstance(value, (list, tuple)) or (hasattr(value, "__len__")
                                                and not isinstance(value, str))  # fmt: skip
    values = list(value) if many else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ValueError(f"ridge={v!r} is not a number; give a float, e.g. 1e-4, a list, "
                             "or 'auto'")  # fmt: skip
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"ridge={v!r} must be a finite number >= 0, e.g. 1e-4")
        out.append(float(v))
    if many and not out:
        raise ValueError("ridge=[] holds no ridge; give at least one, e.g. [1e-6, 1e-4]")
    if len(set(out)) != len(out):
        raise ValueError(f"ridge={out} repeats a value; give each ridge once")
    return tuple(out) if many else out[0]


def _positive_int_or_none(name: str, value: Any, fix: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer ({fix})")


# -- the CLI ------------------------------------------------------------------------------------
def add_arguments(
    parser: argparse.ArgumentParser, record: type, *, only: Iterable[str] | None = None,
    exclude: Iterable[str] = (), groups: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Add a flag for every option of ``record`` that has one (``only`` / ``exclude`` by field
    name), in one argparse group per section; ``groups`` (section -> group) shares groups
    between records and calls. The dest of each flag is the field's name, so
    ``pick(record, args)`` builds the record back."""
    groups = {} if groups is None else groups
    keep, drop = None if only is None else set(only), set(exclude)
    for opt in options(record):
        if opt.flag is None or opt.name in drop or (keep is not None and opt.name not in keep):
            continue
        title = opt.section or record.__name__
        if title not in groups:
            groups[title] = parser.add_argument_group(title, f"[{title}] keys in a fit config")
        groups[title].add_argument(opt.flag, **argparse_kwargs(opt))


def argparse_kwargs(opt: Option) -> dict[str, Any]:
    """``add_argument`` keywords for an option: dest, type, default, choices, help."""
    kw: dict[str, Any] = {"dest": opt.name}
    if opt.switch:
        const = True if opt.const is _UNSET else opt.const
        kw.update(action="store_const", const=const, default=opt.default)
    else:
        kw["type"] = _cli_parser(opt)
        kw.update({"required": True} if opt.required else {"default": opt.default})
        kw["metavar"] = opt.metavar or opt.flag.lstrip("-").replace("-", "_").upper()
        if opt.choices is not None:
            kw.update(choices=opt.choices, metavar=opt.metavar)  # argparse lists the choices
    shown = not (opt.switch or opt.required or opt.default in (None, ()))
    kw["help"] = (opt.help + (f" (default {_show(opt.default)})" if shown else "")).replace(
        "%", "%%"
    )
    return kw


def _cli_parser(opt: Option) -> Callable[[str], Any]:
    """str -> value: the field's ``parse`` (its ValueError shown as argparse's message), else
    from the annotation (int, float, str, or a tuple of str as comma-separated names)."""
    if opt.parse is not None:
        return _as_argument_type(opt.parse)
    kinds = [m for m in _members(opt.type) if m is not type(None)]
    if len(kinds) == 1 and kinds[0] in (int, float, str):
        return kinds[0]
    if len(kinds) == 1 and typing.get_origin(kinds[0]) is tuple:
        return _as_argument_type(functools.partial(_names, flag=opt.flag))
    raise TypeError(f"{opt.record.__name__}.{opt.name}: type {opt.type} needs parse= in its "
                    "option() to be a CLI flag (or flag=None)")  # fmt: skip


def _as_argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    @functools.wraps(parse)
    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parsed


def _names(text: str, flag: str | None) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise ValueError(f"{flag} {text!r} names no column; give comma-separated column names")
    return names


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- TOML ---------------------------------------------------------------------------------------
Schema = dict[str, dict[str, Option]]


def toml_schema(*records: type | tuple[type, str]) -> Schema:
    """{section: {key: Option}} of the records' options that have a TOML key. A record given
    as (record, section) places its fields without a section there (a kernel spec's fields)."""
    schema: Schema = {}
    for item in records:
        record, section = item if isinstance(item, tuple) else (item, None)
        for opt in options(record, section):
            if opt.key is None:
                continue
            if opt.section is None:
                raise TypeError(f"{record.__name__}.{opt.name} has no TOML section; give "
                                "section= in its option() or key=None")  # fmt: skip
            keys = schema.setdefault(opt.section, {})
            if opt.key in keys:
                other = keys[opt.key]
                raise TypeError(f"[{opt.section}] {opt.key} is both {other.record.__name__}."
                                f"{other.name} and {record.__name__}.{opt.name}")  # fmt: skip
            keys[opt.key] = opt
    return schema


def check_toml(raw: dict[str, Any], schema: Schema, where: str) -> dict[str, dict[str, Any]]:
    """``raw`` (a parsed TOML document) checked against ``schema``: unknown sections and keys
    name the valid ones, a value of the wrong type names the expected type. Returns the values
    as the records take them (lists of a tuple field as tuples, "" of an optional one as None)."""
    out: dict[str, dict[str, Any]] = {}
    for section, body in raw.items():
        if section not in schema:
            raise ValueError(f"{where}: unknown section [{section}]; valid sections: "
                             f"{sorted(schema)}")  # fmt: skip
        if not isinstance(body, dict):
            raise ValueError(f"{where}: {section} must be a [section] table")
        for key, value in body.items():
            if key not in schema[section]:
                raise ValueError(f"{where}: unknown key {section}.{key}; valid keys: "
                                 f"{sorted(schema[section])}")  # fmt: skip
            out.setdefault(section, {})[key] = toml_value(schema[section][key], value, where)
    return out


def toml_value(opt: Option, value: Any, where: str) -> Any:
    """A TOML value for ``opt`` as the record takes it, or a ValueError naming the type."""
    if value == "" and opt.optional:
        return None  # TOML has no null: "" is the default None (address = "")
    kinds = _toml_kinds(opt.type)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        example = "" if opt.default in (None, _MISSING) else f" (e.g. {opt.key} = " \
            f"{_toml_literal(opt.default)})"  # fmt: skip
        raise ValueError(f"{where}: {opt.section}.{opt.key}={value!r} has the wrong type; "
                         f"expected {_kind_names(kinds)}{example}")  # fmt: skip
    if isinstance(value, list) and any(typing.get_origin(m) is tuple for m in _members(opt.type)):
        return tuple(value)
    return value


_TOML_KINDS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list", object: "a value"}  # fmt: skip


def _toml_kinds(tp: Any) -> tuple[type, ...]:
    kinds: list[type] = []
    for m in _members(tp):
        if m is Any:
            return (object,)
        if typing.get_origin(m) in (tuple, list) or m in (tuple, list):
            kinds.append(list)
        kinds.extend(_TOML_KINDS.get(m, ()))
    return tuple(dict.fromkeys(kinds))


def _kind_names(kinds: tuple[type, ...]) -> str:
    shown = [k for k in kinds if not (k is int and float in kinds)]
    return " or ".join(_KIND_NAMES[k] for k in shown)


def _toml_literal(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else json.dumps(value)


def toml_help(schema: Schema) -> str:
    """Every section and key of ``schema`` as commented TOML: the default (or the type) and
    the field's help (``ntk-scale fit --help`` shows it)."""
    lines: list[str] = []
    for section, keys in schema.items():
        lines += [""] * bool(lines) + [f"[{section}]"]
        for key, opt in keys.items():
            value = (f"<{_kind_names(_toml_kinds(opt.type))}>" if opt.default in (None, _MISSING)
                     else _toml_literal(opt.default))  # fmt: skip
            note = " (required)" if opt.required else ""
            lines.append(f"{key} = {value}" + (f"  # {opt.help}{note}" if opt.help else ""))
    return "\n".join(lines)


def from_toml(
    record: type, values: dict[str, dict[str, Any]], where: str, section: str | None = None,
    **extra: Any,
) -> Any:  # fmt: skip
    """``record`` from checked TOML ``values`` ({section: {key: value}}, :func:`check_toml`):
    each field from its own section and key, ``extra`` added; a ValueError from the record is
    prefixed with the file and the section that holds the bad value."""
    by_section: dict[str, dict[str, Any]] = {}
    for opt in options(record, section):
        body = values.get(opt.section, {})
        if opt.key is not None and opt.key in body:
            by_section.setdefault(opt.section, {})[opt.name] = body[opt.key]
    if len(by_section) > 1:  # errors name the section of the bad value
        for name, fields in by_section.items():
            _build(record, fields, f"{where}: [{name}]")
    merged = {k: v for fields in by_section.values() for k, v in fields.items()}
    names = list(by_section) or [section or options(record)[0].section]
    return _build(record, {**merged, **extra}, f"{where}: [{names[0]}]")


def _build(record: type, values: dict[str, Any], prefix: str) -> Any:
    try:
        return record(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{prefix} {err}") from None


# -- model.json ---------------------------------------------------------------------------------
def to_json(obj: Any) -> dict[str, Any]:
    """The recorded fields of an options record (all but record=False ones), JSON-ready."""
    return {o.name: _jsonable(getattr(obj, o.name)) for o in options(type(obj)) if o.recorded}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


# -- estimators ---------------------------------------------------------------------------------
def estimator_init(
    *records: type, before: dict[str, Any] | None = None, after: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None, exclude: Iterable[str] = (),
) -> Callable[..., None]:  # fmt: skip
    """An explicit ``__init__`` for a scikit-learn estimator: named parameters (no **kwargs),
    ``before`` {name: default}, then every keyword option of ``records`` (keyword=True, not in
    ``exclude``) with the record's default (or ``defaults``' override), then ``after``; it
    stores each argument unchanged under its own name (scikit-learn's get_params / clone
    contract). ``pick(record, self)`` then builds each record from the estimator.

        class NTKRegressor(RegressorMixin, BaseEstimator):
            __init__ = estimator_init(GramOptions, SolveOptions, RunOptions,
                                      before={"kernel": None}, after={"workdir": None},
                                      defaults={"progress": False})
    """
    params, hints, docs = dict(before or {}), {}, []
    found = [o for r in records for o in options(r) if o.keyword and o.name not in set(exclude)]
    for opt in found:
        if opt.name in params:
            raise TypeError(f"estimator_init: parameter {opt.name!r} is given twice")
        if opt.required:
            raise TypeError(f"estimator_init: {opt.record.__name__}.{opt.name} has no default")
        params[opt.name], hints[opt.name] = opt.default, opt.type
        docs.append(f"{opt.name}: {opt.help}")
    for name, value in (after or {}).items():
        if name in params:
            raise TypeError(f"estimator_init: parameter {name!r} is given twice")
        params[name] = value
    for name, value in (defaults or {}).items():
        if name not in params:
            raise TypeError(f"estimator_init: defaults names {name!r}, not a parameter")
        params[name] = value
    bad = [n for n in params if not n.isidentifier() or keyword.iskeyword(n) or n == "self"]
    if bad:
        raise TypeError(f"estimator_init: {bad} cannot be parameter names")
    args = ", ".join(f"{n}=_defaults[{n!r}]" for n in params)
    body = "".join(f"    self.{n} = {n}\n" for n in params) or "    pass\n"
    namespace: dict[str, Any] = {"_defaults": params}
    exec(compile(f"def __init__(self, {args}):\n{body}", "<estimator_init>", "exec"), namespace)
    init = namespace["__init__"]
    init.__annotations__ = {**hints, "return": None}
    init.__doc__ = "Store every parameter unchanged (scikit-learn's contract).\n\n" + "\n".join(
        docs
    )
    return init
