"""Frozen kernel specs: validated on construction, JSON round-trip, stable fingerprint."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ntk_scale.kernels import fc, precision, products, timing
from ntk_scale.kernels.network import Network
from ntk_scale.kernels.protocol import Kernel, KernelCost
from ntk_scale.kernels.stax import Layer, layer_from_dict
from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice, check_features
from ntk_scale.plan import pad_rows

#: Bumped whenever a change to the kernel code could change a computed value: stores made by
#: another version are refused (their fingerprint differs).
KERNEL_CODE_VERSION = 2

ACTIVATIONS = ("relu", "erf", "abs", "identity", "leaky_relu")
_ABRELU_SLOPES = {"relu": (0.0, 1.0), "abs": (-1.0, 1.0)}
# Elementwise work per entry and hidden layer of the recursion (arccos polynomial, sqrt, ...).
_FLOPS_PER_ENTRY_LAYER = 40


@dataclasses.dataclass(frozen=True)
class FullyConnected:
    """Infinite-width fully-connected network: ``depth`` x [Dense(W_std, b_std), activation],
    then a Dense(W_std, b_std) readout, in the NTK parameterization (as Neural Tangents' stax).

    negative_slope: only for activation="leaky_relu" (default 0.01).
    """

    # Option metadata in the form ntk_scale.options reads (help, choices): the CLI's kernel
    # flags, the [kernel] TOML keys and --help come from these fields (plain metadata, since
    # options imports kernels).
    depth: int = dataclasses.field(default=3, metadata={"help": "hidden layers"})
    activation: str = dataclasses.field(default="relu", metadata={
        "help": "the hidden layers' nonlinearity", "choices": ACTIVATIONS})  # fmt: skip
    W_std: float = dataclasses.field(default=1.4142135623730951, metadata={"help": "weight std"})
    b_std: float = dataclasses.field(default=0.0, metadata={"help": "bias std"})
    negative_slope: float | None = dataclasses.field(default=None, metadata={
        "help": "for leaky_relu (default 0.01)"})  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, (int, np.integer)):
            raise ValueError(f"depth={self.depth!r} must be an integer >= 0 (hidden layers)")
        if self.depth < 0:
            raise ValueError(f"depth={self.depth} must be >= 0 (the number of hidden layers)")
        check_choice("activation", self.activation, ACTIVATIONS)
        _check_float("W_std", self.W_std, lambda v: v > 0, "must be > 0, e.g. W_std=1.4")
        _check_float("b_std", self.b_std, lambda v: v >= 0, "must be >= 0, e.g. b_std=0.1")
        slope = self.negative_slope
        if self.activation == "leaky_relu":
            slope = 0.01 if slope is None else slope
            _check_float("negative_slope", slope, lambda v: True, "must be a finite number")
            slope = float(slope)
        elif slope is not None:
            raise ValueError(
                f"negative_slope={slope!r} applies only to activation='leaky_relu', "
                f"not {self.activation!r}; drop it or use activation='leaky_relu'"
            )
        object.__setattr__(self, "depth", int(self.depth))
        object.__setattr__(self, "W_std", float(self.W_std))
        object.__setattr__(self, "b_std", float(self.b_std))
        object.__setattr__(self, "negative_slope", slope)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": "FullyConnected", **dataclasses.asdict(self)}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal specs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON and the kernel-code version (hex, 64 chars)."""
        payload = f"{self.to_json()}|kernel-code-v{KERNEL_CODE_VERSION}"
        return hashlib.sha256(payload.encode()).hexdigest()

    # -- computation ---------------------------------------------------------------------------
    @property
    def params(self) -> fc.FCParams:
        if self.activation in ("erf", "identity"):
            act, (a, b) = self.activation, (0.0, 1.0)
        else:
            act = "abrelu"
            a, b = _ABRELU_SLOPES.get(self.activation, (self.negative_slope, 1.0))
        return fc.FCParams(self.depth, act, float(a), float(b), self.W_std**2, self.b_std**2)

    def float32_relative_error(self, kind: str) -> float:
        return precision.fc_relative_error(self.params, kind)

    def kernel(
        self, x1: Any, x2: Any = None, kind: str = "ntk", dtype: str = "float32"
    ) -> np.ndarray:
        """K(x1, x2). x1: (n1, d), x2: (n2, d) or None for K(x1, x1) -> numpy (n1, n2)."""
        check_choice("kind", kind, KINDS)
        check_choice("dtype", dtype, DTYPES)
        a = check_features(x1, "x1")
        if x2 is None:
            return np.asarray(tile_function(self, kind, dtype, symmetric=True)(a, a))
        b = check_features(x2, "x2", dim=a.shape[1])
        return np.asarray(tile_function(self, kind, dtype)(a, b))

    def diag(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> np.ndarray:
        """The diagonal K(x_i, x_i) without the off-diagonal entries. x: (n, d) -> (n,)."""
        check_choice("kind", kind, KINDS)
        check_choice("dtype", dtype, DTYPES)
        return np.asarray(diag_function(self, kind, dtype)(check_features(x)))

    # -- the kernel protocol (:class:`ntk_scale.kernels.protocol.Kernel`) -----------------------
    @property
    def d(self) -> None:
        """Any number of features: Dense layers on x (n, d)."""
        return None

    @property
    def fixed_shape(self) -> bool:
        """True: the fused tile compiles once per input shape, so edge blocks are padded."""
        return True

    def rows(self, x: Any, name: str = "x") -> np.ndarray:
        return check_features(x, name)

    def check_input(self, sample_shape: tuple[int, ...], name: str = "x") -> None:
        shape = tuple(sample_shape)
        if len(shape) != 1:
            raise ValueError(
                f"{name} has samples of shape {shape}; a FullyConnected kernel takes (n, d) "
                f"feature rows: pass {name}.reshape(n, -1)"
            )

    def pad_block(self, x: np.ndarray, rows: int) -> np.ndarray:
        return pad_rows(x, rows)

    def tile_function(
        self, kind: str = "ntk", dtype: str = "float32", symmetric: bool = False
    ) -> Callable[..., jax.Array]:
        return _bind(self, kind, dtype, "symmetric" if symmetric else "tile")

    def pair_tile_function(self, dtype: str = "float32", symmetric: bool = False) -> Callable:
        """One recursion for both kinds: the NTK's carries the NNGP."""
        fn = _bind(self, "ntk", dtype, "pair_symmetric" if symmetric else "pair")
        return lambda x1, x2: tuple(np.asarray(v).astype(dtype) for v in fn(x1, x2))

    def diag_function(self, kind: str = "ntk", dtype: str = "float32") -> Callable:
        return _bind(self, kind, dtype, "diag")

    def panel_function(
        self, kind: str = "ntk", dtype: str = "float32", n_rows: int | None = None
    ) -> Callable:
        """The fused scan (padding rows of X cost what real ones do: n_rows is not needed)."""
        return products.fc_panel_function(self, kind, dtype)

    def self_stats(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> None:
        """No self pass: a tile needs only x1 and x2."""
        return None

    def tile_chunk(self, kind: str, dtype: str, n1: int, n2: int) -> tuple[int, int]:
        return n1, n2

    def cost(self, d: int, kind: str, dtype: str, t: int) -> KernelCost:
        """One matmul and an elementwise chain over the whole tile; memory: the inputs and the
        recursion's live tiles."""
        item = np.dtype(dtype).itemsize
        flops = 2 * d + _FLOPS_PER_ENTRY_LAYER * self.depth
        return KernelCost(float(flops), item * (2 * t * d + 6 * t * t), None)

    def tile_seconds(self, kind: str, dtype: str, x1: Any, x2: Any) -> tuple[float, float]:
        return timing.whole_tile_seconds(self, kind, dtype, x1, x2)


def _check_float(name: str, value: Any, ok: Callable[[float], bool], fix: str) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number; it {fix}") from None
    if not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name}={value!r} {fix}")


def spec_from_dict(d: dict[str, Any]) -> FullyConnected | Layer | Network:
    """Inverse of ``spec.to_dict()``: a FullyConnected, a stax network, or a network bound to
    its input shape (with "sample_shape"); unknown types or keys raise ValueError."""
    d = dict(d)
    kind = d.pop("type", None)
    if kind == "stax":
        shape = d.pop("sample_shape", None)
        if set(d) != {"network"}:
            raise ValueError(f"a stax spec is {{'type': 'stax', 'network': ...}}, got {sorted(d)}")
        layer = layer_from_dict(d["network"])
        return layer if shape is None else Network(layer, tuple(shape))
    if kind != "FullyConnected":
        raise ValueError(f"unknown kernel type {kind!r}; supported: 'FullyConnected', 'stax'")
    known = {f.name for f in dataclasses.fields(FullyConnected)}
    extra = sorted(set(d) - known)
    if extra:
        raise ValueError(f"unknown kernel field(s) {extra}; valid fields are {sorted(known)}")
    return FullyConnected(**d)


def spec_from_json(text: str) -> FullyConnected | Layer | Network:
    return spec_from_dict(json.loads(text))


def _scalars(traced: tuple[float, ...], dtype: str) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(v, dtype=dtype) for v in traced)


@functools.lru_cache(maxsize=128)
def _compiled(static: tuple[int, str], kind: str, what: str) -> Callable:
    """One jitted function per network structure, not per W_std / b_std (those are traced)."""
    if what == "tile":
        return jax.jit(lambda t, x1, x2: fc.fc_tile(fc.FCParams.join(static, t), x1, x2, kind))
    if what == "symmetric":
        return jax.jit(
            lambda t, x1, x2: fc.fc_tile_symmetric(fc.FCParams.join(static, t), x1, kind)
        )
    if what == "pair":
        return jax.jit(lambda t, x1, x2: fc.fc_tile_pair(fc.FCParams.join(static, t), x1, x2))
    if what == "pair_symmetric":
        return jax.jit(
            lambda t, x1, x2: fc.fc_tile_pair_symmetric(fc.FCParams.join(static, t), x1)
        )
    return jax.jit(lambda t, x: fc.fc_diag(fc.FCParams.join(static, t), x, kind))


def _bind(spec: FullyConnected, kind: str, dtype: str, what: str) -> Callable[..., jax.Array]:
    """Run the compiled function with 64-bit types available (scoped, no global flag)."""
    static, traced = spec.params.split()
    fn, np_dtype = _compiled(static, kind, what), np.dtype(dtype)
    hyper = _scalars(traced, dtype)

    def call(*arrays: Any) -> jax.Array:
        with jax.enable_x64(True):
            return fn(hyper, *[np.asarray(a, dtype=np_dtype) for a in arrays])

    return call


def tile_function(
    spec: Kernel, kind: str = "ntk", dtype: str = "float32", symmetric: bool = False
) -> Callable[..., jax.Array]:
    """A tile function (x1 (n1, d), x2 (n2, d)) -> (n1, n2) array in ``dtype``
    (:meth:`Kernel.tile_function`).

    FullyConnected compiles once per input shape (pad edge tiles to keep one shape). With
    ``symmetric=True`` it must be called with x1 == x2 (a diagonal tile): the result is exactly
    symmetric and its diagonal comes from the exact formula.
    """
    return spec.tile_function(kind, dtype, symmetric)


def diag_function(spec: Kernel, kind: str = "ntk", dtype: str = "float32") -> Callable:
    """A diagonal function x (n, d) -> (n,) in ``dtype`` (:meth:`Kernel.diag_function`)."""
    return spec.diag_function(kind, dtype)


def diag_blocks(
    spec: Kernel, x: Any, kind: str = "ntk", dtype: str = "float32", block: int = 2048
) -> np.ndarray:
    """The exact diagonal K(x_i, x_i) of x (n, d) -> (n,) float64, computed in ``dtype``.

    x may be anything sliceable (numpy, memmap, Zarr, dask): it is read ``block`` rows at a
    time, and (where the kernel has a :attr:`Kernel.fixed_shape`) every block is padded with
    zero rows to ``block`` rows, so one shape compiles
    (``block`` is clamped to n, as a store clamps its tile). XLA's results can depend on the
    array shape in the last bit: pass a store's tile as ``block`` and this diagonal is bitwise
    the one its diagonal tiles hold.
    """
    check_spec(spec)
    check_choice("kind", kind, KINDS)
    check_choice("dtype", dtype, DTYPES)
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block={block!r} must be a positive integer (rows per block)")
    if len(getattr(x, "shape", ())) != 2:
        x = check_features(x, "x")
    n, d = x.shape
    spec.check_input((d,), "x")
    block = min(int(block), max(n, 1))
    fn, out = spec.diag_function(kind, dtype), np.empty(n, dtype=np.float64)
    for r0 in range(0, n, block):
        part = spec.pad_block(np.asarray(x[r0 : r0 + block], dtype=dtype), block)
        out[r0 : min(r0 + block, n)] = np.asarray(fn(part))[: min(block, n - r0)]
    return out


def fixed_shape(spec: Kernel) -> bool:
    """Whether callers should pad inputs to one number of rows (:attr:`Kernel.fixed_shape`):
    FullyConnected compiles its tile function once per shape; a stax network chunks its pairs
    itself, and a padding row of a conv kernel costs as much as a real one."""
    return spec.fixed_shape


def check_spec(spec: Any) -> None:
    """Raise ValueError unless ``spec`` is a kernel the system computes (it implements
    :class:`Kernel`): FullyConnected, or a stax network bound to its input shape (:func:`bind`)."""
    if isinstance(spec, Layer):
        raise ValueError(
            "a stax network must be bound to its input shape first: ntk_scale.kernels.bind("
            "spec, x.shape[1:]) (the stages, the estimators and the CLI do this themselves)"
        )
    if not isinstance(spec, Kernel):
        raise ValueError(
            f"kernel must be a FullyConnected spec or a stax network, got {type(spec).__name__}"
        )


def bind(spec: Any, sample_shape: tuple[int, ...]) -> FullyConnected | Network:
    """The spec a stage carries for inputs whose samples have ``sample_shape``.

    FullyConnected takes any sample flattened (it is Dense layers on x.reshape(n, -1)); a stax
    network is bound to the shape (validated: a Conv network needs (H, W, C)); a bound network
    must match it."""
    shape = tuple(int(v) for v in sample_shape)
    if isinstance(spec, FullyConnected):
        return spec
    if isinstance(spec, Layer):
        return Network(spec, shape)
    if isinstance(spec, Network):
        if spec.sample_shape != shape and (len(shape) != 1 or shape[0] != spec.d):
            raise ValueError(
                f"inputs have samples of shape {shape}, the kernel was bound to "
                f"{spec.sample_shape}; reshape them to (n, *{spec.sample_shape})"
            )
        return spec
    check_spec(spec)
    raise AssertionError("unreachable")
