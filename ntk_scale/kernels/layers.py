"""Each stax layer type as one record that owns its rules: :class:`LayerRule`, in :data:`RULES`.

A record says everything the package needs to know of a layer: its constructor (validation,
parameters, defaults; also its JSON's ``from_dict``), its JSON, its output shape, its map of the
carried pair array in the cross pass, its map of the self pass's per-position variances, and the
floating-point operations per covariance entry it costs (``plan``). Shape analysis
(:mod:`ntk_scale.kernels.shapes`) and the interpreter (:mod:`ntk_scale.kernels.network`) look a
layer up here and never dispatch on its name, so a layer type is added by adding one record
(:func:`register`) plus its Neural Tangents fixture in the tests.

Kinds: ``linear`` layers are composed into the pending maps of a segment; an ``activation``
ends a segment; ``serial``, ``parallel``, ``fan_out`` and ``fan_in`` are structure the
interpreter walks itself (their shape rules live here all the same).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ntk_scale.kernels import precision, spatial, stax
from ntk_scale.kernels.stax import Layer

_HIGHEST = jax.lax.Precision.HIGHEST
#: Floating-point operations per covariance entry (both nngp and ntk): an activation's
#: arc-cosine polynomial and square root; one tap of a filter or window.
ACTIVATION_FLOPS = 60
TAP_FLOPS = 4
KINDS = ("linear", "activation", "serial", "parallel", "fan_out", "fan_in")


class Shape(NamedTuple):
    """What flows between layers at infinite width: (H, W) positions, or None when dense."""

    hw: tuple[int, int] | None


def branches(shape: Any) -> bool:
    """Whether ``shape`` is a tuple of branch Shapes (after a FanOut) rather than one Shape."""
    return isinstance(shape, tuple) and not isinstance(shape, Shape)


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


def input_variance(x: jax.Array, layout: str) -> jax.Array:
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


def input_distance(inp: Inputs, layout: str) -> jax.Array:
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


def _weighted_variance(v: jax.Array, p: dict[str, Any]) -> jax.Array:
    """A weighted layer's map of per-position variances after its spatial map S: W²·S(v) + b²."""
    return p["W_std"] ** 2 * v + (p["b_std"] or 0.0) ** 2


def _conv_variance(v: jax.Array, op: Op, rec: tuple = ()) -> jax.Array:
    p = op.layer.p
    v = spatial.conv_map(v, op.hw, p["filter_shape"], p["strides"], p["padding"])
    return _weighted_variance(v, p)


def _dense_variance(v: jax.Array, op: Op, rec: tuple = ()) -> jax.Array:
    return _weighted_variance(v, op.layer.p)


def _pool_args(p: dict[str, Any], hw: tuple[int, int]) -> tuple:
    return (hw, p["window_shape"], p["strides"], p["padding"], p["normalize_edges"])


def _pool_variance(v: jax.Array, op: Op, rec: tuple) -> jax.Array:
    """v'[P] = s_P·(w·v)[P] − g[P]: the pooled self-covariance at equal positions."""
    args = _pool_args(op.layer.p, op.hw)
    sums = spatial.pool_map(jnp.ones((1, *op.hw), v.dtype), *args)
    return sums * spatial.pool_map(v, *args) - rec[1]


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
    v1 = _conv_variance(r1[0], op)
    v2 = v1 if r2 is None else _conv_variance(r2[0], op)
    if isinstance(z, Inputs):
        if layout == "diag":
            return _weights(_conv_first(z, p), p, ntk, v1, v2, layout), r1
        z = input_distance(z, layout)
    args = (op.hw, p["filter_shape"], p["strides"], p["padding"])
    z = spatial.conv(z, layout, *args, edges=(r1[0], (r1 if r2 is None else r2)[0]))[0]
    return _weights(z, p, ntk, v1, v2, layout), r1


def _dense_rule(z: Any, op: Op, layout: str, ntk: bool, r1: tuple, r2: tuple | None):
    v1 = _dense_variance(r1[0], op)
    v2 = v1 if r2 is None else _dense_variance(r2[0], op)
    layout = layout if op.hw is not None else "dense"
    return _weights(materialise(z, layout), op.layer.p, ntk, v1, v2, layout), r1


def materialise(z: Any, layout: str) -> jax.Array:
    return input_distance(z, layout) if isinstance(z, Inputs) else z


