"""Tune's heavy work as Ray tasks, so that the driver (on the head: CPU 0, no GPU) only
coordinates and its memory does not grow with the dataset.

    put_splits         one streaming task per split: the split enters the object store a
                       piece (BLOCK_ROWS rows) at a time, owned by the driver, never held whole
                       by any process, never copied (trials, references and the export read
                       read-only views); None when the splits exceed --memory-budget (then
                       every process streams the dataset's parts, by byte ranges on S3)
    submit_references  one task per reference model (knn, ridge, kernel, popularity), running
                       beside the grid; their rows come back small, the fitted models stay in
                       the object store until the selection task takes them
    score_checkpoints  trials that ASHA stopped early: scored from their last checkpoint
    select_and_export  blends, the selection on validation, the refit of the winner (with the
                       trials' CPUs and GPUs) and the export, in one task

The driver holds the manifest, the vocabulary, ObjectRefs and result rows. Every task declares
its CPUs, GPUs and `--task-memory-mb` (0: none, for node types that do not advertise memory) and
bounded retries.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from hashtag import raycluster, selection, trial, tune
from hashtag.dataset import SPLITS


class TrialCheckpoint(NamedTuple):
    """What the selection needs of a trial: its grid cell and last checkpoint (picklable)."""

    config: dict[str, Any]
    checkpoint: Any


def options(config: tune.TuneConfig, *, cpus: float = 1.0, gpus: float = 0.0) -> dict[str, Any]:
    return dict(
        num_cpus=cpus,
        num_gpus=gpus,
        memory=config.task_memory_mb * 2**20 or None,
        max_retries=1,  # a node lost once is retried; a task that keeps failing is reported
        retry_exceptions=False,
        runtime_env=raycluster.worker_env() or None,
    )


def _split_pieces(data: str, name: str, rows: int):
    from hashtag.dataset import Dataset, SharedPages

    for X, indptr, indices in Dataset.load(data).blocks(name, rows):
        yield {"X": X, "indptr": indptr, "indices": indices}
        # The piece now lives in the object store; the pages this worker wrote it through
        # would otherwise stay in its resident memory, the whole split by the end.
        SharedPages.object_store().drop()


def put_splits(config: tune.TuneConfig, dataset) -> dict[str, list] | None:
    """{split: [ObjectRef of a piece, ...]} when the splits fit --memory-budget, else None."""
    import ray

    needed, budget = sum(dataset.split_bytes(s) for s in SPLITS), tune.memory_budget_bytes(config)
    if needed > budget:
        tune.log.info("the splits (%.2f GB) exceed the budget: streamed", needed / 2**30)
        return None
    tune.log.info("the splits (%.2f GB) fit the budget: in the object store", needed / 2**30)
    task = ray.remote(_split_pieces).options(num_returns="streaming", **options(config))
    generators = {
        name: task.remote(tune.data_uri(config), name, trial.BLOCK_ROWS) for name in SPLITS
    }
    return {name: list(generator) for name, generator in generators.items()}


def _reference(config: tune.TuneConfig, arrays, name: str):
    from hashtag.dataset import Dataset

    dataset = Dataset.load(tune.data_uri(config))
    data = trial.TrialData(tune.data_uri(config), arrays)
    return selection.fit_reference(dataset, data, name, seed=config.seed)


def submit_references(config: tune.TuneConfig, arrays) -> dict[str, tuple[Any, Any]]:
    """{name: (ObjectRef of its ResultRow, ObjectRef of the fitted model)}, running."""
    import ray

    task = ray.remote(_reference).options(num_returns=2, **options(config))
    return {name: tuple(task.remote(config, arrays, name)) for name in config.references}


def _score_checkpoint(config: tune.TuneConfig, arrays, checkpoint) -> dict[str, Any]:
    data = trial.TrialData(tune.data_uri(config), arrays)
    recommender = trial.checkpoint_model(checkpoint)
    return {
        "val": trial.score_blocks(recommender, data.blocks("val")),
        "test": trial.score_blocks(recommender, data.blocks("test")),
    }


def score_checkpoints(config: tune.TuneConfig, arrays, checkpoints: list) -> list[dict]:
    """Validation and test scores of each checkpoint's model, as tasks with the trials' CPUs."""
    import ray

    task = ray.remote(_score_checkpoint).options(**options(config, cpus=config.cpus_per_trial))
    return ray.get([task.remote(config, arrays, checkpoint) for checkpoint in checkpoints])


def _select_and_export(settings, data_uri, arrays, finished, checkpoints, references, fitted):
    import ray

    from hashtag.dataset import Dataset

    dataset = Dataset.load(data_uri)
    data = trial.TrialData(data_uri, arrays)
    fitted = dict(zip(fitted, ray.get(list(fitted.values())), strict=True))
    return selection.select_and_export(
        settings, dataset, data, finished, checkpoints, references, fitted
    )


def select_and_export(
    config: tune.TuneConfig,
    settings: selection.SelectionSettings,
    arrays,
    finished,
    checkpoints,
    references,
    fitted_refs,
):
    """selection.select_and_export in a task with the trials' resources (`config`: the refit
    trains like a trial, on a GPU node when trials use GPUs). Returns (rows, best, model uri,
    message)."""
    import ray

    task = ray.remote(_select_and_export).options(
        **options(config, cpus=config.cpus_per_trial, gpus=config.gpus_per_trial)
    )
    # The fitted references travel as ObjectRefs inside a dict: resolved in the task, never here.
    return ray.get(
        task.remote(
            settings, tune.data_uri(config), arrays, finished, checkpoints, references, fitted_refs
        )
    )
