"""Evaluating a stax spec: the layer tree interpreted on pair tensors, in chunks of pairs.

A tile K(x1, x2) of n1 x n2 pairs is computed as

1. the **self pass**, once per image of each side (not per pair): the image paired with itself
   through the whole network, carrying its per-position variance map v and recording, per
   segment, what the cross pass needs of each image: v at the input of every linear layer and
   activation, each pooling layer's own pooled distance g (and the diagonal K(x_i, x_i));
2. the **cross pass**, chunk by chunk: c1 x c2 pairs at a time, the chunk sized so that its
   tensors fit a memory budget (:func:`chunk_shape`). A diagonal tile computes only the chunks
   on and above its diagonal and mirrors them.

The tensors hold the pair distance D = E(z1 − z2)² (and Θ for the NTK), not the covariance
K = (v1 + v2 − D)/2: in float32 the covariance form cancels for inputs far from the origin or
close together (θ = arccos(K/√(v1 v2)) lost half its digits: 5e-5 of the diagonal on clustered
images), while every layer maps D without cancellation and the activations take 1 − cos θ from
it. Θ' = W²Θ + K' at each weighted layer, from D' and the recorded variances.

The per-pair work is the minimum the layers need: a network without pooling keeps only
same-position entries (``diag`` layout, O(HW) per pair) and its first convolution is one
centred matmul of image patches; all taps of a filter are summed in one pass over the padded
tensor; readouts reduce inside the chunk. The maps themselves live in
:mod:`ntk_scale.kernels.spatial`.
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
# A chunk's tensors carry the pair distance D = E(z1 − z2)² in place of the covariance
# K = (v1 + v2 − D)/2 (v1, v2 the per-position variances of each side, from the self pass):
# every layer maps D without the cancellation that costs float32 its digits when inputs are far
# from the origin or close together, and the activations take 1 − cos θ from D. They travel as
# one array: real D for kind="nngp" (and before the first weighted layer), complex D + i·Θ for
# kind="ntk", so every linear map acts on both at once and θ is evaluated once per entry.
class Inputs(NamedTuple):
    """The input layer, not yet materialised: x1 (c1, H, W, C) / (c1, d), x2 likewise."""

    x1: jax.Array
    x2: jax.Array


class Op(NamedTuple):
    """A linear layer with the positions (H, W) of its input (None: a vector)."""

    layer: Layer
    hw: tuple[int, int] | None


#: Channels up to which the input distance of a full-layout tensor is summed from differences
#: (exact) rather than from a centred product.
_DIRECT_CHANNELS = 8


def _input_variance(x: jax.Array, layout: str) -> jax.Array:
    """Per-position input variances Σ_ch x² / C: (c, H, W), or (c,) for vectors."""
    if layout == "dense":
        return jnp.sum(x * x, axis=1) / x.shape[1]
    return jnp.sum(x * x, axis=3) / x.shape[3]


def _centred_distance(a: jax.Array, b: jax.Array, sub: str, k: int) -> jax.Array:
    """Σ (a − b)² / k over the last axis from a product: |a|² + |b|² − 2 a·b, both sides centred
    on the mean of ``a`` over its first axis (the distance does not change; the rounding then
    scales with the spread of the chunk, not with the distance from the origin)."""
    m = jnp.mean(a, axis=0, keepdims=True)
    a, b = a - m, b - m
    na, nb = jnp.sum(a * a, axis=-1), jnp.sum(b * b, axis=-1)
    ab = jnp.einsum(sub, a, b, precision=_HIGHEST)
    if sub == "ahwk,bhwk->abhw":
        return jnp.maximum(na[:, None] + nb[None, :] - 2 * ab, 0.0) / k
    return jnp.maximum(na[:, None] + nb[None, :] - 2 * ab, 0.0) / k  # dense (c1, c2)


def _input_distance(inp: Inputs, layout: str) -> jax.Array:
    x1, x2 = inp.x1, inp.x2
    if layout == "dense":
        return _centred_distance(x1, x2, "ak,bk->ab", x1.shape[1])
    ch = x1.shape[3]
    if layout == "diag":
        return _centred_distance(x1, x2, "ahwk,bhwk->abhw", ch)
    if ch <= _DIRECT_CHANNELS:
        # One fused loop over the pair tensor per channel (a reduction over a minor axis of
        # size C measured several times slower).
        total = None
        for k in range(ch):
            diff = x1[:, :, :, None, None, None, k] - x2[None, None, None, :, :, :, k]
            total = diff * diff if total is None else total + diff * diff
        return total / ch
    # One common centre for all positions: the mean pixel of the chunk's x1.
    m = jnp.mean(x1, axis=(0, 1, 2), keepdims=True)
    a, b = x1 - m, x2 - m
    na, nb = jnp.sum(a * a, axis=-1), jnp.sum(b * b, axis=-1)
    ab = jnp.einsum("ahwc,bgvc->ahwbgv", a, b, precision=_HIGHEST)
    return jnp.maximum(spatial.outer_sum(na, nb, "full") - 2 * ab, 0.0) / ch


def _patches(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    """x (c, H, W, C) -> (c, Ho, Wo, fh·fw·C): every filter window, padded like the conv."""
    (fh, fw), (sh, sw) = p["filter_shape"], p["strides"]
    for axis, size, f, s in ((1, x.shape[1], fh, sh), (2, x.shape[2], fw, sw)):
        pd = spatial.pads(size, f, s, p["padding"])
        x = spatial._pad(x, (axis,), pd)
        x = jnp.stack([spatial._window_slice(x, (axis,), (k,), s, pd.out) for k in range(f)], -1)
        x = x.reshape(x.shape[:-2] + (-1,))
    return x


def _weights(z: jax.Array, p: dict[str, Any], ntk: bool, v1: Any, v2: Any,
             layout: str) -> jax.Array:  # fmt: skip
    """After the spatial map: D' = W²·D (the bias cancels), Θ' = W²·Θ + K', where
    K' = (v1' + v2' − D')/2 from the output variances v1', v2'."""
    w_var = p["W_std"] ** 2
    dist = w_var * jnp.real(z)
    if not ntk:
        return dist
    cov = (spatial.outer_sum(v1, v2, layout) - dist) * 0.5
    theta = cov if not jnp.iscomplexobj(z) else w_var * jnp.imag(z) + cov
    return jax.lax.complex(dist, theta)


def _weighted_variance(v: jax.Array, op: Op) -> jax.Array:
    """A Conv's or Dense's map of per-position variances: W²·S(v) + b²."""
    p = op.layer.p
    if op.layer.name == "Conv":
        v = spatial.conv_map(v, op.hw, p["filter_shape"], p["strides"], p["padding"])
    return p["W_std"] ** 2 * v + (p["b_std"] or 0.0) ** 2


def _pool_args(p: dict[str, Any], hw: tuple[int, int]) -> tuple:
    return (hw, p["window_shape"], p["strides"], p["padding"], p["normalize_edges"])


def _pool_variance(v: jax.Array, op: Op, rec: tuple) -> jax.Array:
    """v'[P] = s_P·(w·v)[P] − g[P]: the pooled self-covariance at equal positions."""
    args = _pool_args(op.layer.p, op.hw)
    sums = spatial.pool_map(jnp.ones((1, *op.hw), v.dtype), *args)
    return sums * spatial.pool_map(v, *args) - rec[1]


