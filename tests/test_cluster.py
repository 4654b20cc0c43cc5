"""The batch job on real Ray clusters: `ray start` processes, `ray job submit`, token auth.

    pytest -m cluster tests/test_cluster.py -s      # ~9-11 minutes on 2 cores

- a local cluster runs `jobs/pipeline.py --demo` end to end, and refuses a submission without
  (or with a wrong) token;
- a simulated autoscaling cluster (Ray's fake_multinode provider, cluster.yaml's node types)
  starts CPU workers for the embed tasks and a GPU worker for the Tune trials, and removes them
  when idle; a fetch-bound scrape makes it launch every worker it may while shards are left,
  and the merge's tasks run on several of them;
- faults: a worker node's raylet killed during scrape (the job succeeds, every post lands in
  the dataset exactly once); the whole cluster stopped during Tune, restarted, the job
  resubmitted (finished trials are not rerun).

Wall times are printed (run with -s) and written to OUT/cluster-timing.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from cluster_util import REPO, RayCluster, fake_autoscaling_config, slow_image_source

from hashtag.dataset import Dataset
from hashtag.pretrained import DEFAULT, SHIPPED

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# `classic` (no TensorFlow in the workers) keeps the fault tests' timing; the token test runs
# the default embedder, whose weights reach the workers with the uploaded working dir.
SMALL = {
    "--embedder": "classic",
    "--demo-posts": "60",
    "--shard-size": "10",
    "--epochs": "1",
    "--batch-sizes": "16,64",
    "--learning-rates": "1e-2",
    "--examples": "1",
}


def pipeline(out: Path, script: str = "jobs/pipeline.py", **overrides: str) -> list[str]:
    options = {**SMALL, **{"--" + k.replace("_", "-"): v for k, v in overrides.items()}}
    return ["python", script, "--demo", "--out", str(out)] + [
        item for pair in options.items() for item in pair
    ]


def run_job(cluster: RayCluster, entrypoint: list[str], timeout: float = 300, **submit) -> float:
    """Submit, wait for SUCCEEDED (failing with the job's logs otherwise); the wall time."""
    start = time.monotonic()
    job = cluster.submit(entrypoint, **submit)
    status = cluster.wait(job, timeout=timeout)
    seconds = time.monotonic() - start
    assert status == "SUCCEEDED", f"job {job} {status}:\n{cluster.logs(job)[-6000:]}"
    return seconds


def record_time(out: Path, name: str, seconds: float) -> None:
    print(f"\n[cluster timing] {name}: {seconds:.1f} s")
    (out / "cluster-timing.json").write_text(json.dumps({name: round(seconds, 1)}))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def shard_post_ids(out: Path) -> list[str]:
    """Ids of every post in every finished shard (a shard exists once its manifest does)."""
    ids = []
    for manifest in sorted((out / "shards").glob("shard-*/manifest.json")):
        rows = (manifest.parent / "posts.jsonl").read_text().splitlines()
        assert len(rows) == read_json(manifest)["count"]
        ids += [json.loads(row)["id"] for row in rows]
    return ids


def check_outputs(out: Path, *, grid_points: int) -> None:
    """What a finished pipeline leaves under OUT (the contract in docs/design.md)."""
    scrape = read_json(out / "scrape.json")
    assert scrape["failed_shards"] == {}
    shards = sorted((out / "shards").glob("shard-*/manifest.json"))
    assert len(shards) == scrape["shards"] > 0

    # Every post scraped once, and in the merged dataset once (duplicate images aside).
    ids = shard_post_ids(out)
    assert len(ids) == scrape["posts_embedded"] == len(set(ids))
    # Skips the source counts ("source:video"...) happen before a post is read in.
    shard_skips = sum(n for why, n in scrape["skipped"].items() if not why.startswith("source:"))
    assert scrape["posts_embedded"] + shard_skips == scrape["posts_in"]
    dataset = read_json(out / "dataset" / "manifest.json")
    merged = Dataset.load(str(out / "dataset"))
    dataset_ids = [str(i) for i in merged.ids]
    assert len(dataset_ids) == dataset["count"] == len(set(dataset_ids))
    assert set(dataset_ids) <= set(ids)
    assert len(ids) - len(dataset_ids) == sum(dataset["duplicates"].values())
    assert merged.embeddings.shape == (dataset["count"], dataset["dim"])
    assert (out / "dataset" / "merge.json").exists()

    # One row per grid point, plus the reference models; an exported model.
    rows = (out / "tune" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    models = [row.split(",")[header.index("model")] for row in rows[1:]]
    assert models.count("mlp") == grid_points
    assert {"popularity", "knn", "ridge"} <= set(models)
    assert any(m.startswith("blend: ") for m in models)  # candidates beside the grid
    assert sum(m.startswith("exported: ") for m in models) == 1  # the refit winner's row
    assert {"batch_size", "learning_rate"} <= set(header)
    assert read_json(out / "tune" / "model" / "manifest.json")
    assert (out / "tune" / "tune.json").exists() and (out / "pipeline.json").exists()


# Several nodes on one machine share one runtime_resources folder: a node that joins (or dies)
# mid-job unpacks (or deletes) the uploaded working_dir under the driver's feet. Multi-node tests
# therefore do as cluster.yaml's image does: the project is already on every "node" (here on
# PYTHONPATH) and nothing is uploaded.
INSTALLED = {"working_dir": None, "env_vars": {"PYTHONPATH": str(REPO)}}
INSTALLED_SCRIPT = str(REPO / "jobs" / "pipeline.py")


@pytest.fixture
def out(tmp_path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


# --- a local cluster with token auth ---------------------------------------------------------


def test_pipeline_runs_on_a_local_cluster_with_token_auth(out, tmp_path):
    with RayCluster.start(num_cpus=2) as cluster:
        seconds = run_job(cluster, pipeline(out, embedder="default"))
        record_time(out, "local cluster, 60 posts, 2x1 grid", seconds)
        check_outputs(out, grid_points=2)
        # The shipped weights travel in the working dir upload (infra/runtime_env.yaml keeps
        # hashtag/weights), and the shards record their checksums.
        unpacked = cluster.root / "r" / "session_latest" / "runtime_resources"
        uploaded = unpacked.glob("working_dir_files/*/hashtag/weights/*.tflite")
        assert sorted(p.name for p in uploaded) == sorted(s.file for s in SHIPPED.values())
        shard = read_json(sorted((out / "shards").glob("shard-*/manifest.json"))[0])
        assert [p["name"] for p in shard["embedder"]["parts"]] == ["mobilenet_v2", "mobilenet_v1"]
        assert [p["sha256"] for p in shard["embedder"]["parts"]] == [
            SHIPPED[name].sha256 for name in DEFAULT
        ]

        # No token, or a wrong one: the job server refuses (HTTP and `ray job submit` alike).
        assert cluster.http("/api/jobs/", token=None)[0] == 401
        assert cluster.http("/api/jobs/", token="0" * 64)[0] == 403
        tokenless_home = tmp_path / "home"
        tokenless_home.mkdir()
        for cli_env in (
            {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN_PATH": None, "HOME": str(tokenless_home)},
            {"RAY_AUTH_TOKEN": "0" * 64},
        ):
            refused = cluster.submit(pipeline(out / "refused"), cli_env=cli_env, check=False)
            assert refused.returncode != 0
            assert "Authentication" in refused.stderr
        assert not (out / "refused").exists()
        assert len(cluster.http("/api/jobs/")[1]) == 1, "only the authenticated job was accepted"


# --- simulated autoscaling --------------------------------------------------------------------


def workers(cluster: RayCluster) -> list[dict]:
    return [n for n in cluster.list_nodes() if not n["is_head_node"]]


KINDS = ("cpu-worker", "gpu-worker")
# Ray's fake provider cannot advertise `memory` on a node type (RayParams refuses it in
# resources), so a task that declares memory would look infeasible here; on AWS the node
# provider fills memory in from the instance type.
NO_MEMORY = {
    "scrape.memory_per_task_mb": "0",
    "merge.memory_per_task_mb": "0",
    "task_memory_mb": "0",
}


def test_autoscaler_adds_cpu_and_gpu_workers_then_removes_them(out):
    config = lambda gcs_port: fake_autoscaling_config(gcs_port, idle_timeout_minutes=0.15)  # noqa: E731
    with RayCluster.start(num_cpus=0, autoscaling=config) as cluster:
        assert workers(cluster) == [], "min_workers 0: nothing runs before the job"
        job = pipeline(out, INSTALLED_SCRIPT, gpus_per_trial="1", **NO_MEMORY)
        seconds = run_job(cluster, job, 400, **INSTALLED)
        record_time(out, "simulated autoscaling cluster, 60 posts, 2x1 grid", seconds)
        check_outputs(out, grid_points=2)

        launched = workers(cluster)
        cpu_nodes = [n for n in launched if "GPU" not in n["resources_total"]]
        gpu_nodes = [n for n in launched if n["resources_total"].get("GPU") == 1]
        assert cpu_nodes and gpu_nodes, launched
        # The autoscaler logs its launches from a periodic event summary: wait for the flush.
        deadline = time.monotonic() + 60
        while not all(f"of type {kind}" in cluster.autoscaler_log() for kind in KINDS):
            assert time.monotonic() < deadline, cluster.autoscaler_log()[-3000:]
            time.sleep(2)

        # The embed tasks ran on workers (the head has no CPU), which the autoscaler added for
        # them; the GPU worker, launched for the trials, has CPUs too and may take late shards.
        embed_nodes = {t["node_id"] for t in cluster.list_tasks("embed_shard") if t.get("node_id")}
        assert embed_nodes and embed_nodes <= {n["node_id"] for n in launched}
        assert embed_nodes & {n["node_id"] for n in cpu_nodes}
        trials = list((out / "tune").glob("ray/*/train_*/params.json"))
        assert len(trials) == 2

        # idle_timeout_minutes later, every worker is gone again.
        deadline = time.monotonic() + 90
        while any(n["state"] == "ALIVE" for n in workers(cluster)):
            assert time.monotonic() < deadline, f"workers still alive: {workers(cluster)}"
            time.sleep(2)
        assert "Terminating the node" in cluster.autoscaler_log()


def test_pipeline_on_the_deployed_shape_with_every_output_on_s3(out, s3_bucket):
    """cluster.yaml's shape: the head at CPU 0, no worker at start, GPU trials; and the run on
    S3 (moto on 127.0.0.1), as `--out s3://hashtag-data/runs/...` on AWS: demo posts, shards,
    dataset, Tune's experiment and the exported model all in the bucket, none on local disk.
    The bucket's copy then passes the same checks as a local run's folder."""
    from hashtag import models, storage

    run = f"{s3_bucket}/runs/hashtag/r1"
    config = lambda gcs_port: fake_autoscaling_config(gcs_port, idle_timeout_minutes=0.5)  # noqa: E731
    with RayCluster.start(num_cpus=0, autoscaling=config) as cluster:
        assert workers(cluster) == [], "min_workers 0: nothing runs before the job"
        job = pipeline(run, INSTALLED_SCRIPT, gpus_per_trial="1", **NO_MEMORY)
        seconds = run_job(cluster, job, 400, **INSTALLED)
        record_time(out, "simulated autoscaling cluster, run on S3, 60 posts, 2x1 grid", seconds)
        launched = {n["node_id"] for n in workers(cluster)}
        embed_nodes = {t["node_id"] for t in cluster.list_tasks("embed_shard") if t.get("node_id")}
        assert embed_nodes and embed_nodes <= launched, "every shard embedded on a worker"
    fs, path = storage.filesystem(run)
    fs.get(path + "/", str(out / "copy"), recursive=True)
    check_outputs(out / "copy", grid_points=2)
    assert len(list((out / "copy" / "tune").glob("ray/*/train_*/params.json"))) == 2
    exported = models.load(f"{run}/tune/model")
    assert exported.metadata["vocab"] == Dataset.load(f"{run}/dataset").vocab


MERGE_TASKS = ("merge_keys", "merge_dedupe", "merge_count", "merge_write")


def test_scrape_and_merge_keep_the_autoscaler_fed(out, tmp_path):
    """Head at CPU 0, up to 6 one-CPU workers: a fetch-bound scrape of 120 shards makes the
    autoscaler launch all 6 while shards are left, and the merge's tasks spread over several."""
    max_workers = 6
    config = lambda gcs_port: fake_autoscaling_config(  # noqa: E731
        gcs_port, cpu_workers=max_workers, gpu_workers=0, idle_timeout_minutes=0.5
    )
    with (
        slow_image_source(tmp_path, posts=1200, delay_s=0.15) as manifest,
        RayCluster.start(num_cpus=0, autoscaling=config) as cluster,
    ):
        scrape = [
            "python", str(REPO / "jobs" / "scrape_embed.py"), "--source", str(manifest),
            "--out", str(out), "--embedder", "classic", "--shard-size", "10",
            "--allow-private-addresses", "--memory-per-task-mb", "0",
        ]  # fmt: skip
        job = cluster.submit(scrape, **INSTALLED)
        peak = cluster.watch_workers(job, out / "scrape.json")
        assert peak["status"] == "SUCCEEDED", cluster.logs(job)[-6000:]
        summary = read_json(out / "scrape.json")
        print(f"\n[autoscale] scrape: {peak}, peak in flight {summary['peak_in_flight']}")
        assert summary["failed_shards"] == {} and summary["shards"] >= 100
        assert peak["alive"] == max_workers and peak["while_working"], peak
        embed_nodes = {t["node_id"] for t in cluster.list_tasks("embed_shard")}
        assert len(embed_nodes) >= max_workers - 1, "the workers launched had shards to embed"

        merge = [
            "python", str(REPO / "jobs" / "merge.py"), "--shards", str(out),
            "--out", str(out / "dataset"), "--part-rows", "200", "--memory-per-task-mb", "0",
        ]  # fmt: skip
        seconds = run_job(cluster, merge, 240, **INSTALLED)
        merged = read_json(out / "dataset" / "merge.json")
        merge_nodes = {t["node_id"] for name in MERGE_TASKS for t in cluster.list_tasks(name)}
        print(f"[autoscale] merge: {seconds:.1f} s, {merged['tasks_per_step']}, "
              f"tasks on {len(merge_nodes)} nodes")  # fmt: skip
        assert merged["count"] == Dataset.load(str(out / "dataset")).embeddings.shape[0] > 1000
        assert merged["tasks_per_step"]["groups"] >= 5  # from the rows, not the CPUs at start
        assert len(merge_nodes) > 1, "the merge's tasks ran on more than one worker"


# --- faults -----------------------------------------------------------------------------------

# A dead node is declared dead within ~2 s instead of ~15 s.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}


def test_worker_node_lost_during_scrape(out):
    posts, shard_size = 600, 5
    # As on AWS the head runs no tasks: every embed task runs on worker node A or B.
    with RayCluster.start(num_cpus=0, system_config=FAST_HEALTH_CHECKS) as cluster:
        doomed = cluster.add_worker(num_cpus=1, name="doomed")
        doomed_id = cluster.wait_for_nodes(2)[-1]["node_id"]
        cluster.add_worker(num_cpus=1, name="survivor")
        cluster.wait_for_nodes(3)
        job = cluster.submit(
            pipeline(out, INSTALLED_SCRIPT, demo_posts=str(posts), shard_size=str(shard_size)),
            **INSTALLED,
        )

        # Once node A has embedded shards, its raylet dies (SIGKILL) while scrape goes on:
        # its running task dies with it, its queued ones must go to B.
        deadline = time.monotonic() + 240
        while not any(t.get("node_id") == doomed_id for t in cluster.list_tasks("embed_shard")):
            assert cluster.status(job) not in ("FAILED", "STOPPED"), cluster.logs(job)[-4000:]
            assert time.monotonic() < deadline, "no embed task ran on the doomed node"
            time.sleep(0.2)
        doomed.kill_raylet()
        written_before_kill = len(list((out / "shards").glob("shard-*/manifest.json")))
        print(f"\n[fault] worker raylet killed with {written_before_kill} shards written")

        status = cluster.wait(job, timeout=300)
        assert status == "SUCCEEDED", cluster.logs(job)[-6000:]
        check_outputs(out, grid_points=2)
        scrape = read_json(out / "scrape.json")
        assert scrape["shards"] == math.ceil(scrape["posts_in"] / shard_size)
        assert written_before_kill < scrape["shards"], "scrape was over before the fault"
        dead = [n["node_id"] for n in cluster.list_nodes() if n["state"] == "DEAD"]
        assert dead == [doomed_id]
        attempts = cluster.list_tasks("embed_shard")
        on_doomed = [t for t in attempts if t.get("node_id") == doomed_id]
        print(f"[fault] embed attempts on the dead node: {[t['state'] for t in on_doomed]}")
        assert on_doomed, "the dead node had done part of the scrape"


def trial_states(out: Path) -> dict[str, str]:
    """Trial id -> status, from Tune's newest experiment state file (None while unreadable)."""
    states = sorted((out / "tune").glob("ray/*/experiment_state-*.json"))
    if not states:
        return {}
    try:
        trial_data = read_json(states[-1])["trial_data"]
    except (ValueError, KeyError, OSError):
        return {}  # being written
    return {json.loads(t)["trial_id"]: json.loads(t)["status"] for t, _ in trial_data}


def finished_trial_results(out: Path) -> dict[str, bytes]:
    """Trial dir name -> its result.json, for trials whose last result says done."""
    finished = {}
    for result in (out / "tune").glob("ray/*/train_*/result.json"):
        lines = result.read_bytes().splitlines()
        if lines and json.loads(lines[-1]).get("done"):
            finished[result.parent.name] = result.read_bytes()
    return finished


def test_cluster_stopped_during_tune_resumes_without_rerunning_finished_trials(out, tmp_path):
    # cpus_per_trial 2 on a 2-CPU cluster: trials run one after another.
    job_args = pipeline(out, epochs="8", batch_sizes="16,32,64", cpus_per_trial="2")
    cluster = RayCluster.start(num_cpus=2)
    try:
        job = cluster.submit(job_args)
        deadline = time.monotonic() + 300
        while True:
            states = trial_states(out)
            terminated = [t for t, s in states.items() if s == "TERMINATED"]
            if terminated and len(terminated) < 3:
                break
            assert cluster.status(job) not in ("FAILED", "STOPPED", "SUCCEEDED"), (
                "Tune finished (or failed) before the cluster could be stopped:\n"
                + cluster.logs(job)[-4000:]
            )
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.1)
        cluster.stop()  # the whole cluster: head, driver, trials
    finally:
        cluster.cleanup()
    finished_before = finished_trial_results(out)
    print(f"\n[fault] cluster stopped with {len(finished_before)}/3 trials finished")
    assert finished_before and len(finished_before) < 3
    assert not (out / "tune" / "tune.json").exists()

    with RayCluster.start(num_cpus=2) as restarted:
        seconds = run_job(restarted, job_args)
        record_time(out, "resubmitted after a stop during Tune", seconds)
    check_outputs(out, grid_points=3)
    finished_after = finished_trial_results(out)
    assert len(finished_after) == 3, "every grid point finished exactly once"
    for trial, result in finished_before.items():
        assert finished_after[trial] == result, f"finished trial {trial} was run again"
    tune = read_json(out / "tune" / "tune.json")
    assert sorted(t["batch_size"] for t in tune["trials"]) == [16, 32, 64]