# -- activations: the pair map on distances (D, v1, v2, layout, p) -> (D', ṡ) and the variance ----
def _abrelu(ab: Callable[[dict[str, Any]], tuple[float, float]]) -> tuple[Callable, Callable]:
    """The cross and variance rules of a·min(x, 0) + b·max(x, 0), with (a, b) = ab(params)."""

    def cross(dist: jax.Array, v1: jax.Array, v2: jax.Array, layout: str, p: dict[str, Any]):
        return spatial.abrelu_dist(dist, v1, v2, layout, *ab(p))

    def variance(v: jax.Array, p: dict[str, Any]) -> jax.Array:
        a, b = ab(p)
        return (a * a + b * b) / 2 * v

    return cross, variance


def _erf_cross(dist: jax.Array, v1: jax.Array, v2: jax.Array, layout: str, p: dict[str, Any]):
    return spatial.erf_dist(dist, v1, v2, layout, p["a"], p["b"], p["c"])


def _erf_variance(v: jax.Array, p: dict[str, Any]) -> jax.Array:
    return spatial.erf_variance(v, p["a"], p["b"], p["c"])


# -- shape rules ---------------------------------------------------------------------------------
def _keep_hw(layer: Layer, hw: Any) -> Any:
    return hw


def _window_hw(key: str) -> Callable:
    """The output positions of a Conv (key filter_shape) or AvgPool (window_shape)."""

    def out_hw(layer: Layer, hw: Any) -> tuple[int, int]:
        if hw is None:
            raise ValueError(f"stax.{layer.name} needs images (n, H, W, C), but its input is a "
                             "vector; remove the Flatten / GlobalAvgPool before it")  # fmt: skip
        p = layer.p
        return tuple(spatial.pads(n, f, s, p["padding"]).out
                     for n, f, s in zip(hw, p[key], p["strides"], strict=True))  # fmt: skip

    return out_hw


def _flatten_hw(layer: Layer, hw: Any) -> None:
    return None


def _global_pool_hw(layer: Layer, hw: Any) -> None:
    if hw is None:
        raise ValueError("stax.GlobalAvgPool needs images (n, H, W, C); its input is a vector")
    return None


def _leaf_shape(out_hw: Callable) -> Callable:
    """A one-input layer's shape rule (layer, shape, walk) -> Shape from its out_hw."""

    def out_shape(layer: Layer, shape: Any, walk: Callable) -> Shape:
        if branches(shape):
            raise ValueError(f"stax.{layer.name} got {len(shape)} branches; join them with "
                             "stax.FanInSum() or apply stax.parallel(...)")  # fmt: skip
        return Shape(out_hw(layer, shape.hw))

    return out_shape


def _serial_shape(layer: Layer, shape: Any, walk: Callable) -> Any:
    for child in layer.layers:
        shape = walk(child, shape)
    return shape


def _parallel_shape(layer: Layer, shape: Any, walk: Callable) -> tuple:
    n = len(layer.layers)
    if not branches(shape) or len(shape) != n:
        got = len(shape) if branches(shape) else 1
        raise ValueError(f"stax.parallel of {n} layers got {got} branch(es); "
                         f"put stax.FanOut({n}) before it")  # fmt: skip
    return tuple(walk(c, s) for c, s in zip(layer.layers, shape, strict=True))


def _fan_out_shape(layer: Layer, shape: Any, walk: Callable) -> tuple:
    _leaf_shape(_keep_hw)(layer, shape, walk)  # one input, not branches
    return (shape,) * layer.p["num"]


def _fan_in_shape(layer: Layer, shape: Any, walk: Callable) -> Shape:
    if not branches(shape):
        raise ValueError("stax.FanInSum needs branches: put stax.FanOut(n) and stax.parallel "
                         "before it")  # fmt: skip
    if len(set(shape)) != 1:
        raise ValueError(f"stax.FanInSum: branch shapes differ {[s.hw for s in shape]}; "
                         "every branch must end at the same spatial size")  # fmt: skip
    return shape[0]


# -- JSON ----------------------------------------------------------------------------------------
def args_to_dict(layer: Layer) -> dict[str, Any]:
    """{"layer": name, **args} with sequences as lists (the canonical JSON of a leaf layer)."""
    d: dict[str, Any] = {"layer": layer.name}
    for k, v in layer.args:
        d[k] = list(v) if isinstance(v, tuple) else v
    return d


