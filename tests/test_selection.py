"""The exported model is the best row of its own table: selection over trials, references and
blends on validation; the refit on train + validation; blends and feature ensembles through
export and load; EmbedderSpec; merge refuses mixed embedder sets. No Ray: these are the
functions `tune.run` calls after the grid (selection.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import missing
from test_merge import write as write_shard
from test_tune import write_dataset

from hashtag import embedders, merge, models, recommend, selection, trial, tune
from hashtag.dataset import Dataset, DatasetWriter, csr_from_lists
from hashtag.embedders import EmbedderSpec
from hashtag.errors import ArtifactError, UserError
from hashtag.models import ModelConfig
from hashtag.recommend import RecommendConfig
from hashtag.report import ResultRow

V2 = "mobilenet_v2_1.0_224_quant.tflite"
V1 = "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"


def _row(fitted, dataset, **identity) -> ResultRow:
    score = {name: fitted.score(*dataset.part(name)) for name in ("val", "test")}
    return ResultRow(val=score["val"], test=score["test"], epochs=fitted.epochs_done, **identity)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data") / "data"), posts=300)


@pytest.fixture(scope="module")
def weak_trial(dataset):
    """An MLP trial that barely trained (one epoch at a tiny learning rate): worse than kNN."""
    config = ModelConfig(batch_size=64, learning_rate=1e-5, epochs=1, hidden=16, centre=True)
    mlp = models.create("mlp", config)
    mlp.fit(*dataset.part("train"), *dataset.part("val"), vocab=dataset.vocab)
    return _row(mlp, dataset, model="mlp", batch_size=64, learning_rate=1e-5), mlp


def test_selection_exports_a_better_non_mlp_winner(tmp_path, dataset, weak_trial):
    row, mlp = weak_trial
    config = tune.TuneConfig(data=dataset.uri, out=str(tmp_path / "out"), refit="none")
    settings = config.selection()
    data = tune._trial_data(config, dataset)
    references, fitted = selection.fit_references(
        dataset, data, config.references, seed=config.seed
    )
    rows, winner, chosen = selection.compete(
        dataset, data, [row], lambda r: mlp, references, fitted,
        metric=settings.metric, blends=settings.blends,
    )  # fmt: skip
    labels = [r.label for r in rows]
    assert {"popularity", "knn", "ridge", "kernel"} <= set(labels)
    # A blend whose best weights leave one part is that part's row already: not repeated.
    assert 1 <= sum(label.startswith("blend: ") for label in labels) <= len(selection.BLENDS)
    assert winner.val["f1@5"] == max(r.val["f1@5"] for r in [row, *rows])  # on validation
    assert winner.val["f1@5"] > row.val["f1@5"] and chosen is not mlp
    uri = selection.export_model(
        dataset, chosen, winner, out=settings.out, dataset_uri=settings.data, loss=settings.loss
    )
    exported = recommend.ExportedModel(uri)
    assert exported.metadata["selected"] == winner.label
    assert exported.recommender.name == chosen.name != "mlp"
    X_test, Y_test = dataset.part("test")
    assert exported.recommender.score(X_test, Y_test)["f1@5"] == pytest.approx(winner.test["f1@5"])


@pytest.mark.parametrize("name", ["knn", "ridge", "kernel", "mlp"])
def test_refit_learns_from_train_and_validation(tmp_path, dataset, weak_trial, name):
    sizes = {n: len(dataset.part(n)[0]) for n in ("train", "val", "test")}
    if name == "mlp":
        row, model = weak_trial
    else:
        model = models.create(name, selection.reference_config(name, 0))
        model.fit(*dataset.part("train"), *dataset.part("val"), vocab=dataset.vocab)
        row = _row(model, dataset, model=name)
    for mode, seen in [("train+val", ("train", "val")), ("all", ("train", "val", "test"))]:
        config = tune.TuneConfig(data=dataset.uri, out=str(tmp_path / mode), refit=mode)
        data = tune._trial_data(config, dataset)
        refit, trained_on, refit_row = selection.refit_winner(
            dataset, data, row, model, refit=config.refit, metric=config.select_metric
        )
        assert trained_on == seen and refit is not model
        assert refit.decision == model.decision  # chosen on validation, kept
        assert set(refit_row.test) >= {"f1@5", "f1@10"} and refit_row.label.startswith("exported")
        if name == "knn":  # the vote stores the rows it learnt from
            assert refit.rows == sum(sizes[n] for n in seen)
        if name in ("ridge", "kernel"):  # the penalty chosen on validation stays
            assert refit.penalty == model.penalty
        if name == "mlp":  # epochs picked on validation; no validation data in the refit
            assert refit.epochs_done == model.best_epoch() and "val_f1" not in refit.history
    none = tune.TuneConfig(data=dataset.uri, out=str(tmp_path / "none"), refit="none")
    assert selection.refit_winner(dataset, data, row, model, refit=none.refit) == (
        model,
        ("train",),
        None,
    )


def test_blend_of_ensemble_features_round_trips(tmp_path, dataset):
    """A blend of centred ridge and kNN on two embedders' blocks: save, load, refit."""
    blocks = (10, 6)  # as if two embedders of dims 10 and 6 made the 16-d features
    parts = []
    for name in ("ridge", "knn"):
        part = models.create(name, selection.reference_config(name, 0, blocks))
        parts.append(part.fit(*dataset.part("train"), *dataset.part("val"), vocab=dataset.vocab))
    assert parts[0].feature_mean.shape == (16,)
    blend = models.Blend.of(parts, *dataset.part("val"))
    assert blend.weights.sum() == pytest.approx(1.0) and len(blend.weights) == 2
    X_test, _ = dataset.part("test")
    blend.save(str(tmp_path / "blend"), metadata={"note": "x"})
    loaded = models.load(str(tmp_path / "blend"))
    assert loaded.name == "blend" and loaded.metadata == {"note": "x"}
    assert [p.config.blocks for p in loaded.parts] == [blocks, blocks]
    np.testing.assert_allclose(loaded.predict_scores(X_test), blend.predict_scores(X_test))
    np.testing.assert_array_equal(loaded.parts[0].feature_mean, parts[0].feature_mean)
    X, Y = (np.concatenate(a) for a in zip(dataset.part("train"), dataset.part("val"), strict=True))
    refit = loaded.refit(X, Y)
    assert refit.parts[1].rows == len(X)
    shutil.rmtree(tmp_path / "blend" / "part-1")  # a blend with a part missing is refused
    with pytest.raises(ArtifactError, match="2 blend weights for 1 parts"):
        models.load(str(tmp_path / "blend"))
    with pytest.raises(ValueError, match="blocks"):
        models.create("knn", ModelConfig(centre=True, blocks=(10, 5))).fit(*dataset.part("train"))


