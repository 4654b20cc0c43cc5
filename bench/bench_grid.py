"""Grid benchmark: wall time of `hashtag.tune.run` (3 batch sizes x 3 learning rates) on local Ray.

    python bench/bench_grid.py --posts 2000 --dim 340 --tags 200 --epochs 5

Writes a synthetic merged dataset of realistic shape into a temporary folder (posts near one of
`--topics` centres; each topic has a few favourite tags, drawn with a Zipf tail over the whole
vocabulary, so there is something to learn and popularity is a real baseline), then runs the
whole tune stage: references, grid, report, export. Prints the wall time of the grid, of the
stage, the training seconds of every trial, and the test F1 table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hashtag import tune  # noqa: E402
from hashtag.dataset import DatasetWriter, csr_from_lists  # noqa: E402


def write_synthetic_dataset(
    uri: str, posts: int, dim: int, tags: int, topics: int = 20, seed: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    topic = rng.integers(topics, size=posts)
    embeddings = centres[topic] + 1.5 * rng.normal(size=(posts, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    favourites = rng.integers(tags, size=(topics, 4))
    labels = []
    for t in topic:
        chosen = {int(f) for f in favourites[t] if rng.random() < 0.6}
        chosen |= {int(min(z - 1, tags - 1)) for z in rng.zipf(1.5, rng.integers(1, 4))}
        labels.append(sorted(chosen))
    counts = np.bincount(np.concatenate(labels), minlength=tags)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(tags, np.int64)
    rank[order] = np.arange(tags)
    indptr, indices = csr_from_lists([[int(rank[c]) for c in row] for row in labels])
    split = rng.choice(np.array([0, 1, 2], np.uint8), size=posts, p=[0.7, 0.15, 0.15])
    with DatasetWriter(uri, dim=dim, id_length=12) as writer:
        writer.append(embeddings, [f"post{i}" for i in range(posts)], split, indptr, indices)
        writer.finish(
            vocab=[f"tag{int(t)}" for t in order],
            tag_counts=counts[order].tolist(),
            embedder={"name": "classic", "version": 1},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=340)
    parser.add_argument("--tags", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=None, help="ray.init(num_cpus=...)")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as root:
        data = os.path.join(root, "data")
        write_synthetic_dataset(data, args.posts, args.dim, args.tags)
        config = tune.TuneConfig(
            data=data,
            out=os.path.join(root, "tune"),
            model=args.model,
            epochs=args.epochs,
            cpus_per_trial=args.cpus_per_trial,
        )
        started = time.perf_counter()
        summary = tune.run(config)
        stage = time.perf_counter() - started
        with open(os.path.join(root, "tune", "results.md")) as f:
            table = f.read()
    ray.shutdown()
    trial_seconds = {
        f"bs={t['batch_size']} lr={t['learning_rate']:g}": round(t["seconds"], 1)
        for t in summary["trials"]
    }
    print(table)
    print(
        json.dumps(
            {
                "posts": args.posts,
                "dim": args.dim,
                "tags": args.tags,
                "epochs": args.epochs,
                "trials": len(summary["trials"]),
                "cpus": ray_cpus(args.num_cpus),
                "stage_seconds": round(stage, 1),
                "trial_training_seconds": trial_seconds,
                "best": summary["best"]["test"]["f1"],
            },
            indent=2,
        )
    )


def ray_cpus(requested: int | None) -> int:
    return requested or os.cpu_count() or 1


if __name__ == "__main__":
    main()
