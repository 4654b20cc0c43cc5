"""infra/serve.yaml deployed with `serve deploy` to a real `ray start` cluster with token auth
(head at CPU 0, replicas on a worker node): it answers as `hashtag recommend --json`; another
export URI deployed under load rolls the replicas without one failed request; a replica killed
under load costs at most a retried or clean 5xx answer, never a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from cluster_util import RAY, RayCluster, free_port
from test_tune import CLASSIC_SPEC, write_dataset

from hashtag import models, selection
from hashtag.report import ResultRow

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
TOKEN = "cluster-serve-token-" + "9" * 24


def export(root: Path, seed: int) -> str:
    data = str(root / f"data{seed}")
    dataset = write_dataset(data, posts=200, dim=340, tags=8, seed=seed, embedder=CLASSIC_SPEC)
    X, Y = dataset.part("train")
    X_val, Y_val = dataset.part("val")
    knn = models.create("knn", models.ModelConfig()).fit(X, Y, X_val, Y_val, vocab=dataset.vocab)
    row = ResultRow(model="knn", val=knn.score(X_val, Y_val))
    return selection.export_model(
        dataset, knn, row, out=str(root / f"tune{seed}"), dataset_uri=data, loss="sigmoid"
    )


def serve_config(model: str, token_file: Path, port: int) -> dict:
    """infra/serve.yaml as shipped, fitted to one machine: the proxy on the head only (every
    node here is 127.0.0.1), two fixed replicas of half a CPU, no memory reservation."""
    config = yaml.safe_load((REPO / "infra" / "serve.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"].update(host="127.0.0.1", port=port)
    (application,) = config["applications"]
    application["args"].update(model=model, token_file=str(token_file))
    (deployment,) = application["deployments"]
    deployment.pop("autoscaling_config")
    deployment.update(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    return config


def deploy(cluster: RayCluster, config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [str(Path(RAY).with_name("serve")), "deploy", str(path), "--address", cluster.dashboard],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


class Load:
    """`clients` threads posting a photo until stopped; every outcome counted. A 5xx or a
    dropped connection is retried once; no answer in 30 s is a hang."""

    def __init__(self, url: str, photo: bytes, clients: int = 6):
        self.url, self.photo = url, photo
        self.outcomes: dict[str, int] = {}
        self.models: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _post(self, session: requests.Session) -> tuple[int, dict]:
        try:
            reply = session.post(
                self.url + "/v1/recommend",
                data=self.photo,
                headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            )
            return reply.status_code, reply.json() if reply.status_code == 200 else {}
        except requests.Timeout:
            return -1, {}
        except requests.RequestException:
            return 0, {}

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            status, body = self._post(session)
            outcome = "answered"
            if status in (0, 500, 502, 503, 504):
                time.sleep(0.2)
                status, body = self._post(session)
                outcome = "retried" if status == 200 else f"failed-{status}"
            if status == -1:
                outcome = "hung"
            with self.lock:
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                if body:
                    self.models.append(body["model"])

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_value = check()
        if with_value:
            return with_value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below `root` (from /proc: Linux)."""
    parents: dict[int, int] = {}
    lines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            lines[int(entry.name)] = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = {}, {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found.update({pid: lines.get(pid, "") for pid in frontier})
    return found


def replica_pids(node) -> list[int]:
    """The Serve replicas among the worker processes the node's raylet started."""
    found = descendants(node.raylet().pid)
    return [pid for pid, line in found.items() if line.startswith("ray::ServeReplica")]


def model_id(url: str) -> str | None:
    try:
        reply = requests.get(url + "/healthz", timeout=5)
        return reply.json()["model"] if reply.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def test_serve_deploy_rolls_a_new_model_and_survives_a_killed_replica(tmp_path):
    import cv2
    import numpy as np

    first, second = export(tmp_path, seed=0), export(tmp_path, seed=5)
    photo_path = tmp_path / "photo.jpg"
    rng = np.random.default_rng(3)
    cv2.imwrite(
        str(photo_path), cv2.GaussianBlur(rng.integers(0, 255, (180, 240, 3), np.uint8), (9, 9), 3)
    )
    photo = photo_path.read_bytes()
    token_file = tmp_path / "serve_token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with RayCluster.start(num_cpus=0) as cluster:
        worker = cluster.add_worker(num_cpus=2)
        deploy(cluster, serve_config(first, token_file, port), tmp_path / "serve-1.yaml")
        first_id = wait_for(lambda: model_id(url), 240, "the application")

        # The answer is `hashtag recommend --json`'s.
        reply = requests.post(
            url + "/v1/recommend", files={"image": ("p.jpg", photo)},
            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        cli = subprocess.run(
            [sys.executable, "-m", "hashtag.cli", "recommend", "--model", first, "--json", str(photo_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert reply.json()["hashtags"] == json.loads(cli.stdout)["hashtags"]
        assert requests.post(url + "/v1/recommend", data=photo, timeout=30).status_code == 401

        # Another export under load: a rolling update, no request lost.
        with Load(url, photo) as during_update:
            time.sleep(2)
            deploy(cluster, serve_config(second, token_file, port), tmp_path / "serve-2.yaml")
            second_id = wait_for(
                lambda: (m := model_id(url)) != first_id and m, 240, "the new model"
            )
            wait_for(lambda: during_update.models[-20:].count(second_id) == 20, 120, "the switch")
        assert second_id != first_id
        assert set(during_update.outcomes) == {"answered"}, during_update.outcomes
        assert {first_id, second_id} == set(during_update.models)

        # One replica killed (SIGKILL, as a crash) under load.
        # (the replaced replicas drain for up to graceful_shutdown_timeout_s first)
        wait_for(lambda: len(replica_pids(worker)) == 2, 120, "the old replicas to stop")
        replicas = replica_pids(worker)
        with Load(url, photo) as during_kill:
            time.sleep(3)
            os.kill(replicas[0], signal.SIGKILL)
            time.sleep(15)
        outcomes = during_kill.outcomes
        assert "hung" not in outcomes, outcomes
        failed = sum(n for k, n in outcomes.items() if k.startswith("failed"))
        assert failed <= 6 and outcomes["answered"] > 20, outcomes
        print(f"replica killed under load: {outcomes}")
        # Serve replaces the dead replica.
        wait_for(lambda: len(replica_pids(worker)) == 2, 120, "a replacement replica")
