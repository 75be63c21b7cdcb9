"""`plan` for the cloud: the pure cost model against hand-computed numbers, the data file, the
deadline recommendation, and the CLI measuring an s3:// store on the local S3 server."""

from __future__ import annotations

import dataclasses
import math

import pytest
from test_s3 import ROOT, s3  # noqa: F401 - the local S3 server fixture (sets its env at import)

from ntk_scale import cost
from ntk_scale.cli import main
from ntk_scale.kernels import FullyConnected
from ntk_scale.sizing import gpu_model, plan_gram

CATALOG = cost.load_catalog()
TB = 10**12


def _work(**kw):
    base = dict(n=10**6, bytes_on_disk=2 * TB, gram_flops=3.0e15, flops_per_entry=6000.0,
                dtype="float32")  # fmt: skip
    return cost.Workload(**{**base, **kw})


def _node(name):
    return next(n for n in CATALOG.nodes if n.name == name)


def test_catalog_covers_the_deploy_gpus_with_sources():
    assert {n.accelerator for n in CATALOG.nodes} == {"A10G", "L4", "A100", "H100"}
    for acc in CATALOG.accelerators.values():
        assert acc.fp32_tflops > acc.fp64_tflops > 0 and "http" in acc.source
    for node in CATALOG.nodes:
        assert node.usd_per_hour > 0 and node.region and "http" in node.source
    assert CATALOG.buckets["aws"].usd_per_gb_month == pytest.approx(0.023)
    assert CATALOG.prices_checked


def test_stored_iteration_through_one_head_is_tens_of_minutes():
    """2 TB through one head at 6-12 Gbit/s: 22-45 minutes an iteration."""
    work, node = _work(), _node("g5.2xlarge")
    for gbps, minutes in [(6, 44.4), (12, 22.2)]:
        a = cost.CloudAssumptions(iterations=1, head_gbps=gbps)
        e = cost.estimate(work, CATALOG, node, 1, "stored", a)
        assert e.solve_hours * 60 == pytest.approx(minutes, rel=1e-2)
    a = cost.CloudAssumptions(iterations=1)  # m6i.4xlarge's 6.25 Gbit/s baseline x 0.7
    minutes = cost.estimate(work, CATALOG, node, 1, "stored", a).solve_hours * 60
    assert minutes == pytest.approx(2 * TB / (6.25e9 / 8 * 0.7) / 60)


def test_estimates_match_the_formulas():
    a = cost.CloudAssumptions(iterations=10, gpu_efficiency=0.5, network_efficiency=0.5,
                              startup_minutes=0, idle_minutes=0)  # fmt: skip
    work, node = _work(), _node("p5.48xlarge")  # 8 H100, 3200 Gbit/s capped at S3's 100
    rate, net = 67e12 * 0.5, 100e9 / 8 * 0.5
    e = cost.estimate(work, CATALOG, node, 2, "distributed", a)
    gram = max(3.0e15 / (16 * rate), 2 * TB / (2 * net))
    assert e.gram_hours * 3600 == pytest.approx(gram)
    assert e.solve_hours * 3600 == pytest.approx(10 * 2 * TB * (2 - 1 / 16) / (2 * net))
    head = CATALOG.heads["aws"].usd_per_hour
    assert e.compute_usd == pytest.approx(e.hours * (2 * node.usd_per_hour + head))
    assert e.storage_usd == pytest.approx(2000 * 0.023)
    free = cost.estimate(work, CATALOG, node, 2, "matrixfree", a)
    assert free.gram_hours == 0 and free.storage_usd == 0
    assert free.solve_hours * 3600 == pytest.approx(10 * 1e12 * 6000 / (16 * rate))
    stored = cost.estimate(work, CATALOG, node, 2, "stored", a)
    assert stored.compute_usd == pytest.approx(
        stored.gram_hours * 2 * node.usd_per_hour + stored.hours * head
    )  # the GPU nodes leave once the Gram is written


