"""The batch size x learning rate grid on Ray Tune, then the export of the best model.

    hashtag tune --data out/dataset --out out/tune --batch-sizes 16,64,256 --learning-rates 1e-2,1e-3,1e-4

One Tune trial per grid cell. A trial loads the merged dataset itself (Dataset.load(data): a
memory map when local, a download from s3:// otherwise), trains with a checkpoint per epoch
(the model's weights, so an interrupted trial continues from its last epoch and the export never
retrains) and reports validation metrics per epoch and, at the end, every metric on validation
and test. Reference models (popularity, kNN) are scored once per experiment in the driver.

The best trial is chosen on validation F1, never on test, and exported to OUT/model/ with what
recommend needs and nothing of the training data: the embedder spec, the vocabulary, the decision
rule, and a hashtag co-occurrence model fitted on the training labels (OUT/model/cooccurrence/).

Outputs under OUT:
    ray/grid-HASH/     Tune's experiment (trial checkpoints; what a rerun restores)
    references.json    the reference models' scores (reused by a rerun)
    results.csv/.md    every metric of every trial and reference, lift over popularity
    heatmap.png        F1 over batch size x learning rate;  curves.png: per-epoch curves
    model/             the exported model;  tune.json: this summary

Rerunning the same command restores the experiment: finished trials are kept, unfinished and
failed ones continue from their last checkpoint. Changing the grid, epochs, loss, model or data
starts a new experiment (the name carries a hash of those settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hashtag import models, storage
from hashtag.errors import UserError
from hashtag.report import ResultRow, decision_markdown, trial_line, write_report
from hashtag.results import StageResult

log = logging.getLogger(__name__)

# The exported model's metadata (inside models' own manifest) says what wrote it.
EXPORT_FORMAT = "hashtag-export"
EXPORT_VERSION = 1
REFERENCE_MODELS = ("popularity", "knn")
# Inside a trial checkpoint: the model folder (models' save format) and our bookkeeping.
CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "state.json"
# Per-epoch values shown in Tune's progress and kept for the learning curves.
EPOCH_METRICS = ("loss", "val_f1", "val_f1@5", "val_map")
# Completion (label-only datasets): the weights tried on validation (never on test), and how many
# hashtags are suggested per post.
COMPLETION_GRID = {
    "idf_power": (0.0, 0.5, 1.0),
    "lift_power": (0.0, 0.25, 0.5, 0.75),
    "prior_weight": (0.01, 0.1),
}
COMPLETION_K = 5
UNFINISHED = "unfinished"


@dataclass(frozen=True)
class TuneConfig:
    data: str = field(metadata={"help": "merged dataset URI (merge's OUT), local or s3://"})
    out: str = field(metadata={"help": "where tables, plots, Tune's experiment and the model go"})
    model: str = field(default="mlp", metadata={"help": "trainable model of the grid: mlp or seed"})
    batch_sizes: tuple[int, ...] = field(
        default=(16, 64, 256), metadata={"help": "grid batch sizes"}
    )
    learning_rates: tuple[float, ...] = field(
        default=(1e-2, 1e-3, 1e-4), metadata={"help": "grid learning rates"}
    )
    epochs: int = field(default=20, metadata={"help": "epochs per trial"})
    cpus_per_trial: float = field(
        default=1.0, metadata={"help": "CPUs per trial (also bounds TensorFlow's threads)"}
    )
    gpus_per_trial: float = field(
        default=0.0, metadata={"help": "GPUs per trial; a fraction (0.25) shares one GPU"}
    )
    max_failures: int = field(
        default=2, metadata={"help": "retries of a failed trial, from its last checkpoint"}
    )
    references: tuple[str, ...] = field(
        default=REFERENCE_MODELS,
        metadata={"help": "reference models scored once beside the grid (popularity, knn)"},
    )
    loss: str = field(default="sigmoid", metadata={"help": "mlp loss: sigmoid or softmax"})
    seed: int = field(default=0, metadata={"help": "random seed of every trial"})

    def __post_init__(self) -> None:
        if not str(self.data).strip():
            raise ValueError("--data is required: the merged dataset (`hashtag merge`'s OUT)")
        if not str(self.out).strip():
            raise ValueError("--out is required: where the results and the model are written")
        if self.model not in models.TRAINABLE:
            raise ValueError(
                f"--model {self.model!r} cannot be tuned; use one of {', '.join(sorted(models.TRAINABLE))}"
            )
        if not self.batch_sizes or any(int(b) != b or b < 1 for b in self.batch_sizes):
            raise ValueError(f"--batch-sizes must be positive integers, got {self.batch_sizes}")
        if not self.learning_rates or any(
            not math.isfinite(lr) or lr <= 0 for lr in self.learning_rates
        ):
            raise ValueError(
                f"--learning-rates must be positive numbers, got {self.learning_rates}"
            )
        for name in ("batch_sizes", "learning_rates"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"--{name.replace('_', '-')} repeats a value: {values}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0 or (self.gpus_per_trial > 1 and self.gpus_per_trial % 1):
            raise ValueError(
                f"--gpus-per-trial must be >= 0, and a whole number above 1; got {self.gpus_per_trial}"
            )
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")
        references = sorted(set(models.available()) - models.TRAINABLE)
        unknown = set(self.references) - set(references)
        if unknown:
            raise ValueError(
                f"unknown reference model(s) {sorted(unknown)}; choose from {', '.join(references)}"
            )
        if self.loss not in models.LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(models.LOSSES)}, got {self.loss!r}")

    def experiment_name(self, dataset: dict[str, Any]) -> str:
        """Same name for the same training settings and dataset (`dataset_fingerprint`), so a
        rerun restores the experiment instead of restarting, and a rebuilt dataset retrains."""
        settings = {
            "dataset": dataset,
            "data": self.data,
            "model": self.model,
            "batch_sizes": list(self.batch_sizes),
            "learning_rates": list(self.learning_rates),
            "epochs": self.epochs,
            "loss": self.loss,
            "seed": self.seed,
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return f"grid-{digest[:10]}"


@dataclass(frozen=True)
class TuneResult(StageResult):
    model: str  # the exported model's URI; "" when nothing was exported
    failed: tuple[str, ...] = ()
    interrupted: bool = False
    has_images: bool = True  # False: a completion model from label-only posts

    @property
    def exit_code(self) -> int:
        """1 when a trial failed or the run was interrupted (a rerun resumes), else 0."""
        return 1 if self.failed or self.interrupted else 0


def tune_metric(name: str) -> str:
    """A metric name Tune's loggers accept (tensorboardX refuses '@'): val_f1@5 -> val_f1_at_5."""
    return name.replace("@", "_at_")


