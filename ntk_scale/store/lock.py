"""The driver's lock on a store: a lock file with a heartbeat, taken over when stale."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

import fsspec

from ntk_scale.errors import StoreLockedError

LOCK_STALE_SECONDS = 120.0


class StoreLock:
    """A lock file with a heartbeat. Stale when its heartbeat is older than ``stale_after`` s, or
    when its owner ran on this host and that process is gone."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, stale_after: float):
        self.fs, self.path, self.stale_after = fs, path, stale_after
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> None:
        if self._create():
            return
        held = self._read()
        if held is not None and not self._is_stale(held):
            age = time.time() - held.get("heartbeat", 0)
            raise StoreLockedError(
                f"store is in use by pid {held.get('pid')} on {held.get('host')} "
                f"(heartbeat {age:.0f} s ago); wait for that run to finish, or if it is dead "
                f"remove {self.path} (it is treated as stale after {self.stale_after:.0f} s)"
            )
        self.took_over = held
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)
        if not self._create():
            raise StoreLockedError(f"another driver took the lock {self.path} just now; retry")

    def heartbeat(self) -> None:
        self.fs.pipe_file(self.path, json.dumps({**self.owner, "heartbeat": time.time()}).encode())

    def release(self) -> None:
        held = self._read()
        if held and held.get("pid") == self.owner["pid"] and held.get("host") == self.owner["host"]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    def _create(self) -> bool:
        payload = json.dumps({**self.owner, "heartbeat": time.time()}).encode()
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            return True
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):  # object stores: best effort (no exclusive create)
            return False
        self.fs.pipe_file(self.path, payload)
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def _is_stale(self, held: dict[str, Any]) -> bool:
        if time.time() - float(held.get("heartbeat", 0)) > self.stale_after:
            return True
        if held.get("host") == self.owner["host"]:
            try:
                os.kill(int(held["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False
