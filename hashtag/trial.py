"""One Tune trial: a grid cell trained with a checkpoint per epoch, and what it reads.

    train_trial(grid, settings, arrays)   # the Tune trainable (Ray pickles it by reference)

A trial loads the merged dataset itself, or takes the splits from Ray's object store
(`TrialData`), trains `settings.model` on `model_config(grid, settings)` with a Tune report and
a checkpoint after every epoch (`_EpochReporter`: the model's folder and our bookkeeping, so an
interrupted trial continues from its last epoch and the export never retrains), and reports
every metric on validation and test at the end. This module owns the checkpoint's layout: it
writes it (`_report`) and reads it (`checkpoint_state`, `checkpoint_model`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hashtag import artifacts, models, storage, tfimport

# Inside a trial checkpoint: the model folder (models' save format) and our bookkeeping.
CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "state.json"
# Per-epoch values shown in Tune's progress and kept for the learning curves.
EPOCH_METRICS = ("loss", "val_f1", "val_f1@5", "val_map")


def tune_metric(name: str) -> str:
    """A metric name Tune's loggers accept (tensorboardX refuses '@'): val_f1@5 -> val_f1_at_5."""
    return name.replace("@", "_at_")


def _metric_key(tune_name: str) -> str:
    """The scores' key of a Tune metric name: val_f1_at_5 -> f1@5."""
    return tune_name.removeprefix("val_").replace("_at_", "@")


def _configure_tensorflow(cpus: float) -> None:
    """Bound TensorFlow's thread pools by the trial's CPUs, and let GPU memory grow (so that
    trials with fractional GPUs can share one). Must run before TensorFlow builds anything."""
    tf = tfimport.tensorflow()
    threads = max(1, int(cpus))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
    except RuntimeError:  # already initialised in this worker process
        pass
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass


@dataclass(frozen=True)
class TrialSettings:
    """What every trial shares. Passed with tune.with_parameters (Ray's object store), so it
    stays out of the trial names and of the experiment files on disk."""

    data: str
    model: str
    epochs: int
    loss: str
    seed: int
    cpus: float
    dim: int = 0
    vocab: tuple[str, ...] = ()
    blocks: tuple[int, ...] = ()  # the dims of the embedders the features concatenate
    # Storage settings of the driver (the S3 endpoint override) that the trial's process needs.
    env: dict[str, str] = field(default_factory=dict)
    # The per-epoch validation metric the scheduler compares (also in the final report).
    metric: str = "val_f1"
    select_metric: str = "f1"


# Trials choose the decision rule and report per-epoch validation metrics on the first
# VAL_SAMPLE validation rows (a random sample: splits are a hash of the post id), so that their
# memory does not grow with N; the final validation and test scores use every row, SCORE_ROWS
# at a time (scores, masks and labels of a block: ~12 bytes x SCORE_ROWS x V). Training reads
# BLOCK_ROWS rows at a time (the span of the streamed per-epoch shuffle).
VAL_SAMPLE = 10_000
BLOCK_ROWS = 65_536
SCORE_ROWS = 8_192


def split_arrays(dataset, name: str) -> dict[str, np.ndarray]:
    """Split `name` in memory: X float32 (n, dim) and its labels as CSR (indptr, indices)."""
    rows = dataset.rows(name)
    indptr, indices = dataset.labels_csr(rows)
    return {
        "X": np.asarray(dataset.embeddings[rows], np.float32),
        "indptr": indptr,
        "indices": indices,
    }


