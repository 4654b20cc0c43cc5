"""Hashtag recommenders: image embeddings (n, dim) in, hashtag scores (n, V) out.

    model = models.create("mlp", ModelConfig(batch_size=64, learning_rate=1e-3))
    model.fit(X_train, Y_train, X_val, Y_val, vocab=tags)   # Y: bool (n, V)
    scores = model.predict_scores(X_test)                   # float32 (n, V)
    tags = model.predict(X_test)                            # bool (n, V): the decision rule
    model.score(X_test, Y_test)                             # metrics.evaluate(...)
    model.save(uri, metadata={"embedder": spec}); models.load(uri)

Models (`available()`):
- popularity: every image gets the training frequency of each hashtag.
- seed: the original project (github.com/GarlandZhang/cs486_project) reimplemented: image and
  hashtag embedding tables with biases, sigmoid(image . hashtag + biases) trained with binary
  cross-entropy on every (image, hashtag) cell of the training matrix (missing pairs are
  negatives). A new image gets the mean latent vector - and, our choice, the mean bias - of its
  `neighbours` nearest training images by cosine similarity of the embeddings; tags with
  p >= 0.5 are recommended. (The original added the biases but then applied the sigmoid to
  the raw dot product; we use the biases.)
- knn: tag transfer: a similarity-weighted vote of the tags of the `knn_neighbours` nearest
  training images, blended with the popularity prior (`prior_weight`).
- mlp: Dense(hidden, relu) + dropout + Dense(V) on the embedding, scaled to unit-size features
  (x sqrt(dim): embeddings are L2-normalised); `loss="sigmoid"` (binary cross-entropy per tag)
  or `"softmax"` (softmax over tags, target 1/m for each of a post's m tags).

Trained models run on TensorFlow (imported only when training); every model predicts with numpy
from plain arrays, so loading a saved model needs neither TensorFlow nor the training data.

The decision rule (`Decision`: top-k or a score threshold) is chosen on validation data by
`choose_decision`, never on test data; without validation data it is top-`k`. The seed model
keeps the original's fixed threshold 0.5.

Trainable models call `callbacks` (objects with `on_epoch_end(epoch, logs)`; returning True
stops training) after each epoch with the training loss and validation metrics ("val_f1",
"val_p@5", "val_map", ...), which also go to `history`. To resume from a checkpoint, `save` the
model (or keep `get_state()`), later `load` it (or `set_state`) and call
`fit(..., resume=True)`: training continues from `epochs_done` up to `config.epochs`, with the
optimizer's state restored.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from hashtag import artifacts, metrics, neighbours, storage, tfimport
from hashtag.dataset import array_blocks, csr_rows, dense_labels
from hashtag.embedders import l2_normalize

FORMAT = "hashtag-model"
VERSION = 1
_FIX = "retrain and export the model again (`hashtag tune`)"
MAX_TAGS = 10_000_000  # more tags, or wider embeddings, are a tampered manifest
MAX_DIM = 1 << 16
TRAINABLE = {"seed", "mlp"}
# Ridge penalties tried on validation (ridge_lambda=0), and the metric that picks them and a
# blend's weights when the caller names none.
RIDGE_LAMBDAS = (0.3, 1.0, 3.0, 10.0)
KERNEL_LAMBDAS = (0.03, 0.1, 0.3, 1.0)
MAX_LANDMARKS = 16_384  # the kernel's m x m float64 matrices: 2 GB each at this size
SELECT_METRIC = "f1@5"
_MAX_PARTS = 16  # models in one blend, at most
LOSSES = ("sigmoid", "softmax")
THREADS_ENV = "HASHTAG_TF_THREADS"
# Similarity blocks: queries x training images float32 of at most 2**26 cells (256 MB).
_SIMILARITY_CELLS = 2**26


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ModelConfig:
    batch_size: int = field(default=64, metadata=_help("training batch size"))
    learning_rate: float = field(default=1e-3, metadata=_help("Adam learning rate"))
    epochs: int = field(default=20, metadata=_help("training epochs"))
    k: int = field(default=5, metadata=_help("tags per image when there is no validation data"))
    neighbours: int = field(default=3, metadata=_help("seed: neighbours for a new image"))
    latent_dim: int = field(default=1000, metadata=_help("seed: latent vector size"))
    hidden: int = field(default=512, metadata=_help("mlp: hidden units"))
    loss: str = field(default="sigmoid", metadata=_help("mlp: 'sigmoid' or 'softmax'"))
    prior_weight: float = field(default=0.1, metadata=_help("knn: weight of the popularity prior"))
    seed: int = field(default=0, metadata=_help("random seed"))
    knn_neighbours: int = field(default=15, metadata=_help("knn: neighbours that vote"))
    dropout: float = field(default=0.5, metadata=_help("mlp: dropout rate"))
    knn_index: str = field(
        default="auto",
        metadata=_help(
            "knn: the faiss index: auto (exact up to 100,000 rows, IVF above), flat, ivf-flat, "
            "ivf-sq8, ivf-pq"
        ),
    )
    knn_temperature: float = field(
        default=0.0,
        metadata=_help("knn: neighbour weights exp(t x similarity); 0: the similarity itself"),
    )
    ridge_lambda: float = field(
        default=0.0,
        metadata=_help(f"ridge: L2 penalty; 0: the best of {RIDGE_LAMBDAS} on validation"),
    )
    kernel_temperature: float = field(
        default=2.0, metadata=_help("kernel: the kernel exp(t x (cosine similarity - 1))")
    )
    kernel_lambda: float = field(
        default=0.0,
        metadata=_help(f"kernel: L2 penalty; 0: the best of {KERNEL_LAMBDAS} on validation"),
    )
    kernel_landmarks: int = field(
        default=4096,
        metadata=_help("kernel: training rows the kernel is taken on (Nystroem beyond them)"),
    )
    centre: bool = field(
        default=False,
        metadata=_help("subtract the training mean of each embedding block, then L2-normalise it"),
    )
    blocks: tuple[int, ...] = field(
        default=(),
        metadata=_help("dims of the embedders whose outputs are concatenated; (): one embedder"),
    )
    threads: int = field(
        default=0, metadata=_help(f"TensorFlow threads; 0: ${THREADS_ENV} or TF's default")
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "k", "neighbours", "latent_dim", "hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.knn_neighbours < 1:
            raise ValueError(f"knn_neighbours must be >= 1, got {self.knn_neighbours}")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.knn_index != "auto" and self.knn_index not in neighbours.KINDS:
            raise ValueError(
                f"knn_index must be auto or one of {neighbours.KINDS}, got {self.knn_index!r}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.prior_weight <= 1.0:
            raise ValueError(f"prior_weight must be in [0, 1], got {self.prior_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = default), got {self.threads}")
        if min(self.knn_temperature, self.ridge_lambda, self.kernel_lambda) < 0:
            raise ValueError("knn_temperature, ridge_lambda and kernel_lambda must be >= 0")
        if not (np.isfinite(self.kernel_temperature) and 0 < self.kernel_temperature <= 100):
            raise ValueError(
                f"kernel_temperature must be in (0, 100], got {self.kernel_temperature}"
            )
        if not 1 <= self.kernel_landmarks <= MAX_LANDMARKS:
            raise ValueError(
                f"kernel_landmarks must be in 1..{MAX_LANDMARKS} (its square, in float64, is "
                f"the kernel's memory), got {self.kernel_landmarks}"
            )
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))  # JSON: a list
        if any(b < 1 for b in self.blocks):
            raise ValueError(f"blocks must be positive dims, got {self.blocks}")


# ----------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class Blocks:
    """Training rows given block by block instead of as one (n, dim) + (n, V) pair, so that a
    trial's memory does not grow with n. `read(order)` yields (X float32 (b, dim), labels indptr
    (b+1,) from 0, label indices); with a Generator `order` the rows come shuffled (a new order
    each epoch). `dataset.array_blocks` (arrays in memory, e.g. read-only views of Ray's object
    store) and `Dataset.blocks` (the dataset's part files) make them. Labels stay sparse until
    a batch needs them dense."""

    read: Callable[
        [np.random.Generator | None], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ]
    rows: int
    dim: int
    n_tags: int
    # A blend's parts that train on arrays (not Blocks) read at most this many first rows (a
    # random sample when rows are in post-id-hash order); None: every row.
    array_rows: int | None = None

    def in_memory(self) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y dense bool) of the first `array_rows` rows (all when None), in row order."""
        Xs, Ys, left = [], [], self.rows if self.array_rows is None else self.array_rows
        for X, indptr, indices in self.read(None):
            if left <= 0:
                break
            X, indptr = X[:left], indptr[: left + 1]
            Xs.append(X)
            Ys.append(dense_labels(indptr, indices[: int(indptr[-1])], self.n_tags))
            left -= len(X)
        return np.concatenate(Xs), np.concatenate(Ys)


def csr_of(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of a dense bool (n, V) label matrix."""
    rows, columns = np.nonzero(Y)
    indptr = np.zeros(len(Y) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(Y)), out=indptr[1:])
    return indptr, columns.astype(np.int32)


# ----------------------------------------------------------------------------- decision rule


@dataclass(frozen=True)
class Decision:
    """How scores become tags: the `value` best per image ("top_k") or scores >= `value`."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("top_k", "threshold"):
            raise ValueError(f"Decision kind must be 'top_k' or 'threshold', got {self.kind!r}")
        if self.kind == "top_k" and (self.value < 1 or self.value != int(self.value)):
            raise ValueError(f"a top_k decision needs an integer value >= 1, got {self.value}")

    def apply(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores)
        if self.kind == "top_k":
            return metrics.top_k_mask(scores, int(self.value))
        return scores >= self.value


def choose_decision(
    y_val: np.ndarray,
    val_scores: np.ndarray,
    *,
    ks: Iterable[int] = range(1, 11),
    thresholds: Sequence[float] | None = None,
) -> Decision:
    """The top-k or threshold rule with the best micro F1 on validation data (ties: top-k, then
    smaller k / higher threshold). Default thresholds: 64 quantiles of the validation scores."""
    y_val, val_scores = metrics._check(y_val, val_scores, "val_scores")
    val_scores = np.asarray(val_scores, np.float64)
    n_true = int(np.count_nonzero(y_val))
    n, v = y_val.shape
    best: tuple[float, Decision] = (-1.0, Decision("top_k", 1))

    ks = sorted({min(int(k), v) for k in ks if int(k) >= 1})
    if ks:
        # hits[:, j] = true tags among each image's j+1 best: one partial sort serves every k.
        idx = metrics.top_k_indices(val_scores, ks[-1])
        tp_at = np.cumsum(np.take_along_axis(y_val, idx, axis=1), axis=1).sum(axis=0)
        for k in ks:
            f1 = 2.0 * tp_at[k - 1] / (n * k + n_true) if n * k + n_true else 0.0
            if f1 > best[0]:
                best = (f1, Decision("top_k", k))

    flat = val_scores.ravel()
    finite = flat[np.isfinite(flat)]
    if thresholds is None:
        thresholds = np.quantile(finite, np.linspace(0.5, 0.999, 64)) if finite.size else []
    thresholds = np.unique(np.asarray(thresholds, np.float64))[::-1]
    if thresholds.size:
        # Sort the cells once; the TP/predicted counts at any threshold are then a searchsorted.
        order = np.argsort(-flat, kind="stable")
        sorted_scores = -flat[order]
        tp_cum = np.concatenate([[0], np.cumsum(y_val.ravel()[order])])
        predicted = np.searchsorted(sorted_scores, -thresholds, side="right")
        tp = tp_cum[predicted]
        f1s = 2.0 * tp / np.maximum(predicted + n_true, 1)
        i = int(np.argmax(f1s))
        if f1s[i] > best[0]:
            best = (float(f1s[i]), Decision("threshold", float(thresholds[i])))
    return best[1]


# ----------------------------------------------------------------------------- helpers


def _as_features(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (images, embedding dim), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values: clean the embeddings first")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} has embedding dim {x.shape[1]} but the model was trained on {dim}: "
            "use the embedder the model was trained with"
        )
    return x


def _as_labels(y: Any, name: str, n: int, n_tags: int | None = None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"{name} must be 2-D bool (images, hashtags), got shape {y.shape}")
    if y.dtype != bool:
        if not (np.issubdtype(y.dtype, np.number) and np.isin(y, (0, 1)).all()):
            raise ValueError(f"{name} must be bool or 0/1, got dtype {y.dtype} with other values")
        y = y.astype(bool)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} rows but the embeddings have {n}: one per image")
    if n_tags is not None and y.shape[1] != n_tags:
        raise ValueError(f"{name} has {y.shape[1]} hashtag columns, the training labels {n_tags}")
    return y


def nearest_neighbours(
    queries: np.ndarray, base: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities), each (n_queries, k), best first; rows of `base` must be
    L2-normalised. Works in blocks of queries, so 100k x 100k never sits in memory at once."""
    queries = l2_normalize(queries)
    k = min(k, base.shape[0])
    rows = max(1, min(4096, _SIMILARITY_CELLS // max(1, base.shape[0])))
    indices = np.empty((len(queries), k), np.int64)
    sims = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), rows):
        block = queries[start : start + rows] @ base.T
        idx = metrics.top_k_indices(block, k)
        indices[start : start + rows] = idx
        sims[start : start + rows] = np.take_along_axis(block, idx, axis=1)
    return indices, sims


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # no overflow warnings


def _tensorflow(threads: int = 0):
    """Import TensorFlow, with `threads` (or $HASHTAG_TF_THREADS) intra/inter-op threads."""
    threads = threads or int(os.environ.get(THREADS_ENV, "0") or 0)
    tf = tfimport.tensorflow()
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        except RuntimeError:
            pass  # TF already started in this process: its thread pools can't change
    return tf


# ----------------------------------------------------------------------------- base class


class Recommender:
    """Base class; subclasses implement `_fit`, `_scores`, `_arrays` and `_restore`."""

    name = ""
    trainable = False
    streams = False  # fit accepts Blocks (data larger than memory)
    reads_features = True  # False: fit needs the labels only (Blocks without embeddings)
    fixed_decision: Decision | None = None

    def __init__(self, config: ModelConfig | None = None) -> None:
        if config is not None and not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config or ModelConfig()
        self.vocab: list[str] | None = None
        self.decision = self.fixed_decision or Decision("top_k", self.config.k)
        self.history: dict[str, list[float]] = {}
        self.metadata: dict[str, Any] = {}
        self.n_tags: int | None = None
        self.dim: int | None = None
        self.epochs_done = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # -- training

    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        X_val: np.ndarray | None = None,
        Y_val: np.ndarray | None = None,
        callbacks: Iterable[Any] = (),
        *,
        vocab: Sequence[str] | None = None,
        resume: bool = False,
    ) -> Recommender:
        """Train on embeddings X (n, dim) and bool labels Y (n, V), or on `Blocks` (X) with
        Y=None (models with `streams`); choose the decision rule on (X_val, Y_val) when given.
        `resume=True` continues a loaded/restored model's training."""
        if isinstance(X, Blocks):
            if not self.streams or Y is not None:
                raise ValueError(f"{self.name} trains on arrays (X, Y), not on Blocks with Y")
            shape = (X.rows, X.dim, X.n_tags)
        else:
            X = _as_features(X, "X", self.dim if resume else None)
            Y = _as_labels(Y, "Y", len(X), self.n_tags if resume else None)
            shape = (len(X), X.shape[1], Y.shape[1])
        if resume and (shape[1], shape[2]) != (self.dim, self.n_tags):
            raise ValueError(
                f"the training data has dim {shape[1]} and {shape[2]} tags, the model "
                f"{self.dim} and {self.n_tags}: resume on the data it was trained on"
            )
        if shape[0] == 0:
            raise ValueError("X is empty: fit needs at least one training image")
        if (X_val is None) != (Y_val is None):
            raise ValueError("pass both X_val and Y_val, or neither")
        if X_val is not None:
            X_val = _as_features(X_val, "X_val", shape[1])
            Y_val = _as_labels(Y_val, "Y_val", len(X_val), shape[2])
        if vocab is not None:
            if len(vocab) != shape[2]:
                raise ValueError(f"vocab has {len(vocab)} tags but Y has {shape[2]} columns")
            self.vocab = [str(t) for t in vocab]
        for callback in callbacks:
            if not callable(getattr(callback, "on_epoch_end", None)):
                raise TypeError(f"callback {callback!r} has no on_epoch_end(epoch, logs) method")
        if not resume:
            self.history, self.epochs_done = {}, 0
        self.dim, self.n_tags = shape[1], shape[2]
        if not resume:
            self._fit_features(X)
        callbacks = list(callbacks)
        self._fit(self._featured(X), Y, X_val, Y_val, callbacks)
        if not self.trainable:  # one "epoch", so Tune treats every model alike
            self._end_epoch(0, {}, X_val, Y_val, callbacks)
        return self

    # -- features: what the model reads (centred blocks), learnt on the training rows

    def _fit_features(self, X: np.ndarray | Blocks) -> None:
        blocks = self.config.blocks or (self.dim,)
        if sum(blocks) != self.dim:
            raise ValueError(
                f"the embedding blocks {blocks} add up to {sum(blocks)}, not the embedding dim "
                f"{self.dim}: pass the dims of the embedders the features came from"
            )
        if not self.config.centre:
            return
        if isinstance(X, Blocks):  # one pass over the blocks, in float64
            total = np.zeros(self.dim, np.float64)
            for rows, _, _ in X.read(None):
                total += rows.sum(axis=0, dtype=np.float64)
            self.feature_mean = (total / X.rows).astype(np.float32)
        else:
            self.feature_mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)

    def _featured(self, X: np.ndarray | Blocks) -> np.ndarray | Blocks:
        """`features` of the training data, arrays or Blocks (each block as it is read)."""
        if not isinstance(X, Blocks):
            return self.features(X)
        if not self.config.centre and len(self.config.blocks) <= 1:
            return X

        def read(order):
            for rows, indptr, indices in X.read(order):
                yield self.features(rows), indptr, indices

        return Blocks(read, X.rows, X.dim, X.n_tags)

    def features(self, X: np.ndarray) -> np.ndarray:
        """Each block (one embedder's part) centred on the training mean when `centre`, then
        L2-normalised; blocks weigh alike (the whole row has unit norm)."""
        if not self.config.centre and len(self.config.blocks) <= 1:
            return X
        ends = np.cumsum(self.config.blocks or (X.shape[1],))[:-1]
        mean = self.feature_mean if self.config.centre else np.zeros(X.shape[1], np.float32)
        parts = [l2_normalize(p) for p in np.split(X - mean, ends, axis=1)]
        return np.concatenate(parts, axis=1) / np.float32(np.sqrt(len(parts)))

    def _end_epoch(
        self,
        epoch: int,
        logs: dict[str, float],
        X_val: np.ndarray | None,
        Y_val: np.ndarray | None,
        callbacks: list[Any],
    ) -> bool:
        """Add validation metrics to `logs`, record history, call callbacks; True = stop."""
        logs = {key: float(value) for key, value in logs.items()}
        if X_val is not None:
            scores = self.predict_scores(X_val)
            if self.fixed_decision is None:
                self.decision = choose_decision(Y_val, scores)
            val = metrics.evaluate(Y_val, scores, self.decision.apply(scores))
            logs.update({f"val_{key}": value for key, value in val.items()})
        logs["epoch"] = float(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        stop = False
        for callback in callbacks:
            stop = bool(callback.on_epoch_end(epoch, dict(logs))) or stop
        return stop

    def _fit(self, X, Y, X_val, Y_val, callbacks) -> None:
        raise NotImplementedError

    # -- prediction

    def _refit_config(self) -> ModelConfig:
        """The settings a refit trains with: what was chosen on validation stays chosen."""
        return self.config

    def _check_fitted(self) -> None:
        if self.n_tags is None:
            raise RuntimeError(f"this {self.name} model is not fitted: call fit(...) or load(uri)")

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """float32 (n, V): higher = more likely."""
        self._check_fitted()
        X = _as_features(X, "X", self.dim)
        return np.asarray(self._scores(self.features(X)), np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """bool (n, V): the tags the decision rule recommends."""
        return self.decision.apply(self.predict_scores(X))

    def score(self, X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
        """metrics.evaluate on (X, Y) at this model's decision rule."""
        scores = self.predict_scores(X)
        Y = _as_labels(Y, "Y", len(scores), self.n_tags)
        return metrics.evaluate(Y, scores, self.decision.apply(scores))

    def score_blocks(
        self, blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> dict[str, float]:
        """`score` over (X, labels indptr, indices) blocks of rows (`Dataset.blocks`), one
        block's scores in memory at a time; equal to `score` on the whole (up to rounding)."""

        def scored():
            for X, indptr, indices in blocks:
                scores = self.predict_scores(X)
                yield (
                    dense_labels(indptr, indices, self.n_tags),
                    scores,
                    self.decision.apply(scores),
                )

        return metrics.evaluate_blocks(scored())

    def _scores(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- state and storage

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def get_state(self) -> dict[str, Any]:
        """Everything `set_state` needs to continue: arrays (weights, optimizer) and counters."""
        self._check_fitted()
        return {
            "arrays": {name: np.array(a) for name, a in self._all_arrays().items()},
            "epochs_done": self.epochs_done,
            "decision": asdict(self.decision),
            "history": {key: list(values) for key, values in self.history.items()},
            "n_tags": self.n_tags,
            "dim": self.dim,
        }

    def _all_arrays(self) -> dict[str, np.ndarray]:
        arrays = dict(self._arrays())
        if self.config.centre:
            arrays["feature_mean"] = self.feature_mean
        return arrays

    def set_state(self, state: dict[str, Any]) -> Recommender:
        arrays = dict(state["arrays"])
        if self.config.centre:
            self.feature_mean = arrays.pop("feature_mean").astype(np.float32)
        self.n_tags, self.dim = int(state["n_tags"]), int(state["dim"])  # _restore checks them
        self._restore(arrays)
        self.epochs_done = int(state["epochs_done"])
        self.decision = Decision(**state["decision"])
        self.history = {key: list(values) for key, values in state["history"].items()}
        return self

    def save(self, uri: str, metadata: dict[str, Any] | None = None) -> None:
        """A folder: one .npy per array, manifest.json (written last) with the rest.
        `metadata` (e.g. {"embedder": spec}) is stored as the manifest's "extra"."""
        state = self.get_state()
        if metadata is not None:
            self.metadata = dict(metadata)
        artifacts.remove_manifest(uri)
        arrays = state.pop("arrays")
        files = {
            f"{name}.npy": artifacts.write_array(uri, f"{name}.npy", array)
            for name, array in arrays.items()
        }
        data_files = self._save_files(uri)
        files.update(data_files)
        self._save_parts(uri)
        artifacts.write_manifest(
            uri,
            FORMAT,
            VERSION,
            files,
            data_files=sorted(data_files),
            model=self.name,
            config=asdict(self.config),
            vocab=self.vocab,
            arrays=sorted(arrays),
            extra=self.metadata,
            **state,
        )

    def _save_files(self, uri: str) -> dict[str, dict[str, Any]]:
        """Hook: data files other than .npy arrays (a faiss index), written into `uri`; returns
        their manifest entries."""
        return {}

    def _load_files(self, artifact: artifacts.Artifact, names: list[str]) -> None:
        """Hook: the counterpart of `_save_files` (each file's sha256 is checked first)."""

    def _save_parts(self, uri: str) -> None:
        """Hook: models made of models (a blend) save them beside their own arrays."""

    def _load_parts(self, uri: str) -> None:
        """Hook: the counterpart of `_save_parts`."""


def load(uri: str, check_extra: Callable[[str, Any], Any] | None = None) -> Recommender:
    """Load a model folder written by `Recommender.save`; ArtifactError if it is missing,
    foreign or damaged (names outside the folder, wrong shapes, a vocabulary of another size).
    `check_extra(uri, metadata)` checks the saved metadata before any array is read."""
    artifact = artifacts.read(uri, FORMAT, VERSION, what="model", fix=_FIX)
    manifest = artifact.manifest
    if check_extra is not None:
        check_extra(artifact.uri, manifest.get("extra") or {})
    names = manifest.get("arrays")
    if not isinstance(names, list) or manifest.get("model") not in _REGISTRY:
        raise artifact.error(
            f"its manifest names no known model ({str(manifest.get('model'))[:40]})"
        )
    n_tags = artifact.int_field("n_tags", low=1, high=MAX_TAGS)
    # dim 0: a popularity model from label-only posts (tune exports it with completion).
    dim = artifact.int_field("dim", low=0, high=MAX_DIM)
    vocab = manifest.get("vocab")
    if vocab is not None and (
        not isinstance(vocab, list)
        or len(vocab) != n_tags
        or not all(isinstance(t, str) for t in vocab)
    ):
        raise artifact.error(f"its vocabulary is not a list of {n_tags} tags")
    data_files = manifest.get("data_files") or []
    if not isinstance(data_files, list):
        raise artifact.error("its manifest's 'data_files' is not a list")
    for name in names:
        artifacts.check_name(artifact.uri, f"{name}.npy" if isinstance(name, str) else name, _FIX)
    for name in data_files:
        artifacts.check_name(artifact.uri, name, _FIX)
    if artifact.files and set(artifact.files) != {f"{name}.npy" for name in names} | set(
        data_files
    ):
        raise artifact.error("its 'arrays', 'data_files' and 'files' do not match")
    try:
        # seed_sigmoid_bug, a retired setting, is in older manifests (its biases were zeros).
        settings = {k: v for k, v in manifest["config"].items() if k != "seed_sigmoid_bug"}
        model = create(manifest["model"], ModelConfig(**settings))
        arrays = {
            name: (
                artifact.load_array(f"{name}.npy", verify=True)
                if artifact.files
                else storage.load_npy(storage.join(artifact.uri, f"{name}.npy"))
            )
            for name in names
        }
        model._load_parts(artifact.uri)
        model._load_files(artifact, data_files)
        model.set_state({**manifest, "arrays": arrays})
        model.vocab = vocab
        model.metadata = manifest.get("extra") or {}
        # A probe: arrays of the wrong shape for (dim, n_tags) fail here, not on a user's photo.
        probe = model.predict_scores(np.zeros((1, dim), np.float32))
    except artifacts.ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise artifact.error(f"its arrays or settings are inconsistent ({error})") from None
    if probe.shape != (1, n_tags):
        raise artifact.error(f"it predicts {probe.shape[1:]} scores, its manifest says {n_tags}")
    return model


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Recommender]] = {}


def register(cls: type[Recommender]) -> type[Recommender]:
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, config: ModelConfig | None = None) -> Recommender:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](config)


# ----------------------------------------------------------------------------- models


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


@register
class Blend(Recommender):
    """A weighted sum of other models' scores: `Blend.of([mlp, knn], X_val, Y_val)` takes fitted
    models and picks the weights (steps of 0.1 summing to 1) by `metric` on validation.
    `fit` refits every part on new data and keeps the weights (and the decision rule): how
    the chosen blend is retrained on train + validation. Saved with each part in `part-N/`."""

    name = "blend"
    streams = True  # refit from Blocks: parts that stream get them, the others rows in memory

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.parts: list[Recommender] = []
        self.weights = np.zeros(0, np.float32)

    @classmethod
    def of(
        cls,
        parts: Sequence[Recommender],
        X_val: np.ndarray,
        Y_val: np.ndarray,
        metric: str = SELECT_METRIC,
        steps: int = 10,
    ) -> Blend:
        if len(parts) < 2 or any(p.n_tags is None for p in parts):
            raise ValueError("a blend needs at least two fitted models")
        blend = cls()
        blend.parts = list(parts)
        blend.vocab, blend.dim, blend.n_tags = parts[0].vocab, parts[0].dim, parts[0].n_tags
        scores = [p.predict_scores(X_val) for p in parts]
        best = -np.inf
        for weights in _simplex(len(parts), steps):
            value = metric_value(Y_val, sum(w * s for w, s in zip(weights, scores, strict=True)))
            if value > best:
                best, blend.weights = value, weights
        # A part weighted 0 adds nothing but size: drop it. Fewer than two parts left means
        # the best "blend" is one of the parts (the caller already has that candidate).
        kept = blend.weights > 0
        blend.parts = [p for p, k in zip(blend.parts, kept, strict=True) if k]
        blend.weights = blend.weights[kept]
        blend._end_epoch(0, {}, X_val, Y_val, [])  # the decision rule, on validation
        return blend

    def _fit(self, X, Y, X_val, Y_val, callbacks) -> None:
        if not self.parts:
            raise ValueError("create a blend with Blend.of(fitted models, X_val, Y_val)")
        if not isinstance(X, Blocks):
            self.parts = [refit(part, X, Y) for part in self.parts]
            return
        arrays = functools.cache(X.in_memory)  # read once, for every part that needs arrays
        self.parts = [
            refit(part, X, None) if part.streams else refit(part, *arrays()) for part in self.parts
        ]

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return sum(w * p.predict_scores(X) for w, p in zip(self.weights, self.parts, strict=True))

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights = arrays["weights"].astype(np.float32)
        self._restore_check()

    def _save_parts(self, uri: str) -> None:
        for i, part in enumerate(self.parts):
            part.save(storage.join(uri, f"part-{i}"), metadata={})

    def _load_parts(self, uri: str) -> None:
        # part-0, part-1...: each a verified model artifact of its own (at most _MAX_PARTS).
        self.parts = []
        while len(self.parts) < _MAX_PARTS:
            part = storage.join(uri, f"part-{len(self.parts)}")
            if not storage.exists(storage.join(part, "manifest.json")):
                break
            self.parts.append(load(part))

    def _restore_check(self) -> None:
        if len(self.parts) < 2 or len(self.weights) != len(self.parts):
            raise ValueError(f"{len(self.weights)} blend weights for {len(self.parts)} parts")

    @property
    def label(self) -> str:
        return " + ".join(
            f"{w:.1f} {describe(p)}" for w, p in zip(self.weights, self.parts, strict=True)
        )


def _simplex(n: int, steps: int) -> list[np.ndarray]:
    """Every weight vector of n non-negative multiples of 1/steps that sum to 1."""
    return [
        np.array([*head, steps - sum(head)], np.float32) / steps
        for head in itertools.product(range(steps + 1), repeat=n - 1)
        if sum(head) <= steps
    ]


def metric_value(Y: np.ndarray, scores: np.ndarray, metric: str = SELECT_METRIC) -> float:
    """One metric of `scores` on labels Y: "f1@k", "p@k"... ranks only; "f1", "precision",
    "recall" at the decision rule chosen on these same labels; "map"."""
    if "@" in metric:
        return metrics.at_k(Y, scores, (int(metric.partition("@")[2]),))[metric]
    if metric == "map":
        return metrics.mean_average_precision(Y, scores)
    return metrics.evaluate(Y, scores, choose_decision(Y, scores).apply(scores))[metric]


def describe(model: Recommender) -> str:
    """A short name: "knn", "mlp bs=64 lr=0.001", "0.5 ridge + 0.5 knn"."""
    if isinstance(model, Blend):
        return model.label
    if model.trainable:
        return f"{model.name} bs={model.config.batch_size} lr={model.config.learning_rate:g}"
    return model.name


def best_epoch(model: Recommender, metric: str = SELECT_METRIC) -> int:
    """The epoch count with the best validation `metric` in the model's history (all of them
    when it has none)."""
    values = model.history.get(f"val_{metric}") or []
    return int(np.argmax(values)) + 1 if values else max(1, model.epochs_done)


def refit(model: Recommender, X: np.ndarray, Y: np.ndarray, metric: str = SELECT_METRIC):
    """A new model of `model`'s kind and settings trained on (X, Y) - e.g. train + validation -
    for the epoch count `model` reached its best validation `metric` at, keeping the decision
    rule chosen on validation (there is no held-out data left to choose it on)."""
    if isinstance(model, Blend):
        fresh = Blend(model.config)
        fresh.parts, fresh.weights = model.parts, model.weights
    else:
        config = model._refit_config()
        if model.trainable:
            config = replace(config, epochs=best_epoch(model, metric))
        fresh = create(model.name, config)
    fresh.fit(X, Y, vocab=model.vocab)
    fresh.decision = model.decision
    return fresh


class _KerasTrained(Recommender):
    """Shared epoch loop for the TensorFlow models: build, restore, fit one epoch at a time."""

    trainable = True
    # Keras weights (get_weights order) and optimizer variables, as plain arrays.
    weights: list[np.ndarray]
    optimizer_state: list[np.ndarray]

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.weights, self.optimizer_state = [], []

    def _build(self, keras, n_images: int, dim: int, n_tags: int):
        raise NotImplementedError

    def _training_data(self, X: np.ndarray, Y: np.ndarray) -> Any:
        raise NotImplementedError

    def _epoch_inputs(self, tf, data: Any, epoch: int) -> dict[str, Any]:
        """model.fit's data arguments for one epoch; by default `data` is (inputs, targets)."""
        inputs, targets = data
        return {"x": inputs, "y": targets, "batch_size": self.config.batch_size, "shuffle": True}

    def _after_epoch(self, model) -> None:
        """Copy the Keras weights to numpy for prediction and checkpoints."""
        self.weights = self._get_weights(model)
        self.optimizer_state = [np.array(v) for v in model.optimizer.variables]

    def _get_weights(self, model) -> list[np.ndarray]:
        return [np.array(w) for w in model.get_weights()]

    def _set_weights(self, model, weights: list[np.ndarray]) -> None:
        model.set_weights(weights)

    def _fit(self, X, Y, X_val, Y_val, callbacks) -> None:
        tf = _tensorflow(self.config.threads)
        keras = tf.keras
        keras.utils.set_random_seed(self.config.seed + self.epochs_done)
        n_images = X.rows if isinstance(X, Blocks) else len(X)
        model = self._build(keras, n_images, self.dim, self.n_tags)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=self.config.learning_rate),
            loss=self._loss(keras),
        )
        if self.weights:  # resuming: weights and Adam moments from the checkpoint
            self._set_weights(model, self.weights)
            model.optimizer.build(model.trainable_variables)
            if len(self.optimizer_state) == len(model.optimizer.variables):
                for variable, value in zip(
                    model.optimizer.variables, self.optimizer_state, strict=True
                ):
                    variable.assign(value)
        data = self._training_data(X, Y)
        for epoch in range(self.epochs_done, self.config.epochs):
            with warnings.catch_warnings():
                # A stream's length is known only at its end, which Keras reports as a warning.
                warnings.filterwarnings("ignore", message="Your input ran out of data")
                result = model.fit(
                    **self._epoch_inputs(tf, data, epoch),
                    epochs=epoch + 1,
                    initial_epoch=epoch,
                    verbose=0,
                )
            self._after_epoch(model)
            self.epochs_done = epoch + 1
            logs = {"loss": result.history["loss"][-1]}
            if self._end_epoch(epoch, logs, X_val, Y_val, callbacks):
                break

    def _loss(self, keras):
        return keras.losses.BinaryCrossentropy(from_logits=True)

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"weight_{i}": w for i, w in enumerate(self.weights)}
        arrays.update({f"optimizer_{i}": v for i, v in enumerate(self.optimizer_state)})
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        def numbered(prefix: str) -> list[np.ndarray]:
            names = [n for n in arrays if n.startswith(prefix)]
            return [arrays[f"{prefix}{i}"] for i in range(len(names))]

        self.weights = numbered("weight_")
        self.optimizer_state = numbered("optimizer_")
        self._weights_changed()

    def _weights_changed(self) -> None:
        """Hook: derive prediction arrays from `self.weights`."""


