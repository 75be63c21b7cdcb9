"""How long one (t, t) tile of a kernel takes here: each kernel's :meth:`tile_seconds`.

Pure JAX and a clock (no Ray, no I/O); `plan` runs these in a child process pinned as a worker
is (:mod:`ntk_scale.measure`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def whole_tile_seconds(spec: Any, kind: str, dtype: str, x1, x2) -> tuple[float, float]:
    """(off-diagonal, diagonal) seconds of one (t, t) tile timed whole, after a warm-up call
    (compilation) of each: a kernel whose tile is one fused computation (FullyConnected)."""
    fn = spec.tile_function(kind, dtype)
    sym = spec.tile_function(kind, dtype, symmetric=True)
    fn(x1, x2).block_until_ready()
    sym(x1, x1).block_until_ready()
    start = time.perf_counter()
    np.asarray(fn(x1, x2))
    compute = time.perf_counter() - start
    start = time.perf_counter()
    np.asarray(sym(x1, x1))
    return compute, time.perf_counter() - start


def chunked_tile_seconds(spec: Any, kind: str, dtype: str, x1, x2) -> tuple[float, float]:
    """(off-diagonal, diagonal) seconds of a (t, t) tile of a kernel computed in chunks of
    pairs after a self pass per input (a stax network), from one chunk and the self pass of
    its inputs timed here: a tile of a conv kernel can take hours; it is t² pairs at the
    measured cost per pair plus 2t inputs at the cost per input."""
    t = x1.shape[0]
    compiled = spec.compiled(kind, dtype)
    c1, c2 = spec.tile_chunk(kind, dtype, t, t)
    a, b = spec.rows(x1[:c1]), spec.rows(x2[:c2])
    compiled.tile(a, b)  # compiles
    a = spec.rows(x1[c1 : 2 * c1]) if len(x1) >= 2 * c1 else a + 1.0  # rows not seen yet
    start = time.perf_counter()
    stats_a = compiled.self_stats(a)
    per_input = (time.perf_counter() - start) / c1
    stats_b = compiled.self_stats(b)
    start = time.perf_counter()
    compiled.tile(a, b, stats_a, stats_b)
    per_pair = (time.perf_counter() - start) / (c1 * c2)
    upper = t * (t + min(c1, c2)) / 2  # a diagonal tile computes its upper chunks only
    return t * t * per_pair + 2 * t * per_input, upper * per_pair + t * per_input
