"""Models fitted in closed form or by counting: `popularity`, `knn` (a faiss index of every
training row, CSR labels), `ridge` (a linear probe), `kernel` (kernel ridge regression)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from hashtag import artifacts, neighbours
from hashtag.metrics import l2_normalize
from hashtag.models.base import (
    _SIMILARITY_CELLS,
    KERNEL_LAMBDAS,
    RIDGE_LAMBDAS,
    Blocks,
    ModelConfig,
    Recommender,
    csr_of,
    metric_value,
    register,
)


@register
class Popularity(Recommender):
    """Every image gets each hashtag's training frequency as its score."""

    name = "popularity"
    streams = True  # label counts, a block at a time
    reads_features = False

    def _fit(self, X, Y, X_val, Y_val, callbacks) -> None:
        if isinstance(X, Blocks):
            counts = np.zeros(X.n_tags, np.float64)
            for _, _, indices in X.read(None):
                counts += np.bincount(indices, minlength=X.n_tags)
            self.frequency = (counts / X.rows).astype(np.float32)
            return
        self.frequency = Y.mean(axis=0, dtype=np.float64).astype(np.float32)

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.frequency, (len(X), len(self.frequency))).copy()

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"frequency": self.frequency}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.frequency = arrays["frequency"].astype(np.float32)


@register
class Knn(Recommender):
    """Tags of the nearest training images, weighted by cosine similarity, plus a prior.

    The neighbours come from a faiss index over EVERY training row (neighbours.py: exact
    IndexFlatIP up to neighbours.EXACT_ROWS rows, IVF above; `knn_index` forces one); the
    training labels are kept as CSR (indptr, indices), never a dense N x V matrix. Trains on
    arrays or on `Blocks` (the index is built block by block). Saved: the index as
    `index.faiss` (memory-mapped on load) beside labels_indptr.npy, labels_indices.npy."""

    name = "knn"
    streams = True
    INDEX = "index.faiss"

    def _fit(self, X, Y, X_val, Y_val, callbacks) -> None:
        if isinstance(X, Blocks):
            labels: list[tuple[np.ndarray, np.ndarray]] = []

            def rows():
                for block, indptr, indices in X.read(None):
                    labels.append((indptr, indices))
                    yield block

            self.index = neighbours.build(
                rows(), n=X.rows, dim=X.dim, index_plan=self._plan(X.rows, X.dim)
            )
            self.labels_indptr, self.labels_indices = _concat_csr(labels)
        else:
            self.index = neighbours.build(X, index_plan=self._plan(len(X), X.shape[1]))
            self.labels_indptr, self.labels_indices = csr_of(Y)
        n = len(self.labels_indptr) - 1
        counts = np.bincount(self.labels_indices, minlength=self.n_tags)
        self.frequency = (counts / max(1, n)).astype(np.float32)

    def _plan(self, n: int, dim: int) -> neighbours.IndexPlan:
        kind = None if self.config.knn_index == "auto" else self.config.knn_index
        return neighbours.plan(n, dim, kind=kind)

    @property
    def rows(self) -> int:
        """Training rows the vote reads from (every one of them)."""
        return int(self.index.ntotal)

    def _scores(self, X: np.ndarray) -> np.ndarray:
        indices, sims = neighbours.search(self.index, X, self.config.knn_neighbours)
        missing = indices < 0  # an IVF probe that found fewer than k rows
        sims = np.where(missing, sims[:, :1], sims)
        if self.config.knn_temperature:
            # exp(t x similarity), shifted by the row's best for no overflow (ratios unchanged)
            weights = np.exp(self.config.knn_temperature * (sims - sims[:, :1]))
        else:
            weights = np.maximum(sims, 0.0) + 1e-6  # dissimilar neighbours still count a little
        weights[missing] = 0.0
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
        votes = np.empty((len(X), self.n_tags), np.float32)
        rows = max(1, _SIMILARITY_CELLS // max(1, self.n_tags))
        for start in range(0, len(X), rows):
            block = slice(start, start + rows)
            votes[block] = _sparse_votes(
                indices[block], weights[block], self.labels_indptr, self.labels_indices, self.n_tags
            )
        w = self.config.prior_weight
        return (1.0 - w) * votes + w * self.frequency

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "labels_indptr": self.labels_indptr,
            "labels_indices": self.labels_indices,
            "frequency": self.frequency,
        }

    def _save_files(self, uri: str) -> dict[str, dict[str, Any]]:
        return {self.INDEX: neighbours.write(self.index, uri, self.INDEX)}

    def _load_files(self, artifact: artifacts.Artifact, names: list[str]) -> None:
        if self.INDEX in names:
            self.index = neighbours.read(artifact, self.INDEX)

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        if "train_embeddings" in arrays:  # exported before the faiss index: dense arrays
            self.index = neighbours.build(
                arrays["train_embeddings"].astype(np.float32), index_plan=neighbours.plan(1, 1)
            )
            self.labels_indptr, self.labels_indices = csr_of(arrays["train_labels"].astype(bool))
        else:
            self.labels_indptr = arrays["labels_indptr"].astype(np.int64)
            self.labels_indices = arrays["labels_indices"].astype(np.int32)
        self.frequency = arrays["frequency"].astype(np.float32)
        index = getattr(self, "index", None)
        n = len(self.labels_indptr) - 1
        if index is None or int(index.ntotal) != n or int(index.d) != self.dim:
            raise ValueError(
                f"the index ({getattr(index, 'ntotal', 'no')} rows) does not match the {n} "
                f"label rows and dim {self.dim}"
            )
        indptr, indices = self.labels_indptr, self.labels_indices
        if (
            n < 0
            or indptr[0] != 0
            or indptr[-1] != len(indices)
            or bool(np.any(np.diff(indptr) < 0))
            or (len(indices) and (indices.min() < 0 or indices.max() >= self.n_tags))
            or self.frequency.shape != (self.n_tags,)
        ):
            raise ValueError("the labels are not a CSR matrix over the vocabulary")