def _next_variance(v: jax.Array, op: Op, rec: tuple) -> jax.Array:
    """The self pass's variance map after a linear layer (rec: that layer's record)."""
    if op.hw is None and op.layer.name in _READOUTS:  # a readout of a vector is the identity
        return v
    return _RULES[op.layer.name].variance(v, op, rec)


def _conv_first(inp: Inputs, p: dict[str, Any]) -> jax.Array:
    """The first convolution on the raw input (diag layout), before its weights: the distance
    of every pair of filter windows, from one centred matmul of patches."""
    p1, p2 = _patches(inp.x1, p), _patches(inp.x2, p)
    return _centred_distance(p1, p2, "ahwk,bhwk->abhw", p1.shape[-1])


def _pool(z: jax.Array, op: Op, r1: tuple, r2: tuple | None) -> tuple[jax.Array, tuple]:
    """AvgPool on D (+ iΘ) -> (z', record). With window weights w (sums s_P):
    D'[P1, P2] = L(D12) − g1[P1] − g2[P2] + (s_P1 − s_P2)(w·v1[P1] − w·v2[P2]), where
    g[P] = ½ L(D11)[P, P] is each image's own pooled distance at equal positions (the self pass
    computes it, r2 None, and records it)."""
    args = _pool_args(op.layer.p, op.hw)
    pooled = spatial.avg_pool(z, *args)[0]
    if r2 is None:
        g = 0.5 * spatial.same_position(jnp.real(pooled))[:, 0]
        r1 = r2 = (r1[0], g)
    corr = -spatial.outer_sum(r1[1], r2[1], "full")
    if spatial.pool_weights_vary(*args):
        sums = spatial.pool_map(jnp.ones((1, *op.hw), z.real.dtype), *args)
        w1, w2 = spatial.pool_map(r1[0], *args), spatial.pool_map(r2[0], *args)
        corr = corr + (spatial.outer_sum(sums, -sums, "full")
                       * spatial.outer_sum(w1, -w2, "full"))  # fmt: skip
    return pooled + corr, r1


