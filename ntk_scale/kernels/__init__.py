"""Analytic infinite-width kernels (pure JAX; no Ray, no I/O), all behind one protocol
(:class:`Kernel`, :mod:`ntk_scale.kernels.protocol`) that the rest of the package calls.

Tile-times-matrix products (the matrix-free operator's and predict's one fused path) live in
:mod:`ntk_scale.kernels.products`."""

from ntk_scale.kernels import stax
from ntk_scale.kernels.network import Network
from ntk_scale.kernels.protocol import Kernel, KernelCost
from ntk_scale.kernels.spec import (
    ACTIVATIONS,
    KERNEL_CODE_VERSION,
    FullyConnected,
    bind,
    check_spec,
    diag_blocks,
    diag_function,
    fixed_shape,
    spec_from_dict,
    spec_from_json,
    tile_function,
)
from ntk_scale.kernels.stax import Layer, Myrtle
from ntk_scale.kernels.validate import check_features

__all__ = [
    "ACTIVATIONS",
    "KERNEL_CODE_VERSION",
    "FullyConnected",
    "Kernel",
    "KernelCost",
    "Layer",
    "Myrtle",
    "Network",
    "bind",
    "check_spec",
    "check_features",
    "diag_blocks",
    "diag_function",
    "fixed_shape",
    "spec_from_dict",
    "spec_from_json",
    "stax",
    "tile_function",
]
