"""Tune: config validation, a trial's checkpoint/resume logic without Ray, and a small grid on a
local Ray cluster that writes the report and the model, then resumes without retraining."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from hashtag import models, storage, tune
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
    settings = tune.TrialSettings(data=data, model="mlp", epochs=3, loss="sigmoid", seed=0, cpus=1)
    tune.train_trial(grid, settings)
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3, 3]
    assert [m["done"] for m, _ in reports] == [False, False, False, True]
    final = reports[-1][0]
    assert 0 <= final["val_f1"] <= 1 and final["seconds"] > 0

    # Interrupted after epoch 1: the retry continues with epochs 2 and 3 only.
    reports_before = len(reports)
    resume_from[0] = ray_tune.Checkpoint.from_directory(reports[0][1])
    tune.train_trial(grid, settings)
    resumed = reports[reports_before:]
    assert [m["epoch"] for m, _ in resumed] == [2, 3, 3]
    with open(os.path.join(resumed[-1][1], tune.CHECKPOINT_STATE)) as f:
        state = json.load(f)
    assert state["done"] and set(state["test"]) >= {"f1", "precision", "recall", "f1@5"}
    model = models.load(os.path.join(resumed[-1][1], tune.CHECKPOINT_MODEL))
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
    assert exported.metadata["format"] == tune.EXPORT_FORMAT
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
    row = tune._trial_row(config, result, tune._trial_state(result))
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
    output, _ = child.communicate(timeout=60)
    if "SUMMARY True" not in output:
        pytest.skip("the trial finished before the interrupt landed")
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
    settings = tune.TrialSettings(
        data=data, model="mlp", epochs=4, loss="sigmoid", seed=0, cpus=1,
        dim=dataset.dim, vocab=tuple(dataset.vocab),
    )  # fmt: skip
    arrays = {name: tune.split_arrays(dataset, name) for name in ("train", "val", "test")}
    tune.train_trial(grid, settings, arrays)
    monkeypatch.setattr(tune, "BLOCK_ROWS", 50)  # several blocks per split
    monkeypatch.setattr(tune, "VAL_SAMPLE", 60)  # per-epoch validation on a sample
    tune.train_trial(grid, settings, None)
    in_memory, streamed = [m for m in finals if m["done"]]
    assert in_memory["val_f1"] > 0.5 and abs(in_memory["test_f1"] - streamed["test_f1"]) < 0.06
