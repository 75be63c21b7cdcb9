"""`ntk-scale plan`: tiles, bytes, FLOPs, memory and a wall-time estimate for a Gram job: the
arithmetic, from measured (or given) rates; the measurements live in :mod:`ntk_scale.measure`.

A Gram job's tiles take the workers' compute, ``seconds_per_tile * ceil(tiles / workers)``, and
the store's disk taking the stored upper triangle, ``bytes_on_disk / write_bytes_per_s`` (every
worker writes to the same store). On a local disk the two add up: a worker's write blocks once
the page cache's dirty limit is reached, and the copies, checksums and the kernel's writeback
take the same cores as the compute (benchmarks/plan_vs_actual.py, N = 60,000 on 2 cores: 21.8 s
of compute and 19.0 s of writes took 33.4 s, where their maximum said 21.8 s). An object store's
puts go over the network, beside the compute: there the estimate is the larger of the two.
``seconds_per_tile`` is measured as a worker spends it (:func:`ntk_scale.measure.time_worker_tile`:
in a child process pinned to the worker's cores with the worker's thread settings, one tile
computed and its chunk encoded and written into the store), the disk's rate in the store itself
(:func:`ntk_scale.measure.measure_write_rate`).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from ntk_scale import cost
from ntk_scale.kernels import Kernel
from ntk_scale.linalg.falkon import BLOCK, default_pool

# The measurements `plan_gram(measure=True)` takes, re-exported for the CLI and the benchmarks.
from ntk_scale.measure import (  # noqa: F401
    cloud_workload,
    drop_page_cache,
    gpu_model,
    is_object_store,
    local_gpu_names,
    measure_read_rate,
    measure_write_rate,
    measured_gpu_flops,
    read_rate,
    time_worker_start,
    time_worker_tile,
)
from ntk_scale.plan import DEFAULT_TILE, BlockPlan
from ntk_scale.store.space import human_bytes

#: The disk's write rate is probed with the store's bytes up to this much: a small probe sees
#: the disk's cache, a store of several GB its sustained rate.
_MAX_WRITE_PROBE = 1 << 30

#: Seconds a local Ray takes to start (``ray.init`` on 127.0.0.1, its processes and its API
#: server): the median of ten starts by ntk_scale on the README's 2-core VM (2026-12-06, 5.6-7.3
#: s; `ntk-scale gram`'s "time:" line shows it per run; a bare ``ray.init`` took 4.7-6.7 s);
#: 0 where the run joins a running cluster.
LOCAL_RAY_START_S = 6.8
#: Seconds Ray adds to a new host beyond its Python imports, first compile and warm-up tiles
#: (the actor's creation in one of Ray's idle workers, the role's attach): fitted to the pool
#: start measured by benchmarks/plan_vs_actual.py's two cases (2026-12-06: 1.1 s and 2.3 s).
HOST_START_S = 1.5
#: Seconds a local Ray takes to stop when the command exits (hosts killed, ``ray.shutdown``):
#: 2.3 s measured from `ntk-scale gram`'s summary to its exit on the same VM; 0 on a cluster.
LOCAL_RAY_STOP_S = 2.3


@dataclasses.dataclass(frozen=True)
class GramPlan:
    """Size and time of K(X, X) for X (n, d), stored as the upper triangle of (tile, tile) tiles.

    Times are in seconds, rates in bytes/s, sizes in bytes. ``compute_seconds`` is
    ``seconds_per_tile * ceil(tiles / workers)`` (the last round waits for its slowest tile);
    ``write_seconds`` is ``bytes_on_disk / write_bytes_per_s``; ``estimated_seconds`` is their
    sum for a local store (``serial_writes``) or else the larger of the two (``bound`` names
    the larger), or the compute time alone when no write rate is known (``bound`` None), or
    None unmeasured.
    """

    n: int
    d: int
    tile: int
    workers: int
    dtype: str
    tiles: int
    entries: int
    bytes_on_disk: int
    flops: float
    worker_memory_bytes: int
    seconds_per_tile: float | None
    compute_seconds: float | None
    write_bytes_per_s: float | None
    write_seconds: float | None
    bound: str | None  # "compute", "write", or None (write rate or compute time unknown)
    estimated_seconds: float | None
    #: The part of seconds_per_tile spent encoding and writing the tile's chunk (None: unknown).
    tile_write_seconds: float | None = None
    #: One off-diagonal tile's compute alone (what the matrix-free operator recomputes).
    tile_compute_seconds: float | None = None
    #: A stax network's tile is computed this many (rows, cols) pairs at a time (None: FC).
    chunk_pairs: tuple[int, int] | None = None
    #: What a user waits for before the first tile, in order (label, seconds): the CLI's own
    #: imports, Ray's start, and the hosts' start beside the store's creation (() unmeasured).
    startup: tuple[tuple[str, float], ...] = ()
    #: Whether the workers' writes and compute add up (a local disk) rather than overlap.
    serial_writes: bool = False
    #: Seconds after the last tile until the command exits: a local Ray's stop (0: a cluster).
    stop_seconds: float = 0.0

    @property
    def startup_seconds(self) -> float:
        return float(sum(s for _, s in self.startup))

    @property
    def wall_seconds(self) -> float | None:
        """estimated_seconds plus the start-up and the stop: the command's wall time (None
        unmeasured)."""
        est = self.estimated_seconds
        return None if est is None else est + self.startup_seconds + self.stop_seconds

    @property
    def entry_seconds(self) -> float | None:
        """Seconds per kernel entry of one off-diagonal tile's compute, one worker (None: not
        measured): what a Nyström plan prices K(X, C) at."""
        per_tile = self.tile_compute_seconds or self.seconds_per_tile
        return None if per_tile is None else per_tile / self.tile**2

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for `ntk-scale plan`."""
        per = "-" if self.seconds_per_tile is None else f"{self.seconds_per_tile:.3f} s"
        if self.seconds_per_tile is not None and self.tile_write_seconds is not None:
            per += f" (of which writing its chunk {self.tile_write_seconds:.3f} s)"
        rate = "not measured" if self.write_bytes_per_s is None else _rate(self.write_bytes_per_s)
        return [
            ("samples N / features d", f"{self.n:,} / {self.d:,}"),
            ("tile / tiles (upper triangle)", f"{self.tile:,} / {self.tiles:,}"),
            ("entries computed", f"{self.entries:.3e}"),
            ("bytes on disk", _bytes(self.bytes_on_disk)),
            ("FLOPs", f"{self.flops:.3e}"),
            ("memory per worker", _bytes(self.worker_memory_bytes)),
            *self._chunk_rows(),
            ("time per stored tile, one worker (mean)", per),
            (f"compute estimate ({self.workers} workers)", _maybe(self.compute_seconds)),
            ("store write rate", rate),
            ("write time (bytes on disk / write rate)", _maybe(self.write_seconds)),
            *self._startup_rows(),
            (f"estimated wall time ({self.workers} workers)", self._wall_text()),
        ]

    def _startup_rows(self) -> list[tuple[str, str]]:
        if not self.startup:
            return []
        parts = ", ".join(f"{label} {_duration(v)}" for label, v in self.startup)
        return [("start-up (before the first tile)", f"{_duration(self.startup_seconds)} "
                                                     f"({parts})")]  # fmt: skip

    def _wall_text(self) -> str:
        if not self.startup or self.wall_seconds is None:
            return self._estimate_text()
        stop = f" + Ray's stop {_duration(self.stop_seconds)}" if self.stop_seconds else ""
        return (f"{_duration(self.wall_seconds)}: start-up {_duration(self.startup_seconds)} + "
                f"tiles {self._estimate_text()}{stop}")

    def _chunk_rows(self) -> list[tuple[str, str]]:
        if self.chunk_pairs is None:
            return []
        c1, c2 = self.chunk_pairs
        return [("pairs per chunk (kernel memory budget)", f"{c1} x {c2}")]

    def _estimate_text(self) -> str:
        if self.estimated_seconds is None:
            if self.write_seconds is None:
                return "not measured"
            return f"not measured (writes alone take {_duration(self.write_seconds)})"
        est = _duration(self.estimated_seconds)
        if self.serial_writes and self.bound is not None:
            disk = f"{_bytes(self.bytes_on_disk)} at {_rate(self.write_bytes_per_s)}"
            return (f"{est} (compute {_duration(self.compute_seconds)} + writes "
                    f"{_duration(self.write_seconds)} of {disk}, on the same cores: bound by "
                    f"{self.bound}s)")  # fmt: skip
        if self.bound == "write":
            disk = f"{_bytes(self.bytes_on_disk)} at {_rate(self.write_bytes_per_s)}"
            return f"{est} (bound by writes: {disk})"
        if self.bound == "compute":
            return f"{est} (bound by compute; writes take {_duration(self.write_seconds)})"
        return f"{est} (compute only; store write rate not measured)"


