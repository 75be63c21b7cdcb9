"""Neural Tangents' ``stax`` vocabulary as frozen kernel specs.

A model written for Neural Tangents ports by changing the import: the layer names, positional
arguments, keywords and defaults are Neural Tangents', and each call returns a frozen
:class:`Layer` (a spec) instead of the ``(init_fn, apply_fn, kernel_fn)`` triple::

    from ntk_scale import stax
    spec = stax.serial(stax.Conv(64, (3, 3), padding="SAME"), stax.Relu(),
                       stax.AvgPool((2, 2), strides=(2, 2)), stax.Flatten(), stax.Dense(10))
    K = spec.kernel(x1, x2, kind="ntk", dtype="float64")      # x: (n, H, W, C) NHWC

Widths (``out_dim``, ``out_chan``) are kept but do not change the kernel (infinite width).
Arguments or layers Neural Tangents has and ntk_scale does not raise ValueError naming what is
supported. Only the NTK parameterization, NHWC images and 2-D spatial layers are supported.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any

import numpy as np

from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice

#: Bumped whenever a change to the composable kernel code could change a computed value.
STAX_CODE_VERSION = 2

PADDINGS = ("VALID", "SAME", "CIRCULAR")
LAYERS = (
    "serial", "parallel", "FanOut", "FanInSum", "Dense", "Conv", "AvgPool", "GlobalAvgPool",
    "Flatten", "Relu", "LeakyRelu", "Abs", "ABRelu", "Erf", "Identity",
)  # fmt: skip
#: Neural Tangents layers that ntk_scale does not implement (asking for one says so).
_NT_ONLY = (
    "Aggregate", "AvgPoolTranspose", "Cos", "ConvLocal", "ConvTranspose", "DotGeneral", "Dropout",
    "ElementwiseNumerical", "Elementwise", "Exp", "ExpNormalized", "FanInConcat", "FanInProd",
    "Gabor", "Gaussian", "Gelu", "GlobalSelfAttention", "GlobalSumPool", "Hermite",
    "ImageResize", "Index", "LayerNorm", "Monomial", "Polynomial", "Rbf", "RectifiedMonomial",
    "Sigmoid_like", "Sign", "Sin", "SumPool", "repeat", "mask", "unmask",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Layer:
    """One stax layer or combinator, frozen and hashable; every layer is also a kernel spec.

    name: the Neural Tangents name; args: its kernel-relevant arguments as sorted (key, value)
    pairs (tuples for sequences); layers: the children of ``serial`` / ``parallel``.
    """

    name: str
    args: tuple[tuple[str, Any], ...] = ()
    layers: tuple[Layer, ...] = ()

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.args)

    # -- serialisation ----------------------------------------------------------------------
    def layer_dict(self) -> dict[str, Any]:
        """This layer as {"layer": name, **args[, "layers": [...]]} (:func:`layer_from_dict`)."""
        from ntk_scale.kernels import layers  # layers imports this module (its constructors)

        return layers.to_dict(self)

    def to_dict(self) -> dict[str, Any]:
        """{"type": "stax", "network": ...}, what a store records (``spec_from_dict``)."""
        return {"type": "stax", "network": self.layer_dict()}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal specs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON and the kernel-code version (hex, 64 chars)."""
        payload = f"{self.to_json()}|stax-code-v{STAX_CODE_VERSION}"
        return hashlib.sha256(payload.encode()).hexdigest()

    # -- computation ------------------------------------------------------------------------
    def kernel(
        self, x1: Any, x2: Any = None, kind: str = "ntk", dtype: str = "float32"
    ) -> np.ndarray:
        """K(x1, x2) -> numpy (n1, n2). x: (n, H, W, C) images for a network with Conv or
        pooling layers, (n, d) for a dense-only one; x2=None for K(x1, x1)."""
        from ntk_scale.kernels.network import evaluate  # network imports this module

        return evaluate(self, x1, x2, kind, dtype)

    def diag(self, x: Any, kind: str = "ntk", dtype: str = "float32") -> np.ndarray:
        """The diagonal K(x_i, x_i) without the off-diagonal entries -> (n,)."""
        from ntk_scale.kernels.network import evaluate_diag  # network imports this module

        return evaluate_diag(self, x, kind, dtype)

    def __repr__(self) -> str:
        inner = [repr(layer) for layer in self.layers] + [f"{k}={v!r}" for k, v in self.args]
        return f"stax.{self.name}({', '.join(inner)})"


# -- argument checks -------------------------------------------------------------------------------
def _num(name: str, value: Any, positive: bool = False, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name}={value!r} must be a finite number{' > 0' if positive else ''}")
    return v


