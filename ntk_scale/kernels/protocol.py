"""The one protocol every kernel kind implements; the rest of the package calls only this.

Implemented by :class:`ntk_scale.kernels.FullyConnected` (the fast fused path) and by a stax
network bound to its input shape (:class:`ntk_scale.kernels.Network`); the next kinds (the
empirical NTK of a user's JAX model, Nyström centres) implement the same methods. Outside
``kernels/`` nothing asks which kind it holds: a store, a worker, an operator, `plan` and
predict call these methods, and a kernel's own answer (padding, chunking, cost) stays with it.

Shapes: inputs travel through every stage as rows of a matrix, x: (n, d) with
d = prod(sample_shape); :meth:`Kernel.rows` turns them into what the kernel computes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np


class KernelCost(NamedTuple):
    """What `plan` needs to size one (t, t) tile of a kernel."""

    flops_per_entry: float  # floating-point operations per Gram entry
    memory_bytes: int  # a worker's working memory while computing one tile
    chunk_pairs: tuple[int, int] | None  # (rows, cols) computed at once; None: the whole tile


@runtime_checkable
class Kernel(Protocol):
    """A kernel the system computes, stores and solves with (frozen; JSON round-trip)."""

    # -- identity ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :func:`ntk_scale.kernels.spec_from_dict` inverts it."""
        ...

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal kernels give equal strings."""
        ...

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON and the kernel-code version (a store's key)."""
        ...

    def float32_relative_error(self, kind: str) -> float | None:
        """ε_K of this kernel's float32 error (:mod:`ntk_scale.kernels.precision`): a float32
        entry is within SAFETY · ε_K · max diag of the exact one; None: no bound is derived."""
        ...

    # -- the input-shape contract ------------------------------------------------------------
    @property
    def d(self) -> int | None:
        """Features per input row, or None when any number is accepted."""
        ...

    @property
    def fixed_shape(self) -> bool:
        """Whether the tile function compiles per input shape, so that callers pad edge blocks
        to one number of rows (:meth:`pad_block` does it); False: blocks go in as they are."""
        ...

    def rows(self, x: Any, name: str = "x") -> np.ndarray:
        """x validated and shaped for this kernel's functions; raises ValueError naming
        ``name`` and the fix."""
        ...

    def check_input(self, sample_shape: tuple[int, ...], name: str = "x") -> None:
        """Raise ValueError (naming ``name`` and the fix) unless inputs whose samples have
        ``sample_shape`` ((d,) for feature rows, (H, W, C) for images) fit this kernel."""
        ...

    def pad_block(self, x: np.ndarray, rows: int) -> np.ndarray:
        """x (r <= rows, d) as a tile function should receive it: zero-padded to ``rows`` rows
        when :attr:`fixed_shape`, else unchanged; crop results to r rows."""
        ...

    # -- computation -------------------------------------------------------------------------
    def kernel(self, x1: Any, x2: Any = None, kind: str = "ntk", dtype: str = "float32") -> Any:
        """K(x1, x2) (n1, n2) as numpy; x2=None: K(x1, x1)."""
        ...

    def diag(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> np.ndarray:
        """The diagonal K(x_i, x_i), (n,)."""
        ...

    def tile_function(
        self, kind: str = "ntk", dtype: str = "float32", symmetric: bool = False
    ) -> Callable[..., Any]:
        """(x1 (n1, d), x2 (n2, d)) -> K(x1, x2) (n1, n2) in ``dtype``. symmetric=True: called
        with x1 == x2 (a diagonal tile); exactly symmetric, its diagonal the exact formula."""
        ...

    def pair_tile_function(
        self, dtype: str = "float32", symmetric: bool = False
    ) -> Callable[..., Any]:
        """(x1, x2) -> (NNGP tile, NTK tile), each as :meth:`tile_function` gives it: one pass
        where the kernel's NTK recursion carries its NNGP (the ``"ntk"`` posterior's two
        stores, issue N), else the two tile functions in turn."""
        ...

    def diag_function(self, kind: str = "ntk", dtype: str = "float32") -> Callable[..., Any]:
        """x (n, d) -> (n,) K(x_i, x_i) in ``dtype``."""
        ...

    def panel_function(
        self, kind: str = "ntk", dtype: str = "float32", n_rows: int | None = None
    ) -> Callable[..., Any]:
        """(x1 (t, d), i, xs (nb, t, d), ps (nb, t, c) float64) -> K(x1, X) @ P (t, c) float64;
        see :func:`ntk_scale.kernels.products.panel_matmul_function`."""
        ...

    def self_stats(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> Any:
        """The per-input self pass of x (n, d) (a network's variance maps), or None where the
        kernel needs none (FullyConnected)."""
        ...

    # -- sizing --------------------------------------------------------------------------------
    def tile_chunk(self, kind: str, dtype: str, n1: int, n2: int) -> tuple[int, int]:
        """(rows, cols) of an (n1, n2) tile computed at once (a worker compiles for these)."""
        ...

    def cost(self, d: int, kind: str, dtype: str, t: int) -> KernelCost:
        """FLOPs per entry, a worker's memory and the chunking of one (t, t) tile."""
        ...

    def tile_seconds(
        self, kind: str, dtype: str, x1: np.ndarray, x2: np.ndarray
    ) -> tuple[float, float]:
        """(off-diagonal, diagonal) seconds of one (t, t) tile from x1, x2 (t, d), timed here
        after compiling; a kernel may extrapolate from a chunk where a tile takes hours."""
        ...
