"""Measurements behind `ntk-scale plan`: a tile timed as a worker spends it, a GPU's tile rate,
and the store's write and read rates (the arithmetic on them is :mod:`ntk_scale.sizing`).

A tile is timed in a child process pinned to the worker's cores with the worker's thread
settings (timed on the driver, with all its cores, a tile took 2.4-2.8x less than on a one-core
worker here, and the write's checksum and copy share the worker's core); the kernel times itself
(:meth:`ntk_scale.kernels.Kernel.tile_seconds`). The disk's rate is measured in the store itself
(a local directory or any fsspec URL). Probes live in a temporary directory under the store URL
and are always removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ntk_scale.cost import workload
from ntk_scale.kernels import Kernel, spec_from_json
from ntk_scale.store import atomic_put, chunk_body, url_fs
from ntk_scale.store.fsio import probe_location

_PROBE_PREFIX = ".ntk-probe-"
_PROBE_FILE_BYTES = 16 << 20


def time_worker_tile(
    spec: Kernel,
    kind: str,
    dtype: str,
    t: int,
    d: int,
    threads: int = 1,
    store_url: str | None = None,
    gpu: bool = False,
) -> tuple[float, float, float | None]:
    """(off-diagonal, diagonal, write) seconds of one (t, t) tile from (t, d) inputs as a worker
    spends them: in a child process pinned to ``threads`` cores with a worker's environment,
    after a warm-up call (compilation); diagonal: a diagonal tile (the exactly symmetric path);
    write: encoding its chunk and writing it atomically into a probe under a local
    ``store_url`` (None for no store or an object store, whose puts are network-bound).
    gpu: on this machine's GPU instead, with a GPU worker's environment (no pinning)."""
    out = time_worker_start(spec, kind, dtype, t, d, threads, store_url, gpu)
    return out["compute"], out["diagonal"], out["write"]


def time_worker_start(
    spec: Kernel, kind: str, dtype: str, t: int, d: int, threads: int = 1,
    store_url: str | None = None, gpu: bool = False,
) -> dict[str, float | None]:  # fmt: skip
    """:func:`time_worker_tile`'s child's figures: "compute", "diagonal", "write" (seconds, as
    there) and what a new worker pays before its first tile: "imports" (from the child's
    launch to its imports done: Python, JAX, ntk_scale) and "compile" (the tile functions'
    compilation)."""
    from ntk_scale.pool import worker_env  # cycle: pool -> sizing -> measure

    with contextlib.ExitStack() as stack:
        where = None
        if store_url is not None and _store_root(store_url)[2]:
            where = stack.enter_context(_probe(store_url))[1]
        cores = sorted(os.sched_getaffinity(0))[: None if gpu else max(1, threads)]
        args = [spec.to_json(), kind, dtype, str(t), str(d), where or "", ",".join(map(str, cores)),
                repr(time.time())]  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "ntk_scale.measure", *args],
            env={**os.environ, **worker_env(gpu, None if gpu else threads)},
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"timing a tile failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_tile_main(argv: list[str]) -> None:
    """The child of :func:`time_worker_start`: prints its figures as JSON."""
    imports = time.time() - float(argv[7]) if len(argv) > 7 else None
    # Pinned first, as a worker is, before the first computation starts XLA's thread pool (no
    # preexec_fn in the parent: forking a multithreaded driver is unsafe).
    os.sched_setaffinity(0, {int(c) for c in argv[6].split(",")})

    spec, kind, dtype, t, d, where = (
        spec_from_json(argv[0]),
        *argv[1:3],
        *map(int, argv[3:5]),
        argv[5],
    )
    rng = np.random.default_rng(0)
    x1, x2 = (rng.normal(size=(t, d)).astype(dtype) for _ in range(2))
    start = time.perf_counter()
    compute, diagonal = spec.tile_seconds(kind, dtype, x1, x2)
    # tile_seconds ran each function once to compile it, then once timed; a chunked kernel
    # (stax) extrapolates its tile from a chunk, and then all this time is about compiling
    spent = time.perf_counter() - start
    compile_s = spent - 2 * (compute + diagonal) if spent > 2 * (compute + diagonal) else spent
    write = None
    if where:  # a chunk's write costs its bytes (no compression), whatever their values
        values = rng.normal(size=(t, t)).astype(dtype)
        fs = url_fs(where)[0]
        times = []
        for k in range(3):
            start = time.perf_counter()
            body, crc = chunk_body(values, t, np.dtype(dtype))
            atomic_put(fs, f"{where}/chunk-{k}", body, crc.to_bytes(4, "little"))
            times.append(time.perf_counter() - start)
        write = float(np.median(times))
    print(json.dumps({"compute": compute, "diagonal": diagonal, "write": write,
                      "imports": imports, "compile": compile_s}), flush=True)  # fmt: skip


# --- a GPU here ---------------------------------------------------------------------------------


def local_gpu_names() -> list[str]:
    """Names of this machine's NVIDIA GPUs (``nvidia-smi -L``), [] where there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [m.group(1) for m in re.finditer(r"^GPU \d+: (.+?) \(UUID", out.stdout, re.M)]


