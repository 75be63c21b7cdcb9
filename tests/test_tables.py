"""Tables in: CSV and Parquet ingestion (numeric, categorical and missing columns), the transform
learned on training rows only and applied unchanged at predict, unseen categories, and bad input
(exit 2, a message naming the column or file and the fix, nothing written).

The oracle for the transform is written out here with pandas arithmetic (column means and
population stds of the training rows, one-hot by hand), not through ntk_scale.tables.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import zarr

from ntk_scale.cli import main
from ntk_scale.ingest import IngestOptions, ingest, load_split
from ntk_scale.tables import TableTransform, load_transform

FEATURES = ("a", "b", "color", "size")


def _frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "a": rng.normal(3.0, 2.0, n),
        "b": rng.integers(0, 50, n).astype(float),
        "color": rng.choice(["red", "green", "blue"], n),
        "size": rng.choice([1, 2, 3], n),  # numeric codes, one-hot when named categorical
        "const": np.full(n, 7.0),
        "name": [f"r{i}" for i in range(n)],
    })  # fmt: skip
    df["y"] = 2 * df["a"] - df["b"] / 10 + (df["color"] == "red") * 3 + rng.normal(0, 0.1, n)
    return df


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _expected_features(train: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """The oracle: standardise a, b with train's mean / population std; one-hot color (sorted
    categories of train) and size (as text categories)."""
    cols = []
    for c in ("a", "b"):
        cols.append(((rows[c] - train[c].mean()) / train[c].std(ddof=0)).to_numpy()[:, None])
    for c in ("color", "size"):
        cats = sorted(train[c].astype(str).unique())
        cols.append(np.stack([(rows[c].astype(str) == v).to_numpy() for v in cats], 1))
    return np.hstack(cols).astype(float)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ingest_writes_the_transform_of_the_training_rows(tmp_path, fmt):
    df = _frame()
    train, test = df.iloc[:300], df.iloc[300:]
    src = tmp_path / "data"
    src.mkdir()
    for k, part in enumerate((train.iloc[:150], train.iloc[150:])):  # two files: a glob
        path = src / f"part{k}.{fmt}"
        part.to_csv(path, index=False) if fmt == "csv" else part.to_parquet(path)
    test_path = tmp_path / f"test.{fmt}"
    test.to_csv(test_path, index=False) if fmt == "csv" else test.to_parquet(test_path)
    out = str(tmp_path / "out")
    code, printed, err = _cli([
        "ingest", str(src / f"*.{fmt}"), "--out", out, "--features", ",".join(FEATURES),
        "--target", "y", "--categorical", "size", "--test", str(test_path), "--block", "64",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0, err
    assert "train 300, test 100 rows x 8 features" in printed
    x, y = load_split(out, "train")
    assert x.shape == (300, 8) and x.chunks == (64, 8)
    np.testing.assert_allclose(x[:], _expected_features(train, train), atol=1e-12)
    np.testing.assert_allclose(y[:], train["y"], rtol=0, atol=0)  # targets in their own units
    xt, yt = load_split(out, "test")
    # test rows use the TRAINING statistics, not their own
    np.testing.assert_allclose(xt[:], _expected_features(train, test), atol=1e-12)
    t = load_transform(f"{out}/transform.json")
    assert t.target_mean == pytest.approx(train["y"].mean())
    assert t.target_std == pytest.approx(train["y"].std(ddof=0))
    assert t.feature_names[:3] == ["a", "b", "color=blue"]


def test_random_split_is_seeded_and_statistics_come_from_train_only(tmp_path):
    df = _frame(600)
    df.to_parquet(tmp_path / "t.parquet")
    opts = IngestOptions(features=FEATURES, target="y", categorical=("size",),
                         test_fraction=0.25, seed=3)  # fmt: skip
    r1 = ingest(str(tmp_path / "t.parquet"), str(tmp_path / "o1"), opts, progress=False)
    ingest(str(tmp_path / "t.parquet"), str(tmp_path / "o2"), opts, progress=False)
    a1, a2 = load_split(str(tmp_path / "o1"))[0][:], load_split(str(tmp_path / "o2"))[0][:]
    np.testing.assert_array_equal(a1, a2)
    assert r1.rows["train"] + r1.rows["test"] == 600 and 0.15 < r1.rows["test"] / 600 < 0.35
    # standardised training columns have mean 0 and std 1 exactly on the training rows
    np.testing.assert_allclose(a1[:, :2].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(a1[:, :2].std(0), 1, atol=1e-12)
    test = load_split(str(tmp_path / "o1"), "test")[0][:]
    assert abs(test[:, 0].mean()) > 1e-6  # the test rows were not standardised on themselves


def test_exact_row_counts(tmp_path):
    _frame(1000).to_csv(tmp_path / "t.csv", index=False)
    opts = IngestOptions(features=("a", "b"), target="y", test_fraction=0.2, train_rows=500,
                         test_rows=120)  # fmt: skip
    r = ingest(str(tmp_path / "t.csv"), str(tmp_path / "o"), opts, progress=False)
    assert r.rows == {"train": 500, "test": 120}
    assert load_split(str(tmp_path / "o"), "test")[0].shape == (120, 2)


def test_an_unseen_category_encodes_as_all_zeros():
    train = _frame(50)
    t = TableTransform.from_dict(json.loads(_transform_json(train)))
    rows = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "color": ["red", "purple"],
                         "size": [1, 9]})  # fmt: skip
    f = t.features(rows)
    names = t.feature_names
    assert f[0, names.index("color=red")] == 1 and f[0, names.index("size=1")] == 1
    one_hot = [k for k, n in enumerate(names) if "=" in n]
    assert np.all(f[1, one_hot] == 0)  # purple and size 9 were never seen: all zeros


def _transform_json(train: pd.DataFrame) -> str:
    import dask.dataframe as dd

    from ntk_scale.tables import learn

    return learn(dd.from_pandas(train, npartitions=2), FEATURES, "y", ("size",)).to_json()


def test_missing_values_error_names_the_column_and_count_and_writes_nothing(tmp_path):
    df = _frame(200)
    df.loc[[3, 17, 40], "a"] = np.nan
    df.to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "out"
    code, _, err = _cli(["ingest", str(tmp_path / "t.csv"), "--out", str(out), "--features",
                         "a,b,color", "--target", "y", "--no-progress"])  # fmt: skip
    assert code == 2
    assert "column 'a' has 3 missing values (of 200 rows)" in err and "--fill" in err
    assert not out.exists()


@pytest.mark.parametrize("fill, rows", [("drop", 197), ("mean", 200)])
def test_fill_policies(tmp_path, fill, rows):
    df = _frame(200)
    df.loc[[3, 17], "a"] = np.nan
    df.loc[[40], "color"] = None
    df.to_parquet(tmp_path / "t.parquet")
    opts = IngestOptions(features=("a", "b", "color"), target="y", fill=fill)
    r = ingest(str(tmp_path / "t.parquet"), str(tmp_path / "o"), opts, progress=False)
    x = load_split(str(tmp_path / "o"))[0][:]
    assert x.shape[0] == rows and np.isfinite(x).all()
    if fill == "mean":
        kept = df.drop(index=[3, 17])
        mean = kept["a"].mean()
        assert r.transform.numeric[0].fill == pytest.approx(mean)
        # a missing entry takes the training mean: standardised, exactly 0
        assert x[3, 0] == pytest.approx(0.0, abs=1e-12)
        assert x[40, r.transform.feature_names.index("color=<missing>")] == 1
    else:
        assert r.dropped == 3


def test_transform_at_predict_refuses_missing_values_it_cannot_fill():
    t = TableTransform.from_dict(json.loads(_transform_json(_frame(50))))
    rows = pd.DataFrame({"a": [np.nan], "b": [1.0], "color": ["red"], "size": [1]})
    with pytest.raises(ValueError, match="column 'a' has 1 missing values"):
        t.features(rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--features", "a,nope"], "column 'nope' is not in"),
        (["--features", "a,b", "--target", "color"], "target column 'color' is not numeric"),
        (["--features", "a,const"], "column 'const' is constant"),
        (["--features", "a,b", "--target", "y", "--test-fraction", "1.5"], "test_fraction=1.5"),
        (["--features", "a,y", "--target", "y"], "both the target and a feature"),
        (["--features", "a", "--categorical", "b"], "--categorical names 'b'"),
    ],
)
def test_bad_input_exits_2_naming_the_column_and_writes_nothing(tmp_path, args, message):
    _frame(100).to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "out"
    code, _, err = _cli(["ingest", str(tmp_path / "t.csv"), "--out", str(out), *args,
                         "--no-progress"])  # fmt: skip
    assert code == 2, err
    assert message in err
    assert not out.exists()


def test_an_empty_or_missing_file_exits_2(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    for path, message in ((tmp_path / "empty.csv", "is empty"),
                          (tmp_path / "absent*.csv", "no files match")):  # fmt: skip
        code, _, err = _cli(["ingest", str(path), "--out", str(tmp_path / "o"), "--features",
                             "a", "--no-progress"])  # fmt: skip
        assert code == 2 and message in err, err
        assert not (tmp_path / "o").exists()


def test_a_non_numeric_value_in_a_numeric_target_names_it(tmp_path):
    df = _frame(50)
    df["y"] = df["y"].astype(object)
    df.loc[5, "y"] = "about 5"
    df.to_csv(tmp_path / "t.csv", index=False)
    code, _, err = _cli(["ingest", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"),
                         "--features", "a", "--target", "y", "--no-progress"])  # fmt: skip
    assert code == 2 and "target column 'y' is not numeric" in err


def test_a_second_ingest_needs_overwrite(tmp_path):
    _frame(60).to_csv(tmp_path / "t.csv", index=False)
    argv = ["ingest", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--features", "a",
            "--target", "y", "--no-progress"]  # fmt: skip
    assert _cli(argv)[0] == 0
    code, _, err = _cli(argv)
    assert code == 2 and "--overwrite" in err
    assert _cli([*argv, "--overwrite"])[0] == 0
    assert zarr.open_array(str(tmp_path / "o" / "x_train.zarr")).shape == (60, 1)
    assert os.path.exists(tmp_path / "o" / "transform.json")


def test_fit_config_with_a_data_table(ray_local, tmp_path):
    """`ntk-scale fit` on a [data] table: ingest, fit on the transformed rows, test metrics in
    the target's units, equal to a fit on the same ingested arrays."""
    df = _frame(240)
    df.to_parquet(tmp_path / "t.parquet")
    (tmp_path / "cfg.toml").write_text(
        '[data]\ntable = "t.parquet"\nfeatures = ["a", "b", "color"]\ntarget = "y"\n'
        "test_fraction = 0.25\n"
        '[kernel]\ndepth = 2\n[store]\npath = "g.zarr"\ntile = 64\ndtype = "float64"\n'
        "[solver]\nridge = 1e-3\ntol = 1e-10\nrank = 100\n"
        '[run]\nworkers = 2\n[output]\ndir = "out"\n'
    )
    code, printed, err = _cli(["fit", str(tmp_path / "cfg.toml")])
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    x, y = load_split(str(tmp_path / "out" / "data"), "train")
    xt, yt = load_split(str(tmp_path / "out" / "data"), "test")
    pred = np.load(tmp_path / "out" / "predictions.npy")
    assert pred.shape == (60, 1) or pred.shape == (60,)
    # the oracle: a dense float64 solve on the ingested arrays, the target standardised by hand
    import scipy.linalg

    from ntk_scale import FullyConnected

    spec = FullyConnected(depth=2)
    K = spec.kernel(x[:], dtype="float64")
    lam = 1e-3 * np.trace(K) / len(K)
    mu, sd = y[:].mean(), y[:].std()
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(len(K))),
                                   (y[:] - mu) / sd)  # fmt: skip
    want = spec.kernel(xt[:], x[:], dtype="float64") @ alpha * sd + mu
    np.testing.assert_allclose(pred.reshape(-1), want, rtol=1e-7)
    assert metrics["test"]["mse"] == pytest.approx(np.mean((want - yt[:]) ** 2), rel=1e-6)
    assert metrics["test"]["r2"] > 0.9