def test_embedder_spec_parse_json_and_equality():
    spec = EmbedderSpec.parse("tflite:/m/a.tflite#pool", num_threads=2)
    assert (spec.kind, spec.arg, spec.get("num_threads")) == ("tflite", "/m/a.tflite#pool", 2)
    assert spec == EmbedderSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert spec != EmbedderSpec.parse("tflite:/m/a.tflite#pool")
    a = EmbedderSpec("tflite", "/m/a.tflite", (("dim", 1280), ("input_range", [-1, 1])))
    b = EmbedderSpec("tflite", "/m/b.tflite", (("dim", 1024),))
    both = EmbedderSpec.ensemble([a, b])
    assert both.kind == "ensemble" and both.blocks == (1280, 1024) and both.dim == 2304
    assert EmbedderSpec.from_json(json.loads(json.dumps(both.to_json()))) == both
    assert hash(both) == hash(EmbedderSpec.from_json(both.to_json()))
    assert (
        EmbedderSpec.ensemble([a]) == a and str(both) == "tflite:/m/a.tflite + tflite:/m/b.tflite"
    )
    with pytest.raises(UserError, match="unknown embedder"):
        EmbedderSpec.parse("resnet:50")
    with pytest.raises(UserError, match="two or more"):
        EmbedderSpec("ensemble", parts=(a,))


def test_merge_refuses_mixed_embedder_sets(tmp_path):
    one = {"name": "classic", "version": 1}
    two = EmbedderSpec.ensemble(
        [EmbedderSpec.from_json(one), EmbedderSpec("tflite", "m.tflite", (("dim", 1),))]
    ).to_json()
    write_shard(str(tmp_path / "s"), 0, [("a", ["x"], "s1")], embedder=one)
    write_shard(str(tmp_path / "s"), 1, [("b", ["x"], "s2")], embedder=two)
    with pytest.raises(UserError, match="one embedder set only"):
        merge.run(merge.MergeConfig(shards=str(tmp_path / "s"), out=str(tmp_path / "d")))


