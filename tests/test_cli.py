"""`ntk-scale`: every stage from files, exit codes, messages, nothing written on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from oracles import dense_labels, dense_predictions, relative_max_error

from ntk_scale.cli import main
from ntk_scale.kernels import FullyConnected

KERNEL = ["--depth", "2", "--W-std", "1.4", "--b-std", "0.1", "--dtype", "float64"]
SPEC = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)  # KERNEL, kind ntk
# float64 stores solved to tol 1e-10: the predictions' error is at most about
# cond(K + λI) · tol ≈ 1.1e3 · 1e-10 ≈ 1e-7 (measured: 8e-11 predict, 6e-11 fit). A wrong
# answer is far above it: ridge 2x gives 2.4e-4, an absolute instead of relative ridge 1.9e-3,
# b_std 0 for 0.1 1.6e-2, nngp for ntk 0.13.
BOUND = 1e-7


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


SUBCOMMANDS = ["plan", "gram", "solve", "predict", "ingest", "fit", "verify", "demo"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_on_every_subcommand(cmd, capsys):
    """Each subcommand's parser, in this process (a subprocess per subcommand cost ~5 s of
    imports each): --help exits 0 with the subcommand's usage line."""
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0
    assert f"usage: ntk-scale {cmd}" in capsys.readouterr().out


def test_version_names_the_package_its_stack_and_the_backend(capsys):
    """--version (it was an error): the package's version, the one pyproject's metadata reads
    (ntk_scale.__version__), then JAX with its backend and devices, Ray, Zarr, NumPy, Python."""
    import importlib.metadata

    import jax
    import ray
    import zarr

    import ntk_scale

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ntk-scale {ntk_scale.__version__}"
    assert importlib.metadata.version("ntk-scale") == ntk_scale.__version__
    assert lines[1].startswith(f"jax {jax.__version__} ")
    assert f"backend {jax.default_backend()}: {len(jax.devices())} device(s)" in lines[1]
    assert f"ray {ray.__version__}" in lines and f"zarr {zarr.__version__}" in lines


@pytest.mark.cluster  # starts a subprocess or Ray itself
def test_the_module_entry_point_lists_every_subcommand():
    """`python -m ntk_scale.cli --help` runs (the module's __main__) and names every command."""
    out = subprocess.run(
        [sys.executable, "-m", "ntk_scale.cli", "--help"], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and "usage: ntk-scale" in out.stdout, out.stderr[-2000:]
    assert all(cmd in out.stdout for cmd in SUBCOMMANDS), out.stdout


@pytest.mark.cluster  # starts a subprocess or Ray itself
def test_plan_answers_for_a_million_samples(capsys, tmp_path, monkeypatch):
    """The rates are measured in --store-dir, and nothing is written in the working directory."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    args = ["plan", "--n", "1000000", "--d", "784", "--tile", "512", "--workers", "8", "--dtype",
            "float32"]  # fmt: skip
    assert main([*args, "--store-dir", str(tmp_path / "store")]) == 0
    assert not list((tmp_path / "cwd").iterdir()) and not list((tmp_path / "store").iterdir())
    out = capsys.readouterr().out
    assert "bound by" in out
    assert "1,000,000 / 784" in out and "512 / 1,910,035" in out
    assert "2.0 TB" in out  # N(N + tile)/2 float32 entries
    assert "estimated wall time (8 workers)" in out
    # the path gram would create (issue Q: it asked for mkdir -p): probed where it would go
    assert main([*args, "--store", "run/gram.zarr"]) == 0
    assert not list((tmp_path / "cwd").iterdir())  # no run/, no probe left
    out = capsys.readouterr().out
    assert "the nearest existing directory of run/gram.zarr" in out
    assert str(tmp_path / "cwd") in out


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
    x = np.loadtxt(t / "x.csv", delimiter=",")  # what `gram` read
    ref = dense_predictions(SPEC, x, np.load(t / "y.npy"), np.load(t / "xs.npy"), ridge=1e-4)
    err = relative_max_error(pred, ref)
    assert err <= BOUND, f"predict vs dense Cholesky: relative max error {err:.2e}"
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
        "x_star has 5 features but the model's X has 6",
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
    pred = np.load(out / "predictions.npy")
    assert pred.shape == (30, 2)
    x, y, xs = (np.load(files / f"{name}.npy") for name in ("x", "y", "xs"))
    err = relative_max_error(pred, dense_predictions(SPEC, x, y, xs, ridge=1e-3))
    assert err <= BOUND, f"fit vs dense Cholesky: relative max error {err:.2e}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["timings"]) == {"gram_s", "solve_s", "predict_s"}
    assert (out / "model" / "model.json").exists()


def test_fit_classification_labels_match_dense_argmax(ray_local, files, capsys):
    x = np.load(files / "x.npy")
    np.save(files / "labels.npy", (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5))  # 3 classes
    body = GOOD.replace('"y.npy"', '"labels.npy"').replace(
        'dir = "out"', 'dir = "out"\ntask = "classification"'
    )
    assert main(["fit", _config(files, body)]) == 0
    labels = np.load(files / "out" / "predictions.npy")  # fit writes labels, not scores
    ref = dense_labels(
        SPEC, x, np.load(files / "labels.npy"), np.load(files / "xs.npy"), ridge=1e-3
    )
    assert labels.shape == ref.shape == (30,)
    assert len(np.unique(ref)) > 1  # a constant answer would agree by chance
    agreement = float(np.mean(labels == ref))
    assert agreement >= 0.99, f"labels agree with the dense argmax on {agreement:.1%}"


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
