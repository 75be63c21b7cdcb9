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
per pair); all taps of a filter are summed in one pass over the padded tensor; readouts reduce
inside the chunk. The maps themselves live in :mod:`ntk_scale.kernels.spatial`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_scale.kernels import spatial
from ntk_scale.kernels.stax import STAX_CODE_VERSION, Layer, check_kind_dtype

#: Bytes the covariance tensors of one chunk of pairs may take on a worker (one definition).
#: Small on purpose: a chunk whose tensors stay in the last-level cache runs several times
#: faster per pair (Myrtle-5 float64 on one core here: 20 ms a pair one pair at a time, 64 ms
#: at 4 x 4 pairs); a pair larger than the budget is computed alone.
DEFAULT_KERNEL_MEMORY = 64 << 20
#: Live tensors per pair, in units of the largest covariance tensor (measured peak, rounded up).
_LIVE_TENSORS = {"ntk": 8, "nngp": 5}
_HIGHEST = jax.lax.Precision.HIGHEST
_POOLING = ("AvgPool", "GlobalAvgPool")
#: Covariance entries per pair from which the self pass takes one image per call (vmapped
#: loops over large tensors ran 2x slower; over small ones, per-image calls are dispatch-bound).
_SINGLE_SELF_ENTRIES = 1 << 16
#: Self passes remembered per compiled network (each a few variance maps per image).
_SELF_CACHE = 64
_ACTIVATIONS = ("Relu", "LeakyRelu", "Abs", "ABRelu", "Erf")


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
        hw = _out_hw(layer, shape.hw)
        seen.append(_entries(hw, layout))
        return Shape(hw)
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


def _names(layer: Layer) -> Iterator[str]:
    """Every layer name in the tree, combinators included."""
    yield layer.name
    for child in layer.layers:
        yield from _names(child)


def _layout(spec: Layer) -> str:
    """'full' when any layer mixes positions (pooling), else 'diag'."""
    return "full" if any(n in _POOLING for n in _names(spec)) else "diag"


def _has_spatial(spec: Layer) -> bool:
    return any(n in ("Conv", "AvgPool", "GlobalAvgPool") for n in _names(spec))


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


# -- the traced maps of one segment ----------------------------------------------------------------
# Covariances travel as one array: real for kind="nngp" (and before the first weighted layer),
# complex nngp + i·ntk for kind="ntk". Every linear map then acts on both at once, and the
# activations compute θ once for both outputs; XLA would otherwise split the two outputs into
# two loops and evaluate the arc-cosine in each.
class Inputs(NamedTuple):
    """The input layer, not yet materialised: x1 (c1, H, W, C) / (c1, d), x2 likewise."""

    x1: jax.Array
    x2: jax.Array


class Op(NamedTuple):
    """A linear layer with the positions (H, W) of its input (None: a vector)."""

    layer: Layer
    hw: tuple[int, int] | None


def _input_cov(inp: Inputs, layout: str) -> jax.Array:
    x1, x2 = inp.x1, inp.x2
    if layout == "dense":
        return jnp.dot(x1, x2.T, precision=_HIGHEST) / x1.shape[1]
    ch = x1.shape[3]
    if layout == "full":
        return jnp.einsum("ahwc,bgvc->ahwbgv", x1, x2, precision=_HIGHEST) / ch
    return jnp.einsum("ahwc,bhwc->abhw", x1, x2, precision=_HIGHEST) / ch


