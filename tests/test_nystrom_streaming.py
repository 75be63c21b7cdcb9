"""The Nyström workers at scale: each reads its rows of X from the source one block at a time
(never shipped by the driver where the worker can read them), and the normal route's one long
pass is cut into calls, so that the driver shows its progress. Each against a dense float64
K_nmᵀK_nm (numpy) or a Nyström oracle."""

import pickle
import re

import dask.array as da
import numpy as np
import pytest
import zarr

from ntk_scale import FullyConnected, nystrom, stages
from ntk_scale.io import RowRange, as_rows, load_array, row_range
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.roles import NystromWorker

SPEC = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)


def _x(n=300, d=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def _sources(tmp_path, x):
    """x as each lazy source a user can give: an .npy memory map, a Zarr array, a dask array."""
    np.save(tmp_path / "x.npy", x)
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=x.shape, chunks=(64, x.shape[1]),
                          dtype="float64", compressors=None)  # fmt: skip
    z[:] = x
    return {"npy": load_array(str(tmp_path / "x.npy")),
            "zarr": load_array(str(tmp_path / "x.zarr")),
            "dask": as_rows(da.from_zarr(str(tmp_path / "x.zarr")))[0]}  # fmt: skip


# -- row sources (pure) -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["npy", "zarr", "dask"])
def test_a_worker_is_sent_where_its_rows_are_not_the_rows(tmp_path, kind):
    x = _x(2000, 8)
    part = row_range(_sources(tmp_path, x)[kind], 500, 1700)
    assert isinstance(part, RowRange) and part.shape == (1200, 8)
    sent = pickle.dumps(part)
    assert len(sent) < 20_000 < x[500:1700].nbytes  # an address, not 77 kB of rows
    back = pickle.loads(sent)
    np.testing.assert_array_equal(back[100:356], x[600:856])
    np.testing.assert_array_equal(np.asarray(back), x[500:1700])


def test_rows_only_this_machine_can_read_are_sent_as_rows(tmp_path):
    x = _x()
    for src in _sources(tmp_path, x).values():
        part = row_range(src, 10, 90, same_machine=False)
        assert isinstance(part, np.ndarray)
        np.testing.assert_array_equal(part, x[10:90])
    assert isinstance(row_range(x, 0, 5), np.ndarray)  # in memory: nowhere else to read it
    images = np.random.default_rng(1).normal(size=(40, 3, 3, 2))
    np.save(tmp_path / "img.npy", images)
    rows, _ = as_rows(load_array(str(tmp_path / "img.npy")))
    part = pickle.loads(pickle.dumps(row_range(rows, 5, 20)))
    np.testing.assert_array_equal(np.asarray(part), images[5:20].reshape(15, -1))


# -- the normal route's pass in calls (in process) ----------------------------------------------
def _knm(x, idx):
    """Dense K(X, C) float64, with K(x_i, x_i) where centre j is row i (as a Gram's diagonal)."""
    K = np.array(SPEC.kernel(x, x[idx], dtype="float64"))
    K[idx, np.arange(len(idx))] = [SPEC.kernel(x[i : i + 1], dtype="float64")[0, 0] for i in idx]
    return K


def _worker(x, idx, block=32, mask=None):
    return NystromWorker(SPEC, x, x[idx], idx, "ntk", "float64", block, 0, mask)


def test_a_pass_in_calls_equals_one_pass_and_the_dense_products(tmp_path):
    x, idx = _x(), np.arange(0, 300, 7)
    y = np.sin(x[:, :2])
    K = _knm(x, idx)
    worker = _worker(_sources(tmp_path, x)["zarr"], idx)
    done = [worker.normal_pass(None, y, k / 6, "t") for k in range(1, 6)]
    assert done == sorted(done) and 0 < done[0] < done[-1] < 300
    H, b = worker.gram_normal(None, y, "t")
    np.testing.assert_allclose(H[0], K.T @ K, rtol=1e-11, atol=1e-11 * np.abs(K.T @ K).max())
    np.testing.assert_allclose(b, K.T @ y, rtol=1e-11, atol=1e-11 * np.abs(K.T @ y).max())
    H1, b1 = _worker(x, idx).gram_normal(None, y)  # one call, rows in memory
    np.testing.assert_allclose(H1, H, rtol=1e-12)
    # A replacement called with the last call's arguments computes from the start; a new
    # token starts a new pass on a worker that had one under way.
    fresh = _worker(x, idx)
    fresh.normal_pass(None, y, 0.5, "t")
    np.testing.assert_allclose(fresh.gram_normal(None, y, "t")[0], H, rtol=1e-12)
    worker.normal_pass(None, y, 0.5, "u")
    worker.normal_pass(None, y, 0.5, "v")
    np.testing.assert_allclose(worker.gram_normal(None, y, "v")[0], H, rtol=1e-12)


