"""Merge benchmark: throughput and peak memory of `hashtag.merge.run` on synthetic shards.

    python bench/bench_merge.py --rows 1000000 --dim 256 --shard-size 10000

Writes synthetic shards (with shards.write_shard) into a temporary folder, then merges them in a
child process that does nothing else, so that its peak RSS is the merge's alone. Prints rows/s,
peak RSS, and peak RSS / dataset bytes (rows x dim x 4); the target is under 0.25. A child that
only imports hashtag.merge gives the interpreter's baseline.

Peak RSS is VmHWM of /proc/self/status (the high-water mark of the child's own address space)
and, for comparison, getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a
child started by a big parent inherits the parent's RSS as a floor. The shards are therefore
generated in a child too, which keeps this parent small.

The merge now runs as Ray tasks (the child starts a local Ray): the child's RSS is the driver's
alone. bench_scale.py measures every process of the run, workers included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hashtag import merge, shards  # noqa: E402
from hashtag.posts import Post  # noqa: E402


def write_synthetic_shards(root: str, rows: int, dim: int, shard_size: int, repost: float) -> None:
    """Posts with Zipf-distributed tags; a `repost` fraction reuses an earlier post's image."""
    rng = np.random.default_rng(0)
    tags = np.array([f"tag{i}" for i in range(20000)])
    for index, start in enumerate(range(0, rows, shard_size)):
        n = min(shard_size, rows - start)
        number = np.arange(start, start + n)
        image_of = np.where(rng.random(n) < repost, rng.integers(0, start + n, n), number)
        counts = rng.integers(1, 9, n)
        picks = np.minimum(rng.zipf(1.3, counts.sum()) - 1, len(tags) - 1)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        posts = [
            Post(
                id=f"post{i:09d}",
                image=f"s3://bucket/images/{i}.jpg",
                tags=tuple(dict.fromkeys(tags[picks[bounds[k] : bounds[k + 1]]].tolist())),
                caption="synthetic",
            )
            for k, i in enumerate(number.tolist())
        ]
        embeddings = rng.standard_normal((n, dim), dtype=np.float32)
        shas = [f"{j:064x}" for j in image_of.tolist()]
        shards.write_shard(
            root, index, posts, embeddings, embedder={"name": "synthetic", "dim": dim},
            image_sha256=shas, stats={"seconds": 0.0},
        )  # fmt: skip


def _vm_hwm() -> int:
    """Peak resident bytes of this process image (VmHWM), or ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(argv: list[str]) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *argv]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--repost", type=float, default=0.01, help="fraction of reused images")
    parser.add_argument("--workdir", help="where to put shards and dataset (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the shards and the dataset")
    parser.add_argument("--merge-only", nargs=2, metavar=("SHARDS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--import-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--generate-only", metavar="SHARDS", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.merge_only or args.import_only:  # child mode: report own peak RSS as JSON
        summary = {}
        if args.merge_only:
            summary = merge.run(
                merge.MergeConfig(shards=args.merge_only[0], out=args.merge_only[1])
            ).summary
        maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        print(json.dumps({"summary": summary, "hwm": _vm_hwm(), "maxrss": maxrss_kb * 1024}))
        return
    if args.generate_only:
        rows, dim, shard_size, repost = args.rows, args.dim, args.shard_size, args.repost
        write_synthetic_shards(args.generate_only, rows, dim, shard_size, repost)
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-merge-")
    shards_root, out = os.path.join(workdir, "scrape"), os.path.join(workdir, "dataset")
    try:
        started = time.monotonic()
        sizes = [
            "--rows",
            str(args.rows),
            "--dim",
            str(args.dim),
            "--shard-size",
            str(args.shard_size),
        ]
        subprocess.run(
            child(["--generate-only", shards_root, *sizes, "--repost", str(args.repost)]),
            check=True,
        )
        print(f"wrote {args.rows:,} rows x {args.dim} in {time.monotonic() - started:.1f} s")

        baseline = json.loads(
            subprocess.run(child(["--import-only"]), check=True, capture_output=True).stdout
        )["hwm"]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        started = time.monotonic()
        result = subprocess.run(
            child(["--merge-only", shards_root, out]), check=True, capture_output=True, env=env
        )
        seconds = time.monotonic() - started
        report = json.loads(result.stdout.decode().strip().splitlines()[-1])
        summary, peak = report["summary"], report["hwm"]
        dataset_bytes = args.rows * args.dim * 4
        figures = {
            "rows": args.rows,
            "dim": args.dim,
            "shard_size": args.shard_size,
            "kept": summary["count"],
            "vocab_size": summary["vocab_size"],
            "merge_seconds": round(summary["seconds"], 2),
            "child_seconds": round(seconds, 2),
            "rows_per_second": round(args.rows / summary["seconds"]),
            "peak_rss_mb": round(peak / 2**20, 1),
            "ru_maxrss_mb": round(report["maxrss"] / 2**20, 1),
            "baseline_rss_mb": round(baseline / 2**20, 1),
            "dataset_mb": round(dataset_bytes / 2**20, 1),
            "peak_rss_over_dataset_bytes": round(peak / dataset_bytes, 3),
        }
        print(json.dumps(figures, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
