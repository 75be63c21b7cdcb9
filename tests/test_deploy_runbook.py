"""deploy/README.md, the runbook, read as the commands it gives: token rotation that rotates, no
bucket literally named BUCKET, the GPU request released as soon as the Gram job ends, EKS / GKE
identity steps that bind what the manifests use, and a teardown that removes what the runbook
makes. Fast, offline: text and Ray's own source."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
README = DEPLOY / "README.md"

#: (what the runbook creates, what its teardown must then run)
CREATED_AND_REMOVED = [
    (r"aws iam create-role --role-name \$role", r"aws iam delete-role --role-name \$role"),
    (r"aws iam create-role --role-name ntk-scale-pods",
     r"aws iam delete-role --role-name ntk-scale-pods"),
    (r"aws iam create-instance-profile", r"aws iam delete-instance-profile"),
    (r"aws iam put-role-policy --role-name \$role --policy-name bucket",
     r"aws iam delete-role-policy --role-name \$role --policy-name bucket"),
    (r"--role-name ntk-scale-head --policy-name autoscaler",
     r"delete-role-policy --role-name ntk-scale-head --policy-name autoscaler"),
    (r"aws ec2 create-security-group", r"aws ec2 delete-security-group"),
    (r"aws ec2 create-vpc-endpoint --vpc-id \$VPC --vpc-endpoint-type Gateway",
     r"aws ec2 delete-vpc-endpoints --vpc-endpoint-ids \$S3EP"),
    (r"ray up deploy/aws-gpu.yaml", r"aws ec2 delete-key-pair --key-name ray-autoscaler_us-east-1"),
    (r"ray up deploy/aws-gpu.yaml", r"rm -f ~/.ssh/ray-autoscaler_us-east-1.pem"),
    (r"eksctl utils associate-iam-oidc-provider", r"aws iam delete-open-id-connect-provider"),
    (r"gcloud iam service-accounts create", r"gcloud iam service-accounts delete"),
    (r"gcloud iam roles create ntkScaleAutoscaler", r"gcloud iam roles delete ntkScaleAutoscaler"),
    (r"gcloud projects add-iam-policy-binding", r"gcloud projects remove-iam-policy-binding"),
    (r"gcloud storage buckets add-iam-policy-binding",
     r"gcloud storage buckets remove-iam-policy-binding"),
    (r"roles/iam.workloadIdentityUser", r"service-accounts remove-iam-policy-binding"),
    (r"gcloud compute networks create", r"gcloud compute networks delete"),
    (r"gcloud compute networks subnets create", r"gcloud compute networks subnets delete"),
    (r"gcloud compute firewall-rules create", r"gcloud compute firewall-rules delete"),
    (r"gcloud compute routers create", r"gcloud compute routers delete"),
    (r"gcloud compute routers nats create", r"gcloud compute routers nats delete"),
    (r"kubectl create secret generic ntk-scale-ray-token",
     r"kubectl delete secret ntk-scale-ray-token"),
    (r"kubectl create serviceaccount", r"kubectl delete serviceaccount"),
    (r"helm\s+install\s+kuberay-operator", r"helm uninstall kuberay-operator"),
    (r"kubectl apply -f deploy/kuberay-networkpolicy.yaml", r"kubectl delete networkpolicy"),
]  # fmt: skip


def _text() -> str:
    return re.sub(r"\\\n\s*", " ", README.read_text())  # shell line continuations joined


def _blocks() -> list[str]:
    return re.findall(r"^ *```[a-z]*\n(.*?)^ *```", _text(), flags=re.S | re.M)


def _teardown() -> str:
    text = _text()
    aws_gcp = text[text.index("## 13. Tear down") : text.index("## Kubernetes (KubeRay)")]
    return aws_gcp + text[text.index("**Tear down (Kubernetes):**") :]


def test_token_rotation_moves_the_old_token_away_before_generating():
    from ray.scripts import scripts

    # Ray keeps an existing token: `--generate` creates one only "if one does not exist".
    assert "if one does not exist" in inspect.getdoc(scripts.get_auth_token.callback)
    rotation = next(b for b in _blocks() if "mv ~/.ray/auth_token" in b)
    lines = rotation.splitlines()
    keys = ("ray down", "mv ~/.ray/auth_token", "ray get-auth-token --generate", "ray up")
    at = {key: next(i for i, ln in enumerate(lines) if key in ln) for key in keys}
    assert at["ray down"] < at["mv ~/.ray/auth_token"] < at["ray get-auth-token --generate"]
    assert at["ray get-auth-token --generate"] < at["ray up"], "every node restarts with it"
    kube = next(b for b in _blocks() if "--dry-run=client" in b and "ntk-scale-ray-token" in b)
    assert "kubectl delete raycluster" in kube, "pods read the token when they start"


def test_no_bucket_is_literally_named_bucket():
    for block in _blocks():
        for url in re.findall(r"\b(?:s3|gs)://[\w${][^\s\"'`]*", block):
            bucket = url.split("://", 1)[1].split("/", 1)[0]
            assert bucket.startswith(("$", "{")), f"a literal bucket name: {url}"


def test_the_gpu_request_is_released_as_soon_as_the_gram_job_ends():
    text = _text()
    gram = text.index("ntk-scale gram --x")
    release = text.index("request_resources(bundles=[])", gram)  # the stored route's release
    solve = text.index("ntk-scale solve --store")
    assert gram < release < solve, "released before the solve starts"
    block = next(b for b in _blocks() if "ntk-scale gram --x" in b)
    assert "request_resources(bundles=[])" in block, "in the same block as the Gram job"
    submit = block[: block.index("ntk-scale gram")]
    assert "--no-wait" not in submit, "the release must wait for the Gram job to end"


def _manifest_service_accounts() -> set[str]:
    names = set()
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            if doc["kind"] in ("RayCluster", "RayJob"):
                spec = doc["spec"].get("rayClusterSpec", doc["spec"])
                groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
                names |= {g["template"]["spec"]["serviceAccountName"] for g in groups}
    return names


def test_eks_irsa_trusts_exactly_the_service_accounts_the_manifests_use():
    text = _text()
    assert "eksctl utils associate-iam-oidc-provider" in text, "IRSA needs the OIDC provider"
    body = re.search(r"cat > /tmp/irsa-trust.json <<EOF\n(.*?)\n\s*EOF", text, re.S).group(1)
    values = {"ACCOUNT": "123456789012", "OIDC": "oidc.eks.us-east-1.amazonaws.com/id/X"}
    trust = json.loads(re.sub(r"\$(\w+)", lambda m: values[m.group(1)], body))
    (st,) = trust["Statement"]
    assert st["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert st["Principal"]["Federated"].endswith(":oidc-provider/" + values["OIDC"])
    cond = st["Condition"]["StringEquals"]
    assert cond[values["OIDC"] + ":aud"] == "sts.amazonaws.com"
    subs = {s.rsplit(":", 1)[1] for s in cond[values["OIDC"] + ":sub"]}
    assert subs == _manifest_service_accounts()
    annotate = re.search(
        r"kubectl annotate serviceaccount ([\w\s-]+?) eks\.amazonaws\.com/role-arn", text
    )
    assert set(annotate.group(1).split()) == _manifest_service_accounts()


def test_gke_workload_identity_binds_the_service_accounts_the_manifests_use():
    text = _text()
    assert "--workload-pool=$PROJECT.svc.id.goog" in text
    assert "--workload-metadata=GKE_METADATA" in text
    loop = re.search(
        r"for ksa in ([\w\s-]+?); do\s+gcloud iam service-accounts add-iam-policy-binding"
        r"[^\n]*--role=roles/iam.workloadIdentityUser",
        text,
    )
    assert loop and set(loop.group(1).split()) == _manifest_service_accounts()
    assert "serviceAccount:$PROJECT.svc.id.goog[default/$ksa]" in text
    annotate = re.search(
        r"kubectl annotate serviceaccount ([\w\s-]+?) iam\.gke\.io/gcp-service-account", text
    )
    assert set(annotate.group(1).split()) == _manifest_service_accounts()


def test_teardown_removes_what_the_runbook_creates():
    text, teardown = _text(), _teardown()
    for created, removed in CREATED_AND_REMOVED:
        assert re.search(created, text), f"runbook no longer runs {created!r}: update this list"
        assert re.search(removed, teardown), f"teardown lacks {removed!r} for {created!r}"
    made = set(re.findall(r"gcloud iam service-accounts create ([\w-]+)", text))
    loop = re.search(r"for sa in ([\w\s-]+?); do\s+gcloud iam service-accounts delete", teardown)
    assert made | {"ray-autoscaler-sa-v1"} <= set(loop.group(1).split())
