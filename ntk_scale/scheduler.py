"""The Gram driver: the missing tiles of a store, on the pool's hosts, with progress.

Correctness never depends on the driver: each worker writes its tile's chunk and then its marker,
so a tile is either done (marker present) or will be computed again; writing a tile twice gives
the same bytes. A killed driver loses only the tiles in flight; a killed worker loses nothing
(its tiles run again on the others or on its replacement, see :mod:`ntk_scale.tasks`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from ntk_scale.options import RunOptions
from ntk_scale.plan import Tile
from ntk_scale.pool import pool_for
from ntk_scale.progress import Progress
from ntk_scale.roles import GramTileWorker
from ntk_scale.store import GramStore
from ntk_scale.tasks import RoleGroup, run_queue

HEARTBEAT_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class GramReport:
    """Summary of one run. records: one dict per tile computed (i, j, node, pid, seconds).
    retried: tiles run again (after an error or a lost worker); deaths: workers lost and
    replaced; worker_pids: the processes that computed tiles."""

    store: str
    tiles_total: int
    computed: int
    reused: int
    retried: int
    workers: int
    wall_seconds: float
    entries_computed: int
    records: tuple[dict[str, Any], ...] = ()
    deaths: int = 0
    worker_pids: tuple[int, ...] = ()
    #: The store's dtype and why (``dtype="auto"`` says what it compared; else "asked for").
    dtype: str = ""
    dtype_reason: str = ""
    #: Where the stage's time went, in order: ("ray", s) Ray's start (0 when running), ("store",
    #: s) creating the store (X, diagonal), ("pool", s) waiting for the hosts to start and
    #: attach (they boot while the store is built), ("tiles", s) computing and writing tiles.
    phases: tuple[tuple[str, float], ...] = ()

    @property
    def entries_per_second(self) -> float:
        return self.entries_computed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def phase_line(self, without: tuple[str, ...] = ()) -> str:
        """"Ray start 2.1 s, store 0.4 s, pool start 1.2 s, tiles 0.2 s" ("" if not timed),
        leaving out the phases named in ``without`` (e.g. "ray" where Ray started earlier)."""
        names = {"ray": "Ray start", "store": "store", "pool": "pool start", "tiles": "tiles"}
        return ", ".join(f"{names.get(k, k)} {v:.1f} s" for k, v in self.phases
                         if k not in without)  # fmt: skip

    def summary(self) -> str:
        lost = f", {self.deaths} workers lost and replaced" if self.deaths else ""
        return (
            f"{self.tiles_total} tiles: {self.computed} computed, {self.reused} reused, "
            f"{self.retried} retried on {self.workers} workers{lost} in "
            f"{self.wall_seconds:.1f} s ({self.entries_per_second:.3g} entries/s)"
            + (f"; {self.dtype} ({self.dtype_reason})" if self.dtype else "")
        )


def run_store(
    gram: GramStore,
    run: RunOptions | None = None,
    on_tile: Callable[[dict[str, Any]], None] | None = None,
    companion: GramStore | None = None,
) -> GramReport:
    """Compute the missing tiles of an existing store on the process's pool.

    on_tile: called on the driver with each finished tile's record (tests inject faults here).
    companion: a store of the same plan in the other kind, filled by the same tasks (a tile
    missing from either is computed for both).
    """
    run = run or RunOptions()
    start = time.perf_counter()
    with gram.lock() as lock:
        missing = gram.missing()
        if companion is not None:
            missing = sorted(set(missing) | set(companion.missing()))
        total = gram.plan.n_tiles
        if not missing:
            return GramReport(gram.url, total, 0, total, 0, 0, time.perf_counter() - start, 0)
        records, stats, group, started_s = _compute(gram, missing, run, lock, on_tile,
                                                    companion)  # fmt: skip
        gram.sweep_partial_writes()  # a killed worker (or an earlier killed run) left these
        if companion is not None:
            companion.sweep_partial_writes()
    entries = sum(gram.plan.tile_at(r["i"], r["j"]).shape[0] * _cols(gram, r) for r in records)
    pids = tuple(sorted({int(r["pid"]) for r in records}))
    wall = time.perf_counter() - start
    return GramReport(
        gram.url,
        total,
        len(records),
        total - len(missing),
        stats.retried,
        len(group.members),
        wall,
        entries,
        tuple(records),
        stats.deaths,
        pids,
        phases=(("pool", started_s), ("tiles", wall - started_s)),
    )


def _cols(gram: GramStore, record: dict[str, Any]) -> int:
    return gram.plan.tile_at(record["i"], record["j"]).shape[1]


def _compute(gram: GramStore, missing: list[Tile], run: RunOptions, lock: Any, on_tile,
             companion: GramStore | None = None):  # fmt: skip
    start = time.perf_counter()
    pool = pool_for(run)
    slots = pool.take(run.workers, limit=len(missing))
    args = (gram.url,) if companion is None else (gram.url, companion.url)
    group = RoleGroup(pool, slots, GramTileWorker, lambda k: args, run, "gram").start()
    started_s = time.perf_counter() - start  # the hosts' start and the role's attach
    records: list[dict[str, Any]] = []
    done0, total = gram.plan.n_tiles - len(missing), gram.plan.n_tiles
    bar = Progress("gram", total, "tiles", enabled=run.show_progress, done=done0)
    t0, beat = time.perf_counter(), [time.monotonic()]

    def finished(tile: Tile, record: dict[str, Any]) -> None:
        records.append(record)
        rate = sum(r["entries"] for r in records) / max(time.perf_counter() - t0, 1e-9)
        left = (total - done0 - len(records)) * (time.perf_counter() - t0) / len(records)
        bar.update(advance=1, rate=f"{rate:.3g} entries/s", eta_s=left or None)
        if on_tile is not None:
            on_tile(record)

    def tick() -> None:
        if time.monotonic() - beat[0] > HEARTBEAT_SECONDS:
            lock.heartbeat()
            beat[0] = time.monotonic()

    with group, bar:
        stats = run_queue(
            group, missing, "compute", lambda t: (t.i, t.j), finished, tick, _tile_name
        )
    return records, stats, group, started_s


def _tile_name(t: Tile) -> str:
    return f"tile ({t.i}, {t.j})"
