"""Benchmark: posts/s of scrape + embed on local Ray with 1 and 2 worker CPUs, and their ratio.

    python bench/bench_scrape.py [--posts 1200] [--embedder classic] [--shard-size 50]

Demo posts are generated first (an instaloader folder, the real ingest path); each run scrapes
them into a fresh output on a fresh local Ray with that many CPUs. Both runs happen in this one
process, one after the other, so the ratio is measured under the same machine load.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import ray

from hashtag import demo, scrape


def measure(source: str, out: str, cpus: int, args: argparse.Namespace) -> dict:
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    try:
        # Warm every worker up (process start, imports, model load): one shard per CPU, all in
        # flight at once, so that each CPU's worker process exists before the timed run.
        scrape.run(
            scrape.ScrapeConfig(
                source=source,
                out=out + "-warmup",
                shard_size=-(-args.posts // cpus),
                embedder=args.embedder,
                max_in_flight=cpus,
            )
        )
        start = time.perf_counter()
        summary = scrape.run(
            scrape.ScrapeConfig(
                source=source, out=out, shard_size=args.shard_size, embedder=args.embedder
            )
        )
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "cpus": cpus,
        "seconds": seconds,
        "posts": summary["posts_in"],
        "posts_per_s": summary["posts_in"] / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1200)
    parser.add_argument("--embedder", default="classic")
    parser.add_argument("--shard-size", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-scrape-") as tmp:
        source = f"{tmp}/posts"
        demo.run(demo.DemoConfig(out=source, posts=args.posts))
        one = measure(source, f"{tmp}/out1", 1, args)
        two = measure(source, f"{tmp}/out2", 2, args)
    print(f"\nscrape + embed ({args.embedder}), {one['posts']} posts, shards of {args.shard_size}")
    print(f"{'worker CPUs':>12} {'seconds':>9} {'posts/s':>9}")
    for row in (one, two):
        print(f"{row['cpus']:>12} {row['seconds']:>9.2f} {row['posts_per_s']:>9.1f}")
    print(f"ratio 2 CPUs / 1 CPU: {two['posts_per_s'] / one['posts_per_s']:.2f} (target >= 1.8)")


if __name__ == "__main__":
    main()