def test_a_two_embedder_export_recommends_on_new_photos(tmp_path, shared_dir):
    """MobileNetV2 + MobileNetV1 side by side: embed real photos, export a centred blend,
    recommend on photos it never saw (each embedded by both models, combined the same way)."""
    from hashtag import ingest
    from hashtag.fetch import Fetcher
    from hashtag.sources import open_source

    if not (shared_dir / "models" / V1).is_file():
        missing("the TFLite models are not in ../shared/models")
    request = EmbedderSpec.ensemble(
        [EmbedderSpec.parse(f"tflite:{shared_dir / 'models' / name}") for name in (V2, V1)]
    )
    embedder = embedders.create_from_spec(request, num_threads=1)
    spec = embedder.spec  # the identity: each model's hash and dim
    posts = list(open_source(str(shared_dir / "data" / "feedme-food" / "posts.jsonl")).posts())
    result = ingest.embed_posts(posts[:44], embedder, Fetcher(), threads=2)
    X = result.embeddings
    assert X.shape == (44, 1280 + 1024) and spec.blocks == (1280, 1024)
    # Each part has norm 1/sqrt(2): the models can split the blocks again.
    np.testing.assert_allclose(np.linalg.norm(X[:, :1280], axis=1), np.sqrt(0.5), rtol=1e-4)
    vocab = ["food", "yummy", "dinner"]
    Y = np.array([[t in p.tags for t in vocab] for p in result.posts])
    indptr, indices = csr_from_lists([list(np.flatnonzero(row)) for row in Y])
    split = np.array([0] * 30 + [1] * 10 + [2] * 4, np.uint8)
    with DatasetWriter(str(tmp_path / "d"), dim=X.shape[1], id_length=8) as writer:
        writer.append(X, [p.id for p in result.posts], split, indptr, indices)
        writer.finish(vocab=vocab, tag_counts=Y.sum(0).tolist(), embedder=spec.to_json())
    dataset = Dataset.load(str(tmp_path / "d"))
    parts = [
        models.create(n, selection.reference_config(n, 0, trial.blocks_of(dataset))).fit(
            X[:30], Y[:30], vocab=vocab
        )
        for n in ("ridge", "knn")
    ]
    blend = models.Blend.of(parts, X[30:40], Y[30:40])
    if len(blend.parts) < 2:  # validation gave one part all the weight: that part is the model
        blend = blend.parts[0]
    uri = selection.export_model(
        dataset, blend, ResultRow(model=blend.describe()),
        out=str(tmp_path / "tune"), dataset_uri=dataset.uri, loss="sigmoid",
    )  # fmt: skip
    manifest = json.loads((tmp_path / "tune" / "model" / "manifest.json").read_text())
    assert manifest["extra"]["embedder"]["parts"][1]["dim"] == 1024
    new = [p.image for p in posts[40:44]]  # never in the training rows
    results = recommend.recommend(RecommendConfig(model=uri, images=tuple(new), k=2))
    assert [r["image"] for r in results] == new
    assert all(len(r["hashtags"]) == 2 for r in results), results
    # The same tags as the blend gives the scrape's vectors of those photos.
    top = blend.predict_scores(X[40:41])[0].argsort()[::-1][:2]
    assert [h["tag"] for h in results[0]["hashtags"]] == [vocab[i] for i in top]


@pytest.mark.slow
def test_a_two_embedder_scrape_through_merge_tune_and_recommend(tmp_path, shared_dir):
    """`hashtag pipeline` with two --embedder flags on 40 real photos (scrape on Ray, merge,
    tune, export), then `hashtag recommend` on a photo the model never saw: the ensemble's spec
    travels from the shards to the dataset and the model, and recommend embeds with both."""
    import subprocess
    import sys

    if not (shared_dir / "models" / V1).is_file():
        missing("the TFLite models are not in ../shared/models")
    folder = shared_dir / "data" / "feedme-food"
    rows = [json.loads(line) for line in (folder / "posts.jsonl").read_text().splitlines()[:41]]
    manifest = tmp_path / "posts.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"p{n}", "image": str(folder / r["image"]), "tags": r["tags"]}) + "\n"
            for n, r in enumerate(rows[:40])
        )
    )
    out = tmp_path / "run"
    models_dir = shared_dir / "models"
    argv = [
        "pipeline", "--source", str(manifest), "--out", str(out),
        "--embedder", f"tflite:{models_dir / V2}", "--embedder", f"tflite:{models_dir / V1}",
        "--shard-size", "20", "--epochs", "2", "--batch-sizes", "16", "--learning-rates", "1e-2",
        "--examples", "1",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "hashtag.cli", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dataset = Dataset.load(str(out / "dataset"))
    spec = EmbedderSpec.from_json(dataset.embedder)
    assert spec.blocks == (1280, 1024) and dataset.dim == 2304
    model = out / "tune" / "model"
    exported = models.load(str(model))
    assert EmbedderSpec.from_json(exported.metadata["embedder"]) == spec
    photo = folder / rows[40]["image"]  # not among the 40 scraped
    done = subprocess.run(
        [sys.executable, "-m", "hashtag.cli", "recommend", "--model", str(model), "--json",
         str(photo)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (answer,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert answer["image"] == str(photo) and answer["hashtags"]
    assert {h["tag"] for h in answer["hashtags"]} <= set(dataset.vocab)