def dataset_fingerprint(dataset) -> dict[str, Any]:
    """What identifies a dataset's content, from its manifest (not its timings)."""
    keys = ("count", "dim", "vocab_size", "label_nnz", "splits", "embedder")
    return {key: dataset.manifest.get(key) for key in keys}


# ---------------------------------------------------------------- inside a trial (a Ray actor)


def _configure_tensorflow(cpus: float) -> None:
    """Bound TensorFlow's thread pools by the trial's CPUs, and let GPU memory grow (so that
    trials with fractional GPUs can share one). Must run before TensorFlow builds anything."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

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
    # Storage settings of the driver (the S3 endpoint override) that the trial's process needs.
    env: dict[str, str] = field(default_factory=dict)


def _model_config(grid: dict[str, Any], settings: TrialSettings):
    return models.ModelConfig(
        batch_size=int(grid["batch_size"]),
        learning_rate=float(grid["learning_rate"]),
        epochs=settings.epochs,
        loss=settings.loss,
        seed=settings.seed,
        threads=max(1, int(settings.cpus)),
    )


def _score(recommender, X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in recommender.score(X, Y).items()}


def _report(recommender, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """One Tune report with a checkpoint: the model folder (weights, optimizer, decision,
    history) and our bookkeeping (`state`)."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="hashtag-ckpt-") as folder:
        recommender.save(os.path.join(folder, CHECKPOINT_MODEL))
        with open(os.path.join(folder, CHECKPOINT_STATE), "w") as f:
            json.dump(state, f)
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


