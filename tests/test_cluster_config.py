"""The deployment files (cluster.yaml, infra/) are valid and say what the jobs need.

Fast and offline: Ray's own schema for the autoscaler config, the resources the scrape tasks and
Tune trials ask for, token auth everywhere, no credentials, a least-privilege bucket policy and
KubeRay manifests that match cluster.yaml.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
INFRA = REPO / "infra"
BUCKET = "hashtag-data"
SOURCES_PREFIX = "sources/"
OUTPUT_PREFIX = "runs/"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    documents = {}
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


def worker_types(cluster: dict) -> dict[str, dict]:
    return {
        name: node
        for name, node in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    }


# --- cluster.yaml -------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_schema(cluster):
    from ray.autoscaler._private.util import validate_config

    validate_config(cluster)
    assert cluster["provider"]["type"] == "aws"


def test_head_runs_no_tasks(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in start
    # The dashboard stays on the head's loopback: reached through `ray dashboard` (SSH).
    assert "--dashboard-host=127.0.0.1" in start


def test_worker_types_carry_what_the_jobs_ask_for(cluster):
    workers = worker_types(cluster)
    cpu = [
        n
        for n in workers.values()
        if n["resources"].get("CPU", 0) >= 1 and "GPU" not in n["resources"]
    ]
    gpu = [n for n in workers.values() if n["resources"].get("GPU") == 1]
    assert cpu, "a CPU worker type for the embed_shard tasks (num_cpus=1)"
    assert gpu, "a GPU worker type with GPU: 1 for the Tune trials (--gpus-per-trial 1)"
    assert all(n["resources"].get("CPU", 0) >= 1 for n in gpu), "a trial asks for a CPU too"
    assert gpu[0]["node_config"]["InstanceType"].startswith("g5.")
    for name, node in workers.items():
        assert node["min_workers"] == 0, f"{name} must scale from zero"
        assert node["max_workers"] >= 1
    assert 0 < cluster["idle_timeout_minutes"] <= 30


def test_every_node_uses_an_instance_profile(cluster):
    for name, node in cluster["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile")
        assert profile and ("Arn" in profile or "Name" in profile), name


def test_token_auth_on_every_node(cluster):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = cluster[key]
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, key
        # The token is fetched before `ray start`, from SSM, not carried in the config.
        fetch = next(i for i, c in enumerate(commands) if "ray_token.py fetch" in c)
        assert fetch < commands.index(start)
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]


def test_no_ports_but_ssh_opened_by_the_config(cluster):
    group = cluster["provider"].get("security_group", {})
    for permission in group.get("IpPermissions", []):
        assert permission["FromPort"] == permission["ToPort"] == 22


def test_node_image_is_built_from_the_dockerfile(cluster):
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", dockerfile, re.M)
    assert "rayproject/ray:" in dockerfile
    assert re.search(r"pip install .*--no-deps \.", dockerfile), "the project itself is installed"
    images = [cluster["docker"]["image"]] + [
        n.get("docker", {}).get("worker_image", "")
        for n in cluster["available_node_types"].values()
    ]
    assert all("hashtag:" in image for image in images if image)
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)


# --- credentials ------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}", re.I),
    "inline secret key": re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "ray token value": re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[0-9a-f]{32,}", re.I),
}


def deployment_files() -> list[Path]:
    files = [CLUSTER_YAML, REPO / "docs" / "scaling.md"]
    files += [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [p for p in files if p.exists()]


def test_no_credentials_in_the_deployment_files():
    for path in deployment_files():
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            match = pattern.search(text)
            assert match is None, f"{what} in {path.relative_to(REPO)}: {match.group(0)[:12]}..."


def test_no_credentials_in_tracked_files():
    """The same scan over everything git tracks (AWS key ids and private keys only)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False
    ).stdout.split(b"\0")
    if not any(listed):
        pytest.skip("not a git checkout")
    for name in filter(None, listed):
        path = REPO / name.decode()
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", "ignore")
        for what in ("AWS access key id", "private key"):
            assert SECRET_PATTERNS[what].search(text) is None, f"{what} in {name.decode()}"


# --- IAM ----------------------------------------------------------------------------------------