def plan_gram(
    n: int,
    d: int,
    spec: Kernel,
    kind: str = "ntk",
    dtype: str = "float32",
    tile: int = DEFAULT_TILE,
    workers: int = 1,
    measure: bool = True,
    store_url: str | None = None,
    write_bytes_per_s: float | None = None,
    seconds_per_tile: float | None = None,
    threads: int = 1,
    probe_bytes: int | None = None,
    ray_start_s: float = LOCAL_RAY_START_S,
    ray_stop_s: float = LOCAL_RAY_STOP_S,
) -> GramPlan:
    """Size a K(X, X) job for X (n, d). With ``measure``, one (tile, tile) tile is timed on this
    machine as a worker pinned to ``threads`` cores spends it (synthetic data; with
    ``store_url`` its chunk is also written there) unless ``seconds_per_tile`` is given, and the
    disk's write rate (bytes/s) is measured under ``store_url`` unless ``write_bytes_per_s`` is
    given (with a probe of the store's size, at most ``_MAX_WRITE_PROBE`` bytes, or of
    ``probe_bytes``). The measured worker's start gives the start-up (:func:`startup_estimate`;
    ray_start_s and ray_stop_s: 0 for a run that joins a cluster). A local ``store_url`` makes
    the writes add to the compute (the module's docstring)."""
    _check_sizes(n, d, workers, seconds_per_tile, write_bytes_per_s)
    plan = BlockPlan.square(n, min(tile, n))
    t, item, entries = plan.tile, np.dtype(dtype).itemsize, plan.entries()
    tile_write = compute = None
    flops_entry, memory, chunk = spec.cost(d, kind, dtype, t)  # the kernel sizes its tile
    timed: dict = {}
    if measure and seconds_per_tile is None:
        timed = time_worker_start(spec, kind, dtype, t, d, threads, store_url)
        compute, diagonal, tile_write = timed["compute"], timed["diagonal"], timed["write"]
        b = plan.row_blocks  # b of the tiles are diagonal (their own, exactly symmetric path)
        mean = (b * diagonal + (plan.n_tiles - b) * compute) / plan.n_tiles
        seconds_per_tile = mean + (tile_write or 0.0)
    if measure and write_bytes_per_s is None and store_url is not None:
        probe = probe_bytes or max(256 << 20, min(entries * item, _MAX_WRITE_PROBE))
        write_bytes_per_s = measure_write_rate(store_url, nbytes=probe)
    startup = startup_estimate(timed, n * d * item, write_bytes_per_s, ray_start_s)
    serial = store_url is not None and not is_object_store(store_url)
    return GramPlan(
        n=n,
        d=d,
        tile=t,
        workers=workers,
        dtype=dtype,
        tiles=plan.n_tiles,
        entries=entries,
        bytes_on_disk=entries * item,
        flops=float(entries) * flops_entry,
        worker_memory_bytes=memory,
        chunk_pairs=chunk,
        **_timing(plan.n_tiles, entries * item, workers, seconds_per_tile, write_bytes_per_s,
                  serial),
        tile_write_seconds=tile_write,
        tile_compute_seconds=compute,
        startup=startup,
        serial_writes=serial,
        stop_seconds=float(ray_stop_s) if startup else 0.0,
    )


