"""The solve stage: a solve killed with SIGKILL resumes from its checkpoint to the same answer;
checkpoints of other problems and bad targets are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from processes import kill_solve_driver

from ntk_scale import FullyConnected, stages
from ntk_scale.options import GramOptions, RunOptions
from ntk_scale.solve import CHECKPOINT_NAME, solve_store
from ntk_scale.store import GramStore

SCRIPTS = Path(__file__).parent / "scripts"
SPEC = FullyConnected(depth=3, activation="relu", W_std=1.4, b_std=0.1)
#: Must match the arguments the test passes to solve_driver.py.
KW = {"ridge": 1e-6, "preconditioner": "rpcholesky", "rank": 40, "tol": 1e-10}


@pytest.fixture(scope="module")
def problem(ray_local, tmp_path_factory):
    """(store url, Y (500, 2), path of Y as .npy): an FC-3 NTK Gram of 500 points, tile 128."""
    root = tmp_path_factory.mktemp("solve")
    rng = np.random.default_rng(3)
    url = str(root / "gram.zarr")
    stages.gram(
        rng.standard_normal((500, 4)),
        SPEC,
        url,
        GramOptions(dtype="float64", tile=128),
        RunOptions(workers=2, progress=False, wait_seconds=1.0),
    )
    Y = rng.standard_normal((500, 2))
    np.save(root / "y.npy", Y)
    return url, Y, str(root / "y.npy")


@pytest.fixture(scope="module")
def uninterrupted(problem):
    url, Y, _ = problem
    return solve_store(url, Y, **KW)


def run_and_kill(problem, out_dir: Path, min_iteration: int = 6) -> int:
    """Start solve_driver.py; SIGKILL it once it has passed ``min_iteration`` with a checkpoint
    on disk. Returns the last iteration it printed."""
    url, _, ypath = problem
    args = [url, str(out_dir), ypath, str(KW["ridge"]), str(KW["rank"]), str(KW["tol"])]
    return kill_solve_driver(
        args,
        lambda it: it >= min_iteration and (out_dir / CHECKPOINT_NAME).exists(),
        env={"JAX_PLATFORMS": "cpu"},
    )


def test_killed_solve_resumes_to_the_same_answer(problem, uninterrupted, tmp_path):
    url, Y, _ = problem
    full = uninterrupted.result
    assert full.converged.all() and full.iterations >= 20
    out = tmp_path / "run"
    killed_at = run_and_kill(problem, out)
    assert killed_at < full.iterations, "the kill came too late to test resume"

    report = solve_store(url, Y, out_dir=str(out), checkpoint_every=2, **KW)
    assert report.resumed_from is not None and 0 < report.resumed_from <= killed_at
    assert report.resumed_from % 2 == 0
    assert report.result.iterations == full.iterations
    # Across processes the BLAS may round differently (thread counts differ under load), so the
    # cross-process check is to solver precision; in one process resume is bitwise (test_linalg).
    np.testing.assert_allclose(report.result.x, full.x, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(report.result.residuals, full.residuals, rtol=1e-3, atol=1e-12)
    assert report.lam == uninterrupted.lam and report.preconditioner == "nystrom-rpcholesky"

    again = solve_store(url, Y, out_dir=str(out), checkpoint_every=2, **KW)
    assert again.resumed_from == full.iterations  # the final state was saved
    np.testing.assert_array_equal(again.result.x, full.x)


def test_solution_matches_dense_cholesky(problem, uninterrupted):
    url, Y, _ = problem
    K = GramStore.open(url).to_dask().compute()
    lam = uninterrupted.lam
    assert lam == pytest.approx(KW["ridge"] * np.mean(np.diag(K)), rel=1e-14)
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K + lam * np.eye(len(K))), Y)
    fitted = K @ uninterrupted.result.x
    assert np.linalg.norm(fitted - K @ ref) / np.linalg.norm(K @ ref) <= 1e-6
    assert uninterrupted.setup_seconds > 0 and uninterrupted.iteration_seconds > 0


def test_checkpoint_of_another_problem_is_refused(problem, tmp_path):
    url, Y, _ = problem
    out = str(tmp_path / "run")
    kw = {"preconditioner": "jacobi", "tol": 1e-3, "out_dir": out}
    first = solve_store(url, Y, ridge=1e-2, **kw)
    assert first.resumed_from is None and first.rank == 0
    with pytest.raises(ValueError, match="lam=.*new output dir or pass overwrite"):
        solve_store(url, Y, ridge=1e-3, **kw)
    with pytest.raises(ValueError, match="targets=.*new output dir or pass overwrite"):
        solve_store(url, Y + 1.0, ridge=1e-2, **kw)
    fresh = solve_store(url, Y, ridge=1e-3, overwrite=True, **kw)
    assert fresh.resumed_from is None


def test_vector_targets_give_a_vector(problem):
    url, Y, _ = problem
    report = solve_store(url, Y[:, 0], ridge=1e-2, preconditioner="none", tol=1e-8)
    assert report.result.x.shape == (500,) and report.result.converged.all()
    column = solve_store(url, Y[:, :1], ridge=1e-2, preconditioner="none", tol=1e-8)
    np.testing.assert_array_equal(report.result.x, column.result.x[:, 0])


def test_bad_targets_are_refused(problem):
    url, Y, _ = problem
    with pytest.raises(ValueError, match=r"Y has shape \(499, 2\).*N=500"):
        solve_store(url, Y[:-1])
    bad = Y.copy()
    bad[17, 1] = np.nan
    with pytest.raises(ValueError, match="Y holds 1 NaN/Inf.*row 17.*impute"):
        solve_store(url, bad)
    with pytest.raises(ValueError, match="preconditioner='cholesky'"):
        solve_store(url, Y, preconditioner="cholesky")


def test_stored_dense_and_distributed_operators_agree(problem):
    url, Y, _ = problem
    kw = {**KW, "ridge": 1e-2}
    x = {op: solve_store(url, Y, operator=op, **kw).result.x for op in ("stored", "dense")}
    x["distributed"] = solve_store(url, Y, operator="distributed", workers=2, **kw).result.x
    for op in ("dense", "distributed"):
        assert np.linalg.norm(x[op] - x["stored"]) / np.linalg.norm(x["stored"]) <= 1e-8, op
