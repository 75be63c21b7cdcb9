"""Filesystem helpers: fsspec filesystems and Zarr stores for a path or URL, atomic writes."""

from __future__ import annotations

import os
from typing import Any

import fsspec
import zarr


def probe_location(url: str) -> str:
    """Where the disk of a store at ``url`` is measured (throughput, free space): for a local
    path (or file:// URL) the nearest existing directory at or above it (``run/gram.zarr``, the
    path ``gram`` would create, is probed in ``run/`` or, if that is missing too, in the first
    parent that exists); an object-store URL itself (its prefix need not exist; its bucket
    must)."""
    url = os.fspath(url)
    fs, root = fsspec.core.url_to_fs(url)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return url
    path = os.path.abspath(root)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def is_local(url: str) -> bool:
    """Whether ``url`` is a local path or file:// URL (not an object store); by its protocol,
    without importing the object store's filesystem (gcsfs may not be installed)."""
    return fsspec.utils.get_protocol(os.fspath(url)) in ("file", "local")


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