def _children_to_dict(layer: Layer) -> dict[str, Any]:
    return {**args_to_dict(layer), "layers": [to_dict(c) for c in layer.layers]}


def _build_from_dict(build: Callable[..., Layer], name: str) -> Callable:
    """A leaf layer's from_dict: its constructor on the dict's keys (validated again)."""

    def from_dict(d: dict[str, Any]) -> Layer:
        try:
            return build(**d)
        except TypeError as err:
            raise ValueError(f"stax.{name}: {err}") from None

    return from_dict


def _children_from_dict(build: Callable[..., Layer], name: str) -> Callable:
    def from_dict(d: dict[str, Any]) -> Layer:
        d = dict(d)
        children = [layer_from_dict(c) for c in d.pop("layers", [])]
        if d:
            raise ValueError(f"{name} takes only 'layers', got {sorted(d)}")
        return build(*children)

    return from_dict


# -- the record and the registry -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerRule:
    """Everything the package knows of one stax layer type (one entry of :data:`RULES`).

    name: the Neural Tangents name (``Layer.name``); build: its stax constructor, which holds
    the validation, parameters and defaults; kind: one of :data:`KINDS`;
    out_shape: (layer, shape, walk) -> the output Shape, or a tuple of branch Shapes (walk(child,
    shape) for a combinator's children); out_hw: a one-input layer's (layer, hw) -> hw';
    cross: linear (z, op, layout, ntk, r1, r2) -> (z', record) on the carried array (D, or
    D + iΘ), or for an activation (D, v1, v2, layout, p) -> (D', ṡ);
    variance: linear (v, op, record) -> v', activation (v, p) -> v': the self pass's map of
    per-position variances; flops: p -> operations per output covariance entry (``plan``);
    to_dict: layer -> its JSON dict; from_dict: that dict -> the layer (validated again);
    mixes_positions: it couples different positions (the 'full' layout);
    needs_images: it takes (H, W) positions, so the network takes NHWC images;
    float32: a one-input layer's step (p, state, channels) -> state' of the float32 error walk
    (:mod:`ntk_scale.kernels.precision`); None: no bound is derived for it, so a network that
    holds it has an infinite float32 entry bound and dtype="auto" computes it in float64.
    """

    name: str
    build: Callable[..., Layer]
    kind: str
    out_shape: Callable
    out_hw: Callable | None
    cross: Callable | None
    variance: Callable | None
    flops: Callable[[dict[str, Any]], float]
    to_dict: Callable[[Layer], dict[str, Any]]
    from_dict: Callable[[dict[str, Any]], Layer]
    mixes_positions: bool = False
    needs_images: bool = False
    float32: Callable | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"LayerRule {self.name}: kind={self.kind!r}; use one of {KINDS}")


def _no_flops(p: dict[str, Any]) -> float:
    return 0


def _activation_flops(p: dict[str, Any]) -> float:
    return ACTIVATION_FLOPS


def _tap_flops(key: str) -> Callable:
    return lambda p: TAP_FLOPS * p[key][0] * p[key][1]


def leaf_rule(name: str, build: Callable[..., Layer], kind: str, cross: Callable,
              variance: Callable, out_hw: Callable = _keep_hw, flops: Callable | None = None,
              float32: Callable | None = None, **flags: bool) -> LayerRule:  # fmt: skip
    """The record of a one-input layer (linear or activation), its shape and JSON rules made
    from out_hw and build; flops defaults to the activation cost or 0."""
    if flops is None:
        flops = _activation_flops if kind == "activation" else _no_flops
    return LayerRule(name, build, kind, _leaf_shape(out_hw), out_hw, cross, variance, flops,
                     args_to_dict, _build_from_dict(build, name), float32=float32,
                     **flags)  # fmt: skip


def _structural(name: str, build: Callable[..., Layer], kind: str,
                out_shape: Callable) -> LayerRule:  # fmt: skip
    children = kind in ("serial", "parallel")
    to = _children_to_dict if children else args_to_dict
    back = (_children_from_dict if children else _build_from_dict)(build, name)
    return LayerRule(name, build, kind, out_shape, None, None, None, _no_flops, to, back)


def _reads(fn: Callable) -> Callable:
    """A linear cross rule on a materialised array: fn(z, op, layout, r1, r2)."""
    return lambda z, op, lay, ntk, r1, r2: fn(materialise(z, lay), op, lay, r1, r2)


