"""Reading inputs (.npy, .npz, .csv, Zarr) and writing outputs; errors name the file and the fix."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ntk_scale.kernels import spec_from_json

SUFFIXES = (".npy", ".npz", ".csv", ".zarr")


def load_array(spec: str) -> Any:
    """Load an array from PATH, PATH.npz[:KEY] or a Zarr array (PATH.zarr, a directory or URL).

    .npy files are memory-mapped and Zarr arrays stay lazy, so large inputs are read block by
    block by the store. Never unpickles.
    """
    path, key = _split_key(spec)
    if "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"input file {path!r} does not exist; check the path")
    lower = path.rstrip("/").lower()
    if lower.endswith(".npy"):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if lower.endswith(".npz"):
        return _load_npz(path, key)
    if lower.endswith(".csv"):
        return _load_csv(path)
    if lower.endswith(".zarr") or "://" in path or os.path.isdir(path):
        import zarr

        node = zarr.open(path, mode="r")
        return node[key] if key else node
    raise ValueError(f"cannot read {path!r}: use one of {', '.join(SUFFIXES)} files")


def _split_key(spec: str) -> tuple[str, str | None]:
    head, sep, tail = spec.rpartition(":")
    if sep and head and not tail.startswith("//") and "/" not in tail and not os.path.exists(spec):
        return head, tail
    return spec, None


def _load_npz(path: str, key: str | None) -> np.ndarray:
    with np.load(path, allow_pickle=False) as f:
        if key is None:
            if len(f.files) != 1:
                raise ValueError(f"{path} holds arrays {f.files}; name one as {path}:NAME")
            key = f.files[0]
        if key not in f.files:
            raise ValueError(f"{path} has no array {key!r}; it holds {f.files}")
        return f[key]


def _load_csv(path: str) -> np.ndarray:
    try:
        arr = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError:
        try:
            arr = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2, skiprows=1)
        except ValueError as err:
            raise ValueError(f"{path}: not a numeric CSV ({err}); write numbers only") from None
    return arr


def load_targets(spec: str) -> np.ndarray:
    """Targets y: (N,) or (N, C) float64."""
    y = np.asarray(load_array(spec), dtype=np.float64)
    if y.ndim == 2 and y.shape[1] == 1 and spec.lower().endswith(".csv"):
        y = y[:, 0]
    return y


class FlatRows:
    """A lazy (n, d) view of an (n, *S) array that cannot reshape itself (a Zarr array):
    slicing rows reads those rows and flattens them."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr
        self.shape = (int(arr.shape[0]), int(np.prod(arr.shape[1:])))
        self.dtype = arr.dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, tuple):
            rows, cols = idx
            return self[rows][:, cols]
        part = np.asarray(self.arr[idx])
        return part.reshape((-1, self.shape[1])) if part.ndim > 1 else part.reshape(-1)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


class DaskRows:
    """A dask array read as (n, d) rows, each of its row chunks computed once.

    Reading rows in order (the store copies and fingerprints X tile by tile, predict reads X*
    block by block) computes each chunk of the dask graph once and keeps the last one, so a
    chunk that spans several tiles (a CSV partition of 10⁵ rows) is not recomputed per tile.
    Memory: one row chunk.
    """

    def __init__(self, arr: Any) -> None:
        self.arr = arr if arr.ndim == 2 else arr.reshape((arr.shape[0], -1))
        self.shape = tuple(int(v) for v in self.arr.shape)
        self.dtype, self.ndim = self.arr.dtype, 2
        self._bounds = np.cumsum((0, *self.arr.chunks[0]))
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cached": None}  # the graph, not the chunk read last

    def _chunk(self, k: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != k:
            lo, hi = int(self._bounds[k]), int(self._bounds[k + 1])
            self._cached = (k, np.asarray(self.arr[lo:hi]))
        return self._cached[1]

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, tuple):
            rows, cols = idx
            return self[rows][:, cols]
        if not (isinstance(idx, slice) and idx.step in (None, 1)):
            return np.asarray(self.arr[idx])
        start, stop, _ = idx.indices(self.shape[0])
        parts, k = [], int(np.searchsorted(self._bounds, start, side="right")) - 1
        while start < stop:
            lo, hi = int(self._bounds[k]), int(self._bounds[k + 1])
            parts.append(self._chunk(k)[start - lo : min(stop, hi) - lo])
            start, k = hi, k + 1
        if not parts:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


