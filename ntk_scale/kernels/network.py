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
tensor; readouts reduce inside the chunk.

This module is the interpreter only: each layer's maps (cross pass, self pass) are its record's
(:mod:`ntk_scale.kernels.layers`), the tensor maps they use are :mod:`ntk_scale.kernels.spatial`'s,
and the layout, chunk sizes and costs come from :mod:`ntk_scale.kernels.shapes`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntk_scale.kernels import spatial
from ntk_scale.kernels.layers import Inputs, Op, input_distance, input_variance, rule_of
from ntk_scale.kernels.products import network_panel_function
from ntk_scale.kernels.protocol import KernelCost
from ntk_scale.kernels.shapes import (
    DEFAULT_KERNEL_MEMORY,
    Analysis,
    Shape,
    analyse,
    chunk_shape,
    float32_error,
    pair_bytes,
    pair_flops,
)
from ntk_scale.kernels.stax import STAX_CODE_VERSION, Layer, check_kind_dtype
from ntk_scale.kernels.timing import chunked_tile_seconds

#: Moved to :mod:`ntk_scale.kernels.shapes` and :mod:`ntk_scale.kernels.layers`; importable
#: from here as before.
__all__ = ["DEFAULT_KERNEL_MEMORY", "Analysis", "Compiled", "Inputs", "Network", "Op", "Shape",
           "analyse", "chunk_shape", "evaluate", "evaluate_diag", "pair_bytes", "pair_flops",
           "run_network"]  # fmt: skip

#: Covariance entries per pair from which the self pass takes one image per call (vmapped
#: loops over large tensors ran 2x slower; over small ones, per-image calls are dispatch-bound).
_SINGLE_SELF_ENTRIES = 1 << 16
#: Self passes remembered per compiled network (each a few variance maps per image).
_SELF_CACHE = 64


# -- one compiled segment: the pending linear layers' records, then an activation's ------------
def _linear(z: Any, op: Op, layout: str, ntk: bool, r1: tuple,
            r2: tuple | None) -> tuple[jax.Array, tuple]:  # fmt: skip
    """One linear layer on the carried array -> (z', the layer's record of side 1).

    r1, r2: the layer's records of each side, (input variance map, ...); r2 None in the self
    pass, which computes the rest of its own record."""
    return rule_of(op.layer).cross(z, op, layout, ntk, r1, r2)


def _next_variance(v: jax.Array, op: Op, rec: tuple) -> jax.Array:
    """The self pass's variance map after a linear layer (rec: that layer's record)."""
    return rule_of(op.layer).variance(v, op, rec)


def _activate(z: jax.Array, layer: Layer, v1: jax.Array, v2: jax.Array, layout: str):
    """An activation on D (+ iΘ): D' from its record's pair map, Θ' = ṡ·Θ."""
    dist, sdot = rule_of(layer).cross(jnp.real(z), v1, v2, layout, layer.p)
    return dist if not jnp.iscomplexobj(z) else jax.lax.complex(dist, jnp.imag(z) * sdot)


def _act_variance(v: jax.Array, layer: Layer) -> jax.Array:
    return rule_of(layer).variance(v, layer.p)


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
        return input_distance(z, layout) if isinstance(z, Inputs) else z

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
            v = input_variance(base.x1, layout)
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