def train_trial(grid: dict[str, Any], settings: TrialSettings) -> None:
    """One grid cell: `grid` holds its batch_size and learning_rate."""
    from ray import tune

    from hashtag.dataset import Dataset

    for name, value in settings.env.items():
        os.environ.setdefault(name, value)
    _configure_tensorflow(settings.cpus)
    dataset = Dataset.load(settings.data)
    X_train, Y_train = dataset.part("train")
    X_val, Y_val = dataset.part("val")

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        recommender = models.create(settings.model, _model_config(grid, settings))
        state: dict[str, Any] = {"seconds": 0.0, "done": False}
    else:
        # A retry or a restored experiment: continue from the last epoch, not from scratch.
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, CHECKPOINT_STATE)) as f:
                state = json.load(f)
            recommender = models.load(os.path.join(folder, CHECKPOINT_MODEL))
    if recommender.epochs_done < settings.epochs:
        recommender.fit(
            X_train,
            Y_train,
            X_val,
            Y_val,
            callbacks=[_EpochReporter(recommender, state)],
            vocab=dataset.vocab,
            resume=checkpoint is not None,
        )
    X_test, Y_test = dataset.part("test")
    state.update(
        done=True, val=_score(recommender, X_val, Y_val), test=_score(recommender, X_test, Y_test)
    )
    _report(
        recommender,
        state,
        {
            "epoch": recommender.epochs_done,
            "done": True,
            "val_f1": state["val"].get("f1", math.nan),
            "test_f1": state["test"].get("f1", math.nan),
            "seconds": state["seconds"],
        },
    )


def _jsonable(value: Any) -> Any:
    """NaN and infinities (a metric of a failed trial) as null: strict JSON readers choke on NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------- the driver


def _storage_target(out: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) of Tune's experiment folder OUT/ray."""
    target = storage.join(out, "ray")
    if not storage.is_remote(target):
        path = os.path.abspath(storage.filesystem(target)[1])
        os.makedirs(path, exist_ok=True)
        return path, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    # Through fsspec, so that AWS_ENDPOINT_URL (MinIO, a test server) applies as everywhere else.
    fs, path = storage.filesystem(target)
    return path, PyFileSystem(FSSpecHandler(fs))


def _references(config: TuneConfig, dataset) -> list[ResultRow]:
    """Popularity and kNN, scored once per dataset; a rerun reads them back."""
    cache_uri = storage.join(config.out, "references.json")
    key = {
        "data": config.data,
        "dataset": dataset_fingerprint(dataset),
        "references": list(config.references),
        "seed": config.seed,
    }
    if storage.exists(cache_uri):
        cached = storage.read_json(cache_uri)
        if cached.get("key") == key:
            return [ResultRow(**row) for row in cached["rows"]]
    X_train, Y_train = dataset.part("train")
    X_val, Y_val = dataset.part("val")
    X_test, Y_test = dataset.part("test")
    rows = []
    for name in config.references:
        started = time.perf_counter()
        recommender = models.create(name, models.ModelConfig(seed=config.seed))
        recommender.fit(X_train, Y_train, X_val, Y_val)
        rows.append(
            ResultRow(
                model=name,
                val=_score(recommender, X_val, Y_val),
                test=_score(recommender, X_test, Y_test),
                seconds=time.perf_counter() - started,
            )
        )
    storage.write_json(cache_uri, {"key": key, "rows": [asdict(r) for r in rows]})
    return rows


def _trial_state(result) -> dict[str, Any] | None:
    """A trial's last checkpoint, read without loading the model: our bookkeeping plus the
    model's epochs and per-epoch history (from its manifest). None without a checkpoint."""
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as folder:
        state_path = os.path.join(folder, CHECKPOINT_STATE)
        manifest_path = os.path.join(folder, CHECKPOINT_MODEL, "manifest.json")
        if not (os.path.exists(state_path) and os.path.exists(manifest_path)):
            return None
        with open(state_path) as f:
            state = json.load(f)
        with open(manifest_path) as f:
            manifest = json.load(f)
    history = manifest.get("history") or {}
    state["history"] = {k: v for k, v in history.items() if k in EPOCH_METRICS}
    state["epoch"] = int(manifest.get("epochs_done", 0))
    return state


