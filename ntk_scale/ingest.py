"""The ingest stage: CSV / Parquet tables -> chunked Zarr arrays X and y, and the transform.

``ingest(source, out, IngestOptions(...))`` reads the table with dask.dataframe, splits off the
test rows, learns the :class:`~ntk_scale.tables.TableTransform` on the training rows only, and
writes (local path or URL prefix ``out``)::

    x_train.zarr   (n, d) float64, (block, d) chunks, crc32c-checked
    y_train.zarr   (n,) float64 target, in its own units (the solve standardises it with the
                   transform)
    x_test.zarr, y_test.zarr   the same for the test rows (with a test split)
    transform.json the transform (written last: a directory without it is not an ingest)

Nothing is written before the table has been validated (columns, types, missing values,
constant columns). The dask graphs run on dask's threads, or with ``address`` (or RAY_ADDRESS)
on the Ray cluster through Ray's dask scheduler. Memory: a few table partitions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

from ntk_scale.cluster import ensure_ray
from ntk_scale.options import option
from ntk_scale.plan import DEFAULT_TILE
from ntk_scale.pool import shutdown_pools
from ntk_scale.progress import Progress
from ntk_scale.store import atomic_put, url_fs, zarr_store
from ntk_scale.tables import FILLS, TableTransform, check_fill, learn, read_table

ARRAYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    """What to read and how (the one definition of the ingest defaults).

    features: feature columns; target: the target column (None: features only). categorical:
    feature columns to one-hot even if numeric (text columns always are). fill: "error" |
    "drop" | "mean" (see :mod:`ntk_scale.tables`). test_fraction: rows split off at random for
    testing (or test_source: a separate table). train_rows / test_rows: keep exactly this many
    (a random subset). standardize_target: solve in standard units of the target. block: rows
    per Zarr chunk. seed: of the split.
    """

    features: tuple[str, ...] = option(help="with a table: its feature columns (comma-separated "
                                       "on the command line)", section="data")  # fmt: skip
    target: str | None = option(None, "the (numeric) target column", section="data")
    categorical: tuple[str, ...] = option((), "numeric columns to one-hot as categories (text "
                                          "columns always are)", section="data")  # fmt: skip
    fill: str = option("error", "missing values: error, drop the rows, or fill with the "
                       "training mean (categorical: a '<missing>' category)", section="data",
                       choices=FILLS)  # fmt: skip
    test_fraction: float | None = option(None, "split this fraction of the rows off at random "
                                         "as test rows", section="data")  # fmt: skip
    test_source: str | None = option(None, "a separate table of test rows", section="data",
                                     flag="--test", key="test_table")  # fmt: skip
    train_rows: int | None = option(None, "keep this many training rows", section="data")
    test_rows: int | None = option(None, "keep this many test rows", section="data")
    standardize_target: bool = option(True, "solve for the target in its own units",
                                      section="data", flag="--no-standardize-target",
                                      const=False)  # fmt: skip
    block: int = option(DEFAULT_TILE, "rows per chunk", section="data")
    seed: int = option(0, "seed of the split", section="data")
    overwrite: bool = option(False, "replace an earlier ingest at --out", section="data",
                             key=None)  # fmt: skip

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("no feature columns: name them, e.g. --features carat,cut,depth")
        if self.target in self.features:
            raise ValueError(f"{self.target!r} is both the target and a feature; drop it from "
                             "--features")  # fmt: skip
        check_fill(self.fill)
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction}; use a fraction in (0, 1)")
        if self.test_fraction is not None and self.test_source is not None:
            raise ValueError("give a test fraction or a test table, not both")
        for name in ("train_rows", "test_rows", "block"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.test_rows is not None and self.test_fraction is None and not self.test_source:
            raise ValueError("test_rows needs a test split: give --test-fraction or --test")


@dataclasses.dataclass(frozen=True)
class IngestReport:
    """What was written: rows per split, the features, dropped rows, seconds."""

    out: str
    transform: TableTransform
    rows: dict[str, int]
    dropped: int
    seconds: float

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        return (
            f"ingested {parts} rows x {self.transform.d} features "
            f"({len(self.transform.numeric)} numeric, {len(self.transform.categorical)} "
            f"categorical columns one-hot); dropped {self.dropped} rows; "
            f"{self.seconds:.1f} s; wrote {self.out}"
        )


def ingest(
    source: str, out: str, options: IngestOptions, *, address: str | None = None,
    progress: bool = True,
) -> IngestReport:  # fmt: skip
    """Read ``source`` (CSV / Parquet: a file, glob or directory, local or a URL) and write the
    arrays and transform of the module docstring under ``out``."""

    o, start = options, time.perf_counter()
    cols = list(o.features) + ([o.target] if o.target else [])
    _refuse_existing(out, o.overwrite)
    with _scheduler(address):
        table = read_table(source, cols)
        test = read_table(o.test_source, cols) if o.test_source else None
        dropped = 0
        if o.fill == "drop":
            total = len(table)
            table = table.dropna(subset=cols)
            dropped = total - len(table)
            test = None if test is None else test.dropna(subset=cols)
        train, test = _split(table, test, o)
        transform = learn(_frame(train, table), o.features, o.target, o.categorical, o.fill,
                          o.standardize_target, source)  # fmt: skip
        fs, root = url_fs(out)
        _clear(fs, root)  # an earlier ingest there (with overwrite): never half old, half new
        fs.makedirs(root, exist_ok=True)
        try:
            rows = {"train": _write(train, transform, out, "train", o, progress)}
            if test is not None:
                rows["test"] = _write(test, transform, out, "test", o, progress)
        except BaseException:
            _clear(fs, root)  # a value only the full pass finds: nothing half-written stays
            raise

    atomic_put(fs, f"{root}/transform.json", transform.to_json().encode())
    return IngestReport(out, transform, rows, dropped, time.perf_counter() - start)


def _clear(fs: Any, root: str) -> None:
    """Remove an ingest's files at root (what _refuse_existing allowed to be replaced)."""
    for name in ("transform.json", *(f"{a}.zarr" for a in ARRAYS)):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
    with contextlib.suppress(OSError):
        if fs.exists(root) and not fs.ls(root):
            fs.rmdir(root)


