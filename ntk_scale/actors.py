"""Every actor role of ntk_scale, the one Ray actor class that hosts them, and the pool.

Roles are plain classes (no Ray inside, testable in-process), named by what they do:

    GramTileWorker   computes tiles of one Gram store and writes each (chunk, then marker)
    PanelWorker      holds (or streams) the row panels [a, b) of a stored Gram for K @ P
    ProductWorker    K(rows, X) @ P with every tile recomputed: the matrix-free operator's rows
                     of K(X, X) @ P, and predict's K(X*, X) @ A

A :class:`Host` is the one Ray actor class: a process pinned to its cores (or given one GPU) with
the JAX settings of a worker, into which a stage attaches the role it needs. The process-wide
:class:`Pool` starts hosts once and keeps them, so gram, solve and predict (and estimator
refits) run in the same actor processes; it places them within a timeout, reports what cannot
be placed, and replaces a host that died. :mod:`ntk_scale.tasks` drives work on them.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import socket
import threading
import time
import warnings
from typing import Any

import numpy as np

from ntk_scale.cluster import cluster_gpus, ensure_ray, joins_cluster, wait_for_gpus
from ntk_scale.errors import GPUUnavailableError, PlacementError
from ntk_scale.kernels.products import bucket, panel_matmul_function
from ntk_scale.panels import (
    add_products,
    block_rows,
    open_symmetric,
    panel_product,
    stream_tiles,
    tile_products,
    tiles_touching,
)
from ntk_scale.plan import BlockPlan, locate, split_blocks
from ntk_scale.store import GramStore

#: Tests only: "i.j" makes a GramTileWorker SIGKILL its own process when it starts tile (i, j),
#: as a tile that runs its worker out of memory would.
FAULT_KILL_TILE_ENV = "NTK_SCALE_FAULT_KILL_TILE"


# -- roles --------------------------------------------------------------------------------------
class GramTileWorker:
    """Computes tiles of one store and writes each (chunk, then marker) itself.

    It reads its input rows from the store's copy of X, so X travels to each worker once per
    block it needs, never through the driver. The tile function is compiled once, for the one
    padded tile shape, when the role is attached.
    """

    def __init__(self, store_url: str):
        self.store = GramStore.open(store_url, mode="r+")
        meta = self.store.meta
        spec, self.size = meta.spec, meta.tile
        self._fn = spec.tile_function(meta.kind, meta.dtype)
        self._sym = spec.tile_function(meta.kind, meta.dtype, symmetric=True)
        self._lock = threading.Lock()
        self._fault = os.environ.get(FAULT_KILL_TILE_ENV)
        self._warm_up(spec, meta)

    def _warm_up(self, spec: Any, meta: Any) -> None:
        """Compile now, not inside the first tile's timing. A kernel computed in chunks of
        pairs compiles per chunk: one chunk's worth of rows suffices (a tile can take hours)."""
        rows = spec.tile_chunk(meta.kind, meta.dtype, self.size, self.size)
        zeros = np.zeros((max(rows), meta.d), dtype=meta.dtype)
        np.asarray(self._fn(zeros[: rows[0]], zeros[: rows[1]]))
        if meta.symmetric:
            np.asarray(self._sym(zeros[: min(rows)], zeros[: min(rows)]))

    def _rows(self, side: str, b: int) -> np.ndarray:
        """Block b's inputs, padded to the tile when the kernel compiles one shape."""
        return self.store.meta.spec.pad_block(self.store.x_block(side, b), self.size)

    def compute(self, i: int, j: int) -> dict[str, Any]:
        """Compute, write and mark tile (i, j). Returns where and how long it took."""
        tile = self.store.plan.tile_at(i, j)
        with self._lock:
            if self._fault == f"{i}.{j}":
                os.kill(os.getpid(), signal.SIGKILL)
            t0, started = time.perf_counter(), time.time()
            x1 = self._rows("rows", i)
            if tile.diagonal and self.store.meta.symmetric:
                values = np.asarray(self._sym(x1, x1))
            else:
                values = np.asarray(self._fn(x1, self._rows("cols", j)))
            values = values[: tile.shape[0], : tile.shape[1]]
            t1 = time.perf_counter()
        info = {"node": node_id(), "host": socket.gethostname(), "pid": os.getpid()}
        info.update(compute_s=t1 - t0, start=started)
        self.store.write_tile(tile, values, info)
        info.update(write_s=time.perf_counter() - t1, end=time.time(), bytes=values.nbytes)
        info["entries"] = values.size
        return {"i": i, "j": j, **info}