def gpu_model(name: str, models: Iterable[str]) -> str | None:
    """The model among ``models`` that a GPU name is ("NVIDIA H100 80GB HBM3" is H100, "NVIDIA
    L40S" is not L4), or None."""
    for model in sorted(models, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(model)}(?![A-Za-z0-9])", name, re.I):
            return model
    return None


def measured_gpu_flops(
    spec: Any, kind: str, dtype: str, t: int, d: int, models: Iterable[str]
) -> dict[str, float]:
    """{GPU model: FLOP/s} of one (t, t) tile timed on this machine's GPU, where it has one of
    ``models`` (the cost table then uses it instead of the datasheet); {} otherwise."""
    names = local_gpu_names()
    model = gpu_model(names[0], list(models)) if names else None
    if model is None:
        return {}
    seconds = time_worker_tile(spec, kind, dtype, t, d, gpu=True)[0]
    flops_per_entry = spec.cost(d, kind, dtype, t).flops_per_entry
    return {model: t * t * flops_per_entry / max(seconds, 1e-9)}


def cloud_workload(
    plan: Any,
    spec: Any,
    kind: str,
    d: int,
    store_url: str,
    read_bytes_per_s: float | None,
    measure: bool,
    catalog: Any,
) -> Any:
    """The cost model's view of ``plan`` (:class:`ntk_scale.cost.Workload`): a tile timed on a
    GPU here when ``measure`` and there is one of the catalog's models, and the read rate
    measured against ``store_url`` when it is an object store (the head's rate, when `plan`
    runs on the head; a local disk's rate says nothing of a bucket)."""

    models = catalog.accelerators
    gpus = measured_gpu_flops(spec, kind, plan.dtype, plan.tile, d, models) if measure else {}
    remote = read_bytes_per_s is not None and is_object_store(store_url)
    return workload(plan, gpus, read_bytes_per_s if remote else None)


def is_object_store(url: str) -> bool:
    """Whether a store URL is remote (s3://, gs://, ...): its rates are the network's."""
    return not _store_root(url)[2]


# --- store throughput probes -------------------------------------------------------------------


