"""`ntk-scale plan`: tiles, bytes, FLOPs, memory and a measured time estimate for a Gram job."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ntk_scale.kernels import FullyConnected, tile_function
from ntk_scale.plan import BlockPlan

# Elementwise work per entry and hidden layer of the recursion (arccos polynomial, sqrt, ...).
_FLOPS_PER_ENTRY_LAYER = 40


@dataclasses.dataclass(frozen=True)
class GramPlan:
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
    estimated_seconds: float | None

    def rows(self) -> list[tuple[str, str]]:
        est = (
            "not measured" if self.estimated_seconds is None else _duration(self.estimated_seconds)
        )
        per = "-" if self.seconds_per_tile is None else f"{self.seconds_per_tile:.3f} s"
        return [
            ("samples N / features d", f"{self.n:,} / {self.d:,}"),
            ("tile / tiles (upper triangle)", f"{self.tile:,} / {self.tiles:,}"),
            ("entries computed", f"{self.entries:.3e}"),
            ("bytes on disk", _bytes(self.bytes_on_disk)),
            ("FLOPs", f"{self.flops:.3e}"),
            ("memory per worker", _bytes(self.worker_memory_bytes)),
            ("measured time per tile", per),
            (f"estimated wall time ({self.workers} workers)", est),
        ]


def plan_gram(
    n: int,
    d: int,
    spec: FullyConnected,
    kind: str = "ntk",
    dtype: str = "float32",
    tile: int = 2048,
    workers: int = 1,
    measure: bool = True,
) -> GramPlan:
    """Size a K(X, X) job; with ``measure`` one tile is timed on this machine (synthetic data)."""
    if n < 1 or d < 1 or workers < 1:
        raise ValueError(f"n={n}, d={d}, workers={workers} must all be >= 1")
    plan = BlockPlan.square(n, min(tile, n))
    item = np.dtype(dtype).itemsize
    entries = plan.entries()
    flops = float(entries) * (2 * d + _FLOPS_PER_ENTRY_LAYER * spec.depth)
    t = plan.tile
    memory = item * (2 * t * d + 6 * t * t)  # inputs + the fused recursion's live tiles
    per_tile = _time_tile(spec, kind, dtype, t, d) if measure else None
    est = None if per_tile is None else per_tile * plan.n_tiles / workers
    return GramPlan(
        n, d, t, workers, dtype, plan.n_tiles, entries, entries * item, flops, memory, per_tile, est
    )


def _time_tile(spec: FullyConnected, kind: str, dtype: str, t: int, d: int) -> float:
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(t, d)).astype(dtype)
    x2 = rng.normal(size=(t, d)).astype(dtype)
    fn = tile_function(spec, kind, dtype)
    fn(x1, x2).block_until_ready()
    start = time.perf_counter()
    fn(x1, x2).block_until_ready()
    return time.perf_counter() - start


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


@dataclasses.dataclass(frozen=True)
class OperatorChoice:
    """Stored vs matrix-free for the products K·P of a solve, from measured costs."""

    choice: str  # "stored" or "matrixfree"
    stored_seconds: float  # one product: read every stored byte once
    matrixfree_seconds: float  # one product: recompute every block (both triangles)
    read_bytes_per_s: float
    reason: str


def drop_page_cache(paths: list[str]) -> None:
    """Flush the files and drop their pages from the OS page cache (posix_fadvise DONTNEED, Linux;
    a no-op elsewhere), so the next read of them comes from the disk."""
    import os

    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rate(paths: list[str], block: int = 16 << 20) -> float:
    """Bytes/s reading the files in order with plain unbuffered reads, nothing else."""
    buf = bytearray(block)
    start, got = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                got += n
    return got / (time.perf_counter() - start)


def measure_read_rate(directory: str, nbytes: int = 256 << 20) -> float:
    """Bytes/s reading a file of nbytes written in ``directory`` (the store's disk), after dropping
    it from the page cache: a store worth planning for is read from the disk, not from memory
    (here 1.3 GB/s from the disk against 8 GB/s from the cache)."""
    import os
    import tempfile

    block = np.random.default_rng(0).bytes(16 << 20)
    fd, path = tempfile.mkstemp(dir=directory, prefix=".ntk-read-rate-")
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(1, nbytes // len(block))):
                f.write(block)
        drop_page_cache([path])
        return read_rate([path])
    finally:
        os.remove(path)


def choose_operator(plan: GramPlan, read_bytes_per_s: float) -> OperatorChoice:
    """The cheaper operator per product: reading the stored upper triangle once, or recomputing
    all B² blocks (a tile costs ``plan.seconds_per_tile``, measured here) on the workers."""
    if plan.seconds_per_tile is None:
        raise ValueError("choose_operator needs a measured plan (plan_gram(..., measure=True))")
    blocks = -(-plan.n // plan.tile)
    stored = plan.bytes_on_disk / read_bytes_per_s
    recompute = blocks * blocks * plan.seconds_per_tile / plan.workers
    choice = "matrixfree" if recompute < stored else "stored"
    reason = (
        f"a product reads {_bytes(plan.bytes_on_disk)} at {_bytes(read_bytes_per_s)}/s = "
        f"{_duration(stored)}, or recomputes {blocks * blocks:,} tiles at "
        f"{plan.seconds_per_tile:.3f} s on {plan.workers} workers = {_duration(recompute)}: "
        f"{'recomputing' if choice == 'matrixfree' else 'reading'} is cheaper"
    )
    return OperatorChoice(choice, stored, recompute, read_bytes_per_s, reason)
