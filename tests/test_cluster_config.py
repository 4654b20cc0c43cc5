"""The deployment files (cluster.yaml, infra/) are valid, say what the jobs need, and stay closed.

Fast and offline, on the files themselves: Ray's own schema and bootstrap checks for the
autoscaler config, the resources the scrape tasks and Tune trials ask for, token auth
everywhere, no credentials; the hardening of issue 14: a head that may only launch, tag and
terminate this cluster's workers, a closed security group, IMDSv2 and encrypted disks, pinned
AMI and images, a constrained non-root image build, restricted KubeRay pods behind a
NetworkPolicy with the token as a Secret file, least-privilege S3/ECR/KMS/trust policies, one
`excludes` list, and infra/ray_token.py's refusal to overwrite a token.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
INFRA = REPO / "infra"
BUCKET = "hashtag-data"
SOURCES_PREFIX = "sources/"
OUTPUT_PREFIX = "runs/"
SPACE_TAG = "hashtag-runs"  # the role tag naming the run space a cluster's roles may write
SPACE = "hashtag"  # infra/README.md's example value, used by every example --out
RUN_SPACE = f"{OUTPUT_PREFIX}${{aws:PrincipalTag/{SPACE_TAG}}}/"
MODELS_PREFIX = "models/"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict[str, list[dict]]:
    """The batch cluster's KubeRay manifests' documents by kind (namespace, cluster, job); the
    serving cluster (rayservice.yaml) is tests/test_serve_config.py's."""
    documents: dict[str, list[dict]] = {}
    for name in ("namespace.yaml", "raycluster.yaml", "rayjob.yaml"):
        path = INFRA / "kuberay" / name
        for document in yaml.safe_load_all(path.read_text()):
            documents.setdefault(document["kind"], []).append(document)
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
    assert all("/hashtag@sha256:" in image for image in cluster_images(cluster))


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


def resolve(pattern: str, tags: dict[str, str]) -> str | None:
    """`${aws:PrincipalTag/k}` replaced by the role's tag; None when the role lacks it (IAM then
    does not match the resource: a role without the tag gets nothing from that statement)."""
    for name in re.findall(r"\$\{aws:PrincipalTag/([^}]+)\}", pattern):
        if name not in tags:
            return None
        pattern = pattern.replace(f"${{aws:PrincipalTag/{name}}}", tags[name])
    assert "${" not in pattern, f"unknown policy variable in {pattern}"
    return pattern


def allowed(
    policy: list[dict],
    action: str,
    resource: str,
    prefix: str | None = None,
    tags: dict[str, str] | None = None,
) -> bool:
    """A small evaluator of Allow statements (the policy has no Deny): enough to check scope.
    `tags` are the principal's (role's) tags, by default the run space of infra/README.md."""
    tags = {SPACE_TAG: SPACE} if tags is None else tags
    for statement in policy:
        if statement["Effect"] != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action, a) for a in as_list(statement["Action"])):
            continue
        patterns = [resolve(r, tags) for r in as_list(statement["Resource"])]
        if not any(p is not None and fnmatch.fnmatchcase(resource, p) for p in patterns):
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
    # What the job needs, including the README's example embedder under models/.
    assert allowed(policy, "s3:GetObject", obj.format(SOURCES_PREFIX + "posts/1.jpg"))
    assert allowed(policy, "s3:GetObject", obj.format(MODELS_PREFIX + "mobilenet_v2.tflite"))
    assert allowed(policy, "s3:ListBucket", bucket, prefix=MODELS_PREFIX)
    run = f"{OUTPUT_PREFIX}{SPACE}/r1/"
    assert allowed(policy, "s3:PutObject", obj.format(run + "shards/x.npy"))
    assert allowed(policy, "s3:GetObject", obj.format(run + "dataset/manifest.json"))
    # Writes only in the role's run space (its `hashtag-runs` tag); reads of every run.
    other = f"{OUTPUT_PREFIX}other-team/r1/"
    assert allowed(policy, "s3:GetObject", obj.format(other + "dataset/manifest.json"))
    assert not allowed(policy, "s3:PutObject", obj.format(other + "shards/x.npy"))
    assert not allowed(policy, "s3:PutObject", obj.format(OUTPUT_PREFIX + "r1/shards/x.npy"))
    assert not allowed(policy, "s3:PutObject", obj.format(run + "x.npy"), tags={})
    assert allowed(
        policy, "s3:PutObject", obj.format(other + "x.npy"), tags={SPACE_TAG: "other-team"}
    )
    assert allowed(policy, "s3:ListBucket", bucket, prefix=SOURCES_PREFIX + "posts/")
    assert allowed(policy, "s3:ListBucket", bucket, prefix=OUTPUT_PREFIX + "r1/")
    # And nothing more: tasks (this policy is on both roles) delete nothing, not even a run's.
    assert not allowed(policy, "s3:DeleteObject", obj.format(OUTPUT_PREFIX + "r1/x.npy"))
    for write in ("s3:PutObject", "s3:DeleteObject"):
        for prefix in (SOURCES_PREFIX, MODELS_PREFIX, "elsewhere/"):
            assert not allowed(policy, write, obj.format(prefix + "x"))
    assert not allowed(policy, "s3:GetObject", obj.format("elsewhere/x"))
    assert not allowed(policy, "s3:ListBucket", bucket, prefix="elsewhere/")
    assert not allowed(policy, "s3:ListBucket", bucket, prefix=None)
    assert not allowed(policy, "s3:PutObject", f"arn:aws:s3:::other-bucket/{OUTPUT_PREFIX}x")
    for statement in policy:
        for action in as_list(statement["Action"]):
            assert "*" not in action, f"wildcard action {action}"
        for resource in as_list(statement["Resource"]):
            assert resource.startswith(bucket), resource
            if "s3:PutObject" in as_list(statement["Action"]):
                assert resource == obj.format(RUN_SPACE + "*"), resource