class TrialData:
    """Where a process's rows come from: `arrays` ({split: pieces}, each piece a split_arrays
    dict or the ObjectRef of one: read-only views of Ray's object store, shared by every process
    on a node, no copy per trial), or, when the dataset is over the memory budget, the dataset
    itself, streamed block by block from its parts (by byte ranges when remote)."""

    def __init__(self, data: str, arrays: dict[str, Any] | None):
        self.arrays = None if arrays is None else {k: _resolve(v) for k, v in arrays.items()}
        self.dataset = None
        if arrays is None:
            from hashtag.dataset import Dataset

            self.dataset = Dataset.load(data)

    def blocks(
        self,
        name: str,
        order: np.random.Generator | None = None,
        rows: int = 0,
        *,
        embeddings: bool = True,
    ):
        """(X, labels indptr, indices) blocks of split `name`, of `rows` rows: by default
        BLOCK_ROWS when shuffled (training), SCORE_ROWS in order (scoring); `embeddings=False`:
        the labels only."""
        from hashtag.dataset import piece_blocks

        rows = rows or (BLOCK_ROWS if order is not None else SCORE_ROWS)
        if self.dataset is not None:
            return self.dataset.blocks(name, rows, order, embeddings=embeddings)
        return piece_blocks(self.arrays[name], order, rows, embeddings=embeddings)

    def count(self, name: str) -> int:
        if self.dataset is not None:
            return self.dataset.split_count(name)
        return sum(len(piece["indptr"]) - 1 for piece in self.arrays[name])

    def train(self, dim: int, n_tags: int) -> models.Blocks:
        return models.Blocks(
            lambda order: self.blocks("train", order), self.count("train"), dim, n_tags
        )

    def validation(self, n_tags: int) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y dense) of the first VAL_SAMPLE validation rows, for per-epoch validation."""
        from hashtag.dataset import dense_labels

        Xs, Ys = [], []
        for X, indptr, indices in first_rows(self.blocks("val"), VAL_SAMPLE):
            Xs.append(X)
            Ys.append(dense_labels(indptr, indices, n_tags))
        return np.concatenate(Xs), np.concatenate(Ys)


def _resolve(split: Any) -> list[dict[str, np.ndarray]]:
    """A split's pieces as arrays: one split_arrays dict, or a list of them or of ObjectRefs
    (fetched from the object store as read-only views: no copy)."""
    if isinstance(split, dict):
        return [split]
    pieces = list(split)
    if pieces and not isinstance(pieces[0], dict):
        import ray

        pieces = ray.get(pieces)
    return pieces


def model_config(grid: dict[str, Any], settings: TrialSettings):
    return models.ModelConfig(
        batch_size=int(grid["batch_size"]),
        learning_rate=float(grid["learning_rate"]),
        epochs=settings.epochs,
        loss=settings.loss,
        seed=settings.seed,
        threads=max(1, int(settings.cpus)),
        centre=True,
        blocks=settings.blocks,
    )


def score_blocks(recommender, blocks) -> dict[str, float]:
    return {k: float(v) for k, v in recommender.score_blocks(blocks).items()}


def _in_memory(blocks: models.Blocks) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y dense bool) of every row of `blocks`, in row order."""
    from hashtag.dataset import dense_labels

    parts = [(X, dense_labels(p, i, blocks.n_tags)) for X, p, i in blocks.read(None)]
    return np.concatenate([X for X, _ in parts]), np.concatenate([Y for _, Y in parts])