def _concat_csr(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One CSR (indptr from 0, indices) of CSR blocks one after the other."""
    if not parts:
        return np.zeros(1, np.int64), np.zeros(0, np.int32)
    offsets = np.cumsum([0] + [int(p[-1]) for p, _ in parts[:-1]])
    indptr = np.concatenate(
        [np.zeros(1, np.int64)] + [p[1:] + o for (p, _), o in zip(parts, offsets, strict=True)]
    )
    return indptr.astype(np.int64), np.concatenate([i for _, i in parts]).astype(np.int32)


def _sparse_votes(
    neighbour_rows: np.ndarray,
    weights: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    n_tags: int,
) -> np.ndarray:
    """float32 (b, V): row i sums weights[i, j] over the tags of training row neighbour_rows[i, j]
    (CSR labels; rows -1 carry no tags)."""
    b, k = neighbour_rows.shape
    flat = np.maximum(neighbour_rows.ravel(), 0)
    starts = np.asarray(indptr[flat], np.int64)
    lengths = np.asarray(indptr[flat + 1], np.int64) - starts
    lengths[neighbour_rows.ravel() < 0] = 0
    ends = np.cumsum(lengths)
    positions = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(
        starts - ends + lengths, lengths
    )
    tags = np.asarray(indices[positions], np.int64)
    query = np.repeat(np.repeat(np.arange(b, dtype=np.int64), k), lengths)
    w = np.repeat(weights.ravel().astype(np.float64), lengths)
    return (
        np.bincount(query * n_tags + tags, weights=w, minlength=b * n_tags)
        .reshape(b, n_tags)
        .astype(np.float32)
    )


def _choose_penalty(
    solve: Callable[[float], np.ndarray],
    fixed: float,
    grid: Sequence[float],
    default: float,
    Y_val: np.ndarray | None,
    predict: Callable[[np.ndarray], np.ndarray],
) -> tuple[float, np.ndarray]:
    """(penalty, solve(penalty)): `fixed` when set (> 0), `default` without validation labels,
    else the best of `grid` by `metric_value` of predict(solution) on validation (one
    decomposition behind `solve` serves every penalty)."""
    if fixed or Y_val is None:
        return fixed or default, solve(fixed or default)
    best = None
    for penalty in grid:
        solution = solve(penalty)
        value = metric_value(Y_val, predict(solution))
        if best is None or value > best[0]:
            best = (value, penalty, solution)
    return best[1], best[2]


@register
class Ridge(Recommender):
    """Closed-form multi-output ridge regression of the 0/1 labels on the features (a linear
    probe): W = (X'X + lambda I)^-1 X'(Y - mean). Cheap and, on centred features, strong. With
    `ridge_lambda=0` the penalty is the best of RIDGE_LAMBDAS on validation (one
    eigendecomposition serves them all)."""

    name = "ridge"

    def _fit(self, X, Y, X_val, Y_val, callbacks) -> None:
        X64 = X.astype(np.float64)
        self.bias = Y.mean(axis=0, dtype=np.float64)
        targets = Y - self.bias
        dual = len(X) < X.shape[1]  # solve in the smaller of the two spaces
        values, vectors = np.linalg.eigh(X64 @ X64.T if dual else X64.T @ X64)
        values = np.maximum(values, 0.0)
        projected = vectors.T @ (targets if dual else X64.T @ targets)

        def solve(penalty: float) -> np.ndarray:
            coefficients = vectors @ (projected / (values + penalty)[:, None])
            return (X64.T @ coefficients if dual else coefficients).astype(np.float32)

        @functools.cache
        def val_features() -> np.ndarray:  # once for every penalty
            return self.features(X_val)

        def predict(weights: np.ndarray) -> np.ndarray:
            return val_features() @ weights + self.bias.astype(np.float32)

        self.penalty, self.weights = _choose_penalty(
            solve, self.config.ridge_lambda, RIDGE_LAMBDAS, 1.0, Y_val, predict
        )

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.weights + self.bias.astype(np.float32)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "bias": self.bias, "penalty": np.float64(self.penalty)}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights = arrays["weights"].astype(np.float32)
        self.bias = arrays["bias"].astype(np.float64)
        self.penalty = float(arrays["penalty"])

    def _refit_config(self) -> ModelConfig:
        return replace(self.config, ridge_lambda=self.penalty)


@register
class Kernel(Recommender):
    """Kernel ridge regression of the 0/1 labels with the kernel exp(t (x.y - 1)) on the unit
    features (a Gaussian kernel on the sphere, t = `kernel_temperature`): a smooth, learnt
    version of the kNN vote; on real photos it beats both kNN and the linear ridge. Up to
    `kernel_landmarks` training rows it is exact, alpha = (K + lambda I)^-1 (Y - mean); beyond, the
    Nystroem approximation on that many random rows L (the landmarks):
    alpha = (K_LX K_XL + lambda K_LL)^-1 K_LX (Y - mean), which is the exact one when L is every
    row. A new image scores k(x, L) alpha + mean. Saved: the landmarks (m x dim) and alpha
    (m x V). With `kernel_lambda=0` the penalty is the best of KERNEL_LAMBDAS on validation."""

    name = "kernel"

    def _kernel(self, X: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        similarity = l2_normalize(X[rows]) @ self.landmarks.T
        return np.exp(self.config.kernel_temperature * (similarity - 1.0))

    def _blocks(self, n: int) -> Iterator[slice]:
        rows = max(1, _SIMILARITY_CELLS // max(1, len(self.landmarks)))
        return (slice(start, start + rows) for start in range(0, n, rows))

    def _fit(self, X, Y, X_val, Y_val, callbacks) -> None:
        m = min(len(X), self.config.kernel_landmarks)
        rng = np.random.default_rng(self.config.seed)
        chosen = np.sort(rng.choice(len(X), m, replace=False)) if m < len(X) else slice(None)
        self.landmarks = l2_normalize(X[chosen])
        self.bias = Y.mean(axis=0, dtype=np.float64)
        gram = np.zeros((m, m), np.float64)  # K_LX K_XL, a block of rows at a time
        right = np.zeros((m, Y.shape[1]), np.float64)  # K_LX (Y - mean)
        for rows in self._blocks(len(X)):
            K = self._kernel(X, rows)
            gram += K.T @ K
            right += K.T @ (Y[rows] - self.bias)
        values, vectors = np.linalg.eigh(self._kernel(self.landmarks).astype(np.float64))
        kept = values > values[-1] * 1e-9  # K_LL's numerically null directions carry nothing
        whiten = vectors[:, kept] / np.sqrt(values[kept])  # W' K_LL W = I
        spectrum, rotation = np.linalg.eigh(whiten.T @ gram @ whiten)
        basis = whiten @ rotation  # alpha(lambda) = basis diag(1 / (spectrum + lambda)) projected
        projected = basis.T @ right

        def solve(penalty: float) -> np.ndarray:
            scale = 1.0 / np.maximum(spectrum + penalty, 1e-12)
            return (basis @ (projected * scale[:, None])).astype(np.float32)

        @functools.cache
        def val_kernel() -> np.ndarray:  # once for every penalty
            features = self.features(X_val)
            return np.concatenate([self._kernel(features, r) for r in self._blocks(len(features))])

        def predict(alpha: np.ndarray) -> np.ndarray:
            return val_kernel() @ alpha + self.bias.astype(np.float32)

        self.penalty, self.alpha = _choose_penalty(
            solve, self.config.kernel_lambda, KERNEL_LAMBDAS, 0.1, Y_val, predict
        )

    def _refit_config(self) -> ModelConfig:
        return replace(self.config, kernel_lambda=self.penalty)

    def _scores(self, X: np.ndarray) -> np.ndarray:
        scores = np.empty((len(X), self.n_tags), np.float32)
        for rows in self._blocks(len(X)):
            scores[rows] = self._kernel(X, rows) @ self.alpha + self.bias.astype(np.float32)
        return scores

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "landmarks": self.landmarks,
            "alpha": self.alpha,
            "bias": self.bias,
            "penalty": np.float64(self.penalty),
        }

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.landmarks = arrays["landmarks"].astype(np.float32)
        self.alpha = arrays["alpha"].astype(np.float32)
        self.bias = arrays["bias"].astype(np.float64)
        self.penalty = float(arrays["penalty"])
        if (
            self.landmarks.shape != (len(self.alpha), self.dim)
            or self.alpha.shape[1] != self.n_tags
        ):
            raise ValueError(
                f"landmarks {self.landmarks.shape} and alpha {self.alpha.shape} do not fit "
                f"dim {self.dim} and {self.n_tags} tags"
            )
