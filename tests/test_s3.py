"""Object storage for real: the Gram store, the model directory and the solver checkpoint on s3://
(fsspec + s3fs), against moto's standalone S3 server started on 127.0.0.1.

gram -> solve -> predict with the inputs and every output in a bucket, checked against a dense
float64 solve; a Gram driver killed with SIGKILL and rerun; a solve killed and resumed from its
checkpoint in the bucket; a flipped byte in a tile, in the model and in the checkpoint detected.
Credentials are dummies, in this process's environment only (moto accepts any).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.linalg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
BUCKET = "ntk-scale-test"
ROOT = f"s3://{BUCKET}"
# Ray's worker processes (which write the tiles themselves) inherit the environment of the process
# that starts Ray, and the session's local Ray starts after collection has imported this module:
# so the endpoint and the dummy credentials go into the environment here, at import. botocore
# reads AWS_ENDPOINT_URL (>= 1.31); nothing is read from a file.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "ntk-scale-test",
    "AWS_SECRET_ACCESS_KEY": "ntk-scale-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": ENDPOINT,
    "AWS_EC2_METADATA_DISABLED": "true",
}
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
    os.environ.pop(_name, None)
os.environ.update(S3_ENV)

from processes import SCRIPTS, kill_solve_driver, stop_group  # noqa: E402

from ntk_scale import FullyConnected, stages  # noqa: E402
from ntk_scale.cli import main  # noqa: E402
from ntk_scale.linalg.checkpoint import load_checkpoint  # noqa: E402
from ntk_scale.model import load_model  # noqa: E402
from ntk_scale.options import GramOptions, RunOptions  # noqa: E402
from ntk_scale.solve import CHECKPOINT_NAME, solve_store  # noqa: E402
from ntk_scale.store import GramStore, TileCorruptError  # noqa: E402

sys.path.insert(0, str(SCRIPTS))

SPEC = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)
KERNEL = ["--depth", "2", "--W-std", "1.4", "--b-std", "0.1", "--dtype", "float64"]
RIDGE, RANK, TOL = 1e-2, 50, 1e-8  # λ = ridge · mean(diag K); RPCholesky rank; ‖r‖/‖y‖
STORE = f"{ROOT}/run/gram.zarr"
MODEL = f"{ROOT}/run/model"
N, D, M, TILE = 300, 8, 40, 100  # 3 row blocks: 6 stored tiles


def _require_s3_packages() -> None:
    missing = [m for m in ("moto", "boto3", "s3fs", "flask") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed; the S3 end-to-end tests need them: install "
            '"moto[server]" boto3 aiobotocore s3fs in one pip call (the test extra), e.g. '
            "pip install -e '.[test]'",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def s3(ray_local, tmp_path_factory):
    """moto's S3 server on 127.0.0.1:PORT with an empty bucket; yields a boto3 client."""
    _require_s3_packages()
    import boto3

    # A lambda travels by value; a module-level function would make the worker import this module.
    probe = ray_local.remote(num_cpus=0)(lambda name: __import__("os").environ.get(name))
    seen = ray_local.get(probe.remote("AWS_ENDPOINT_URL"))
    if seen != ENDPOINT:
        pytest.fail(
            f"Ray workers see AWS_ENDPOINT_URL={seen!r}, not {ENDPOINT}: Ray was started before "
            "tests/test_s3.py set its environment at import",
            pytrace=False,
        )
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(PORT)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = boto3.client("s3")
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto_server exited: see {log.name}"
            try:
                client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() < deadline, f"moto_server never answered: see {log.name}"
                time.sleep(0.2)
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        stop_group(proc)
        log.close()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _put_zarr(url: str, a: np.ndarray) -> None:
    import zarr

    arr = zarr.create_array(
        store=url, shape=a.shape, chunks=(128,) + a.shape[1:], dtype=a.dtype, overwrite=True
    )
    arr[...] = a


def _load_npy(url: str) -> np.ndarray:
    import fsspec

    with fsspec.open(url, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _flip_byte(client, key: str, offset: int) -> bytes:
    """Flip one byte of an object in place; returns the original bytes."""
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    bad = bytearray(original)
    bad[offset] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(bad))
    return original


