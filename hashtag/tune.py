"""The batch size x learning rate grid on Ray Tune, then the export of the best model.

    hashtag tune --data out/dataset --out out/tune --batch-sizes 16,64,256 --learning-rates 1e-2,1e-3,1e-4

This module is the driver: `TuneConfig`, `run`, the grid on Ray Tune (scheduler, progress
bar, the trials' rows) and, on label-only data, the completion rows. One Tune trial per grid
cell (trial.py: it trains with a checkpoint per epoch and reports validation metrics per epoch
and, at the end, every metric on validation and test). Reference models (popularity, kNN,
ridge, kernel) are fitted once per experiment, as Ray tasks beside the grid (tune_tasks.py).

The exported model is chosen on validation (`--select-metric`, default F1@5), never on test,
among the trials, references and blends (selection.py: `compete`), and written to OUT/model/
with what recommend needs: the embedder spec, the vocabulary, the decision rule, and a hashtag
co-occurrence model fitted on the labels it learnt from (OUT/model/cooccurrence/).

Outputs under OUT:
    ray/grid-HASH/     Tune's experiment (trial checkpoints; what a rerun restores)
    results.csv/.md    every metric of every trial and reference, lift over popularity
    heatmap.png        the selection metric over batch size x learning rate (the exported trial
                       outlined);  curves.png: per-epoch curves
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
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hashtag import models, storage, trial
from hashtag.errors import UserError
from hashtag.report import ResultRow, decision_markdown, trial_line, write_report
from hashtag.results import StageResult
from hashtag.selection import (
    BLENDS,
    REFERENCE_MODELS,
    REFIT_MODES,
    SelectionSettings,
    export_model,
    label_blocks,
    validation_score,
)

log = logging.getLogger(__name__)

# Completion (label-only datasets): the weights tried on validation (never on test).
COMPLETION_GRID = {
    "idf_power": (0.0, 0.5, 1.0),
    "lift_power": (0.0, 0.25, 0.5, 0.75),
    "prior_weight": (0.01, 0.1),
}
UNFINISHED = "unfinished"
SCHEDULERS = ("fifo", "asha")
# ASHA: a trial may stop after GRACE epochs, then at every rung GRACE x REDUCTION^k epochs,
# unless its validation metric is in the best 1 / REDUCTION of the trials that reached the rung.
ASHA_GRACE_EPOCHS = 1
ASHA_REDUCTION = 3


@dataclass(frozen=True)
class TuneConfig:
    data: str = field(metadata={"help": "merged dataset URI (merge's OUT), local or s3://"})
    out: str = field(metadata={"help": "where tables, plots, Tune's experiment and the model go"})
    model: str = field(
        default="mlp",
        metadata={"help": "trainable model of the grid: mlp or factorisation (formerly seed)"},
    )
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
        metadata={"help": "reference models scored once beside the grid (popularity, knn, ...)"},
    )
    loss: str = field(default="sigmoid", metadata={"help": "mlp loss: sigmoid or softmax"})
    seed: int = field(default=0, metadata={"help": "random seed of every trial"})
    select_metric: str = field(
        default=models.SELECT_METRIC,
        metadata={
            "help": "validation metric that picks the exported model among the trials, the "
            "references and the blends (f1@5, f1@10, p@5, map, f1...)"
        },
    )
    refit: str = field(
        default="train+val",
        metadata={
            "help": "retrain the chosen model before export on: train+val (default), all "
            "(also test, after its test figures are recorded: production), none"
        },
    )
    blends: bool = field(
        default=True,
        metadata={"help": "score blends of the best trial, knn and kernel compete too"},
    )
    scheduler: str = field(
        default="fifo",
        metadata={
            "help": "fifo: every trial runs all its epochs; asha: trials whose validation "
            "metric trails at a rung (1, 3, 9... epochs) stop early and count with the scores "
            "of their last checkpoint"
        },
    )
    task_memory_mb: int = field(
        default=2048,
        metadata={
            "help": "memory the references', selection/refit and export tasks declare to Ray "
            "(MB); 0 declares none (for node types that do not advertise memory)"
        },
    )
    memory_budget: float = field(
        default=0.0,
        metadata={
            "help": "GB a node gives the training data: under it the splits enter Ray's object "
            "store once and trials share them; over it trials stream the dataset's parts "
            "(0: a quarter of this machine's memory)"
        },
    )

    def __post_init__(self) -> None:
        if not str(self.data).strip():
            raise ValueError("--data is required: the merged dataset (`hashtag merge`'s OUT)")
        if not str(self.out).strip():
            raise ValueError("--out is required: where the results and the model are written")
        if self.model in models.ALIASES:  # an old name: commands and job files still give it
            log.warning("--model %s is now called %s", self.model, models.ALIASES[self.model])
            object.__setattr__(self, "model", models.ALIASES[self.model])
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
        if not (math.isfinite(self.memory_budget) and self.memory_budget >= 0):
            raise ValueError(
                f"--memory-budget must be >= 0 GB (0: automatic), got {self.memory_budget}"
            )
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        if self.task_memory_mb < 0:
            raise ValueError(f"--task-memory-mb must be >= 0, got {self.task_memory_mb}")
        references = sorted(set(models.available()) - models.TRAINABLE - {"blend"})
        unknown = set(self.references) - set(references)
        if unknown:
            raise ValueError(
                f"unknown reference model(s) {sorted(unknown)}; choose from {', '.join(references)}"
            )
        if self.loss not in models.LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(models.LOSSES)}, got {self.loss!r}")
        if self.refit not in REFIT_MODES:
            raise ValueError(f"--refit must be one of {', '.join(REFIT_MODES)}, got {self.refit!r}")
        name, _, k = self.select_metric.partition("@")
        if not (
            (k and name in ("f1", "p", "r", "hit") and k.isdigit() and int(k) >= 1)
            or (not k and self.select_metric in ("f1", "precision", "recall", "map"))
        ):
            raise ValueError(
                f"--select-metric {self.select_metric!r} is not a metric: use f1@5, f1@10, "
                "p@5, r@5, hit@5, map, f1, precision or recall"
            )

    def experiment_name(self, dataset: dict[str, Any]) -> str:
        """Same name for the same training settings and dataset (`dataset_fingerprint`), so a
        rerun restores the experiment instead of restarting, and a rebuilt dataset retrains."""
        old_names = {new: old for old, new in models.ALIASES.items()}
        settings = {
            "dataset": dataset,
            "data": self.data,
            # The name the model had when the experiment was started: a grid of the renamed
            # factorisation (formerly seed) restores the experiment a rerun finds.
            "model": old_names.get(self.model, self.model),
            "batch_sizes": list(self.batch_sizes),
            "learning_rates": list(self.learning_rates),
            "epochs": self.epochs,
            "loss": self.loss,
            "seed": self.seed,
            "features": "centred",
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return f"grid-{digest[:10]}"

    def selection(self) -> SelectionSettings:
        """The settings selection and export read (selection.py), and only those."""
        return SelectionSettings(
            out=self.out,
            data=self.data,
            loss=self.loss,
            metric=self.select_metric,
            refit=self.refit,
            blends=BLENDS if self.blends else (),
        )


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


def memory_budget_bytes(config: TuneConfig) -> int:
    """--memory-budget in bytes; automatic: a quarter of this machine's physical memory."""
    if config.memory_budget:
        return int(config.memory_budget * 2**30)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def dataset_fingerprint(dataset) -> dict[str, Any]:
    """What identifies a dataset's content, from its manifest (not its timings)."""
    keys = ("count", "dim", "vocab_size", "label_nnz", "splits", "embedder")
    return {key: dataset.manifest.get(key) for key in keys}


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