def _patches(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    """x (c, H, W, C) -> (c, Ho, Wo, fh·fw·C): every filter window, padded like the conv."""
    (fh, fw), (sh, sw) = p["filter_shape"], p["strides"]
    for axis, size, f, s in ((1, x.shape[1], fh, sh), (2, x.shape[2], fw, sw)):
        pd = spatial.pads(size, f, s, p["padding"])
        x = spatial._pad(x, (axis,), pd)
        x = jnp.stack([spatial._window_slice(x, (axis,), (k,), s, pd.out) for k in range(f)], -1)
        x = x.reshape(x.shape[:-2] + (-1,))
    return x


def _conv_input(inp: Inputs, p: dict[str, Any], layout: str) -> jax.Array:
    """The first convolution on the raw input, before its weights: one matmul of patches."""
    p1, p2 = _patches(inp.x1, p), _patches(inp.x2, p)
    sub = "ahwk,bgvk->ahwbgv" if layout == "full" else "ahwk,bhwk->abhw"
    return jnp.einsum(sub, p1, p2, precision=_HIGHEST) / p1.shape[-1]


def _weights(z: jax.Array, p: dict[str, Any], ntk: bool) -> jax.Array:
    """After the spatial map: nngp' = W²·nngp + b², ntk' = W²·ntk + nngp'."""
    w_var, b_var = p["W_std"] ** 2, (p["b_std"] or 0.0) ** 2
    nngp = w_var * jnp.real(z) + b_var
    if not ntk:
        return nngp
    theta = nngp if not jnp.iscomplexobj(z) else w_var * jnp.imag(z) + nngp
    return jax.lax.complex(nngp, theta)


def _linear(z: Any, op: Op, layout: str, ntk: bool) -> jax.Array:
    name, p = op.layer.name, op.layer.p
    if isinstance(z, Inputs):
        if name == "Conv":
            return _weights(_conv_input(z, p, layout), p, ntk)
        z = _input_cov(z, layout)
    if name == "Conv":
        z = spatial.conv(z, layout, op.hw, p["filter_shape"], p["strides"], p["padding"])[0]
        return _weights(z, p, ntk)
    if name == "Dense":
        return _weights(z, p, ntk)
    if name == "AvgPool":
        return spatial.avg_pool(z, op.hw, p["window_shape"], p["strides"], p["padding"],
                                p["normalize_edges"])[0]  # fmt: skip
    if op.hw is None or name == "Identity":  # a readout of a vector is the identity
        return z
    if name == "GlobalAvgPool":
        return spatial.global_mean(z)
    return spatial.flatten(z, layout)


def _activate(z: jax.Array, layer: Layer, v1: jax.Array, v2: jax.Array, layout: str):
    name, p = layer.name, layer.p
    nngp = jnp.real(z)
    ntk = jnp.imag(z) if jnp.iscomplexobj(z) else None
    if name == "Erf":
        b2, a2 = p["b"] ** 2, p["a"] ** 2
        prod = spatial.outer(1 + 2 * b2 * v1, 1 + 2 * b2 * v2, layout)
        s, sdot = spatial.erf(b2 * nngp, prod)
        s, sdot = a2 * s + p["c"] ** 2, a2 * b2 * sdot
    else:
        a, b = {"Relu": (0.0, 1.0), "Abs": (-1.0, 1.0)}.get(name, (p.get("a"), p.get("b")))
        if name == "LeakyRelu":
            a, b = p["alpha"], 1.0
        s, sdot = spatial.abrelu(nngp, v1, v2, layout, a, b)
    return s if ntk is None else jax.lax.complex(s, ntk * sdot)


@functools.lru_cache(maxsize=512)
def _segment(ops: tuple[Op, ...], act: Layer | None, layout: str, kind: str, self_pass: str):
    """One compiled segment: the pending linear layers, then (optionally) an activation.

    self_pass "": the cross pass, f(base, v1, v2) -> z. "batched" (vmapped over images) or
    "single" (one image per call, for large covariance tensors): f(base) -> (z, v), v the
    variance map the activation used. base: Inputs or the covariance array."""
    ntk = kind == "ntk"

    def run(base):
        z = base
        for op in ops:
            z = _linear(z, op, layout, ntk)
        if isinstance(z, Inputs):
            z = _input_cov(z, layout)
        return z

    if self_pass:

        def one(base):
            z = run(base)
            if act is None:
                return z
            v = spatial.self_variance(jnp.real(z), layout)
            return _activate(z, act, v, v, layout), v

        if self_pass == "single":
            return _self_full(ops, act, kind, jax.jit(run))

        def batched(base):
            if isinstance(base, Inputs):
                base = Inputs(base.x1[:, None], base.x2[:, None])
            else:
                base = base[:, None]
            out = jax.vmap(one)(base)
            return jax.tree_util.tree_map(lambda a: a[:, 0], out)

        return jax.jit(batched)

    def cross(base, v1, v2):
        z = run(base)
        return z if act is None else _activate(z, act, v1, v2, layout)

    return jax.jit(cross)


def _self_full(ops: tuple[Op, ...], act: Layer | None, kind: str, run: Callable) -> Callable:
    """The self pass of a full-layout segment, one image per call (vmap made these loops 2x
    slower). The variance map is a call of its own: XLA then evaluates the linear maps at the
    same-position entries only, and the activation is the cross pass's own compiled loop,
    without the pre-activation tensor written out for a diagonal gather."""
    if act is None:
        return run
    cross = _segment(ops, act, "full", kind, "")
    variance = jax.jit(lambda base: spatial.self_variance(jnp.real(run(base)), "full"))

    def one(base):
        v = variance(base)
        return cross(base, v, v), v

    return one


# -- the interpreter: the layer tree walked in Python, one compiled segment per activation -----
class State(NamedTuple):
    """base: Inputs or a materialised covariance array; pending: linear layers not yet run."""

    base: Any
    pending: tuple[Op, ...]
    hw: tuple[int, int] | None


class Context:
    """Self pass (``stats`` None): records each activation's variance map. Cross pass: reads
    the recorded maps of both sides in the same (pre-order) sequence."""

    def __init__(self, layout: str, kind: str, stats: tuple[tuple, tuple] | None = None,
                 self_mode: str = "batched") -> None:  # fmt: skip
        self.layout, self.kind, self.self_mode = layout, kind, self_mode
        self.stats = None if stats is None else (iter(stats[0]), iter(stats[1]))
        self.record: list[jax.Array] = []

    def run(self, state: State, act: Layer | None) -> jax.Array:
        mode = self.self_mode if self.stats is None else ""
        fn = _segment(state.pending, act, self.layout, self.kind, mode)
        if self.stats is None:
            out = fn(state.base)
            if act is None:
                return out
            z, v = out
            self.record.append(v)
            return z
        v1 = v2 = None
        if act is not None:
            v1, v2 = next(self.stats[0]), next(self.stats[1])
        return fn(state.base, v1, v2)


def _out_hw(layer: Layer, hw: tuple[int, int] | None) -> tuple[int, int] | None:
    name, p = layer.name, layer.p
    if name in ("Flatten", "GlobalAvgPool"):
        return None
    if name in ("Conv", "AvgPool"):
        window = p["filter_shape"] if name == "Conv" else p["window_shape"]
        return tuple(spatial.pads(n, f, s, p["padding"]).out
                     for n, f, s in zip(hw, window, p["strides"], strict=True))  # fmt: skip
    return hw


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
        zs = [ctx.run(xi, None) for xi in x]
        return State(functools.reduce(jnp.add, zs), (), x[0].hw)
    if name in _ACTIVATIONS:
        return State(ctx.run(x, layer), (), x.hw)
    return State(x.base, x.pending + (Op(layer, x.hw),), _out_hw(layer, x.hw))


def _result(z: jax.Array, kind: str) -> jax.Array:
    if kind == "nngp":
        return jnp.real(z)
    return jnp.imag(z) if jnp.iscomplexobj(z) else jnp.zeros_like(z)


def run_network(spec: Layer, layout: str, kind: str, base: Inputs, hw: Any,
                stats: tuple[tuple, tuple] | None = None, self_mode: str = "batched",
                ) -> tuple[jax.Array, list]:  # fmt: skip
    """The network on ``base``: the cross pass when ``stats`` is given, else the self pass
    (base: one image with itself for the full layout, else a stack of images, each paired with
    itself). Returns (the kernel values, the recorded variance maps)."""
    ctx = Context(layout, kind, stats, self_mode)
    out = _apply(spec, State(base, (), hw), ctx)
    return _result(ctx.run(out, None), kind), ctx.record


class Compiled:
    """The self and cross passes of one spec for one sample shape, kind, dtype and budget."""

    def __init__(self, spec: Layer, sample_shape: tuple[int, ...], kind: str, dtype: str,
                 budget: int | None = None) -> None:  # fmt: skip
        check_kind_dtype(kind, dtype)
        self.a = analyse(spec, tuple(sample_shape))
        self.spec, self.kind, self.dtype, self.budget = spec, kind, np.dtype(dtype), budget
        self.hw = tuple(sample_shape[:2]) if self.a.layout != "dense" else None
        self._seen: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _shaped(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        return x.reshape((x.shape[0], *self.a.sample_shape))

    def self_pass(self, x: np.ndarray, chunk: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """x (n, *S) -> (variance maps, each (n, ...), diagonal K(x_i, x_i) (n,)).

        Remembered for the last few inputs (by content): the preconditioner's columns, the
        matrix-free products and predict meet the same blocks of X again and again."""
        key = (hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest(),
               x.shape, chunk)  # fmt: skip
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return self._seen[key]
        out = self._self_pass(x, chunk)
        with self._lock:
            self._seen[key] = out
            if len(self._seen) > _SELF_CACHE:
                self._seen.popitem(last=False)
        return out

    def _self_pass(self, x: np.ndarray, chunk: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        n = x.shape[0]
        stats, diag = None, np.empty(n, dtype=np.float64)
        with jax.enable_x64(True):
            for r0 in range(0, n, chunk):
                part = _pad_rows(x[r0 : r0 + chunk], chunk)
                d, vs = self._self_chunk(part)
                m = min(chunk, n - r0)
                if stats is None:
                    stats = [np.empty((n, *v.shape[1:]), dtype=self.dtype) for v in vs]
                for out, v in zip(stats, vs, strict=True):
                    out[r0 : r0 + m] = np.asarray(v)[:m]
                diag[r0 : r0 + m] = np.asarray(d)[:m]
        return tuple(stats or ()), diag

    def _self_chunk(self, part: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Images (c, *S) each paired with itself -> (K(x_i, x_i) (c,), variance maps)."""
        run = functools.partial(run_network, self.spec, self.a.layout, self.kind, hw=self.hw)
        if self.a.entries < _SINGLE_SELF_ENTRIES:
            d, vs = run(Inputs(part, part))
            return np.asarray(d).reshape(len(part)), vs
        run = functools.partial(run, self_mode="single")
        outs = [run(Inputs(part[k : k + 1], part[k : k + 1])) for k in range(len(part))]
        d = np.array([float(np.asarray(o[0]).reshape(())) for o in outs])
        vs = [np.concatenate([np.asarray(o[1][k]) for o in outs]) for k in range(len(outs[0][1]))]
        return d, vs

    def self_stats(self, x: Any) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """The self pass of x (n, *S) with the tile's chunking: pass it to :meth:`tile` to reuse
        it across tiles (the matrix-free operator multiplies by the same blocks every step)."""
        a = self._shaped(x)
        c1, c2 = chunk_shape(self.spec, self.a.sample_shape, self.kind, str(self.dtype),
                             len(a), len(a), self.budget)  # fmt: skip
        return self.self_pass(a, max(c1, c2))

    def tile(self, x1: Any, x2: Any = None, stats1: Any = None, stats2: Any = None) -> np.ndarray:
        """K(x1, x2) (n1, n2) float64 (computed in dtype); x2=None: the symmetric K(x1, x1)
        from the chunks on and above the diagonal, its diagonal from the self pass.
        stats1 / stats2: :meth:`self_stats` of x1 / x2, when already known."""
        a = self._shaped(x1)
        b = a if x2 is None else self._shaped(x2)
        n1, n2 = a.shape[0], b.shape[0]
        c1, c2 = chunk_shape(self.spec, self.a.sample_shape, self.kind, str(self.dtype), n1, n2,
                             self.budget)  # fmt: skip
        if x2 is None:
            c1 = c2 = min(c1, c2)
        s1, d1 = stats1 if stats1 is not None else self.self_pass(a, max(c1, c2))
        if x2 is None:
            s2 = s1
        else:
            s2 = (stats2 if stats2 is not None else self.self_pass(b, max(c1, c2)))[0]
        out = np.empty((n1, n2), dtype=np.float64)
        with jax.enable_x64(True):
            for r0 in range(0, n1, c1):
                for k0 in range(0, n2, c2):
                    if x2 is None and k0 + c2 <= r0:
                        continue
                    stats = (tuple(_pad_rows(s[r0 : r0 + c1], c1) for s in s1),
                             tuple(_pad_rows(s[k0 : k0 + c2], c2) for s in s2))  # fmt: skip
                    base = Inputs(_pad_rows(a[r0 : r0 + c1], c1), _pad_rows(b[k0 : k0 + c2], c2))
                    blk = run_network(self.spec, self.a.layout, self.kind, base, self.hw,
                                      stats)[0]  # fmt: skip
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
    return _compiled_network(spec, a.shape[1:], kind, dtype, budget).tile(a, b).astype(dtype)


def evaluate_diag(spec: Layer, x: Any, kind: str, dtype: str) -> np.ndarray:
    check_kind_dtype(kind, dtype)
    a = _samples(x, "x")
    return _compiled_network(spec, a.shape[1:], kind, dtype, None).diag(a).astype(dtype)


# -- a network bound to its input shape: what a store, an operator and a worker hold --------------
@dataclasses.dataclass(frozen=True)
class Network:
    """A stax network bound to the shape of one input: the spec the system carries.

    Stores, operators and workers see inputs as rows of a matrix (n, d), d = prod(sample_shape);
    a Network reshapes them to (n, *sample_shape) itself, so image data flows through every
    stage as a feature matrix would. Made by :func:`ntk_scale.kernels.bind`.
    """

    layer: Layer
    sample_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(int(v) for v in self.sample_shape)
        object.__setattr__(self, "sample_shape", shape)
        analyse(self.layer, shape)  # raises ValueError naming the expected input shape

    @property
    def d(self) -> int:
        return math.prod(self.sample_shape)

    def to_dict(self) -> dict[str, Any]:
        return {**self.layer.to_dict(), "sample_shape": list(self.sample_shape)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        payload = f"{self.to_json()}|stax-code-v{STAX_CODE_VERSION}"
        return hashlib.sha256(payload.encode()).hexdigest()

    def compiled(self, kind: str, dtype: str, budget: int | None = None) -> Compiled:
        return _compiled_network(self.layer, self.sample_shape, kind, dtype, budget)

    def rows(self, x: Any, name: str = "x") -> np.ndarray:
        """x as (n, *sample_shape): accepts (n, d) rows or (n, *sample_shape) samples."""
        arr = np.asarray(x)
        if arr.ndim == 2 and arr.shape[1] == self.d:
            return arr.reshape((arr.shape[0], *self.sample_shape))
        return _samples(arr, name, self.sample_shape)

    def kernel(self, x1: Any, x2: Any = None, kind: str = "ntk", dtype: str = "float32"):
        a = self.rows(x1, "x1")
        b = None if x2 is None else self.rows(x2, "x2")
        return self.compiled(kind, dtype).tile(a, b).astype(dtype)

    def diag(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> np.ndarray:
        return self.compiled(kind, dtype).diag(self.rows(x)).astype(dtype)


@functools.lru_cache(maxsize=32)
def _compiled_network(layer: Layer, shape: tuple[int, ...], kind: str, dtype: str,
                      budget: int | None) -> Compiled:  # fmt: skip
    return Compiled(layer, shape, kind, dtype, budget)


#: Floating-point operations per covariance entry, per layer kind (both nngp and ntk; an
#: activation's arc-cosine polynomial and square root, a tap of a filter or window).
_FLOPS = {"activation": 60, "tap": 4}


def pair_flops(layer: Layer, sample_shape: tuple[int, ...]) -> float:
    """Approximate floating-point operations one pair of inputs costs (for `plan`)."""
    a = analyse(layer, tuple(sample_shape))
    hw0 = tuple(sample_shape[:2]) if a.layout != "dense" else None
    total = [float(_entries(hw0, a.layout)) * (sample_shape[-1] * 2)]

    def walk(node: Layer, hw: Any) -> Any:
        if node.name == "serial":
            for child in node.layers:
                hw = walk(child, hw)
            return hw
        if node.name == "parallel":
            return [walk(c, h) for c, h in zip(node.layers, hw, strict=True)][0]
        if node.name == "FanOut":
            return [hw] * node.p["num"]
        if isinstance(hw, list):
            hw = hw[0]
        out = _out_hw(node, hw)
        e = float(_entries(out, a.layout if out is not None else "dense"))
        if node.name in _ACTIVATIONS:
            total.append(e * _FLOPS["activation"])
        elif node.name in ("Conv", "AvgPool"):
            window = node.p["filter_shape"] if node.name == "Conv" else node.p["window_shape"]
            total.append(e * _FLOPS["tap"] * window[0] * window[1])
        return out

    walk(layer, hw0)
    return sum(total)