def _global_pool(z: jax.Array, r1: tuple, r2: tuple | None) -> tuple[jax.Array, tuple]:
    """GlobalAvgPool on D (+ iΘ): the mean over all position pairs minus each image's
    G = ½ mean(D11) (recorded by the self pass)."""
    pooled = spatial.global_mean(z)
    if r2 is None:
        r1 = r2 = (r1[0], 0.5 * jnp.real(pooled)[:, 0])
    return pooled - spatial.outer_sum(r1[1], r2[1], "dense"), r1


def _conv_rule(z: Any, op: Op, layout: str, ntk: bool, r1: tuple, r2: tuple | None):
    p = op.layer.p
    v1 = _weighted_variance(r1[0], op)
    v2 = v1 if r2 is None else _weighted_variance(r2[0], op)
    if isinstance(z, Inputs):
        if layout == "diag":
            return _weights(_conv_first(z, p), p, ntk, v1, v2, layout), r1
        z = _input_distance(z, layout)
    args = (op.hw, p["filter_shape"], p["strides"], p["padding"])
    z = spatial.conv(z, layout, *args, edges=(r1[0], (r1 if r2 is None else r2)[0]))[0]
    return _weights(z, p, ntk, v1, v2, layout), r1


def _dense_rule(z: Any, op: Op, layout: str, ntk: bool, r1: tuple, r2: tuple | None):
    v1 = _weighted_variance(r1[0], op)
    v2 = v1 if r2 is None else _weighted_variance(r2[0], op)
    layout = layout if op.hw is not None else "dense"
    return _weights(_materialise(z, layout), op.layer.p, ntk, v1, v2, layout), r1


def _materialise(z: Any, layout: str) -> jax.Array:
    return _input_distance(z, layout) if isinstance(z, Inputs) else z


class Rule(NamedTuple):
    """What a linear layer owns: its map of the carried array (z, op, layout, ntk, r1, r2) ->
    (z', record), its map of the self pass's variances (v, op, record) -> v', and the taps
    per output entry its map costs (for :func:`pair_flops`)."""

    cross: Callable
    variance: Callable
    taps: Callable = lambda p: 0


_RULES = {
    "Conv": Rule(_conv_rule, lambda v, op, rec: _weighted_variance(v, op),
                 lambda p: p["filter_shape"][0] * p["filter_shape"][1]),
    "Dense": Rule(_dense_rule, lambda v, op, rec: _weighted_variance(v, op)),
    "AvgPool": Rule(lambda z, op, lay, ntk, r1, r2: _pool(_materialise(z, lay), op, r1, r2),
                    _pool_variance, lambda p: p["window_shape"][0] * p["window_shape"][1]),
    "GlobalAvgPool": Rule(lambda z, op, lay, ntk, r1, r2: _global_pool(_materialise(z, lay), r1,
                                                                       r2),
                          lambda v, op, rec: jnp.mean(v, axis=(1, 2)) - rec[1]),
    "Flatten": Rule(lambda z, op, lay, ntk, r1, r2: (spatial.flatten(_materialise(z, lay), lay),
                                                     r1),
                    lambda v, op, rec: jnp.mean(v, axis=(1, 2))),
    "Identity": Rule(lambda z, op, lay, ntk, r1, r2: (_materialise(z, lay), r1),
                     lambda v, op, rec: v),
}  # fmt: skip
#: Layers that map an image to a vector, and a vector to itself.
_READOUTS = ("Flatten", "GlobalAvgPool")


