"""kNN on faiss: exact (IndexFlatIP) vs approximate (IVF) at scale and on real photos.

    python bench/bench_knn.py --sizes 100000               # synthetic only, one size
    python bench/bench_knn.py --sizes 100000,1000000 --sets feedme-food,flickr8k-dev

Synthetic: `--sizes` posts of 256-D (a mixture of 2,000 clusters, rows varying along a 24-D subspace plus noise, 1,000
tags, ~3 per post), fitted as `knn` from Blocks (CSR labels, never dense), with the index
neighbours.plan picks for that N (`auto`) and with the exact one. Printed per index: build time
(the model's fit: index + labels), query images/s (1,000 queries, k=20, the whole vote), the
export's bytes on disk (index.faiss + CSR labels + manifest), recall@20 of the approximate
index's neighbours against the exact ones, and the process's peak RSS so far.

Shared photo sets (embeddings of the product's V2 + V1 ensemble, cached by bench_quality.py):
over `--splits` random 70/15/15 splits, tune's kNN reference (centred, 20 neighbours,
exp(10 x similarity)) on train, F1@5 on test, exact vs a forced IVF index (`--approximate`).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
QUERIES, K = 1000, 20


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def synthetic(n: int, dim: int, seed: int = 0, tags: int = 1000, clusters: int = 2000):
    """(X float32 (n, dim), labels indptr, indices): clustered rows, tags by cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    cluster_tags = rng.integers(tags, size=(clusters, 3))
    # Photos vary along a few directions (pose, light, framing), not all 256: within a cluster,
    # a 24-D variation (norm ~10, centres ~22 apart) plus isotropic noise (norm ~1.6).
    basis = np.linalg.qr(rng.normal(size=(dim, 24)))[0].T.astype(np.float32)
    X = np.empty((n, dim), np.float32)
    cluster = rng.integers(clusters, size=n)
    for start in range(0, n, 65536):
        rows = slice(start, start + 65536)
        b = len(cluster[rows])
        X[rows] = (
            centres[cluster[rows]]
            + 2.0 * rng.normal(size=(b, 24)).astype(np.float32) @ basis
            + 0.1 * rng.normal(size=(b, dim))
        )
    per_row = np.sort(cluster_tags[cluster], axis=1).astype(np.int32)
    indptr = np.arange(0, 3 * n + 1, 3, dtype=np.int64)
    return X, indptr, per_row.ravel()


def measure(label: str, X, indptr, indices, n_tags: int, index: str, queries, folder: str):
    from hashtag import models
    from hashtag.dataset import array_blocks

    blocks = models.Blocks(
        lambda order: array_blocks(X, indptr, indices, order), len(X), X.shape[1], n_tags
    )
    config = models.ModelConfig(knn_neighbours=K, knn_index=index)
    started = time.perf_counter()
    model = models.create("knn", config).fit(blocks, None)
    build = time.perf_counter() - started
    model.predict_scores(queries[:10])  # warm up
    started = time.perf_counter()
    model.predict_scores(queries)
    per_second = len(queries) / (time.perf_counter() - started)
    uri = os.path.join(folder, label)
    model.save(uri)
    size = folder_bytes(uri)
    shutil.rmtree(uri)
    from hashtag import neighbours

    found, _ = neighbours.search(model.index, model.features(queries), K)
    return model, {"build": build, "qps": per_second, "bytes": size, "found": found}


