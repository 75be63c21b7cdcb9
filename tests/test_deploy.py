"""deploy/: the cluster-launcher configs pass Ray's own validation; the KubeRay manifests carry what
a RayJob needs, with field names checked against KubeRay's ray.io/v1 API; token authentication
everywhere, no dashboard on a public interface, no secret in any file."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
LAUNCHER = {"aws": "aws-gpu.yaml", "gcp": "gcp-gpu.yaml"}
KUBERAY = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-networkpolicy.yaml")
#: GPU instance families per cloud: A10G / A100 / H100 on AWS, L4 / A100 / H100 on GCP.
GPU_FAMILIES = {"aws": ("g5.", "p4d.", "p5."), "gcp": ("g2-", "a2-", "a3-")}
MIN_RAY = (2, 54)  # pyproject's ray[default]>=2.54; token authentication needs >= 2.52

# Field names of KubeRay's ray.io/v1 API, as of KubeRay v1.6.0 (the oldest operator with
# authOptions.secretName, which the manifests use): the json tags of RayClusterSpec,
# HeadGroupSpec, WorkerGroupSpec, AuthOptions and AutoscalerOptions in
# ray-operator/apis/ray/v1/raycluster_types.go, and of RayJobSpec and SubmitterConfig in
# ray-operator/apis/ray/v1/rayjob_types.go (https://github.com/ray-project/kuberay, tag v1.6.0);
# the same lists are in the generated API reference,
# https://docs.ray.io/en/latest/cluster/kubernetes/references/api.html .
RAY_CLUSTER_SPEC = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_SPEC = {
    "template", "headService", "enableIngress", "resources", "labels", "rayStartParams",
    "serviceType",
}  # fmt: skip
WORKER_GROUP_SPEC = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
AUTH_OPTIONS = {"enableK8sTokenAuth", "secretName", "mode"}
AUTH_MODES = {"disabled", "token"}
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
    "upscalingMode", "version", "env", "envFrom", "volumeMounts",
}  # fmt: skip
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
SUBMITTER_CONFIG = {"backoffLimit"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
#: KubeRay's MaxRayClusterNameLength (53) and MaxRayJobNameLength (53 - 6).
MAX_NAME = {"RayCluster": 53, "RayJob": 47}
# core/v1 (Kubernetes API reference): the PodSpec and Container fields a typo would hide in.
POD_SPEC = {
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers",
    "dnsConfig", "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases",
    "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname", "imagePullSecrets",
    "initContainers", "nodeName", "nodeSelector", "os", "overhead", "preemptionPolicy",
    "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
    "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "securityContext",
    "serviceAccount", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace",
    "subdomain", "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints",
    "volumes",
}  # fmt: skip
CONTAINER = {
    "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle",
    "livenessProbe", "name", "ports", "readinessProbe", "resizePolicy", "resources",
    "restartPolicy", "securityContext", "startupProbe", "stdin", "stdinOnce",
    "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices", "volumeMounts",
    "workingDir",
}  # fmt: skip


def _launcher(cloud: str) -> dict:
    return yaml.safe_load((DEPLOY / LAUNCHER[cloud]).read_text())


def _manifests() -> dict[str, dict]:
    docs = {}
    for name in KUBERAY:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            docs[doc["kind"]] = doc
    return docs


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"(\d+)\.(\d+)\.(\d+)", text).groups())


# -- cluster launcher ---------------------------------------------------------------------------
@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_passes_rays_validation(cloud):
    """The autoscaler schema of the installed ray (ray/autoscaler/ray-schema.json) on the file as
    written, then Ray's validate_config on the config `ray up` builds from it (prepare_config:
    the provider's defaults.yaml merged in, commands merged) -- everything before the cloud."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher(cloud)
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(copy.deepcopy(config))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == cloud


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers(cloud):
    config = _launcher(cloud)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no worker actors on the head"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    machine = "InstanceType" if cloud == "aws" else "machineType"
    found = set()
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0 and node_type["max_workers"] > 0, name
        kind = node_type["node_config"][machine]
        family = next((f for f in GPU_FAMILIES[cloud] if kind.startswith(f)), None)
        assert family, f"{name}: {kind} is not one of the GPU families {GPU_FAMILIES[cloud]}"
        found.add(family)
        if cloud == "gcp":  # GCP node types must declare their GPUs themselves
            assert node_type["resources"]["GPU"] >= 1
            assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert found == set(GPU_FAMILIES[cloud])
    assert 0 < config["max_workers"] and config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_installs_ntk_scale_and_cuda_jax(cloud):
    config = _launcher(cloud)
    setup = " ".join(config["setup_commands"])
    assert "ntk-scale" in setup and "ntk_scale-*.whl" in setup
    assert config["file_mounts"]["/home/ubuntu/ntk-dist"] == "dist"
    ray_pin = re.search(r'"ray\[default\]==([\d.]+)"', setup).group(1)
    assert _version(ray_pin)[:2] >= MIN_RAY
    assert any("jax[cuda12]" in c for c in config["worker_setup_commands"])
    # Every Ray process runs from the environment that holds ntk_scale.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("~/ntk/bin/ray start" in c for c in starts), key


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_turns_on_token_auth_and_keeps_the_dashboard_on_loopback(cloud):
    config = _launcher(cloud)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "export RAY_AUTH_MODE=token;" in start, key
        assert "RAY_AUTH_TOKEN=" not in start, "the token comes from the mounted file"
    assert any("RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    # The token file is the one `ray get-auth-token --generate` wrote in your home directory,
    # copied over SSH: a path outside the repository, never a value in it.
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    head = next(c for c in config["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert not any("dashboard-host" in c for c in config["worker_start_ray_commands"])


def test_one_ray_version_everywhere():
    """The nodes' Ray (launcher pins, KubeRay rayVersion, the image in the runbook) and the Ray
    the runbook installs locally must be one version: Ray refuses mismatched clients."""
    found = {}
    for cloud, name in LAUNCHER.items():
        setup = " ".join(_launcher(cloud)["setup_commands"])
        found[name] = re.search(r'"ray\[default\]==([\d.]+)"', setup).group(1)
    for kind, doc in _manifests().items():
        if kind in ("RayCluster", "RayJob"):
            spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
            found[kind] = spec["rayVersion"]
    readme = (DEPLOY / "README.md").read_text()
    found["README image"] = re.search(r"FROM rayproject/ray:([\d.]+)-", readme).group(1)
    found["README pip"] = re.search(r'"ray\[default\]==([\d.]+)"', readme).group(1)
    assert len(set(found.values())) == 1, found


# -- KubeRay ------------------------------------------------------------------------------------
def _unknown(obj: dict, allowed: set[str]) -> set[str]:
    return set(obj) - allowed


def _check_cluster_spec(spec: dict, where: str) -> None:
    """Field names (KubeRay v1.6.0) and KubeRay's own ValidateRayClusterSpec rules."""
    assert not _unknown(spec, RAY_CLUSTER_SPEC), f"{where}: {_unknown(spec, RAY_CLUSTER_SPEC)}"
    assert _version(spec["rayVersion"])[:2] >= MIN_RAY
    auth = spec["authOptions"]
    assert not _unknown(auth, AUTH_OPTIONS) and auth["mode"] in AUTH_MODES
    assert auth["mode"] == "token" and auth["secretName"], where
    assert not auth.get("enableK8sTokenAuth"), "not supported for RayJob"
    opts = spec.get("autoscalerOptions", {})
    assert not _unknown(opts, AUTOSCALER_OPTIONS), where
    assert opts.get("upscalingMode", "Default") in UPSCALING_MODES
    assert opts.get("idleTimeoutSeconds", 0) >= 0
    head = spec["headGroupSpec"]
    assert not _unknown(head, HEAD_GROUP_SPEC), f"{where}: {_unknown(head, HEAD_GROUP_SPEC)}"
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert not _unknown(g, WORKER_GROUP_SPEC), f"{where}: {_unknown(g, WORKER_GROUP_SPEC)}"
        assert isinstance(g["rayStartParams"], dict) and g["template"]["spec"]["containers"]
        assert 0 <= g["minReplicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
    for template in [head["template"]] + [g["template"] for g in groups]:
        pod = template["spec"]
        assert not _unknown(pod, POD_SPEC), f"{where}: {_unknown(pod, POD_SPEC)}"
        for c in pod["containers"]:
            assert not _unknown(c, CONTAINER), f"{where}: {_unknown(c, CONTAINER)}"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifest_uses_documented_fields(kind):
    doc = _manifests()[kind]
    assert doc["apiVersion"] == "ray.io/v1"
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= MAX_NAME[kind]
    if kind == "RayJob":
        assert not _unknown(doc["spec"], RAY_JOB_SPEC), _unknown(doc["spec"], RAY_JOB_SPEC)
        assert not _unknown(doc["spec"].get("submitterConfig", {}), SUBMITTER_CONFIG)
        _check_cluster_spec(doc["spec"]["rayClusterSpec"], kind)
    else:
        _check_cluster_spec(doc["spec"], kind)


def test_rayjob_carries_entrypoint_runtime_env_and_config(tmp_path):
    from ray.runtime_env import RuntimeEnv

    from ntk_scale.config import load_config

    docs = _manifests()
    spec = docs["RayJob"]["spec"]
    assert spec["submissionMode"] in SUBMISSION_MODES
    # A failed attempt is not retried on a new cluster (its exits are deterministic); deadlines
    # and no-retry are checked in tests/test_deploy_kuberay.py.
    assert spec["backoffLimit"] == 0
    assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] >= 0
    entry = spec["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "ntk_scale.cli", "fit"]
    config_path = Path(entry[4])
    # runtimeEnvYAML is YAML (KubeRay's check) and a runtime env Ray accepts.
    env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    assert env["env_vars"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    # The config comes from the ConfigMap mounted on the head, where the entrypoint runs.
    pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "fit-config")
    assert Path(mount["mountPath"]) == config_path.parent
    volume = next(v for v in pod["volumes"] if v["name"] == "fit-config")
    config_map = docs["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    text = config_map["data"][config_path.name]
    (tmp_path / config_path.name).write_text(text)
    cfg = load_config(str(tmp_path / config_path.name))  # ntk_scale's own validation
    paths = [*cfg.data.values(), cfg.store, cfg.output["dir"]]
    assert all(p.startswith(("s3://", "gs://")) for p in paths), "everything in the bucket"
    assert tomllib.loads(text)["run"]["workers"] >= 1


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_gpu_workers_and_token_auth_from_a_secret(kind):
    doc = _manifests()[kind]
    spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
    secret = spec["authOptions"]["secretName"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        requests = g["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert (
            int(limits["nvidia.com/gpu"]) >= 1
            and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        ), g["groupName"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]
    for template in templates:
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token, "never a literal token"
            assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_dashboard_is_not_published(kind):
    doc = _manifests()[kind]
    spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False) and "headService" not in head
    assert head["rayStartParams"].get("dashboard-host") in (None, "127.0.0.1", "localhost")
    for template in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        assert not template["spec"].get("hostNetwork", False)
        for c in template["spec"]["containers"]:
            assert not any("hostPort" in p for p in c.get("ports", []))


# -- every deploy file --------------------------------------------------------------------------
SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{30,}",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service-account key": r"\"private_key(_id)?\"\s*:",
    "Ray token value": r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?(?!\$)[A-Za-z0-9_\-]{8,}",
    "auth_token value": r"auth_token\s*[=:]\s*['\"]?[A-Fa-f0-9]{16,}",
    "long hex or base64 blob": r"\b[A-Fa-f0-9]{40,}\b|[A-Za-z0-9+/]{60,}={0,2}",
}


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.iterdir() if p.is_file()))
def test_deploy_files_hold_no_secret_and_no_public_bind(name):
    text = (DEPLOY / name).read_text()
    for what, pattern in SECRET_PATTERNS.items():
        match = re.search(pattern, text)
        assert match is None, f"{name}: looks like a {what}: {match.group(0)[:20]}…"
    if name.endswith(".yaml"):
        assert "0.0.0.0" not in text, f"{name}: binds or exposes 0.0.0.0"
        assert not re.search(r"(?i)type:\s*(LoadBalancer|NodePort)", text), name
