"""deploy/ KubeRay manifests: every worker group advertises its accelerator, and Ray's own
autoscaler (the KubeRay config translation, then the v1 and v2 bin-packing schedulers) scales the
intended group for a request naming a GPU model and gpu-a10g for a plain {"GPU": 1}; the pod
requests fit the machines named for each group; the RayJob has deadlines and does not retry;
head and workers use different ServiceAccounts; a NetworkPolicy covers the Ray ports; the token
is never on a command line. Fast, offline."""

from __future__ import annotations

import copy
import re
from functools import partial
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MANIFESTS = {"RayCluster": "kuberay-raycluster.yaml", "RayJob": "kuberay-rayjob.yaml"}
#: The group a plain {"GPU": 1} (what ntk_scale's actors ask for) must scale: the cheapest.
DEFAULT_GROUP = "gpu-a10g"
GIB = 2**30

# Machines named in the manifests: vCPUs, memory (GiB), GPUs, the NVIDIA product name (which Ray
# turns into accelerator_type), and for EKS the max pods of the VPC CNI (which sizes the kubelet's
# memory reservation). Sources: https://aws.amazon.com/ec2/instance-types/g5/ , /p4/ , /p5/ ;
# eni-max-pods.txt in https://github.com/awslabs/amazon-eks-ami ;
# https://cloud.google.com/compute/docs/gpus (G2, A2, A3 machine types; GCE's "GB" are GiB).
MACHINES = {
    "g5.4xlarge": ("eks", 16, 64, 1, "NVIDIA A10G", 234),
    "p4d.24xlarge": ("eks", 96, 1152, 8, "NVIDIA A100-SXM4-40GB", 737),
    "p5.48xlarge": ("eks", 192, 2048, 8, "NVIDIA H100 80GB HBM3", 100),
    "g2-standard-16": ("gke", 16, 64, 1, "NVIDIA L4", None),
    "a2-highgpu-1g": ("gke", 12, 85, 1, "NVIDIA A100-SXM4-40GB", None),
    "a3-highgpu-8g": ("gke", 208, 1872, 8, "NVIDIA H100 80GB HBM3", None),
}
#: What the kernel and firmware keep of a VM's nominal memory before the kubelet sees it.
KERNEL_SHARE = 0.03
#: DaemonSets on a GPU node (CNI, kube-proxy, device plugin, CSI, logging, metrics agents).
DAEMONSET_CPU, DAEMONSET_MEM_GIB = 1.0, 2.0
EVICTION_GIB = 100 / 1024  # evictionHard memory.available 100Mi on both


def _cpu_reserved(vcpus: int) -> float:
    """kube-reserved CPU, the same tiers on EKS AMIs and GKE: 6% of the first core, 1% of the
    second, 0.5% of the next two, 0.25% of the rest (awslabs/amazon-eks-ami;
    https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes)."""
    tiers = [(1, 0.06), (1, 0.01), (2, 0.005), (float("inf"), 0.0025)]
    left, total = float(vcpus), 0.0
    for size, share in tiers:
        take = min(left, size)
        total, left = total + take * share, left - take
    return total


def _mem_reserved_gib(cloud: str, mem_gib: float, max_pods: int | None) -> float:
    if cloud == "eks":  # 255 MiB + 11 MiB per pod the node may hold (amazon-eks-ami)
        return (255 + 11 * max_pods) / 1024
    # GKE: 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next 112,
    # 2% above 128 (plan-node-sizes, above).
    tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)]
    left, total = mem_gib, 0.0
    for size, share in tiers:
        take = min(left, size)
        total, left = total + take * share, left - take
    return total


def _allocatable(machine: str) -> tuple[float, float]:
    """(vCPU, GiB) left for our pods on one node of `machine`."""
    cloud, vcpus, mem, _, _, max_pods = MACHINES[machine]
    cpu = vcpus - _cpu_reserved(vcpus) - DAEMONSET_CPU
    memory = mem * (1 - KERNEL_SHARE) - _mem_reserved_gib(cloud, mem, max_pods)
    return cpu, memory - EVICTION_GIB - DAEMONSET_MEM_GIB


def _quantity(q: str) -> float:
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    return float(parse_quantity(str(q)))


def _doc(kind: str) -> dict:
    for doc in yaml.safe_load_all((DEPLOY / MANIFESTS[kind]).read_text()):
        if doc["kind"] == kind:
            return doc
    raise AssertionError(kind)


def _cluster_spec(kind: str) -> dict:
    doc = _doc(kind)
    return doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]


def _gke_comments(kind: str) -> list[tuple[str, str]]:
    """`# on GKE: instance-type X, accelerator_type:Y` above each group's nodeSelector, in order."""
    text = (DEPLOY / MANIFESTS[kind]).read_text()
    return re.findall(r"# on GKE: instance-type ([\w.-]+), accelerator_type:([\w-]+)", text)