class RowRange:
    """Rows [r0, r1) of an (n, d) row source, read only when sliced: what a worker is sent
    instead of its rows. Pickles as the source's address (a Zarr array's store and path, a
    dask graph, an .npy file's name), never as the rows. Slicing rows [a, b) reads rows
    [r0 + a, r0 + b) of the source."""

    def __init__(self, source: Any, r0: int, r1: int) -> None:
        self.source, self.r0, self.r1 = source, int(r0), int(r1)
        self.shape = (self.r1 - self.r0, int(source.shape[1]))
        self.dtype, self.ndim = source.dtype, 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        if not (isinstance(idx, slice) and idx.step in (None, 1)):
            raise TypeError(f"RowRange reads contiguous row slices, got {idx!r}")
        a, b, _ = idx.indices(self.shape[0])
        return np.asarray(self.source[self.r0 + a : self.r0 + max(a, b)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


class NpyFile:
    """An .npy file's rows, memory-mapped where they are read: pickles as the file name (a
    memory map would pickle as its whole contents). path: the file; shape, dtype: its array's."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype, self.ndim = path, tuple(shape), np.dtype(dtype), 2
        self._map: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}

    def __getitem__(self, idx: Any) -> np.ndarray:
        if self._map is None:
            self._map = np.load(self.path, mmap_mode="r", allow_pickle=False)
            self._map = self._map.reshape((self._map.shape[0], -1))
        return np.asarray(self._map[idx])


def row_range(x: Any, r0: int, r1: int, same_machine: bool = True) -> Any:
    """Rows [r0, r1) of x (n, d) for another process: a :class:`RowRange` that reads them
    there, or the rows themselves (an ndarray) when it could not. same_machine: whether that
    process runs on this machine. It can read a Zarr array in object storage anywhere; a local
    Zarr array (or its :class:`FlatRows`), a dask array (:class:`DaskRows`) or a memory-mapped
    .npy file only on this machine; an array in memory nowhere."""
    source = _shared_source(x, same_machine)
    return np.asarray(x[r0:r1]) if source is None else RowRange(source, r0, r1)


def _shared_source(x: Any, same_machine: bool) -> Any:
    """x as a source another process can read, or None when it cannot."""
    if isinstance(x, FlatRows):
        return x if _shared_source(x.arr, same_machine) is not None else None
    if type(x).__module__.startswith("zarr"):
        store = type(getattr(x, "store", None)).__name__
        if store == "MemoryStore" or (store == "LocalStore" and not same_machine):
            return None
        return x
    if not same_machine:
        return None
    if isinstance(x, DaskRows):
        return x
    if isinstance(x, np.memmap) and str(getattr(x, "filename", "") or "").endswith(".npy"):
        whole = np.load(x.filename, mmap_mode="r", allow_pickle=False)
        same = (whole.shape[0] == x.shape[0] and whole.size == x.size and whole.dtype == x.dtype
                and whole.offset == x.offset and x.flags.c_contiguous)  # fmt: skip
        return NpyFile(str(x.filename), x.shape, x.dtype) if same else None
    return None


def _is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask")


def as_rows(x: Any, name: str = "x") -> tuple[Any, tuple[int, ...]]:
    """(x as an (n, d) matrix, the shape of one sample). Images (n, H, W, C) become rows of
    H·W·C values without a copy (numpy and memory maps reshape; a dask array is read through
    :class:`DaskRows`, one chunk at a time; other arrays, such as Zarr, through
    :class:`FlatRows`)."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) < 2:
        x = np.asarray(x)
        shape = x.shape
    if len(shape) < 2:
        raise ValueError(
            f"{name} must be (n, d) features or (n, H, W, C) images, got shape {shape}; for one "
            "sample add a leading axis (x[None])"
        )
    sample = tuple(int(v) for v in shape[1:])
    if _is_dask(x):
        if any(np.isnan(c).any() for c in x.chunks):
            raise ValueError(
                f"{name} is a dask array of unknown chunk sizes; call "
                f"{name}.compute_chunk_sizes() (or to_dask_array(lengths=True)) first"
            )
        return DaskRows(x), sample
    if len(shape) == 2:
        return x, sample
    if isinstance(x, np.ndarray):
        return x.reshape((shape[0], -1)), sample
    return FlatRows(x), sample


def load_kernel_spec(path: str) -> Any:
    """A kernel spec from a JSON file written by ``spec.to_json()`` (FullyConnected or stax)."""

    if not os.path.exists(path):
        raise FileNotFoundError(f"kernel spec file {path!r} does not exist; write one with "
                                "spec.to_json()")  # fmt: skip
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return spec_from_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"kernel spec file {path!r} is not JSON ({err}); write it with "
                         "spec.to_json()") from None  # fmt: skip
    except ValueError as err:
        raise ValueError(f"kernel spec file {path!r}: {err}") from None
