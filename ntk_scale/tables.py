"""Tables as features: CSV or Parquet files read by dask.dataframe, and the transform learned on
the training rows that turns a table into the (n, d) float64 inputs of a kernel.

The transform (:class:`TableTransform`, frozen, saved as JSON with the model):

- numeric feature columns are standardised, (v - mean) / std, with the training rows' mean and
  population std; a constant column is refused (it carries nothing);
- categorical feature columns (object, string, category or bool dtypes, or named as
  categorical) are one-hot encoded over the categories seen in the training rows, in sorted
  order; **a value not seen in the training rows encodes as all zeros** (it is like none of
  the known categories);
- missing values are an error naming the column and its count, unless a fill policy says
  otherwise: ``drop`` drops training and test rows with a missing value in a selected column
  (prediction rows are never dropped: a missing value there is an error); ``mean`` fills a
  numeric feature with its training mean and gives a categorical one the category
  ``<missing>``; targets are never filled;
- the numeric target is standardised too, unless told not to: the solve sees (y - mean) / std
  and predictions are mapped back to the target's units.

Every function here is pure pandas / numpy (a dataframe partition in, arrays out) except
:func:`read_table` and :func:`learn`, which build and run dask graphs.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

FILLS = ("error", "drop", "mean")
#: The category a missing categorical value takes under fill = "mean".
MISSING = "<missing>"
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


# -- the transform ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Numeric:
    """A standardised numeric column: (v - mean) / std; fill: its value for a missing entry
    (the training mean under fill = "mean", else None)."""

    name: str
    mean: float
    std: float
    fill: float | None = None


@dataclasses.dataclass(frozen=True)
class Categorical:
    """A one-hot encoded column over ``categories`` (strings, sorted); fill: the category of a
    missing entry (``<missing>`` under fill = "mean", else None)."""

    name: str
    categories: tuple[str, ...]
    fill: str | None = None


@dataclasses.dataclass(frozen=True)
class TableTransform:
    """Table -> features (and targets): numeric then categorical columns, in that order.

    target: the target column (None for features only); target_mean / target_std: the model
    units of the target are (y - target_mean) / target_std (0 and 1: unchanged).
    """

    numeric: tuple[Numeric, ...]
    categorical: tuple[Categorical, ...]
    target: str | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    fill: str = "error"

    @property
    def columns(self) -> list[str]:
        """The feature columns the transform reads."""
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    @property
    def feature_names(self) -> list[str]:
        """One name per output feature: "carat", "cut=Fair", ..."""
        one_hot = [f"{c.name}={v}" for c in self.categorical for v in c.categories]
        return [c.name for c in self.numeric] + one_hot

    @property
    def d(self) -> int:
        return len(self.numeric) + sum(len(c.categories) for c in self.categorical)

    def features(self, df: Any) -> np.ndarray:
        """The (len(df), d) float64 features of a pandas DataFrame (one partition)."""
        out = np.zeros((len(df), self.d))
        for k, col in enumerate(self.numeric):
            v = _numeric_values(df[col.name], col.name)
            missing = np.isnan(v)
            if missing.any():
                if col.fill is None:
                    raise ValueError(_missing_message(col.name, int(missing.sum()), len(v)))
                v = np.where(missing, col.fill, v)
            out[:, k] = (v - col.mean) / col.std
        k = len(self.numeric)
        for col in self.categorical:
            codes = _codes(df[col.name], col)
            hit = codes >= 0  # -1: not seen in the training rows -> all zeros
            out[np.flatnonzero(hit), k + codes[hit]] = 1.0
            k += len(col.categories)
        return out

    def targets(self, df: Any) -> np.ndarray:
        """The (len(df),) float64 target in its own units."""
        y = _numeric_values(df[self.target], self.target)
        if np.isnan(y).any():
            raise ValueError(
                _missing_message(self.target, int(np.isnan(y).sum()), len(y))
                + " (targets are never filled: use --fill drop)"
            )
        return y

    def to_model_units(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float64) - self.target_mean) / self.target_std

    def from_model_units(self, pred: np.ndarray) -> np.ndarray:
        return np.asarray(pred, dtype=np.float64) * self.target_std + self.target_mean

    def to_dict(self) -> dict[str, Any]:
        return {"type": "table", **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableTransform:
        if d.get("type") != "table":
            raise ValueError(f"not a table transform: type={d.get('type')!r}")
        return cls(
            numeric=tuple(Numeric(**c) for c in d["numeric"]),
            categorical=tuple(
                Categorical(c["name"], tuple(c["categories"]), c.get("fill"))
                for c in d["categorical"]
            ),
            target=d.get("target"),
            target_mean=float(d.get("target_mean", 0.0)),
            target_std=float(d.get("target_std", 1.0)),
            fill=d.get("fill", "error"),
        )


def load_transform(path: str) -> TableTransform:
    """A transform from its JSON file (written by ``ntk-scale ingest``: OUT/transform.json)."""
    import fsspec

    try:
        with fsspec.open(path, "rt") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"transform file {path!r} does not exist; `ntk-scale ingest` writes OUT/transform.json"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"transform file {path!r} is not JSON ({err})") from None
    return TableTransform.from_dict(raw)


def _numeric_values(series: Any, name: str) -> np.ndarray:
    import pandas as pd

    try:
        return pd.to_numeric(series, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError):
        bad = series[pd.to_numeric(series, errors="coerce").isna() & series.notna()]
        raise ValueError(
            f"column {name!r} must be numeric but holds {bad.iloc[0]!r}; list it with "
            "--categorical, or clean it"
        ) from None


def _codes(series: Any, col: Categorical) -> np.ndarray:
    """Category codes (-1 for values not seen in training) of one column; missing entries take
    col.fill (or raise)."""
    import pandas as pd

    missing = series.isna().to_numpy()
    text = series.astype(object).where(~missing, None)
    if missing.any():
        if col.fill is None:
            raise ValueError(_missing_message(col.name, int(missing.sum()), len(series)))
        text = text.where(~missing, col.fill)
    text = text.map(_category_text)
    return pd.Index(col.categories).get_indexer(text.to_numpy()).astype(np.int64)


def _category_text(v: Any) -> str:
    """A category as text: 3 and 3.0 are "3" (a numeric column listed as categorical)."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _missing_message(name: str, count: int, rows: int) -> str:
    return (
        f"column {name!r} has {count} missing values (of {rows} rows); drop those rows with "
        "--fill drop, or fill them with --fill mean"
    )


