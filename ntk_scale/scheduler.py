"""The driver loop: tiles to Ray actors, a bounded number in flight, retries, progress.

Correctness never depends on the driver: each actor writes its tile's chunk and then its marker,
so a tile is either done (marker present) or will be computed again; writing a tile twice gives
the same bytes. A killed driver loses only the tiles in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from ntk_scale.cluster import cluster_cpus, cluster_gpus, ensure_ray, worker_env
from ntk_scale.kernels import FullyConnected
from ntk_scale.plan import DEFAULT_TILE, Tile
from ntk_scale.store import GramStore


class GramRunError(RuntimeError):
    """The run could not finish (a tile failed repeatedly, or every worker is gone)."""


@dataclasses.dataclass(frozen=True)
class GramReport:
    """Summary of one run. records: one dict per tile computed (i, j, node, pid, seconds)."""

    store: str
    tiles_total: int
    computed: int
    reused: int
    retried: int
    workers: int
    wall_seconds: float
    entries_computed: int
    records: tuple[dict[str, Any], ...] = ()

    @property
    def entries_per_second(self) -> float:
        return self.entries_computed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.tiles_total} tiles: {self.computed} computed, {self.reused} reused, "
            f"{self.retried} retried on {self.workers} workers in {self.wall_seconds:.1f} s "
            f"({self.entries_per_second:.3g} entries/s)"
        )


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run: workers=None means one per GPU, else one per CPU slot of the cluster.

    threads_per_worker: CPU workers are pinned to this many cores each (default 1), so that
    workers sharing a node do not oversubscribe it.
    """

    workers: int | None = None
    address: str | None = None
    threads_per_worker: int | None = None
    tasks_per_worker: int = 2
    max_retries: int = 3
    max_restarts: int = 4
    wait_seconds: float = 5.0
    stall_seconds: float = 900.0
    progress: bool = True


def compute_gram(
    x: Any,
    spec: FullyConnected,
    store: str,
    *,
    x_cols: Any = None,
    kind: str = "ntk",
    dtype: str = "float32",
    tile: int = DEFAULT_TILE,
    overwrite: bool = False,
    options: RunOptions | None = None,
    on_tile: Callable[[dict[str, Any]], None] | None = None,
) -> GramReport:
    """Compute K(x, x) (or K(x, x_cols)) into the store at ``store``; resume what is there.

    x: (n, d) array-like (numpy, Zarr, dask), x_cols: (m, d) or None. Returns a GramReport.
    """
    gram = GramStore.create(
        store, spec, x, x_cols, kind=kind, dtype=dtype, tile=tile, overwrite=overwrite
    )
    return run_store(gram, options or RunOptions(), on_tile)


def run_store(
    gram: GramStore, options: RunOptions, on_tile: Callable[[dict[str, Any]], None] | None = None
) -> GramReport:
    """Compute the missing tiles of an existing store."""
    start = time.perf_counter()
    with gram.lock() as lock:
        missing = gram.missing()
        total = gram.plan.n_tiles
        if not missing:
            return GramReport(gram.url, total, 0, total, 0, 0, time.perf_counter() - start, 0)
        ray = ensure_ray(options.address)
        actors = _start_actors(ray, gram.url, options, len(missing))
        try:
            loop = _Loop(ray, actors, missing, options, lock, on_tile)
            records, retried = loop.run(total)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
    entries = sum(
        gram.plan.tile_at(r["i"], r["j"]).shape[0] * gram.plan.tile_at(r["i"], r["j"]).shape[1]
        for r in records
    )
    return GramReport(
        gram.url,
        total,
        len(records),
        total - len(missing),
        retried,
        len(actors),
        time.perf_counter() - start,
        entries,
        tuple(records),
    )


def _start_actors(ray: Any, url: str, options: RunOptions, n_missing: int) -> list[Any]:
    from ntk_scale.workers import TileWorker

    gpus = cluster_gpus(ray)
    n = options.workers or (gpus if gpus else cluster_cpus(ray))
    n = max(1, min(n, n_missing))
    threads = options.threads_per_worker or (None if gpus else 1)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    remote = ray.remote(TileWorker).options(
        max_restarts=options.max_restarts,
        max_task_retries=0,
        max_concurrency=options.tasks_per_worker,
        scheduling_strategy="SPREAD",
        runtime_env={"env_vars": worker_env(bool(gpus), threads)},
        **resources,
    )
    return [remote.remote(url, _cores(k, threads, ray)) for k in range(n)]


