"""Shape analysis of a stax spec: what flows between its layers, and what a pair costs.

Every layer's shape rule, position coupling and cost come from its record
(:mod:`ntk_scale.kernels.layers`); this module walks the tree with them and derives the
layout ('full', 'diag' or 'dense'), the most covariance entries one pair holds, the worker
memory of a chunk of pairs and the floating-point operations of one pair (for ``plan``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from ntk_scale.kernels import precision
from ntk_scale.kernels.layers import Shape, branches, rule_of
from ntk_scale.kernels.stax import Layer

__all__ = ["DEFAULT_KERNEL_MEMORY", "Analysis", "Shape", "analyse", "chunk_shape",
           "entries", "float32_error", "pair_bytes", "pair_flops"]  # fmt: skip

#: Bytes the covariance tensors of one chunk of pairs may take on a worker (one definition).
#: Small on purpose: a chunk whose tensors stay in the last-level cache runs several times
#: faster per pair (Myrtle-5 float64 on one core here: 20 ms a pair one pair at a time, 64 ms
#: at 4 x 4 pairs); a pair larger than the budget is computed alone.
DEFAULT_KERNEL_MEMORY = 64 << 20
#: Live tensors per pair, in units of the largest covariance tensor (measured peak, rounded up).
_LIVE_TENSORS = {"ntk": 8, "nngp": 5}


class Analysis(NamedTuple):
    """layout: 'full', 'diag' or 'dense'; sample_shape: one input's shape; entries: the most
    covariance entries one pair holds at any layer."""

    layout: str
    sample_shape: tuple[int, ...]
    entries: int


def walk(layer: Layer, shape: Any, visit: Callable[[Layer, Any], None]) -> Any:
    """The output Shape (or tuple of branch Shapes) of ``layer`` on ``shape``, by each layer's
    own shape rule; visit(layer, output) is called for every layer, in pre-order of outputs."""
    out = rule_of(layer).out_shape(layer, shape, lambda c, s: walk(c, s, visit))
    visit(layer, out)
    return out


def entries(hw: tuple[int, int] | None, layout: str) -> int:
    """Covariance entries one pair holds at positions hw in ``layout``."""
    if hw is None:
        return 1
    n = hw[0] * hw[1]
    return n * n if layout == "full" else n


def _layers(layer: Layer) -> Iterator[Layer]:
    """Every layer in the tree, combinators included."""
    yield layer
    for child in layer.layers:
        yield from _layers(child)


def _layout(spec: Layer) -> str:
    """'full' when any layer mixes positions (pooling), else 'diag'."""
    return "full" if any(rule_of(n).mixes_positions for n in _layers(spec)) else "diag"


def _has_spatial(spec: Layer) -> bool:
    return any(rule_of(n).needs_images for n in _layers(spec))


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
    seen = [entries(hw, layout)]  # type: ignore[arg-type]

    def visit(layer: Layer, out: Any) -> None:
        if not branches(out):
            seen.append(entries(out.hw, layout))

    out = walk(spec, Shape(hw), visit)  # type: ignore[arg-type]
    if branches(out):
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


def pair_flops(layer: Layer, sample_shape: tuple[int, ...]) -> float:
    """Approximate floating-point operations one pair of inputs costs (for `plan`): the input
    layer's products, then each layer's own cost per output entry (its record's flops)."""
    a = analyse(layer, tuple(sample_shape))
    hw0 = tuple(sample_shape[:2]) if a.layout != "dense" else None
    total = [float(entries(hw0, a.layout)) * (sample_shape[-1] * 2)]

    def visit(node: Layer, out: Any) -> None:
        rule = rule_of(node)
        if rule.out_hw is not None:  # a one-input layer (combinators cost nothing themselves)
            e = float(entries(out.hw, a.layout if out.hw is not None else "dense"))
            total.append(e * rule.flops(node.p))

    walk(layer, Shape(hw0), visit)  # type: ignore[arg-type]
    return sum(total)


def float32_error(layer: Layer, sample_shape: tuple[int, ...], kind: str) -> float | None:
    """ε_K of the float32 error walk (:mod:`ntk_scale.kernels.precision`, Stax networks) of a
    layer tree on inputs of ``sample_shape``: |K32 − K| ≤ ε_K · diag_max before SAFETY. Each
    one-input layer's step is its record's ``float32``; None where a layer has none."""
    chans = int(sample_shape[-1])

    def step(node: Layer, st: Any) -> Any:
        rule = rule_of(node)
        if rule.kind == "serial":
            for child in node.layers:
                st = step(child, st)
                if st is None:
                    return None
            return st
        if rule.kind == "parallel":
            out = tuple(step(c, s) for c, s in zip(node.layers, st, strict=True))
            return None if any(s is None for s in out) else out
        if rule.kind == "fan_out":
            return (st,) * int(node.p["num"])
        if rule.kind == "fan_in":
            return precision.fan_in_step(st)
        if rule.float32 is None:
            return None
        return rule.float32(node.p, st, chans)

    final = step(layer, precision.stax_start(tuple(sample_shape)))
    return None if final is None else precision.stax_finish(final, kind)
