"""deploy/ launcher configs against the clouds' rules and the runbook: the head's documented IAM
policy allows every call the autoscaler makes (the AMI's `resolve:ssm:` parameter included),
IMDSv2 and a named security group on every AWS node, GCP GPU node types with a disk type (and NIC
type) their machine series takes, no external address on GCP workers, no remote installer piped
into a shell, no SSH open to every address. Fast, offline: YAML, the runbook's text and Ray's
own launcher code."""

from __future__ import annotations

import ast
import copy
import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
README = DEPLOY / "README.md"
HEAD_POLICY_FILE = "/tmp/ntk-scale-head-policy.json"

# Boot disk types each machine series accepts, and whether it needs gVNIC ("Supported disk
# types" and network sections of https://cloud.google.com/compute/docs/accelerator-optimized-machines
# and https://cloud.google.com/compute/docs/general-purpose-machines; gVNIC:
# https://cloud.google.com/compute/docs/networking/using-gvnic). pd-standard, the default when
# no diskType is given, is absent for G2 and A3.
GCP_SERIES = {
    "n2": ({"pd-standard", "pd-balanced", "pd-ssd", "pd-extreme"}, False),
    "g2": ({"pd-balanced", "pd-ssd", "hyperdisk-ml", "hyperdisk-throughput"}, False),
    "a2": ({"pd-standard", "pd-balanced", "pd-ssd"}, False),
    "a3": ({"pd-balanced", "pd-ssd", "hyperdisk-balanced", "hyperdisk-ml"}, True),
}
# Calls Ray's AWS node provider makes from the head (ray/autoscaler/_private/aws/node_provider.py:
# create_instances with tags and an instance profile, create_tags, terminate/stop/start,
# instances.filter, describe_instance_types for the node types' resources).
AUTOSCALER_EC2_ACTIONS = (
    "ec2:RunInstances",
    "ec2:CreateTags",
    "ec2:TerminateInstances",
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceTypes",
)
PIPE_TO_SHELL = re.compile(
    r"(curl|wget)\b[^\n|]*\|\s*(sudo\s+)?(ba|z|da)?sh\b"
    r"|(ba)?sh\s+(-c\s+)?[\"']?\$\(\s*(curl|wget)"
    r"|(ba)?sh\s+<\(\s*(curl|wget)"
)
WORLD = re.compile(r"0\.0\.0\.0/0|::/0")


