"""Every exception a user may catch; each message names the fix."""

from __future__ import annotations


class StoreMismatchError(ValueError):
    """The store at this path was made for another kernel, other data or other settings."""


class DiskSpaceError(ValueError):
    """A local store's filesystem has less free space than a stage will write (CLI exit 2)."""


class StoreLockedError(RuntimeError):
    """Another live driver holds the store's lock."""


class TileCorruptError(RuntimeError):
    """A tile's bytes fail their checksum (or its marker's); ``tile`` names it."""

    def __init__(self, tile: tuple[int, int], detail: str):
        super().__init__(
            f"tile {tile} is corrupted ({detail}); run `ntk-scale verify --repair STORE` "
            "(or GramStore.invalidate + recompute) to rebuild it"
        )
        self.tile = tile


class StoreFormatError(ValueError):
    """The store's array metadata does not match the chunk format this version writes."""


class GramRunError(RuntimeError):
    """A run could not finish: a task failed repeatedly, or nothing finished for too long."""


class WorkerLostError(GramRunError):
    """Workers died and could not be replaced, or one task kept killing the workers it ran on
    (most likely it needs more memory than a worker has)."""


class PlacementError(ValueError):
    """No worker could be placed on the cluster: the message names what each worker asks for
    and what the cluster has. A usage error (exit code 2): ask for less or add resources."""


class GPUUnavailableError(RuntimeError):
    """A run asked for GPUs (on a cluster, by default) and none of the kind asked for joined
    within the wait: the message names the wait and the fixes (--allow-cpu, or the GPU worker
    group). Exit code 3 of the CLI."""


class SolverError(ValueError):
    """PCG met a non-positive curvature or a NaN/Inf: K + λI is not (numerically) SPD. The
    message names the fix (a larger ridge, a float64 store)."""


class ConvergenceWarning(UserWarning):
    """PCG reached max_iter with columns above tol; the message names the settings to change
    (max_iter, the preconditioner, the ridge)."""


class RidgeEdgeWarning(UserWarning):
    """The ridge chosen on held-out rows is the grid's smallest or largest value, so the best
    may lie beyond the grid: the message names the edge and a wider grid to try."""


class PrecisionWarning(UserWarning):
    """A float32 Gram whose per-entry error bound is not small against the ridge λ
    (:func:`ntk_scale.kernels.precision.float32_risk`): the message names the fix (a float64
    or ``dtype="auto"`` Gram, or a larger ridge)."""