def _report(recommender, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """One Tune report with a checkpoint: the model folder (weights, optimizer, decision,
    history) and our bookkeeping (`state`)."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="hashtag-ckpt-") as folder:
        recommender.save(os.path.join(folder, CHECKPOINT_MODEL))
        with open(os.path.join(folder, CHECKPOINT_STATE), "w") as f:
            f.write(storage.dumps(storage.json_safe(state)))  # strict JSON: a NaN loss is null
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class _EpochReporter:
    """Model callback: after every epoch, a Tune report and a checkpoint."""

    def __init__(self, recommender, state: dict[str, Any]):
        self.recommender, self.state = recommender, state
        self.seconds_before, self.started = state["seconds"], time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.state["seconds"] = self.seconds_before + time.perf_counter() - self.started
        shown = {tune_metric(k): float(v) for k, v in logs.items() if k in EPOCH_METRICS}
        _report(self.recommender, self.state, {"epoch": epoch + 1, "done": False, **shown})


def train_trial(
    grid: dict[str, Any],
    settings: TrialSettings,
    arrays: dict[str, dict[str, np.ndarray]] | None = None,
) -> None:
    """One grid cell: `grid` holds its batch_size and learning_rate; `arrays` the splits from
    the object store, or None to stream them from the dataset (see TrialData)."""
    from ray import tune

    for name, value in settings.env.items():
        os.environ.setdefault(name, value)
    _configure_tensorflow(settings.cpus)
    read_before = storage.remote_bytes_read()
    data = TrialData(settings.data, arrays)
    # The driver names the vocabulary and dim; a streamed trial can read them itself.
    vocab = list(settings.vocab) if settings.vocab else data.dataset.vocab
    n_tags, dim = len(vocab), settings.dim or data.dataset.dim
    X_val, Y_val = data.validation(n_tags)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        recommender = models.create(settings.model, model_config(grid, settings))
        state: dict[str, Any] = {"seconds": 0.0, "done": False}
    else:
        # A retry or a restored experiment: continue from the last epoch, not from scratch.
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, CHECKPOINT_STATE)) as f:
                state = json.load(f)
            recommender = models.load(os.path.join(folder, CHECKPOINT_MODEL))
    if recommender.epochs_done < settings.epochs:
        train = data.train(dim, n_tags)
        if recommender.streams:
            X_train, Y_train = train, None
        else:  # a model that needs every row at once (factorisation): in memory, any budget
            X_train, Y_train = _in_memory(train)
        recommender.fit(
            X_train,
            Y_train,
            X_val,
            Y_val,
            callbacks=[_EpochReporter(recommender, state)],
            vocab=vocab,
            resume=checkpoint is not None,
        )
    del X_val, Y_val
    state.update(
        done=True,
        val=score_blocks(recommender, data.blocks("val")),
        test=score_blocks(recommender, data.blocks("test")),
    )
    _report(
        recommender,
        state,
        {
            "epoch": recommender.epochs_done,
            "done": True,
            "val_f1": state["val"].get("f1", math.nan),
            settings.metric: state["val"].get(_metric_key(settings.metric), math.nan),
            "test_f1": state["test"].get("f1", math.nan),
            "seconds": state["seconds"],
            # Bytes this trial read from remote storage (S3): what a streamed epoch costs.
            "remote_bytes_read": storage.remote_bytes_read() - read_before,
        },
    )


def first_rows(blocks, n: int):
    """The blocks cut after their first `n` rows."""
    for X, indptr, indices in blocks:
        if n <= 0:
            return
        if len(X) > n:
            X, indptr = X[:n], indptr[: n + 1]
            indices = indices[: int(indptr[-1])]
        n -= len(X)
        yield X, indptr, indices


def blocks_of(dataset) -> tuple[int, ...]:
    """The dims of the embedders a dataset's features concatenate; () for one embedder."""
    return dataset.embedder.blocks


def checkpoint_model(checkpoint) -> models.Recommender:
    """The fitted model of a trial's checkpoint (no retraining)."""
    with checkpoint.as_directory() as folder:
        return models.load(os.path.join(folder, CHECKPOINT_MODEL))


def checkpoint_state(checkpoint) -> dict[str, Any] | None:
    """A trial's last checkpoint, read without loading the model: our bookkeeping plus the
    model's epochs and per-epoch history (from its manifest). None without a checkpoint."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state_path = os.path.join(folder, CHECKPOINT_STATE)
        model_path = os.path.join(folder, CHECKPOINT_MODEL)
        if not (os.path.exists(state_path) and artifacts.exists(model_path)):
            return None
        with open(state_path) as f:
            state = json.load(f)
        manifest = artifacts.read_manifest(model_path, what="checkpoint")
    history = manifest.get("history") or {}
    state["history"] = {k: v for k, v in history.items() if k in EPOCH_METRICS}
    state["epoch"] = int(manifest.get("epochs_done", 0))
    return state