def _refuse_existing(out: str, overwrite: bool) -> None:
    """An earlier ingest at ``out`` is replaced only with overwrite; anything else is refused."""

    fs, root = url_fs(out)
    if not fs.exists(root) or not fs.ls(root):
        return
    names = {os.path.basename(p.rstrip("/")) for p in fs.ls(root)}
    ours = names <= {f"{a}.zarr" for a in ARRAYS} | {"transform.json"}
    if not ours:
        raise ValueError(f"{out} exists and holds other files ({sorted(names)[:3]}); ingest "
                         "into a new directory")  # fmt: skip
    if not overwrite:
        raise ValueError(f"{out} holds an earlier ingest; pass --overwrite to replace it")


@contextlib.contextmanager
def _scheduler(address: str | None) -> Iterator[None]:
    """dask's threads, or the Ray cluster at ``address`` / RAY_ADDRESS (Ray's dask scheduler)."""
    import dask

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        with dask.config.set(scheduler="threads"):
            yield
        return
    from ray.util.dask import ray_dask_get

    ensure_ray(address)
    # The graph runs as Ray tasks of one CPU each: this process's idle pool would hold every CPU
    # slot it was given, and the tasks would wait for them forever. It starts again on use.
    shutdown_pools()
    with dask.config.set(scheduler=ray_dask_get):
        yield


def partitions(ddf: Any) -> list[tuple[Any, int]]:
    """(delayed partition, its row count) of a dask DataFrame (one pass to count)."""
    import dask

    delayed = ddf.to_delayed()
    lengths = dask.compute(*[dask.delayed(len)(p) for p in delayed])
    return list(zip(delayed, (int(k) for k in lengths), strict=True))


def _frame(parts: list[tuple[Any, int]], like: Any) -> Any:
    import dask.dataframe as dd

    return dd.from_delayed([p for p, _ in parts], meta=like._meta, verify_meta=False)


def _split(table: Any, test: Any, o: IngestOptions) -> tuple[list, list | None]:
    """(training partitions, test partitions or None), each (delayed rows, count): a seeded
    random split of ``table`` with exact counts (test_fraction of the rows, or test_rows;
    train_rows or the rest), or the separate test table."""
    import dask
    import numpy as np

    parts = partitions(table)
    test_parts = None if test is None else partitions(test)
    if o.test_fraction is None and o.train_rows is None:
        return parts, test_parts
    n = sum(k for _, k in parts)
    n_test = 0 if o.test_fraction is None else o.test_rows or round(o.test_fraction * n)
    n_train = o.train_rows or n - n_test
    if n_train + n_test > n:
        raise ValueError(f"the table has {n} rows, fewer than the {n_train} training + {n_test} "
                         "test rows asked for; ask for fewer")  # fmt: skip
    labels = np.full(n, 2, dtype=np.int8)  # 0 train, 1 test, 2 unused
    order = np.random.default_rng(o.seed).permutation(n)
    labels[order[:n_train]], labels[order[n_train : n_train + n_test]] = 0, 1
    take, offsets = dask.delayed(_rows_where), np.cumsum([0] + [k for _, k in parts])
    split = []
    for label in (0, 1):
        split.append([
            (take(p, labels[a:b] == label), int((labels[a:b] == label).sum()))
            for (p, _), a, b in zip(parts, offsets[:-1], offsets[1:], strict=True)
        ])  # fmt: skip
    return split[0], split[1] if o.test_fraction is not None else test_parts


