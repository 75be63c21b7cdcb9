"""ridge="auto" (issue Q): a log grid that grows past the edge its best ridge is at, on the same
store and preconditioner sketch, up to stated bounds. Against dense float64 holdout scores
(scipy cho_solve) of every decade from 1e-12 to 1e4."""

import importlib
import json
import warnings

import numpy as np
import pytest
import scipy.linalg as sl

from ntk_scale import FullyConnected, NTKRegressorCV, RidgeEdgeWarning, stages
from ntk_scale.cli import main
from ntk_scale.config import schema
from ntk_scale.options import (
    AUTO_RIDGE_BOUNDS,
    AUTO_RIDGE_HOLDOUT,
    AUTO_RIDGES,
    GramOptions,
    RunOptions,
    SolveOptions,
    check_toml,
    parse_ridges,
)
from ntk_scale.solve import (
    RidgeSelection,
    grow_ridges,
    make_folds,
    merge_selections,
    round_checkpoint,
)

SPEC = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)
QUIET = RunOptions(workers=1, progress=False)
N = 160
solve_mod = importlib.import_module("ntk_scale.solve")  # the module (ntk_scale.solve is a function)
DECADES = tuple(float(f"{10.0**k:g}") for k in range(-12, 5))


@pytest.fixture(scope="module")
def rows():
    x = np.random.default_rng(5).normal(size=(N, 6))
    noise = np.random.default_rng(11).normal(size=(N, 1))
    return x, np.sin(x[:, :1]) + noise  # noisy: the best ridge lies past AUTO_RIDGES' top


@pytest.fixture(scope="module")
def store(ray_local, rows, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("auto") / "g.zarr")
    stages.gram(rows[0], SPEC, url, GramOptions(dtype="float64", tile=48), QUIET)
    return url


def _dense_scores(x, y, folds):
    """{relative ridge: mean held-out MSE} of dense fold solves, for every decade."""
    k = np.asarray(SPEC.kernel(x, dtype="float64"))
    out = {}
    for r in DECADES:
        s = []
        for tr, va in folds:
            ktr = k[np.ix_(tr, tr)]
            a = sl.cho_solve(sl.cho_factor(ktr + r * np.mean(np.diag(ktr)) * np.eye(len(tr))),
                             y[tr])  # fmt: skip
            s.append(np.mean((k[np.ix_(va, tr)] @ a - y[va]) ** 2))
        out[r] = float(np.mean(s))
    return out


# -- pure -------------------------------------------------------------------------------------
def test_auto_is_an_option_with_a_holdout_and_refuses_absolute_ridges():
    assert parse_ridges("auto") == "auto" and parse_ridges(" AUTO ") == "auto"
    so = SolveOptions(ridge="auto")
    assert so.auto_ridge and so.ridges == AUTO_RIDGES and so.holdout == AUTO_RIDGE_HOLDOUT
    assert so.selects
    assert SolveOptions(ridge="auto", cv=3).holdout is None  # a given cv is kept
    with pytest.raises(ValueError, match="ridge='auto'.*relative.*ridge_absolute=False"):
        SolveOptions(ridge="auto", ridge_absolute=True)
    with pytest.raises(ValueError, match="'auto'"):
        SolveOptions(ridge="often")
    values = check_toml({"solver": {"ridge": "auto", "cv": 3}}, schema(), "fit.toml")
    assert SolveOptions(**values["solver"]).auto_ridge  # a config takes it too


def _sel(ridges, means, rounds=1):
    scores = np.array([means, means])  # two folds, equal scores
    return RidgeSelection(tuple(ridges), "mse", scores, [1] * len(ridges),
                          int(np.argmin(means)), 1.0, 2, np.full((3, 1), float(np.argmin(means))),
                          rounds, AUTO_RIDGE_BOUNDS)  # fmt: skip


def test_the_grid_grows_past_its_edge_within_the_bounds():
    assert grow_ridges(_sel((1e-2, 1e-1), [2.0, 1.0])) == (1.0, 10.0, 100.0)
    assert grow_ridges(_sel((1e-2, 1e-1), [1.0, 2.0])) == (1e-3, 1e-4, 1e-5)
    assert grow_ridges(_sel((1e-2, 1e-1, 1.0), [2.0, 1.0, 3.0])) == ()  # inside
    assert grow_ridges(_sel((1e2, 1e3), [2.0, 1.0])) == (1e4,)  # the upper bound
    assert grow_ridges(_sel((1e3, 1e4), [2.0, 1.0])) == ()
    assert grow_ridges(_sel((1e-12, 1e-11), [1.0, 2.0])) == ()
    assert round_checkpoint("cv_state.npz", 0) == "cv_state.npz"
    assert round_checkpoint("cv_state.npz", 2) == "cv_state_round2.npz"