def test_measured_tile_replaces_the_datasheet_and_small_panels_are_read_once():
    a = cost.CloudAssumptions(iterations=50, startup_minutes=0)
    node = _node("g2-standard-8")
    slow = cost.estimate(_work(measured={"L4": 1e12}), CATALOG, node, 1, "matrixfree", a)
    fast = cost.estimate(_work(), CATALOG, node, 1, "matrixfree", a)
    assert slow.solve_hours / fast.solve_hours == pytest.approx(30.3e12 * 0.5 / 1e12)
    small = _work(n=20_000, bytes_on_disk=800 * 10**6)  # panels 1.6 GB per actor: in memory
    once = cost.estimate(small, CATALOG, node, 1, "distributed", a)
    net = 16e9 / 8 * 0.7  # g2-standard-8's 16 Gbit/s x network_efficiency
    assert once.solve_hours * 3600 == pytest.approx(800e6 * (2 - 1) / net)  # not x 50


def test_deadline_picks_the_cheapest_pool_that_meets_it():
    work, a = _work(), cost.CloudAssumptions()
    best, fastest = cost.recommend(work, CATALOG, a, deadline_hours=24)
    assert best.hours <= 24 and fastest.hours <= best.hours
    every = [cost.estimate(work, CATALOG, n, k, op, a) for n in CATALOG.nodes
             for k in range(1, n.max_nodes + 1) for op in cost.OPERATORS]  # fmt: skip
    assert best.usd <= min(e.usd for e in every if e.hours <= 24) + 0.005
    tight, _ = cost.recommend(work, CATALOG, a, deadline_hours=fastest.hours * 0.5)
    assert tight is None
    # with only a stored solve possible, 100 iterations through one head miss a day
    only = dataclasses.replace(CATALOG, nodes=(_node("g5.2xlarge"),))
    stored_only = [e for e in cost.cost_table(work, only, a) if e.operator == "stored"]
    assert stored_only[0].hours > 24


@pytest.mark.parametrize("text, hours", [("24h", 24), ("2d", 48), ("90m", 1.5), ("1.5", 1.5)])
def test_parse_duration(text, hours):
    assert cost.parse_duration(text) == pytest.approx(hours)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="24h, 2d or 90m"):
        cost.parse_duration("tomorrow")
    with pytest.raises(ValueError, match="gpu_efficiency"):
        cost.CloudAssumptions(gpu_efficiency=2)
    assert gpu_model("NVIDIA H100 80GB HBM3", CATALOG.accelerators) == "H100"
    assert gpu_model("NVIDIA A100-SXM4-40GB", CATALOG.accelerators) == "A100"
    assert gpu_model("NVIDIA L40S", CATALOG.accelerators) is None
    assert gpu_model("NVIDIA A10G", CATALOG.accelerators) == "A10G"


def test_n_1e6_table_from_a_plan():
    plan = plan_gram(10**6, 3072, FullyConnected(), measure=False)
    work = cost.workload(plan)
    assert work.bytes_on_disk == pytest.approx(2.0 * TB, rel=0.01)
    lines = cost.report_lines(work, CATALOG, cost.CloudAssumptions(), deadline_hours=24)
    text = "\n".join(lines)
    for name in ("g5.2xlarge", "g2-standard-8", "p4d.24xlarge", "p5.48xlarge", "a3-highgpu-8g"):
        assert name in text
    assert "cheapest within 24.0 h" in text and "PCG iterations: 100" in text


def test_cli_plan_prints_the_table_without_measuring(capsys):
    argv = ["plan", "--n", "1000000", "--d", "3072", "--no-measure", "--dtype", "float32",
            "--deadline", "2d",
            "--iterations", "40", "--head-gbps", "10"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Gram + 40 PCG iterations" in out and "(--head-gbps)" in out
    assert "one stored iteration reads 2.0 TB through the head: aws 26.7 min" in out
    assert "cheapest within 48.0 h" in out
    assert main(["plan", "--n", "10", "--d", "3", "--no-measure", "--deadline", "soon"]) == 2


def test_cli_plan_measures_an_s3_store(s3, capsys):  # noqa: F811
    url = f"{ROOT}/plan-probe"
    argv = ["plan", "--n", "1000000", "--d", "3072", "--tile", "1024", "--store", url,
            "--probe-mb", "8", "--deadline", "24h"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "store write rate" in out and "measured at s3://" in out
    assert "(measured against the store)" in out and "cheapest within 24.0 h" in out
    assert not s3.list_objects_v2(Bucket="ntk-scale-test", Prefix="plan-probe").get("Contents")
    rate = float(out.split("store read rate")[1].split("MB/s")[0])
    assert math.isfinite(rate) and rate > 0
