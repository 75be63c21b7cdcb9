"""Input checks shared by every entry point: errors name the bad value and the fix."""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float64")
KINDS = ("ntk", "nngp")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(choices)}")
    return value  # type: ignore[return-value]


def check_features(x: object, name: str = "x", dim: int | None = None) -> np.ndarray:
    """Validate a feature matrix. Returns it as a float ndarray of shape (n, d).

    Raises ValueError for non-2-D input, a feature width other than ``dim``, or NaN / Inf entries
    (naming the first bad row).
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_samples, n_features), got shape {arr.shape}; "
            "reshape it (for one sample use x.reshape(1, -1), for images flatten each one)"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}; convert it first")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(
            f"{name} has {arr.shape[1]} features but {dim} were expected; "
            "both inputs must have the same feature dimension"
        )
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise ValueError(
                f"{name} row {row} contains NaN or Inf ({arr[row][~np.isfinite(arr[row])][:3]}); "
                "remove or impute non-finite rows before computing a kernel"
            )
    return arr