def _stopped_early(results) -> list[int]:
    """Indices of the trials Tune ended (TERMINATED, no error): with ASHA a trial that ended
    before its last epoch was stopped by the scheduler, not interrupted."""
    try:
        trials = results._experiment_analysis.trials  # the grid's Trial objects, in order
    except AttributeError:  # Tune's internals moved: no trial counts as stopped early
        return []
    return [i for i, ended in enumerate(trials) if ended.status == "TERMINATED"]


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


def scheduler_metric(config: TuneConfig) -> str:
    """The Tune metric trials are compared on while they train: validation `select_metric`
    when trials report it every epoch, else validation F1."""
    name = f"val_{config.select_metric}"
    return trial.tune_metric(name) if name in trial.EPOCH_METRICS else "val_f1"


def _scheduler(config: TuneConfig):
    """None (FIFO: every trial runs every epoch) or ASHA on the epochs (`ASHA_*` rungs)."""
    if config.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        max_t=config.epochs,
        grace_period=min(ASHA_GRACE_EPOCHS, config.epochs),
        reduction_factor=ASHA_REDUCTION,
    )


def _absolute(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.abspath(uri)


def data_uri(config: TuneConfig) -> str:
    """The dataset's URI as other processes must see it (Tune runs each trial in its own
    directory, and Ray workers elsewhere: a relative local path would miss)."""
    return _absolute(config.data)


def _run_grid(config: TuneConfig, dataset, arrays):
    from ray import tune

    from hashtag import raycluster

    storage_path, filesystem = _storage_target(config.out)
    settings = trial.TrialSettings(
        data=data_uri(config),
        model=config.model,
        epochs=config.epochs,
        loss=config.loss,
        seed=config.seed,
        cpus=config.cpus_per_trial,
        dim=dataset.dim,
        vocab=tuple(dataset.vocab),
        blocks=trial.blocks_of(dataset),
        env=raycluster.worker_env().get("env_vars", {}),
        metric=scheduler_metric(config),
        select_metric=config.select_metric,
    )
    params = {
        "batch_size": tune.grid_search(list(config.batch_sizes)),
        "learning_rate": tune.grid_search(list(config.learning_rates)),
    }
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    # with_parameters puts the arrays into the object store once; trials get read-only views.
    trainable = tune.with_resources(
        tune.with_parameters(trial.train_trial, settings=settings, arrays=arrays), resources
    )
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
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode="max",
                reuse_actors=True,
                scheduler=_scheduler(config),
            ),
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


