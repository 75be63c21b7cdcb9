"""method = "auto": plan's choice between the exact method and Nyström. On a cluster joined by
address, the cheapest of the exact operators and a Nyström fit within the deadline (plan's cost
model, as the `plan` table prices them); on this machine, exact while its store fits the disk.
Each choice is checked against the figures plan itself gives."""

import collections
import dataclasses

import pytest

from ntk_scale import FullyConnected, NTKRegressor, cost, stages
from ntk_scale.options import GramOptions, RunOptions, SolveOptions
from ntk_scale.sizing import cluster_operator, plan_gram, plan_nystrom
from ntk_scale.store.space import gram_bytes

SPEC = FullyConnected()
GO = GramOptions(dtype="float32", tile=4096)
CLUSTER = RunOptions(address="10.0.0.1:6379", accelerator="A10G", workers=16)
Usage = collections.namedtuple("Usage", "total used free")


def _cluster_prices(n, d, m, gpus=16):
    """plan's estimates at N = n on the cluster: {operator or "nystrom": Estimate}."""
    catalog = cost.load_catalog()
    node = cost.node_for(catalog, "A10G")
    work = cost.workload(plan_gram(n, d, SPEC, "ntk", "float32", 4096, gpus, measure=False))
    ny = plan_nystrom(n, m, d, SPEC, "ntk", "float32", 4096, gpus)
    a, nodes = cost.CloudAssumptions(gpus=gpus), -(-gpus // node.gpus)
    prices = {op: cost.estimate(work, catalog, node, nodes, op, a) for op in cost.OPERATORS}
    work = dataclasses.replace(work, nystrom=cost.nystrom_work(ny))
    prices["nystrom"] = cost.estimate_nystrom(work, catalog, node, nodes, a)
    return prices


def test_on_a_cluster_auto_takes_the_cheapest_method_within_the_deadline():
    n, d, m = 10**6, 784, 10_000
    prices = _cluster_prices(n, d, m)
    cheapest = min(prices, key=lambda k: prices[k].usd)
    assert cheapest == "nystrom"  # plan: minutes and a few $ against hours of the exact method
    so = SolveOptions(method="auto", centers=m)
    method, why = stages.choose_method(so, SPEC, n, d, GO, CLUSTER, "s3://b/g.zarr")
    assert method == "nystrom" and "auto on the cluster" in why and "nystrom" in why
    # without Nyström's price (method exact), the same model still picks an exact operator
    op, _ = cluster_operator(SPEC, n, d, "ntk", "float32", 4096, 16, "A10G")
    assert op == min(cost.OPERATORS, key=lambda k: prices[k].usd)
    # a small problem: the exact method costs less than Nyström's fixed costs
    small = _cluster_prices(20_000, 10, 5_000)
    method, _ = stages.choose_method(dataclasses.replace(so, centers=5_000), SPEC, 20_000, 10,
                                     GO, CLUSTER, "s3://b/g.zarr")  # fmt: skip
    want = "nystrom" if min(small, key=lambda k: small[k].usd) == "nystrom" else "exact"
    assert method == want


def test_here_auto_is_exact_while_its_store_fits_the_disk(tmp_path, monkeypatch):
    n, d = 200_000, 10
    need = gram_bytes(n, None, d, 4096, "float32")  # tiles, markers, X, diagonal
    so, run, store = SolveOptions(method="auto", centers=1000), RunOptions(workers=2), tmp_path
    for free, want in ((need * 2, "exact"), (need, "nystrom")):  # need <= 80 % of free?
        monkeypatch.setattr("shutil.disk_usage", lambda p, f=free: Usage(f * 2, f, f))
        method, why = stages.choose_method(so, SPEC, n, d, GO, run, str(store / "g.zarr"))
        assert method == want, why
        assert f"exact store ({need / 1e9:.3g} GB)" in why and "80%" in why
    assert "1,000 centres" in why
    assert stages.choose_method(so, SPEC, n, d, GO, run, "s3://bucket/g.zarr")[0] == "exact"
    # dtype not resolved yet ("auto"): priced as the larger, float64, store
    monkeypatch.setattr("shutil.disk_usage", lambda p: Usage(need * 4, need * 2, need * 2))
    assert stages.choose_method(so, SPEC, n, d, GO, run, str(store / "g.zarr"))[0] == "exact"
    auto = dataclasses.replace(GO, dtype="auto")
    assert stages.choose_method(so, SPEC, n, d, auto, run, str(store / "g.zarr"))[0] == "nystrom"
    method, why = stages.choose_method(dataclasses.replace(so, centers=n), SPEC, n, d, GO, run,
                                       str(store / "g.zarr"))  # fmt: skip
    assert method == "exact" and "no larger" in why
    assert stages.choose_method(SolveOptions(method="nystrom"), SPEC, n, d, GO, run, "g")[0] == (
        "nystrom"
    )


def test_auto_is_an_option_everywhere_and_keeps_its_refusals():
    assert SolveOptions(method="auto").method == "auto"
    assert NTKRegressor(method="auto").get_params()["method"] == "auto"
    with pytest.raises(ValueError, match="method='falkon' is not supported; use one of exact, "
                                         "nystrom, auto"):  # fmt: skip
        SolveOptions(method="falkon")
    with pytest.raises(ValueError, match="use it with method='exact'"):
        SolveOptions(method="auto", warm_start="nystrom")


def test_the_estimator_records_what_auto_took(ray_local, tmp_path, monkeypatch):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = np.sin(x[:, 0])
    kw = dict(kernel=SPEC, method="auto", centers=100, tile=128, workers=2, tol=1e-8)
    exact = NTKRegressor(**kw, workdir=str(tmp_path / "a")).fit(x, y)
    assert exact.method_ == "exact" and "fits in 80%" in exact.method_choice_
    assert exact.alpha_.shape == (300,)
    assert exact.solve_result_.meta["method_choice"] == exact.method_choice_
    # 900 KB free: the exact store (6 tiles of 128² float64, 0.8 MB) is more than 80 % of it,
    # and the Nyström one (K(C, C), one tile) fits, as the stages' disk check asks
    monkeypatch.setattr("shutil.disk_usage", lambda p: Usage(10**6, 10**5, 9 * 10**5))
    small = NTKRegressor(**kw, workdir=str(tmp_path / "b")).fit(x, y)
    assert small.method_ == "nystrom" and "is more than 80%" in small.method_choice_
    assert small.alpha_.shape == (100,) and small.solve_result_.meta["method"] == "nystrom"
