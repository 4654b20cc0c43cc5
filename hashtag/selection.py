"""After the grid: the references, the blends, the selection on validation, the refit of the
winner and its export.

    rows, fitted = fit_references(dataset, data, ("popularity", "knn"), seed=0)
    rows, winner, model = compete(dataset, data, trials, trial_model, rows, fitted, metric="f1@5")
    model, trained_on, refit_row = refit_winner(dataset, data, winner, model, refit="train+val")
    export_model(dataset, model, winner, out=OUT, dataset_uri=DATA, loss="sigmoid", ...)

Every candidate (the finished trials, the references, the blends of BLENDS) is compared on
validation by one metric, never on test. Each function takes the settings it reads;
`select_and_export` (all of it, in one Ray task of tune_tasks.py) takes a `SelectionSettings`,
which the driver builds once from its TuneConfig. The exported folder's format is export.py's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hashtag import export, models, storage
from hashtag.report import ResultRow
from hashtag.trial import TrialData, blocks_of, checkpoint_model, first_rows, score_blocks

REFERENCE_MODELS = ("popularity", "knn", "ridge", "kernel")
REFIT_MODES = ("train+val", "all", "none")
# Blends that compete beside the grid: "best" is the grid's best trial on validation. Kernel
# ridge, not the linear ridge, is the learnt part: on both shared photo sets it is the stronger
# partner of kNN, and fewer blends choose with less noise on a small validation split.
BLENDS = (("best", "knn"), ("kernel", "knn"), ("best", "kernel"), ("best", "kernel", "knn"))

# Over the memory budget, the references that need their rows in memory train on the first
# REFERENCE_ROWS training rows (a random sample: splits are a hash of the post id).
REFERENCE_ROWS = 100_000


@dataclass(frozen=True)
class SelectionSettings:
    """What selection and export read of `hashtag tune`'s settings (TuneConfig.selection())."""

    out: str  # the model goes to OUT/model
    data: str  # the dataset's URI, recorded in the export
    loss: str  # the trials' loss, recorded in the export
    metric: str  # the validation metric that decides
    refit: str  # one of REFIT_MODES
    blends: tuple[tuple[str, ...], ...]  # BLENDS, or () for none


def reference_config(name: str, seed: int, blocks: tuple[int, ...] = ()) -> models.ModelConfig:
    """The settings of a reference model in the table: kNN as the shared sets' README measures
    it (20 neighbours, weights exp(10 x similarity), no prior) but on centred features (the
    features' common direction removed: cosine similarity then compares what differs); ridge
    and kernel ridge on centred features, their penalties chosen on validation."""
    if name == "knn":
        return models.ModelConfig(
            seed=seed,
            knn_neighbours=20,
            knn_temperature=10.0,
            prior_weight=0.0,
            centre=True,
            blocks=blocks,
        )
    if name in ("ridge", "kernel"):
        return models.ModelConfig(seed=seed, centre=True, blocks=blocks)
    return models.ModelConfig(seed=seed)


def _chained(data: TrialData, names: tuple[str, ...], order=None):
    """The blocks of the splits `names`, one split after the other."""
    for name in names:
        yield from data.blocks(name, order)


def _training_rows(data: TrialData, names: tuple[str, ...], n_tags: int):
    """(X, Y) in memory of the splits `names`; over the memory budget the first REFERENCE_ROWS
    of them (a random sample: splits are a hash of the post id)."""
    from hashtag.dataset import dense_labels

    blocks = _chained(data, names)
    if data.dataset is not None:
        blocks = first_rows(blocks, REFERENCE_ROWS)
    parts = [(X, dense_labels(indptr, indices, n_tags)) for X, indptr, indices in blocks]
    return np.concatenate([X for X, _ in parts]), np.concatenate([Y for _, Y in parts])


def _candidate_row(label: str, recommender, data: TrialData, started: float) -> ResultRow:
    return ResultRow(
        model=label,
        val=score_blocks(recommender, data.blocks("val")),
        test=score_blocks(recommender, data.blocks("test")),
        seconds=time.perf_counter() - started,
    )


def fit_references(
    dataset, data: TrialData, names: tuple[str, ...], *, seed: int
) -> tuple[list[ResultRow], dict]:
    """The reference models `names` (popularity, knn, ridge, kernel) in this process: their rows
    and the fitted models (candidates for the export and parts of the blends). `tune.run` fits
    each in a Ray task instead (tune_tasks.py), with `fit_reference`."""
    rows, fitted = [], {}
    for name in names:
        row, fitted[name] = fit_reference(dataset, data, name, seed=seed)
        rows.append(row)
    return rows, fitted