def test_other_policies_are_scoped(cluster):
    token = statements("ray-token-read.json")
    prefix = f"arn:aws:ssm:{cluster['provider']['region']}:{account_of(cluster)}:parameter"
    assert allowed(token, "ssm:GetParameter", f"{prefix}/hashtag/ray-auth-token")
    assert not allowed(token, "ssm:GetParameter", f"{prefix}/other")
    head = statements("head-autoscaler.json")
    passrole = [s for s in head if "iam:PassRole" in as_list(s["Action"])]
    assert passrole and all(
        r.endswith("role/hashtag-ray-worker") for s in passrole for r in as_list(s["Resource"])
    )

    assert all(
        s.get("Condition", {}).get("StringEquals", {}).get("iam:PassedToService")
        == "ec2.amazonaws.com"
        for s in passrole
    ), "the worker role may be handed to EC2 only"


DENY_POLICIES = {"worker-deny-models.json"}  # nothing but Deny statements


def all_policies() -> dict[str, list[dict]]:
    return {
        p.name: statements(p.name)
        for p in sorted((INFRA / "iam").glob("*.json"))
        if p.name not in DENY_POLICIES
    }


def test_no_policy_grants_a_wildcard_or_destroys_history():
    """Only read-only lookups (and ECR's login) on "*"; nobody may delete object versions."""
    unscoped_ok = re.compile(r"^(ec2:Describe\w+|ecr:GetAuthorizationToken)$")
    forbidden = {
        "s3:DeleteObjectVersion",
        "s3:PutBucketVersioning",
        "s3:PutLifecycleConfiguration",
        "s3:PutBucketPolicy",
        "ec2:StartInstances",
        "ec2:StopInstances",
    }
    for name, policy in all_policies().items():
        for statement in policy:
            assert statement["Effect"] == "Allow", name
            actions = as_list(statement.get("Action", []))
            for action in actions:
                assert "*" not in action and action not in forbidden, f"{name}: {action}"
            if "*" in as_list(statement.get("Resource", [])):
                assert all(unscoped_ok.match(a) for a in actions), f"{name}: {actions} on *"


# --- the head: only this cluster's workers ------------------------------------------------------


def head_statements_for(action: str) -> list[dict]:
    return [s for s in statements("head-autoscaler.json") if action in as_list(s["Action"])]


def condition(statement: dict, operator: str, key: str):
    return statement.get("Condition", {}).get(operator, {}).get(key)


def node_configs(cluster: dict) -> dict[str, dict]:
    return {name: node["node_config"] for name, node in cluster["available_node_types"].items()}


def pinned(cluster: dict, key: str) -> set[str]:
    """The one value of `key` (ImageId) or list (SubnetIds, ...) shared by every node type."""
    values = {json.dumps(config[key], sort_keys=True) for config in node_configs(cluster).values()}
    assert len(values) == 1, f"every node type pins the same {key}: {values}"
    return set(as_list(json.loads(values.pop())))


def test_head_terminates_and_retags_only_this_clusters_workers(cluster):
    # The tag keys and values Ray's AWS node provider itself sets on the nodes it launches.
    from ray.autoscaler.tags import NODE_KIND_WORKER, TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND

    assert TAG_RAY_CLUSTER_NAME == "ray-cluster-name"
    name = cluster["cluster_name"]
    terminate = head_statements_for("ec2:TerminateInstances")
    assert terminate
    for statement in terminate:
        assert (
            condition(statement, "StringEquals", f"aws:ResourceTag/{TAG_RAY_CLUSTER_NAME}") == name
        )
        assert condition(statement, "StringEquals", f"aws:ResourceTag/{TAG_RAY_NODE_KIND}") == (
            NODE_KIND_WORKER
        )
        assert all(":instance/" in r for r in as_list(statement["Resource"]))
    for statement in head_statements_for("ec2:CreateTags"):
        own = condition(statement, "StringEquals", f"aws:ResourceTag/{TAG_RAY_CLUSTER_NAME}")
        at_launch = condition(statement, "StringEquals", "ec2:CreateAction") == "RunInstances"
        assert own == name or at_launch, statement["Sid"]
    assert cluster["provider"]["cache_stopped_nodes"] is False, "no Start/Stop in the policy"