def startup_estimate(
    timed: dict, x_bytes: int, write_rate: float | None, ray_start_s: float = LOCAL_RAY_START_S
) -> tuple[tuple[str, float], ...]:
    """A Gram command's start-up from a worker's measured start (:func:`time_worker_start`:
    "imports", "compile", and the tiles "compute" and "diagonal"; {} unmeasured: ()): the CLI's
    imports, Ray's start, then the hosts' start (HOST_START_S + imports + compile + one tile of
    each kind, which the role runs once to compile them) beside the store's creation (X written
    at the write rate), whichever is longer (stages.gram boots the hosts while it builds the
    store)."""
    if not timed or timed.get("imports") is None:
        return ()
    imports, compile_s = float(timed["imports"]), float(timed.get("compile") or 0.0)
    warm_up = float(timed.get("compute") or 0.0) + float(timed.get("diagonal") or 0.0)
    hosts = HOST_START_S + imports + compile_s + warm_up
    store = 0.0 if not write_rate else x_bytes / write_rate
    return (("imports", imports), ("Ray start", float(ray_start_s)),
            ("hosts' start beside the store", max(hosts, store)))  # fmt: skip


def _timing(
    tiles: int, nbytes: int, workers: int, per_tile: float | None, write_rate: float | None,
    serial: bool = False,
) -> dict[str, float | str | None]:
    """GramPlan's time fields (seconds; write rate in bytes/s); serial: writes add to the
    compute (a local disk) instead of overlapping it."""
    compute = None if per_tile is None else per_tile * math.ceil(tiles / workers)
    write = None if write_rate is None else nbytes / write_rate
    bound, est = _bound(compute, write)
    if serial and bound is not None:
        est = compute + write
    return {
        "seconds_per_tile": per_tile,
        "compute_seconds": compute,
        "write_bytes_per_s": write_rate,
        "write_seconds": write,
        "bound": bound,
        "estimated_seconds": est,
    }