def _pair(name: str, value: Any, default: tuple[int, int] | None = None) -> tuple[int, int]:
    if value is None and default is not None:
        return default
    try:
        t = tuple(int(v) for v in value)
        ok = len(t) == 2 and all(v >= 1 and v == w for v, w in zip(t, value, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{name}={value!r} must be two positive integers (height, width); ntk_scale supports "
            "2-D spatial layers on NHWC images"
        )
    return t  # type: ignore[return-value]


def _padding(value: Any) -> str:
    p = str(value).upper()
    if p not in PADDINGS:
        raise ValueError(f"padding={value!r} is not supported; use one of {', '.join(PADDINGS)}")
    return p


def _only(name: str, value: Any, allowed: tuple[Any, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported by ntk_scale; {what}")


def _width(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (it does not change the "
                         "infinite-width kernel)")  # fmt: skip
    return int(value)


def _layer(name: str, **args: Any) -> Layer:
    return Layer(name, tuple(sorted(args.items())))


_PARAM_FIX = "only parameterization='ntk' (Neural Tangents' default) is supported"
_AXES_FIX = "ntk_scale takes NHWC images: batch_axis=0, channel_axis=-1"


def _ntk_param(parameterization: str, s: Any) -> None:
    _only("parameterization", str(parameterization).lower(), ("ntk",), _PARAM_FIX)
    _only("s", tuple(s), ((1, 1),), "s applies to parameterization='standard' only")


# -- layers (Neural Tangents' names, arguments and defaults) ---------------------------------------
def Dense(out_dim: int, W_std: float = 1.0, b_std: float | None = None, batch_axis: int = 0,
          channel_axis: int = -1, parameterization: str = "ntk", s: tuple[int, int] = (1, 1),
          ) -> Layer:  # fmt: skip
    """Fully-connected layer (on images: the same dense map at every position)."""
    _only("batch_axis", batch_axis, (0,), _AXES_FIX)
    _only("channel_axis", channel_axis, (-1, 1, 3), _AXES_FIX)
    _ntk_param(parameterization, s)
    return _layer("Dense", out_dim=_width("out_dim", out_dim), W_std=_num("W_std", W_std, True),
                  b_std=_num("b_std", b_std, allow_none=True))  # fmt: skip


def Conv(out_chan: int, filter_shape: Any, strides: Any = None, padding: str = "VALID",
         W_std: float = 1.0, b_std: float | None = None, dimension_numbers: Any = None,
         parameterization: str = "ntk", s: tuple[int, int] = (1, 1)) -> Layer:  # fmt: skip
    """2-D convolution with shared weights (NHWC), padding VALID, SAME or CIRCULAR."""
    if dimension_numbers is not None and tuple(dimension_numbers) != ("NHWC", "HWIO", "NHWC"):
        raise ValueError(f"dimension_numbers={dimension_numbers!r} is not supported; ntk_scale "
                         "takes NHWC images: use None or ('NHWC', 'HWIO', 'NHWC')")  # fmt: skip
    _ntk_param(parameterization, s)
    return _layer("Conv", out_chan=_width("out_chan", out_chan),
                  filter_shape=_pair("filter_shape", filter_shape),
                  strides=_pair("strides", strides, (1, 1)), padding=_padding(padding),
                  W_std=_num("W_std", W_std, True),
                  b_std=_num("b_std", b_std, allow_none=True))  # fmt: skip


def AvgPool(window_shape: Any, strides: Any = None, padding: str = "VALID",
            normalize_edges: bool = False, batch_axis: int = 0, channel_axis: int = -1,
            ) -> Layer:  # fmt: skip
    """Average pooling; strides=None means (1, 1), as in Neural Tangents."""
    _only("batch_axis", batch_axis, (0,), _AXES_FIX)
    _only("channel_axis", channel_axis, (-1, 3), _AXES_FIX)
    return _layer("AvgPool", window_shape=_pair("window_shape", window_shape),
                  strides=_pair("strides", strides, (1, 1)), padding=_padding(padding),
                  normalize_edges=bool(normalize_edges))  # fmt: skip


def GlobalAvgPool(batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """The mean over all positions: (n, H, W, C) -> (n, C)."""
    _only("batch_axis", batch_axis, (0,), _AXES_FIX)
    _only("channel_axis", channel_axis, (-1, 3), _AXES_FIX)
    return _layer("GlobalAvgPool")


def Flatten(batch_axis: int = 0, batch_axis_out: int = 0) -> Layer:
    """Flatten every non-batch axis (its kernel: the mean over same-position entries)."""
    _only("batch_axis", batch_axis, (0,), _AXES_FIX)
    _only("batch_axis_out", batch_axis_out, (0, -2), "use batch_axis_out=0")
    return _layer("Flatten")


def ABRelu(a: float, b: float, do_stabilize: bool = False) -> Layer:
    """a·min(x, 0) + b·max(x, 0). do_stabilize only rescales inside Neural Tangents."""
    return _layer("ABRelu", a=_num("a", a), b=_num("b", b))


def Relu(do_stabilize: bool = False) -> Layer:
    return _layer("Relu")


def LeakyRelu(alpha: float, do_stabilize: bool = False) -> Layer:
    return _layer("LeakyRelu", alpha=_num("alpha", alpha))


def Abs(do_stabilize: bool = False) -> Layer:
    return _layer("Abs")


def Erf(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Layer:
    """a·erf(b·x) + c."""
    return _layer("Erf", a=_num("a", a), b=_num("b", b), c=_num("c", c))


def Identity() -> Layer:
    return _layer("Identity")


def FanOut(num: int) -> Layer:
    """Copy the input to ``num`` branches (for :func:`parallel`)."""
    return _layer("FanOut", num=_width("num", num))


def FanInSum() -> Layer:
    """Sum the branches (their kernels add: the branches' weights are independent)."""
    return _layer("FanInSum")


def _children(name: str, layers: tuple[Any, ...]) -> tuple[Layer, ...]:
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise ValueError(
                f"{name}: argument {i} is {type(layer).__name__}, not an ntk_scale stax layer; "
                "build every layer with ntk_scale.stax (e.g. stax.Dense(1), stax.Relu())"
            )
    return tuple(layers)


def serial(*layers: Layer) -> Layer:
    """The layers applied one after another."""
    return Layer("serial", (), _children("serial", layers))


def parallel(*layers: Layer) -> Layer:
    """Layer i applied to branch i of a FanOut."""
    return Layer("parallel", (), _children("parallel", layers))


def __getattr__(name: str) -> Any:
    if name in _NT_ONLY:
        raise ValueError(
            f"stax.{name} is a Neural Tangents layer that ntk_scale does not implement; "
            f"supported: {', '.join(LAYERS)}"
        )
    raise AttributeError(f"module 'ntk_scale.stax' has no attribute {name!r}")


# -- presets ---------------------------------------------------------------------------------------
_MYRTLE_BLOCKS = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}


def Myrtle(depth: int = 5, W_std: float = 2**0.5, b_std: float = 0.0) -> Layer:
    """The Myrtle network of Neural Tangents' Myrtle notebook (Shankar et al. 2020), for 32x32
    images: three blocks of [3x3 SAME Conv, Relu] x (2, 1, 1) / (2, 2, 2) / (3, 3, 3), an
    AvgPool((2, 2), (2, 2)) after each of the first two blocks and three after the third, then
    Flatten and Dense."""
    if depth not in _MYRTLE_BLOCKS:
        raise ValueError(f"Myrtle depth={depth!r} is not defined; use one of 5, 7, 10")

    def conv() -> list[Layer]:
        return [Conv(1, (3, 3), W_std=W_std, b_std=b_std, padding="SAME"), Relu()]

    pool = AvgPool((2, 2), strides=(2, 2))
    r1, r2, r3 = _MYRTLE_BLOCKS[depth]
    layers = conv() * r1 + [pool] + conv() * r2 + [pool] + conv() * r3 + [pool] * 3
    return serial(*layers, Flatten(), Dense(10, W_std, b_std))


def SmallConv(W_std: float = 1.4, b_std: float = 0.1) -> Layer:
    """A small convolutional kernel for small images (the digits demo): [3x3 SAME Conv, Relu],
    AvgPool((2, 2), (2, 2)), [3x3 SAME Conv, Relu], GlobalAvgPool, Dense."""

    def conv() -> Layer:
        return Conv(32, (3, 3), padding="SAME", W_std=W_std, b_std=b_std)

    return serial(conv(), Relu(), AvgPool((2, 2), strides=(2, 2)), conv(), Relu(),
                  GlobalAvgPool(), Dense(10, W_std=W_std, b_std=b_std))  # fmt: skip


#: Named kernels the CLI and the config take (``--kernel myrtle5``); "fc" is FullyConnected.
PRESETS = {
    **{f"myrtle{d}": functools.partial(Myrtle, d) for d in _MYRTLE_BLOCKS},
    "conv": SmallConv,
}


# -- JSON ------------------------------------------------------------------------------------------
def layer_from_dict(d: dict[str, Any]) -> Layer:
    """Inverse of ``Layer.to_dict()``; every argument is validated again (each layer's record,
    :data:`ntk_scale.kernels.layers.RULES`, holds its JSON)."""
    from ntk_scale.kernels import layers  # layers imports this module (its constructors)

    return layers.layer_from_dict(d)


def check_kind_dtype(kind: str, dtype: str) -> None:
    check_choice("kind", kind, KINDS)
    check_choice("dtype", dtype, DTYPES)