def _rows_where(df: Any, mask: Any) -> Any:
    return df[mask]


def _write(parts: list, transform: TableTransform, out: str, split: str, o: IngestOptions,
           progress: bool) -> int:  # fmt: skip
    """X and y of ``parts`` as Zarr under out; returns the row count."""
    root = out.rstrip("/")
    y_url = f"{root}/y_{split}.zarr" if transform.target else None
    return write_arrays(parts, transform, f"{root}/x_{split}.zarr", y_url, o.block,
                        f"ingest {split}", progress)  # fmt: skip


def write_arrays(
    parts: list[tuple[Any, int]], transform: TableTransform, x_url: str, y_url: str | None,
    block: int, stage: str = "ingest", progress: bool = True,
) -> int:  # fmt: skip
    """transform's features of the rows ``parts`` ((delayed partition, count), see
    :func:`partitions`) as an (n, d) Zarr array at x_url (and its targets at y_url), in
    (block, d) chunks. Each partition is read once, for X and y together (one graph).
    Returns n."""
    import dask
    import dask.array as da
    import zarr
    from zarr.codecs import Crc32cCodec

    parts = [(p, k) for p, k in parts if k > 0]
    n = sum(k for _, k in parts)
    if n == 0:
        raise ValueError(f"{stage}: no rows to write; give a table with rows")
    d, x_of, y_of = transform.d, dask.delayed(transform.features), dask.delayed(transform.targets)
    x = da.concatenate([da.from_delayed(x_of(p), (k, d), "f8") for p, k in parts])
    arrays = [(x.rechunk((block, d)), x_url, (block, d))]
    if y_url is not None:
        y = da.concatenate([da.from_delayed(y_of(p), (k,), "f8") for p, k in parts])
        arrays.append((y.rechunk((block,)), y_url, (block,)))
    zs = [
        zarr.create_array(
            zarr_store(url),
            shape=arr.shape,
            chunks=chunks,
            dtype="float64",
            compressors=[Crc32cCodec()],
            filters=None,
            fill_value=0.0,
            overwrite=True,
        )  # fmt: skip
        for arr, url, chunks in arrays
    ]
    stored = da.store([a for a, _, _ in arrays], zs, lock=False, compute=False)
    stored = list(stored) if isinstance(stored, (list, tuple)) else [stored]
    tasks = len(set().union(*(s.__dask_graph__().keys() for s in stored)))
    bar = Progress(stage, tasks, "tasks", enabled=progress)
    with bar, _DaskProgress(bar):
        dask.compute(*stored)
        bar.update(done=tasks)
    return n


def table_features(source: str, transform: TableTransform, x_url: str, block: int = DEFAULT_TILE,
                   progress: bool = True) -> Any:  # fmt: skip
    """The features of every row of the table at ``source`` (prediction rows: none dropped,
    a missing value is an error unless the transform fills it) written to x_url; returns the
    lazy Zarr array."""
    import zarr

    write_arrays(partitions(read_table(source, transform.columns)), transform, x_url, None,
                 block, stage="transform X*", progress=progress)  # fmt: skip
    return zarr.open_array(zarr_store(x_url, read_only=True), mode="r")


class _DaskProgress:
    """Advances a Progress for every finished dask task (on dask's local schedulers; on Ray's
    the bar shows the total at the end)."""

    def __init__(self, bar: Progress):
        from dask.callbacks import Callback

        class _Tasks(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                bar.update(advance=1)

        self._cb = _Tasks()

    def __enter__(self) -> _DaskProgress:
        self._cb.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cb.__exit__(*exc)


def load_split(out: str, split: str = "train") -> tuple[Any, Any]:
    """(X, y) of an ingest's split as lazy Zarr arrays (y None without a target)."""
    import zarr

    x = zarr.open_array(zarr_store(f"{out.rstrip('/')}/x_{split}.zarr", read_only=True), mode="r")
    try:
        y = zarr.open_array(zarr_store(f"{out.rstrip('/')}/y_{split}.zarr", read_only=True),
                            mode="r")  # fmt: skip
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        y = None
    return x, y


__all__ = ["IngestOptions", "IngestReport", "ingest", "load_split"]