def _linear(z: Any, op: Op, layout: str, ntk: bool, r1: tuple,
            r2: tuple | None) -> tuple[jax.Array, tuple]:  # fmt: skip
    """One linear layer on the carried array -> (z', the layer's record of side 1).

    r1, r2: the layer's records of each side, (input variance map, ...); r2 None in the self
    pass, which computes the rest of its own record."""
    if op.hw is None and op.layer.name in _READOUTS:
        return _materialise(z, layout), r1
    return _RULES[op.layer.name].cross(z, op, layout, ntk, r1, r2)


def _act_args(layer: Layer) -> tuple[str, tuple[float, ...]]:
    name, p = layer.name, layer.p
    if name == "Erf":
        return "Erf", (p["a"], p["b"], p["c"])
    if name == "LeakyRelu":
        return "ABRelu", (p["alpha"], 1.0)
    return "ABRelu", {"Relu": (0.0, 1.0), "Abs": (-1.0, 1.0)}.get(name, (p.get("a"), p.get("b")))


def _activate(z: jax.Array, layer: Layer, v1: jax.Array, v2: jax.Array, layout: str):
    kind, args = _act_args(layer)
    fn = spatial.erf_dist if kind == "Erf" else spatial.abrelu_dist
    dist, sdot = fn(jnp.real(z), v1, v2, layout, *args)
    return dist if not jnp.iscomplexobj(z) else jax.lax.complex(dist, jnp.imag(z) * sdot)


def _act_variance(v: jax.Array, layer: Layer) -> jax.Array:
    kind, args = _act_args(layer)
    if kind == "Erf":
        return spatial.erf_variance(v, *args)
    a, b = args
    return (a * a + b * b) / 2 * v


@functools.lru_cache(maxsize=512)
def _segment(ops: tuple[Op, ...], act: Layer | None, layout: str, kind: str, self_pass: str):
    """One compiled segment: the pending linear layers, then (optionally) an activation.

    self_pass "": the cross pass, f(base, rec1, rec2) -> z, rec the segment's records of each
    side. "batched" (vmapped over images) or "single" (one image per call): f(base, v) ->
    (z, v', rec), v the variance map at the segment's start (None on the input layer).
    base: Inputs or the carried array. A record holds one tuple per linear layer, then
    (the variance map at the segment's end,)."""
    ntk = kind == "ntk"

    def finish(z):
        return _input_distance(z, layout) if isinstance(z, Inputs) else z

    def cross(base, rec1, rec2):
        z = base
        for op, r1, r2 in zip(ops, rec1, rec2, strict=False):
            z = _linear(z, op, layout, ntk, r1, r2)[0]
        z = finish(z)
        if act is None:
            return z
        return _activate(z, act, rec1[-1][0], rec2[-1][0], layout)

    if not self_pass:
        return jax.jit(cross)

    def one(base, v):
        if v is None:
            v = _input_variance(base.x1, layout)
        z, recs = base, []
        for op in ops:
            z, rec = _linear(z, op, layout, ntk, (v,), None)
            recs.append(rec)
            v = _next_variance(v, op, rec)
        z = finish(z)
        recs.append((v,))
        if act is not None:
            z = _activate(z, act, v, v, layout)
            v = _act_variance(v, act)
        return z, v, tuple(recs)

    if self_pass == "single":
        return jax.jit(one)

    def batched(base, v):
        if isinstance(base, Inputs):
            base = Inputs(base.x1[:, None], base.x2[:, None])
        else:
            base = base[:, None]
        if v is None:
            out = jax.vmap(lambda b: one(b, None))(base)
        else:
            out = jax.vmap(one)(base, v[:, None])
        return jax.tree_util.tree_map(lambda a: a[:, 0], out)

    return jax.jit(batched)


# -- the interpreter: the layer tree walked in Python, one compiled segment per activation -----
class State(NamedTuple):
    """base: Inputs or a materialised array; pending: linear layers not yet run; v: the self
    pass's variance map at base (None in the cross pass, and on the input layer)."""

    base: Any
    pending: tuple[Op, ...]
    hw: tuple[int, int] | None
    v: Any = None


