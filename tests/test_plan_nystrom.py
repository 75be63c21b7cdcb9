"""`plan` prices Nyström beside the exact method: sizing.plan_nystrom's arithmetic against
hand-computed figures, the cloud rows against the cost model's formulas, and the CLI's block
(fast tier: no Ray, no subprocess, nothing measured)."""

from __future__ import annotations

import pytest

from ntk_scale import cost
from ntk_scale.cli import main
from ntk_scale.kernels import FullyConnected
from ntk_scale.options import SolveOptions, default
from ntk_scale.sizing import GramPlan, normal_gram_flops, plan_gram, plan_nystrom

CATALOG = cost.load_catalog()


class FlatCost:
    """A kernel stub whose entries cost 100 FLOPs each (all plan_nystrom asks of a kernel)."""

    def cost(self, d, kind, dtype, t):
        return 100.0, 0, None


def _small(**kw):
    """N = 1000, M = 100, d = 10, float32, tile 64, 2 workers."""
    return plan_nystrom(1000, 100, 10, FlatCost(), "ntk", "float32", 64, 2, **kw)


# -- the arithmetic ---------------------------------------------------------------------------
def test_normal_gram_flops_counts_syrk_on_the_upper_triangle():
    n = 7
    assert normal_gram_flops(n, 1000) == n * 1000 * 1001  # syrk: n·m·(m + 1)
    assert normal_gram_flops(n, 10_000) < 2 * n * 10_000**2 * 0.501  # half a GEMM


def test_small_case_by_hand_normal_route_unmeasured():
    p = _small()
    # pool min(N, 4M) = 400; K(C, C): tiles 64x64, 64x36, 36x36 of the upper triangle
    assert (p.m, p.pool, p.selection_entries) == (100, 400, 40_000)
    assert p.kmm_entries == 64 * 64 + 64 * 36 + 36 * 36 == 7696
    assert p.knm_entries == 100_000 and p.entries == 147_696
    assert p.route == "normal" and not p.chosen and p.estimated_seconds is None
    # entries x 100, 30 iterations of H·P (2·M²), H = N·M·(M + 1) (syrk)
    assert p.flops == pytest.approx(147_696 * 100 + 30 * 2 * 100**2 + 1000 * 100 * 101)
    assert (p.kmm_bytes, p.knm_bytes) == (7696 * 4, 0)
    assert p.driver_memory_bytes == 4 * 8 * 100**2  # K_mm, T, A, H
    # 500 rows of X (float32), one (500, M) block + its float64 copy, H
    assert p.worker_memory_bytes == 500 * 10 * 4 + 500 * 100 * (4 + 8) + 8 * 100**2


def test_small_case_by_hand_each_route_timed():
    rates = dict(entry_seconds=1e-6, gemm_flops_per_s=1e9, read_bytes_per_s=1e8)
    p = _small(**rates)
    one_pass = 100_000 * 1e-6 / 2
    normal = one_pass + 1000 * 100 * 101 / (1e9 * 2) + 30 * 2 * 100**2 / 1e9
    assert p.chosen and p.route == "normal"
    assert p.route_seconds["normal"] == pytest.approx(normal)
    assert p.route_seconds["stored"] == pytest.approx(one_pass + 31 * 4e5 / 1e8)
    assert p.route_seconds["recompute"] == pytest.approx(30 * one_pass)
    # selection in the driver (one worker's rate), K(C, C) on both workers, then the route
    assert p.estimated_seconds == pytest.approx(1e-6 * (40_000 + 7696 / 2) + normal)
    stored = _small(**rates, memory_bytes=1e5)  # H (2 x 80 kB in choose_knm) does not fit
    assert stored.route == "stored" and stored.knm_bytes == 1000 * 100 * 4
    assert stored.flops == pytest.approx(147_696 * 100 + 30 * 4 * 1000 * 100)
    assert stored.driver_memory_bytes == 3 * 8 * 100**2
    again = _small(**rates, memory_bytes=1e5, disk_bytes=1e5)  # nor does K(X, C): recompute
    assert again.route == "recompute" and again.entries == 40_000 + 7696 + 30 * 100_000
    assert again.bytes_on_disk == 7696 * 4
    assert _small(memory_bytes=1e5).route == "stored"  # unmeasured: the first route that fits


def test_centres_are_capped_at_n_and_bad_ones_refused():
    p = plan_nystrom(50, 100, 3, FlatCost())
    assert (p.m, p.asked, p.pool, p.knm_entries) == (50, 100, 50, 2500)
    assert "capped at N; 100 asked" in dict(p.rows())["centres M"]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="must be a positive integer, e.g. 10000"):
            plan_nystrom(50, bad, 3, FlatCost())
    with pytest.raises(ValueError, match="gemm_flops_per_s=0"):
        plan_nystrom(50, 10, 3, FlatCost(), gemm_flops_per_s=0)


def test_entry_seconds_of_a_measured_tile():
    plan = plan_gram(100, 3, FullyConnected(), tile=10, measure=False, seconds_per_tile=2.0)
    assert isinstance(plan, GramPlan) and plan.entry_seconds == pytest.approx(2.0 / 100)
    assert plan_gram(100, 3, FullyConnected(), measure=False).entry_seconds is None


