"""Benchmark: how far a scrape and a merge scale out on an autoscaling cluster that starts empty.

    python bench/bench_autoscale.py [--posts 1200] [--rows 6:auto,6:4,1:auto] [--delay-s 0.1]

Ray's fake_multinode autoscaler in cluster.yaml's shape: the head has CPU 0, one-CPU workers
start at zero and are launched on demand (up to MAX_WORKERS of a row), each a raylet on this machine.
The source is fetch-bound, as a scrape from a remote server is: demo posts (hashtag.demo, 64 px)
whose images an HTTP server on 127.0.0.1 serves after --delay-s each; the `classic` embedder.
So the work is waiting, not CPU, and a 2-core machine can show what N one-CPU nodes would do.

Each row is a fresh cluster; a scrape job then a merge job (`ray job submit`, the project on
PYTHONPATH as in the node image). Default rows: up to 6 workers and the code's own window;
the same cluster with the window fixed at 4 tasks (`--max-in-flight 4`: what the window
was before issue 18 on a head with CPU 0); a cluster of at most one worker. Printed per row: the
most workers alive at once and whether the scrape still had shards left then, when that peak
came, the scrape's and the merge's wall time (node launches included), and the merge's tasks'
distinct nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cluster_util import RayCluster, fake_autoscaling_config, slow_image_source  # noqa: E402

INSTALLED = {"working_dir": None, "env_vars": {"PYTHONPATH": str(REPO)}}
MERGE_TASKS = ("merge_keys", "merge_dedupe", "merge_count", "merge_write")


def measure(manifest: Path, out: Path, workers: int, window: int, args) -> dict:
    def config(gcs_port: int) -> dict:
        return fake_autoscaling_config(
            gcs_port, cpu_workers=workers, gpu_workers=0, idle_timeout_minutes=1
        )

    with RayCluster.start(num_cpus=0, autoscaling=config) as cluster:
        scrape = [
            "python", str(REPO / "jobs" / "scrape_embed.py"), "--source", str(manifest),
            "--out", str(out), "--embedder", "classic", "--shard-size", str(args.shard_size),
            "--allow-private-addresses", "--memory-per-task-mb", "0",
            "--max-in-flight", str(window),
        ]  # fmt: skip
        job = cluster.submit(scrape, **INSTALLED)
        peak = cluster.watch_workers(job, out / "scrape.json", timeout=1800)
        if peak["status"] != "SUCCEEDED":
            raise RuntimeError(f"scrape {peak['status']}:\n{cluster.logs(job)[-4000:]}")
        summary = json.loads((out / "scrape.json").read_text())
        merge = [
            "python", str(REPO / "jobs" / "merge.py"), "--shards", str(out),
            "--out", str(out / "dataset"), "--part-rows", str(args.part_rows),
            "--memory-per-task-mb", "0",
        ]  # fmt: skip
        start = time.monotonic()
        job = cluster.submit(merge, **INSTALLED)
        if cluster.wait(job, timeout=1800) != "SUCCEEDED":
            raise RuntimeError(f"merge failed:\n{cluster.logs(job)[-4000:]}")
        merge_s = time.monotonic() - start
        merge_nodes = {t["node_id"] for n in MERGE_TASKS for t in cluster.list_tasks(n)}
        embed_nodes = {t["node_id"] for t in cluster.list_tasks("embed_shard")}
    return {
        "max workers": workers,
        "window": window or "auto",
        "peak alive": peak["alive"],
        "shards left": peak["while_working"],
        "peak at s": peak["peak_at_s"],
        "in flight": summary["peak_in_flight"],
        "embed nodes": len(embed_nodes),
        "scrape s": peak["job_s"],
        "posts/s": summary["posts_in"] / peak["job_s"],
        "merge s": merge_s,
        "merge nodes": len(merge_nodes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1200)
    parser.add_argument("--delay-s", type=float, default=0.1, help="per image, server side")
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--part-rows", type=int, default=200, help="merge rows per group")
    parser.add_argument(
        "--rows",
        default="6:auto,6:4,1:auto",
        help="clusters to run, in order: MAX_WORKERS:WINDOW (auto, or a fixed --max-in-flight)",
    )
    args = parser.parse_args()
    runs = [
        (int(workers), 0 if window == "auto" else int(window))
        for workers, window in (row.split(":") for row in args.rows.split(","))
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as tmp:
        with slow_image_source(Path(tmp), args.posts, args.delay_s) as manifest:
            for n, (workers, window) in enumerate(runs):
                rows.append(measure(manifest, Path(tmp) / f"out{n}", workers, window, args))
                print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nscrape ({args.posts} demo posts, images served after {args.delay_s} s, shards of "
        f"{args.shard_size}, classic) then merge (--part-rows {args.part_rows}); head CPU 0, "
        "one-CPU workers launched by fake_multinode"
    )
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))
    many = max(rows, key=lambda row: (row["max workers"], row["window"] == "auto"))
    one = min(rows, key=lambda row: row["max workers"])
    if one["max workers"] == 1 < many["max workers"]:
        print(
            f"{many['max workers']} workers vs 1: scrape {one['scrape s'] / many['scrape s']:.2f}x"
            f" faster, merge {one['merge s'] / many['merge s']:.2f}x"
        )


if __name__ == "__main__":
    main()