class PanelWorker:
    """Holds (or streams) the row panels of row blocks [a, b) of a symmetric store.

    memory_budget_bytes: the panels are kept in memory, in the storage dtype, when their bytes
    (rows x N x itemsize) fit; otherwise each product streams the tiles, ``read_ahead`` ahead.
    With the symmetric layout both paths read each needed stored tile once: tile (i, j), i <= j,
    gives block (i, j) when i is owned and block (j, i) = tileᵀ when j is owned.
    """

    def __init__(
        self, store_url: str, a: int, b: int, memory_budget_bytes: int, read_ahead: int = 2
    ) -> None:
        self.store = open_symmetric(store_url)
        plan = self.store.plan
        self.a, self.b, self.read_ahead = int(a), int(b), int(read_ahead)
        self.r0, self.r1 = plan.row_range(self.a)[0], plan.row_range(self.b - 1)[1]
        self.tiles = tiles_touching(plan, self.a, self.b)
        self.panel_bytes = (self.r1 - self.r0) * plan.n_cols * self.store.dtype.itemsize
        self.bytes_read = 0
        self.panels: list[np.ndarray] | None = None
        if self.panel_bytes <= memory_budget_bytes:
            self.panels = self._load_panels()

    def _load_panels(self) -> list[np.ndarray]:
        """Row panel i (rows_i, N) for each owned block, each needed stored tile read once."""
        plan, dtype = self.store.plan, self.store.dtype
        panels = [
            np.empty((block_rows(plan, i), plan.n_cols), dtype=dtype) for i in range(self.a, self.b)
        ]
        for t, nbytes, values in stream_tiles(self.store, self.tiles, None, self.read_ahead):
            self.bytes_read += nbytes
            if self.a <= t.i < self.b:
                panels[t.i - self.a][:, t.cols] = values
            if t.i != t.j and self.a <= t.j < self.b:
                panels[t.j - self.a][:, t.rows] = values.T
        return panels

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K @ P. P: (N, C) float64 -> (r1 - r0, C) float64."""
        P = np.asarray(P, dtype=np.float64)
        if self.panels is not None:
            return np.vstack([panel_product(panel, P, self.store.plan) for panel in self.panels])
        out = np.zeros_like(P)

        def products(t, values):
            return tile_products(t, values, P, self.a, self.b)

        for t, nbytes, parts in stream_tiles(self.store, self.tiles, products, self.read_ahead):
            self.bytes_read += nbytes
            add_products(out, t, parts)
        return out[self.r0 : self.r1].copy()

    def stats(self) -> dict[str, Any]:
        """What this worker holds: its blocks, rows, panel bytes, mode and bytes read so far."""
        return {
            "blocks": (self.a, self.b),
            "rows": (self.r0, self.r1),
            "panel_bytes": self.panel_bytes,
            "in_memory": self.panels is not None,
            "bytes_read": self.bytes_read,
            "pid": os.getpid(),
        }


class ProductWorker:
    """K(rows, X) @ P with every tile recomputed, through the one fused path
    (:func:`ntk_scale.kernels.products.panel_matmul_function`).

    spec, kind, dtype: the kernel. X: (N, d) the column inputs. tile: rows per block.
    Square use (the matrix-free operator): row blocks [a, b) of X itself (default all), whose
    diagonal entries K(x, x) come from the exact formula. Rectangular use (predict): any rows
    x* (:meth:`product`), with a fixed right-hand block ``P`` (N, C) given here once.
    Memory: X and P padded (N x d in dtype, N x C float64), one tile and a (tile x C) result.
    """

    def __init__(
        self,
        spec: Any,
        X: np.ndarray,
        kind: str,
        dtype: str,
        tile: int,
        a: int = 0,
        b: int | None = None,
        P: np.ndarray | None = None,
    ) -> None:
        import jax

        X = np.asarray(X)
        self.plan = BlockPlan.square(X.shape[0], tile)
        self.a, self.b = int(a), int(self.plan.row_blocks if b is None else b)
        self.r0, self.r1 = self.plan.row_range(self.a)[0], self.plan.row_range(self.b - 1)[1]
        self.dtype = np.dtype(dtype)
        self.x_host = split_blocks(X, tile, self.dtype)
        with jax.enable_x64(True):
            self.xs = jax.device_put(self.x_host)
        self.panel = panel_matmul_function(spec, kind, dtype, X.shape[0])
        self.spec, self.kind = spec, kind
        self.diag = np.asarray(spec.diag(X[self.r0 : self.r1], kind, dtype), dtype=np.float64)
        self.fixed = None if P is None else self._device_block(np.asarray(P, dtype=np.float64))
        self.products, self.seconds = 0, 0.0
        self._lock = threading.Lock()

    def _device_block(self, P: np.ndarray) -> Any:
        """P (N, c) as (nb, tile, bucket(c)) float64 on the device."""
        import jax

        nb, t = self.xs.shape[0], self.plan.tile
        padded = np.zeros((nb * t, bucket(P.shape[1])))
        padded[: P.shape[0], : P.shape[1]] = P
        with jax.enable_x64(True):
            return jax.device_put(padded.reshape(nb, t, -1))

    def matmat(self, P: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K(X, X) @ P. P: (N, C) float64 -> (r1 - r0, C) float64."""
        import jax

        start, c = time.perf_counter(), P.shape[1]
        with self._lock, jax.enable_x64(True):
            ps = self._device_block(np.asarray(P, dtype=np.float64))
            parts = [self.panel(self.xs[i], i, self.xs, ps) for i in range(self.a, self.b)]
            out = np.concatenate([np.asarray(part) for part in parts])  # dispatched async
        self.products += 1
        self.seconds += time.perf_counter() - start
        return out[: self.r1 - self.r0, :c]

    def product(self, x_rows: np.ndarray, c: int) -> np.ndarray:
        """K(x_rows, X) @ P for the fixed P. x_rows: (r <= tile, d) -> (r, c) float64."""
        import jax

        if self.fixed is None:
            raise ValueError("this ProductWorker has no fixed P; pass P= when creating it")
        rows = x_rows.shape[0]
        x1 = self.spec.pad_block(np.asarray(x_rows, dtype=self.dtype), self.plan.tile)
        with self._lock, jax.enable_x64(True):
            out = np.asarray(self.panel(x1, -1, self.xs, self.fixed))
        self.products += 1
        return out[:rows, :c]

    def columns(self, idx: np.ndarray) -> np.ndarray:
        """Rows r0:r1 of K[:, idx]. idx: (m,) int -> (r1 - r0, m) float64.

        Entries K(x_k, x_k) come from the exact diagonal formula, as in a stored Gram.
        """
        tile_fn = self.spec.tile_function(self.kind, str(self.dtype))
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((self.r1 - self.r0, len(idx)), dtype=np.float64)
        t = self.plan.tile
        for j in range(0, len(idx), t):
            cols = idx[j : j + t]
            x2 = self.x_host[locate(cols, t)]
            x2 = self.spec.pad_block(x2, min(bucket(len(cols)), t))
            for i in range(self.a, self.b):
                r0, r1 = self.plan.row_range(i)
                x1 = self.spec.pad_block(self.x_host[i][: r1 - r0], t)
                tile = np.asarray(tile_fn(x1, x2))
                out[r0 - self.r0 : r1 - self.r0, j : j + len(cols)] = tile[: r1 - r0, : len(cols)]
        mine = np.flatnonzero((idx >= self.r0) & (idx < self.r1))
        out[idx[mine] - self.r0, mine] = self.diag[idx[mine] - self.r0]
        return out

    def stats(self) -> dict[str, Any]:
        """Blocks and rows owned, device, pid, products computed and their total seconds."""
        return {
            "blocks": (self.a, self.b),
            "rows": (self.r0, self.r1),
            "device": str(self.xs.devices().pop()),
            "pid": os.getpid(),
            "products": self.products,
            "product_seconds": self.seconds,
        }