# -- the cloud rows ---------------------------------------------------------------------------
def test_cloud_estimate_matches_the_formulas():
    ny = cost.NystromWork(centers=10_000, entries=10**10, gemm_flops=1.2e14, iterations=30,
                          bytes_on_disk=4 * 10**8)  # fmt: skip
    work = cost.Workload(n=10**6, bytes_on_disk=2 * 10**12, gram_flops=3e15,
                         flops_per_entry=6000.0, dtype="float32", nystrom=ny)  # fmt: skip
    a = cost.CloudAssumptions(startup_minutes=0, idle_minutes=0)
    node = next(n for n in CATALOG.nodes if n.name == "p5.48xlarge")  # 8 H100, 67 TFLOP/s fp32
    e = cost.estimate(work, CATALOG, node, 2, "nystrom", a)
    rate = 16 * 67e12 * 0.5
    assert e.gram_hours * 3600 == pytest.approx(
        max(1e10 * 6000 / rate, 4e8 / (2 * 100e9 / 8 * 0.7))
    )
    # H's products are float64 whatever the Gram's dtype (falkon.add_gram): H100's fp64 peak
    fp64 = 16 * CATALOG.accelerators["H100"].peak_flops("float64") * 0.5
    assert e.solve_hours * 3600 == pytest.approx(1.2e14 / fp64)
    head = CATALOG.heads["aws"].usd_per_hour
    assert e.compute_usd == pytest.approx(e.hours * (2 * node.usd_per_hour + head))
    assert e.spot_compute_usd == pytest.approx(e.hours * (2 * node.spot_usd_per_hour + head))
    assert e.storage_usd == pytest.approx(0.4 * 0.023)
    # with d known, X (10^6 x 784 x 4 bytes) first reaches the workers through the head
    with_x = cost.estimate(cost.Workload(**{**work.__dict__, "d": 784}), CATALOG, node, 2,
                           "nystrom", a)  # fmt: skip
    head_rate = 6.25e9 / 8 * 0.7  # m6i.4xlarge's baseline x network_efficiency
    assert (with_x.gram_hours - e.gram_hours) * 3600 == pytest.approx(784 * 4e6 / head_rate)
    with pytest.raises(ValueError, match="no Nyström plan"):
        cost.estimate_nystrom(cost.Workload(1, 1, 1.0, 1.0, "float32"), CATALOG, node, 1, a)


def _work_1e6(dtype="float64"):
    spec = FullyConnected()
    plan = plan_gram(10**6, 784, spec, dtype=dtype, measure=False)
    ny = plan_nystrom(10**6, 10_000, 784, spec, dtype=dtype)
    return cost.workload(plan), ny


def test_nystrom_work_from_a_plan_and_cheaper_than_exact_at_a_million_rows():
    exact_work, ny = _work_1e6()
    ny_work = cost.nystrom_work(ny)
    assert ny_work.entries == ny.pool * 10_000 + ny.kmm_entries + 10**6 * 10_000
    # H by syrk (N·M·(M + 1)), then 30 products H·P
    assert ny_work.gemm_flops == 10**6 * 10_000 * 10_001 + 30 * 2 * 10_000**2
    assert ny_work.bytes_on_disk == ny.kmm_entries * 8 and ny_work.centers == 10_000
    work = cost.Workload(**{**exact_work.__dict__, "nystrom": ny_work})
    a = cost.CloudAssumptions()
    exact, nystrom = cost.cost_table(work, CATALOG, a), cost.nystrom_table(work, CATALOG, a)
    assert [e.node.name for e in nystrom] == [n.name for n in CATALOG.nodes]
    for e in nystrom:
        same = [x for x in exact if x.node is e.node and x.x_fits]
        assert e.usd < min(x.usd for x in same) and e.hours < min(x.hours for x in same)
    # the exact rows are the same with or without the Nyström plan beside them
    assert cost.cost_table(exact_work, CATALOG, a) == exact
    assert cost.nystrom_table(exact_work, CATALOG, a) == []


# -- the CLI ----------------------------------------------------------------------------------
def test_cli_plan_prints_the_nystrom_block_and_cloud_rows(capsys):
    assert main(["plan", "--n", "1000000", "--d", "784", "--no-measure"]) == 0
    out = capsys.readouterr().out
    m = default(SolveOptions, "centers")
    assert f"Nyström (M = {m:,}; fit with --method nystrom --centers {m})" in out
    block = out.split("Nyström (M = ")[1].split("cloud cost")[0]
    for label in ("centres M", "entries computed", "FLOPs", "bytes on disk", "driver memory",
                  "memory per worker", "K(X, C) route", "estimated wall time"):  # fmt: skip
        assert label in block
    assert "normal (assumed: rates not measured" in block
    assert f"{4 * 8 * m * m / 1e9:.1f} GB (K_mm, Falkon's T and A, H: M x M float64)" in block
    cloud = out.split(f"Nyström (M = {m:,}): K(X, C) on the normal route, 30 PCG")[1]
    for node in CATALOG.nodes:
        assert node.name in cloud.split("assumptions:")[0]
    assert "Nyström, not priced" in cloud
    assert main(["plan", "--n", "500", "--d", "784", "--no-measure", "--centers", "800"]) == 0
    assert "500 (capped at N; 800 asked)" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_cli_plan_refuses_bad_centres(capsys, bad):
    assert main(["plan", "--n", "1000", "--d", "3", "--no-measure", "--centers", bad]) == 2
    err = capsys.readouterr().err
    assert f"centers={bad} must be a positive integer" in err and "e.g. 10000" in err
