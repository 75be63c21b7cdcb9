"""The model directory: A as a Zarr array plus JSON metadata (never pickled).

    model.json    kernel spec, kind, dtype, ridge, λ, the Gram store's URL and fingerprint,
                  targets fingerprint, solver report, class labels for classifiers
    alpha/        Zarr v3 array (N, C) float64, crc32c-checked

model.json is written last, so a directory without it is not a model (an interrupted save).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ntk_scale.store import GramStore, atomic_put, zarr_store

MODEL_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Model:
    alpha: np.ndarray  # (N,) or (N, C) float64
    meta: dict[str, Any]

    @property
    def store_url(self) -> str:
        return self.meta["store"]


def save_model(path: str, alpha: np.ndarray, meta: dict[str, Any]) -> None:
    """Write alpha (N,) or (N, C) and meta (JSON-serialisable) to the directory ``path``."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    a = np.asarray(alpha, dtype=np.float64)
    arr = zarr.create_array(
        zarr_store(path + "/alpha"),
        shape=a.shape,
        chunks=_chunks(a.shape),
        dtype="float64",
        compressors=[Crc32cCodec()],
        filters=None,
        fill_value=0.0,
        overwrite=True,
    )
    arr[...] = a
    full = {"format_version": MODEL_FORMAT_VERSION, **meta, "shape": list(a.shape)}
    atomic_put(fs, f"{root.rstrip('/')}/model.json", json.dumps(full, indent=2).encode())


def load_model(path: str, store: GramStore | None = None) -> Model:
    """Read a model directory; with ``store`` its fingerprint must match the model's."""
    fs, root = fsspec.core.url_to_fs(path)
    try:
        meta = json.loads(fs.cat_file(f"{root.rstrip('/')}/model.json"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no model at {path!r} (model.json missing); run `ntk-scale solve` or `fit` first"
        ) from None
    if store is not None and meta.get("store_fingerprint") != store.fingerprint:
        raise ValueError(
            f"model {path} was fitted on store {meta.get('store_fingerprint', '?')[:12]}…, "
            f"but {store.url} holds {store.fingerprint[:12]}…; use the store the model was "
            "fitted on (see model.json) or fit again"
        )
    alpha = np.asarray(zarr.open_array(zarr_store(path + "/alpha"), mode="r")[...])
    return Model(alpha, meta)


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (min(shape[0], 1 << 18),) + tuple(shape[1:])