def completion_rows(config: TuneConfig, dataset) -> tuple[list[ResultRow], Any]:
    """Completion of label-only posts: popularity, plain co-occurrence P(tag | given) and the
    weighted co-occurrence (its weights the best of COMPLETION_GRID on validation), each scored
    on held-out tags (completion.held_out). Plain and weighted compete on validation by
    `config.select_metric` (never on test; a tie keeps plain, the simpler): the winner is the
    row marked `selected` and its CooccurrenceConfig is returned for export."""
    import itertools

    from hashtag.completion import (
        PLAIN,
        Cooccurrence,
        CooccurrenceConfig,
        held_out,
        popularity_scores,
        score_suggestions,
    )

    parts = {split: held_out(dataset.part(split)[1], config.seed) for split in ("val", "test")}
    for split, (given, _) in parts.items():
        if len(given) == 0:
            raise UserError(
                f"{config.data} has no {split} post with two tags or more: completion is scored "
                "by hiding half of each post's tags; merge more posts first"
            )
    started = time.perf_counter()
    counts = Cooccurrence(PLAIN).fit_blocks(label_blocks(dataset, dataset.rows("train")))
    fit_seconds = time.perf_counter() - started
    frequency = np.diag(counts.counts) / counts.n_posts
    metric = config.select_metric

    def scored(name: str, scores_given, seconds: float) -> ResultRow:
        started = time.perf_counter()
        val, test = (score_suggestions(scores_given(g), h) for g, h in parts.values())
        seconds += time.perf_counter() - started
        return ResultRow(model=name, val=val, test=test, seconds=seconds)

    rows = [
        scored("popularity", lambda given: popularity_scores(frequency, given), 0.0),
        scored("cooccurrence", counts.scores_given, fit_seconds),
    ]
    started = time.perf_counter()
    val_given, val_hidden = parts["val"]
    candidates = [
        CooccurrenceConfig(*values) for values in itertools.product(*COMPLETION_GRID.values())
    ]
    weighted = max(
        candidates,
        key=lambda c: validation_score(
            ResultRow(
                model="",
                val=score_suggestions(counts.with_config(c).scores_given(val_given), val_hidden),
            ),
            metric,
        ),
    )
    rows.append(
        scored(
            "completion",
            counts.with_config(weighted).scores_given,
            fit_seconds + time.perf_counter() - started,
        )
    )
    # Plain co-occurrence is a candidate too: the weights must earn their place on validation.
    plain_wins = validation_score(rows[1], metric) >= validation_score(rows[2], metric)
    chosen, winner = (PLAIN, "cooccurrence") if plain_wins else (weighted, "completion")
    rows = [dataclasses.replace(r, selected=r.model == winner) for r in rows]
    return rows, chosen