def statements(policy_file: str) -> list[dict]:
    policy = json.loads((INFRA / "iam" / policy_file).read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def allowed(policy: list[dict], action: str, resource: str, prefix: str | None = None) -> bool:
    """A small evaluator of Allow statements (the policy has no Deny): enough to check scope."""
    for statement in policy:
        if statement["Effect"] != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action, a) for a in as_list(statement["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in as_list(statement["Resource"])):
            continue
        like = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if like is not None and (
            prefix is None or not any(fnmatch.fnmatchcase(prefix, p) for p in as_list(like))
        ):
            continue
        return True
    return False


def test_bucket_policy_is_least_privilege():
    policy = statements("bucket-policy.json")
    bucket = f"arn:aws:s3:::{BUCKET}"
    obj = f"{bucket}/{{}}"
    # What the job needs.
    assert allowed(policy, "s3:GetObject", obj.format(SOURCES_PREFIX + "posts/1.jpg"))
    assert allowed(policy, "s3:PutObject", obj.format(OUTPUT_PREFIX + "r1/shards/x.npy"))
    assert allowed(policy, "s3:GetObject", obj.format(OUTPUT_PREFIX + "r1/dataset/manifest.json"))
    assert allowed(policy, "s3:ListBucket", bucket, prefix=SOURCES_PREFIX + "posts/")
    assert allowed(policy, "s3:ListBucket", bucket, prefix=OUTPUT_PREFIX + "r1/")
    # And nothing more.
    for write in ("s3:PutObject", "s3:DeleteObject"):
        assert not allowed(policy, write, obj.format(SOURCES_PREFIX + "posts/1.jpg"))
        assert not allowed(policy, write, obj.format("elsewhere/x"))
    assert not allowed(policy, "s3:GetObject", obj.format("elsewhere/x"))
    assert not allowed(policy, "s3:ListBucket", bucket, prefix="elsewhere/")
    assert not allowed(policy, "s3:ListBucket", bucket, prefix=None)
    assert not allowed(policy, "s3:PutObject", f"arn:aws:s3:::other-bucket/{OUTPUT_PREFIX}x")
    for statement in policy:
        for action in as_list(statement["Action"]):
            assert "*" not in action, f"wildcard action {action}"
        for resource in as_list(statement["Resource"]):
            assert resource.startswith(bucket), resource
            if any(a in as_list(statement["Action"]) for a in ("s3:PutObject", "s3:DeleteObject")):
                assert resource == obj.format(OUTPUT_PREFIX + "*"), resource


def test_other_policies_are_scoped():
    token = statements("ray-token-read.json")
    assert allowed(
        token,
        "ssm:GetParameter",
        "arn:aws:ssm:us-east-1:123456789012:parameter/hashtag/ray-auth-token",
    )
    assert not allowed(
        token, "ssm:GetParameter", "arn:aws:ssm:us-east-1:123456789012:parameter/other"
    )
    head = statements("head-autoscaler.json")
    passrole = [s for s in head if "iam:PassRole" in as_list(s["Action"])]
    assert passrole and all(
        r.endswith("role/hashtag-ray-worker") for s in passrole for r in as_list(s["Resource"])
    )


# --- KubeRay ------------------------------------------------------------------------------------


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def test_kuberay_cluster_matches_cluster_yaml(cluster, kuberay):
    ray_cluster = kuberay["RayCluster"]["spec"]
    assert ray_cluster["enableInTreeAutoscaling"] is True
    assert ray_cluster["authOptions"]["mode"] == "token"
    head = ray_cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"

    groups = {g["groupName"]: g for g in ray_cluster["workerGroupSpecs"]}
    assert set(groups) == set(worker_types(cluster)), "same worker types as cluster.yaml"
    for name, group in groups.items():
        resources = worker_types(cluster)[name]["resources"]
        assert group["minReplicas"] == 0 and group["replicas"] == 0
        assert group["maxReplicas"] == worker_types(cluster)[name]["max_workers"]
        assert group["rayStartParams"]["num-cpus"] == str(resources["CPU"])
        assert group["rayStartParams"].get("num-gpus", "0") == str(resources.get("GPU", 0))
        if resources.get("GPU"):
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert limits["nvidia.com/gpu"] == resources["GPU"]

    pods = [head, *groups.values()]
    account = kuberay["ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )
    for pod in pods:
        spec = pod["template"]["spec"]
        assert spec["serviceAccountName"] == account["metadata"]["name"]
        for container in spec["containers"]:
            assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env_names(container)
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & env_names(container)
            token = next(e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN")
            assert "secretKeyRef" in token["valueFrom"], "the token comes from a Secret"


def test_kuberay_job_runs_the_pipeline_on_that_cluster(kuberay):
    job = kuberay["RayJob"]["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == kuberay["RayCluster"]["metadata"]["name"]
    assert "jobs/pipeline.py" in job["entrypoint"]
    submitter = job["submitterPodTemplate"]["spec"]["containers"][0]
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env_names(submitter)


def test_token_helper_writes_an_owner_only_file(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_token", INFRA / "ray_token.py")
    ray_token = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ray_token)
    path = ray_token.write_token("abc", tmp_path / ".ray" / "auth_token")
    assert path.read_text() == "abc"
    assert path.stat().st_mode & 0o077 == 0
