"""Linear-algebra core of the solver (pure numpy/scipy; no Ray, no Zarr).

Gram operators, preconditioners, block PCG and its checkpoints.
"""

from ntk_scale.errors import ConvergenceWarning, SolverError
from ntk_scale.linalg.checkpoint import checkpoint_every, load_checkpoint, save_checkpoint
from ntk_scale.linalg.falkon import (
    Falkon,
    KnmBlocks,
    KnmProducts,
    NystromResult,
    fit_nystrom,
    predict_nystrom,
    select_centers,
    solve_nystrom,
)
from ntk_scale.linalg.operators import DenseOperator, GramOperator, KernelOperator
from ntk_scale.linalg.pcg import (
    PCGResult,
    PCGState,
    RidgeOperator,
    resolve_ridge,
    solve_pcg,
)
from ntk_scale.linalg.preconditioners import (
    Identity,
    Jacobi,
    Nystrom,
    Preconditioner,
    identity,
    jacobi,
    nystrom,
    rpcholesky,
)

__all__ = [
    "ConvergenceWarning",
    "DenseOperator",
    "Falkon",
    "GramOperator",
    "Identity",
    "Jacobi",
    "KernelOperator",
    "KnmBlocks",
    "KnmProducts",
    "Nystrom",
    "NystromResult",
    "PCGResult",
    "PCGState",
    "Preconditioner",
    "RidgeOperator",
    "SolverError",
    "checkpoint_every",
    "fit_nystrom",
    "identity",
    "jacobi",
    "load_checkpoint",
    "nystrom",
    "predict_nystrom",
    "resolve_ridge",
    "rpcholesky",
    "save_checkpoint",
    "select_centers",
    "solve_nystrom",
    "solve_pcg",
]