# -- reading ------------------------------------------------------------------------------------
def is_table(source: str) -> bool:
    """True for CSV / Parquet files, globs of them, and directories of Parquet files."""
    lower = source.rstrip("/").lower()
    if lower.endswith(TABLE_SUFFIXES) or any(ch in source for ch in "*?["):
        return True
    if "://" not in source and os.path.isdir(source):
        names = os.listdir(source)
        return "zarr.json" not in names and any(n.lower().endswith(TABLE_SUFFIXES) for n in names)
    return False


def read_table(source: str, columns: Sequence[str] | None = None, blocksize: str = "64MB"):
    """A dask DataFrame of CSV or Parquet files: a file, a glob, or a directory (local or a URL
    such as s3://bucket/flights/*.parquet). Raises FileNotFoundError / ValueError naming the
    source and the fix."""
    import dask.dataframe as dd

    kind = _table_kind(source)
    try:
        if kind == "csv":
            ddf = dd.read_csv(source, blocksize=blocksize, assume_missing=True)
        else:
            ddf = dd.read_parquet(source)
    except FileNotFoundError:
        raise FileNotFoundError(f"no table at {source!r}; check the path or glob") from None
    except OSError as err:
        text = str(err).lower()
        if "no files" in text or "not found" in text or "resolved to no files" in text:
            raise FileNotFoundError(f"no files match {source!r}; check the path or glob") from None
        raise
    except Exception as err:  # pandas' EmptyDataError and parser errors
        if type(err).__name__ == "EmptyDataError":
            raise ValueError(f"{source} is empty (no header, no rows); give a table") from None
        raise ValueError(f"cannot read {source} as {kind}: {err}") from None
    if columns is not None:
        unknown = [c for c in columns if c not in ddf.columns]
        if unknown:
            raise ValueError(
                f"column {unknown[0]!r} is not in {source}; its columns are {list(ddf.columns)}"
            )
        ddf = ddf[list(columns)]
    return ddf


def _table_kind(source: str) -> str:
    lower = source.rstrip("/").lower()
    if lower.endswith(".csv") or lower.endswith(".csv*") or lower.endswith("*.csv"):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if "://" not in source and os.path.isdir(source):
        names = [n.lower() for n in os.listdir(source)]
        if any(n.endswith(".csv") for n in names):
            return "csv"
        return "parquet"
    local = glob.glob(source) if "://" not in source else []
    if local and all(p.lower().endswith(".csv") for p in local):
        return "csv"
    if "://" not in source and not local:
        raise FileNotFoundError(f"no files match {source!r}; check the path or glob")
    return "parquet"


