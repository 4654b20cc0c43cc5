"""Hashtag recommenders: image embeddings (n, dim) in, hashtag scores (n, V) out.

    model = models.create("mlp", ModelConfig(batch_size=64, learning_rate=1e-3))
    model.fit(X_train, Y_train, X_val, Y_val, vocab=tags)   # Y: bool (n, V)
    scores = model.predict_scores(X_test)                   # float32 (n, V)
    tags = model.predict(X_test)                            # bool (n, V): the decision rule
    model.score(X_test, Y_test)                             # metrics.evaluate(...)
    model.save(uri, metadata={"embedder": spec}); models.load(uri)

Models (`available()`):
- popularity: every image gets the training frequency of each hashtag.
- factorisation (formerly `seed`, a name still accepted): the original project
  (github.com/GarlandZhang/cs486_project) reimplemented, a logistic matrix factorisation: image and
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
`choose_decision`, never on test data; without validation data it is top-`k`. The factorisation
keeps the original's fixed threshold 0.5.

Trainable models call `callbacks` (objects with `on_epoch_end(epoch, logs)`; returning True
stops training) after each epoch with the training loss and validation metrics ("val_f1",
"val_p@5", "val_map", ...), which also go to `history`. To resume from a checkpoint, `save` the
model (or keep `get_state()`), later `load` it (or `set_state`) and call
`fit(..., resume=True)`: training continues from `epochs_done` up to `config.epochs`, with the
optimizer's state restored.
"""

from __future__ import annotations

from hashtag.models.base import (
    _FIX,
    _MAX_PARTS,
    _REGISTRY,
    _SIMILARITY_CELLS,
    ALIASES,
    FORMAT,
    KERNEL_LAMBDAS,
    LOSSES,
    MAX_DIM,
    MAX_LANDMARKS,
    MAX_TAGS,
    RIDGE_LAMBDAS,
    SELECT_METRIC,
    THREADS_ENV,
    TRAINABLE,
    VERSION,
    Blocks,
    Decision,
    ModelConfig,
    Recommender,
    _as_features,
    _as_labels,
    _help,
    _sigmoid,
    _tensorflow,
    available,
    choose_decision,
    create,
    csr_of,
    load,
    metric_value,
    nearest_neighbours,
    register,
)
from hashtag.models.blend import Blend, _simplex
from hashtag.models.closed_form import (
    Kernel,
    Knn,
    Popularity,
    Ridge,
    _choose_penalty,
    _concat_csr,
    _sparse_votes,
)
from hashtag.models.keras import Factorisation, Mlp, _KerasTrained, _unit_scale

__all__ = [
    "ALIASES",
    "Blocks",
    "Decision",
    "FORMAT",
    "KERNEL_LAMBDAS",
    "LOSSES",
    "MAX_DIM",
    "MAX_LANDMARKS",
    "MAX_TAGS",
    "ModelConfig",
    "RIDGE_LAMBDAS",
    "Recommender",
    "SELECT_METRIC",
    "THREADS_ENV",
    "TRAINABLE",
    "VERSION",
    "_FIX",
    "_MAX_PARTS",
    "_REGISTRY",
    "_SIMILARITY_CELLS",
    "_as_features",
    "_as_labels",
    "_help",
    "_sigmoid",
    "_tensorflow",
    "available",
    "choose_decision",
    "create",
    "csr_of",
    "load",
    "metric_value",
    "nearest_neighbours",
    "register",
    "Kernel",
    "Knn",
    "Popularity",
    "Ridge",
    "_choose_penalty",
    "_concat_csr",
    "_sparse_votes",
    "Blend",
    "_simplex",
    "Factorisation",
    "Mlp",
    "_KerasTrained",
    "_unit_scale",
]