def _flatten_cross(z: jax.Array, op: Op, layout: str, r1: tuple, r2: tuple | None):
    if op.hw is None:  # a readout of a vector is the identity
        return z, r1
    return spatial.flatten(z, layout), r1


def _flatten_variance(v: jax.Array, op: Op, rec: tuple) -> jax.Array:
    return v if op.hw is None else jnp.mean(v, axis=(1, 2))


def _abrelu_rule(name: str, build: Callable[..., Layer], ab: Callable) -> LayerRule:
    """The record of an a·min(x, 0) + b·max(x, 0) activation, (a, b) = ab(params), for all
    of its rules (cross, variance, float32 step) from the one ab."""
    return leaf_rule(name, build, "activation", *_abrelu(ab), float32=precision.abrelu_step(ab))


_BUILTIN = (
    _structural("serial", stax.serial, "serial", _serial_shape),
    _structural("parallel", stax.parallel, "parallel", _parallel_shape),
    _structural("FanOut", stax.FanOut, "fan_out", _fan_out_shape),
    _structural("FanInSum", stax.FanInSum, "fan_in", _fan_in_shape),
    leaf_rule("Dense", stax.Dense, "linear", _dense_rule, _dense_variance,
              float32=precision.dense_step),
    leaf_rule("Conv", stax.Conv, "linear", _conv_rule, _conv_variance, _window_hw("filter_shape"),
              _tap_flops("filter_shape"), float32=precision.conv_step, needs_images=True),
    leaf_rule("AvgPool", stax.AvgPool, "linear",
              _reads(lambda z, op, lay, r1, r2: _pool(z, op, r1, r2)), _pool_variance,
              _window_hw("window_shape"), _tap_flops("window_shape"),
              float32=precision.avg_pool_step, needs_images=True, mixes_positions=True),
    leaf_rule("GlobalAvgPool", stax.GlobalAvgPool, "linear",
              _reads(lambda z, op, lay, r1, r2: _global_pool(z, r1, r2)),
              lambda v, op, rec: jnp.mean(v, axis=(1, 2)) - rec[1], _global_pool_hw,
              float32=precision.global_pool_step, needs_images=True, mixes_positions=True),
    leaf_rule("Flatten", stax.Flatten, "linear", _reads(_flatten_cross), _flatten_variance,
              _flatten_hw, float32=precision.flatten_step),
    _abrelu_rule("Relu", stax.Relu, lambda p: (0.0, 1.0)),
    _abrelu_rule("LeakyRelu", stax.LeakyRelu, lambda p: (p["alpha"], 1.0)),
    _abrelu_rule("Abs", stax.Abs, lambda p: (-1.0, 1.0)),
    _abrelu_rule("ABRelu", stax.ABRelu, lambda p: (p["a"], p["b"])),
    leaf_rule("Erf", stax.Erf, "activation", _erf_cross, _erf_variance,
              float32=precision.erf_step),
    leaf_rule("Identity", stax.Identity, "linear",
              _reads(lambda z, op, lay, r1, r2: (z, r1)), lambda v, op, rec: v,
              float32=precision.identity_step),
)  # fmt: skip
#: Every layer type by name: the one table shape analysis, the interpreter and JSON read.
RULES: dict[str, LayerRule] = {rule.name: rule for rule in _BUILTIN}


def register(rule: LayerRule) -> LayerRule:
    """Add a layer type (its name must be new); returns the rule."""
    if rule.name in RULES:
        raise ValueError(f"stax layer {rule.name!r} is already registered; pick another name")
    RULES[rule.name] = rule
    return rule


def rule_of(layer: Layer | str) -> LayerRule:
    """The record of a layer (or a layer name); ValueError naming the supported layers."""
    name = layer if isinstance(layer, str) else layer.name
    rule = RULES.get(name)
    if rule is None:
        raise ValueError(f"unknown stax layer {name!r}; supported: {', '.join(RULES)}")
    return rule


def to_dict(layer: Layer) -> dict[str, Any]:
    """A layer tree as its JSON dict ({"layer": name, **args[, "layers": [...]]})."""
    return rule_of(layer).to_dict(layer)


def layer_from_dict(d: dict[str, Any]) -> Layer:
    """Inverse of :func:`to_dict`; every argument is validated again by its constructor."""
    d = dict(d)
    name = d.pop("layer", None)
    if name not in RULES:
        raise ValueError(f"unknown stax layer {name!r}; supported: {', '.join(RULES)}")
    return RULES[name].from_dict(d)