def _unit_scale(dim: int) -> float:
    """Embeddings are L2-normalised, so a feature is ~1/sqrt(dim): scaled by sqrt(dim) they are
    ~1, the scale Glorot initialisation and Adam's step sizes assume (without it the first
    layer's inputs are ~0.03 and learning is slow at the grid's learning rates)."""
    return float(np.sqrt(dim))


@register
class Mlp(_KerasTrained):
    """Multi-label classifier on the image embedding: Dense + dropout + Dense."""

    name = "mlp"
    streams = True

    def _build(self, keras, n_images: int, dim: int, n_tags: int):
        layers = keras.layers
        inputs = keras.Input(shape=(dim,), name="embedding")
        scaled = layers.Rescaling(_unit_scale(dim), name="unit_scale")(inputs)
        hidden = layers.Dense(self.config.hidden, activation="relu", name="hidden")(scaled)
        hidden = layers.Dropout(self.config.dropout, seed=self.config.seed)(hidden)
        logits = layers.Dense(n_tags, name="logits")(hidden)
        return keras.Model(inputs, logits)

    def _loss(self, keras):
        if self.config.loss == "softmax":
            return keras.losses.CategoricalCrossentropy(from_logits=True)
        return super()._loss(keras)

    def _training_data(self, X: np.ndarray | Blocks, Y: np.ndarray | None) -> Blocks:
        if isinstance(X, Blocks):
            return X
        indptr, indices = csr_of(Y)  # dense targets are made per batch, never for all rows
        return Blocks(
            lambda order: array_blocks(X, indptr, indices, order), len(X), X.shape[1], Y.shape[1]
        )

    def _epoch_inputs(self, tf, data: Blocks, epoch: int) -> dict[str, Any]:
        """One epoch as a tf.data stream of batches, shuffled by a generator seeded with
        (seed, epoch): a block of rows in memory at a time, labels densified per batch."""
        size, softmax = self.config.batch_size, self.config.loss == "softmax"

        def batches():
            order = np.random.default_rng([self.config.seed, epoch])
            for X, indptr, indices in data.read(order):
                if softmax:  # an untagged post has no distribution to learn
                    tagged = np.flatnonzero(np.diff(indptr) > 0)
                    X, (indptr, indices) = X[tagged], csr_rows(indptr, indices, tagged)
                for start in range(0, len(X), size):
                    stop = min(start + size, len(X))
                    span = indptr[start : stop + 1]
                    Y = dense_labels(
                        span - span[0], indices[span[0] : span[-1]], data.n_tags, np.float32
                    )
                    if softmax:
                        Y /= Y.sum(axis=1, keepdims=True)
                    yield X[start:stop], Y

        signature = (
            tf.TensorSpec((None, data.dim), tf.float32),
            tf.TensorSpec((None, data.n_tags), tf.float32),
        )
        stream = tf.data.Dataset.from_generator(batches, output_signature=signature)
        return {"x": stream.prefetch(2), "shuffle": False}

    def _scores(self, X: np.ndarray) -> np.ndarray:
        w_hidden, b_hidden, w_out, b_out = self.weights
        X = X * np.float32(_unit_scale(X.shape[1]))
        logits = np.maximum(X @ w_hidden + b_hidden, 0.0) @ w_out + b_out
        if self.config.loss == "softmax":
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            return e / e.sum(axis=1, keepdims=True)
        return _sigmoid(logits)