def synthetic_rows(sizes: list[int], dim: int, queries_n: int = QUERIES) -> list[str]:
    lines = [
        f"\nsynthetic {dim}-D, 1,000 tags; {queries_n} queries, k={K}",
        f"{'N':>9} {'index':34} {'build s':>8} {'query img/s':>12} {'export MB':>10} "
        f"{'recall@20':>10} {'peak RSS GB':>12}",
    ]
    from hashtag import neighbours

    for n in sizes:
        X, indptr, indices = synthetic(n + queries_n, dim)  # the last rows are the queries
        queries, X = X[n:].copy(), X[:n]
        indptr, indices = indptr[: n + 1], indices[: 3 * n]
        with tempfile.TemporaryDirectory(prefix="hashtag-bench-knn-") as folder:
            auto = neighbours.plan(n, dim)
            approximate = auto if auto.kind != "flat" else neighbours.plan(n, dim, kind="ivf-flat")
            exact_model, exact = measure("exact", X, indptr, indices, 1000, "flat", queries, folder)
            del exact_model
            lines.append(
                f"{n:>9} {'exact IndexFlatIP':34} {exact['build']:8.1f} {exact['qps']:12.0f} "
                f"{exact['bytes'] / 1e6:10.1f} {1.0:10.3f} {peak_rss_gb():12.2f}"
            )
            model, approx = measure(
                "approximate", X, indptr, indices, 1000, approximate.kind, queries, folder
            )
            del model
            recall = np.mean(
                [
                    len(np.intersect1d(a[a >= 0], e)) / K
                    for a, e in zip(approx["found"], exact["found"], strict=True)
                ]
            )
            lines.append(
                f"{n:>9} {approximate.describe()[:34]:34} {approx['build']:8.1f} "
                f"{approx['qps']:12.0f} {approx['bytes'] / 1e6:10.1f} {recall:10.3f} "
                f"{peak_rss_gb():12.2f}"
            )
            print(lines[-2], lines[-1], sep="\n", flush=True)
        del X, indptr, indices
    return lines


def shared_rows(args) -> list[str]:
    from bench_quality import SplitData, default_shared, embed

    from hashtag import embedders, models, neighbours, selection
    from hashtag.embedders import EmbedderSpec
    from hashtag.sources import open_source

    shared = default_shared()
    both = EmbedderSpec.parse("default")  # the shipped MobileNetV2 + MobileNetV1
    built = embedders.create_from_spec(both)
    spec = EmbedderSpec.ensemble([p.spec for p in built.parts])
    lines = [
        f"\nshared sets: tune's kNN reference, train only, F1@5 on test over {args.splits} splits; "
        f"approximate = {args.approximate}"
    ]
    for name in args.sets.split(","):
        posts = list(open_source(str(shared / "data" / name / "posts.jsonl")).posts())
        X = embed(posts, both, args.cache, name)
        tags = [p.tags for p in posts]
        f1 = {"exact": [], "approximate": []}
        recalls, qps = [], {"exact": [], "approximate": []}
        for seed in range(args.splits):
            rng = np.random.default_rng(seed)
            split = np.zeros(len(X), np.int8)
            order = rng.permutation(len(X))
            split[order[int(0.70 * len(X)) : int(0.85 * len(X))]] = 1
            split[order[int(0.85 * len(X)) :]] = 2
            data = SplitData(X, tags, split, spec)
            fitted = {}
            for label, index in (("exact", "auto"), ("approximate", args.approximate)):
                config = selection.reference_config("knn", 0, spec.blocks)
                config = models.ModelConfig(**{**config.__dict__, "knn_index": index})
                model = models.create("knn", config).fit(*data.part("train"), *data.part("val"))
                X_test, Y_test = data.part("test")
                started = time.perf_counter()
                f1[label].append(model.score(X_test, Y_test)["f1@5"])
                qps[label].append(len(X_test) / (time.perf_counter() - started))
                fitted[label] = neighbours.search(model.index, model.features(X_test), K)[0]
            recalls.append(
                np.mean(
                    [
                        len(np.intersect1d(a[a >= 0], e)) / K
                        for a, e in zip(fitted["approximate"], fitted["exact"], strict=True)
                    ]
                )
            )
        e, a = np.array(f1["exact"]), np.array(f1["approximate"])
        lines.append(
            f"{name:14} F1@5 exact {e.mean():.4f} +- {e.std():.4f}, approximate {a.mean():.4f} +- "
            f"{a.std():.4f}, difference {np.mean(a - e):+.4f} (max |d| {np.abs(a - e).max():.4f}); "
            f"recall@20 {np.mean(recalls):.3f}; scoring img/s exact {np.mean(qps['exact']):.0f}, "
            f"approximate {np.mean(qps['approximate']):.0f}"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000", help="synthetic sizes ('' none)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=QUERIES, help="synthetic queries")
    parser.add_argument("--sets", default="feedme-food,flickr8k-dev", help="('' none)")
    parser.add_argument("--splits", type=int, default=6)
    parser.add_argument("--approximate", default="ivf-flat", help="the forced index on the sets")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hashtag-quality-cache"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    lines = []
    if args.sizes:
        lines += synthetic_rows([int(s) for s in args.sizes.split(",")], args.dim, args.queries)
    if args.sets:
        lines += shared_rows(args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