def _trial_row(config: TuneConfig, result, state: dict[str, Any] | None) -> ResultRow:
    params = result.config or {}
    common = dict(
        model=config.model,
        batch_size=int(params.get("batch_size", 0)),
        learning_rate=float(params.get("learning_rate", math.nan)),
        trial_id=os.path.basename(str(result.path or "")),
    )
    if state is None or not state.get("done"):
        if result.error is None:  # stopped by Ctrl-C (or a lost driver) before its end
            status = UNFINISHED
        else:
            lines = str(result.error).strip().splitlines() or ["error"]
            status = f"error: {lines[-1][:200]}"
        return ResultRow(**common, status=status, history=(state or {}).get("history", {}))
    return ResultRow(
        **common,
        val=state["val"],
        test=state["test"],
        seconds=float(state["seconds"]),
        epochs=int(state["epoch"]),
        history=state["history"],
    )


def export_model(config: TuneConfig, dataset, recommender, row: ResultRow, completion=None) -> str:
    """Write the self-contained model folder OUT/model/: weights, metadata, co-occurrence
    (with `completion`'s weights, a CooccurrenceConfig, when given)."""
    from hashtag.completion import Cooccurrence

    uri = storage.join(config.out, "model")
    storage.remove(uri)  # no file of an older export may survive beside the new one
    metadata = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": recommender.name,
        "embedder": dataset.embedder,
        "vocab": list(dataset.vocab),
        "decision": asdict(recommender.decision),
        "batch_size": row.batch_size,
        "learning_rate": row.learning_rate,
        "epochs": row.epochs,
        "loss": config.loss,
        "val": row.val,
        "test": row.test,
        "trained_on": {"data": config.data, "count": len(dataset), "dim": dataset.dim},
    }
    if getattr(recommender, "optimizer_state", None):
        # Recommending needs no Adam moments (twice the weights); trial checkpoints keep them.
        recommender.optimizer_state = []
    recommender.save(uri, metadata=metadata)
    _, Y_train = dataset.part("train")
    Cooccurrence(completion).fit(Y_train).save(storage.join(uri, "cooccurrence"))
    return uri


def _best_model(config: TuneConfig, results, best: ResultRow):
    """The best trial's fitted recommender, from its last checkpoint (no retraining)."""
    for result in results:
        params = result.config or {}
        if (params.get("batch_size"), params.get("learning_rate")) == (
            best.batch_size,
            best.learning_rate,
        ) and result.checkpoint is not None:
            with result.checkpoint.as_directory() as folder:
                return models.load(os.path.join(folder, CHECKPOINT_MODEL))
    raise RuntimeError(f"the best trial {best.label} has no checkpoint to export")


def _progress_callback(total: int):
    """A Tune callback drawing one tqdm bar over the grid's trials (Tune itself stays quiet)."""
    from ray.tune import Callback
    from tqdm.auto import tqdm

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.bar = None

        def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment
            return {"bar": None}

        def _step(self, trial, text: str) -> None:
            if self.bar is None:
                self.bar = tqdm(total=total, desc="tune", unit="trial", dynamic_ncols=True)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            f1 = (trial.last_result or {}).get("val_f1")
            self._step(trial, f"last val_f1 {f1:.3f}" if f1 is not None else "")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._step(trial, "a trial failed")

        def on_experiment_end(self, trials, **info) -> None:
            if self.bar is not None:
                self.bar.close()

    return TrialProgress()


