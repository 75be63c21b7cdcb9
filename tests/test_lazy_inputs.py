"""Inputs of any size: dask, Zarr and memory-mapped inputs give the same store and predictions as
NumPy; predictions written to Zarr block by block, resumed after a SIGKILL mid-run, a torn block
recomputed; a table predicted through the model's saved transform, in the target's units.

Oracles: the dense float64 solve (scipy.linalg.cho_solve on the FC kernel), and for the table
the transform written out with pandas arithmetic.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import zarr
from processes import SCRIPTS

from ntk_scale import FullyConnected, stages
from ntk_scale.cli import main
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.predict import predict_from_store
from ntk_scale.store import GramStore

SPEC = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)
RUN = RunOptions(workers=2, progress=False, wait_seconds=0.5)
N, D, M, TILE, RIDGE = 300, 6, 530, 64, 1e-2  # X* in 9 row blocks


def _data():
    rng = np.random.default_rng(5)
    x, xs = rng.normal(size=(N, D)), rng.normal(size=(M, D))
    y = np.stack([np.sin(x[:, 0]) + x[:, 1], np.cos(x[:, 2])], axis=1)
    return x, y, xs


def _dense(x, y, xs):
    K = SPEC.kernel(x, dtype="float64")
    lam = RIDGE * np.trace(K) / len(K)
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(len(K))), y)
    return SPEC.kernel(xs, x, dtype="float64") @ alpha


def _zarr(path, a, chunks):
    z = zarr.create_array(str(path), shape=a.shape, chunks=chunks, dtype=a.dtype)
    z[...] = a
    return zarr.open_array(str(path), mode="r")


@pytest.fixture(scope="module")
def fitted(ray_local, tmp_path_factory):
    """A model fitted from NumPy inputs (float64 store), plus the data."""
    root = tmp_path_factory.mktemp("lazy")
    x, y, xs = _data()
    store = str(root / "gram.zarr")
    stages.gram(x, SPEC, store, GramOptions(dtype="float64", tile=TILE), RUN)
    s = stages.solve(store, y, SolveOptions(ridge=RIDGE, tol=1e-10, rank=100), RUN,
                     model_dir=str(root / "model"))  # fmt: skip
    np.save(root / "xs.npy", xs)
    return {"root": root, "x": x, "y": y, "xs": xs, "store": store, "alpha": s.alpha,
            "model": str(root / "model"), "dense": _dense(x, y, xs)}  # fmt: skip


def test_dask_and_zarr_inputs_make_the_same_store(fitted, tmp_path):
    x = fitted["x"]
    want = GramStore.open(fitted["store"])
    for name, lazy in (
        ("dask", da.from_array(x, chunks=(70, D))),  # chunks that straddle tiles
        ("zarr", _zarr(tmp_path / "x.zarr", x, (50, D))),
        ("memmap", _memmap(tmp_path / "x.npy", x)),
    ):
        url = str(tmp_path / f"{name}.zarr")
        stages.gram(lazy, SPEC, url, GramOptions(dtype="float64", tile=TILE), RUN,
                    compute_tiles=False)  # fmt: skip
        got = GramStore.open(url)
        assert got.meta.x_rows_fingerprint == want.meta.x_rows_fingerprint, name
        assert got.fingerprint == want.fingerprint, name
        np.testing.assert_array_equal(got.diagonal(), want.diagonal())


def _memmap(path, a):
    np.save(path, a)
    return np.load(path, mmap_mode="r")


def test_lazy_x_star_gives_the_numpy_predictions(fitted, tmp_path):
    xs = fitted["xs"]
    ref = predict_from_store(fitted["store"], fitted["alpha"], xs, RUN)
    err = np.max(np.abs(ref - fitted["dense"])) / np.max(np.abs(fitted["dense"]))
    assert err < 1e-7, f"predictions differ from the dense solve by {err:.1e}"
    for lazy in (da.from_array(xs, chunks=(100, D)), _zarr(tmp_path / "xs.zarr", xs, (77, D)),
                 np.load(fitted["root"] / "xs.npy", mmap_mode="r")):  # fmt: skip
        got = predict_from_store(fitted["store"], fitted["alpha"], lazy, RUN)
        np.testing.assert_array_equal(got, ref)


def test_zarr_predictions_are_written_block_by_block_and_a_rerun_skips_them(fitted, tmp_path):
    ref = predict_from_store(fitted["store"], fitted["alpha"], fitted["xs"], RUN)
    out, seen = str(tmp_path / "pred.zarr"), []
    arr = predict_from_store(fitted["store"], fitted["alpha"], fitted["xs"], RUN, seen.append,
                             out=out)  # fmt: skip
    assert sorted(seen) == list(range(9)) and arr.chunks == (TILE, 2)
    np.testing.assert_array_equal(arr[:], ref)
    seen.clear()
    predict_from_store(fitted["store"], fitted["alpha"], fitted["xs"], RUN, seen.append, out=out)
    assert seen == []  # every block was written and checksummed: nothing recomputed
    # a torn block (its bytes changed after the marker) is found by its checksum and recomputed
    chunk = tmp_path / "pred.zarr" / "c" / "4" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    predict_from_store(fitted["store"], fitted["alpha"], fitted["xs"], RUN, seen.append, out=out)
    assert seen == [4]
    np.testing.assert_array_equal(zarr.open_array(out)[:], ref)


def test_other_predictions_at_the_path_are_refused(fitted, tmp_path):
    out = str(tmp_path / "pred.zarr")
    predict_from_store(fitted["store"], fitted["alpha"], fitted["xs"][:100], RUN, out=out)
    with pytest.raises(ValueError, match="predictions of another model or input"):
        predict_from_store(fitted["store"], fitted["alpha"], fitted["xs"], RUN, out=out)
    arr = predict_from_store(fitted["store"], fitted["alpha"], fitted["xs"], RUN, out=out,
                             overwrite=True)  # fmt: skip
    assert arr.shape == (M, 2)


def test_a_killed_predict_resumes_and_equals_an_uninterrupted_run(fitted, tmp_path):
    ref = predict_from_store(fitted["store"], fitted["alpha"], fitted["xs"], RUN)
    out = str(tmp_path / "pred.zarr")
    argv = [sys.executable, str(SCRIPTS / "predict_driver.py"), fitted["model"],
            str(fitted["root"] / "xs.npy"), out]  # fmt: skip
    killed = subprocess.run([*argv, "3"], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILLed itself mid-run
    assert "finished" not in killed.stdout
    done_before = killed.stdout.count("block ")
    assert 3 <= done_before < 9
    rerun = subprocess.run([*argv, "0"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("block ") == 9 - done_before  # only the missing blocks ran
    np.testing.assert_array_equal(zarr.open_array(out)[:], ref)


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_a_table_is_predicted_through_the_saved_transform_in_target_units(ray_local, tmp_path):
    rng = np.random.default_rng(9)
    n = 360
    df = pd.DataFrame({"u": rng.normal(10, 3, n), "v": rng.uniform(0, 100, n),
                       "kind": rng.choice(["p", "q", "r"], n)})  # fmt: skip
    df["price"] = 500 + 40 * df["u"] + 2 * df["v"] + df["kind"].map({"p": 0, "q": 60, "r": -30})
    train, test = df.iloc[:300], df.iloc[300:].copy()
    train.to_parquet(tmp_path / "train.parquet")
    test.loc[test.index[:3], "kind"] = "unseen"  # a category only in test rows
    test.drop(columns="price").to_csv(tmp_path / "new.csv", index=False)
    out = str(tmp_path / "data")
    steps = [
        ["ingest", str(tmp_path / "train.parquet"), "--out", out, "--features", "u,v,kind",
         "--target", "price", "--no-progress"],
        ["gram", "--x", f"{out}/x_train.zarr", "--store", str(tmp_path / "g.zarr"), "--depth",
         "2", "--W-std", "1.4", "--b-std", "0.1", "--dtype", "float64", "--tile", "128",
         "--workers", "2", "--no-progress"],
        ["solve", "--store", str(tmp_path / "g.zarr"), "--y", f"{out}/y_train.zarr",
         "--model-dir", str(tmp_path / "m"), "--transform", f"{out}/transform.json", "--ridge",
         str(RIDGE), "--tol", "1e-10", "--rank", "100", "--no-progress"],
        ["predict", "--model-dir", str(tmp_path / "m"), "--x", str(tmp_path / "new.csv"),
         "--out", str(tmp_path / "p.zarr"), "--workers", "2", "--no-progress"],
    ]  # fmt: skip
    for argv in steps:
        code, _, err = _cli(argv)
        assert code == 0, f"{argv[0]}: {err[-2000:]}"

    # the oracle: the transform by hand (train statistics, sorted categories, unseen -> zeros),
    # a dense solve on the standardised target, mapped back to its units
    def feats(rows):
        num = [(rows[c] - train[c].mean()) / train[c].std(ddof=0) for c in ("u", "v")]
        hot = [(rows["kind"] == k).astype(float) for k in ("p", "q", "r")]
        return np.stack(num + hot, axis=1)

    mu, sd = train["price"].mean(), train["price"].std(ddof=0)
    K = SPEC.kernel(feats(train), dtype="float64")
    lam = RIDGE * np.trace(K) / len(K)
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(len(K))),
                                   (train["price"].to_numpy() - mu) / sd)  # fmt: skip
    want = SPEC.kernel(feats(test), feats(train), dtype="float64") @ alpha * sd + mu
    got = zarr.open_array(str(tmp_path / "p.zarr"))[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-7)
    assert np.sqrt(np.mean((got[3:] - test["price"].to_numpy()[3:]) ** 2)) < 0.2 * sd