def _dense_fit(x, y, xs):
    K = SPEC.kernel(x, dtype="float64")
    lam = RIDGE * np.trace(K) / len(K)
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(len(K))), y)
    return alpha, SPEC.kernel(xs, x, dtype="float64") @ alpha


@pytest.fixture(scope="module")
def pipeline(s3):
    """`ntk-scale gram`, `solve` and `predict` with inputs, store, model, checkpoint and
    predictions all in the bucket. Returns the data and what each command printed."""
    rng = np.random.default_rng(11)
    x, xs = rng.normal(size=(N, D)), rng.normal(size=(M, D))
    y = np.stack([np.sin(x[:, 0]), np.cos(x[:, 1] * x[:, 2])], axis=1)
    for name, a in (("x", x), ("y", y), ("xs", xs)):
        _put_zarr(f"{ROOT}/data/{name}.zarr", a)
    data = {k: f"{ROOT}/data/{k}.zarr" for k in ("x", "y", "xs")}
    out = {}
    gram = ["gram", "--x", data["x"], "--store", STORE, "--tile", str(TILE), "--no-progress"]
    out["gram"] = _run_cli(gram + ["--workers", "2"] + KERNEL)
    solve = ["solve", "--store", STORE, "--y", data["y"], "--model-dir", MODEL]
    opts = ["--ridge", str(RIDGE), "--rank", str(RANK), "--tol", str(TOL)]
    out["solve"] = _run_cli(solve + opts + ["--checkpoint-every", "2"])
    predict = ["predict", "--model-dir", MODEL, "--x", data["xs"], "--out", f"{ROOT}/run/pred.npy"]
    out["predict"] = _run_cli(predict + ["--workers", "2"])
    return {"x": x, "y": y, "xs": xs, "printed": out}


def _run_cli(argv: list[str]) -> str:
    import contextlib

    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, f"ntk-scale {' '.join(argv)} exited {code}: {err.getvalue()[-3000:]}"
    return buf.getvalue()


def test_gram_solve_predict_with_everything_in_a_bucket(s3, pipeline):
    x, y, xs = pipeline["x"], pipeline["y"], pipeline["xs"]
    assert "6 tiles: 6 computed" in pipeline["printed"]["gram"]
    _, pred_ref = _dense_fit(x, y, xs)
    pred = _load_npy(f"{ROOT}/run/pred.npy")
    assert pred.shape == (M, 2)
    err = np.max(np.abs(pred - pred_ref)) / np.max(np.abs(pred_ref))
    assert err < 1e-6, f"predictions differ from the dense solve by {err:.2e}"

    keys = set(_keys(s3, "run/"))
    markers = {k for k in keys if k.startswith("run/gram.zarr/tiles/")}
    chunks = {k for k in keys if k.startswith("run/gram.zarr/gram/c/")}
    assert len(markers) == len(chunks) == 6
    for key in (
        "run/gram.zarr/zarr.json",
        "run/model/model.json",
        "run/model/alpha/zarr.json",
        "run/model/solve_report.json",
        f"run/model/checkpoint/{CHECKPOINT_NAME}",
    ):
        assert key in keys, key
    assert "run/gram.zarr/lock.json" not in keys, "the driver's lock was not released"

    meta = json.loads(s3.get_object(Bucket=BUCKET, Key="run/model/model.json")["Body"].read())
    assert meta["store"] == STORE and meta["solver"]["converged"] == [True, True]
    model = load_model(MODEL, GramStore.open(STORE))
    state = load_checkpoint(f"{MODEL}/checkpoint/{CHECKPOINT_NAME}", {})
    np.testing.assert_array_equal(state.x, model.alpha)  # the final checkpoint is the answer
    assert main(["verify", STORE]) == 0


def _count(client, prefix: str) -> int:
    return len(_keys(client, prefix))


def _wait_stable(client, prefix: str, seconds: float = 3.0, limit: float = 60.0) -> int:
    """Object count under prefix once it has stopped changing."""
    deadline, last, since = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = _count(client, prefix)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return now
        time.sleep(0.2)
    raise AssertionError(f"objects under {prefix} still changing a minute after the kill")


def _free_the_cores(ray) -> None:
    """Stop this process's workers and wait until Ray has their CPUs back."""
    import ntk_scale

    ntk_scale.shutdown()
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, "Ray did not release the workers' CPUs in 60 s"
        time.sleep(0.2)