def fit_reference(dataset, data: TrialData, name: str, *, seed: int):
    """One reference model fitted and scored: (its row, the model). A model that streams
    (popularity, kNN's faiss index) reads every training row a block at a time; over the memory
    budget the others train on the first REFERENCE_ROWS training rows."""
    started = time.perf_counter()
    recommender = models.create(name, reference_config(name, seed, blocks_of(dataset)))
    X_val, Y_val = data.validation(dataset.vocab_size)
    if recommender.streams and not recommender.trainable:
        # Popularity counts labels, kNN adds rows to its faiss index: every training row, a
        # block at a time.
        train = models.Blocks(
            lambda order: data.blocks("train", order, embeddings=recommender.reads_features),
            data.count("train"),
            dataset.dim,
            dataset.vocab_size,
        )
        recommender.fit(train, None, X_val, Y_val, vocab=dataset.vocab)
    else:
        X_train, Y_train = _training_rows(data, ("train",), dataset.vocab_size)
        recommender.fit(X_train, Y_train, X_val, Y_val, vocab=dataset.vocab)
        del X_train, Y_train
    return _candidate_row(name, recommender, data, started), recommender


def _blends(dataset, data: TrialData, candidates: dict[str, Any], *, metric: str, blends):
    """Every blend of `blends` (part names) whose parts are there, its weights chosen on
    validation `metric`: (rows, {label: blend})."""
    X_val, Y_val = data.validation(dataset.vocab_size)
    rows, fitted = [], {}
    for names in blends:
        if not all(name in candidates for name in names):
            continue
        started = time.perf_counter()
        blend = models.Blend.of([candidates[n] for n in names], X_val, Y_val, metric=metric)
        label = f"blend: {blend.describe()}"
        if len(blend.parts) < 2 or label in fitted:  # one part won, or a blend seen already
            continue
        rows.append(_candidate_row(label, blend, data, started))
        fitted[label] = blend
    return rows, fitted


def export_model(
    dataset,
    recommender,
    row: ResultRow,
    *,
    out: str,
    dataset_uri: str,
    loss: str,
    trained_on: tuple[str, ...] = ("train",),
    selection: dict[str, Any] | None = None,
    completion=None,
    data: TrialData | None = None,
) -> str:
    """Write the self-contained model folder `out`/model/: the model (a knn or a blend keeps
    its training embeddings and labels), metadata (`dataset_uri` and the trials' `loss` among
    them), and co-occurrence of the labels it learnt from (with `completion`'s weights, a
    CooccurrenceConfig, when given). Returns the folder's URI."""
    from hashtag.completion import Cooccurrence
    from hashtag.dataset import dense_labels

    uri = storage.join(out, "model")
    count = (
        sum(data.count(name) for name in trained_on)
        if data is not None
        else sum(len(dataset.rows(name)) for name in trained_on)
    )
    export.write(
        uri,
        recommender,
        selected=row.label,
        embedder=dataset.embedder,
        vocab=list(dataset.vocab),
        decision=asdict(recommender.decision),
        batch_size=row.batch_size,
        learning_rate=row.learning_rate,
        epochs=row.epochs,
        loss=loss,
        val=row.val,
        test=row.test,
        selection=selection or {},
        trained_on={
            "data": dataset_uri,
            "splits": list(trained_on),
            "count": count,
            "dim": dataset.dim,
        },
    )
    # From the labels the model learnt from, a block of posts at a time.
    if data is not None:
        blocks = (
            dense_labels(indptr, indices, dataset.vocab_size)
            for name in trained_on
            for _, indptr, indices in data.blocks(name, embeddings=False)
        )
    else:
        rows = np.sort(np.concatenate([dataset.rows(name) for name in trained_on]))
        blocks = label_blocks(dataset, rows)
    export.write_cooccurrence(uri, Cooccurrence(completion).fit_blocks(blocks))
    return uri


def label_blocks(dataset, rows: np.ndarray, size: int = 8192):
    """The labels of `rows` as dense bool (b, V) blocks, one in memory at a time."""
    from hashtag.dataset import csr_rows, dense_labels

    indptr, indices = dataset.labels_csr(rows)
    for start in range(0, len(indptr) - 1, size):
        block = np.arange(start, min(start + size, len(indptr) - 1))
        yield dense_labels(*csr_rows(indptr, indices, block), dataset.vocab_size)


def _best_model(results, best: ResultRow):
    """The best trial's fitted recommender, from its last checkpoint (no retraining)."""
    for result in results:
        params = result.config or {}
        if (params.get("batch_size"), params.get("learning_rate")) == (
            best.batch_size,
            best.learning_rate,
        ) and result.checkpoint is not None:
            return checkpoint_model(result.checkpoint)
    raise RuntimeError(f"the best trial {best.label} has no checkpoint to export")


def validation_score(row: ResultRow, metric: str) -> float:
    """The row's validation `metric`, what candidates compete on (-inf when it has none)."""
    value = row.val.get(metric, math.nan)
    return value if math.isfinite(value) else -math.inf