class Context:
    """Self pass (``stats`` None): records each segment's maps. Cross pass: reads the recorded
    maps of both sides in the same (pre-order) sequence."""

    def __init__(self, layout: str, kind: str, stats: tuple[list, list] | None = None,
                 self_mode: str = "batched") -> None:  # fmt: skip
        self.layout, self.kind, self.self_mode = layout, kind, self_mode
        self.stats = None if stats is None else (iter(stats[0]), iter(stats[1]))
        self.record: list[tuple] = []
        self.last: tuple = ()

    def run(self, state: State, act: Layer | None) -> tuple[jax.Array, Any]:
        mode = self.self_mode if self.stats is None else ""
        fn = _segment(state.pending, act, self.layout, self.kind, mode)
        if self.stats is None:
            z, v, rec = fn(state.base, state.v)
            self.record.append(rec)
            self.last = (rec, rec)
            return z, v
        rec1, rec2 = next(self.stats[0]), next(self.stats[1])
        self.last = (rec1, rec2)
        return fn(state.base, rec1, rec2), None


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
    name = layer.name
    if name == "serial":
        for child in layer.layers:
            x = _apply(child, x, ctx)
        return x
    if name == "parallel":
        return tuple(_apply(c, xi, ctx) for c, xi in zip(layer.layers, x, strict=True))
    if name == "FanOut":
        return (x,) * layer.p["num"]
    if name == "FanInSum":
        outs = [ctx.run(xi, None) for xi in x]
        v = None if outs[0][1] is None else functools.reduce(jnp.add, [o[1] for o in outs])
        return State(functools.reduce(jnp.add, [o[0] for o in outs]), (), x[0].hw, v)
    if name in _ACTIVATIONS:
        return _activated(x, layer, ctx)
    return State(x.base, x.pending + (Op(layer, x.hw),), _out_hw(layer, x.hw), x.v)


def _activated(x: State, layer: Layer, ctx: Context) -> State:
    z, v = ctx.run(x, layer)
    return State(z, (), x.hw, v)


def _result(z: jax.Array, kind: str, ends: tuple) -> jax.Array:
    """The kernel from the last segment's output: Θ, or K = (v1 + v2 − D)/2 from the final
    variances of each side (ends: the last records of both sides)."""
    if kind == "ntk":
        return jnp.imag(z) if jnp.iscomplexobj(z) else jnp.zeros_like(z)
    v1, v2 = ends[0][-1][0], ends[1][-1][0]
    return (spatial.outer_sum(v1, v2, "dense") - jnp.real(z)) * 0.5


