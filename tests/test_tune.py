"""Tune: config validation, a trial's checkpoint/resume logic without Ray, and a small grid on a
local Ray cluster that writes the report and the model, then resumes without retraining."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hashtag import export, models, selection, storage, trial, tune
from hashtag.completion import Cooccurrence
from hashtag.dataset import Dataset, DatasetWriter, csr_from_lists

CLASSIC_SPEC = {"name": "classic", "version": 1}


def write_dataset(
    uri: str, *, posts: int = 240, dim: int = 16, tags: int = 10, seed: int = 0, embedder=None
) -> Dataset:
    """A small learnable dataset: each post is near the centre of its main tag, which it
    carries with the next tag and sometimes a random one. Splits 60/20/20."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(tags, dim)).astype(np.float32)
    main = rng.integers(tags, size=posts)
    embeddings = centres[main] + 0.3 * rng.normal(size=(posts, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = [
        sorted(
            {int(m), int((m + 1) % tags)}
            | ({int(rng.integers(tags))} if rng.random() < 0.5 else set())
        )
        for m in main
    ]
    split = np.resize(np.array([0, 0, 0, 1, 2], np.uint8), posts)
    rng.shuffle(split)
    counts = np.bincount(np.concatenate(labels), minlength=tags)
    order = np.argsort(-counts, kind="stable")  # vocabulary: most frequent first
    remap = np.empty(tags, np.int64)
    remap[order] = np.arange(tags)
    indptr, indices = csr_from_lists([[int(remap[t]) for t in row] for row in labels])
    with DatasetWriter(uri, dim=dim, id_length=8) as writer:
        writer.append(embeddings, [f"p{i}" for i in range(posts)], split, indptr, indices)
        writer.finish(
            vocab=[f"tag{int(t)}" for t in order],
            tag_counts=counts[order].tolist(),
            embedder=embedder or CLASSIC_SPEC,
        )
    return Dataset.load(uri)


def export_knn(root, *, posts: int, dim: int, tags: int, embedder=None) -> str:
    """A kNN model on a write_dataset set under `root`, exported the way tune exports it
    (metadata, co-occurrence, its validation scores); no TensorFlow. Returns the model URI."""
    from hashtag import models, selection
    from hashtag.report import ResultRow

    data = str(Path(root) / "data")
    dataset = write_dataset(data, posts=posts, dim=dim, tags=tags, embedder=embedder)
    X, Y = dataset.part("train")
    X_val, Y_val = dataset.part("val")
    knn = models.create("knn", models.ModelConfig()).fit(X, Y, X_val, Y_val, vocab=dataset.vocab)
    row = ResultRow(model="knn", val=knn.score(X_val, Y_val))
    return selection.export_model(
        dataset, knn, row, out=str(Path(root) / "tune"), dataset_uri=data, loss="sigmoid"
    )


def test_config_validation_says_what_to_do(tmp_path):
    ok = dict(data=str(tmp_path / "d"), out=str(tmp_path / "o"))
    tune.TuneConfig(**ok)
    cases = [
        (dict(model="knn"), "cannot be tuned"),
        (dict(batch_sizes=()), "batch-sizes"),
        (dict(batch_sizes=(16, 0)), "batch-sizes"),
        (dict(learning_rates=(1e-3, -1.0)), "learning-rates"),
        (dict(learning_rates=(1e-3, 1e-3)), "repeats"),
        (dict(epochs=0), "epochs"),
        (dict(cpus_per_trial=0), "cpus-per-trial"),
        (dict(gpus_per_trial=1.5), "gpus-per-trial"),
        (dict(max_failures=-1), "max-failures"),
        (dict(references=("popularity", "oracle")), "reference"),
        (dict(loss="hinge"), "loss"),
        (dict(data=""), "--data"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            tune.TuneConfig(**{**ok, **change})
    fingerprint = {"count": 10, "label_nnz": 20}
    name = tune.TuneConfig(**ok).experiment_name(fingerprint)
    assert (
        tune.TuneConfig(**ok, cpus_per_trial=2, max_failures=5).experiment_name(fingerprint) == name
    )
    assert tune.TuneConfig(**ok, epochs=3).experiment_name(fingerprint) != name
    assert tune.TuneConfig(**ok).experiment_name({**fingerprint, "count": 11}) != name
    # The factorisation model's old name still works, and a grid started under it resumes.
    renamed = tune.TuneConfig(**{**ok, "model": "seed"})
    assert renamed.model == "factorisation"
    assert renamed.experiment_name(fingerprint) == tune.TuneConfig(
        **{**ok, "model": "factorisation"}
    ).experiment_name(fingerprint)


def test_trial_checkpoints_every_epoch_and_resumes(tmp_path, monkeypatch):
    """train_trial outside Tune: report/get_checkpoint replaced, checkpoints copied aside."""
    from ray import tune as ray_tune

    data = str(tmp_path / "data")
    write_dataset(data, posts=120)
    reports: list[tuple[dict, str]] = []

    def fake_report(metrics, checkpoint=None):
        kept = str(tmp_path / f"ckpt{len(reports)}")
        shutil.copytree(checkpoint.path, kept)
        reports.append((metrics, kept))

    resume_from: list = [None]
    monkeypatch.setattr(ray_tune, "report", fake_report)
    monkeypatch.setattr(ray_tune, "get_checkpoint", lambda: resume_from[0])
    grid = {"batch_size": 16, "learning_rate": 1e-2}
    settings = trial.TrialSettings(data=data, model="mlp", epochs=3, loss="sigmoid", seed=0, cpus=1)
    trial.train_trial(grid, settings)
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3, 3]
    assert [m["done"] for m, _ in reports] == [False, False, False, True]
    final = reports[-1][0]
    assert 0 <= final["val_f1"] <= 1 and final["seconds"] > 0

    # Interrupted after epoch 1: the retry continues with epochs 2 and 3 only.
    reports_before = len(reports)
    resume_from[0] = ray_tune.Checkpoint.from_directory(reports[0][1])
    trial.train_trial(grid, settings)
    resumed = reports[reports_before:]
    assert [m["epoch"] for m, _ in resumed] == [2, 3, 3]
    with open(os.path.join(resumed[-1][1], trial.CHECKPOINT_STATE)) as f:
        state = json.load(f)
    assert state["done"] and set(state["test"]) >= {"f1", "precision", "recall", "f1@5"}
    model = models.load(os.path.join(resumed[-1][1], trial.CHECKPOINT_MODEL))
    assert model.epochs_done == 3 and len(model.history["val_f1"]) == 3


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_grid_on_ray_writes_report_and_model_then_resumes(tmp_path, local_ray, capsys):
    data = str(tmp_path / "data")
    dataset = write_dataset(data)
    config = tune.TuneConfig(
        data=data,
        out=str(tmp_path / "out"),
        batch_sizes=(16, 64),
        learning_rates=(1e-2,),
        epochs=2,
        cpus_per_trial=1,
    )
    summary = tune.run(config)
    printed = capsys.readouterr().out
    assert "(selected)" in printed and "| 16 | 0.01 |" in printed  # the decision table
    report = (tmp_path / "out" / "results.md").read_text()
    assert "Model bs: 16 / lr: 0.01 / f1: " in report and "Model bs: 64 / lr: 0.01" in report
    assert "popularity" in printed and "knn" in printed
    assert "near-duplicates: not checked" in printed  # written without merge's grouping
    out = tmp_path / "out"
    for name in ("results.csv", "results.md", "heatmap.png", "curves.png", "tune.json"):
        assert (out / name).stat().st_size > 0, name
    assert not summary["failed"]
    assert len(summary["trials"]) == 2 and all(t["epochs"] == 2 for t in summary["trials"])
    assert all(len(t["history"]["val_f1"]) == 2 for t in summary["trials"])
    best = summary["best"]
    contenders = [c for c in summary["trials"] + summary["candidates"] if c["val"]]
    assert best["val"]["f1@5"] == max(c["val"]["f1@5"] for c in contenders)  # on validation
    assert {"knn", "ridge"} <= {c["model"] for c in contenders}
    assert best["trained_on"] == ["train", "val"]  # refit before export
    table = (out / "results.md").read_text()
    assert "selected" in table and "refit on train+val" in table

    # The export loads on its own: no dataset, no Ray state.
    exported = models.load(summary["model"])
    assert exported.metadata["vocab"] == dataset.vocab
    assert exported.metadata["embedder"] == CLASSIC_SPEC
    assert exported.metadata["format"] == export.FORMAT
    assert exported.metadata["decision"]["kind"] in ("top_k", "threshold")
    X_test, Y_test = dataset.part("test")
    assert exported.score(X_test, Y_test)["f1"] == pytest.approx(best["refit_test"]["f1"])
    completion = Cooccurrence.load(storage.join(summary["model"], "cooccurrence"))
    assert completion.n_tags == len(dataset.vocab)

    # The same command again restores the finished experiment: nothing is retrained.
    again = tune.run(config)
    assert again["experiment"] == summary["experiment"]
    seconds = sorted(t["seconds"] for t in summary["trials"])
    assert sorted(t["seconds"] for t in again["trials"]) == seconds
    assert again["best"] == summary["best"]


def test_relative_paths_reach_the_trials(tmp_path, local_ray, monkeypatch):
    """Tune runs each trial in its own directory; `--data runs/dataset` must still be found."""
    write_dataset(str(tmp_path / "data"), posts=120)
    monkeypatch.chdir(tmp_path)
    config = tune.TuneConfig(
        data="data", out="out", batch_sizes=(32,), learning_rates=(1e-2,), epochs=1,
        references=("popularity",),
    )  # fmt: skip
    summary = tune.run(config)
    assert not summary["failed"] and (tmp_path / "out" / "model" / "manifest.json").is_file()


@pytest.mark.slow
def test_grid_with_data_and_results_on_s3(tmp_path, s3_bucket, local_ray):
    local = str(tmp_path / "data")
    write_dataset(local, posts=120)
    fs, bucket = storage.filesystem(s3_bucket)
    fs.put(local, f"{bucket}/data", recursive=True)
    config = tune.TuneConfig(
        data=f"{s3_bucket}/data",
        out=f"{s3_bucket}/tune",
        batch_sizes=(32,),
        learning_rates=(1e-2,),
        epochs=1,
        references=("popularity",),
    )
    summary = tune.run(config)
    assert not summary["failed"] and summary["experiment"].startswith(bucket)
    for name in ("results.csv", "heatmap.png", "tune.json", "model/manifest.json"):
        assert storage.exists(f"{s3_bucket}/tune/{name}"), name
    assert models.load(f"{s3_bucket}/tune/model").metadata["vocab"]
    # Rerun: the experiment is found on S3 and restored.
    assert tune.run(config)["trials"] == summary["trials"]


def test_a_failed_trial_is_a_row_with_its_error(tmp_path):
    from types import SimpleNamespace

    config = tune.TuneConfig(data=str(tmp_path / "d"), out=str(tmp_path / "o"))
    result = SimpleNamespace(
        config={"batch_size": 64, "learning_rate": 1e-3},
        error=RuntimeError("Traceback ...\nValueError: out of memory"),
        checkpoint=None,
        path="/x/train_trial_00001",
    )
    row = tune._trial_row(config, result, trial.checkpoint_state(result.checkpoint))
    assert (row.batch_size, row.learning_rate) == (64, 1e-3)
    assert row.status == "error: ValueError: out of memory" and not row.test


@pytest.mark.slow
def test_an_interrupted_experiment_resumes_with_the_same_command(tmp_path, local_ray):
    """Ctrl-C (SIGINT) in the middle of a trial; the same run() continues from its checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    write_dataset(data, posts=600)
    settings = dict(batch_sizes=(8,), learning_rates=(1e-3,), epochs=12, references=("popularity",))
    script = (
        "import ray, sys\n"
        "ray.init(num_cpus=1, include_dashboard=False, logging_level='ERROR')\n"
        "from hashtag import tune\n"
        f"summary = tune.run(tune.TuneConfig(data={data!r}, out={out!r}, **{settings!r}))\n"
        "print('SUMMARY', summary.get('interrupted', False))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(
        (tmp_path / "out").glob("ray/*/*/checkpoint_000001")
    ):
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    try:
        output, _ = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        output, _ = child.communicate()
        pytest.fail(f"the interrupted tune did not exit within 120 s:\n{output[-3000:]}")
    # The child must have come back cleanly from the interrupt (a crash is a failure, not a
    # skip); had the trial finished first, the rerun below checks a plain restore instead.
    assert child.returncode == 0 and "SUMMARY" in output, output[-3000:]
    summary = tune.run(tune.TuneConfig(data=data, out=out, **settings))
    (trial,) = summary["trials"]
    assert trial["status"] == "ok" and trial["epochs"] == 12
    assert len(trial["history"]["val_f1"]) == 12
    # Tune's log of the trial's reports, both runs: epoch 1 was trained once (continued, not
    # restarted); epoch 12 is reported twice (last epoch, then the final scores).
    import csv

    (progress,) = (tmp_path / "out").glob("ray/*/*/progress.csv")
    epochs = [int(row["epoch"]) for row in csv.DictReader(progress.open())]
    # An interrupt that lands between an epoch's end and its checkpoint retrains that one epoch.
    assert epochs[0] == 1 and sorted(set(epochs)) == list(range(1, 13))
    assert len(epochs) - 13 <= 1, f"more than one epoch retrained after the interrupt: {epochs}"


def test_streamed_trial_learns_what_the_in_memory_trial_learns(tmp_path, monkeypatch):
    """The same grid cell with the splits from the object store's arrays and streamed from the
    dataset in small blocks (same seed): the same model within noise."""
    from ray import tune as ray_tune

    data = str(tmp_path / "data")
    dataset = write_dataset(data, posts=400)
    finals: list[dict] = []
    monkeypatch.setattr(ray_tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray_tune, "report", lambda metrics, checkpoint=None: finals.append(metrics))
    grid = {"batch_size": 16, "learning_rate": 1e-2}
    settings = trial.TrialSettings(
        data=data, model="mlp", epochs=4, loss="sigmoid", seed=0, cpus=1,
        dim=dataset.dim, vocab=tuple(dataset.vocab),
    )  # fmt: skip
    arrays = {name: trial.split_arrays(dataset, name) for name in ("train", "val", "test")}
    trial.train_trial(grid, settings, arrays)
    monkeypatch.setattr(trial, "BLOCK_ROWS", 50)  # several blocks per split
    monkeypatch.setattr(trial, "VAL_SAMPLE", 60)  # per-epoch validation on a sample
    trial.train_trial(grid, settings, None)
    in_memory, streamed = [m for m in finals if m["done"]]
    assert in_memory["val_f1"] > 0.5 and abs(in_memory["test_f1"] - streamed["test_f1"]) < 0.06


@pytest.mark.slow
def test_asha_and_the_work_runs_in_tasks_not_in_the_driver(tmp_path, local_ray, monkeypatch):
    """--scheduler asha: trials trailing at a rung stop early and still count (scored from
    their last checkpoint). The driver reads no row: the splits, references, selection, refit
    and export run as Ray tasks (forbidden here, in the driver's process, they would fail), and
    give the references' figures this process computes itself."""
    from hashtag import dataset as dataset_module

    data = str(tmp_path / "data")
    dataset = write_dataset(data, posts=300)
    config = tune.TuneConfig(
        data=data, out=str(tmp_path / "out"), batch_sizes=(16,),
        learning_rates=(3e-2, 1e-7, 1e-8), epochs=4, cpus_per_trial=2,
        references=("popularity", "knn"), scheduler="asha",
    )  # fmt: skip
    expected, _ = selection.fit_references(
        dataset, tune._trial_data(config, dataset), config.references, seed=config.seed
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("the driver read rows of the dataset")

    monkeypatch.setattr(dataset_module.Dataset, "blocks", forbidden)
    monkeypatch.setattr(dataset_module, "piece_blocks", forbidden)
    monkeypatch.setattr(models.Recommender, "fit", forbidden)
    summary = tune.run(config)
    trials = summary["trials"]
    assert not summary["failed"] and all(t["status"] == "ok" for t in trials)
    assert all(t["test"] and t["val"] for t in trials)
    # Trials run one at a time (2 CPUs each), the best first: the others stop at the first rung.
    assert sorted(t["epochs"] for t in trials) == [1, 1, 4], trials
    got = {r["model"]: r for r in summary["references"]}
    for row in expected:
        assert got[row.model]["test"] == pytest.approx(row.test)
    assert (tmp_path / "out" / "model" / "manifest.json").is_file()


def write_label_only(uri: str, *, posts: int = 400, seed: int = 0) -> Dataset:
    """Label-only posts (dim 0): 4 topics of 3 tags each; a post carries 2-3 tags of its topic,
    often the generic tag0 and sometimes a random one. Splits 60/20/20."""
    rng = np.random.default_rng(seed)
    labels = []
    for _ in range(posts):
        topic = 1 + 3 * int(rng.integers(4))
        tags = set(
            rng.choice(np.arange(topic, topic + 3), size=int(rng.integers(2, 4)), replace=False)
        )
        tags |= {0} if rng.random() < 0.6 else set()
        tags |= {int(rng.integers(13))} if rng.random() < 0.3 else set()
        labels.append(sorted(int(t) for t in tags))
    split = np.resize(np.array([0, 0, 0, 1, 2], np.uint8), posts)
    rng.shuffle(split)
    counts = np.bincount(np.concatenate(labels), minlength=13)
    indptr, indices = csr_from_lists(labels)
    with DatasetWriter(uri, dim=0, id_length=8) as writer:
        writer.append(
            np.zeros((posts, 0), np.float32),
            [f"p{i}" for i in range(posts)],
            split,
            indptr,
            indices,
        )
        writer.finish(
            vocab=[f"tag{t}" for t in range(13)], tag_counts=counts.tolist(), embedder=CLASSIC_SPEC
        )
    return Dataset.load(uri)


@pytest.mark.parametrize("metric", ["f1@5", "map"])
def test_completion_is_selected_on_validation_among_plain_and_weighted(tmp_path, metric):
    """The decision rule, not a constant: the row marked selected is the better of plain
    co-occurrence and the weighted completion on validation `select_metric` (plain on a tie),
    and its weights are the ones returned for export."""
    from hashtag.completion import PLAIN

    dataset = write_label_only(str(tmp_path / "data"))
    config = tune.TuneConfig(
        data=str(tmp_path / "data"), out=str(tmp_path / "o"), select_metric=metric
    )
    rows, chosen = tune.completion_rows(config, dataset)
    by_name = {r.model: r for r in rows}
    assert set(by_name) == {"popularity", "cooccurrence", "completion"}
    assert [r.model for r in rows if r.selected] == [
        "cooccurrence"
        if by_name["cooccurrence"].val[metric] >= by_name["completion"].val[metric]
        else "completion"
    ]
    assert (chosen == PLAIN) == by_name["cooccurrence"].selected


def test_plain_cooccurrence_is_exported_when_it_wins_on_validation(tmp_path, monkeypatch):
    """A weight grid that can only hurt (lift power 3 promotes the rarest tags): plain
    co-occurrence wins on validation, is marked selected and is what the model completes with."""
    from hashtag.completion import PLAIN

    write_label_only(str(tmp_path / "data"))
    monkeypatch.setattr(
        tune, "COMPLETION_GRID", {"idf_power": (2.0,), "lift_power": (3.0,), "prior_weight": (0.0,)}
    )
    summary = tune.run(tune.TuneConfig(data=str(tmp_path / "data"), out=str(tmp_path / "o")))
    rows = {r["model"]: r for r in summary["rows"]}
    assert rows["cooccurrence"]["val"]["f1@5"] > rows["completion"]["val"]["f1@5"]
    assert rows["cooccurrence"]["selected"] and not rows["completion"]["selected"]
    assert summary["best"]["model"] == "cooccurrence"
    exported = Cooccurrence.load(str(tmp_path / "o" / "model" / "cooccurrence"))
    assert exported.config == PLAIN
    assert "cooccurrence (selected)" in (tmp_path / "o" / "results.md").read_text()


@pytest.mark.slow
def test_over_the_memory_budget_with_another_select_metric(tmp_path, local_ray, monkeypatch):
    """A tiny --memory-budget: trials stream the parts, the knn reference streams EVERY training
    row into its faiss index (no sample), the winner is refit streamed and exported; and a
    non-default --select-metric (map) decides, in the summary, the table and the export."""
    data = str(tmp_path / "data")
    dataset = write_dataset(data, posts=300)
    config = tune.TuneConfig(
        data=data, out=str(tmp_path / "out"), batch_sizes=(16,), learning_rates=(1e-2,),
        epochs=3, references=("popularity", "knn"), memory_budget=1e-6, select_metric="map",
    )  # fmt: skip
    assert tune._trial_data(config, dataset).arrays is None  # over the budget: streamed
    summary = tune.run(config)
    assert not summary["failed"] and summary.exit_code == 0
    (trial,) = summary["trials"]
    assert trial["status"] == "ok" and trial["epochs"] == 3

    # The knn reference learnt from every training row, streamed, as if it held them all.
    X_train, Y_train = dataset.part("train")
    whole = models.create("knn", selection.reference_config("knn", config.seed))
    whole.fit(X_train, Y_train, *dataset.part("val"), vocab=dataset.vocab)
    knn = next(r for r in summary["references"] if r["model"] == "knn")
    assert knn["val"]["map"] == pytest.approx(whole.score(*dataset.part("val"))["map"], abs=1e-6)

    # map decides: the winner has the best validation map of every candidate.
    contenders = [c for c in summary["trials"] + summary["candidates"] if c["val"]]
    best = summary["best"]
    assert best["val"]["map"] == max(c["val"]["map"] for c in contenders)
    assert "val mAP (decides)" in (tmp_path / "out" / "results.md").read_text()
    exported = models.load(summary["model"])
    assert exported.metadata["selection"]["metric"] == "map"
    assert exported.metadata["trained_on"]["splits"] == ["train", "val"]
    if exported.name == "knn":  # refit on every row of train + validation, streamed
        assert exported.index.ntotal == len(dataset.rows("train")) + len(dataset.rows("val"))
    else:  # the mlp (or a blend holding it) refit from the streamed parts
        assert best["refit_test"] and best["kind"] in ("mlp", "blend")
    X_test, Y_test = dataset.part("test")
    assert exported.score(X_test, Y_test)["map"] == pytest.approx(best["refit_test"]["map"])


@pytest.mark.slow
def test_failed_trials_exit_1_and_a_rerun_retries_them(tmp_path, local_ray, monkeypatch):
    """A trial that fails (max_failures 0) is a row with its error and exit status 1; the same
    command again retries it (and keeps the finished one). With max_failures 1 Tune retries a
    failing trial itself and the run succeeds."""
    data = str(tmp_path / "data")
    write_dataset(data, posts=120)
    original = trial.train_trial

    def flaky(marker: str):
        def flaky_trial(grid, settings, arrays=None):
            # Pickled by value into the trial actors: fails the first time it runs bs 16.
            if grid["batch_size"] == 16 and not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError("planted failure")
            return original(grid, settings, arrays)

        return flaky_trial

    settings = dict(
        data=data, batch_sizes=(16, 32), learning_rates=(1e-2,), epochs=1,
        references=("popularity",), blends=False,
    )  # fmt: skip
    monkeypatch.setattr(trial, "train_trial", flaky(str(tmp_path / "failed-once")))
    config = tune.TuneConfig(out=str(tmp_path / "out"), max_failures=0, **settings)
    first = tune.run(config)
    assert first["failed"] == ["mlp bs=16 lr=0.01"] and first.exit_code == 1
    failed = next(t for t in first["trials"] if t["batch_size"] == 16)
    assert "planted failure" in failed["status"]
    seconds_32 = next(t["seconds"] for t in first["trials"] if t["batch_size"] == 32)
    again = tune.run(config)  # the same command: the failed trial is retried, and passes now
    assert not again["failed"] and again.exit_code == 0
    assert [t["status"] for t in again["trials"]] == ["ok", "ok"]
    assert next(t["seconds"] for t in again["trials"] if t["batch_size"] == 32) == seconds_32

    monkeypatch.setattr(trial, "train_trial", flaky(str(tmp_path / "failed-once-2")))
    retried = tune.run(tune.TuneConfig(out=str(tmp_path / "out2"), max_failures=1, **settings))
    assert not retried["failed"] and retried.exit_code == 0
    assert (tmp_path / "failed-once-2").exists()  # it did fail once
