"""Time to score 100,000 test images x 1,000 hashtags with hashtag.metrics, against a naive
per-image Python loop like the original project's (which scored 588 images at 4-7 images/s,
most of it in model.predict per image).

    python bench/bench_eval.py [--images 100000] [--tags 1000] [--naive-images 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hashtag import metrics


def naive_scores(y_true: np.ndarray, scores: np.ndarray, k: int = 5) -> dict[str, float]:
    """Per image: rank the tags, count hits, as a Python loop over images would."""
    tp = fp = fn = 0
    f1_at_k, average_precisions = [], []
    for truth, row in zip(y_true, scores, strict=True):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        true_tags = {j for j, t in enumerate(truth) if t}
        recommended = order[:k]
        hits = sum(1 for j in recommended if j in true_tags)
        tp, fp, fn = tp + hits, fp + k - hits, fn + len(true_tags) - hits
        if true_tags:
            f1_at_k.append(2 * hits / (k + len(true_tags)))
            found, precision_sum = 0, 0.0
            for rank, j in enumerate(order, start=1):
                if j in true_tags:
                    found += 1
                    precision_sum += found / rank
            average_precisions.append(precision_sum / len(true_tags))
    return {
        "f1": 2 * tp / (2 * tp + fp + fn),
        "f1@5": np.mean(f1_at_k),
        "map": np.mean(average_precisions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--tags", type=int, default=1_000)
    parser.add_argument("--naive-images", type=int, default=2_000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n, v = args.images, args.tags
    # ~4 true tags per image, popular tags more often (Zipf-like), scores correlated with truth.
    popularity = 1.0 / np.arange(1, v + 1) ** 0.8
    y_true = rng.random((n, v), dtype=np.float32) < (4.0 * popularity / popularity.sum())
    scores = rng.random((n, v), dtype=np.float32) + 0.5 * y_true
    print(f"{n:,} images x {v:,} tags, {y_true.sum() / n:.2f} true tags per image")

    start = time.perf_counter()
    y_pred = metrics.top_k_mask(scores, 5)
    result = metrics.evaluate(y_true, scores, y_pred)
    seconds = time.perf_counter() - start
    print(
        f"vectorised evaluate (top-5 decision, P/R/F1/hit @1,3,5,10, mAP): {seconds:.2f} s, "
        f"{n / seconds:,.0f} images/s  (f1 {result['f1']:.4f}, f1@5 {result['f1@5']:.4f}, "
        f"map {result['map']:.4f})"
    )

    m = min(args.naive_images, n)
    start = time.perf_counter()
    naive = naive_scores(y_true[:m], scores[:m])
    naive_seconds = time.perf_counter() - start
    check = metrics.evaluate(y_true[:m], scores[:m], metrics.top_k_mask(scores[:m], 5))
    assert abs(naive["f1"] - check["f1"]) < 1e-9 and abs(naive["map"] - check["map"]) < 1e-6
    print(
        f"naive per-image Python loop on {m:,} images: {naive_seconds:.2f} s, "
        f"{m / naive_seconds:,.0f} images/s (same results); "
        f"vectorised is {(n / seconds) / (m / naive_seconds):,.0f}x faster"
    )


if __name__ == "__main__":
    main()