# -- the host actor -----------------------------------------------------------------------------
#: Environment variables a host reports (tests check the GPU and memory settings).
REPORTED_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "JAX_PLATFORMS",
    "JAX_DEFAULT_MATMUL_PRECISION",
    "OMP_NUM_THREADS",
)


class Host:
    """One worker process: pinned to ``cores`` (CPU hosts) before JAX starts its thread pool,
    holding roles by key. Ray makes it an actor in one line (:class:`Pool`)."""

    def __init__(self, cores: list[int] | None = None):
        if cores:
            # XLA's CPU thread pool sizes itself from the schedulable cores (XLA_FLAGS thread
            # options did not bound it here): pin before the first computation creates it.
            os.sched_setaffinity(0, {c % os.cpu_count() for c in cores})
        self.roles: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        """pid, node, host name, cores, the reported environment and the roles held."""
        try:
            cores = sorted(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = []
        env = {k: os.environ.get(k) for k in REPORTED_ENV}
        return {"pid": os.getpid(), "node": node_id(), "host": socket.gethostname(),
                "cores": cores, "env": env, "roles": sorted(self.roles)}  # fmt: skip

    def attach(self, key: str, cls: type, args: tuple) -> dict[str, Any]:
        """Build role ``cls(*args)`` under ``key`` (replacing one there). Returns info()."""
        self.roles.pop(key, None)
        self.roles[key] = cls(*_resolved(args))
        return self.info()

    def call(self, key: str, method: str, *args: Any) -> Any:
        """``method(*args)`` of the role under ``key``."""
        try:
            role = self.roles[key]
        except KeyError:
            raise KeyError(f"no role {key!r} on pid {os.getpid()}; attach it first") from None
        return getattr(role, method)(*args)

    def detach(self, key: str) -> None:
        """Drop the role under ``key`` (its memory is freed)."""
        self.roles.pop(key, None)


def _resolved(args: tuple) -> tuple:
    """args with Ray object refs fetched (refs nested in a tuple are not resolved by Ray)."""
    import ray

    refs = [k for k, a in enumerate(args) if isinstance(a, ray.ObjectRef)]
    if not refs:
        return args
    values = ray.get([args[k] for k in refs])
    out = list(args)
    for k, v in zip(refs, values, strict=True):
        out[k] = v
    return tuple(out)


def node_id() -> str:
    """The Ray node this process runs on (its host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - outside Ray there is no node id
        pass
    return socket.gethostname()


# -- the pool -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Slot:
    """Host number ``index`` of the pool: its actor handle and its last info()."""

    index: int
    handle: Any
    info: dict[str, Any]
    info_ref: Any = None  # a replacement's pending info(), until it is known

    @property
    def pid(self) -> int:
        return int(self.info.get("pid", -1))


@dataclasses.dataclass(frozen=True)
class HostRequest:
    """What each host asks of the cluster: one GPU (of ``accelerator_type``'s model when given),
    or ``threads`` CPUs (pinned cores)."""

    use_gpu: bool
    threads: int
    accelerator_type: str | None = None

    @property
    def resources(self) -> dict[str, Any]:
        if not self.use_gpu:
            return {"num_cpus": self.threads}
        if self.accelerator_type is None:
            return {"num_gpus": 1}
        return {"num_gpus": 1, "accelerator_type": self.accelerator_type}

    @property
    def unit(self) -> tuple[str, int]:
        """(cluster resource name, amount of it per host)."""
        return ("GPU", 1) if self.use_gpu else ("CPU", self.threads)

    def describe(self) -> str:
        if self.use_gpu:
            return "1 GPU" if self.accelerator_type is None else f"1 {self.accelerator_type} GPU"
        return f"{self.threads} CPU{'s' * (self.threads > 1)}"


class Pool:
    """The process's worker hosts, started once and reused by every stage.

    request: what each host takes. placement_timeout_s: how long a new host may take to be
    placed and started. Hosts are killed at :meth:`shutdown` (registered at exit).
    """

    def __init__(self, ray: Any, request: HostRequest, placement_timeout_s: float):
        self.ray, self.request = ray, request
        self.placement_timeout_s = float(placement_timeout_s)
        self.slots: list[Slot] = []
        self.job = ray.get_runtime_context().get_job_id()
        env = worker_env(request.use_gpu, None if request.use_gpu else request.threads)
        self._remote = ray.remote(Host).options(
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=4,
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": env},
            **request.resources,
        )
        self.started = 0  # hosts started over the pool's life (replacements included)

    def take(self, workers: int | None, limit: int | None = None) -> list[Slot]:
        """``workers`` hosts (None: one per GPU, else per CPU slot), at most ``limit``; starts
        missing ones. Fewer than asked can be placed: warns and goes on with those; none:
        raises PlacementError naming the request and what the cluster has."""
        self.refresh()
        want = workers or self.default_workers()
        if limit is not None:
            want = max(1, min(want, limit))
        if want > len(self.slots):
            self._grow(want)
        if not self.slots:
            raise PlacementError(self._no_room(want, 0))
        return self.slots[:want]

    def default_workers(self) -> int:
        if self.request.use_gpu:
            return max(1, cluster_gpus(self.ray, self.request.accelerator_type))
        key, per = self.request.unit
        return max(1, int(self.ray.cluster_resources().get(key, 0) // per))

    def capacity(self) -> int:
        """Hosts the cluster could hold in all: this pool's plus what is free now."""
        free = self.ray.available_resources()
        key, per = self.request.unit
        return len(self.slots) + int(free.get(key, 0) // per + 1e-9)

    def _grow(self, want: int) -> None:
        room = self.capacity()
        if room <= len(self.slots) and self._fits_cluster():
            room = len(self.slots) + 1  # busy now, not too small: try one, for the timeout
        n_new = max(0, min(want, room) - len(self.slots))
        pending = [self._start(len(self.slots) + k) for k in range(n_new)]
        ready = self._await_ready(pending)
        self.slots.extend(ready)
        if len(self.slots) < want:
            msg = self._no_room(want, len(self.slots))
            if self.slots:
                warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _fits_cluster(self) -> bool:
        """Whether one more host fits the cluster's total resources (ignoring what is in use)."""
        key, per = self.request.unit
        return self.ray.cluster_resources().get(key, 0) >= per * (len(self.slots) + 1)

    def _start(self, index: int) -> tuple[int, Any, Any]:
        handle = self._remote.remote(self._cores(index))
        self.started += 1
        return index, handle, handle.info.remote()

    def _await_ready(self, pending: list[tuple[int, Any, Any]]) -> list[Slot]:
        """Slots whose info() came back within the placement timeout; the rest are killed."""
        if not pending:
            return []
        refs = [ref for _, _, ref in pending]
        done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=self.placement_timeout_s)
        ok = []
        for index, handle, ref in pending:
            info = self._info_or_none(ref) if ref in done else None
            if info is None:
                self.ray.kill(handle, no_restart=True)
            else:
                ok.append(Slot(index, handle, info))
        for k, slot in enumerate(sorted(ok, key=lambda s: s.index)):
            slot.index = len(self.slots) + k
        return ok

    def _info_or_none(self, ref: Any) -> dict[str, Any] | None:
        try:
            return self.ray.get(ref, timeout=30)
        except self.ray.exceptions.RayError:
            return None

    def replacement(self, slot: Slot) -> tuple[Slot, Any]:
        """Kill ``slot``'s host and start another in its place (same cores); returns the new slot
        (info pending) and the ref of its info(), to be waited on with the caller's other work."""
        self.ray.kill(slot.handle, no_restart=True)
        index, handle, ref = self._start(slot.index)
        new = Slot(index, handle, {}, ref)
        self.slots[slot.index] = new
        return new, ref

    def _cores(self, index: int) -> list[int] | None:
        """Cores of host ``index``: SPREAD places host k on node k mod M, as its (k // M)-th."""
        if self.request.use_gpu:
            return None
        nodes = sum(1 for n in self.ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        slot, t = index // max(1, nodes), self.request.threads
        return [slot * t + k for k in range(t)]

    def _no_room(self, want: int, got: int) -> str:
        total = self.ray.cluster_resources()
        free = self.ray.available_resources()
        key = self.request.unit[0]
        have = (
            f"the cluster has {total.get(key, 0):g} {key}s, {free.get(key, 0):g} free beyond "
            f"the {got} worker(s) this process holds"
        )
        if got:
            return (
                f"asked for {want} workers of {self.request.describe()} each; {have}: going on "
                f"with {got} (lower --workers / [run] workers to silence this, or add nodes)"
            )
        return (
            f"no worker could be placed in {self.placement_timeout_s:.0f} s: each asks for "
            f"{self.request.describe()}, and {have}; free resources (`ray status`), lower "
            "threads_per_worker, or join a bigger cluster (--address / RAY_ADDRESS)"
        )

    def refresh(self) -> None:
        """Fill in the info of replacements started but not yet heard from (dead ones leave)."""
        for slot in list(self.slots):
            if not slot.info and slot.info_ref is not None:
                slot.info = self._info_or_none(slot.info_ref) or {}
                slot.info_ref = None
            if not slot.info:
                self.ray.kill(slot.handle, no_restart=True)  # never started: give it back
        self.slots = [s for s in self.slots if s.info]
        for k, slot in enumerate(self.slots):
            slot.index = k

    def pids(self) -> list[int]:
        self.refresh()
        return [s.pid for s in self.slots]

    def shutdown(self) -> None:
        """Kill every host (idempotent; nothing to do once Ray is down)."""
        if not self.ray.is_initialized():
            self.slots = []
            return
        for slot in self.slots:
            try:
                self.ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - Ray may already be down at exit
                pass
        self.slots = []


_POOLS: dict[tuple, Pool] = {}
#: The host kind each (Ray job, accelerator, allow_cpu, threads) was given: the GPU wait (or a
#: CPU fallback) happens once per process and Ray session, not at every stage.
_DECIDED: dict[tuple, HostRequest] = {}


def get_pool(ray: Any, request: HostRequest, placement_timeout_s: float) -> Pool:
    """The process's pool for this kind of host, created on first use (one per Ray session)."""
    pool = _POOLS.get(request)
    if pool is not None and pool.job != ray.get_runtime_context().get_job_id():
        pool = None  # Ray was shut down and started again: the old hosts are gone
    if pool is None:
        pool = _POOLS[request] = Pool(ray, request, placement_timeout_s)
    pool.placement_timeout_s = float(placement_timeout_s)
    return pool


def pool_for(run: Any) -> Pool:
    """The process's persistent pool for these RunOptions (Ray started or joined first), its
    hosts as ``run.accelerator`` asks (:func:`host_request`). Gram, solve and predict all take
    their hosts here, so predict and the solvers' actors hold GPUs exactly as Gram's do."""
    ray = ensure_ray(run.address)
    key = (ray.get_runtime_context().get_job_id(), run.accelerator, run.allow_cpu,
           run.threads_per_worker, run.address)  # fmt: skip
    if key not in _DECIDED:
        _DECIDED[key] = host_request(ray, run, joins_cluster(run.address))
    return get_pool(ray, _DECIDED[key], run.placement_timeout_s)


def host_request(ray: Any, run: Any, on_cluster: bool) -> HostRequest:
    """What each host takes under ``run.accelerator`` (see RunOptions): CPU hosts pinned to
    threads_per_worker cores, or one GPU each. Required GPUs (a cluster's "auto", "gpu", a GPU
    model) are waited for up to ``run.gpu_wait_s`` on a cluster (a local Ray adds no nodes);
    then GPUUnavailableError, or with ``run.allow_cpu`` CPU hosts and a warning."""
    cpu = HostRequest(False, run.threads_per_worker or 1)
    if run.accelerator == "cpu":
        return cpu
    model = None if run.accelerator in ("auto", "gpu") else run.accelerator
    gpu = HostRequest(True, 1, model)
    if cluster_gpus(ray, model) > 0:
        return gpu
    if run.accelerator == "auto" and not on_cluster:
        return cpu  # the embedded default: a laptop, CI, the demo
    wait = run.gpu_wait_s if on_cluster else 0.0
    want = run.workers or 1
    if wait_for_gpus(ray, want, model, wait, poll_s=min(run.wait_seconds, 5.0)) > 0:
        return gpu
    message = _no_gpu_message(ray, run, gpu, want, wait, on_cluster)
    if not run.allow_cpu:
        raise GPUUnavailableError(message)
    warnings.warn(f"{message.split(';')[0]}; going on with CPU workers (allow_cpu)",
                  RuntimeWarning, stacklevel=3)  # fmt: skip
    return cpu


def _no_gpu_message(
    ray: Any, run: Any, gpu: HostRequest, want: int, wait: float, on_cluster: bool
) -> str:
    total = ray.cluster_resources()
    where = "the Ray cluster" if on_cluster else "this local Ray (it adds no nodes)"
    waited = f"within {wait:g} s (gpu_wait_s, --gpu-wait)" if wait > 0 else "and none can join"
    return (
        f"no {gpu.describe().removeprefix('1 ')} joined {where} {waited}: accelerator="
        f"{run.accelerator!r} asks for {want} worker(s) of {gpu.describe()} each, and the "
        f"cluster has {total.get('GPU', 0):g} GPUs, {total.get('CPU', 0):g} CPUs; check the GPU "
        "worker group (`ray status`: node types, max_workers, GPU quota and capacity in the "
        "zone) or wait longer (--gpu-wait), or pass --allow-cpu ([run] allow_cpu = true) to "
        "run on CPUs, or --accelerator cpu"
    )


def shutdown_pools() -> None:
    """Kill every pool's hosts (at exit, or to give the cores back)."""
    for pool in list(_POOLS.values()):
        pool.shutdown()
    _POOLS.clear()
    _DECIDED.clear()


atexit.register(shutdown_pools)


def worker_env(use_gpu: bool, threads: int | None) -> dict[str, str]:
    """Environment for hosts: CPU-only JAX where there is no GPU, bounded threads, no GPU
    memory preallocation (roles may share a GPU), and float32 tiles never in TF32."""
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    if not use_gpu:
        env["JAX_PLATFORMS"] = "cpu"
    if threads:
        env["XLA_FLAGS"] = (
            f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
        )
        env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(threads)
    # Tests inject faults through the driver's environment; a real run never sets this.
    if os.environ.get(FAULT_KILL_TILE_ENV):
        env[FAULT_KILL_TILE_ENV] = os.environ[FAULT_KILL_TILE_ENV]
    return env
