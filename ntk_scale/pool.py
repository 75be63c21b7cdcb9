"""The one Ray actor class that hosts the roles of :mod:`ntk_scale.roles`, and the pool.

A :class:`Host` is a process pinned to its cores (or given one GPU) with the JAX settings of a
worker, into which a stage attaches the role it needs. The process-wide :class:`Pool` starts
hosts once and keeps them, so gram, solve and predict (and estimator refits) run in the same
actor processes; it places them within a timeout, reports what cannot be placed, and replaces
a host that died. :mod:`ntk_scale.tasks` drives work on them.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import socket
import sys
import warnings
from typing import Any

from ntk_scale.cluster import (
    cluster_accelerator,
    cluster_gpus,
    ensure_ray,
    joins_cluster,
    wait_for_gpus,
)
from ntk_scale.errors import GPUUnavailableError, PlacementError
from ntk_scale.roles import FAULT_KILL_TILE_ENV, node_id

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
    """One worker process: pinned to ``cores`` (CPU hosts) and given ``env`` (:func:`worker_env`)
    before JAX starts its backend, holding roles by key. Ray makes it an actor in one line
    (:class:`Pool`)."""

    def __init__(self, cores: list[int] | None = None, env: dict[str, str] | None = None):
        if cores:
            # XLA's CPU thread pool sizes itself from the schedulable cores (XLA_FLAGS thread
            # options did not bound it here): pin before the first computation creates it.
            os.sched_setaffinity(0, {c % os.cpu_count() for c in cores})
        self.env_applied = apply_worker_env(env or {})
        self.roles: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        """pid, node, host name, cores, the reported environment and the roles held."""
        try:
            cores = sorted(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = []
        env = {k: os.environ.get(k) for k in REPORTED_ENV}
        return {"pid": os.getpid(), "node": node_id(), "host": socket.gethostname(),
                "cores": cores, "env": env, "env_applied": self.env_applied,
                "jax": _jax_settings(), "roles": sorted(self.roles)}  # fmt: skip

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


def _jax_settings() -> dict[str, Any]:
    """The platforms and matmul precision as this process's JAX holds them ({} before JAX)."""
    if "jax" not in sys.modules:
        return {}
    import jax

    return {"platforms": jax.config.jax_platforms,
            "matmul_precision": jax.config.jax_default_matmul_precision}  # fmt: skip


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
    placed and started. allow_fewer: GPU hosts only; False makes fewer placed than an explicit
    ``workers`` a GPUUnavailableError (RunOptions.allow_fewer_workers; CPU hosts always go on
    with those placed, warning). Hosts are killed at :meth:`shutdown` (registered at exit).
    """

    def __init__(self, ray: Any, request: HostRequest, placement_timeout_s: float,
                 allow_fewer: bool = True):  # fmt: skip
        self.ray, self.request = ray, request
        self.placement_timeout_s = float(placement_timeout_s)
        self.allow_fewer = allow_fewer
        self.slots: list[Slot] = []
        self.job = ray.get_runtime_context().get_job_id()
        # The host sets its environment itself (Host.__init__): a per-actor runtime_env would
        # make Ray start a new worker process for it instead of taking one of its own, idle
        # and already past its imports (1.3-1.7 s more per pool start here).
        self._env = worker_env(request.use_gpu, None if request.use_gpu else request.threads)
        self._remote = ray.remote(Host).options(
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=4,
            scheduling_strategy="SPREAD",
            **request.resources,
        )
        self.started = 0  # hosts started over the pool's life (replacements included)
        self._pending: list[tuple[int, Any, Any]] = []  # prestarted, not yet waited for

    def take(self, workers: int | None, limit: int | None = None) -> list[Slot]:
        """``workers`` hosts (None: one per GPU, else per CPU slot), at most ``limit``; starts
        missing ones. Fewer than asked can be placed: warns and goes on with those (GPU hosts
        asked for by number without allow_fewer: GPUUnavailableError, CLI exit 3); none:
        raises PlacementError naming the request and what the cluster has."""
        self.refresh()
        want = self._wanted(workers, limit)
        if want > len(self.slots) or self._pending:  # prestarted hosts are waited for here
            self._grow(want, strict=workers is not None and self.strict)
        if not self.slots:
            raise PlacementError(self._no_room(want, 0))
        return self.slots[:want]

    def prestart(self, workers: int | None, limit: int | None = None) -> None:
        """Start the hosts ``take(workers, limit)`` will want without waiting for them, so
        that they boot (a process, its imports) while the driver does other work, e.g. builds
        the store; ``take`` then waits for them."""
        self.refresh()
        want = self._wanted(workers, limit)
        have = len(self.slots) + len(self._pending)
        n_new = max(0, min(want - have, self.capacity() - len(self.slots)))
        self._pending += [self._start(have + k) for k in range(n_new)]

    def _wanted(self, workers: int | None, limit: int | None) -> int:
        """Hosts asked for: ``workers`` (None: the default), at most ``limit``, at least one."""
        want = workers or self.default_workers()
        return want if limit is None else max(1, min(want, limit))

    @property
    def strict(self) -> bool:
        """Whether fewer hosts than asked for by number end the run (GPU hosts, no opt-in)."""
        return self.request.use_gpu and not self.allow_fewer

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

    def _grow(self, want: int, strict: bool = False) -> None:
        early, self._pending = self._pending, []
        self.slots.extend(self._await_ready(early))  # prestart's hosts first: they hold room
        if len(self.slots) < want:
            room = self.capacity()
            if room <= len(self.slots) and self._fits_cluster() and not early:
                room = len(self.slots) + 1  # busy now, not too small: try one, for the timeout
            n_new = max(0, min(want, room) - len(self.slots))
            pending = [self._start(len(self.slots) + k) for k in range(n_new)]
            self.slots.extend(self._await_ready(pending))
        if len(self.slots) < want:
            if strict and self.slots:
                raise GPUUnavailableError(self._too_few(want, len(self.slots)))
            msg = self._no_room(want, len(self.slots))
            if self.slots:
                warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _fits_cluster(self) -> bool:
        """Whether one more host fits the cluster's total resources (ignoring what is in use)."""
        key, per = self.request.unit
        return self.ray.cluster_resources().get(key, 0) >= per * (len(self.slots) + 1)

    def _start(self, index: int) -> tuple[int, Any, Any]:
        handle = self._remote.remote(self._cores(index), self._env)
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

    def _too_few(self, want: int, got: int) -> str:
        free = self.ray.available_resources().get("GPU", 0)
        return (
            f"--workers {want} asks for {want} hosts of {self.request.describe()} each, and only "
            f"{got} could be placed within {self.placement_timeout_s:.0f} s ({free:g} GPUs free "
            f"beyond them: others are busy); {FEWER_FIX}"
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
            self.slots, self._pending = [], []
            return
        for handle in [slot.handle for slot in self.slots] + [h for _, h, _ in self._pending]:
            try:
                self.ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - Ray may already be down at exit
                pass
        self.slots, self._pending = [], []


_POOLS: dict[tuple, Pool] = {}
#: The host kind each (Ray job, accelerator, allow_cpu, threads) was given: the GPU wait (or a
#: CPU fallback) happens once per process and Ray session, not at every stage.
_DECIDED: dict[tuple, HostRequest] = {}


def get_pool(
    ray: Any, request: HostRequest, placement_timeout_s: float, allow_fewer: bool = True
) -> Pool:
    """The process's pool for this kind of host, created on first use (one per Ray session)."""
    pool = _POOLS.get(request)
    if pool is not None and pool.job != ray.get_runtime_context().get_job_id():
        pool = None  # Ray was shut down and started again: the old hosts are gone
    if pool is None:
        pool = _POOLS[request] = Pool(ray, request, placement_timeout_s)
    pool.placement_timeout_s = float(placement_timeout_s)
    pool.allow_fewer = allow_fewer
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
    return get_pool(ray, _DECIDED[key], run.placement_timeout_s, run.allow_fewer_workers)


def host_request(ray: Any, run: Any, on_cluster: bool) -> HostRequest:
    """What each host takes under ``run.accelerator`` (see RunOptions): CPU hosts pinned to
    threads_per_worker cores, or one GPU each. Required GPUs (a cluster's "auto", "gpu", a GPU
    model; ``run.workers`` of them, else one) are waited for up to ``run.gpu_wait_s`` on a
    cluster, the autoscaler asked for all of them (a local Ray adds no nodes); then, with none:
    GPUUnavailableError, or with ``run.allow_cpu`` CPU hosts and a warning; with fewer than
    ``run.workers``: GPUUnavailableError naming how many joined, or with
    ``run.allow_fewer_workers`` those GPUs and a warning."""
    cpu = HostRequest(False, run.threads_per_worker or 1)
    if run.accelerator == "cpu":
        return cpu
    model = None if run.accelerator in ("auto", "gpu") else run.accelerator
    gpu = HostRequest(True, 1, model)
    want, have = run.workers or 1, cluster_gpus(ray, model)
    if have >= want:
        return gpu
    if have == 0 and run.accelerator == "auto" and not on_cluster:
        return cpu  # the embedded default: a laptop, CI, the demo
    wait = run.gpu_wait_s if on_cluster else 0.0
    have = wait_for_gpus(ray, want, model, wait, poll_s=min(run.wait_seconds, 5.0))
    if have >= want:
        return gpu
    if have > 0:
        return _fewer_gpus(ray, run, gpu, want, have, wait, on_cluster)
    message = _no_gpu_message(ray, run, gpu, want, wait, on_cluster)
    if not run.allow_cpu:
        raise GPUUnavailableError(message)
    warnings.warn(f"{message.split(';')[0]}; going on with CPU workers (allow_cpu)",
                  RuntimeWarning, stacklevel=3)  # fmt: skip
    return cpu


#: How to run with fewer GPUs than asked for, in every message that refuses to.
FEWER_FIX = (
    "pass --allow-fewer-workers ([run] allow_fewer_workers = true, "
    "allow_fewer_workers=True) to go on with those, lower --workers, or wait longer "
    "(--gpu-wait)"
)


def _fewer_gpus(
    ray: Any, run: Any, gpu: HostRequest, want: int, have: int, wait: float, on_cluster: bool
) -> HostRequest:
    """GPU hosts when the user opted in to fewer than ``want`` (a warning says how many),
    else GPUUnavailableError (CLI exit 3) naming how many joined and the opt-in."""
    where = "the Ray cluster" if on_cluster else "this local Ray (it adds no nodes)"
    waited = f"within {wait:g} s (gpu_wait_s, --gpu-wait)" if wait > 0 else "(none can join)"
    head = (f"only {have} of the {want} {gpu.describe().removeprefix('1 ')}s asked for "
            f"(--workers {want}) joined {where} {waited}")  # fmt: skip
    if not run.allow_fewer_workers:
        raise GPUUnavailableError(f"{head}; {FEWER_FIX}")
    warnings.warn(f"{head}; going on with {have} (allow_fewer_workers)", RuntimeWarning,
                  stacklevel=3)  # fmt: skip
    return gpu


def pool_accelerator(run: Any) -> str | None:
    """The GPU model this run's hosts take: ``run.accelerator`` when it names one, else the
    cluster's (:func:`ntk_scale.cluster.cluster_accelerator`); None for CPU hosts."""
    if run.accelerator == "cpu":
        return None
    if run.accelerator not in ("auto", "gpu"):
        return run.accelerator
    request = pool_for(run).request
    if not request.use_gpu:
        return None
    return request.accelerator_type or cluster_accelerator(ensure_ray(run.address))


def cluster_operator_for(
    run: Any, spec: Any, n: int, d: int, kind: str, dtype: str, tile: int, workers: int,
    centers: int | None = None,
) -> tuple[str, str] | None:
    """What operator="auto" takes on a cluster joined by address: (operator, reason) from
    `plan`'s cost model for ``workers`` GPUs of the cluster's model, within run.deadline_hours
    (:func:`ntk_scale.sizing.cluster_operator`); None on a local Ray, for CPU hosts, or for a
    GPU model the catalog lacks (the caller then times a tile here). With ``centers``
    (method="auto") the answer may be "nystrom"."""
    if not joins_cluster(run.address):
        return None
    accelerator = pool_accelerator(run)
    if accelerator is None:
        return None
    # Imported here: sizing imports measure, which imports this module (worker_env).
    from ntk_scale.sizing import cluster_operator

    return cluster_operator(spec, n, d, kind, dtype, tile, workers, accelerator,
                            deadline_hours=run.deadline_hours, centers=centers)


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

#: Solver operators whose products run in the driver (the head): no worker takes part.
DRIVER_OPERATORS = ("stored", "dense")


def release_for_solve(operator: str, run: Any) -> int:
    """Before a solve with ``operator``: on a cluster, kill the GPU hosts when the products run
    in the driver (:data:`DRIVER_OPERATORS`), so that their nodes go after the autoscaler's
    idle timeout instead of idling through the solve (cost.py bills them for the Gram only).
    The next stage that needs GPUs (predict) waits for them again. Returns hosts released."""
    if operator not in DRIVER_OPERATORS or not joins_cluster(getattr(run, "address", None)):
        return 0
    return release_gpu_hosts()


def release_gpu_hosts() -> int:
    """Kill every GPU pool's hosts and forget its GPU decision; CPU pools stay. Returns the
    hosts killed."""
    released = 0
    for request, pool in list(_POOLS.items()):
        if request.use_gpu:
            released += len(pool.slots)
            pool.shutdown()
            del _POOLS[request]
    for key, request in list(_DECIDED.items()):
        if request.use_gpu:
            del _DECIDED[key]
    return released


def apply_worker_env(env: dict[str, str]) -> bool:
    """Give this process ``env`` (:func:`worker_env`) before its JAX backend starts: the
    variables, JAX's own settings for those it read at import, and the BLAS thread pools'
    size (fixed when numpy loaded). Returns False when a backend had already started here
    (a process that ran JAX work before becoming a host): the variables are set and the
    backend keeps what it started with."""
    os.environ.update(env)
    threads = env.get("OMP_NUM_THREADS")
    if threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=int(threads))
    if "jax" not in sys.modules:  # it reads the variables when it is imported
        return True
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    if "JAX_PLATFORMS" in env:
        jax.config.update("jax_platforms", env["JAX_PLATFORMS"])
    if "JAX_DEFAULT_MATMUL_PRECISION" in env:
        jax.config.update("jax_default_matmul_precision", env["JAX_DEFAULT_MATMUL_PRECISION"])
    return True


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
