"""The recommender base: `ModelConfig`, `Blocks`, the decision rule, `Recommender` (fit /
predict / score / save), `load`, and the registry (`register`, `create`, `available`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from hashtag import artifacts, metrics, neighbours, tfimport
from hashtag.dataset import dense_labels
from hashtag.metrics import l2_normalize

FORMAT = "hashtag-model"


VERSION = 1


_FIX = "retrain and export the model again (`hashtag tune`)"


MAX_TAGS = 10_000_000  # more tags, or wider embeddings, are a tampered manifest


MAX_DIM = 1 << 16


TRAINABLE = {"factorisation", "mlp"}
# Old names of registered models, still accepted by `create` and `load` (saved models, Tune
# checkpoints and commands carry them): "seed" now only means a random seed.
ALIASES = {"seed": "factorisation"}


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
    neighbours: int = field(default=3, metadata=_help("factorisation: neighbours for a new image"))
    latent_dim: int = field(default=1000, metadata=_help("factorisation: latent vector size"))
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

    def describe(self) -> str:
        """A short name: "knn", "mlp bs=64 lr=0.001" (a blend: "0.5 ridge + 0.5 knn")."""
        if self.trainable:
            return f"{self.name} bs={self.config.batch_size} lr={self.config.learning_rate:g}"
        return self.name

    # -- refit: the chosen model trained again on more data

    def best_epoch(self, metric: str = SELECT_METRIC) -> int:
        """The epoch count with the best validation `metric` in the history (all of them when
        there is none)."""
        values = self.history.get(f"val_{metric}") or []
        return int(np.argmax(values)) + 1 if values else max(1, self.epochs_done)

    def refit(self, X: np.ndarray | Blocks, Y: np.ndarray | None, metric: str = SELECT_METRIC):
        """A new model of this kind and settings trained on (X, Y) - e.g. train + validation -
        for the epoch count this one reached its best validation `metric` at, keeping the
        decision rule chosen on validation (there is no held-out data left to choose it on)."""
        fresh = self._unfitted_copy(metric)
        fresh.fit(X, Y, vocab=self.vocab)
        fresh.decision = self.decision
        return fresh

    def _unfitted_copy(self, metric: str) -> Recommender:
        """What `refit` trains: a model of this kind on `_refit_config`, trainable ones for
        `best_epoch(metric)` epochs."""
        config = self._refit_config()
        if self.trainable:
            config = replace(config, epochs=self.best_epoch(metric))
        return create(self.name, config)

    def _refit_config(self) -> ModelConfig:
        """The settings a refit trains with: what was chosen on validation stays chosen."""
        return self.config

    # -- prediction

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
    # Models were written before manifests listed their files: an unlisted one still loads.
    artifact = artifacts.read(uri, FORMAT, VERSION, what="model", fix=_FIX, unlisted=True)
    manifest = artifact.manifest
    if check_extra is not None:
        check_extra(artifact.uri, manifest.get("extra") or {})
    names = manifest.get("arrays")
    model_name = manifest.get("model")
    known = isinstance(model_name, str) and ALIASES.get(model_name, model_name) in _REGISTRY
    if not isinstance(names, list) or not known:
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
        arrays = {name: artifact.load_array(f"{name}.npy", verify=True) for name in names}
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


_REGISTRY: dict[str, type[Recommender]] = {}


def register(cls: type[Recommender]) -> type[Recommender]:
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, config: ModelConfig | None = None) -> Recommender:
    name = ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](config)


def metric_value(Y: np.ndarray, scores: np.ndarray, metric: str = SELECT_METRIC) -> float:
    """One metric of `scores` on labels Y: "f1@k", "p@k"... ranks only; "f1", "precision",
    "recall" at the decision rule chosen on these same labels; "map"."""
    if "@" in metric:
        return metrics.at_k(Y, scores, (int(metric.partition("@")[2]),))[metric]
    if metric == "map":
        return metrics.mean_average_precision(Y, scores)
    return metrics.evaluate(Y, scores, choose_decision(Y, scores).apply(scores))[metric]
