"""A cloud route that finishes (issue 22 item 4): fewer GPUs than asked for exit 3 unless the
user opts in; a stored solve releases the GPU hosts and the cost model bills them for the Gram
only; network rates are sustained baselines on a stated bucket path; spot beside on-demand;
node start-up and idle time; the copy of X a matrix-free node receives against Ray's object
store; and the RayJob takes the operator plan chooses, within its deadline. Pure: fake Ray
objects, an injected clock, hand-computed figures; no Ray, no subprocess."""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from fake_ray import FakeRay

from ntk_scale import cost, pool
from ntk_scale.cli import _dispatch
from ntk_scale.cluster import cluster_accelerator, wait_for_gpus
from ntk_scale.errors import GPUUnavailableError
from ntk_scale.kernels import FullyConnected
from ntk_scale.options import RunOptions
from ntk_scale.pool import HostRequest, Pool, host_request
from ntk_scale.sizing import cluster_operator, plan_gram

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CATALOG = cost.load_catalog()
GiB, TB = 2**30, 10**12




def _a10g_nodes(k: int) -> list[dict[str, float]]:
    return [{"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1} for _ in range(k)]


def _node(name: str) -> cost.Node:
    return next(n for n in CATALOG.nodes if n.name == name)


# -- fewer GPUs than asked for ---------------------------------------------------------------
def test_the_wait_asks_the_autoscaler_for_the_full_count(monkeypatch):
    asked: list[list[dict]] = []
    monkeypatch.setattr("ntk_scale.cluster._request_gpus", lambda b: asked.append(b) or True)
    ray, now = FakeRay({"CPU": 8}, *_a10g_nodes(2)), [0.0]

    def sleep(s):
        now[0] += s
        if now[0] >= 20:  # two more nodes join after 20 s; the fifth never does
            ray.node_list = [{"CPU": 8}, *_a10g_nodes(4)]

    have = wait_for_gpus(ray, 5, "A10G", 60, poll_s=5, clock=lambda: now[0], sleep=sleep)
    assert have == 4 and now[0] == 60, "waits the whole timeout for the fifth"
    assert len(asked[0]) == 5, "all 5 requested, not the 3 missing"
    assert asked[0][0] == {"GPU": 1.0, "accelerator_type:A10G": 0.001}
    assert asked[-1] == [], "the request is withdrawn on the way out"


def _fake_wait(have: int, seen: list[int]):
    def wait(ray, want, model, timeout_s, poll_s=5.0):
        seen.append(want)
        return have

    return wait


def test_fewer_gpus_than_workers_exit_3_naming_how_many_joined(monkeypatch):
    seen: list[int] = []
    monkeypatch.setattr(pool, "wait_for_gpus", _fake_wait(2, seen))
    run = RunOptions(workers=4, gpu_wait_s=30, accelerator="A10G")
    with pytest.raises(GPUUnavailableError) as err:
        host_request(FakeRay({"CPU": 8}, *_a10g_nodes(2)), run, on_cluster=True)
    text = str(err.value)
    assert "only 2 of the 4 A10G GPUs" in text and "within 30 s" in text
    assert "--allow-fewer-workers" in text and "allow_fewer_workers = true" in text
    assert seen == [4], "waited for the full count"
    args = argparse.Namespace(command="gram")
    ray = FakeRay({"CPU": 8}, *_a10g_nodes(2))
    assert _dispatch(lambda a: host_request(ray, run, on_cluster=True), args) == 3


def test_the_opt_in_runs_on_the_gpus_that_joined(monkeypatch):
    monkeypatch.setattr(pool, "wait_for_gpus", _fake_wait(2, []))
    run = RunOptions(workers=4, gpu_wait_s=30, allow_fewer_workers=True)
    with pytest.warns(RuntimeWarning, match=r"only 2 of the 4 GPUs .* going on with 2"):
        got = host_request(FakeRay({"CPU": 8}, *_a10g_nodes(2)), run, on_cluster=True)
    assert got == HostRequest(True, 1)
    # the full count present: no wait, no warning
    monkeypatch.setattr(pool, "wait_for_gpus", lambda *a, **k: pytest.fail("no wait needed"))
    full = FakeRay({"CPU": 8}, *_a10g_nodes(4))
    assert host_request(full, RunOptions(workers=4), on_cluster=True) == HostRequest(True, 1)


def test_the_option_is_one_record_field_with_cli_toml_and_estimator():
    from ntk_scale import NTKRegressor
    from ntk_scale.config import schema
    from ntk_scale.options import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p, RunOptions)
    assert p.parse_args(["--allow-fewer-workers"]).allow_fewer_workers is True
    assert p.parse_args([]).allow_fewer_workers is False
    assert "allow_fewer_workers" in schema()["run"]
    assert NTKRegressor(allow_fewer_workers=True).get_params()["allow_fewer_workers"] is True
    with pytest.raises(ValueError, match="true or false"):
        RunOptions(allow_fewer_workers="yes")


class _Handle:
    def __init__(self, ok: bool):
        self.ok = ok
        self.info = self

    def remote(self):
        return self  # the info() ref


class _PlacingRay(FakeRay):
    """Ray enough for Pool._grow: the first ``room`` hosts start, the rest are never placed."""

    def __init__(self, room: int, *nodes):
        super().__init__(*nodes)
        self.room, self.started, self.killed = room, 0, 0

    def remote(self, cls):
        ray = self

        class Options:
            def options(self, **kw):
                return self

            def remote(self, cores, env=None):
                ray.started += 1
                return _Handle(ray.started <= ray.room)

        return Options()

    def get_runtime_context(self):
        return argparse.Namespace(get_job_id=lambda: "job")

    def wait(self, refs, num_returns, timeout):
        return [r for r in refs if r.ok], [r for r in refs if not r.ok]

    def get(self, ref, timeout=None):
        return {"pid": id(ref)}

    def kill(self, handle, no_restart=True):
        self.killed += 1


def test_a_gpu_pool_placing_fewer_hosts_than_asked_exits_3_unless_allowed():
    ray = _PlacingRay(2, {"CPU": 8}, *_a10g_nodes(4))
    strict = Pool(ray, HostRequest(True, 1, "A10G"), 5.0, allow_fewer=False)
    with pytest.raises(GPUUnavailableError, match=r"--workers 4 .* only 2 could be placed"):
        strict.take(4)
    ray = _PlacingRay(2, {"CPU": 8}, *_a10g_nodes(4))
    lenient = Pool(ray, HostRequest(True, 1, "A10G"), 5.0, allow_fewer=True)
    with pytest.warns(RuntimeWarning, match="going on with 2"):
        assert len(lenient.take(4)) == 2


# -- a stored solve leaves the GPUs; the cost model bills them for the Gram only ----------------
class _StubPool:
    def __init__(self, n: int):
        self.slots = [object()] * n
        self.down = False

    def shutdown(self):
        self.down, self.slots = True, []


def test_a_stored_solve_on_a_cluster_releases_the_gpu_hosts_only(monkeypatch):
    gpu, cpu = HostRequest(True, 1, "A10G"), HostRequest(False, 2)
    pools = {gpu: _StubPool(4), cpu: _StubPool(2)}
    decided = {("job", "auto"): gpu, ("job", "cpu"): cpu}
    monkeypatch.setattr(pool, "_POOLS", dict(pools))
    monkeypatch.setattr(pool, "_DECIDED", dict(decided))
    on_cluster = RunOptions(address="10.0.0.1:6379")
    assert pool.release_for_solve("matrixfree", on_cluster) == 0, "its products need the GPUs"
    assert pool.release_for_solve("stored", RunOptions(address="local")) == 0, "a laptop keeps"
    assert pool.release_for_solve("stored", on_cluster) == 4
    assert pools[gpu].down and not pools[cpu].down
    assert list(pool._POOLS) == [cpu] and list(pool._DECIDED.values()) == [cpu]


def test_stored_bills_gpu_nodes_for_startup_gram_and_idle_only():
    work = cost.Workload(n=10**6, bytes_on_disk=2 * TB, gram_flops=3.0e15,
                         flops_per_entry=6000.0, dtype="float32")  # fmt: skip
    a = cost.CloudAssumptions(iterations=10, startup_minutes=6, idle_minutes=10)
    node, head = _node("g5.2xlarge"), CATALOG.heads["aws"].usd_per_hour
    stored = cost.estimate(work, CATALOG, node, 4, "stored", a)
    gram_h = max(3.0e15 / (4 * 31.2e12 * 0.5), 2 * TB / (4 * 5e9 / 8 * 0.7)) / 3600
    solve_h = 10 * 2 * TB / (6.25e9 / 8 * 0.7) / 3600  # the head's 6.25 Gbit/s baseline
    assert stored.gram_hours == pytest.approx(gram_h)
    assert stored.solve_hours == pytest.approx(solve_h)
    billed = 0.1 + gram_h + 10 / 60
    assert stored.node_hours == pytest.approx(billed), "not through the solve"
    hours = 0.1 + gram_h + solve_h
    assert stored.hours == pytest.approx(hours)
    assert stored.compute_usd == pytest.approx(billed * 4 * 1.212 + hours * head)
    dist = cost.estimate(work, CATALOG, node, 4, "distributed", a)
    assert dist.node_hours == pytest.approx(0.1 + dist.gram_hours + dist.solve_hours + 10 / 60)


# -- baselines and the bucket path ------------------------------------------------------------
def test_network_rates_are_the_baselines_with_a_cited_source():
    assert _node("g5.2xlarge").network_gbps == 5.0  # not the "up to 10" burst
    assert _node("p4d.24xlarge").network_gbps == 400.0
    assert CATALOG.heads["aws"].network_gbps == 6.25  # m6i.4xlarge, not "up to 12.5"
    for node in CATALOG.nodes:
        assert "http" in node.network_source and node.vcpus > 0 and node.memory_gb > 0
    aws = CATALOG.buckets["aws"]
    assert "gateway endpoint" in aws.path and "ec2-instance-network-bandwidth" in aws.path_source


def test_the_internet_path_caps_small_nodes_at_5_gbits_and_plan_says_which_path():
    internet = cost.CloudAssumptions(bucket_path="internet", network_efficiency=1.0)
    endpoint = cost.CloudAssumptions(network_efficiency=1.0)
    g5, p4d = _node("g5.2xlarge"), _node("p4d.24xlarge")
    assert cost.node_rate(CATALOG, g5, endpoint) == pytest.approx(5e9 / 8)
    assert cost.node_rate(CATALOG, g5, internet) == pytest.approx(5e9 / 8)
    assert cost.node_rate(CATALOG, p4d, endpoint) == pytest.approx(100e9 / 8)  # S3's per-node
    assert cost.node_rate(CATALOG, p4d, internet) == pytest.approx(100e9 / 8)  # 50% of 400
    work = cost.Workload(n=10, bytes_on_disk=10, gram_flops=1.0, flops_per_entry=1.0,
                         dtype="float32")  # fmt: skip
    head_internet = cost.head_rate(work, CATALOG, "aws", internet)
    assert head_internet == pytest.approx(5e9 / 8), "m6i.4xlarge: 16 vCPUs, capped at 5"
    assert cost.head_rate(work, CATALOG, "aws", endpoint) == pytest.approx(6.25e9 / 8)
    assert cost.head_rate(work, CATALOG, "gcp", internet) == pytest.approx(32e9 / 8), "no cap"
    text = "\n".join(cost.report_lines(work, CATALOG, cost.CloudAssumptions()))
    assert "bucket path (aws): S3 gateway endpoint" in text and "sustained baseline" in text
    text = "\n".join(cost.report_lines(work, CATALOG, internet))
    assert "bucket path (aws): internet gateway (--bucket-path internet)" in text
    with pytest.raises(ValueError, match="bucket_path"):
        cost.CloudAssumptions(bucket_path="vpn")


# -- spot, start-up and idle ------------------------------------------------------------------
def test_spot_prices_sit_beside_on_demand():
    for node in CATALOG.nodes:
        assert 0 < node.spot_usd_per_hour < node.usd_per_hour and "http" in node.spot_source
    work = cost.workload(plan_gram(10**6, 784, FullyConnected(), dtype="float32", measure=False))
    a = cost.CloudAssumptions(gpus=16)
    e = cost.estimate(work, CATALOG, _node("g5.2xlarge"), 16, "matrixfree", a)
    head = e.hours * CATALOG.heads["aws"].usd_per_hour
    assert e.spot_compute_usd == pytest.approx(e.node_hours * 16 * 0.485 + head)
    assert e.compute_usd == pytest.approx(e.node_hours * 16 * 1.212 + head)
    lines = cost.table_lines(cost.cost_table(work, CATALOG, a), work, CATALOG)
    assert lines[0].count("spot $") == len(cost.OPERATORS)
    row = next(ln for ln in lines if ln.startswith("A10G"))
    assert "$9.71" in row and "$4.03" in row, row  # matrixfree, on-demand then spot


def test_startup_and_idle_are_in_the_estimate_and_stated():
    work = cost.workload(plan_gram(10**6, 784, FullyConnected(), dtype="float32", measure=False))
    a = cost.CloudAssumptions(gpus=16, startup_minutes=12, idle_minutes=10)
    e = cost.estimate(work, CATALOG, _node("g5.2xlarge"), 16, "matrixfree", a)
    assert e.startup_hours == pytest.approx(0.2) and e.hours == pytest.approx(0.2 + e.solve_hours)
    none = cost.estimate(work, CATALOG, _node("g5.2xlarge"), 16, "matrixfree",
                         dataclasses.replace(a, startup_minutes=0, idle_minutes=0))  # fmt: skip
    assert e.node_hours - none.node_hours == pytest.approx((12 + 10) / 60)
    text = "\n".join(cost.report_lines(work, CATALOG, a))
    assert "12 min from launch to joining Ray (an assumption" in text
    assert "10 min idle before the autoscaler removes them" in text
    assert "stored: start-up + Gram + idle" in text


# -- the copy of X against the object store ---------------------------------------------------
def test_x_copy_checked_against_rays_default_object_store():
    work = cost.workload(plan_gram(10**6, 3072, FullyConnected(), dtype="float32", measure=False))
    assert work.x_bytes == 10**6 * 3072 * 4  # 12.3 GB
    g5, p4d = _node("g5.2xlarge"), _node("p4d.24xlarge")
    assert g5.object_store_bytes == pytest.approx(0.3 * 32 * GiB)  # 10.3 GB
    assert p4d.object_store_bytes == 200e9, "Ray caps its default at 200 GB"
    assert not cost.x_fits(work, g5) and cost.x_fits(work, p4d)
    text = "\n".join(cost.report_lines(work, CATALOG, cost.CloudAssumptions()))
    assert "copy of X: N x d x 4 = 1,000,000 x 3,072 x 4 = 12.3 GB" in text
    assert "default 30% of the node's RAM" in text
    assert "X DOES NOT FIT g5.2xlarge's object store (12.3 GB > 10.3 GB" in text
    assert "X DOES NOT FIT p4d" not in text
    only_g5 = dataclasses.replace(CATALOG, nodes=(g5,))
    best, fastest = cost.recommend(work, only_g5, cost.CloudAssumptions(), deadline_hours=1e6)
    assert best.operator != "matrixfree" and fastest.operator != "matrixfree"
    small = cost.workload(plan_gram(10**6, 784, FullyConnected(), dtype="float32", measure=False))
    assert cost.x_fits(small, g5)  # 3.1 GB
    assert "DOES NOT FIT" not in "\n".join(cost.x_copy_lines(small, CATALOG))


# -- auto on a cluster, and the RayJob ----------------------------------------------------------
def test_auto_on_a_cluster_takes_plans_route_without_timing_a_tile(monkeypatch):
    monkeypatch.setattr("ntk_scale.sizing.time_worker_tile", lambda *a: pytest.fail("timed"))
    run = RunOptions(address="10.0.0.1:6379", accelerator="A10G")
    op, why = pool.cluster_operator_for(run, FullyConnected(), 10**6, 784, "ntk", "float32",
                                        4096, 16)  # fmt: skip
    assert op == "matrixfree" and "auto on the cluster" in why and "stored 102" in why
    assert pool.cluster_operator_for(RunOptions(), FullyConnected(), 10, 3, "ntk", "float32",
                                     4, 1) is None, "a local Ray times a tile instead"  # fmt: skip
    assert cluster_operator(FullyConnected(), 10, 3, "ntk", "float32", 4, 1, "V100") is None
    assert cluster_accelerator(FakeRay({"CPU": 8}, *_a10g_nodes(3), {"GPU": 8})) == "A10G"
    assert cluster_accelerator(FakeRay({"CPU": 8})) is None


def _rayjob() -> tuple[dict, dict, str]:
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kuberay-rayjob.yaml").read_text())}
    return docs["RayJob"]["spec"], docs["ConfigMap"], docs["ConfigMap"]["data"]["fit.toml"]


def test_the_rayjob_takes_operator_auto_and_its_deadline_covers_the_route(tmp_path):
    from ntk_scale.config import load_config

    spec, _, text = _rayjob()
    assert tomllib.loads(text)["solver"]["operator"] == "auto"
    sized = re.search(r"Sized for: ntk-scale plan --n (\d+) --d (\d+) --dtype (\w+) --gpus (\d+)",
                      text)  # fmt: skip
    n, d, dtype, gpus = int(sized[1]), int(sized[2]), sized[3], int(sized[4])
    (tmp_path / "fit.toml").write_text(text)
    cfg = load_config(str(tmp_path / "fit.toml"))
    assert cfg.run.workers == gpus and cfg.gram.dtype == dtype
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    (model,) = [k.split(":")[1] for k in group["resources"] if k.startswith("accelerator_type:")]
    assert group["replicas"] == gpus
    plan = plan_gram(n, d, cfg.kernel, cfg.gram.kind, dtype, cfg.gram.tile, gpus, measure=False)
    work, node = cost.workload(plan), cost.node_for(CATALOG, model)
    chosen, _ = cost.cluster_route(work, CATALOG, node, gpus, cost.CloudAssumptions(gpus=gpus))
    assert chosen.operator == "matrixfree" and chosen.x_fits
    # the fit after the solve predicts too: allow it the solve's time again
    assert 2 * chosen.hours * 3600 <= spec["activeDeadlineSeconds"]
    stored = cost.estimate(work, CATALOG, node, gpus, "stored", cost.CloudAssumptions(gpus=gpus))
    assert stored.hours * 3600 > spec["activeDeadlineSeconds"], "the old route would not finish"
    op, _ = cluster_operator(cfg.kernel, n, d, cfg.gram.kind, dtype, cfg.gram.tile, gpus, model)
    assert op == chosen.operator, "fit's auto on the cluster agrees with plan"
    # fit's auto is given the job's own deadline
    assert cfg.run.deadline_hours * 3600 == spec["activeDeadlineSeconds"]


def test_fits_auto_on_a_cluster_takes_the_cheapest_route_within_its_deadline():
    """deadline_hours reaches plan's choice: at N = 10^6 on 16 A10G the cheapest route
    (matrixfree, about 19 min) stands within 6 h; within 5 minutes none finishes, so auto takes
    the fastest and says so."""
    base = RunOptions(address="10.0.0.1:6379", accelerator="A10G")
    args = (FullyConnected(), 10**6, 784, "ntk", "float32", 4096, 16)
    op, why = pool.cluster_operator_for(dataclasses.replace(base, deadline_hours=6), *args)
    assert op == "matrixfree" and "the cheapest within 6" in why
    _, why = pool.cluster_operator_for(dataclasses.replace(base, deadline_hours=5 / 60), *args)
    assert "none finishes within" in why and "the fastest" in why
    for bad in (0, -1.0, float("inf"), "6h", True):
        with pytest.raises(ValueError, match="deadline_hours=.* must be a number of hours > 0"):
            RunOptions(deadline_hours=bad)


def test_plan_flags_for_the_bucket_path_start_up_and_idle(capsys):
    """The cost assumptions the table prints are the plan command's flags (they reach it)."""
    from ntk_scale.cli import main

    args = ["plan", "--n", "100000", "--d", "10", "--no-measure"]
    assert main([*args, "--bucket-path", "internet", "--startup-minutes", "3",
                 "--idle-minutes", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "internet gateway (--bucket-path internet)" in out
    assert "3 min from launch to joining Ray" in out and "then 4 min idle" in out
    with pytest.raises(SystemExit) as bad:  # argparse's own refusal, naming the choices
        main([*args, "--bucket-path", "nowhere"])
    assert bad.value.code == 2
