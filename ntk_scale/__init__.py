"""ntk_scale: kernel regression with neural tangent kernels at scale.

The public surface: re-exports only. The stages (gram, solve, predict, fit) each take one frozen
options record; the estimators, the CLI and the config run through them.

Everything but the errors is imported on first use (PEP 562): ``import ntk_scale.cluster`` then
costs no JAX import, so ``ntk-scale demo`` starts its local Ray while the CLI imports JAX
(:mod:`ntk_scale.launch`). scikit-learn, behind the estimators, takes 8-16 s of CPU to import
here (with SciPy's stats and pandas); every Ray worker process imports this package too (a
worker unpickles its role class from ntk_scale.roles), and needs neither.
"""

import importlib

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

__version__ = "0.1.0"

#: name -> the module that defines it, imported on first use.
_LAZY = {
    **dict.fromkeys(("FullyConnected", "Myrtle", "spec_from_json", "stax"), "ntk_scale.kernels"),
    **dict.fromkeys(("GramOptions", "RunOptions", "SolveOptions"), "ntk_scale.options"),
    "shutdown_pools": "ntk_scale.pool",
    **dict.fromkeys(("fit", "gram", "predict", "solve", "verify"), "ntk_scale.stages"),
    "GramStore": "ntk_scale.store",
    **dict.fromkeys(("NTKClassifier", "NTKClassifierCV", "NTKRegressor", "NTKRegressorCV"),
                    "ntk_scale.estimator"),  # fmt: skip
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    try:  # a submodule not imported yet (``ntk_scale.stages`` after ``import ntk_scale``)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'ntk_scale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def shutdown() -> None:
    """Stop this process's worker actors (they stop at exit anyway); the next stage starts new
    ones."""
    from ntk_scale.pool import shutdown_pools

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
