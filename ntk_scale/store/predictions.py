"""Predictions written as a chunked Zarr v3 array, resumably (local path or any fsspec URL).

Layout (a directory or URL prefix)::

    zarr.json        array metadata; attribute ``ntk_scale_predictions`` = what they are of (the
                     model's and X*'s fingerprints, rows per block)
    c/i/0            row block i of the (M, C) float64 predictions, crc32c-checked, uncompressed
    tiles/i.0.json   completion marker of block i, written after its chunk, with the chunk's crc

A block is done iff its marker exists and the checksum at the end of its chunk equals the
marker's, so a rerun after a killed predict computes only the blocks that are missing (or were
torn). Each block is one chunk written by one writer in one atomic put; Zarr reads the array as
any other (``zarr.open_array(url)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ntk_scale.plan import n_blocks
from ntk_scale.store.codec import chunk_body
from ntk_scale.store.fsio import atomic_put, url_fs, zarr_store
from ntk_scale.store.markers import Markers

ATTR = "ntk_scale_predictions"


class PredictionArray:
    """The predictions at ``url``: an (M, C) float64 array in row blocks of ``block`` rows."""

    def __init__(self, url: str, shape: tuple[int, int], block: int):
        self.url, self.shape, self.block = url, shape, block
        self.fs, self.root = url_fs(url)
        self._markers = Markers(self.fs, self.root)

    @classmethod
    def open_or_create(
        cls, url: str, shape: tuple[int, int], block: int, of: dict[str, Any],
        overwrite: bool = False,
    ) -> PredictionArray:  # fmt: skip
        """The array for predictions ``of`` (fingerprints, JSON values) at ``url``: reopened to
        resume when it holds the same, else created. One that holds other predictions, or a
        path that is not a prediction array, is refused unless ``overwrite``."""
        found = _attrs(url)
        want = {**of, "shape": list(shape), "block": int(block)}
        if found == want:
            return cls(url, shape, block)
        fs, root = url_fs(url)
        if fs.exists(root) and not overwrite:
            what = "predictions of another model or input" if found else "something else"
            raise ValueError(
                f"{url} holds {what}; write the predictions to a new path or pass --overwrite"
            )
        if fs.exists(root):
            fs.rm(root, recursive=True)
        zarr.create_array(
            zarr_store(url), shape=shape, chunks=(block, shape[1]), dtype="float64",
            compressors=[Crc32cCodec()], filters=None, fill_value=0.0, attributes={ATTR: want},
        )  # fmt: skip
        return cls(url, shape, block)

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.shape[0], self.block)

    def _chunk_path(self, i: int) -> str:
        return f"{self.root}/c/{i}/0"

    def done(self) -> set[int]:
        """Blocks whose marker exists and whose chunk ends with the marker's checksum."""
        out = set()
        for (i, _), info in self._markers.read_all().items():
            try:
                crc = int.from_bytes(self.fs.cat_file(self._chunk_path(i), start=-4), "little")
            except FileNotFoundError:
                continue
            if crc == info["crc32c"]:
                out.add(i)
        return out

    def write(self, i: int, values: np.ndarray) -> None:
        """Row block i (its rows of the (M, C) array): the chunk, then its marker."""
        body, crc = chunk_body(values, (self.block, self.shape[1]), np.dtype("float64"))
        atomic_put(self.fs, self._chunk_path(i), body, crc.to_bytes(4, "little"))
        self._markers.write(i, 0, crc)

    def read(self) -> zarr.Array:
        return zarr.open_array(zarr_store(self.url, read_only=True), mode="r")


def _attrs(url: str) -> dict[str, Any] | None:
    try:
        return dict(zarr.open_array(zarr_store(url, read_only=True), mode="r").attrs).get(ATTR)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, ValueError, KeyError):
        return None