def _check_sizes(
    n: int, d: int, workers: int, per_tile: float | None, write_rate: float | None
) -> None:
    if n < 1 or d < 1 or workers < 1:
        raise ValueError(f"n={n}, d={d}, workers={workers} must all be >= 1")
    if per_tile is not None and not per_tile >= 0:
        raise ValueError(f"seconds_per_tile={per_tile} must be >= 0")
    if write_rate is not None and not write_rate > 0:
        raise ValueError(f"write_bytes_per_s={write_rate} must be > 0")


def _bound(compute: float | None, write: float | None) -> tuple[str | None, float | None]:
    """(bound, estimated seconds): the slower of compute and writes when both are known."""
    if compute is None:
        return None, None
    if write is None:
        return None, compute
    return ("write", write) if write > compute else ("compute", compute)


#: Sizes as every message of the project prints them (one definition, in store.space).
_bytes = human_bytes


def _rate(bytes_per_s: float) -> str:
    return f"{_bytes(bytes_per_s)}/s"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _maybe(s: float | None) -> str:
    return "not measured" if s is None else _duration(s)


# --- stored vs matrix-free ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OperatorChoice:
    """Stored vs matrix-free for the products K·P of a solve, from measured costs (seconds)."""

    choice: str  # "stored" or "matrixfree"
    stored_seconds: float  # one product: read every stored byte once
    matrixfree_seconds: float  # one product: recompute every block (both triangles)
    read_bytes_per_s: float
    reason: str


