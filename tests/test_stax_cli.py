"""The CLI and the fit config with stax kernels: presets, spec files, 4-D inputs, plan."""

import json
import re

import numpy as np
import pytest
from oracles import dense_predictions, relative_max_error

from ntk_scale import Myrtle, stax
from ntk_scale.cli import main
from ntk_scale.kernels.network import chunk_shape
from ntk_scale.store import GramStore

NET = stax.serial(
    stax.Conv(8, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
    stax.AvgPool((2, 2), strides=(2, 2)), stax.Flatten(), stax.Dense(1, W_std=1.2),
)  # fmt: skip


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(3)
    x, xs = rng.normal(size=(48, 6, 6, 2)), rng.normal(size=(10, 6, 6, 2))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "xs.npy", xs)
    np.save(tmp_path / "y.npy", np.sin(x[:, 0, 0, :]))
    (tmp_path / "spec.json").write_text(NET.to_json())
    return tmp_path


def test_kernel_spec_file_gram_solve_predict(ray_local, images, capsys):
    t = images
    common = ["--kernel-spec", str(t / "spec.json"), "--dtype", "float64", "--tile", "32"]
    assert main(["gram", "--x", str(t / "x.npy"), "--store", str(t / "g.zarr"), *common]) == 0
    meta = GramStore.open(str(t / "g.zarr")).meta
    assert meta.kernel["sample_shape"] == [6, 6, 2] and meta.d == 72
    assert main(["solve", "--store", str(t / "g.zarr"), "--y", str(t / "y.npy"), "--model-dir",
                 str(t / "m"), "--ridge", "1e-3", "--tol", "1e-11"]) == 0  # fmt: skip
    assert main(["predict", "--model-dir", str(t / "m"), "--x", str(t / "xs.npy"), "--out",
                 str(t / "p.npy")]) == 0  # fmt: skip
    x, y, xs = (np.load(t / f"{n}.npy") for n in ("x", "y", "xs"))
    ref = dense_predictions(NET, x, y, xs, ridge=1e-3)
    assert relative_max_error(np.load(t / "p.npy"), ref) <= 1e-7


def _config(x_train: str, kernel: str, test: bool = True) -> str:
    """A fit config over the fixture's files with the given [kernel] line."""
    return f"""
[data]
x_train = "{x_train}"
y_train = "y.npy"
{'x_test = "xs.npy"' if test else ""}
[kernel]
{kernel}
[store]
path = "gram.zarr"
tile = 32
dtype = "float64"
[solver]
ridge = 1e-3
tol = 1e-11
[output]
dir = "out"
"""


def test_fit_config_with_a_spec_file(ray_local, images, capsys):
    t = images
    (t / "cfg.toml").write_text(_config("x.npy", 'spec = "spec.json"'))
    assert main(["fit", str(t / "cfg.toml")]) == 0
    x, y, xs = (np.load(t / f"{n}.npy") for n in ("x", "y", "xs"))
    ref = dense_predictions(NET, x, y, xs, ridge=1e-3)
    assert relative_max_error(np.load(t / "out" / "predictions.npy"), ref) <= 1e-7


@pytest.mark.cluster  # starts a subprocess or Ray itself
def test_plan_measures_a_myrtle_tile(capsys, tmp_path):
    argv = ["plan", "--n", "50000", "--sample-shape", "32,32,3", "--kernel", "myrtle5",
            "--tile", "256", "--dtype", "float32", "--store-dir", str(tmp_path),
            "--json"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    c1, c2 = chunk_shape(Myrtle(5), (32, 32, 3), "ntk", "float32", 256, 256)
    assert c1 * c2 <= 2  # a Myrtle-5 pair holds (32, 32, 32, 32) covariances: 1-2 per chunk
    assert re.search(rf"pairs per chunk \(kernel memory budget\)\s+{c1} x {c2}\n", out)
    plan = json.loads(out.strip().splitlines()[-1])
    assert plan["d"] == 3072 and plan["chunk_pairs"] == [c1, c2]
    assert plan["seconds_per_tile"] > 256 * 256 / 2 * 1e-3  # at least a millisecond a pair
    assert plan["flops"] > 1e8 * plan["entries"]  # ~1e8 operations per Myrtle-5 pair


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--kernel", "myrtle5"], "(n, H, W, C)"),  # 2-D features for a conv kernel
        (["--kernel", "conv", "--kernel-spec", "spec.json"], "use one"),
        (["--kernel-spec", "missing.json"], "does not exist"),
        (["--kernel-spec", "y.npy"], "is not JSON"),
    ],
)
def test_bad_kernel_arguments_exit_2_and_write_nothing(images, capsys, monkeypatch, argv,
                                                       fragment):  # fmt: skip
    monkeypatch.chdir(images)
    np.save(images / "flat.npy", np.zeros((8, 12)))
    assert main(["gram", "--x", "flat.npy", "--store", "g.zarr", *argv]) == 2
    assert fragment in capsys.readouterr().err
    assert not (images / "g.zarr").exists()


def test_myrtle_preset_is_the_notebook_network():
    from ntk_scale.kernels.stax import PRESETS

    assert PRESETS["myrtle7"]() == Myrtle(7)
    assert PRESETS["conv"]().layers[0].name == "Conv"


def test_zarr_images_and_a_config_preset(ray_local, images, capsys):
    """4-D inputs from a Zarr array (read lazily, row block by row block) and [kernel] preset."""
    import zarr

    from ntk_scale import stages
    from ntk_scale.kernels.stax import PRESETS

    t = images
    x = np.load(t / "x.npy")
    z = zarr.open_array(str(t / "x.zarr"), mode="w", shape=x.shape, chunks=(16, 6, 6, 2),
                        dtype="float64")  # fmt: skip
    z[:] = x
    (t / "cfg.toml").write_text(_config("x.zarr", 'preset = "conv"', test=False))
    assert main(["fit", str(t / "cfg.toml")]) == 0
    store = GramStore.open(str(t / "gram.zarr"))
    assert store.meta.kernel["sample_shape"] == [6, 6, 2]
    k = PRESETS["conv"]().kernel(x, dtype="float64")
    np.testing.assert_allclose(store.to_dask().compute(), k, rtol=1e-12)
    lazy = zarr.open_array(str(t / "x.zarr"), mode="r")
    opts = stages.GramOptions(dtype="float64", tile=32)
    report = stages.gram(lazy, PRESETS["conv"](), str(t / "gram.zarr"), opts)
    assert report.computed == 0  # the same X (by fingerprint) and kernel: the store is reused


def test_demo_with_the_conv_kernel(ray_local, tmp_path, capsys):
    assert main(["demo", "--kernel", "conv", "--n", "60", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "8x8x1 images" in out and "exact dense solve" in out
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["max_rel_diff"] <= 1e-3 and metrics["agreement"] >= 0.99