def test_a_pass_in_calls_with_row_masks(tmp_path):
    x, idx = _x(), np.arange(0, 300, 11)
    y = np.sin(x[:, :3])
    mask = np.ones((300, 3), bool)
    mask[:150, 1] = mask[100:, 2] = False
    worker = _worker(x, idx, mask=mask)
    worker.normal_pass(np.array([0, 1, 2]), y, 0.4, "m")
    H, b = worker.gram_normal(np.array([0, 1, 2]), y, "m")
    K = _knm(x, idx)
    for s in range(3):
        Ks = K[mask[:, s]]
        np.testing.assert_allclose(H[s], Ks.T @ Ks, rtol=1e-10, atol=1e-10 * np.abs(H[s]).max())
    np.testing.assert_allclose(b, K.T @ (mask * y), rtol=1e-10, atol=1e-10)


def test_the_pass_is_taken_in_row_strips_and_then_let_go():
    """The driver sums the workers' parts of H a strip at a time (M = 20,000 ran out of memory
    on whole parts): strips tile the dense K_nmᵀK_nm, the worker keeps its accumulator until
    the last strip and then lets go of it, and a replacement asked for a middle strip makes
    the pass again."""
    x, idx = _x(), np.arange(0, 300, 7)  # M = 43
    y = np.sin(x[:, :2])
    K = _knm(x, idx)
    worker = _worker(x, idx)
    cuts = [(0, 10), (10, 11), (11, 40), (40, 43)]
    strips = [worker.gram_normal(None, y, "s", rows=r) for r in cuts]
    assert [h.shape for h, _ in strips] == [(1, 10, 43), (1, 1, 43), (1, 29, 43), (1, 3, 43)]
    assert worker._pass is None and worker.passes == 1  # one pass served every strip
    H = np.concatenate([h for h, _ in strips], axis=1)[0]
    np.testing.assert_allclose(H, K.T @ K, rtol=1e-11, atol=1e-11 * np.abs(K.T @ K).max())
    for _, b in strips:
        np.testing.assert_allclose(b, K.T @ y, rtol=1e-11, atol=1e-11 * np.abs(K.T @ y).max())
    np.testing.assert_allclose(_worker(x, idx).gram_normal(None, y, "s", rows=(11, 40))[0][0],
                               H[11:40], rtol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match="rows=.*M = 43"):
        _worker(x, idx).gram_normal(None, y, "s", rows=(40, 44))


# -- through stages.fit on a real local Ray -----------------------------------------------------
@pytest.mark.parametrize("kind", ["npy", "zarr"])
def test_a_nystrom_fit_read_from_the_source_with_progress(ray_local, tmp_path, capfd, kind,
                                                         monkeypatch):  # fmt: skip
    # H's parts come back in strips of 7 rows (120 centres: 18 calls per worker)
    monkeypatch.setattr(nystrom, "STRIP_BYTES", 7 * 8 * 120)
    x, idx_n = _x(3000, 6), 120
    y = np.sin(x[:, 0]) + 0.1 * x[:, 1]
    src = _sources(tmp_path, x)[kind]
    so = SolveOptions(method="nystrom", centers=idx_n, knm="normal", ridge=1e-3, tol=1e-10)
    run = RunOptions(workers=2, progress=True)
    rep = stages.fit(stages.prepare_inputs(src, y), SPEC, str(tmp_path / "k.zarr"),
                     GramOptions(dtype="float64", tile=128), so, run)  # fmt: skip
    err = capfd.readouterr().err
    assert "K_nmᵀK_nm: 3000/3000 rows (100.0%)" in err, err[-2000:]
    assert re.search(r"solve: \d+ iterations \| worst residual", err), err[-2000:]
    idx = np.array(rep.solve.meta["nystrom"]["center_indices"])
    C = x[idx]
    Knm, Kmm = SPEC.kernel(x, C, dtype="float64"), SPEC.kernel(C, dtype="float64")
    lam = 1e-3 * np.mean([SPEC.kernel(x[i : i + 1], dtype="float64")[0, 0] for i in range(3000)])
    alpha = np.linalg.solve(Knm.T @ Knm + lam * Kmm, Knm.T @ y)
    assert np.max(np.abs(rep.solve.alpha - alpha)) / np.max(np.abs(alpha)) < 1e-6
    # what each worker was sent: where its rows are, not the rows
    rows, _ = as_rows(src)
    with nystrom.nystrom_workers(SPEC, rows, C, idx, "ntk", "float64", run, None) as group:
        sent = [group.args_of(m.part)[1] for m in group.members]
        assert len(sent) == 2 and all(isinstance(part, RowRange) for part in sent)
        assert [s["rows"] for s in group.call_all("stats")] == [2048, 952]  # whole blocks