def choose_operator(plan: GramPlan, read_bytes_per_s: float) -> OperatorChoice:
    """The cheaper operator per product: reading the stored upper triangle once
    (``bytes_on_disk / read_bytes_per_s``), or recomputing all B² blocks, B = ceil(n / tile), at
    ``plan.seconds_per_tile`` each on ``plan.workers`` workers."""
    if plan.seconds_per_tile is None:
        raise ValueError("choose_operator needs a measured plan (plan_gram(..., measure=True))")
    blocks = math.ceil(plan.n / plan.tile)
    stored = plan.bytes_on_disk / read_bytes_per_s
    per_tile = plan.tile_compute_seconds  # every block recomputed, nothing written
    if per_tile is None:
        per_tile = plan.seconds_per_tile
    recompute = blocks * blocks * per_tile / plan.workers
    choice = "matrixfree" if recompute < stored else "stored"
    reason = (
        f"a product reads {_bytes(plan.bytes_on_disk)} at {_rate(read_bytes_per_s)} = "
        f"{_duration(stored)}, or recomputes {blocks * blocks:,} tiles at "
        f"{per_tile:.3f} s on {plan.workers} workers = {_duration(recompute)}: "
        f"{'recomputing' if choice == 'matrixfree' else 'reading'} is cheaper"
    )
    return OperatorChoice(choice, stored, recompute, read_bytes_per_s, reason)


def cluster_operator(
    spec: Kernel, n: int, d: int, kind: str, dtype: str, tile: int, gpus: int,
    accelerator: str | None, deadline_hours: float | None = None,
    catalog: cost.Catalog | None = None, centers: int | None = None,
) -> tuple[str, str] | None:  # fmt: skip
    """(operator, reason) that `plan` chooses for K(X, X) of X (n, d) on a cluster of ``gpus``
    GPUs of ``accelerator``: :func:`ntk_scale.cost.cluster_route` on an unmeasured plan (the
    driver of a cluster job runs on the CPU head, where a tile's time says nothing of the GPUs).
    With ``centers`` (method="auto") a Nyström fit of that many centres is priced too, and
    chosen as operator "nystrom". None when the catalog has no node type of that GPU model
    (the caller measures instead)."""
    catalog = catalog or cost.load_catalog()
    node = cost.node_for(catalog, accelerator)
    if node is None:
        return None
    work = cost.workload(plan_gram(n, d, spec, kind, dtype, tile, gpus, measure=False))
    if centers is not None and centers < n:
        ny = plan_nystrom(n, centers, d, spec, kind, dtype, tile, gpus)
        work = dataclasses.replace(work, nystrom=cost.nystrom_work(ny))
    assume = cost.CloudAssumptions(gpus=gpus)
    chosen, reason = cost.cluster_route(work, catalog, node, gpus, assume, deadline_hours)
    return chosen.operator, reason


# --- Nyström: where K(X, C) lives ------------------------------------------------------------
#: PCG iterations a Nyström solve is priced at when max_iter is not given: Falkon's
#: preconditioner brings (K_nmᵀK_nm + λK_mm) to a condition number near 1, so a few tens of
#: iterations reach tol = 1e-6 (Rudi et al. 2017 report 10-30).
NYSTROM_ITERATIONS = 30
KNM_ROUTES = ("stored", "recompute", "normal")
#: The probe block of :func:`gemm_rate` is this many columns wide (up to m).
GRAM_PANEL = 2048


def normal_gram_flops(n: int, m: int) -> float:
    """FLOPs of H = K_nmᵀK_nm for K_nm (n, m) on its upper triangle by BLAS syrk
    (ntk_scale.linalg.falkon.add_gram): n·m·(m + 1), half a GEMM's 2·n·m²."""
    return float(n) * m * (m + 1)


@dataclasses.dataclass(frozen=True)
class KnmChoice:
    """Where K(X, C) (N, M) lives for a Nyström solve, from estimated seconds per route.

    choice: "stored" | "recompute" | "normal"; seconds: route -> estimated seconds of the whole
    solve (inf where it does not fit); reason: the arithmetic, for model.json and messages."""

    choice: str
    seconds: dict[str, float]
    reason: str