@register
class Seed(_KerasTrained):
    """The original project's model (see the module docstring); decision fixed at p >= 0.5."""

    name = "seed"
    fixed_decision = Decision("threshold", 0.5)
    # Layer names, in the order of `weights`.
    _LAYERS = ("image_embedding", "hashtag_embedding", "image_bias", "hashtag_bias")

    def _build(self, keras, n_images: int, dim: int, n_tags: int):
        layers = keras.layers
        image = keras.Input(shape=(), dtype="int32", name="image")
        tag = keras.Input(shape=(), dtype="int32", name="hashtag")
        latent = self.config.latent_dim
        he_normal = "he_normal"
        image_vec = layers.Embedding(
            n_images, latent, embeddings_initializer=he_normal, name=self._LAYERS[0]
        )(image)
        tag_vec = layers.Embedding(
            n_tags, latent, embeddings_initializer=he_normal, name=self._LAYERS[1]
        )(tag)
        image_bias = layers.Embedding(n_images, 1, name=self._LAYERS[2])(image)
        tag_bias = layers.Embedding(n_tags, 1, name=self._LAYERS[3])(tag)
        logit = layers.Add()([layers.Dot(axes=1)([image_vec, tag_vec]), image_bias, tag_bias])
        return keras.Model([image, tag], logit)  # (batch, 1) logits

    def _get_weights(self, model) -> list[np.ndarray]:
        layers = {layer.name: layer for layer in model.layers}
        image_latent, tag_latent = (np.array(layers[n].get_weights()[0]) for n in self._LAYERS[:2])
        biases = [np.array(layers[n].get_weights()[0]) for n in self._LAYERS[2:]]
        return [image_latent, tag_latent, *biases]

    def _set_weights(self, model, weights: list[np.ndarray]) -> None:
        layers = {layer.name: layer for layer in model.layers}
        for name, value in zip(self._LAYERS, weights, strict=True):
            if name in layers:
                layers[name].set_weights([value])

    def _training_data(self, X: np.ndarray, Y: np.ndarray) -> tuple[Any, np.ndarray]:
        self.train_embeddings = l2_normalize(X)
        # Every (image, hashtag) cell is one example; missing pairs are the negatives.
        n, v = Y.shape
        cells = np.arange(n * v, dtype=np.int64)
        inputs = [(cells // v).astype(np.int32), (cells % v).astype(np.int32)]
        return inputs, Y.reshape(-1, 1).astype(np.float32)

    def _after_epoch(self, model) -> None:
        super()._after_epoch(model)
        self._weights_changed()

    def _weights_changed(self) -> None:
        if self.weights:
            self.image_latent, self.tag_latent, self.image_bias, self.tag_bias = self.weights

    def _scores(self, X: np.ndarray) -> np.ndarray:
        # Cold start: a new image borrows the mean latent vector and bias of its neighbours.
        indices, _ = nearest_neighbours(X, self.train_embeddings, self.config.neighbours)
        latent = self.image_latent[indices].mean(axis=1)
        logits = latent @ self.tag_latent.T
        logits += self.image_bias[indices, 0].mean(axis=1, keepdims=True) + self.tag_bias[:, 0]
        return _sigmoid(logits)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {**super()._arrays(), "train_embeddings": self.train_embeddings}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.train_embeddings = arrays["train_embeddings"].astype(np.float32)
        super()._restore(arrays)
