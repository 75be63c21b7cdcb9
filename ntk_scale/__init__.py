"""ntk_scale: kernel regression with neural tangent kernels at scale.

The public surface: re-exports only. The stages (gram, solve, predict, fit) each take one frozen
options record; the estimators, the CLI and the config run through them.
"""

from ntk_scale.errors import (
    ConvergenceWarning,
    GPUUnavailableError,
    GramRunError,
    PlacementError,
    SolverError,
    StoreFormatError,
    StoreLockedError,
    StoreMismatchError,
    TileCorruptError,
    WorkerLostError,
)
from ntk_scale.estimator import NTKClassifier, NTKClassifierCV, NTKRegressor, NTKRegressorCV
from ntk_scale.kernels import FullyConnected, Myrtle, spec_from_json, stax
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.pool import shutdown_pools
from ntk_scale.stages import fit, gram, predict, solve, verify
from ntk_scale.store import GramStore

__version__ = "0.1.0"


def shutdown() -> None:
    """Stop this process's worker actors (they stop at exit anyway); the next stage starts new
    ones."""

    shutdown_pools()


__all__ = [
    "ConvergenceWarning",
    "FullyConnected",
    "GPUUnavailableError",
    "GramOptions",
    "GramRunError",
    "GramStore",
    "Myrtle",
    "NTKClassifier",
    "NTKClassifierCV",
    "NTKRegressor",
    "NTKRegressorCV",
    "PlacementError",
    "RunOptions",
    "SolveOptions",
    "SolverError",
    "StoreFormatError",
    "StoreLockedError",
    "StoreMismatchError",
    "TileCorruptError",
    "WorkerLostError",
    "__version__",
    "fit",
    "gram",
    "predict",
    "shutdown",
    "solve",
    "spec_from_json",
    "stax",
    "verify",
]