def test_killed_gram_driver_resumes_from_the_bucket(ray_local, s3, tmp_path):
    """A driver process on the session's Ray, SIGKILLed mid-run (as when the machine running it
    is lost): its lock stays in the bucket, the rerun takes it over and computes only the tiles
    without a marker."""
    from gram_driver import SPEC as DRIVER_SPEC
    from gram_driver import data

    n, tile, total = 1200, 100, 78  # 12 row blocks
    url, prefix = f"{ROOT}/resume/gram.zarr", "resume/gram.zarr/tiles/"
    log = open(tmp_path / "driver.log", "w")
    address = ray_local.get_runtime_context().gcs_address
    _free_the_cores(ray_local)  # this process's worker pool holds the cluster's two CPUs
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "gram_driver.py"), url, str(n), str(tile)],
        env={**os.environ, "RAY_ADDRESS": address, "NTK_GRAM_SLEEP": "0.05"},
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while _count(s3, prefix) < 8:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the driver wrote no tiles in 240 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray then ends the actors the driver owned
        proc.wait(timeout=30)
        log.close()
    done_before = _wait_stable(s3, prefix)
    assert 8 <= done_before < total, f"the kill came too late ({done_before} tiles done)"
    assert "resume/gram.zarr/lock.json" in _keys(s3, "resume/"), "the killed driver held no lock"

    computed: list[dict] = []
    report = stages.gram(
        data(n),
        DRIVER_SPEC,
        url,
        GramOptions(dtype="float64", tile=tile),
        RunOptions(workers=2, progress=False, wait_seconds=1.0),
        on_tile=computed.append,
    )
    assert report.reused == done_before
    assert report.computed == len(computed) == total - done_before
    assert "resume/gram.zarr/lock.json" not in _keys(s3, "resume/")
    store = GramStore.open(url)
    check = store.verify()
    assert check.ok, check.summary()
    x = data(n)
    for i, j in [(0, 0), (3, 7), (11, 11)]:
        t = store.plan.tile_at(i, j)
        # Diagonal tiles use the symmetric kernel (exact diagonal), like the workers.
        rows = (x[t.rows],) if i == j else (x[t.rows], x[t.cols])
        want = DRIVER_SPEC.kernel(*rows, dtype="float64")
        np.testing.assert_allclose(store.read_tile(i, j), want, rtol=1e-12, atol=1e-14)


def test_killed_solve_resumes_from_its_checkpoint_in_the_bucket(s3, pipeline, tmp_path):
    """solve_driver.py (the CLI's solve settings) killed mid-way; the rerun continues from the
    checkpoint in the bucket along the same trajectory, to the CLI solve's answer."""
    y = pipeline["y"]
    ypath = tmp_path / "y.npy"
    np.save(ypath, y)
    out_dir, key = f"{ROOT}/solve-resume", f"solve-resume/{CHECKPOINT_NAME}"
    args = [STORE, out_dir, str(ypath), str(RIDGE), str(RANK), str(TOL)]
    last = kill_solve_driver(args, lambda it: it >= 4 and key in _keys(s3, "solve-resume/"))
    saved = load_checkpoint(f"{ROOT}/{key}", {}).iteration
    cli = load_model(MODEL)
    assert 2 <= saved <= last < cli.meta["solver"]["iterations"], "the kill came too late"

    kw = {"ridge": RIDGE, "preconditioner": "rpcholesky", "rank": RANK, "tol": TOL}
    resumed = solve_store(STORE, y, out_dir=out_dir, checkpoint_every=2, **kw)
    assert resumed.resumed_from == saved and resumed.result.converged.all()
    assert resumed.result.iterations == cli.meta["solver"]["iterations"]
    # Across processes the BLAS may round differently: equal to solver precision.
    np.testing.assert_allclose(resumed.result.x, cli.alpha, rtol=1e-7, atol=1e-12)