def choose_knm(
    n: int, m: int, *, entry_seconds: float, workers: int, gemm_flops_per_s: float,
    read_bytes_per_s: float, iterations: int = NYSTROM_ITERATIONS, itemsize: int = 4,
    systems: int = 1, columns: int = 1, memory_bytes: float = math.inf,
    disk_bytes: float = math.inf,
) -> KnmChoice:  # fmt: skip
    """The cheapest home of K(X, C) for N rows and M centres (pure arithmetic, all seconds):

    - one pass: N·M kernel entries at ``entry_seconds`` each on ``workers`` workers;
    - recompute: that pass on every one of ``iterations`` iterations;
    - stored: one pass, N·M·itemsize bytes written once and read back every iteration at
      ``read_bytes_per_s`` (excluded where they exceed ``disk_bytes``);
    - normal: one pass that also accumulates H = K_nmᵀK_nm, one per distinct row mask
      (``systems``: the folds, or 1), on its upper triangle (:func:`normal_gram_flops`:
      N·M·(M + 1) flops, syrk's) each at ``gemm_flops_per_s`` per
      worker, then 2·M²·columns flops an iteration; excluded where its (systems + 1)·M²
      float64 matrices exceed ``memory_bytes``.
    """
    if min(n, m, workers, iterations, systems, columns) < 1:
        raise ValueError(f"choose_knm needs positive sizes, got n={n}, m={m}, workers={workers}, "
                         f"iterations={iterations}, systems={systems}")  # fmt: skip
    one_pass = n * m * entry_seconds / workers
    stored_bytes = float(n) * m * itemsize
    normal_bytes = (systems + 1) * 8.0 * m * m
    seconds = {
        "recompute": iterations * one_pass,
        "stored": (math.inf if stored_bytes > disk_bytes else
                   one_pass + (1 + iterations) * stored_bytes / read_bytes_per_s),
        "normal": (math.inf if normal_bytes > memory_bytes else
                   one_pass + systems * normal_gram_flops(n, m) / (gemm_flops_per_s * workers)
                   + iterations * 2.0 * m * m * columns / gemm_flops_per_s),
    }  # fmt: skip
    choice = min(KNM_ROUTES, key=lambda r: seconds[r])
    shown = ", ".join(f"{r} {_duration(s) if math.isfinite(s) else 'does not fit'}"
                      for r, s in seconds.items())  # fmt: skip
    reason = (f"K(X, C) of {n:,} x {m:,}: one pass {_duration(one_pass)} on {workers} workers, "
              f"{iterations} iterations: {shown}; {choice} is cheapest")  # fmt: skip
    return KnmChoice(choice, seconds, reason)


