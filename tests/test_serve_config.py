"""The serving deployment files parse, agree, and name an importable app (fast, offline):
infra/serve.yaml (for `serve deploy`) passes Serve's own schema and its import path builds the
application; infra/kuberay/rayservice.yaml carries the same Serve config, autoscaled replicas
with resources, token auth and restricted pods as the batch cluster, and a NetworkPolicy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_cluster_config import DIGEST, RESTRICTED, env_of

REPO = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "infra" / "serve.yaml"
RAYSERVICE_YAML = REPO / "infra" / "kuberay" / "rayservice.yaml"


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(RAYSERVICE_YAML.read_text())}


def test_serve_yaml_passes_serves_schema_and_names_an_importable_app(serve_config, tmp_path):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    (application,) = schema.applications
    assert application.import_path == "hashtag.serve:app"
    builder = import_attr(application.import_path)
    args = dict(application.args)
    assert args["token_file"], "a cluster faces the network: the token file is required"
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    assert isinstance(app, Application)
    # The deployment the config tunes is the one the app builds.
    (deployment,) = application.deployments
    assert deployment.name == app._bound_deployment.name == "Hashtags"
    settings = app._bound_deployment.init_args[0]
    assert settings["model"] == args["model"] and settings["token_file"] == args["token_file"]


def test_serve_yaml_autoscales_with_resources_and_rolls_updates(serve_config):
    (application,) = serve_config["applications"]
    (deployment,) = application["deployments"]
    scaling = deployment["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert scaling["target_ongoing_requests"] > 0
    # Batches of batch_size can fill only if a replica takes that many requests at once.
    assert deployment["max_ongoing_requests"] >= application["args"]["batch_size"]
    assert deployment["max_ongoing_requests"] >= scaling["target_ongoing_requests"]
    assert deployment["max_queued_requests"] > 0, "a bounded queue: 503 beyond it"
    resources = deployment["ray_actor_options"]
    assert resources["num_cpus"] >= 1 and resources["memory"] > 0
    assert deployment["max_surge_percent"] > 0, "replacements start before old replicas stop"
    assert 0 < deployment["rolling_update_percentage"] < 1
    http = serve_config["http_options"]
    assert http["request_timeout_s"] > application["args"]["request_timeout_s"]


def test_rayservice_carries_the_same_serve_config(serve_config, rayservice):
    spec = rayservice["RayService"]["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == serve_config


def pods(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["RayService"]["spec"]["rayClusterConfig"]
    found = {"head": cluster["headGroupSpec"]["template"]}
    found.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return found


def test_rayservice_cluster_fits_the_replicas(serve_config, rayservice):
    cluster = rayservice["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (deployment,) = serve_config["applications"][0]["deployments"]
    replica = deployment["ray_actor_options"]
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(group["rayStartParams"]["num-cpus"]) == int(limits["cpu"]) >= replica["num_cpus"]
    assert int(limits["memory"].removesuffix("Gi")) * 2**30 >= replica["memory"]
    assert group["minReplicas"] >= 1, "one replica always up"
    assert group["maxReplicas"] >= deployment["autoscaling_config"]["max_replicas"] // (
        int(limits["cpu"]) // replica["num_cpus"]
    )


def test_rayservice_pods_are_restricted_with_both_tokens_as_files(serve_config, rayservice):
    cluster = rayservice["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    token_file = Path(serve_config["applications"][0]["args"]["token_file"])
    required = RESTRICTED
    for name, template in pods(rayservice).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "hashtag-serve"
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            assert {k: container["securityContext"].get(k) for k in required} == required
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], name
            assert DIGEST.match(container["image"]), container["image"]
            env = env_of(container)
            assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "value": ""}
            mounts = {Path(m["mountPath"]): m for m in container["volumeMounts"]}
            mount = mounts[token_file.parent]
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]
            assert secret["secretName"] == "hashtag-serve-token"
            assert secret["defaultMode"] & 0o007 == 0, "not world-readable (serve refuses it)"
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
        if name != "head":
            assert spec["automountServiceAccountToken"] is False, name


def test_rayservice_network_policy(rayservice):
    spec = rayservice["NetworkPolicy"]["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "hashtag-serve"}}
    open_ports = [rule.get("ports") for rule in spec["ingress"]]
    # Ray's own ports only between this cluster's pods; from outside the HTTP port alone
    # (token-checked) and the dashboard for the operator.
    assert [{"protocol": "TCP", "port": 8000}] in open_ports
    for rule in spec["ingress"]:
        if "ports" not in rule:
            assert rule["from"] == [{"podSelector": spec["podSelector"]}]
        elif any("ipBlock" in source for source in rule["from"]):
            assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]


# --- the request parsers and settings (no server) -------------------------------------------


def test_config_refuses_an_open_host_without_a_token():
    from hashtag.fetch import FetchConfig
    from hashtag.serve import ServeConfig, app

    with pytest.raises(ValueError, match="token-file"):
        ServeConfig(model="m", host="0.0.0.0")
    assert ServeConfig(model="m").token_required is False
    assert ServeConfig(model="m", host="::1").token_required is False
    assert ServeConfig(model="m", token_file="t").token_required is True
    with pytest.raises(ValueError, match="token_file"):
        app({"model": "s3://bucket/model"})
    with pytest.raises(ValueError, match="unknown"):
        app({"model": "m", "token_file": "t", "modle": "x"})
    with pytest.raises(ValueError, match="fetch-deadline"):
        ServeConfig(model="m", fetch=FetchConfig(fetch_deadline_s=20), request_timeout_s=10)


def test_token_file_is_read_like_rays_and_refused_when_world_readable(tmp_path):
    from hashtag.errors import UserError
    from hashtag.serve import read_token

    path = tmp_path / "token"
    path.write_text("  s3cret\n")
    path.chmod(0o600)
    assert read_token(str(path)) == b"s3cret"
    path.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        read_token(str(path))
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(UserError, match="one token"):
        read_token(str(path))


def test_multipart_parser_is_bounded():
    import time

    from hashtag.serve import ClientError, parse_multipart

    body = (
        b'--XX\r\nContent-Disposition: form-data; filename="a.jpg"; name="image"\r\n'
        b"Content-Type: image/jpeg\r\n\r\nDATA\r\n--XX\r\n"
        b'Content-Disposition: form-data; name="tags"\r\n\r\npizza,food\r\n--XX--\r\n'
    )
    fields = parse_multipart(body, 'multipart/form-data; boundary="XX"')
    assert fields == {"image": b"DATA", "tags": b"pizza,food"}
    many = b"".join(
        b'--XX\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i
        for i in range(100_000)
    )
    started = time.monotonic()
    for bad, kind in [(many, "multipart/form-data; boundary=XX"), (b"junk", "multipart/form-data")]:
        with pytest.raises(ClientError) as refused:
            parse_multipart(bad, kind)
        assert refused.value.status == 400
    assert time.monotonic() - started < 5  # linear: milliseconds here


def test_posts_are_validated_at_the_boundary():
    from hashtag.serve import ClientError, parse_post

    post = parse_post({"image": "https://example.org/a.jpg", "tags": "#Pizza, food", "k": 3}, 5)
    assert (post.image_url, post.tags, post.k) == (
        "https://example.org/a.jpg",
        ("pizza", "food"),
        3,
    )
    assert parse_post({"image_base64": "QUJD"}, 5).image_bytes == b"ABC"
    for bad in [
        {"image": "/etc/passwd"},
        {"image": "s3://bucket/key"},
        {"image": "file:///etc/passwd"},
        {"image": "https://a/b.jpg", "image_base64": "QUJD"},
        {"image_base64": "not base64!"},
        {"k": 0},
        {"k": True},
        {"tags": [1, 2]},
        {"tags": ["x"] * 101},
        {"unknown": 1},
        [1, 2],
    ]:
        with pytest.raises(ClientError) as refused:
            parse_post(bad, 5)
        assert refused.value.status == 400, bad