def _run_completion(config: TuneConfig, dataset, started: float) -> TuneResult:
    """Label-only posts: fit what needs no image, export a completion model, say so."""
    rows, chosen = completion_rows(config, dataset)
    (best,) = [r for r in rows if r.selected]
    # Popularity counts the training labels a block at a time (never a dense train x V matrix);
    # the validation split, dense, chooses its decision rule.
    train = models.Blocks(
        lambda order: dataset.blocks("train", order=order, embeddings=False),
        len(dataset.rows("train")),
        dataset.dim,
        dataset.vocab_size,
    )
    X_val, Y_val = dataset.part("val")
    recommender = models.create("popularity", models.ModelConfig(seed=config.seed))
    recommender.fit(train, None, X_val, Y_val)
    model_uri = export_model(
        dataset,
        recommender,
        best,
        out=config.out,
        dataset_uri=config.data,
        loss=config.loss,
        completion=chosen,
    )
    paths = write_report(rows, config.out, select_metric=config.select_metric)
    print(decision_markdown(rows, select_metric=config.select_metric), end="")
    weights = ", ".join(f"{k} {v:g}" for k, v in asdict(chosen).items())
    print(
        f"label-only posts (no image): exported a completion model ({best.model}: {weights}; "
        f"chosen on validation {config.select_metric}) -> {model_uri}\n"
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
    storage.write_json(storage.join(config.out, "tune.json"), storage.json_safe(summary))
    return TuneResult(summary, model_uri, has_images=False)


def near_duplicate_line(dataset) -> str:
    """The line under the table that says whether test figures can be flattered by reposts:
    how many test posts had a near-duplicate in train before merge grouped them, and after."""
    near = dataset.manifest.get("near_duplicates")
    if not isinstance(near, dict) or not isinstance(near.get("test_with_train_copy"), dict):
        return (
            "near-duplicates: not checked (merged without near-duplicate grouping): test posts "
            "may have copies in train; rerun `hashtag merge`"
        )
    leak = near["test_with_train_copy"]
    return (
        f"near-duplicates (cosine >= {near.get('similarity')}): {leak.get('before')} test posts "
        f"had a near-duplicate in train before grouping, {leak.get('after')} after "
        f"(--near-duplicates {near.get('mode')}; {near.get('groups')} groups)"
    )


def _trial_data(config: TuneConfig, dataset) -> trial.TrialData:
    """The splits in memory (for the object store) when they fit the budget, else streamed."""
    from hashtag.dataset import SPLITS

    needed, budget = sum(dataset.split_bytes(s) for s in SPLITS), memory_budget_bytes(config)
    if needed <= budget:
        log.info("the splits (%.2f GB) fit the budget: trials share them", needed / 2**30)
        return trial.TrialData(config.data, {s: trial.split_arrays(dataset, s) for s in SPLITS})
    log.info("the splits (%.2f GB) exceed the budget: trials stream them", needed / 2**30)
    return trial.TrialData(config.data, None)


def run(config: TuneConfig) -> TuneResult:
    """Tune the grid, score the references, write the report, export the best model. On
    label-only posts (no embeddings), fit and export hashtag completion instead. The heavy
    work runs as Ray tasks (tune_tasks.py): this process reads the manifest and the vocabulary
    and coordinates."""
    import ray

    from hashtag import raycluster, tune_tasks
    from hashtag.dataset import SPLITS, Dataset

    started = time.perf_counter()
    dataset = Dataset.load(config.data)  # a missing dataset says so (FileNotFoundError)
    for name in SPLITS:
        if dataset.split_count(name) == 0:
            raise UserError(
                f"{config.data} has no {name} posts: the grid needs train, validation and test "
                "posts; merge more posts (or a different split) first"
            )
    if dataset.dim == 0:
        return _run_completion(config, dataset, started)
    raycluster.connect()
    grid_config = config  # the experiment's name keeps the paths as the user gave them
    config = dataclasses.replace(config, data=data_uri(config), out=_absolute(config.out))
    arrays = tune_tasks.put_splits(config, dataset)
    reference_refs = tune_tasks.submit_references(config, arrays)
    results, experiment = _run_grid(grid_config, dataset, arrays)
    states = [trial.checkpoint_state(result.checkpoint) for result in results]
    stopped = [
        i for i in _stopped_early(results) if states[i] is not None and not states[i].get("done")
    ]
    if stopped:  # ASHA stopped them: they count, scored from their last checkpoint
        scores = tune_tasks.score_checkpoints(
            config, arrays, [results[i].checkpoint for i in stopped]
        )
        for i, scored in zip(stopped, scores, strict=True):
            states[i].update(scored, done=True, stopped_early=True)
    trials = sorted(
        (_trial_row(config, result, state) for result, state in zip(results, states, strict=True)),
        key=lambda r: (r.batch_size, -r.learning_rate),
    )
    references = [ray.get(row) for row, _ in reference_refs.values()]
    fitted_refs = {name: model for name, (_, model) in reference_refs.items()}
    finished = [row for row in trials if row.status == "ok"]
    failed = tuple(row.label for row in trials if row.status != "ok")
    log.debug("\n".join(trial_line(row) for row in trials + references))
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
    checkpoints = [
        tune_tasks.TrialCheckpoint(dict(result.config or {}), result.checkpoint)
        for result in results
    ]
    others, best, model_uri, message = tune_tasks.select_and_export(
        config, config.selection(), arrays, finished, checkpoints, references, fitted_refs
    )
    print(message)
    rows = [dataclasses.replace(r, selected=r.label == best["model"]) for r in trials + others]
    paths = write_report(rows, grid_config.out, select_metric=config.select_metric)
    print(decision_markdown(rows, select_metric=config.select_metric), end="")
    # One line under the table (the CLI's output stays as short as it was).
    print(f"{near_duplicate_line(dataset)}; every metric: {paths['results.md']}")
    summary = {
        "stage": "tune",
        "config": asdict(grid_config),
        "experiment": experiment,
        "trials": [asdict(r) for r in trials],
        "references": [asdict(r) for r in references],
        "candidates": [asdict(r) for r in others],
        "best": best,
        "near_duplicates": dataset.manifest.get("near_duplicates"),
        "failed": list(failed),
        "model": model_uri,
        "outputs": paths,
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_json(storage.join(grid_config.out, "tune.json"), storage.json_safe(summary))
    return TuneResult(summary, model_uri, failed)
