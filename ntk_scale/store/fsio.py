"""Filesystem helpers: fsspec filesystems and Zarr stores for a path or URL, atomic writes."""

from __future__ import annotations

import os
from typing import Any

import fsspec
import zarr


def url_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it (no trailing slash)."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def zarr_store(url: str, read_only: bool = False):
    """A Zarr store for a path or URL (file:// URLs become plain local stores)."""
    fs, root = fsspec.core.url_to_fs(url)
    if "://" not in url or isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, read_only=read_only)


#: What :func:`atomic_put` appends to a path for its temporary file on a local disk.
TMP_MARK = ".tmp-"


def atomic_put(fs: fsspec.AbstractFileSystem, path: str, *parts: Any) -> None:
    """Write a file from byte buffers so that readers see all of it or nothing (object-store puts
    are atomic already; on a local disk write a temporary file and rename it)."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        tmp = f"{path}{TMP_MARK}{os.getpid()}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, b"".join(bytes(memoryview(p).cast("B")) for p in parts))


def sweep_temporaries(fs: fsspec.AbstractFileSystem, directories: list[str]) -> int:
    """Remove the temporary files that writers killed mid-:func:`atomic_put` left in
    ``directories`` (and their subdirectories); never read, so only their space is lost.
    Call it only when no writer is running. Returns how many were removed."""
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return 0  # object-store puts leave no temporary
    removed = 0
    for top in directories:
        for folder, _, names in os.walk(top):
            for name in names:
                if TMP_MARK in name:
                    os.remove(os.path.join(folder, name))
                    removed += 1
    return removed