# -- learning the transform ---------------------------------------------------------------------
def check_fill(fill: str) -> str:
    if fill not in FILLS:
        raise ValueError(f"fill={fill!r}; use one of {FILLS}")
    return fill


def kinds(ddf: Any, features: Sequence[str], categorical: Sequence[str] = ()) -> dict[str, str]:
    """ "numeric" or "categorical" for each feature column (from its dtype, or listed)."""
    import pandas as pd

    unknown = [c for c in categorical if c not in features]
    if unknown:
        raise ValueError(f"--categorical names {unknown[0]!r}, which is not a feature; add it to "
                         "--features or drop it from --categorical")  # fmt: skip
    out = {}
    for c in features:
        dtype = ddf[c].dtype
        numeric = pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
        out[c] = "categorical" if c in categorical or not numeric else "numeric"
    return out


def learn(
    ddf: Any,
    features: Sequence[str],
    target: str | None,
    categorical: Sequence[str] = (),
    fill: str = "error",
    standardize_target: bool = True,
    source: str = "the table",
) -> TableTransform:
    """The transform of ``features`` (and ``target``) learned on the training rows ``ddf`` (a
    dask DataFrame already restricted to training rows; with fill = "drop", rows with missing
    values already dropped). One dask pass. Raises ValueError naming the column and the fix."""
    import dask

    check_fill(fill)
    kind = kinds(ddf, features, categorical)
    num = [c for c in features if kind[c] == "numeric"]
    cat = [c for c in features if kind[c] == "categorical"]
    cols = list(features) + ([target] if target else [])
    if target is not None:
        _check_target(ddf, target)
    parts = {
        "rows": ddf.shape[0],
        "missing": ddf[cols].isna().sum(),
        "mean": ddf[num].mean() if num else None,
        "std": ddf[num].std(ddof=0) if num else None,
        "categories": [ddf[c].dropna().unique() for c in cat],
    }
    if target is not None:
        parts["y"] = (ddf[target].mean(), ddf[target].std(ddof=0))
    (got,) = dask.compute(parts)
    rows = int(got["rows"])
    if rows == 0:
        raise ValueError(f"{source} has no training rows; give a table with rows")
    missing = {c: int(v) for c, v in got["missing"].items() if int(v) > 0}
    _check_missing(missing, rows, fill, target)
    numeric = tuple(_numeric(c, got["mean"][c], got["std"][c], fill, missing) for c in num)
    cats = tuple(_categorical(c, got["categories"][k], fill, missing) for k, c in enumerate(cat))
    y_mean, y_std = (0.0, 1.0)
    if target is not None and standardize_target:
        y_mean, y_std = float(got["y"][0]), float(got["y"][1])
        if not np.isfinite(y_std) or y_std == 0:
            raise ValueError(f"target {target!r} is constant in the training rows; nothing to fit")
    return TableTransform(numeric, cats, target, y_mean, y_std, fill)


def _check_target(ddf: Any, target: str) -> None:
    import pandas as pd

    dtype = ddf[target].dtype
    if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
        raise ValueError(
            f"target column {target!r} is not numeric (dtype {dtype}); choose a numeric target "
            "column (a regression target)"
        )


def _check_missing(missing: dict[str, int], rows: int, fill: str, target: str | None) -> None:
    if target in missing and fill != "drop":
        raise ValueError(
            _missing_message(target, missing[target], rows)
            + "; targets are never filled: use --fill drop"
        )
    if missing and fill == "error":
        name, count = next(iter(missing.items()))
        more = "" if len(missing) == 1 else f" (and {len(missing) - 1} more columns: "
        more += "" if len(missing) == 1 else f"{sorted(set(missing) - {name})})"
        raise ValueError(_missing_message(name, count, rows) + more)


def _numeric(name: str, mean: float, std: float, fill: str, missing: dict[str, int]) -> Numeric:
    if not np.isfinite(std) or std == 0:
        raise ValueError(
            f"column {name!r} is constant in the training rows (every value is {mean:g}): it "
            "carries no information; drop it from --features"
        )
    value = float(mean) if fill == "mean" and name in missing else None
    return Numeric(name, float(mean), float(std), value)


def _categorical(name: str, values: Any, fill: str, missing: dict[str, int]) -> Categorical:
    cats = sorted({_category_text(v) for v in values})
    value = None
    if fill == "mean" and name in missing:
        value = MISSING
        cats.append(MISSING)
    if not cats:
        raise ValueError(f"column {name!r} has no values in the training rows; drop it")
    return Categorical(name, tuple(cats), value)