def test_corruption_in_the_bucket_is_detected(s3, pipeline, capsys):
    store = GramStore.open(STORE)
    good = store.read_tile(0, 2)
    original = _flip_byte(s3, "run/gram.zarr/gram/c/0/2", offset=1000)
    check = GramStore.open(STORE).verify()
    assert check.corrupted == [(0, 2)] and not check.missing, check.summary()
    with pytest.raises(TileCorruptError, match=r"tile \(0, 2\)"):
        GramStore.open(STORE).read_tile(0, 2)
    capsys.readouterr()
    assert main(["verify", STORE]) == 1
    assert "1 corrupted [(0, 2)]" in capsys.readouterr().out
    assert main(["verify", "--repair", "--workers", "2", STORE]) == 0, capsys.readouterr()
    np.testing.assert_array_equal(GramStore.open(STORE).read_tile(0, 2), good)
    repaired = s3.get_object(Bucket=BUCKET, Key="run/gram.zarr/gram/c/0/2")["Body"].read()
    assert repaired == original  # the recomputed tile has the same bytes

    alpha_keys = [k for k in _keys(s3, "run/model/alpha/c/")]
    original = _flip_byte(s3, alpha_keys[0], offset=8)
    try:
        with pytest.raises(Exception, match="(?i)checksum|crc"):
            load_model(MODEL)
    finally:
        s3.put_object(Bucket=BUCKET, Key=alpha_keys[0], Body=original)

    ckpt = f"run/model/checkpoint/{CHECKPOINT_NAME}"
    size = len(s3.get_object(Bucket=BUCKET, Key=ckpt)["Body"].read())
    original = _flip_byte(s3, ckpt, offset=size // 2)
    try:
        with pytest.raises(Exception):  # noqa: B017 - zipfile's CRC error or a format error
            load_checkpoint(f"{ROOT}/{ckpt}", {})
    finally:
        s3.put_object(Bucket=BUCKET, Key=ckpt, Body=original)
    assert load_model(MODEL).alpha.shape == (N, 2)


def test_tables_and_predictions_in_the_bucket(s3, pipeline):
    """`ingest` reads Parquet files from the bucket and writes X, y and the transform there;
    `predict` writes its Zarr predictions to the bucket block by block, and a rerun skips
    every block (each is found by its marker and checksum)."""
    import pandas as pd
    import zarr

    rng = np.random.default_rng(3)
    df = pd.DataFrame({"u": rng.normal(size=120), "c": rng.choice(["a", "b"], 120)})
    df["t"] = df["u"] * 2 + (df["c"] == "a")
    for k in range(2):
        s3.put_object(Bucket=BUCKET, Key=f"tables/part{k}.parquet",
                      Body=df.iloc[k * 60 : (k + 1) * 60].to_parquet())  # fmt: skip
    printed = _run_cli(["ingest", f"{ROOT}/tables/*.parquet", "--out", f"{ROOT}/ingested",
                        "--features", "u,c", "--target", "t", "--test-fraction", "0.25",
                        "--no-progress"])  # fmt: skip
    assert "train 90, test 30 rows x 3 features" in printed
    keys = set(_keys(s3, "ingested/"))
    assert "ingested/transform.json" in keys and "ingested/x_train.zarr/zarr.json" in keys
    x = zarr.open_array(f"{ROOT}/ingested/x_train.zarr", mode="r")[:]
    assert x.shape == (90, 3)
    # u standardised on the 90 training rows; c one-hot (a, b): one 1 per row
    assert abs(x[:, 0].mean()) < 1e-12 and abs(x[:, 0].std() - 1) < 1e-12
    assert np.all(np.isin(x[:, 1:], (0.0, 1.0))) and np.all(x[:, 1:].sum(axis=1) == 1)

    out = f"{ROOT}/run/pred.zarr"
    argv = ["predict", "--model-dir", MODEL, "--x", f"{ROOT}/data/xs.zarr", "--out", out,
            "--workers", "2", "--no-progress"]  # fmt: skip
    _run_cli(argv)
    _, want = _dense_fit(pipeline["x"], pipeline["y"], pipeline["xs"])
    got = zarr.open_array(out, mode="r")[:]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-6
    assert any(k.startswith("run/pred.zarr/tiles/") for k in _keys(s3, "run/pred.zarr/"))
    from ntk_scale.predict import predict_from_store

    m, seen = load_model(MODEL), []
    predict_from_store(m.store_url, m.alpha, zarr.open_array(f"{ROOT}/data/xs.zarr", mode="r"),
                       RunOptions(workers=2, progress=False), seen.append, out=out)  # fmt: skip
    assert seen == []
