"""Free space before a stage writes (issue P): a local store's filesystem must hold what the
stage will write, checked before it starts, so that a 2 TB Gram does not begin on a disk with
80 GB free. Object stores are not checked (their space is the account's quota, which no API
states): there the run meets the store's own error.

The sizes are what the stage writes, from the same plan it runs (:class:`ntk_scale.plan.
BlockPlan`): :func:`gram_bytes` for a Gram store (each stored tile uncompressed, the copies of X
and the diagonal), :func:`solve_bytes` for a solve's checkpoint, sketch and model,
:func:`predict_bytes` for predictions written as Zarr. A margin of :data:`HEADROOM_FRACTION`
plus :data:`HEADROOM_BYTES` covers metadata, markers and the filesystem's own blocks.
"""

from __future__ import annotations

import shutil

import numpy as np

from ntk_scale.errors import DiskSpaceError
from ntk_scale.plan import BlockPlan
from ntk_scale.store.fsio import is_local, probe_location

#: What a stage asks beyond its payload: 1 % and 256 KiB (metadata, a checkpoint's next copy).
HEADROOM_FRACTION = 0.01
HEADROOM_BYTES = 256 << 10
#: A tile's completion marker: a small file, which takes a filesystem block (4 KiB on ext4/xfs).
MARKER_BYTES = 4096


def check_free_space(url: str, need: int, what: str, smaller: str) -> None:
    """Raise DiskSpaceError when the local filesystem under ``url`` has less free space than
    ``need`` bytes plus the headroom; ``what`` names the writer ("the Gram store"), ``smaller``
    how the job could write less. Object-store URLs pass unchecked."""
    if need <= 0 or not is_local(url):
        return
    where = probe_location(url)
    usage = shutil.disk_usage(where)
    want = int(need * (1 + HEADROOM_FRACTION)) + HEADROOM_BYTES
    if usage.free >= want:
        return
    raise DiskSpaceError(
        f"{what} needs {human_bytes(want)} at {url} ({human_bytes(need)} and "
        f"{HEADROOM_FRACTION:.0%} + {human_bytes(HEADROOM_BYTES)} headroom), and the "
        f"filesystem of {where} has {human_bytes(usage.free)} free of "
        f"{human_bytes(usage.total)}: free {human_bytes(want - usage.free)} there, put it on a "
        f"larger disk or in a bucket (s3://..., gs://...), or {smaller}; nothing was written"
    )


def gram_bytes(n_rows: int, n_cols: int | None, d: int, tile: int, dtype: str,
               tiles: int | None = None) -> int:  # fmt: skip
    """Bytes a Gram store of (n_rows, n_cols or n_rows) writes: each stored tile (the upper
    triangle of a symmetric one) as a whole uncompressed chunk (Zarr stores an edge chunk at
    the full chunk's shape) and its marker's block, the copies of X and the diagonal;
    ``tiles``: only that many tiles (a resumed store's missing ones), without X."""
    item = np.dtype(dtype).itemsize
    side = min(int(tile), max(n_rows, n_cols or n_rows))  # as the store clamps it
    if tiles is None:
        plan = BlockPlan(n_rows, n_cols or n_rows, side, symmetric=n_cols is None)
        tiles, x = plan.n_tiles, (n_rows + (n_cols or 0)) * d * item
        diag = n_rows * item if n_cols is None else 0
        return tiles * (side * side * item + MARKER_BYTES) + x + diag
    return tiles * (side * side * item + MARKER_BYTES)


def solve_bytes(n: int, columns: int, rank: int) -> int:
    """Bytes a solve writes: the preconditioner's sketch (n x rank float64, rank at most n),
    its checkpoint (the PCG state: four (n, columns) float64 arrays, columns = targets x
    ridges x fits) and the model's alpha (n x targets, at most columns)."""
    return 8 * n * (min(rank, n) + 5 * columns)


def predict_bytes(m: int, columns: int) -> int:
    """Bytes of (m, columns) float64 predictions (or standard deviations) written as Zarr."""
    return 8 * m * columns


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"