def drop_page_cache(paths: list[str]) -> None:
    """Flush the files and drop their pages from the OS page cache (posix_fadvise DONTNEED, Linux;
    a no-op elsewhere), so the next read of them comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rate(paths: list[str], block: int = 16 << 20) -> float:
    """Bytes/s reading the files in order with plain unbuffered reads, nothing else."""
    buf = bytearray(block)
    start, got = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                got += n
    return got / _elapsed(start)


def measure_write_rate(url: str, nbytes: int = 256 << 20, file_bytes: int = 16 << 20) -> float:
    """Bytes/s writing ``nbytes`` of random bytes as files of ``file_bytes`` into a temporary
    probe directory under ``url`` (a local directory, ``file://`` URL or any fsspec URL). Local
    files are written with plain writes and each is fdatasync'ed inside the timing: a store that
    outgrows the page cache is bound by the disk. Other filesystems use ``fs.pipe_file``."""
    payloads = _payloads(nbytes, file_bytes)  # generated before timing
    with _probe(url) as (fs, probe, local):
        start = time.perf_counter()
        _write_files(fs, probe, local, payloads)
        return nbytes / _elapsed(start)


def measure_read_rate(url: str, nbytes: int = 256 << 20) -> float:
    """Bytes/s reading back ``nbytes`` written in a temporary probe directory under ``url``. Local
    files are first dropped from the page cache: a store worth planning for is read from the disk,
    not from memory (here 1.3 GB/s from the disk against 8 GB/s from the cache). Other
    filesystems are read with ``fs.cat_file``."""
    payloads = _payloads(nbytes, _PROBE_FILE_BYTES)
    with _probe(url) as (fs, probe, local):
        paths = _write_files(fs, probe, local, payloads)
        if local:
            drop_page_cache(paths)
            return read_rate(paths)
        start, got = time.perf_counter(), 0
        for path in paths:
            got += len(fs.cat_file(path))
        return got / _elapsed(start)


def _payloads(nbytes: int, file_bytes: int) -> list[bytes]:
    """``nbytes`` split into files of ``file_bytes`` (the last one shorter), one random block."""
    if nbytes < 1 or file_bytes < 1:
        raise ValueError(f"nbytes={nbytes} and file_bytes={file_bytes} must be >= 1")
    block = np.random.default_rng(0).bytes(min(nbytes, file_bytes))
    full, rest = divmod(nbytes, len(block))
    return [block] * full + ([block[:rest]] if rest else [])


def _write_files(
    fs: fsspec.AbstractFileSystem, probe: str, local: bool, payloads: list[bytes]
) -> list[str]:
    """Write payloads as probe/00000, probe/00001, ...; return their paths."""
    paths = [f"{probe}/{k:05d}" for k in range(len(payloads))]
    for path, data in zip(paths, payloads, strict=True):
        if local:
            _write_synced(path, data)
        else:
            fs.pipe_file(path, data)
    return paths


def _write_synced(path: str, data: bytes) -> None:
    """Plain writes to a new file, then fdatasync (fsync where fdatasync is missing)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        getattr(os, "fdatasync", os.fsync)(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _probe(url: str) -> Iterator[tuple[fsspec.AbstractFileSystem, str, bool]]:
    """(fs, probe directory under url, local?): the probe is removed on the way out; OSErrors
    while probing become a ValueError naming ``url``."""
    fs, root, local = _store_root(url)
    probe = f"{root}/{_PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        if local:
            probe = tempfile.mkdtemp(prefix=_PROBE_PREFIX, dir=root)
        yield fs, probe, local
    except OSError as e:
        raise ValueError(
            f"cannot write a throughput probe under {url!r} ({e}); pass a store URL that "
            "exists and that you can write to"
        ) from e
    finally:
        _remove_probe(fs, probe, local)


def _store_root(url: str) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """(fs, root path, local?) for a path, file:// URL or fsspec URL; a local root is the
    nearest existing directory (:func:`probe_location`), which must be writable."""
    url = os.fspath(url)
    fs, root = fsspec.core.url_to_fs(url)
    local = isinstance(fs, LocalFileSystem)
    if local:
        root = probe_location(url)
        if not os.access(root, os.W_OK | os.X_OK):
            raise ValueError(f"store directory {root!r} (where {url!r} would be created) is not "
                             "writable; pass a store path you can write to")  # fmt: skip
    return fs, root if local else root.rstrip("/"), local


def _remove_probe(fs: fsspec.AbstractFileSystem, probe: str, local: bool) -> None:
    if local:
        shutil.rmtree(probe, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        fs.rm(probe, recursive=True)


def _elapsed(start: float) -> float:
    """Seconds since ``start``, never 0 (a rate must stay finite)."""
    return max(time.perf_counter() - start, 1e-9)


if __name__ == "__main__":
    _worker_tile_main(sys.argv[1:])
