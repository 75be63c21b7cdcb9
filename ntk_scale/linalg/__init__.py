"""Linear-algebra core of the solver (pure numpy/scipy; no Ray, no Zarr).

Gram operators, preconditioners, block PCG and its checkpoints.
"""

from ntk_scale.errors import ConvergenceWarning, SolverError
from ntk_scale.linalg.checkpoint import checkpoint_every, load_checkpoint, save_checkpoint
from ntk_scale.linalg.operators import DenseOperator, GramOperator, KernelOperator
from ntk_scale.linalg.pcg import (
    PCGResult,
    PCGState,
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
    "GramOperator",
    "Identity",
    "Jacobi",
    "KernelOperator",
    "Nystrom",
    "PCGResult",
    "PCGState",
    "Preconditioner",
    "SolverError",
    "checkpoint_every",
    "identity",
    "jacobi",
    "load_checkpoint",
    "nystrom",
    "resolve_ridge",
    "rpcholesky",
    "save_checkpoint",
    "solve_pcg",
]