def run_network(spec: Layer, layout: str, kind: str, base: Inputs, hw: Any,
                stats: tuple[list, list] | None = None, self_mode: str = "batched",
                ) -> tuple[jax.Array, list]:  # fmt: skip
    """The network on ``base``: the cross pass when ``stats`` (each side's list of segment
    records) is given, else the self pass (base: a stack of images, each paired with itself;
    one image for ``self_mode`` "single"). Returns (the kernel values, the records)."""
    ctx = Context(layout, kind, stats, self_mode)
    out = _apply(spec, State(base, (), hw), ctx)
    z = ctx.run(out, None)[0]
    if stats is None and kind == "nngp":
        return ctx.last[0][-1][0], ctx.record  # the self pass's final variance: K(x, x)
    return _result(z, kind, ctx.last), ctx.record


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
        """Images (c, *S) each paired with itself -> (K(x_i, x_i) (c,), the records' leaves,
        each (c, ...); their structure is kept in ``self._treedef``)."""
        run = functools.partial(run_network, self.spec, self.a.layout, self.kind, hw=self.hw)
        if self.a.entries < _SINGLE_SELF_ENTRIES:
            d, recs = run(Inputs(part, part))
            leaves, self._treedef = jax.tree_util.tree_flatten(recs)
            return np.asarray(d).reshape(len(part)), leaves
        run = functools.partial(run, self_mode="single")
        outs = [run(Inputs(part[k : k + 1], part[k : k + 1])) for k in range(len(part))]
        d = np.array([float(np.asarray(o[0]).reshape(())) for o in outs])
        flat = [jax.tree_util.tree_flatten(o[1]) for o in outs]
        self._treedef = flat[0][1]
        vs = [np.concatenate([np.asarray(f[0][k]) for f in flat]) for k in range(len(flat[0][0]))]
        return d, vs

    def _records(self, leaves: tuple[np.ndarray, ...], r0: int, rows: int) -> list:
        """Rows r0 : r0 + rows of the self pass's leaves, padded, as the segment records."""
        if not hasattr(self, "_treedef"):  # leaves made by another process: learn the shape
            self._self_chunk(np.ones((1, *self.a.sample_shape), dtype=self.dtype))
        part = [jnp.asarray(_pad_rows(s[r0 : r0 + rows], rows)) for s in leaves]
        return jax.tree_util.tree_unflatten(self._treedef, part)

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
                    stats = (self._records(s1, r0, c1), self._records(s2, k0, c2))
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
            arr = arr.reshape((arr.shape[0], *self.sample_shape))
        return _samples(arr, name, self.sample_shape)  # validated: real, finite, this shape

    def kernel(self, x1: Any, x2: Any = None, kind: str = "ntk", dtype: str = "float32"):
        a = self.rows(x1, "x1")
        b = None if x2 is None else self.rows(x2, "x2")
        return self.compiled(kind, dtype).tile(a, b).astype(dtype)

    def diag(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> np.ndarray:
        return self.compiled(kind, dtype).diag(self.rows(x)).astype(dtype)

    # -- the kernel protocol (ntk_scale.kernels.protocol.Kernel) ------------------------------
    @property
    def fixed_shape(self) -> bool:
        """False: tiles are computed in chunks of pairs, and a padding row costs a real one."""
        return False

    def check_input(self, sample_shape: tuple[int, ...], name: str = "x") -> None:
        shape = tuple(int(v) for v in sample_shape)
        if shape != self.sample_shape and shape != (self.d,):
            feats = f"{shape[0]} features per row" if len(shape) == 1 else f"samples of {shape}"
            raise ValueError(
                f"{name} has {feats}; the kernel takes samples of shape {self.sample_shape} = "
                f"{self.d} features: pass {name}.reshape(n, -1) or (n, *{self.sample_shape})"
            )

    def pad_block(self, x: np.ndarray, rows: int) -> np.ndarray:
        return x

    def tile_function(self, kind: str = "ntk", dtype: str = "float32", symmetric: bool = False):
        compiled = self.compiled(kind, dtype)
        if symmetric:
            return lambda x1, x2: compiled.tile(self.rows(x1)).astype(dtype)
        return lambda x1, x2: compiled.tile(self.rows(x1), self.rows(x2)).astype(dtype)

    def diag_function(self, kind: str = "ntk", dtype: str = "float32"):
        compiled = self.compiled(kind, dtype)
        return lambda x: compiled.diag(self.rows(x)).astype(dtype)

    def panel_function(self, kind: str = "ntk", dtype: str = "float32", n_rows: int | None = None):
        from ntk_scale.kernels.products import network_panel_function

        return network_panel_function(self, kind, dtype, n_rows)

    def self_stats(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> Any:
        return self.compiled(kind, dtype).self_stats(self.rows(x))

    def tile_chunk(self, kind: str, dtype: str, n1: int, n2: int) -> tuple[int, int]:
        return chunk_shape(self.layer, self.sample_shape, kind, dtype, n1, n2)

    def cost(self, d: int, kind: str, dtype: str, t: int) -> Any:
        """Pairs in chunks within the kernel memory budget (:data:`DEFAULT_KERNEL_MEMORY`)."""
        from ntk_scale.kernels.protocol import KernelCost

        c1, c2 = self.tile_chunk(kind, dtype, t, t)
        memory = c1 * c2 * pair_bytes(self.layer, self.sample_shape, kind, dtype)
        item = np.dtype(dtype).itemsize
        flops = pair_flops(self.layer, self.sample_shape)
        return KernelCost(flops, memory + 3 * t * d * item, (c1, c2))

    def tile_seconds(self, kind: str, dtype: str, x1: Any, x2: Any) -> tuple[float, float]:
        from ntk_scale.kernels.timing import chunked_tile_seconds

        return chunked_tile_seconds(self, kind, dtype, x1, x2)


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
        elif node.name in _RULES:
            total.append(e * _FLOPS["tap"] * _RULES[node.name].taps(node.p))
        return out

    walk(layer, hw0)
    return sum(total)
