"""Evaluating a stax spec: the layer tree interpreted on covariance tensors, in chunks of pairs.

A tile K(x1, x2) of n1 x n2 pairs is computed as

1. the **self pass**, once per image of each side (not per pair): the image paired with itself
   through the whole network, recording the per-position variances every activation needs
   (and the diagonal K(x_i, x_i));
2. the **cross pass**, chunk by chunk: c1 x c2 pairs at a time, the chunk sized so that its
   covariance tensors fit a memory budget (:func:`chunk_shape`). A diagonal tile computes only
   the chunks on and above its diagonal and mirrors them.

The per-pair work is the minimum the layers need: the first convolution is one matmul of image
patches; a network without pooling keeps only same-position entries (``diag`` layout, O(HW)
per pair); the filter sums are separable (one pass per spatial dimension); readouts reduce
inside the chunk. The maps themselves live in :mod:`ntk_scale.kernels.spatial`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_scale.kernels import spatial
from ntk_scale.kernels.stax import Layer, check_kind_dtype

#: Bytes the covariance tensors of one chunk of pairs may take on a worker (one definition).
DEFAULT_KERNEL_MEMORY = 1 << 30
#: Live tensors per pair, in units of the largest covariance tensor (measured peak, rounded up).
_LIVE_TENSORS = {"ntk": 8, "nngp": 5}
_HIGHEST = jax.lax.Precision.HIGHEST
_POOLING = ("AvgPool", "GlobalAvgPool")


# -- static analysis ---------------------------------------------------------------------------
class Shape(NamedTuple):
    """What flows between layers at infinite width: (H, W) positions, or None when dense."""

    hw: tuple[int, int] | None


class Analysis(NamedTuple):
    """layout: 'full', 'diag' or 'dense'; sample_shape: one input's shape; entries: the most
    covariance entries one pair holds at any layer."""

    layout: str
    sample_shape: tuple[int, ...]
    entries: int


def _walk(layer: Layer, shape: Any, layout: str, seen: list[int]) -> Any:
    """The output Shape (or tuple of Shapes) of ``layer``; records entries per pair in seen."""
    name, p = layer.name, layer.p
    if name == "serial":
        for child in layer.layers:
            shape = _walk(child, shape, layout, seen)
        return shape
    if name == "parallel":
        if not _branches(shape) or len(shape) != len(layer.layers):
            got = len(shape) if _branches(shape) else 1
            raise ValueError(f"stax.parallel of {len(layer.layers)} layers got {got} branch(es); "
                             f"put stax.FanOut({len(layer.layers)}) before it")  # fmt: skip
        return tuple(_walk(c, s, layout, seen) for c, s in zip(layer.layers, shape, strict=True))
    if _branches(shape):
        if name != "FanInSum":
            raise ValueError(f"stax.{name} got {len(shape)} branches; join them with "
                             "stax.FanInSum() or apply stax.parallel(...)")  # fmt: skip
        if len(set(shape)) != 1:
            raise ValueError(f"stax.FanInSum: branch shapes differ {[s.hw for s in shape]}; "
                             "every branch must end at the same spatial size")  # fmt: skip
        return shape[0]
    if name == "FanOut":
        return (shape,) * p["num"]
    if name == "FanInSum":
        raise ValueError("stax.FanInSum needs branches: put stax.FanOut(n) and stax.parallel "
                         "before it")  # fmt: skip
    if name in ("Conv", "AvgPool"):
        if shape.hw is None:
            raise ValueError(f"stax.{name} needs images (n, H, W, C), but its input is a "
                             "vector; remove the Flatten / GlobalAvgPool before it")  # fmt: skip
        window = p["filter_shape"] if name == "Conv" else p["window_shape"]
        hw = tuple(spatial.pads(n, f, s, p["padding"]).out
                   for n, f, s in zip(shape.hw, window, p["strides"], strict=True))  # fmt: skip
        seen.append(_entries(hw, layout))
        return Shape(hw)  # type: ignore[arg-type]
    if name in ("GlobalAvgPool", "Flatten"):
        if name == "GlobalAvgPool" and shape.hw is None:
            raise ValueError("stax.GlobalAvgPool needs images (n, H, W, C); its input is a "
                             "vector")  # fmt: skip
        return Shape(None)
    return shape  # Dense, activations, Identity keep the shape


def _branches(shape: Any) -> bool:
    return isinstance(shape, tuple) and not isinstance(shape, Shape)


def _entries(hw: tuple[int, int] | None, layout: str) -> int:
    if hw is None:
        return 1
    n = hw[0] * hw[1]
    return n * n if layout == "full" else n


def _layout(spec: Layer) -> str:
    """'full' when any layer mixes positions (pooling), else 'diag'."""

    def names(layer: Layer) -> Iterator[str]:
        yield layer.name
        for child in layer.layers:
            yield from names(child)

    return "full" if any(n in _POOLING for n in names(spec)) else "diag"


def _has_spatial(spec: Layer) -> bool:
    def names(layer: Layer) -> Iterator[str]:
        yield layer.name
        for child in layer.layers:
            yield from names(child)

    return any(n in ("Conv", "AvgPool", "GlobalAvgPool") for n in names(spec))


@functools.lru_cache(maxsize=256)
def analyse(spec: Layer, sample_shape: tuple[int, ...]) -> Analysis:
    """Check that ``spec`` takes inputs of ``sample_shape`` and ends in a vector readout."""
    spatial_net = _has_spatial(spec)
    if spatial_net and len(sample_shape) != 3:
        raise ValueError(
            f"this network has Conv / pooling layers: inputs must be images of shape "
            f"(n, H, W, C) (NHWC), got samples of shape {sample_shape}; reshape them, e.g. "
            "x.reshape(n, H, W, C)"
        )
    if not spatial_net and len(sample_shape) != 1:
        raise ValueError(
            f"this network is dense-only: inputs must be (n, d), got samples of shape "
            f"{sample_shape}; flatten them (x.reshape(n, -1)) or start it with stax.Flatten()"
        )
    layout = _layout(spec) if spatial_net else "dense"
    hw = sample_shape[:2] if spatial_net else None
    seen = [_entries(hw, layout)]  # type: ignore[arg-type]
    out = _walk(spec, Shape(hw), layout, seen)  # type: ignore[arg-type]
    if _branches(out):
        raise ValueError("the network ends in several branches; join them with stax.FanInSum()")
    if out.hw is not None:
        raise ValueError(
            "the network's output is still spatial (n, H, W, C): end it with stax.Flatten() or "
            "stax.GlobalAvgPool() (then stax.Dense) so that each input has one kernel value"
        )
    return Analysis(layout, tuple(sample_shape), max(seen))


def pair_bytes(spec: Layer, sample_shape: tuple[int, ...], kind: str, dtype: str) -> int:
    """Worker memory one pair of a chunk takes (the largest covariance tensor, live copies)."""
    a = analyse(spec, tuple(sample_shape))
    return a.entries * _LIVE_TENSORS[kind] * np.dtype(dtype).itemsize


def chunk_shape(spec: Layer, sample_shape: tuple[int, ...], kind: str, dtype: str, n1: int,
                n2: int, budget: int | None = None) -> tuple[int, int]:  # fmt: skip
    """Pairs per chunk (c1, c2), c1 <= n1, c2 <= n2, with c1·c2·pair_bytes <= budget."""
    budget = DEFAULT_KERNEL_MEMORY if budget is None else int(budget)
    pairs = max(1, budget // pair_bytes(spec, sample_shape, kind, dtype))
    c1 = max(1, min(n1, math.isqrt(pairs)))
    c2 = max(1, min(n2, pairs // c1))
    return c1, c2


# -- the interpreter -------------------------------------------------------------------------------
class State(NamedTuple):
    """nngp / ntk covariance tensors in ``layout`` (ntk None: zero, or not tracked)."""

    nngp: jax.Array
    ntk: jax.Array | None
    layout: str
    hw: tuple[int, int] | None


class Inputs(NamedTuple):
    """The input layer, not yet materialised: x1 (c1, H, W, C) / (c1, d), x2 likewise."""

    x1: jax.Array
    x2: jax.Array
    layout: str


class Context:
    """Self pass (``stats`` None): records each activation's variance map. Cross pass: reads
    the recorded maps of both sides in the same (pre-order) sequence."""

    def __init__(self, ntk: bool, stats: tuple[tuple, tuple] | None = None) -> None:
        self.ntk = ntk
        self.stats = None if stats is None else (iter(stats[0]), iter(stats[1]))
        self.record: list[jax.Array] = []

    def variances(self, state: State) -> tuple[jax.Array, jax.Array]:
        if self.stats is None:
            v = spatial.self_variance(state.nngp, state.layout)
            self.record.append(v)
            return v, v
        return next(self.stats[0]), next(self.stats[1])


def _affine(t: jax.Array, w_var: float, b_std: float | None) -> jax.Array:
    return w_var * t + (0.0 if b_std is None else b_std**2)


def _input_cov(inp: Inputs) -> State:
    x1, x2 = inp.x1, inp.x2
    if inp.layout == "dense":
        c = jnp.dot(x1, x2.T, precision=_HIGHEST) / x1.shape[1]
        return State(c, None, "dense", None)
    hw, ch = x1.shape[1:3], x1.shape[3]
    if inp.layout == "full":
        c = jnp.einsum("ahwc,bgvc->ahwbgv", x1, x2, precision=_HIGHEST) / ch
    else:
        c = jnp.einsum("ahwc,bhwc->abhw", x1, x2, precision=_HIGHEST) / ch
    return State(c, None, inp.layout, tuple(hw))


def _patches(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    """x (c, H, W, C) -> (c, Ho, Wo, fh·fw·C): every filter window, padded like the conv."""
    (fh, fw), (sh, sw) = p["filter_shape"], p["strides"]
    for axis, size, f, s in ((1, x.shape[1], fh, sh), (2, x.shape[2], fw, sw)):
        pd = spatial.pads(size, f, s, p["padding"])
        x = spatial._pad(x, (axis,), pd)
        x = jnp.stack([spatial._window_slice(x, (axis,), (k,), s, pd.out) for k in range(f)], -1)
        x = x.reshape(x.shape[:-2] + (-1,))
    return x


def _conv_input(inp: Inputs, p: dict[str, Any], ctx: Context) -> State:
    """The first convolution on the raw input: one matmul of image patches."""
    p1, p2 = _patches(inp.x1, p), _patches(inp.x2, p)
    k = p1.shape[-1]
    if inp.layout == "full":
        c = jnp.einsum("ahwk,bgvk->ahwbgv", p1, p2, precision=_HIGHEST) / k
    else:
        c = jnp.einsum("ahwk,bhwk->abhw", p1, p2, precision=_HIGHEST) / k
    w_var = p["W_std"] ** 2
    out = _affine(c, w_var, p["b_std"])
    return State(out, out if ctx.ntk else None, inp.layout, tuple(p1.shape[1:3]))


def _conv(state: State, p: dict[str, Any], ctx: Context) -> State:
    axes = spatial.FULL_AXES if state.layout == "full" else spatial.DIAG_AXES
    (fh, fw), (sh, sw) = p["filter_shape"], p["strides"]

    def lin(t: jax.Array | None) -> tuple[jax.Array | None, tuple[int, int]]:
        if t is None:
            return None, (0, 0)
        t, ho = spatial.conv_axis(t, axes[0], state.hw[0], fh, sh, p["padding"])
        t, wo = spatial.conv_axis(t, axes[1], state.hw[1], fw, sw, p["padding"])
        return t / (fh * fw), (ho, wo)

    nngp, hw = lin(state.nngp)
    ntk = lin(state.ntk)[0] if ctx.ntk else None
    return _dense_like(State(nngp, ntk, state.layout, hw), p, ctx)


def _dense_like(state: State, p: dict[str, Any], ctx: Context) -> State:
    w_var = p["W_std"] ** 2
    out = _affine(state.nngp, w_var, p["b_std"])
    if not ctx.ntk:
        return State(out, None, state.layout, state.hw)
    theta = out if state.ntk is None else w_var * state.ntk + out
    return State(out, theta, state.layout, state.hw)


def _pool(state: State, p: dict[str, Any]) -> State:
    (fh, fw), (sh, sw) = p["window_shape"], p["strides"]

    def lin(t: jax.Array | None) -> tuple[jax.Array | None, tuple[int, int]]:
        if t is None:
            return None, (0, 0)
        hw = []
        for (a1, a2), size, f, s in zip(spatial.FULL_AXES, state.hw, (fh, fw), (sh, sw),
                                        strict=True):  # fmt: skip
            for a in (a1, a2):
                t, out = spatial.pool_axis(t, a, size, f, s, p["padding"], p["normalize_edges"])
            hw.append(out)
        return t, tuple(hw)

    nngp, hw = lin(state.nngp)
    return State(nngp, lin(state.ntk)[0], state.layout, hw)


def _activation(state: State, name: str, p: dict[str, Any], ctx: Context) -> State:
    v1, v2 = ctx.variances(state)
    if name == "Erf":
        b2 = p["b"] ** 2
        prod = spatial.outer(1 + 2 * b2 * v1, 1 + 2 * b2 * v2, state.layout)
        s, sdot = spatial.erf(b2 * state.nngp, prod, p["a"], p["b"], p["c"])
        a2 = p["a"] ** 2
        ntk = None if state.ntk is None else a2 * b2 * state.ntk * sdot
        return State(a2 * s + p["c"] ** 2, ntk, state.layout, state.hw)
    a, b = {"Relu": (0.0, 1.0), "Abs": (-1.0, 1.0)}.get(name, (p.get("a"), p.get("b")))
    if name == "LeakyRelu":
        a, b = p["alpha"], 1.0
    s, sdot = spatial.abrelu(state.nngp, spatial.outer(v1, v2, state.layout), a, b)
    ntk = None if state.ntk is None else state.ntk * sdot
    return State(s, ntk, state.layout, state.hw)


def _readout(state: State, name: str) -> State:
    if state.layout == "dense":
        return state

    def red(t: jax.Array | None) -> jax.Array | None:
        if t is None:
            return None
        return spatial.global_mean(t) if name == "GlobalAvgPool" else spatial.flatten(
            t, state.layout)  # fmt: skip

    return State(red(state.nngp), red(state.ntk), "dense", None)


def _apply(layer: Layer, x: Any, ctx: Context) -> Any:
    name, p = layer.name, layer.p
    if name == "serial":
        for child in layer.layers:
            x = _apply(child, x, ctx)
        return x
    if name == "parallel":
        return tuple(_apply(c, xi, ctx) for c, xi in zip(layer.layers, x, strict=True))
    if name == "FanOut":
        return (x,) * p["num"]
    if name == "FanInSum":
        xs = [_input_cov(xi) if isinstance(xi, Inputs) else xi for xi in x]
        nngp = sum(s.nngp for s in xs[1:]) + xs[0].nngp
        ntks = [s.ntk for s in xs if s.ntk is not None]
        ntk = None if not ntks else sum(ntks[1:]) + ntks[0]
        return State(nngp, ntk, xs[0].layout, xs[0].hw)
    if name == "Conv" and isinstance(x, Inputs):
        return _conv_input(x, p, ctx)
    if isinstance(x, Inputs):
        x = _input_cov(x)
    if name == "Conv":
        return _conv(x, p, ctx)
    if name == "Dense":
        return _dense_like(x, p, ctx)
    if name == "AvgPool":
        return _pool(x, p)
    if name in ("Flatten", "GlobalAvgPool"):
        return _readout(x, name)
    if name == "Identity":
        return x
    return _activation(x, name, p, ctx)


def _result(state: Any, kind: str) -> jax.Array:
    if isinstance(state, Inputs):
        state = _input_cov(state)
    if kind == "nngp":
        return state.nngp
    return state.ntk if state.ntk is not None else jnp.zeros_like(state.nngp)


# -- compiled pieces -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _compiled(spec: Layer, layout: str, kind: str, what: str) -> Callable:
    ntk = kind == "ntk"
    if what == "self":

        def one(x):  # x: (*sample_shape): the image paired with itself
            ctx = Context(ntk)
            out = _result(_apply(spec, Inputs(x[None], x[None], layout), ctx), kind)
            return tuple(v[0] for v in ctx.record), out[0, 0]

        return jax.jit(jax.vmap(one))

    def cross(x1, x2, s1, s2):
        ctx = Context(ntk, (s1, s2))
        return _result(_apply(spec, Inputs(x1, x2, layout), ctx), kind)

    return jax.jit(cross)


class Compiled:
    """The self and cross passes of one spec for one sample shape, kind, dtype and budget."""

    def __init__(self, spec: Layer, sample_shape: tuple[int, ...], kind: str, dtype: str,
                 budget: int | None = None) -> None:  # fmt: skip
        check_kind_dtype(kind, dtype)
        self.a = analyse(spec, tuple(sample_shape))
        self.spec, self.kind, self.dtype, self.budget = spec, kind, np.dtype(dtype), budget
        self._self = _compiled(spec, self.a.layout, kind, "self")
        self._cross = _compiled(spec, self.a.layout, kind, "cross")

    def _shaped(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        return x.reshape((x.shape[0], *self.a.sample_shape))

    def self_pass(self, x: np.ndarray, chunk: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """x (n, *S) -> (variance maps, each (n, ...), diagonal K(x_i, x_i) (n,))."""
        n = x.shape[0]
        stats, diag = None, np.empty(n, dtype=np.float64)
        with jax.enable_x64(True):
            for r0 in range(0, n, chunk):
                part = _pad_rows(x[r0 : r0 + chunk], chunk)
                vs, d = self._self(part)
                m = min(chunk, n - r0)
                if stats is None:
                    stats = [np.empty((n, *v.shape[1:]), dtype=self.dtype) for v in vs]
                for out, v in zip(stats, vs, strict=True):
                    out[r0 : r0 + m] = np.asarray(v)[:m]
                diag[r0 : r0 + m] = np.asarray(d)[:m]
        return tuple(stats or ()), diag

    def tile(self, x1: Any, x2: Any = None) -> np.ndarray:
        """K(x1, x2) (n1, n2) float64 (computed in dtype); x2=None: the symmetric K(x1, x1)
        from the chunks on and above the diagonal, its diagonal from the self pass."""
        a = self._shaped(x1)
        b = a if x2 is None else self._shaped(x2)
        n1, n2 = a.shape[0], b.shape[0]
        c1, c2 = chunk_shape(self.spec, self.a.sample_shape, self.kind, str(self.dtype), n1, n2,
                             self.budget)  # fmt: skip
        if x2 is None:
            c1 = c2 = min(c1, c2)
        s1, d1 = self.self_pass(a, max(c1, c2))
        s2 = s1 if x2 is None else self.self_pass(b, max(c1, c2))[0]
        out = np.empty((n1, n2), dtype=np.float64)
        with jax.enable_x64(True):
            for r0 in range(0, n1, c1):
                for k0 in range(0, n2, c2):
                    if x2 is None and k0 + c2 <= r0:
                        continue
                    blk = self._cross(
                        _pad_rows(a[r0 : r0 + c1], c1), _pad_rows(b[k0 : k0 + c2], c2),
                        tuple(_pad_rows(s[r0 : r0 + c1], c1) for s in s1),
                        tuple(_pad_rows(s[k0 : k0 + c2], c2) for s in s2),
                    )  # fmt: skip
                    blk = np.asarray(blk)[: min(c1, n1 - r0), : min(c2, n2 - k0)]
                    out[r0 : r0 + blk.shape[0], k0 : k0 + blk.shape[1]] = blk
        if x2 is None:
            upper = np.triu(out)
            out = upper + np.triu(out, 1).T
            out[np.diag_indices(n1)] = d1
        return out

    def diag(self, x: Any) -> np.ndarray:
        a = self._shaped(x)
        c1, _ = chunk_shape(self.spec, self.a.sample_shape, self.kind, str(self.dtype),
                            a.shape[0], 1, self.budget)  # fmt: skip
        return self.self_pass(a, max(1, c1))[1]


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x padded to ``rows`` rows with copies of its last row (a real input: no 0/0 anywhere)."""
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