# --- Nyström: the whole method, priced -------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NystromPlan:
    """Size and time of a Nyström fit (``method="nystrom"``) on X (n, d) with m centres.

    Entries: centre selection (RPCholesky's kernel on its pool: pool x m), K(C, C) (a symmetric
    store: the upper triangle of (tile, tile) tiles) and K(X, C) (n x m a pass; every iteration
    on the recompute route). FLOPs: those entries x flops_per_entry, H = K_nmᵀK_nm on the
    normal route (:func:`normal_gram_flops`) and the iterations' products (normal: H·P, 2·m²;
    stored, recompute: K_nm P and K_nmᵀ(·), 4·n·m). Bytes: the K(C, C) store, and K(X, C)
    (n·m·itemsize) on the stored route. Memory: the driver holds K_mm and Falkon's T and A
    (m x m float64 each) and H on the normal route; a worker its rows of X (n / workers x d),
    one (BLOCK, m) block of K(X, C) with its float64 copy, and its H on the normal route.

    route: the K(X, C) route of :func:`choose_knm` when rates are known (``chosen`` True),
    else the first of normal, stored, recompute that fits (``chosen`` False). Times in
    seconds: ``route_seconds`` the K(X, C) part per route (None: not measured),
    ``estimated_seconds`` the whole fit: selection in the driver at one worker's rate, K(C, C)
    and the route's seconds on ``workers`` workers.
    """

    n: int
    d: int
    m: int
    asked: int
    workers: int
    dtype: str
    pool: int
    selection_entries: int
    kmm_entries: int
    knm_entries: int
    flops_per_entry: float
    normal_flops: float
    iterations: int
    route: str
    chosen: bool
    entries: int
    flops: float
    kmm_bytes: int
    knm_bytes: int
    driver_memory_bytes: int
    worker_memory_bytes: int
    route_seconds: dict[str, float] | None = None
    reason: str | None = None
    estimated_seconds: float | None = None

    @property
    def bytes_on_disk(self) -> int:
        return self.kmm_bytes + self.knm_bytes

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for `ntk-scale plan`'s Nyström block."""
        capped = f" (capped at N; {self.asked:,} asked)" if self.m < self.asked else ""
        disk = f"K(C, C) {_bytes(self.kmm_bytes)}"
        if self.knm_bytes:
            disk += f" + K(X, C) {_bytes(self.knm_bytes)} = {_bytes(self.bytes_on_disk)}"
        held = "K_mm, Falkon's T and A" + (", H" if self.route == "normal" else "")
        return [
            ("centres M", f"{self.m:,}{capped}; RPCholesky's pool {self.pool:,} rows"),
            ("entries computed", f"{self.entries:.3e} (selection {self.selection_entries:.3e}, "
             f"K(C, C) {self.kmm_entries:.3e}, K(X, C) {self.knm_entries:.3e} a pass)"),
            ("FLOPs", f"{self.flops:.3e}"),
            ("bytes on disk", disk),
            ("driver memory", f"{_bytes(self.driver_memory_bytes)} ({held}: M x M float64)"),
            ("memory per worker", _bytes(self.worker_memory_bytes)),
            ("K(X, C) route", self._route_text()),
            (f"estimated wall time ({self.workers} workers)", _maybe(self.estimated_seconds)),
        ]  # fmt: skip

    def _route_text(self) -> str:
        if not self.chosen:
            return (f"{self.route} (assumed: rates not measured; auto times a block, a GEMM "
                    "and the disk)")  # fmt: skip
        return f"{self.route} ({self.reason})"


