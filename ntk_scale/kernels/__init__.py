"""Analytic infinite-width kernels (pure JAX; no Ray, no I/O)."""

from ntk_scale.kernels.spec import (
    ACTIVATIONS,
    KERNEL_CODE_VERSION,
    FullyConnected,
    diag_function,
    spec_from_dict,
    spec_from_json,
    tile_function,
    tile_matmul_function,
)
from ntk_scale.kernels.validate import check_features

__all__ = [
    "ACTIVATIONS",
    "KERNEL_CODE_VERSION",
    "FullyConnected",
    "check_features",
    "diag_function",
    "spec_from_dict",
    "spec_from_json",
    "tile_function",
    "tile_matmul_function",
]