# -- public entry points ---------------------------------------------------------------------------
def _samples(x: Any, name: str, sample_shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim < 2:
        raise ValueError(f"{name} must be (n, H, W, C) images or an (n, d) matrix, got shape "
                         f"{arr.shape}; for one sample add a leading axis, x[None]")  # fmt: skip
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}; convert it first")
    if sample_shape is not None and arr.shape[1:] != tuple(sample_shape):
        raise ValueError(f"{name} has samples of shape {arr.shape[1:]}, expected "
                         f"{tuple(sample_shape)} (the shape of the other input)")  # fmt: skip
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        row = int(np.argmin(np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)))
        raise ValueError(f"{name} sample {row} contains NaN or Inf; remove or impute it")
    return arr


def evaluate(spec: Layer, x1: Any, x2: Any, kind: str, dtype: str,
             budget: int | None = None) -> np.ndarray:  # fmt: skip
    """K(x1, x2) as numpy (n1, n2) float64 values computed in ``dtype``."""
    check_kind_dtype(kind, dtype)
    a = _samples(x1, "x1")
    b = None if x2 is None else _samples(x2, "x2", a.shape[1:])
    return Compiled(spec, a.shape[1:], kind, dtype, budget).tile(a, b).astype(dtype)


def evaluate_diag(spec: Layer, x: Any, kind: str, dtype: str) -> np.ndarray:
    check_kind_dtype(kind, dtype)
    a = _samples(x, "x")
    return Compiled(spec, a.shape[1:], kind, dtype).diag(a).astype(dtype)
