"""Models trained with Keras (TensorFlow imported only when training): `mlp` and `factorisation`
(the original project's logistic matrix factorisation; its old name `seed` is still accepted)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from hashtag.dataset import array_blocks, csr_rows, dense_labels
from hashtag.metrics import l2_normalize
from hashtag.models.base import (
    Blocks,
    Decision,
    ModelConfig,
    Recommender,
    _sigmoid,
    _tensorflow,
    csr_of,
    nearest_neighbours,
    register,
)


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
class Factorisation(_KerasTrained):
    """The original project's model (see the module docstring); decision fixed at p >= 0.5."""

    name = "factorisation"
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