def test_bad_table_configs_exit_2(tmp_path):
    _frame(40).to_parquet(tmp_path / "t.parquet")
    base = '[store]\npath = "g.zarr"\n[output]\ndir = "out"\n'
    for data, message in (
        ('table = "t.parquet"\ntarget = "y"\n', "data.table needs data.features"),
        ('table = "t.parquet"\nx_train = "x.npy"\nfeatures = ["a"]\ntarget = "y"\n',
         "both name the training data"),
        ('x_train = "x.npy"\ny_train = "y.npy"\nfeatures = ["a"]\n', "applies to a table"),
        ('table = "t.parquet"\nfeatures = ["a"]\ntarget = "y"\nfill = "guess"\n', "fill='guess'"),
    ):  # fmt: skip
        (tmp_path / "cfg.toml").write_text(f"[data]\n{data}{base}")
        code, _, err = _cli(["fit", str(tmp_path / "cfg.toml")])
        assert code == 2 and message in err, err
        assert not (tmp_path / "out").exists()


def test_ingest_on_ray_equals_ingest_on_threads(ray_local, tmp_path, monkeypatch):
    """With an address, the dask graph runs as Ray tasks (Ray's dask scheduler, observed
    through a counting wrapper around the real one); the arrays agree."""
    import ray.util.dask

    calls, real = [], ray.util.dask.ray_dask_get

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ray.util.dask, "ray_dask_get", counting)
    _frame(300).to_csv(tmp_path / "t.csv", index=False)
    opts = IngestOptions(features=FEATURES, target="y", test_fraction=0.2)
    ingest(str(tmp_path / "t.csv"), str(tmp_path / "threads"), opts, progress=False)
    assert calls == []
    ingest(str(tmp_path / "t.csv"), str(tmp_path / "ray"), opts, progress=False, address="auto")
    assert len(calls) >= 3  # statistics, split counts, and the writes ran on Ray
    for split in ("train", "test"):
        for a, b in zip(load_split(str(tmp_path / "threads"), split),
                        load_split(str(tmp_path / "ray"), split), strict=True):  # fmt: skip
            np.testing.assert_array_equal(a[...], b[...])


def test_a_value_found_only_while_writing_leaves_nothing(tmp_path):
    """Missing values only in the test table surface in the writing pass (the statistics are
    the training rows'): exit 2 naming the column, and the half-written arrays are removed."""
    _frame(80).to_csv(tmp_path / "train.csv", index=False)
    test = _frame(30, seed=1)
    test.loc[4, "b"] = np.nan
    test.to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "out"
    code, _, err = _cli(["ingest", str(tmp_path / "train.csv"), "--test",
                         str(tmp_path / "test.csv"), "--out", str(out), "--features", "a,b",
                         "--target", "y", "--no-progress"])  # fmt: skip
    assert code == 2 and "column 'b' has 1 missing values" in err, err
    assert not out.exists()