def _launcher(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def _heredoc(text: str, path: str) -> str:
    """The body of `cat > PATH <<EOF ... EOF` in the runbook."""
    match = re.search(rf"cat > {re.escape(path)} <<'?EOF'?\n(.*?)\n\s*EOF\n", text, re.S)
    assert match, f"the runbook has no heredoc writing {path}"
    return match.group(1)


def _expand(body: str, **values: str) -> str:
    """Shell variables in a heredoc, filled in the way the shell would."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], body)


def _head_policy() -> dict:
    body = _heredoc(README.read_text(), HEAD_POLICY_FILE)
    return json.loads(_expand(body, ACCOUNT="123456789012", BUCKET="some-bucket"))


def _allows(policy: dict, action: str, resource: str) -> bool:
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if st["Effect"] != "Allow":
            continue
        if any(fnmatch.fnmatch(action.lower(), a.lower()) for a in actions) and any(
            fnmatch.fnmatchcase(resource, r) for r in resources
        ):
            return True
    return False


def _deny_free(policy: dict) -> None:
    assert all(st["Effect"] == "Allow" for st in policy["Statement"])


# -- AWS ----------------------------------------------------------------------------------------
def test_every_resolve_ssm_is_allowed_by_the_documented_head_policy():
    """EC2 resolves `resolve:ssm:` with the launcher's rights, and the head launches the workers
    (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/using-systems-manager-parameter-to-find-AMI.html)."""
    config = _launcher("aws-gpu.yaml")
    region = config["provider"]["region"]
    policy = _head_policy()
    _deny_free(policy)
    names = {
        t["node_config"]["ImageId"][len("resolve:ssm:") :]
        for t in config["available_node_types"].values()
        if t["node_config"]["ImageId"].startswith("resolve:ssm:")
    }
    assert names, "the config resolves its AMI from SSM (else drop this test)"
    for name in names:
        name = re.sub(r":\d+$", "", name)  # a :version suffix is not part of the ARN
        arn = f"arn:aws:ssm:{region}::parameter{name}"
        assert _allows(policy, "ssm:GetParameters", arn), f"head policy lacks GetParameters {arn}"
    blocks = "\n".join(_code_blocks(README.read_text()))
    assert "AmazonEC2FullAccess" not in blocks, (
        "the head's policy is the one above, nothing broader"
    )


def test_head_policy_covers_the_autoscaler_and_passes_only_the_worker_role():
    config = _launcher("aws-gpu.yaml")
    policy = _head_policy()
    for action in AUTOSCALER_EC2_ACTIONS:
        assert _allows(policy, action, "arn:aws:ec2:us-east-1:123456789012:instance/i-0"), action
    worker_profiles = {
        t["node_config"]["IamInstanceProfile"]["Name"]
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    for role in worker_profiles:  # the runbook names each profile after its role
        assert _allows(policy, "iam:PassRole", f"arn:aws:iam::123456789012:role/{role}"), role
    assert not _allows(policy, "iam:PassRole", "arn:aws:iam::123456789012:role/ntk-scale-head")
    assert not _allows(policy, "iam:PassRole", "arn:aws:iam::123456789012:role/Admin")


def test_every_aws_node_requires_imdsv2_and_names_a_security_group():
    from ray.autoscaler._private.aws.config import _configure_security_group

    config = _launcher("aws-gpu.yaml")
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert node["MetadataOptions"]["HttpTokens"] == "required", name
        assert node["MetadataOptions"].get("HttpEndpoint", "enabled") == "enabled", name
        assert node["MetadataOptions"].get("HttpPutResponseHopLimit", 1) == 1, name
        assert node["SecurityGroupIds"], name
    # Ray's own launcher step: with every node type naming its group it creates none (and so no
    # group whose SSH rule admits 0.0.0.0/0); it returns before any AWS call.
    before = copy.deepcopy(config)
    assert _configure_security_group(copy.deepcopy(config)) == before


def test_the_documented_security_group_admits_ssh_from_one_address():
    text = README.read_text()
    rules = re.findall(r"aws ec2 authorize-security-group-ingress[^\n]*", text)
    assert rules, "the runbook makes the security group"
    ssh = [r for r in rules if "--port 22" in r]
    assert ssh and all("--cidr $MYIP" in r for r in ssh), ssh
    assert all("--port 22" in r or "--source-group $SG" in r for r in rules), rules
    assert re.search(r"export MYIP=\$\(.*\)/32", text)
    assert 'sed -i "s/sg-YOUR_SECURITY_GROUP_ID/$SG/" deploy/aws-gpu.yaml' in text


# -- GCP ----------------------------------------------------------------------------------------
def _gcp_types():
    config = _launcher("gcp-gpu.yaml")
    return config, config["available_node_types"]


@pytest.mark.parametrize("name", sorted(_gcp_types()[1]))
def test_gcp_node_types_state_a_disk_type_and_nic_type_their_series_takes(name):
    config, types = _gcp_types()
    node = types[name]["node_config"]
    series = node["machineType"].split("-")[0]
    disk_types, needs_gvnic = GCP_SERIES[series]
    boot = [d for d in node["disks"] if d.get("boot")]
    assert len(boot) == 1
    disk_type = boot[0]["initializeParams"].get("diskType")
    assert disk_type, f"{name}: no diskType, so pd-standard"
    zone, kind = re.fullmatch(r"zones/([\w-]+)/diskTypes/([\w-]+)", disk_type).groups()
    assert zone == config["provider"]["availability_zone"], f"{name}: disk type in {zone}"
    assert kind in disk_types, f"{name}: {node['machineType']} does not take {kind}"
    nics = node["networkInterfaces"]
    if needs_gvnic:
        assert all(n.get("nicType") == "GVNIC" for n in nics), f"{name}: A3 needs gVNIC"


def test_gcp_nodes_use_their_own_network_and_workers_have_no_external_address():
    config, types = _gcp_types()
    head = config["head_node_type"]
    for name, t in types.items():
        node = t["node_config"]
        nics = node["networkInterfaces"]  # present on all: Ray then adds no default interface
        assert all("/subnetworks/ntk-scale" in n["subnetwork"] for n in nics), name
        assert "ntk-scale" in node["tags"]["items"], name
        if name != head:
            assert not any(n.get("accessConfigs") for n in nics), f"{name}: external address"
            assert node["serviceAccounts"][0]["email"].startswith("ntk-scale-worker@")
    assert types[head]["node_config"]["serviceAccounts"][0]["email"].startswith("ntk-scale-head@")
    assert "ntk-scale-head" in types[head]["node_config"]["tags"]["items"]
    text = README.read_text()
    assert "--target-tags=ntk-scale-head" in text and "--source-ranges=$MYIP" in text
    assert "--source-tags=ntk-scale --target-tags=ntk-scale" in text


def test_runbook_strips_the_roles_ray_up_grants_its_own_service_account():
    """`ray up` binds DEFAULT_SERVICE_ACCOUNT_ROLES to ray-autoscaler-sa-v1 on the whole project
    (ray/autoscaler/_private/gcp/config.py); read from Ray's source, which imports Google's
    client libraries at the top and so is parsed here rather than imported."""
    import ray.autoscaler._private.gcp as gcp

    tree = ast.parse((Path(gcp.__file__).parent / "config.py").read_text())
    roles = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign)
        and any(getattr(t, "id", None) == "DEFAULT_SERVICE_ACCOUNT_ROLES" for t in n.targets)
    )
    text = README.read_text()
    loop = re.search(r"for role in ([^;]+); do\n\s+gcloud projects remove-iam-policy-binding", text)
    assert loop and set(loop.group(1).split()) >= set(roles), roles
    assert "gcloud iam service-accounts disable ray-autoscaler-sa-v1@" in text


# -- every deploy file --------------------------------------------------------------------------
def _shell_texts() -> dict[str, str]:
    texts = {  # YAML comments may name what is not done
        p.name: "\n".join(
            ln for ln in p.read_text().splitlines() if not ln.lstrip().startswith("#")
        )
        for p in DEPLOY.glob("*.yaml")
    }
    texts.update({f"README block {i}": b for i, b in enumerate(_code_blocks(README.read_text()))})
    return texts


def test_no_remote_installer_is_piped_into_a_shell():
    for where, text in _shell_texts().items():
        joined = re.sub(r"\\\n\s*", " ", text)
        match = PIPE_TO_SHELL.search(joined)
        assert match is None, f"{where}: {match.group(0)}"
    for cloud in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        setup = " ".join(_launcher(cloud)["setup_commands"])
        installs = re.findall(r"pip install[^;&|]*\buv\b[^;&|]*", setup)
        assert installs and all(re.search(r'"uv==\d+\.\d+\.\d+"', i) for i in installs), cloud


def test_no_rule_admits_every_address():
    for where, text in _shell_texts().items():
        assert not WORLD.search(text), f"{where} admits every address"


def test_pipe_to_shell_pattern_catches_the_usual_forms():
    for bad in (
        "curl -LsSf https://astral.sh/uv/install.sh | sh",
        "wget -qO- https://x/i.sh | sudo bash",
        'sh -c "$(curl -fsSL https://x/i.sh)"',
        "bash <(curl -s https://x/i.sh)",
    ):
        assert PIPE_TO_SHELL.search(bad), bad
    assert not PIPE_TO_SHELL.search("export MYIP=$(curl -fsS https://checkip.amazonaws.com)/32")