def _run_grid(config: TuneConfig, dataset):
    from ray import tune

    from hashtag import raycluster

    storage_path, filesystem = _storage_target(config.out)
    settings = TrialSettings(
        # Tune runs each trial in its own directory: a relative local path would miss.
        data=config.data if storage.is_remote(config.data) else os.path.abspath(config.data),
        model=config.model,
        epochs=config.epochs,
        loss=config.loss,
        seed=config.seed,
        cpus=config.cpus_per_trial,
        env=raycluster.worker_env().get("env_vars", {}),
    )
    params = {
        "batch_size": tune.grid_search(list(config.batch_sizes)),
        "learning_rate": tune.grid_search(list(config.learning_rates)),
    }
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(train_trial, settings=settings), resources)
    name = config.experiment_name(dataset_fingerprint(dataset))
    experiment = f"{storage_path.rstrip('/')}/{name}"
    loud = raycluster.verbose()
    # Every epoch checkpoints (so that a stopped job resumes mid-trial); with short trials that
    # makes Tune print a snapshot-frequency warning several times a second. It is by design here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not loud:  # Tune's own output (checkpoint and syncing notices, tables) only with -v
        # The new output engine prints its experiment box and paths even at verbose=0.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    raycluster.connect()
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        log.info("restoring the Tune experiment at %s", experiment)
        tuner = tune.Tuner.restore(
            experiment,
            trainable=trainable,
            resume_errored=True,
            param_space=params,
            storage_filesystem=filesystem,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=params,
            # Reused actors keep TensorFlow imported between trials (seconds per trial).
            tune_config=tune.TuneConfig(metric="val_f1", mode="max", reuse_actors=True),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                # Tune's per-trial tables only with -v; by default one progress bar.
                verbose=1 if loud else 0,
                callbacks=[]
                if loud
                else [_progress_callback(len(config.batch_sizes) * len(config.learning_rates))],
            ),
        )
    return tuner.fit(), experiment


