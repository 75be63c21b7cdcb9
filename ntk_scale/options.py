"""The frozen options of every stage: the ONE definition of each default.

The CLI's argparse defaults, the TOML config's defaults and the estimator's keyword defaults are
all read from these records (:func:`default`), so a default changes in one place only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice
from ntk_scale.plan import DEFAULT_TILE

PRECONDITIONERS = ("rpcholesky", "nystrom", "jacobi", "none")
#: "auto" picks stored or matrixfree from a tile timed here and the store disk's read rate.
OPERATORS = ("stored", "distributed", "dense", "matrixfree", "auto")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where and how actors run.

    workers: actors (None: one per GPU of the cluster, else one per CPU slot). address: the Ray
    cluster (None: RAY_ADDRESS, else a local Ray on 127.0.0.1). threads_per_worker: cores each
    CPU actor is pinned to (None: 1). tasks_per_worker: tiles queued on each actor (2 overlaps a
    tile's write with the next tile's compute). max_retries: times a task that raised is tried
    again. max_task_deaths: actor deaths one task may cause before the run stops (a tile that
    runs its actor out of memory). placement_timeout_s: how long an actor may take to be placed
    and started. wait_seconds: the driver's polling interval. stall_seconds: no finished task in
    this long ends the run. progress: None shows progress where it helps (always, as a live bar
    in a terminal or a line every few seconds in a log); False shows none.

    accelerator: what each actor runs on. "auto": on a cluster joined by address (``address``
    or RAY_ADDRESS) one GPU per actor, required; on a local Ray, GPUs if it has them, else CPUs.
    "gpu": one GPU per actor, required. A GPU model ("A10G", "L4", "A100", "H100", any Ray
    ``accelerator_type``): one GPU of that model per actor, required. "cpu": CPU actors.
    Required GPUs are waited for up to gpu_wait_s (the autoscaler is asked for them meanwhile);
    then the run fails with GPUUnavailableError, unless allow_cpu: then it goes on with CPU
    actors and warns. Nothing falls back to CPUs silently.
    """

    workers: int | None = None
    address: str | None = None
    threads_per_worker: int | None = None
    tasks_per_worker: int = 2
    max_retries: int = 3
    max_task_deaths: int = 3
    placement_timeout_s: float = 120.0
    wait_seconds: float = 5.0
    stall_seconds: float = 900.0
    call_timeout_s: float = 3600.0
    progress: bool | None = None
    accelerator: str = "auto"
    allow_cpu: bool = False
    gpu_wait_s: float = 600.0

    def __post_init__(self) -> None:
        _check_accelerator(self.accelerator)
        if not isinstance(self.allow_cpu, bool):
            raise ValueError(f"allow_cpu={self.allow_cpu!r} must be true or false")
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
    """The stored Gram matrix: kind ("ntk" / "nngp"), dtype of the tiles ("float32" / "float64"),
    tile side (rows and columns per chunk; edge tiles are padded), overwrite a store made for
    other inputs."""

    kind: str = "ntk"
    dtype: str = "float32"
    tile: int = DEFAULT_TILE
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("dtype", self.dtype, DTYPES)
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"tile={self.tile!r} must be a positive integer, e.g. 2048")


@dataclasses.dataclass(frozen=True)
class SolveOptions:
    """(K + λI) A = Y by preconditioned CG.

    ridge: λ / mean(diag K) (Neural Tangents' diag_reg), or λ itself with ridge_absolute; a
    sequence of ridges solves them all in one PCG run (one product per iteration for all).
    cv: folds to choose among several ridges on held-out rows of the same store (or holdout:
    the fraction of rows held out once); the model is then refitted at the chosen ridge.
    preconditioner: rpcholesky | nystrom | jacobi | none, of ``rank`` pivots (pivot_block > 1:
    accelerated RPCholesky). tol: ||r|| / ||y|| per column. operator: stored (tiles streamed
    here) | distributed (row panels on the actors) | dense (all in memory here) | matrixfree
    (tiles recomputed every product, nothing stored) | auto. checkpoint_every: iterations
    between saved PCG states (resume). memory_budget_bytes: per distributed actor.
    """

    ridge: float | tuple[float, ...] = 1e-4
    ridge_absolute: bool = False
    cv: int | None = None
    holdout: float | None = None
    preconditioner: str = "rpcholesky"
    rank: int = 500
    tol: float = 1e-6
    max_iter: int | None = None
    operator: str = "stored"
    checkpoint_every: int = 10
    seed: int = 0
    pivot_block: int = 1
    memory_budget_bytes: int = 2 * 2**30

    def __post_init__(self) -> None:
        check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        check_choice("operator", self.operator, OPERATORS)
        for name in ("rank", "checkpoint_every", "pivot_block"):
            _positive_int_or_none(name, getattr(self, name), "e.g. 10")
        _positive_int_or_none("max_iter", self.max_iter, "or None for the solver's default")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"tol={self.tol!r} must lie in (0, 1), e.g. 1e-6")
        object.__setattr__(self, "ridge", _ridges(self.ridge))
        if self.cv is not None and (isinstance(self.cv, bool) or not isinstance(self.cv, int)
                                    or self.cv < 2):  # fmt: skip
            raise ValueError(f"cv={self.cv!r} must be an integer >= 2 (folds), or None")
        if self.holdout is not None and not (isinstance(self.holdout, (int, float))
                                             and 0 < self.holdout < 1):  # fmt: skip
            raise ValueError(f"holdout={self.holdout!r} must be a fraction in (0, 1), e.g. 0.1")
        if self.cv is not None and self.holdout is not None:
            raise ValueError("give cv= (k folds) or holdout= (one held-out fraction), not both")

    @property
    def ridges(self) -> tuple[float, ...]:
        """The ridges as a tuple (one for a single ridge)."""
        return self.ridge if isinstance(self.ridge, tuple) else (self.ridge,)

    @property
    def selects(self) -> bool:
        """Whether the ridge is chosen on held-out rows (cv or holdout given)."""
        return self.cv is not None or self.holdout is not None

    def with_rank_at_most(self, n: int) -> SolveOptions:
        """The same options with rank capped at n (a preconditioner cannot pick more pivots)."""
        return dataclasses.replace(self, rank=min(self.rank, n))


def _ridges(value: Any) -> float | tuple[float, ...]:
    """A ridge (a float) or several (a tuple of distinct floats), each finite and >= 0."""
    many = isinstance(value, (list, tuple)) or (hasattr(value, "__len__")
                                                and not isinstance(value, str))  # fmt: skip
    values = list(value) if many else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ValueError(f"ridge={v!r} is not a number; give a float, e.g. 1e-4, or a list")
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"ridge={v!r} must be a finite number >= 0, e.g. 1e-4")
        out.append(float(v))
    if many and not out:
        raise ValueError("ridge=[] holds no ridge; give at least one, e.g. [1e-6, 1e-4]")
    if len(set(out)) != len(out):
        raise ValueError(f"ridge={out} repeats a value; give each ridge once")
    return tuple(out) if many else out[0]


def default(record: type, name: str) -> Any:
    """The default of field ``name`` of an options record (for argparse, TOML, estimators)."""
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


def from_mapping(record: type, values: dict[str, Any], where: str) -> Any:
    """An options record from a mapping (a config section); unknown keys name the valid ones."""
    names = {f.name for f in dataclasses.fields(record)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(names)}")
    return record(**values)


def _positive_int_or_none(name: str, value: Any, fix: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer ({fix})")