def _apply(layer: Layer, x: Any, ctx: Context) -> Any:
    """The layer on State x (a tuple of States after a FanOut), by its record's kind."""
    rule = rule_of(layer)
    if rule.kind == "serial":
        for child in layer.layers:
            x = _apply(child, x, ctx)
        return x
    if rule.kind == "parallel":
        return tuple(_apply(c, xi, ctx) for c, xi in zip(layer.layers, x, strict=True))
    if rule.kind == "fan_out":
        return (x,) * layer.p["num"]
    if rule.kind == "fan_in":
        outs = [ctx.run(xi, None) for xi in x]
        v = None if outs[0][1] is None else functools.reduce(jnp.add, [o[1] for o in outs])
        return State(functools.reduce(jnp.add, [o[0] for o in outs]), (), x[0].hw, v)
    if rule.kind == "activation":
        return _activated(x, layer, ctx)
    return State(x.base, x.pending + (Op(layer, x.hw),), rule.out_hw(layer, x.hw), x.v)


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
                pair: bool = False) -> tuple[Any, list]:  # fmt: skip
    """The network on ``base``: the cross pass when ``stats`` (each side's list of segment
    records) is given, else the self pass (base: a stack of images, each paired with itself;
    one image for ``self_mode`` "single"). Returns (the kernel values, the records). pair (the
    cross pass of kind "ntk"): the values are (K, Θ), both from the one z = D + iΘ."""
    ctx = Context(layout, kind, stats, self_mode)
    out = _apply(spec, State(base, (), hw), ctx)
    z = ctx.run(out, None)[0]
    if stats is None and kind == "nngp":
        return ctx.last[0][-1][0], ctx.record  # the self pass's final variance: K(x, x)
    if pair:
        return (_result(z, "nngp", ctx.last), _result(z, "ntk", ctx.last)), ctx.record
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

    def tile(self, x1: Any, x2: Any = None, stats1: Any = None, stats2: Any = None,
             pair: bool = False) -> Any:  # fmt: skip
        """K(x1, x2) (n1, n2) float64 (computed in dtype); x2=None: the symmetric K(x1, x1)
        from the chunks on and above the diagonal, its diagonal from the self pass.
        stats1 / stats2: :meth:`self_stats` of x1 / x2, when already known. pair (kind "ntk"):
        (NNGP, NTK), both from the NTK's one pass (its real part carries the NNGP's D)."""
        if pair and self.kind != "ntk":
            raise ValueError(f"pair=True needs the NTK's pass (kind 'ntk'), not {self.kind!r}")
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
        outs = [np.empty((n1, n2), dtype=np.float64) for _ in range(1 + pair)]
        with jax.enable_x64(True):
            for r0 in range(0, n1, c1):
                for k0 in range(0, n2, c2):
                    if x2 is None and k0 + c2 <= r0:
                        continue
                    stats = (self._records(s1, r0, c1), self._records(s2, k0, c2))
                    base = Inputs(_pad_rows(a[r0 : r0 + c1], c1), _pad_rows(b[k0 : k0 + c2], c2))
                    blks = run_network(self.spec, self.a.layout, self.kind, base, self.hw,
                                       stats, pair=pair)[0]  # fmt: skip
                    for out, blk in zip(outs, blks if pair else (blks,), strict=True):
                        blk = np.asarray(blk)[: min(c1, n1 - r0), : min(c2, n2 - k0)]
                        out[r0 : r0 + blk.shape[0], k0 : k0 + blk.shape[1]] = blk
        if x2 is None:  # the diagonals of the self pass: NNGP's its final variance
            diags = (self._final_variance(s1, n1), d1) if pair else (d1,)
            for k, diag in enumerate(diags):
                outs[k] = np.triu(outs[k]) + np.triu(outs[k], 1).T
                outs[k][np.diag_indices(n1)] = diag
        return tuple(outs) if pair else outs[0]

    def _final_variance(self, leaves: tuple[np.ndarray, ...], n: int) -> np.ndarray:
        """K(x_i, x_i) (n,) float64: the last segment's final variance in a self pass's records
        (what the NNGP's own self pass returns as its diagonal)."""
        with jax.enable_x64(True):
            records = self._records(leaves, 0, n)
            return np.asarray(records[-1][-1][0], dtype=np.float64).reshape(n)

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

    def float32_relative_error(self, kind: str) -> float | None:
        return float32_error(self.layer, self.sample_shape, kind)

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

    def pair_tile_function(self, dtype: str = "float32", symmetric: bool = False):
        """(NNGP, NTK) tiles from the NTK's one pass: its z = D + iΘ carries the NNGP's D, and
        its self pass the final variances (the "ntk" posterior's two stores, issue N)."""
        compiled = self.compiled("ntk", dtype)

        def both(x1, x2):
            pair = compiled.tile(self.rows(x1), None if symmetric else self.rows(x2), pair=True)
            return tuple(v.astype(dtype) for v in pair)

        return both

    def diag_function(self, kind: str = "ntk", dtype: str = "float32"):
        compiled = self.compiled(kind, dtype)
        return lambda x: compiled.diag(self.rows(x)).astype(dtype)

    def panel_function(self, kind: str = "ntk", dtype: str = "float32", n_rows: int | None = None):
        return network_panel_function(self, kind, dtype, n_rows)

    def self_stats(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> Any:
        return self.compiled(kind, dtype).self_stats(self.rows(x))

    def tile_chunk(self, kind: str, dtype: str, n1: int, n2: int) -> tuple[int, int]:
        return chunk_shape(self.layer, self.sample_shape, kind, dtype, n1, n2)

    def cost(self, d: int, kind: str, dtype: str, t: int) -> Any:
        """Pairs in chunks within the kernel memory budget (:data:`DEFAULT_KERNEL_MEMORY`)."""
        c1, c2 = self.tile_chunk(kind, dtype, t, t)
        memory = c1 * c2 * pair_bytes(self.layer, self.sample_shape, kind, dtype)
        item = np.dtype(dtype).itemsize
        flops = pair_flops(self.layer, self.sample_shape)
        return KernelCost(flops, memory + 3 * t * d * item, (c1, c2))

    def tile_seconds(self, kind: str, dtype: str, x1: Any, x2: Any) -> tuple[float, float]:
        return chunked_tile_seconds(self, kind, dtype, x1, x2)


@functools.lru_cache(maxsize=32)
def _compiled_network(layer: Layer, shape: tuple[int, ...], kind: str, dtype: str,
                      budget: int | None) -> Compiled:  # fmt: skip
    return Compiled(layer, shape, kind, dtype, budget)
