"""ntk_scale: kernel regression with neural tangent kernels at scale.

The public surface: re-exports only. The stages (gram, solve, predict, fit) each take one frozen
options record; the estimators, the CLI and the config run through them.

The scikit-learn estimators are imported on first use (``ntk_scale.NTKRegressor``, PEP 562):
scikit-learn and what it pulls in (SciPy's stats, pandas) take 8-16 s of CPU to import here,
and every CLI process and every Ray worker process imports this package (a worker unpickles
its role class from ntk_scale.roles), while only estimator users need them.
"""

from ntk_scale.errors import (
    ConvergenceWarning,
    GPUUnavailableError,
    GramRunError,
    PlacementError,
    RidgeEdgeWarning,
    SolverError,
    StoreFormatError,
    StoreLockedError,
    StoreMismatchError,
    TileCorruptError,
    WorkerLostError,
)
from ntk_scale.kernels import FullyConnected, Myrtle, spec_from_json, stax
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.pool import shutdown_pools
from ntk_scale.stages import fit, gram, predict, solve, verify
from ntk_scale.store import GramStore

__version__ = "0.1.0"


_ESTIMATORS = ("NTKClassifier", "NTKClassifierCV", "NTKRegressor", "NTKRegressorCV")


def __getattr__(name: str):
    if name in _ESTIMATORS:
        from ntk_scale import estimator  # on first use: it imports scikit-learn (docstring)

        return getattr(estimator, name)
    raise AttributeError(f"module 'ntk_scale' has no attribute {name!r}")


def shutdown() -> None:
    """Stop this process's worker actors (they stop at exit anyway); the next stage starts new
    ones."""

    shutdown_pools()


__all__ = [
    "ConvergenceWarning",
    "RidgeEdgeWarning",
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
