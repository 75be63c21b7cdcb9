"""Save and load a PCGState: one ``.npz`` file (np.savez, read with allow_pickle=False).

The metadata travels inside the file as JSON (a 0-d unicode array, never a pickled object), so
one atomic rename publishes the arrays and the metadata together. Paths go through fsspec:
local paths are the main case; ``s3://…`` URLs work when s3fs is installed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ntk_scale.linalg.pcg import STATE_FIELDS, PCGState

FORMAT = "ntk_scale.pcg_state/1"
_META_KEY = "__meta__"


def save_checkpoint(path: str, state: PCGState, meta: dict[str, Any]) -> None:
    """Write ``state`` and JSON-able ``meta`` to ``path`` (a local path or fsspec URL), atomically:
    the bytes go to a temporary name in the same directory, which is then renamed over ``path``
    (for remote stores: written, then moved), so a reader sees the old file or the new one."""
    meta_json = json.dumps({"format": FORMAT, "meta": meta}, sort_keys=True)
    arrays = {name: np.asarray(getattr(state, name)) for name in STATE_FIELDS}
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{_META_KEY: np.array(meta_json)})
    fs, fpath = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        _write_local(fpath, buf.getvalue())
    else:
        tmp = f"{fpath}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(buf.getvalue())
        fs.mv(tmp, fpath)


def load_checkpoint(path: str, expect_meta: dict[str, Any]) -> PCGState | None:
    """The PCGState saved at ``path``, or None if there is none.

    Raises ValueError naming the first key of ``expect_meta`` whose saved value differs (e.g.
    the store or targets fingerprint, or λ): the checkpoint belongs to another problem.
    """
    fs, fpath = fsspec.core.url_to_fs(path)
    if not fs.exists(fpath):
        return None
    with fs.open(fpath, "rb") as f:
        data = f.read()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        missing = [k for k in (*STATE_FIELDS, _META_KEY) if k not in z.files]
        if missing:
            raise ValueError(
                f"checkpoint {path} lacks {missing}; it is not a PCG checkpoint "
                "from this version: delete it or use a new output dir"
            )
        saved = json.loads(str(z[_META_KEY]))
        _check_meta(path, saved, expect_meta)
        arrays = {name: z[name] for name in STATE_FIELDS}
    arrays["iteration"] = int(arrays["iteration"])
    return PCGState(**arrays)


def checkpoint_every(
    path: str, meta: dict[str, Any], every: int = 10
) -> Callable[[PCGState], None]:
    """A solve_pcg callback that saves the state every ``every`` iterations."""

    def callback(state: PCGState) -> None:
        if state.iteration % every == 0:
            save_checkpoint(path, state, meta)

    return callback


def _check_meta(path: str, saved: dict[str, Any], expect: dict[str, Any]) -> None:
    if saved.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {saved.get('format')!r}, expected "
            f"{FORMAT!r}; delete it or use a new output dir"
        )
    have = saved["meta"]
    # A JSON round trip makes tuples lists and keys strings, as they are in the file.
    for key, want in json.loads(json.dumps(expect)).items():
        if key not in have or have[key] != want:
            raise ValueError(
                f"checkpoint {path} was made for {key}={have.get(key, '<absent>')!r}, this "
                f"solve has {key}={want!r}: it belongs to another problem; use a new output "
                "dir or pass overwrite to discard it"
            )


def _write_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