def test_merged_paths_choose_again_and_keep_the_winners_warm_start():
    a, b = _sel((1e-2, 1e-1), [2.0, 1.0]), _sel((1.0, 10.0), [0.5, 3.0])
    m = merge_selections(a, b)
    assert m.ridges == (1e-2, 1e-1, 1.0, 10.0) and m.ridge == 1.0 and m.edge is None
    assert m.rounds == 2 and m.scores.shape == (2, 4) and m.seconds == 2.0
    assert m.warm_start is b.warm_start
    back = merge_selections(b, a)  # order of the rounds does not matter
    assert back.ridges == m.ridges and back.ridge == 1.0
    np.testing.assert_array_equal(back.scores, m.scores)
    tie = merge_selections(_sel((1e-2,), [1.0]), _sel((1e-1,), [1.0]))
    assert tie.ridge == 1e-1  # a tie goes to the larger ridge, as in one path


# -- through the store ------------------------------------------------------------------------
def test_auto_grows_to_the_dense_optimum_on_one_sketch(store, rows, tmp_path, monkeypatch):
    x, y = rows
    folds = make_folds(N, holdout=AUTO_RIDGE_HOLDOUT, seed=0)
    dense = _dense_scores(x, y, folds)
    best = min(dense, key=dense.get)
    assert best > max(AUTO_RIDGES) and best < AUTO_RIDGE_BOUNDS[1]  # the data need the growth
    sketches = []
    real = solve_mod.nystrom
    monkeypatch.setattr(solve_mod, "nystrom", lambda *a, **k: sketches.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RidgeEdgeWarning)  # grown to an inside optimum: silent
        res = stages.solve(store, y, SolveOptions(ridge="auto", tol=1e-11), QUIET,
                           model_dir=str(tmp_path / "m"))  # fmt: skip
    sel = res.selection
    assert sel.ridge == best and sel.edge is None and sel.rounds >= 2
    assert set(AUTO_RIDGES) < set(sel.ridges) and list(sel.ridges) == sorted(sel.ridges)
    for r, s in zip(sel.ridges, sel.mean_scores, strict=True):
        assert s == pytest.approx(dense[r], rel=1e-6), r
    assert len(sketches) == 1  # one sketch for every round (cached beside the checkpoints)
    ck = tmp_path / "m" / "checkpoint"
    assert (ck / "cv_state.npz").exists() and (ck / "cv_state_round1.npz").exists()
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["ridge_path"]["auto"] == {"rounds": sel.rounds, "bounds": list(AUTO_RIDGE_BOUNDS)}
    assert meta["ridge"] == best and meta["ridge_path"]["edge"] is None
    k = np.asarray(SPEC.kernel(x, dtype="float64"))
    ref = sl.cho_solve(sl.cho_factor(k + best * np.mean(np.diag(k)) * np.eye(N)), y)
    assert np.max(np.abs(res.report.result.x - ref)) <= 1e-7 * np.max(np.abs(ref))


def test_auto_stops_at_its_bound_and_says_so(store, rows):
    x, _ = rows
    y = np.random.default_rng(7).normal(size=(N, 1))
    y -= y.mean()  # pure noise: here the larger the ridge, the better (the dense check below)
    folds = make_folds(N, holdout=AUTO_RIDGE_HOLDOUT, seed=0)
    dense = _dense_scores(x, y, folds)
    assert min(dense, key=dense.get) == AUTO_RIDGE_BOUNDS[1]
    with pytest.warns(RidgeEdgeWarning, match=r"ridge='auto' chose 10000, the largest.*bounds "
                                              r"1e-12 … 10000"):  # fmt: skip
        res = stages.solve(store, y, SolveOptions(ridge="auto", tol=1e-11), QUIET)
    assert res.selection.ridge == AUTO_RIDGE_BOUNDS[1] and res.selection.edge == "largest"
    assert res.selection.rounds == 3  # 1e-6…1e-1, then 1, 10, 100, then 1e3, 1e4


def test_auto_through_the_estimator_and_the_cli(ray_local, store, rows, tmp_path, capsys):
    x, y = rows
    est = NTKRegressorCV(kernel=SPEC, ridges="auto", cv=4, dtype="float64", tile=48, tol=1e-10,
                         workdir=str(tmp_path), workers=1).fit(x, y[:, 0])  # fmt: skip
    folds = make_folds(N, cv=4, seed=0)
    dense = _dense_scores(x, y, folds)
    assert est.ridge_ == min((r for r in est.cv_results_["ridge"]), key=dense.get)
    assert est.ridge_ > max(AUTO_RIDGES) and not est.cv_results_["at_edge"].any()
    assert len(est.cv_results_["ridge"]) > len(AUTO_RIDGES)
    np.save(tmp_path / "y.npy", y)
    model = tmp_path / "cli"
    assert main(["solve", "--store", store, "--y", str(tmp_path / "y.npy"), "--model-dir",
                 str(model), "--ridge", "auto", "--tol", "1e-10"]) == 0  # fmt: skip
    assert "<- chosen" in capsys.readouterr().out
    meta = json.loads((model / "model.json").read_text())
    dense = _dense_scores(x, y, make_folds(N, holdout=AUTO_RIDGE_HOLDOUT, seed=0))
    assert meta["ridge"] == min(dense, key=dense.get) and meta["ridge_path"]["auto"]["rounds"] >= 2