def test_head_launches_only_tagged_pinned_workers(cluster):
    from ray.autoscaler._private.aws.config import key_pair
    from ray.autoscaler.tags import NODE_KIND_WORKER, TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND

    run = head_statements_for("ec2:RunInstances")
    by_type: dict[str, list[dict]] = {}
    for statement in run:
        assert len(as_list(statement["Action"])) == 1, "RunInstances has statements of its own"
        for resource in as_list(statement["Resource"]):
            by_type.setdefault(resource.split(":")[5].split("/")[0], []).append(statement)

    (instance,) = by_type.pop("instance")
    assert (
        condition(instance, "StringEquals", f"aws:RequestTag/{TAG_RAY_CLUSTER_NAME}")
        == (cluster["cluster_name"])
    )
    assert condition(instance, "StringEquals", f"aws:RequestTag/{TAG_RAY_NODE_KIND}") == (
        NODE_KIND_WORKER
    )
    worker_instance_types = {
        n["node_config"]["InstanceType"] for n in worker_types(cluster).values()
    }
    assert set(as_list(condition(instance, "StringEquals", "ec2:InstanceType"))) == (
        worker_instance_types
    )
    assert condition(instance, "StringEquals", "ec2:MetadataHttpTokens") == "required"
    assert (
        condition(instance, "NumericLessThanEquals", "ec2:MetadataHttpPutResponseHopLimit") == "1"
    )
    (volume,) = by_type.pop("volume")
    assert condition(volume, "Bool", "ec2:Encrypted") == "true"

    def ids(kind: str) -> set[str]:
        return {
            r.rsplit("/", 1)[1]
            for s in by_type[kind]
            for r in as_list(s["Resource"])
            if f":{kind}/" in r
        }

    region = cluster["provider"]["region"]
    assert ids("subnet") == pinned(cluster, "SubnetIds")
    assert ids("security-group") == pinned(cluster, "SecurityGroupIds")
    assert ids("image") == pinned(cluster, "ImageId")
    key_name = key_pair(0, region, cluster["provider"]["key_pair"]["key_name"])[0]
    assert any(fnmatch.fnmatchcase(key_name, pattern) for pattern in ids("key-pair"))
    # What is left may be "*" only for resources created by the launch itself.
    assert set(by_type) <= {
        "subnet",
        "security-group",
        "image",
        "key-pair",
        "network-interface",
        "spot-instances-request",
    }
    for statement in run:
        for resource in as_list(statement["Resource"]):
            assert f":{region}:" in resource, resource


# --- cluster.yaml: network, IMDS, disks, pins ---------------------------------------------------

DIGEST = re.compile(r"^[\w.-]+(:\d+)?(/[\w.-]+)+@sha256:[0-9a-f]{64}$")


def cluster_images(cluster: dict) -> list[str]:
    images = [cluster["docker"]["image"]]
    for node in cluster["available_node_types"].values():
        images += [v for k, v in node.get("docker", {}).items() if k.endswith("image")]
    return images


def test_every_node_is_closed_and_pinned(cluster):
    assert "security_group" not in cluster["provider"], "the group comes from infra/network.yaml"
    for name, config in node_configs(cluster).items():
        assert config["MetadataOptions"] == {
            "HttpEndpoint": "enabled",
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 1,
        }, name
        assert config["BlockDeviceMappings"], name
        for mapping in config["BlockDeviceMappings"]:
            assert mapping["Ebs"]["Encrypted"] is True, name
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", config["ImageId"]), name
        assert all(re.fullmatch(r"subnet-[0-9a-f]{8,17}", s) for s in config["SubnetIds"])
        assert all(re.fullmatch(r"sg-[0-9a-f]{8,17}", g) for g in config["SecurityGroupIds"])
    for image in cluster_images(cluster):
        assert DIGEST.match(image), f"not pinned by digest: {image}"
    assert cluster["docker"]["pull_before_run"] is False


def test_rays_bootstrap_creates_no_security_group_and_keeps_the_ami(cluster):
    """Ray's own AWS bootstrap steps leave the pinned group and image alone (no AWS call)."""
    from ray.autoscaler._private.aws import config as aws_config

    config = copy.deepcopy(cluster)
    assert aws_config._configure_security_group(config) == config
    aws_config._check_ami(config)
    for name, node_config in node_configs(config).items():
        assert node_config == node_configs(cluster)[name]


def test_security_group_opens_ssh_to_one_cidr_and_the_nodes_to_each_other():
    template = yaml.safe_load((INFRA / "network.yaml").read_text())
    resources = template["Resources"]
    groups = {k: r for k, r in resources.items() if r["Type"] == "AWS::EC2::SecurityGroup"}
    (group_name,) = groups
    (ssh,) = groups[group_name]["Properties"]["SecurityGroupIngress"]
    assert (ssh["IpProtocol"], ssh["FromPort"], ssh["ToPort"]) == ("tcp", 22, 22)
    assert ssh["CidrIp"] == {"Ref": "AdminCidr"}
    rules = [
        r["Properties"] for r in resources.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"
    ]
    assert rules == [
        {
            "GroupId": {"Ref": group_name},
            "SourceSecurityGroupId": {"Ref": group_name},
            "IpProtocol": "-1",
            "Description": rules[0]["Description"],
        }
    ], "node-to-node: every port, from the group itself only"
    text = json.dumps(resources)
    assert "0.0.0.0/0" not in text and "::/0" not in text, "no world-open ingress"
    cidr = template["Parameters"]["AdminCidr"]
    assert "Default" not in cidr, "the operator states the admin CIDR"
    for good in ("203.0.113.7/32", "10.0.0.0/16"):
        assert re.fullmatch(cidr["AllowedPattern"], good)
    for bad in ("0.0.0.0/0", "10.0.0.0/4", "10.0.0.1"):
        assert not re.fullmatch(cidr["AllowedPattern"], bad)


