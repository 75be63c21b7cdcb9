"""Completion markers: ``tiles/i.j.json``, written after the tile's chunk.

A tile is done iff its marker exists; each marker records the crc32c of the tile's chunk and
where it ran (node, host, pid, timings).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import fsspec

from ntk_scale.store.fsio import atomic_put


class Markers:
    """The completion markers of the store rooted at ``root`` on filesystem ``fs``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs, self.dir = fs, f"{root}/tiles"

    def path(self, i: int, j: int) -> str:
        return f"{self.dir}/{i}.{j}.json"

    def write(self, i: int, j: int, crc: int, info: dict[str, Any] | None = None) -> None:
        """Mark tile (i, j) done (atomically): its chunk's crc32c plus ``info``."""
        marker = {"i": i, "j": j, "crc32c": crc, **(info or {})}
        atomic_put(self.fs, self.path(i, j), json.dumps(marker).encode())

    def read_all(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Every marker by tile: one directory listing plus one small read each."""
        out = {}
        for path in self._paths():
            info = json.loads(self.fs.cat_file(path))
            out[(info["i"], info["j"])] = info
        return out

    def completed(self) -> set[tuple[int, int]]:
        """Tiles whose marker exists (from the listing alone; nothing is read)."""
        done = set()
        for path in self._paths():
            i, j = os.path.basename(path)[: -len(".json")].split(".")
            done.add((int(i), int(j)))
        return done

    def remove(self, i: int, j: int) -> None:
        """Forget tile (i, j)'s marker (absent is fine)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(i, j))

    def _paths(self) -> list[str]:
        # Markers are written by other processes (the workers); s3fs/gcsfs cache listings per
        # filesystem instance, which would hide new markers or keep removed ones.
        self.fs.invalidate_cache(self.dir)
        try:
            return [p for p in self.fs.ls(self.dir, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return []