def _cores(k: int, threads: int | None, ray: Any) -> list[int] | None:
    """Cores for actor k: SPREAD places actor k on node k mod M, as its (k // M)-th actor there."""
    if not threads:
        return None
    nodes = max(1, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0))
    slot = k // nodes
    return [slot * threads + t for t in range(threads)]


class _Loop:
    """Keeps up to tasks_per_worker tiles queued on each live actor until every tile is done."""

    def __init__(self, ray, actors, missing: list[Tile], options: RunOptions, lock, on_tile):
        self.ray, self.actors, self.options, self.lock, self.on_tile = (
            ray,
            actors,
            options,
            lock,
            on_tile,
        )
        self.queue = collections.deque((t, 0) for t in missing)
        self.inflight: dict[Any, tuple[Tile, int, int]] = {}
        self.load = [0] * len(actors)
        self.failures = [0] * len(actors)
        self.alive = [True] * len(actors)
        self.records: list[dict[str, Any]] = []
        self.retried = 0

    def run(self, total: int) -> tuple[list[dict[str, Any]], int]:
        todo = len(self.queue)
        with _progress(self.options.progress, total, total - todo) as bar:
            last_done, last_beat = time.monotonic(), 0.0
            while self.queue or self.inflight:
                self._submit()
                ready, _ = self.ray.wait(
                    list(self.inflight), num_returns=1, timeout=self.options.wait_seconds
                )
                for ref in ready:
                    if self._collect(ref):
                        last_done = time.monotonic()
                        bar(self.records[-1])
                now = time.monotonic()
                if now - last_beat > 10:
                    self.lock.heartbeat()
                    last_beat = now
                if now - last_done > self.options.stall_seconds:
                    raise GramRunError(
                        f"no tile finished in {self.options.stall_seconds:.0f} s; check the "
                        "workers (ray status) or raise RunOptions.stall_seconds"
                    )
        return self.records, self.retried

    def _submit(self) -> None:
        while self.queue:
            candidates = [
                a
                for a in range(len(self.actors))
                if self.alive[a] and self.load[a] < self.options.tasks_per_worker
            ]
            if not candidates:
                if not any(self.alive):
                    raise GramRunError("every worker died; see the Ray logs (ray logs) for why")
                return
            a = min(candidates, key=lambda k: self.load[k])
            tile, attempt = self.queue.popleft()
            ref = self.actors[a].compute.remote(tile.i, tile.j)
            self.inflight[ref] = (tile, attempt, a)
            self.load[a] += 1

    def _collect(self, ref: Any) -> bool:
        tile, attempt, a = self.inflight.pop(ref)
        self.load[a] -= 1
        try:
            record = self.ray.get(ref, timeout=60)
        except self.ray.exceptions.RayActorError as err:
            self.failures[a] += 1
            if self.failures[a] > self.options.max_restarts + self.options.tasks_per_worker:
                self.alive[a] = False
            return self._retry(tile, attempt, err)
        except self.ray.exceptions.RayTaskError as err:
            return self._retry(tile, attempt, err)
        self.records.append(record)
        if self.on_tile is not None:
            self.on_tile(record)
        return True

    def _retry(self, tile: Tile, attempt: int, err: Exception) -> bool:
        if attempt + 1 > self.options.max_retries:
            raise GramRunError(
                f"tile {(tile.i, tile.j)} failed {attempt + 1} times: {err}"
            ) from err
        self.retried += 1
        self.queue.appendleft((tile, attempt + 1))
        return False


class _progress:
    """A rich progress bar (tiles done of total, entries/s, ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done
        self.entries, self.start = 0, time.perf_counter()

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("gram"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("tiles", total=self.total, completed=self.done, rate="")
        return self._update

    def _update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.entries += record.get("entries", 0)
        self.bar.update(self.task, advance=1, rate=f"{self._rate()} entries/s")

    def _rate(self) -> str:
        elapsed = time.perf_counter() - self.start
        return f"{self.entries / elapsed:.3g}" if elapsed > 0 else "-"

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
