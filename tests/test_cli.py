"""`ntk-scale`: every stage from files, exit codes, messages, nothing written on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ntk_scale.cli import main

KERNEL = ["--depth", "2", "--W-std", "1.4", "--b-std", "0.1", "--dtype", "float64"]


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    x, xs = rng.normal(size=(120, 6)), rng.normal(size=(30, 6))
    y = np.sin(x[:, :2])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "xs.npy", xs)
    np.save(tmp_path / "y.npy", y)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    return tmp_path


def test_help_on_every_subcommand():
    for cmd in ["plan", "gram", "solve", "predict", "fit", "verify", "demo"]:
        out = subprocess.run(
            [sys.executable, "-m", "ntk_scale.cli", cmd, "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0 and "usage: ntk-scale" in out.stdout, cmd


def test_plan_answers_for_a_million_samples(capsys):
    assert main(["plan", "--n", "1000000", "--d", "784", "--tile", "512", "--workers", "8"]) == 0
    out = capsys.readouterr().out
    assert "1,000,000 / 784" in out and "512 / 1,910,035" in out
    assert "2.0 TB" in out  # N(N + tile)/2 float32 entries
    assert "estimated wall time (8 workers)" in out


def test_gram_solve_predict_verify(ray_local, files, capsys):
    t = files
    store, model = str(t / "g.zarr"), str(t / "model")
    args = ["gram", "--x", str(t / "x.csv"), "--store", store, "--tile", "64", "--no-progress"]
    assert main(args + KERNEL) == 0
    assert "3 tiles: 3 computed" in capsys.readouterr().out
    assert (
        main(
            [
                "solve",
                "--store",
                store,
                "--y",
                str(t / "y.npy"),
                "--model-dir",
                model,
                "--tol",
                "1e-10",
                "--rank",
                "50",
            ]
        )
        == 0
    )
    meta = json.loads((t / "model" / "model.json").read_text())
    assert meta["solver"]["converged"] == [True, True]
    assert (t / "model" / "residuals.png").stat().st_size > 1000
    assert (t / "model" / "spectrum.png").stat().st_size > 1000
    out = str(t / "pred.npy")
    assert main(["predict", "--model-dir", model, "--x", str(t / "xs.npy"), "--out", out]) == 0
    pred = np.load(out)
    assert pred.shape == (30, 2)
    assert main(["verify", store]) == 0
    assert "3/3 tiles ok" in capsys.readouterr().out


def _expect_usage_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_bad_input_exit_2_and_nothing_written(ray_local, files, capsys):
    t = files
    store = str(t / "g.zarr")
    assert (
        main(
            ["gram", "--x", str(t / "x.npy"), "--store", store, "--tile", "64", "--no-progress"]
            + KERNEL
        )
        == 0
    )
    np.save(t / "y_short.npy", np.zeros(119))
    y_nan = np.zeros(120)
    y_nan[7] = np.nan
    np.save(t / "y_nan.npy", y_nan)
    solve = ["solve", "--store", store, "--model-dir", str(t / "m")]
    _expect_usage_error(capsys, solve + ["--y", str(t / "y_short.npy")], "119", "120")
    _expect_usage_error(capsys, solve + ["--y", str(t / "y_nan.npy")], "NaN")
    _expect_usage_error(capsys, solve + ["--y", str(t / "missing.npy")], "does not exist")
    assert not (t / "m").exists()
    _expect_usage_error(
        capsys, ["gram", "--x", str(t / "nope.npy"), "--store", str(t / "new.zarr")], "nope.npy"
    )
    assert not (t / "new.zarr").exists()
    x_nan = np.load(t / "x.npy")
    x_nan[5, 1] = np.inf
    np.save(t / "x_nan.npy", x_nan)
    _expect_usage_error(
        capsys,
        ["gram", "--x", str(t / "x_nan.npy"), "--store", str(t / "new.zarr")],
        "row 5 contains NaN or Inf",
    )
    assert not (t / "new.zarr").exists()
    _expect_usage_error(
        capsys,
        ["gram", "--x", str(t / "x.npy"), "--store", store, "--depth", "5"],
        "--overwrite",
    )
    # A model made for another store.
    assert main(solve + ["--y", str(t / "y.npy")]) == 0
    other = str(t / "other.zarr")
    assert (
        main(
            ["gram", "--x", str(t / "xs.npy"), "--store", other, "--tile", "64", "--no-progress"]
            + KERNEL
        )
        == 0
    )
    _expect_usage_error(
        capsys,
        [
            "predict",
            "--model-dir",
            str(t / "m"),
            "--x",
            str(t / "xs.npy"),
            "--out",
            str(t / "p.npy"),
            "--store",
            other,
        ],
        "fitted on store",
    )
    np.save(t / "xs5.npy", np.ones((3, 5)))
    _expect_usage_error(
        capsys,
        [
            "predict",
            "--model-dir",
            str(t / "m"),
            "--x",
            str(t / "xs5.npy"),
            "--out",
            str(t / "p.npy"),
        ],
        "5 features but 6 were expected",
    )
    assert not (t / "p.npy").exists()
    _expect_usage_error(capsys, ["plan", "--n", "0", "--d", "3"], "n=0")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage errors
        main(["solve", "--store", store])
    assert exit_info.value.code == 2
    _expect_usage_error(capsys, ["plan", "--n", "10", "--d", "3", "--W-std", "-1"], "W_std")


def _config(t, body):
    (t / "cfg.toml").write_text(body)
    return str(t / "cfg.toml")


GOOD = """
[data]
x_train = "x.npy"
y_train = "y.npy"
x_test = "xs.npy"

[kernel]
depth = 2
W_std = 1.4
b_std = 0.1

[store]
path = "gram.zarr"
tile = 64
dtype = "float64"

[solver]
ridge = 1e-3
tol = 1e-10
rank = 60

[output]
dir = "out"
"""


def test_fit_config_end_to_end(ray_local, files, capsys):
    assert main(["fit", _config(files, GOOD)]) == 0
    out = files / "out"
    assert np.load(out / "predictions.npy").shape == (30, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["timings"]) == {"gram_s", "solve_s", "predict_s"}
    assert (out / "model" / "model.json").exists()


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (("[solver]", "[solver]\nridges = 1"), "unknown key solver.ridges"),
        (("[output]", "[outputs]"), "unknown section [outputs]"),
        (('x_train = "x.npy"', 'x_train = "../x.npy"'), "escapes the config's directory"),
        (('x_train = "x.npy"', 'x_train = "/etc/passwd"'), "relative to the config"),
        (("tile = 64", 'tile = "64"'), "store.tile='64' has the wrong type"),
        (('x_test = "xs.npy"', 'x_test = "missing.npy"'), "does not exist"),
        (("depth = 2", "depth = -2"), "depth=-2"),
    ],
)
def test_bad_configs_exit_2_and_write_nothing(files, capsys, edit, fragment):
    path = _config(files, GOOD.replace(*edit))
    _expect_usage_error(capsys, ["fit", path], fragment)
    assert not (files / "out").exists() and not (files / "gram.zarr").exists()