def _accelerator(group: dict) -> str:
    names = [
        k.split(":", 1)[1] for k in group.get("resources", {}) if k.startswith("accelerator_type:")
    ]
    assert len(names) == 1, f"{group['groupName']}: advertise exactly one accelerator_type"
    return names[0]


# -- the accelerator each group advertises ------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_worker_group_advertises_the_accelerator_its_node_has(kind):
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    to_type = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type
    groups = _cluster_spec(kind)["workerGroupSpecs"]
    gke = _gke_comments(kind)
    assert len(gke) == len(groups), "every group names its GKE machine"
    for group, (gke_machine, gke_acc) in zip(groups, gke, strict=True):
        eks_machine = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        # The name Ray itself gives that GPU at run time, so the advertised and the detected
        # resource are one (ray/_private/accelerators/nvidia_gpu.py).
        assert _accelerator(group) == to_type(MACHINES[eks_machine][4]), group["groupName"]
        assert gke_acc == to_type(MACHINES[gke_machine][4]), group["groupName"]
        assert not group["rayStartParams"].get("resources"), "KubeRay refuses both"


# -- Ray's autoscaler on these groups -----------------------------------------------------------
def _autoscaling_config(kind: str) -> dict:
    """The autoscaler config Ray derives from the RayCluster (what KubeRay's autoscaler runs)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    spec = copy.deepcopy(_cluster_spec(kind))
    # The operator turns group `resources` into ray start's --resources and the CR keeps them
    # (updateRayStartParamsResources, ray-operator/controllers/ray/common/pod.go, v1.6.0).
    cr = {"metadata": {"name": "ntk-scale", "namespace": "default"}, "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(cr)


def _launch_v1(config: dict, demands: list[dict]) -> dict[str, int]:
    from ray.autoscaler._private import resource_demand_scheduler as rds
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )

    scorer = partial(
        rds._default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({})
    )
    types = config["available_node_types"]
    to_add, left = rds.get_nodes_for(types, {}, config["head_node_type"], 1000, demands, scorer)
    assert not left, f"v1 cannot place {left}"
    return dict(to_add)


def _launch_v2(config: dict, demands: list[dict]) -> dict[str, int]:
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil

    node_types = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True)
    requests = [ResourceRequestUtil.make(d) for d in demands]
    request = SchedulingRequest(
        disable_launch_config_check=True,
        node_type_configs=node_types.get_node_type_configs(),
        resource_requests=ResourceRequestUtil.group_by_count(requests),
    )
    reply = ResourceDemandScheduler().schedule(request)
    assert not reply.infeasible_resource_requests, "v2 cannot place the request"
    return {launch.instance_type: launch.count for launch in reply.to_launch}


SCHEDULERS = {"v1": _launch_v1, "v2": _launch_v2}


@pytest.mark.parametrize("version", sorted(SCHEDULERS))
@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_a_request_naming_a_gpu_model_scales_that_group(kind, version):
    config = _autoscaling_config(kind)
    for group in _cluster_spec(kind)["workerGroupSpecs"]:
        # What ray.remote(num_gpus=1, accelerator_type="A100") asks for.
        demand = {"GPU": 1, f"accelerator_type:{_accelerator(group)}": 0.001}
        for n in (1, 4):
            launched = SCHEDULERS[version](config, [demand] * n)
            assert launched == {group["groupName"]: n}, (demand, launched)


@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("version", sorted(SCHEDULERS))
def test_a_plain_gpu_request_scales_the_default_group_not_one_by_name(version, n):
    config = _autoscaling_config("RayCluster")
    assert {"gpu-h100", DEFAULT_GROUP} <= set(config["available_node_types"])
    assert SCHEDULERS[version](config, [{"GPU": 1}] * n) == {DEFAULT_GROUP: n}


def test_a_group_without_the_marker_would_tie_and_go_by_name():
    """The check above has teeth: drop large_gpu and v1 picks gpu-h100 by name."""
    config = _autoscaling_config("RayCluster")
    for t in config["available_node_types"].values():
        t["resources"].pop("large_gpu", None)
    assert _launch_v1(config, [{"GPU": 1}]) == {"gpu-h100": 1}


# -- requests against the machines --------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_pod_requests_fit_the_machines_named_for_each_group(kind):
    groups = _cluster_spec(kind)["workerGroupSpecs"]
    for group, (gke_machine, _) in zip(groups, _gke_comments(kind), strict=True):
        eks_machine = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        container = group["template"]["spec"]["containers"][0]["resources"]
        requests, limits = container["requests"], container["limits"]
        assert requests == limits, "guaranteed QoS: requests are what the pod gets"
        gpus = int(requests["nvidia.com/gpu"])
        for machine in (eks_machine, gke_machine):
            pods = MACHINES[machine][3] // gpus
            assert pods >= 1, f"{group['groupName']}: {machine} has fewer GPUs than a pod asks"
            cpu, mem = _allocatable(machine)
            need_cpu = pods * _quantity(requests["cpu"])
            need_mem = pods * _quantity(requests["memory"]) / GIB
            where = f"{group['groupName']} x{pods} on {machine}"
            assert need_cpu <= cpu, f"{where}: {need_cpu} vCPU > {cpu:.2f} allocatable"
            assert need_mem <= mem, f"{where}: {need_mem:.1f} GiB > {mem:.1f} allocatable"


def test_allocatable_model_matches_the_documented_examples():
    # GKE's own example: a 4-core node reserves 80 m CPU; 16 GiB reserves 2.6 GiB (plan-node-sizes).
    assert _cpu_reserved(4) == pytest.approx(0.08)
    assert _mem_reserved_gib("gke", 16, None) == pytest.approx(2.6)
    # The old A10G request (14 vCPU, 56 GiB) did not fit the GKE machine the comments named.
    cpu, mem = _allocatable("a2-highgpu-1g")
    assert 120 > mem and cpu < 11.0 + 1


# -- the RayJob ---------------------------------------------------------------------------------
def test_rayjob_has_deadlines_and_does_not_retry_deterministic_failures():
    spec = _doc("RayJob")["spec"]
    # Both RayJobSpec fields exist in KubeRay v1.6.0 (ray-operator/apis/ray/v1/rayjob_types.go).
    assert spec["backoffLimit"] == 0, "exit 1/2/3 would fail again on a new GPU cluster"
    pre, active = spec["preRunningDeadlineSeconds"], spec["activeDeadlineSeconds"]
    assert isinstance(pre, int) and isinstance(active, int)
    assert 0 < pre <= 3600, "unschedulable GPU pods fail the job within the hour"
    assert pre < active <= 7 * 24 * 3600
    assert spec["submitterConfig"]["backoffLimit"] <= 3
    assert spec["shutdownAfterJobFinishes"]


# -- ServiceAccounts, NetworkPolicy, token ------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_head_and_workers_use_different_service_accounts(kind):
    spec = _cluster_spec(kind)
    head = spec["headGroupSpec"]["template"]["spec"].get("serviceAccountName")
    workers = {g["template"]["spec"].get("serviceAccountName") for g in spec["workerGroupSpecs"]}
    assert head and head != "default", "KubeRay binds the autoscaler's Role to the head's SA"
    assert None not in workers and "default" not in workers
    assert head not in workers, "workers would hold the autoscaler's Role"
    runbook = (DEPLOY / "README.md").read_text()
    for sa in {head} | workers:
        assert f"kubectl create serviceaccount {sa}" in runbook, sa


def _policy() -> dict:
    return yaml.safe_load((DEPLOY / "kuberay-networkpolicy.yaml").read_text())


def _ray_pod_templates() -> list[dict]:
    out = []
    for kind in MANIFESTS:
        spec = _cluster_spec(kind)
        out += [spec["headGroupSpec"]["template"]] + [
            g["template"] for g in spec["workerGroupSpecs"]
        ]
    return out


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions not modelled here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policy_selects_every_ray_pod_and_limits_the_ray_ports():
    policy = _policy()
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    assert spec["podSelector"]["matchLabels"], "an empty selector would mean every pod"
    for template in _ray_pod_templates():
        assert _matches(spec["podSelector"], template["metadata"]["labels"])
    ray_pod = {"podSelector": spec["podSelector"]}
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
    job_name = _doc("RayJob")["metadata"]["name"]
    submitter = {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": job_name}}}
    allowed = {6379: [ray_pod], 10001: [ray_pod], 8265: [ray_pod, operator, submitter]}
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        ports = {p["port"] for p in rule.get("ports", [])} or set(allowed)  # no ports: all
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            for port in ports & set(allowed):
                assert peer in allowed[port], f"port {port} admits {peer}"
    runbook = (DEPLOY / "README.md").read_text()
    assert runbook.index("kubectl apply -f deploy/kuberay-networkpolicy.yaml") < runbook.index(
        "`kubectl apply -f deploy/kuberay-rayjob.yaml`"
    )
    assert "--namespace kuberay-system" in runbook, "the operator where the policy admits it"


def test_the_token_is_never_on_a_command_line():
    for path in DEPLOY.iterdir():
        text = path.read_text()
        assert "--from-literal=auth_token" not in text, path.name
        assert not re.search(r"RAY_AUTH_TOKEN=\S", text.replace("RAY_AUTH_TOKEN=$(kubectl", "")), (
            path.name
        )
    runbook = re.sub(r"\\\n\s*", " ", (DEPLOY / "README.md").read_text())
    creates = re.findall(r"kubectl create secret generic ntk-scale-ray-token[^\n]*", runbook)
    assert creates and all("--from-file=auth_token=/dev/stdin" in c for c in creates)