def test_repository_is_immutable_and_the_bucket_versioned():
    resources = yaml.safe_load((INFRA / "network.yaml").read_text())["Resources"]
    (repository,) = [r for r in resources.values() if r["Type"] == "AWS::ECR::Repository"]
    assert repository["Properties"]["ImageTagMutability"] == "IMMUTABLE"
    (bucket,) = [r for r in resources.values() if r["Type"] == "AWS::S3::Bucket"]
    assert bucket["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}
    assert bucket["DeletionPolicy"] == "Retain"
    assert all(bucket["Properties"]["PublicAccessBlockConfiguration"].values())
    # Only the driver (head role) may replace run outputs; versioning keeps what it replaces.
    (replace,) = statements("bucket-driver-replace.json")
    assert as_list(replace["Action"]) == ["s3:DeleteObject"]
    assert as_list(replace["Resource"]) == [f"arn:aws:s3:::{BUCKET}/{RUN_SPACE}*"]


def test_every_role_is_made_with_its_run_space_and_examples_write_there():
    """The policies give writes to `runs/<the role's hashtag-runs tag>/` only: a role made
    without the tag could write nothing, and an example `--out` outside the space would fail
    with AccessDenied on the cluster. So every `create-role` in infra/README.md tags the role,
    and every s3:// run output named in the docs and manifests is inside the example space."""
    readme = (INFRA / "README.md").read_text()
    commands = re.findall(r"aws iam create-role(?:[^\n]*\\\n)*[^\n]*", readme)
    assert len(commands) >= 3, commands
    for command in commands:
        assert f"--tags Key={SPACE_TAG},Value=$SPACE" in command, command
    assert re.search(rf"^SPACE={SPACE}\b", readme, re.M)
    files = [REPO / "README.md", CLUSTER_YAML, INFRA / "README.md", INFRA / "serve.yaml"]
    files += sorted((INFRA / "kuberay").glob("*.yaml")) + sorted((REPO / "docs").glob("*.md"))
    named = 0
    for path in files:
        for uri in re.findall(rf"s3://{BUCKET}/{OUTPUT_PREFIX}[^\s`'\"]*", path.read_text()):
            named += 1
            space = uri.removeprefix(f"s3://{BUCKET}/{OUTPUT_PREFIX}").split("/")[0]
            assert space in (SPACE, "$SPACE"), (path.name, uri)
    assert named >= 5


def account_of(cluster: dict) -> str:
    """The account id the files name (a placeholder until infra/README.md's `sed` sets it)."""
    arn = cluster["available_node_types"][cluster["head_node_type"]]["node_config"]
    return arn["IamInstanceProfile"]["Arn"].split(":")[4]


def test_ecr_kms_and_trust_policies_are_scoped(cluster, kuberay):
    region, account = cluster["provider"]["region"], account_of(cluster)
    repository = cluster["docker"]["image"].split("/", 1)[1].split("@")[0]
    ecr = statements("ecr-read.json")
    assert allowed(ecr, "ecr:GetAuthorizationToken", "*")
    for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
        assert allowed(ecr, action, f"arn:aws:ecr:{region}:{account}:repository/{repository}")
        assert not allowed(ecr, action, f"arn:aws:ecr:{region}:{account}:repository/other")

    (decrypt,) = [
        s for s in statements("ray-token-read.json") if "kms:Decrypt" in as_list(s["Action"])
    ]
    assert all(":key/" in r and ":alias/" not in r for r in as_list(decrypt["Resource"]))
    assert condition(decrypt, "StringEquals", "kms:ViaService") == f"ssm.{region}.amazonaws.com"

    (ec2_trust,) = statements("trust-ec2.json")
    assert ec2_trust["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert ec2_trust["Action"] == "sts:AssumeRole"
    subjects = {}
    for path in sorted((INFRA / "iam").glob("trust-irsa-*.json")):
        (trust,) = statements(path.name)
        assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
        assert "StringLike" not in trust["Condition"], "an exact subject, no wildcard"
        equals = trust["Condition"]["StringEquals"]
        (sub,) = [v for k, v in equals.items() if k.endswith(":sub")]
        (aud,) = [v for k, v in equals.items() if k.endswith(":aud")]
        assert aud == "sts.amazonaws.com"
        subjects[sub] = path.name
    accounts = {
        f"system:serviceaccount:{a['metadata']['namespace']}:{a['metadata']['name']}"
        for a in kuberay["ServiceAccount"]
    }
    assert set(subjects) == accounts, "one reviewable trust policy per IRSA service account"


# --- the image ----------------------------------------------------------------------------------


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parent folders) wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed_ = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            allowed_ = negate
    return allowed_


def test_dockerfile_installs_the_tested_versions_as_a_non_root_user():
    dockerfile = (INFRA / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    installs = [line for line in instructions if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert any(line.startswith("COPY") and "constraints.txt" in line for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert base.startswith("rayproject/ray:2.60.0-") and "@sha256:" in base


def test_dockerignore_is_an_allow_list():
    lines = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "everything is out unless listed"
    for pattern in patterns[1:]:
        if pattern.startswith("!"):
            assert (REPO / pattern[1:]).exists(), f"{pattern} names nothing in the repository"
    needed = [
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "hashtag/pipeline.py",
        "jobs/pipeline.py",
        "infra/ray_token.py",
    ]
    for path in needed:
        assert dockerignore_allows(patterns, path), path
    for path in [
        ".venv/bin/python",
        ".git/config",
        "runs/demo/x.npy",
        "tests/conftest.py",
        ".env",
        "auth_token",
        "hashtag/__pycache__/x.pyc",
        "infra/README.md",
    ]:
        assert not dockerignore_allows(patterns, path), path


# --- KubeRay ------------------------------------------------------------------------------------


def one(kuberay: dict, kind: str) -> dict:
    (document,) = kuberay[kind]
    return document


def pod_templates(kuberay: dict) -> dict[str, dict]:
    spec = one(kuberay, "RayCluster")["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    pods["submitter"] = one(kuberay, "RayJob")["spec"]["submitterPodTemplate"]
    return pods


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_kuberay_cluster_matches_cluster_yaml(cluster, kuberay):
    ray_cluster = one(kuberay, "RayCluster")["spec"]
    assert ray_cluster["enableInTreeAutoscaling"] is True
    assert ray_cluster["rayVersion"] == "2.60.0"
    head = ray_cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"

    groups = {g["groupName"]: g for g in ray_cluster["workerGroupSpecs"]}
    assert set(groups) == set(worker_types(cluster)), "same worker types as cluster.yaml"
    for name, group in groups.items():
        resources = worker_types(cluster)[name]["resources"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert group["minReplicas"] == 0 and group["replicas"] == 0
        assert group["maxReplicas"] == worker_types(cluster)[name]["max_workers"]
        # A pod gets what fits beside the node's daemons: at most the AWS node's CPUs.
        num_cpus = int(group["rayStartParams"]["num-cpus"])
        assert num_cpus == int(limits["cpu"]) and 1 <= num_cpus <= resources["CPU"]
        assert group["rayStartParams"].get("num-gpus", "0") == str(resources.get("GPU", 0))
        if resources.get("GPU"):
            assert limits["nvidia.com/gpu"] == resources["GPU"]


# Every KubeRay container's securityContext (restricted pod security).
RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def test_every_kuberay_container_runs_restricted(kuberay):
    required = RESTRICTED
    autoscaler = one(kuberay, "RayCluster")["spec"]["autoscalerOptions"]
    assert {k: autoscaler["securityContext"].get(k) for k in required} == required
    assert autoscaler["resources"]["requests"] == autoscaler["resources"]["limits"]
    for name, template in pod_templates(kuberay).items():
        spec = template["spec"]
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            security = container.get("securityContext", {})
            assert {k: security.get(k) for k in required} == required, (name, container["name"])
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], (name, "requests = limits")
            assert DIGEST.match(container["image"]), container["image"]
            # A read-only root needs a writable /tmp (Ray's session dir) and HOME there.
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], name
            assert env_of(container)["HOME"]["value"].startswith("/tmp/")


def test_the_token_is_a_mounted_secret_file_never_an_env_value(kuberay):
    ray_cluster = one(kuberay, "RayCluster")["spec"]
    assert ray_cluster["authOptions"]["mode"] == "token"
    secret = ray_cluster["authOptions"]["secretName"]
    for name, template in pod_templates(kuberay).items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            env = env_of(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            # Declared empty: KubeRay then injects no secretKeyRef value, Ray reads the file.
            assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "value": ""}, name
            path = Path(env["RAY_AUTH_TOKEN_PATH"]["value"])
            (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
            assert mount["readOnly"] is True
            assert volumes[mount["name"]]["secret"]["secretName"] == secret
            assert volumes[mount["name"]]["secret"]["defaultMode"] & 0o007 == 0, (
                "not world-readable"
            )
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
            assert all("secretKeyRef" not in e.get("valueFrom", {}) for e in env.values())
    for path in [*INFRA.rglob("*.yaml"), INFRA / "README.md", REPO / "README.md"]:
        assert "--from-literal" not in path.read_text(), f"a token on a command line: {path}"
    assert "--from-file=auth_token=" in (INFRA / "README.md").read_text()


def test_rays_loader_reads_the_token_file_the_manifests_point_at(kuberay, tmp_path):
    """The env of a KubeRay container, with the Secret file at a temp path: Ray's own loader."""
    (container,) = pod_templates(kuberay)["head"]["spec"]["containers"]
    token = "0123456789abcdef" * 4
    (tmp_path / "auth_token").write_text(token)
    env = {k: e["value"] for k, e in env_of(container).items()}
    env.update(RAY_AUTH_TOKEN_PATH=str(tmp_path / "auth_token"), HOME=str(tmp_path))
    code = (
        "from ray._raylet import AuthenticationTokenLoader as L;"
        "print(L.instance().get_token_for_http_header()['authorization'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == f"Bearer {token}", result.stderr[-2000:]


def test_network_policy_admits_only_this_cluster_and_the_job_port(kuberay):
    name = one(kuberay, "RayCluster")["metadata"]["name"]
    policy = one(kuberay, "NetworkPolicy")
    namespaces = {
        d["metadata"]["namespace"]
        for kind, docs in kuberay.items()
        if kind != "Namespace"
        for d in docs
    }
    assert namespaces == {policy["metadata"]["namespace"]}, "everything in one namespace"
    assert one(kuberay, "Namespace")["metadata"]["name"] == policy["metadata"]["namespace"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"ray.io/cluster": name}}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    own = {"podSelector": {"matchLabels": {"ray.io/cluster": name}}}
    submitter_labels = pod_templates(kuberay)["submitter"]["metadata"]["labels"]
    admits_submitter = False
    for rule in spec["ingress"]:
        assert rule.get("from"), "no rule admits every source"
        for source in rule["from"]:
            assert "ipBlock" not in source
        if rule["from"] == [own]:
            continue  # Ray's own ports, between this cluster's pods
        assert rule["ports"] == [{"protocol": "TCP", "port": 8265}], "others: the job port only"
        admits_submitter |= any(
            s.get("podSelector", {}).get("matchLabels", {}).items() <= submitter_labels.items()
            and "namespaceSelector" not in s
            for s in rule["from"]
        )
    assert admits_submitter
    assert any(rule["from"] == [own] for rule in spec["ingress"])


def test_workers_and_submitter_hold_no_kubernetes_token_and_the_head_role_is_separate(kuberay):
    pods = pod_templates(kuberay)
    for name in ("cpu-worker", "gpu-worker", "submitter"):
        assert pods[name]["spec"]["automountServiceAccountToken"] is False, name
    accounts = {a["metadata"]["name"]: a for a in kuberay["ServiceAccount"]}
    head_account = pods["head"]["spec"]["serviceAccountName"]
    worker_accounts = {pods[n]["spec"]["serviceAccountName"] for n in ("cpu-worker", "gpu-worker")}
    assert head_account in accounts and worker_accounts <= set(accounts)
    assert head_account not in worker_accounts, "the driver's delete right stays on the head"


def test_kuberay_job_runs_the_pipeline_and_may_retry(kuberay):
    job = one(kuberay, "RayJob")["spec"]
    assert (
        job["clusterSelector"]["ray.io/cluster"] == one(kuberay, "RayCluster")["metadata"]["name"]
    )
    assert "jobs/pipeline.py" in job["entrypoint"]
    # KubeRay 1.6/1.7 refuse spec.backoffLimit with clusterSelector: the submitter's own limit.
    assert "backoffLimit" not in job
    assert job["submitterConfig"]["backoffLimit"] >= 1, "a rerun resumes: retrying is safe"


def test_session_token_is_forwarded_wherever_access_keys_are():
    for path in deployment_files():
        text = path.read_text()
        if "AWS_ACCESS_KEY_ID" in text:
            assert "AWS_SESSION_TOKEN" in text, path


# --- one excludes list --------------------------------------------------------------------------


def test_one_excludes_list(cluster):
    from cluster_util import EXCLUDES
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    runtime_env = parse_runtime_env_args(
        runtime_env=str(INFRA / "runtime_env.yaml"), working_dir="."
    )
    assert runtime_env["working_dir"] == "."
    assert runtime_env["excludes"] == EXCLUDES == cluster["rsync_exclude"]
    assert {".venv", ".git", "runs"} <= set(EXCLUDES)
    for path in (REPO / "README.md", INFRA / "README.md", CLUSTER_YAML):
        text = path.read_text()
        assert '"excludes"' not in text, f"{path.name}: use --runtime-env infra/runtime_env.yaml"


# --- infra/ray_token.py -------------------------------------------------------------------------


def ray_token(home: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess:
    """infra/ray_token.py as a user runs it, with HOME and AWS pointed at a test home and moto."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    command = [sys.executable, str(INFRA / "ray_token.py"), *args, "--region", "us-east-1"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # five runs of the script, ~8 s
def test_token_helper_refuses_to_overwrite_without_rotate(s3_endpoint, tmp_path):
    import uuid

    import boto3

    parameter = f"/test/{uuid.uuid4().hex[:8]}/ray-auth-token"
    ssm = boto3.client("ssm", region_name="us-east-1", endpoint_url=s3_endpoint)
    laptop, node = tmp_path / "laptop", tmp_path / "node"
    laptop.mkdir()
    node.mkdir()
    token_file = laptop / ".ray" / "auth_token"

    first = ray_token(laptop, s3_endpoint, "put", "--parameter", parameter)
    assert first.returncode == 0, first.stderr
    token = token_file.read_text()
    assert len(token) == 64
    assert ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"] == token
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    again = ray_token(laptop, s3_endpoint, "put", "--parameter", parameter)
    assert again.returncode == 1 and "--rotate" in again.stderr
    assert token_file.read_text() == token
    token_file.unlink()  # the local copy gone, the live cluster's token in SSM still refuses
    again = ray_token(laptop, s3_endpoint, "put", "--parameter", parameter)
    assert again.returncode == 1 and "--rotate" in again.stderr and not token_file.exists()

    rotated = ray_token(laptop, s3_endpoint, "put", "--parameter", parameter, "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = token_file.read_text()
    assert new != token
    assert ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"] == new

    fetched = ray_token(node, s3_endpoint, "fetch", "--parameter", parameter)
    assert fetched.returncode == 0, fetched.stderr
    assert (node / ".ray" / "auth_token").read_text() == new
    assert stat.S_IMODE((node / ".ray").stat().st_mode) == 0o700
    assert stat.S_IMODE((node / ".ray" / "auth_token").stat().st_mode) == 0o600
    assert new not in fetched.stdout + fetched.stderr, "the token is never printed"


# --- issue 19: the cloud review, round 2 ------------------------------------------------------


def test_namespace_enforces_restricted_pod_security(kuberay):
    labels = one(kuberay, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    readme = (INFRA / "README.md").read_text()
    assert "kubectl apply -f infra/kuberay/namespace.yaml" in readme
    assert "kubectl create namespace" not in readme, "a namespace without the label"


def test_only_the_autoscaler_holds_a_kubernetes_token(kuberay):
    """KubeRay binds the head's service account to patch pods and RayClusters (for its
    autoscaler): the head's Ray container, where drivers run, must not hold that token."""
    ray_cluster = one(kuberay, "RayCluster")["spec"]
    head = pod_templates(kuberay)["head"]["spec"]
    assert head["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in head["volumes"]}
    token_volumes = {
        name
        for name, v in volumes.items()
        if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
    }
    assert token_volumes, "the autoscaler gets a projected token"
    (mount,) = ray_cluster["autoscalerOptions"]["volumeMounts"]
    assert mount["name"] in token_volumes and mount["readOnly"] is True
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    for name, template in pod_templates(kuberay).items():
        for container in template["spec"]["containers"]:
            mounted = {m["name"] for m in container["volumeMounts"]}
            assert not mounted & token_volumes, (name, container["name"])


def test_network_policy_lets_pods_out_only_to_dns_the_cluster_and_public_web(kuberay):
    import ipaddress

    name = one(kuberay, "RayCluster")["metadata"]["name"]
    egress = one(kuberay, "NetworkPolicy")["spec"]["egress"]

    def reachable(address: str, port: int) -> bool:
        ip = ipaddress.ip_address(address)
        for rule in egress:
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            for to in rule["to"]:
                block = to.get("ipBlock")
                if block and ip in ipaddress.ip_network(block["cidr"]):
                    if not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                        return True
        return False

    for rule in egress:
        assert rule.get("to"), "no rule lets a pod reach everything"
    assert not reachable("169.254.169.254", 80) and not reachable("169.254.169.254", 443)
    for private in ("10.0.0.1", "172.20.0.1", "192.168.1.1", "100.64.0.1"):  # API server ENIs
        assert not reachable(private, 443), private
    assert reachable("52.216.0.1", 443), "S3 (public prefixes behind the gateway endpoint)"
    assert not reachable("52.216.0.1", 22), "the web on 80/443 only"
    dns = [r for r in egress if {p["port"] for p in r.get("ports", [])} == {53}]
    assert dns and all("ipBlock" not in to for r in dns for to in r["to"])
    own = {"podSelector": {"matchLabels": {"ray.io/cluster": name}}}
    assert any(rule["to"] == [own] and "ports" not in rule for rule in egress)
    readme = (INFRA / "README.md").read_text()
    assert '"enableNetworkPolicy": "true"' in readme, "enforcement on the VPC CNI"
    assert "endpointPublicAccess=false" in readme


def test_the_image_has_no_sudo_and_containers_gain_no_privileges(cluster):
    dockerfile = (INFRA / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    removal = next(i for i, line in enumerate(instructions) if "sudoers" in line)
    assert "purge" in " ".join(instructions[removal : removal + 3])
    assert "! command -v sudo" in " ".join(instructions[removal : removal + 4])
    after = [line for line in instructions[removal:] if line.startswith("USER ")]
    assert after and after[0] == "USER ray" and instructions[-1] == "USER ray"
    assert "--security-opt no-new-privileges" in cluster["docker"]["run_options"]


def test_launches_are_bounded_and_retags_keep_to_rays_keys(cluster):
    from ray.autoscaler import tags

    (volume,) = [
        s
        for s in head_statements_for("ec2:RunInstances")
        if any(":volume/" in r for r in as_list(s["Resource"]))
    ]
    mappings = [m["Ebs"] for c in node_configs(cluster).values() for m in c["BlockDeviceMappings"]]
    workers = [
        m["Ebs"]
        for n in worker_types(cluster).values()
        for m in n["node_config"]["BlockDeviceMappings"]
    ]
    size = int(condition(volume, "NumericLessThanEquals", "ec2:VolumeSize"))
    assert max(m["VolumeSize"] for m in workers) <= size <= 200
    assert condition(volume, "StringEquals", "ec2:VolumeType") == "gp3"
    assert {m["VolumeType"] for m in mappings} == {"gp3"}
    ray_keys = {v for k, v in vars(tags).items() if k.startswith("TAG_RAY_")} | {"Name"}
    name = cluster["cluster_name"]
    for statement in head_statements_for("ec2:CreateTags"):
        keys = condition(statement, "ForAllValues:StringEquals", "aws:TagKeys")
        assert keys and set(keys) <= ray_keys, statement["Sid"]
        if condition(statement, "StringEquals", "ec2:CreateAction") != "RunInstances":
            # A retag may not move a worker to another cluster (nor make it a head).
            retag = statement["Condition"]["StringEqualsIfExists"]
            assert retag[f"aws:RequestTag/{tags.TAG_RAY_CLUSTER_NAME}"] == name
            assert retag[f"aws:RequestTag/{tags.TAG_RAY_NODE_KIND}"] == tags.NODE_KIND_WORKER
    for statement in head_statements_for("ec2:TerminateInstances"):
        assert as_list(statement["Action"]) == ["ec2:TerminateInstances"]


def test_models_are_kept_and_never_written_by_tasks():
    deny = statements("worker-deny-models.json")
    assert all(s["Effect"] == "Deny" for s in deny)
    bucket = f"arn:aws:s3:::{BUCKET}"
    for key in ("runs/r1/tune/model/manifest.json", "models/r1/knn.npy"):
        for action in ("s3:PutObject", "s3:DeleteObject"):
            assert allowed([{**s, "Effect": "Allow"} for s in deny], action, f"{bucket}/{key}")
    assert not allowed(
        [{**s, "Effect": "Allow"} for s in deny], "s3:PutObject", f"{bucket}/runs/r1/shards/x"
    )
    resources = yaml.safe_load((INFRA / "network.yaml").read_text())["Resources"]
    (bucket_resource,) = [r for r in resources.values() if r["Type"] == "AWS::S3::Bucket"]
    properties = bucket_resource["Properties"]
    assert properties["ObjectLockEnabled"] is True
    retention = properties["ObjectLockConfiguration"]["Rule"]["DefaultRetention"]
    assert retention["Mode"] in ("GOVERNANCE", "COMPLIANCE") and retention["Days"] >= 30
    rules = {r.get("Prefix"): r for r in properties["LifecycleConfiguration"]["Rules"]}
    models = rules["models/"]["NoncurrentVersionExpiration"]["NoncurrentDays"]
    assert models >= 365 > rules["runs/"]["NoncurrentVersionExpiration"]["NoncurrentDays"]
    readme = (INFRA / "README.md").read_text()
    assert "--policy-document file://infra/iam/worker-deny-models.json" in readme


def test_an_existing_bucket_gets_the_tls_and_encryption_policy_too():
    resources = yaml.safe_load((INFRA / "network.yaml").read_text())["Resources"]
    (policy,) = [r for r in resources.values() if r["Type"] == "AWS::S3::BucketPolicy"]
    assert "Condition" not in policy, "also with CreateBucket=false"
    assert policy["Properties"]["Bucket"] == {"Ref": "BucketName"}
    sids = {s["Sid"]: s for s in policy["Properties"]["PolicyDocument"]["Statement"]}
    assert sids["TlsOnly"]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    encrypted = sids["EncryptedWritesOnly"]
    assert encrypted["Effect"] == "Deny" and encrypted["Action"] == "s3:PutObject"


def test_the_two_dockerignore_files_are_the_same_allow_list():
    def patterns(path: Path) -> list[str]:
        lines = path.read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    assert patterns(REPO / ".dockerignore") == patterns(INFRA / "Dockerfile.dockerignore")


def test_the_set_up_commands_work_as_written(cluster):
    readme = (INFRA / "README.md").read_text()
    assert "ACCOUNT=$(aws sts get-caller-identity --query Account --output text)" in readme
    assert 'sed -i "s/123456789012/$ACCOUNT/g"' in readme
    assert "ACCOUNT=123456789012" not in readme
    # A laptop reaches the nodes on public IPs: said in the config, made so by the commands.
    assert cluster["provider"]["use_internal_ips"] is False
    assert "--map-public-ip-on-launch" in readme
    # No token file in the working folder that `ray job submit --working-dir .` uploads.
    for path in (INFRA / "README.md", REPO / "README.md", *(INFRA / "kuberay").glob("*.yaml")):
        assert "token.txt" not in path.read_text(), path
    # Every repository file cluster.yaml's header names exists.
    header = "\n".join(
        line for line in CLUSTER_YAML.read_text().splitlines() if line.startswith("#")
    )
    for named in re.findall(r"\b((?:jobs|infra|hashtag)/[\w./-]+\.\w+)", header):
        assert (REPO / named).exists(), f"cluster.yaml names {named}, which does not exist"


def load_ray_token_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_token", INFRA / "ray_token.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_writer_is_safe_on_existing_folders_links_and_files(tmp_path):
    ray_token = load_ray_token_module()
    token = "f" * 64
    # An existing folder open to others: made 0700 before the token is in it.
    folder = tmp_path / "home" / ".ray"
    folder.mkdir(parents=True, mode=0o755)
    os.chmod(folder, 0o755)
    existing = folder / "auth_token"
    existing.write_text("old")
    os.chmod(existing, 0o644)
    ray_token.write_token(token, existing)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600 and existing.read_text() == token
    assert sorted(p.name for p in folder.iterdir()) == ["auth_token"], "no temporary left"
    # The token path is a link to another file: the link is replaced, its target untouched.
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = folder / "linked_token"
    link.symlink_to(victim)
    ray_token.write_token(token, link)
    assert victim.read_text() == "precious" and not link.is_symlink()
    assert link.read_text() == token and stat.S_IMODE(link.stat().st_mode) == 0o600
    # The folder is a link (to a place others can read): refused, nothing written.
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    (tmp_path / "home2").mkdir()
    (tmp_path / "home2" / ".ray").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ray_token.TokenExists, match="not a folder"):
        ray_token.write_token(token, tmp_path / "home2" / ".ray" / "auth_token")
    assert list(elsewhere.iterdir()) == []
