"""What a store holds: :class:`StoreMeta` (saved as the group's attributes), the fingerprints of
its inputs, the checks of what create is given, and whether an existing store can be resumed."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import numpy as np

from ntk_scale.kernels import Kernel, check_features, check_spec, spec_from_dict
from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice
from ntk_scale.plan import DEFAULT_TILE, BlockPlan

FORMAT_VERSION = 1
LAYOUT_UPPER = "upper: tiles (i, j) with i <= j stored; block (j, i) is tile (i, j) transposed"
LAYOUT_FULL = "full: every tile stored"
_DIAG_FIX = "compute it with ntk_scale.kernels.diag_blocks(spec, x, kind, dtype)"


@dataclasses.dataclass(frozen=True)
class StoreMeta:
    """What a store holds; saved as the group's attributes (JSON only, never pickled)."""

    kernel: dict
    kernel_fingerprint: str
    kind: str
    dtype: str
    tile: int
    n_rows: int
    n_cols: int
    d: int
    symmetric: bool
    x_rows_fingerprint: str
    x_cols_fingerprint: str
    layout: str
    format_version: int = FORMAT_VERSION

    @property
    def spec(self) -> Kernel:
        return spec_from_dict(self.kernel)

    @property
    def plan(self) -> BlockPlan:
        return BlockPlan(self.n_rows, self.n_cols, self.tile, self.symmetric)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def fingerprint_rows(x: Any, dtype: str, block: int = DEFAULT_TILE, name: str = "x") -> str:
    """sha256 of x (n, d) as ``dtype`` (the values the kernel sees), read block by block.

    x may be anything sliceable (numpy, Zarr, dask). Raises ValueError on NaN / Inf rows.
    """
    n, d = x.shape
    h = hashlib.sha256(f"{n}x{d}|{dtype}|".encode())
    for r0 in range(0, n, block):
        part = np.asarray(x[r0 : r0 + block])
        try:
            check_features(part, name, dim=d)
        except ValueError as err:
            raise ValueError(shift_row(str(err), r0)) from None
        h.update(np.ascontiguousarray(part, dtype=dtype).tobytes())
    return h.hexdigest()


def shift_row(msg: str, offset: int) -> str:
    """Rewrite 'row k' in a block's error message as the row of the whole array."""
    return re.sub(r"row (\d+)", lambda m: f"row {int(m.group(1)) + offset}", msg, count=1)


def make_meta(spec, x, x_cols, kind, dtype, tile) -> StoreMeta:
    """The metadata of a store of K(x, x) or K(x, x_cols), validating every input.

    x: (n, d), x_cols: (m, d) or None; both are read block by block (fingerprints).
    """
    check_choice("kind", kind, KINDS)
    check_choice("dtype", dtype, DTYPES)
    check_spec(spec)
    if len(getattr(x, "shape", ())) != 2:
        check_features(x, "x")
    n, d = x.shape
    spec.check_input((d,), "x")
    fp_rows = fingerprint_rows(x, dtype, name="x")
    if x_cols is None:
        m, fp_cols = n, fp_rows
    else:
        if len(getattr(x_cols, "shape", ())) != 2 or x_cols.shape[1] != d:
            check_features(np.asarray(x_cols[:1]), "x_cols", dim=d)
        m, fp_cols = x_cols.shape[0], fingerprint_rows(x_cols, dtype, name="x_cols")
    if not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile={tile!r} must be a positive integer (rows per tile side)")
    # A tile larger than the matrix would only pad: clamp it (the plan stays one tile shape).
    plan = BlockPlan(n, m, min(int(tile), max(n, m)), symmetric=x_cols is None)
    return StoreMeta(
        kernel=spec.to_dict(),
        kernel_fingerprint=spec.fingerprint(),
        kind=kind,
        dtype=dtype,
        tile=plan.tile,
        n_rows=n,
        n_cols=m,
        d=d,
        symmetric=x_cols is None,
        x_rows_fingerprint=fp_rows,
        x_cols_fingerprint=fp_cols,
        layout=LAYOUT_UPPER if x_cols is None else LAYOUT_FULL,
    )


def check_diag(diag: Any, meta: StoreMeta) -> np.ndarray | None:
    """The exact diagonal as (n,) float64 for a symmetric store, None for a rectangular one."""
    if not meta.symmetric:
        if diag is not None:
            raise ValueError(
                "diag is only for a symmetric store K(x, x); pass diag=None with x_cols"
            )
        return None
    want = f"the exact diagonal K(x_i, x_i) of shape ({meta.n_rows},)"
    if diag is None:
        raise ValueError(f"a symmetric store needs diag=, {want}; {_DIAG_FIX}")
    arr = np.asarray(diag)
    if arr.shape != (meta.n_rows,) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"diag has shape {arr.shape} ({arr.dtype}), expected {want}; {_DIAG_FIX}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        row = int(np.argmin(np.isfinite(arr)))
        raise ValueError(f"diag[{row}] is {arr[row]}, expected {want}, finite; {_DIAG_FIX}")
    return arr


def meta_diff(found: StoreMeta, want: StoreMeta) -> list[str]:
    """The fields in which two stores differ (the kernel by its fingerprint)."""
    a, b = found.to_dict(), want.to_dict()
    return [k for k in b if a.get(k) != b[k] and k != "kernel"]


def short(value: Any) -> str:
    """A value shortened for a message (fingerprints to 12 characters)."""
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text


def mismatch_message(url: str, found: StoreMeta, want: StoreMeta, diff: list[str]) -> str:
    """Why the store at ``url`` cannot be resumed for ``want``, and the fix."""
    parts = [
        f"{k}: stored {short(getattr(found, k))}, requested {short(getattr(want, k))}" for k in diff
    ]
    return (
        f"store {url} was made for other inputs ({'; '.join(parts)}); "
        "use a new store path, or pass --overwrite (overwrite=True) to replace it"
    )