def compete(
    dataset,
    data: TrialData,
    trials: list[ResultRow],
    trial_model: Any,
    references: list[ResultRow],
    fitted: dict[str, Any],
    *,
    metric: str = models.SELECT_METRIC,
    blends: tuple[tuple[str, ...], ...] = BLENDS,
) -> tuple[list[ResultRow], ResultRow, Any]:
    """Every candidate on validation by `metric`, never on test: the finished trials
    (`trial_model(row)` gives a trial's fitted model), the references (`fitted`) and the
    `blends` ("best": the best trial). Returns (reference and blend rows, the winner's row, its
    model)."""
    candidates = dict(fitted)
    if trials:
        best_trial = max(trials, key=lambda r: validation_score(r, metric))
        candidates["best"] = candidates[best_trial.label] = trial_model(best_trial)
    blend_rows, blended = _blends(dataset, data, candidates, metric=metric, blends=blends)
    candidates.update(blended)
    rows = [*references, *blend_rows]
    winner = max([*trials, *rows], key=lambda r: validation_score(r, metric))
    return rows, winner, candidates[winner.label]


def _refit_on(dataset, data: TrialData, recommender, names, metric: str):
    if not recommender.streams:
        X, Y = _training_rows(data, names, dataset.vocab_size)
        return recommender.refit(X, Y, metric)
    rows = sum(data.count(name) for name in names)
    blocks = models.Blocks(
        lambda order: _chained(data, names, order),
        rows,
        dataset.dim,
        dataset.vocab_size,
        array_rows=REFERENCE_ROWS if data.dataset is not None else None,
    )
    return recommender.refit(blocks, None, metric)


def refit_winner(
    dataset,
    data: TrialData,
    winner: ResultRow,
    recommender,
    *,
    refit: str,
    metric: str = models.SELECT_METRIC,
):
    """The winner retrained per `refit` (REFIT_MODES; its epoch count picked on validation
    `metric`). Returns (model to export, the splits it learnt from, a row with the test figures
    of the train+val refit; None for refit none)."""
    if refit == "none":
        return recommender, ("train",), None
    started = time.perf_counter()
    trained_on = ("train", "val")
    recommender = _refit_on(dataset, data, recommender, trained_on, metric)
    row = ResultRow(
        model=f"exported: {winner.label} (refit on train+val)",
        test=score_blocks(recommender, data.blocks("test")),
        epochs=recommender.epochs_done if recommender.trainable else None,
        seconds=time.perf_counter() - started,
    )
    if refit == "all":  # for production: the test figures above are already taken
        trained_on = ("train", "val", "test")
        recommender = _refit_on(dataset, data, recommender, trained_on, metric)
    return recommender, trained_on, row


def _folder_bytes(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    return int(sum(fs.du(path, total=False).values()))


def select_and_export(
    settings: SelectionSettings,
    dataset,
    data: TrialData,
    finished: list[ResultRow],
    results,
    references: list[ResultRow],
    fitted: dict[str, Any],
):
    """compete, refit_winner, export_model. Returns (rows beside the trials, best, model uri,
    the line to print). `results`: each trial's `config` and last `checkpoint`."""
    metric = settings.metric
    rows, winner, recommender = compete(
        dataset,
        data,
        finished,
        lambda row: _best_model(results, row),
        references,
        fitted,
        metric=metric,
        blends=settings.blends,
    )
    recommender, trained_on, refit_row = refit_winner(
        dataset, data, winner, recommender, refit=settings.refit, metric=metric
    )
    selection = {
        "metric": metric,
        "winner": winner.label,
        "refit": settings.refit,
        "candidates": {r.label: r.val.get(metric) for r in [*finished, *rows]},
    }
    model_uri = export_model(
        dataset,
        recommender,
        winner,
        out=settings.out,
        dataset_uri=settings.data,
        loss=settings.loss,
        trained_on=trained_on,
        selection=selection,
        data=data,
    )
    size = _folder_bytes(model_uri)
    message = (
        f"selected on validation {metric} {validation_score(winner, metric):.4f}: {winner.label}; "
        f"exported ({recommender.name}, trained on {'+'.join(trained_on)}, {size / 1e6:.1f} MB"
        f", test {metric} {(refit_row or winner).test.get(metric, math.nan):.4f}) -> {model_uri}"
    )
    best = {
        "model": winner.label,
        "kind": recommender.name,
        "batch_size": winner.batch_size,
        "learning_rate": winner.learning_rate,
        "val": winner.val,
        "test": winner.test,
        "refit_test": refit_row.test if refit_row else {},
        "trained_on": list(trained_on),
        "bytes": size,
    }
    return rows + ([refit_row] if refit_row else []), best, model_uri, message