def _completion_split(dataset, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(given, hidden) of the split's posts with >= 2 tags: half of each post's tags given,
    the other half to find (hashtag/completion.py `hide_half`, seeded)."""
    from hashtag.completion import hide_half

    _, Y = dataset.part(split)
    Y = np.asarray(Y, bool)
    return hide_half(Y[Y.sum(axis=1) >= 2], seed=seed)


def _score_completion(scores: np.ndarray, hidden: np.ndarray) -> dict[str, float]:
    """Every metric of the k best suggestions against the hidden tags (f1 = f1@k)."""
    from hashtag import metrics

    chosen = metrics.top_k_mask(scores, COMPLETION_K) & np.isfinite(scores)
    return {k: float(v) for k, v in metrics.evaluate(hidden, scores, chosen).items()}


def completion_rows(config: TuneConfig, dataset) -> tuple[list[ResultRow], Any]:
    """Completion of label-only posts: popularity, plain co-occurrence P(tag | given) and the
    weighted co-occurrence with its weights chosen on validation (never on test). Returns the
    rows (the chosen one `selected`) and the chosen CooccurrenceConfig."""
    import itertools

    from hashtag.completion import Cooccurrence, CooccurrenceConfig

    _, Y_train = dataset.part("train")
    parts = {split: _completion_split(dataset, split, config.seed) for split in ("val", "test")}
    for split, (given, _) in parts.items():
        if len(given) == 0:
            raise UserError(
                f"{config.data} has no {split} post with two tags or more: completion is scored "
                "by hiding half of each post's tags; merge more posts first"
            )
    frequency = np.asarray(Y_train, bool).mean(axis=0).astype(np.float32)
    started = time.perf_counter()
    counts = Cooccurrence(CooccurrenceConfig(0.0, 0.0, 0.0)).fit(Y_train)
    fit_seconds = time.perf_counter() - started

    def scored(name: str, scores_given, seconds: float, selected: bool = False) -> ResultRow:
        started = time.perf_counter()
        val, test = (_score_completion(scores_given(g), h) for g, h in parts.values())
        seconds += time.perf_counter() - started
        return ResultRow(model=name, val=val, test=test, seconds=seconds, selected=selected)

    def popularity(given: np.ndarray) -> np.ndarray:
        return np.where(given, -np.inf, np.broadcast_to(frequency, given.shape))

    rows = [
        scored("popularity", popularity, 0.0),
        scored("cooccurrence", counts.scores_given, fit_seconds),
    ]
    started = time.perf_counter()
    val_given, val_hidden = parts["val"]
    candidates = [
        CooccurrenceConfig(*values) for values in itertools.product(*COMPLETION_GRID.values())
    ]
    chosen = max(
        candidates,
        key=lambda c: _score_completion(counts.with_config(c).scores_given(val_given), val_hidden)[
            "f1"
        ],
    )
    rows.append(
        scored(
            "completion",
            counts.with_config(chosen).scores_given,
            fit_seconds + time.perf_counter() - started,
            selected=True,
        )
    )
    return rows, chosen


def _run_completion(config: TuneConfig, dataset, started: float) -> TuneResult:
    """Label-only posts: fit what needs no image, export a completion model, say so."""
    rows, chosen = completion_rows(config, dataset)
    best = rows[-1]
    X_train, Y_train = dataset.part("train")
    X_val, Y_val = dataset.part("val")
    recommender = models.create("popularity", models.ModelConfig(seed=config.seed))
    recommender.fit(X_train, Y_train, X_val, Y_val)
    model_uri = export_model(config, dataset, recommender, best, completion=chosen)
    paths = write_report(rows, config.out)
    print(decision_markdown(rows), end="")
    weights = ", ".join(f"{k} {v:g}" for k, v in asdict(chosen).items())
    print(
        f"label-only posts (no image): exported a completion model ({weights}; chosen on "
        f"validation) -> {model_uri}\n"
        f"  complete tags with: hashtag recommend --model {model_uri} --tags TAG1,TAG2"
    )
    summary = {
        "stage": "tune",
        "config": asdict(config),
        "label_only": True,
        "rows": [asdict(r) for r in rows],
        "completion": asdict(chosen),
        "best": {"model": best.model, "val": best.val, "test": best.test},
        "failed": [],
        "model": model_uri,
        "outputs": paths,
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_json(storage.join(config.out, "tune.json"), _jsonable(summary))
    return TuneResult(summary, model_uri, has_images=False)


def run(config: TuneConfig) -> TuneResult:
    """Tune the grid, score the references, write the report, export the best model. On
    label-only posts (no embeddings), fit and export hashtag completion instead."""
    from hashtag.dataset import Dataset

    started = time.perf_counter()
    dataset = Dataset.load(config.data)  # a missing dataset says so (FileNotFoundError)
    for name in ("train", "val", "test"):
        if len(dataset.rows(name)) == 0:
            raise UserError(
                f"{config.data} has no {name} posts: the grid needs train, validation and test "
                "posts; merge more posts (or a different split) first"
            )
    if dataset.dim == 0:
        return _run_completion(config, dataset, started)
    references = _references(config, dataset)
    results, experiment = _run_grid(config, dataset)
    trials = sorted(
        (_trial_row(config, result, _trial_state(result)) for result in results),
        key=lambda r: (r.batch_size, -r.learning_rate),
    )
    finished = [row for row in trials if row.status == "ok"]
    failed = tuple(row.label for row in trials if row.status != "ok")
    rows = trials + references
    log.debug("\n".join(trial_line(row) for row in rows))
    if any(row.status == UNFINISHED for row in trials):
        # Interrupted (Ctrl-C): Tune saved its state; exporting now could pick a worse model.
        print(f"interrupted: rerun the same command to resume {experiment}")
        summary = {"stage": "tune", "interrupted": True, "experiment": experiment, "failed": failed}
        return TuneResult(summary, "", failed, interrupted=True)
    if not finished:
        raise RuntimeError(
            f"every trial of {experiment} failed ({trials[0].status if trials else 'no trials'}); "
            "fix the cause and rerun the same command: failed trials are retried"
        )
    # Choose on validation, never on test.
    best = max(finished, key=lambda r: r.val.get("f1", -math.inf))
    rows = [dataclasses.replace(r, selected=r is best) for r in rows]
    recommender = _best_model(config, results, best)
    model_uri = export_model(config, dataset, recommender, best)
    paths = write_report(rows, config.out)
    print(decision_markdown(rows), end="")
    print(
        f"best on validation: {best.label} (val f1 {best.val.get('f1', math.nan):.4f}, "
        f"test f1@5 {best.test.get('f1@5', math.nan):.4f}) -> {model_uri}"
    )
    print(f"every metric: {paths['results.md']}")
    summary = {
        "stage": "tune",
        "config": asdict(config),
        "experiment": experiment,
        "trials": [asdict(r) for r in trials],
        "references": [asdict(r) for r in references],
        "best": {
            "batch_size": best.batch_size,
            "learning_rate": best.learning_rate,
            "val": best.val,
            "test": best.test,
        },
        "failed": list(failed),
        "model": model_uri,
        "outputs": paths,
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_json(storage.join(config.out, "tune.json"), _jsonable(summary))
    return TuneResult(summary, model_uri, failed)