def plan_nystrom(
    n: int, m: int, d: int, spec: Kernel, kind: str = "ntk", dtype: str = "float32",
    tile: int = DEFAULT_TILE, workers: int = 1, *, entry_seconds: float | None = None,
    gemm_flops_per_s: float | None = None, read_bytes_per_s: float | None = None,
    iterations: int = NYSTROM_ITERATIONS, memory_bytes: float = math.inf,
    disk_bytes: float = math.inf,
) -> NystromPlan:  # fmt: skip
    """Size (pure arithmetic) a Nyström fit on X (n, d) with m centres (capped at n): see
    :class:`NystromPlan`. With ``entry_seconds`` (one kernel entry on one worker, e.g. a
    measured tile's :attr:`GramPlan.entry_seconds`), ``gemm_flops_per_s`` (one worker) and
    ``read_bytes_per_s`` (the disk), the route is :func:`choose_knm`'s and the plan is timed."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"centers={m!r} must be a positive integer, e.g. 10000")
    _check_sizes(n, d, workers, None, read_bytes_per_s)
    for name, value in (("entry_seconds", entry_seconds), ("gemm_flops_per_s", gemm_flops_per_s)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0 (a measured rate), or None")
    mc, item = min(m, n), np.dtype(dtype).itemsize
    flops_entry = spec.cost(d, kind, dtype, min(tile, mc))[0]
    sizes = _nystrom_sizes(n, mc, d, item, tile, workers)
    rates = (entry_seconds, gemm_flops_per_s, read_bytes_per_s)
    pick_ = None
    if None not in rates:
        pick_ = choose_knm(n, mc, entry_seconds=entry_seconds, workers=workers,
                           gemm_flops_per_s=gemm_flops_per_s,
                           read_bytes_per_s=read_bytes_per_s, iterations=iterations,
                           itemsize=item, memory_bytes=memory_bytes,
                           disk_bytes=disk_bytes)  # fmt: skip
    route = pick_.choice if pick_ else _fitting_route(sizes, memory_bytes, disk_bytes)
    work = _nystrom_work(n, mc, sizes, route, iterations, flops_entry)
    total = None
    if pick_ is not None:
        front = entry_seconds * (sizes["selection"] + sizes["kmm"] / workers)
        total = front + pick_.seconds[route]
    return NystromPlan(
        n=n, d=d, m=mc, asked=m, workers=workers, dtype=dtype, pool=sizes["pool"],
        selection_entries=sizes["selection"], kmm_entries=sizes["kmm"], knm_entries=n * mc,
        flops_per_entry=flops_entry, normal_flops=normal_gram_flops(n, mc),
        iterations=iterations, route=route, chosen=pick_ is not None, **work,
        kmm_bytes=sizes["kmm"] * item, knm_bytes=sizes["knm_bytes"] if route == "stored" else 0,
        driver_memory_bytes=sizes["driver"] + (sizes["h"] if route == "normal" else 0),
        worker_memory_bytes=sizes["worker"] + (sizes["h"] if route == "normal" else 0),
        route_seconds=None if pick_ is None else dict(pick_.seconds),
        reason=None if pick_ is None else pick_.reason, estimated_seconds=total,
    )  # fmt: skip


def _nystrom_sizes(n: int, m: int, d: int, item: int, tile: int, workers: int) -> dict[str, int]:
    """Entries and bytes of a Nyström fit that do not depend on the K(X, C) route."""
    rows = math.ceil(n / workers)
    return {
        "pool": (pool := default_pool(n, m)),
        "selection": pool * m,
        "kmm": BlockPlan.square(m, min(tile, m)).entries(),
        "knm_bytes": n * m * item,
        "h": 8 * m * m,
        "driver": 3 * 8 * m * m,  # K_mm, T, A
        "worker": rows * d * item + min(BLOCK, rows) * m * (item + 8),
    }


def _fitting_route(sizes: dict[str, int], memory_bytes: float, disk_bytes: float) -> str:
    """Without rates: the normal route where H fits (choose_knm's (1 + 1)·8·M²), else stored
    where K(X, C) fits the disk, else recompute."""
    if 2 * sizes["h"] <= memory_bytes:
        return "normal"
    return "stored" if sizes["knm_bytes"] <= disk_bytes else "recompute"


def _nystrom_work(n: int, m: int, sizes: dict[str, int], route: str, iterations: int,
                  flops_entry: float) -> dict[str, float]:  # fmt: skip
    """The route's kernel entries and FLOPs (NystromPlan's entries and flops)."""
    passes = iterations if route == "recompute" else 1
    entries = sizes["selection"] + sizes["kmm"] + passes * n * m
    products = 2.0 * m * m if route == "normal" else 4.0 * n * m
    flops = entries * flops_entry + iterations * products
    if route == "normal":
        flops += normal_gram_flops(n, m)
    return {"entries": entries, "flops": flops}


def gemm_rate(m: int, dtype: str = "float64", rows: int = BLOCK) -> float:
    """FLOP/s of H += K_bᵀK_b (add_gram's syrk, counted as :func:`normal_gram_flops`) for a
    (rows, min(m, GRAM_PANEL)) block, timed here (a probe, beside :mod:`ntk_scale.measure`'s).
    ``dtype`` is the block's; the products are float64 (add_gram)."""
    from ntk_scale.linalg.falkon import add_gram

    cols = min(m, GRAM_PANEL)
    k = np.random.default_rng(0).standard_normal((rows, cols)).astype(dtype)
    H = np.zeros((cols, cols))
    add_gram(H, k)  # warm the BLAS threads
    t0 = time.perf_counter()
    add_gram(H, k)
    return normal_gram_flops(rows, cols) / max(time.perf_counter() - t0, 1e-9)
