"""Vectorised multi-label metrics: micro F1/P/R, P@k, R@k, F1@k, hit rate, mAP.

Conventions (arrays of n images x V hashtags):
- `y_true`, `y_pred`: bool (n, V); `scores`: float (n, V), higher = more likely.
- micro F1/P/R pool the true/false positives of every image first, as the original project did
  (TP / (TP + (FP + FN) / 2)); a metric whose denominator is 0 is 0.
- The @k metrics take each image's k highest-scoring tags and average a per-image value over the
  images that have at least one true tag (an image without tags can't be recommended for):
    p@k = hits / k;  r@k = hits / |true|;  f1@k = 2 hits / (k + |true|), the F1 of that image's
    P@k and R@k;  hit@k = 1 if hits >= 1.
  Ties are broken by the tag index (lower first), so the results are deterministic.
- map: mean over images with at least one true tag of the average precision of the full ranking.

Everything works on blocks of rows so 100,000 x 1,000 scores need no more than a few hundred MB
of temporaries, and no Python loop runs over images.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

DEFAULT_KS = (1, 3, 5, 10)
# Rows per block: 4096 x 1000 float64 temporaries are ~33 MB each.
_BLOCK_ROWS = 4096


def _check(y_true: np.ndarray, other: np.ndarray, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    other = np.asarray(other)
    if y_true.ndim != 2:
        raise ValueError(f"y_true must be 2-D (images, tags), got shape {y_true.shape}")
    if other.shape != y_true.shape:
        raise ValueError(
            f"{other_name} has shape {other.shape} but y_true has {y_true.shape}: "
            "pass one row per image and one column per hashtag in both"
        )
    return y_true.astype(bool, copy=False), other


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def micro_prf(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Micro-averaged F1, precision and recall of bool predictions (the original's metric)."""
    y_true, y_pred = _check(y_true, y_pred, "y_pred")
    y_pred = y_pred.astype(bool, copy=False)
    tp = int(np.count_nonzero(y_true & y_pred))
    fp = int(np.count_nonzero(y_pred)) - tp
    fn = int(np.count_nonzero(y_true)) - tp
    return {
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of each row's k highest scores, best first (ties: lower index)."""
    scores = np.asarray(scores)
    n, v = scores.shape
    k = min(int(k), v)
    if k <= 0:
        return np.zeros((n, 0), np.int64)
    # argpartition finds the k best in O(V) per row, then only those k are sorted.
    part = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
    values = np.take_along_axis(scores, part, axis=1)
    best = np.take_along_axis(part, np.argsort(-values, axis=1, kind="stable"), axis=1)
    # argpartition picks arbitrary members of a tie at the k-th score: redo those rows with a
    # full stable sort so ties always go to the lower index.
    tied = np.count_nonzero(scores >= values.min(axis=1, keepdims=True), axis=1) > k
    if tied.any():
        best[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
    return best


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool (n, V): True at each row's k highest scores."""
    scores = np.asarray(scores)
    mask = np.zeros(scores.shape, bool)
    for start in range(0, scores.shape[0], _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        np.put_along_axis(mask[rows], top_k_indices(scores[rows], k), True, axis=1)
    return mask


def at_k(
    y_true: np.ndarray, scores: np.ndarray, ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """p@k, r@k, f1@k and hit@k for each k, averaged over images with >= 1 true tag."""
    y_true, scores = _check(y_true, scores, "scores")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    n, v = y_true.shape
    k_max = min(ks[-1], v)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("p", "r", "f1", "hit")}
    counted = 0
    for start in range(0, n, _BLOCK_ROWS):
        truth = y_true[start : start + _BLOCK_ROWS]
        n_true = truth.sum(axis=1)
        keep = n_true > 0
        if not keep.any():
            continue
        truth, n_true = truth[keep], n_true[keep]
        idx = top_k_indices(np.asarray(scores[start : start + _BLOCK_ROWS])[keep], k_max)
        # hits[:, j] = number of true tags among the j+1 best-scored.
        hits = np.cumsum(np.take_along_axis(truth, idx, axis=1), axis=1)
        counted += len(n_true)
        for k in ks:
            h = hits[:, min(k, k_max) - 1].astype(np.float64)
            sums[f"p@{k}"] += float(np.sum(h / k))
            sums[f"r@{k}"] += float(np.sum(h / n_true))
            sums[f"f1@{k}"] += float(np.sum(2.0 * h / (k + n_true)))
            sums[f"hit@{k}"] += float(np.count_nonzero(h))
    return {key: _ratio(total, counted) for key, total in sums.items()}


def _descending_keys(scores: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is (row, score descending, column ascending).

    Sorting these flat keys ranks every row at once, as a stable argsort of -scores would, at
    a fraction of the cost (no index indirection). Layout: 12 bits row | 32 bits score | 20
    bits column, so at most 4096 rows and 2**20 tags; scores are compared as float32.
    """
    n, v = scores.shape
    # + 0.0 turns -0.0 into 0.0, which must tie with it.
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    # IEEE floats sort like integers once negatives are flipped and positives get the sign bit;
    # a final flip makes higher scores come first.
    flip = (bits >> np.uint32(31)) * np.uint32(0xFFFFFFFF) | np.uint32(0x80000000)
    descending = (~(bits ^ flip)).astype(np.uint64)
    rows = np.arange(n, dtype=np.uint64)[:, None] << np.uint64(52)
    columns = np.arange(v, dtype=np.uint64)[None, :]
    return rows | (descending << np.uint64(20)) | columns


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """mAP over the images with at least one true tag (ranking of all V tags, ties by index)."""
    y_true, scores = _check(y_true, scores, "scores")
    n, v = y_true.shape
    if v >= 2**20:
        raise ValueError(f"mean_average_precision supports up to 2**20 tags, got {v}")
    total, counted = 0.0, 0
    for start in range(0, n, _BLOCK_ROWS):
        truth = y_true[start : start + _BLOCK_ROWS]
        keys = _descending_keys(np.asarray(scores[start : start + _BLOCK_ROWS]))
        rows, _ = np.nonzero(truth)
        if rows.size == 0:
            continue
        # Rank (1-based) of each true tag within its row, then order the true tags by rank.
        true_keys = np.sort(keys[truth])
        rows = (true_keys >> np.uint64(52)).astype(np.int64)
        keys.sort(axis=1)  # rows stay in order, so the flat array is sorted too
        ranks = np.searchsorted(keys.ravel(), true_keys) - rows * v + 1
        n_true = np.bincount(rows, minlength=len(truth))
        first = np.concatenate([[0], np.cumsum(n_true)[:-1]])
        found = np.arange(len(rows)) - first[rows] + 1  # true tags ranked at or above this one
        precision_sums = np.bincount(rows, weights=found / ranks, minlength=len(truth))
        keep = n_true > 0
        total += float(np.sum(precision_sums[keep] / n_true[keep]))
        counted += int(np.count_nonzero(keep))
    return _ratio(total, counted)


def evaluate(
    y_true: np.ndarray,
    scores: np.ndarray,
    y_pred: np.ndarray | None = None,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Every metric in one flat dict: f1, precision, recall (when y_pred is given), p@k, r@k,
    f1@k, hit@k for each k, and map."""
    result: dict[str, float] = {}
    if y_pred is not None:
        result.update(micro_prf(y_true, y_pred))
    result.update(at_k(y_true, scores, ks))
    result["map"] = mean_average_precision(y_true, scores)
    return result


def evaluate_blocks(
    blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """`evaluate` over (y_true, scores, y_pred) blocks of rows, as if on their concatenation
    (up to float rounding): for data whose scores do not fit in memory at once."""
    ks = tuple(ks)
    tp = predicted = true = counted = 0
    sums: dict[str, float] = {}
    for y_true, scores, y_pred in blocks:
        y_true, y_pred = _check(y_true, y_pred, "y_pred")
        tp += int(np.count_nonzero(y_true & y_pred))
        predicted += int(np.count_nonzero(y_pred))
        true += int(np.count_nonzero(y_true))
        n = int(np.count_nonzero(y_true.any(axis=1)))  # the rows the ranking metrics average
        block = at_k(y_true, scores, ks)
        block["map"] = mean_average_precision(y_true, scores)
        for key, value in block.items():
            sums[key] = sums.get(key, 0.0) + value * n
        counted += n
    result = {
        "f1": _ratio(2 * tp, predicted + true),
        "precision": _ratio(tp, predicted),
        "recall": _ratio(tp, true),
    }
    result.update({key: _ratio(total, counted) for key, total in sums.items()})
    return result


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm, as float32 (a zero row stays zero): what cosine
    similarity needs, shared by the embedders and the models."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
