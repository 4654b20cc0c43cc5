"""Recommenders on a synthetic dataset where the embedding carries the signal.

Images sit in clusters of embedding space; each cluster has its own four hashtags, and four
generic hashtags are popular everywhere. Popularity can only find the generic ones, so a model
that reads the embedding must beat it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hashtag import models
from hashtag.dataset import array_blocks
from hashtag.errors import ArtifactError
from hashtag.models import Decision, ModelConfig, choose_decision

FAST = dict(epochs=4, hidden=64, latent_dim=32, batch_size=128, learning_rate=1e-2)


def synthetic(n: int = 2300, dim: int = 32, clusters: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    cluster = rng.integers(clusters, size=n)
    X = (centres[cluster] + 0.7 * rng.normal(size=(n, dim))).astype(np.float32)
    Y = np.zeros((n, 4 + 4 * clusters), bool)
    Y[:, :4] = rng.random((n, 4)) < [0.6, 0.5, 0.4, 0.3]
    own = 4 + cluster[:, None] * 4 + np.arange(4)
    Y[np.arange(n)[:, None], own] = rng.random((n, 4)) < 0.7
    return X, Y


@pytest.fixture(scope="module")
def data():
    X, Y = synthetic()
    return {
        "test": (X[:500], Y[:500]),
        "val": (X[500:800], Y[500:800]),
        "train": (X[800:], Y[800:]),
    }


@pytest.fixture(scope="module")
def popularity_score(data):
    model = models.create("popularity").fit(*data["train"], *data["val"])
    return model.score(*data["test"])


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.calls: list[tuple[int, dict]] = []
        self.stop_after = stop_after

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        self.calls.append((epoch, logs))
        return self.stop_after is not None and len(self.calls) >= self.stop_after


def test_registry_and_config_validation():
    assert models.available() == [
        "blend", "factorisation", "kernel", "knn", "mlp", "popularity", "ridge"
    ]  # fmt: skip
    assert models.TRAINABLE == {"factorisation", "mlp"}
    assert {n for n in models.available() if models.create(n).trainable} == models.TRAINABLE
    with pytest.raises(ValueError, match="available"):
        models.create("transformer")
    with pytest.raises(ValueError, match="loss"):
        ModelConfig(loss="hinge")
    with pytest.raises(ValueError, match="batch_size"):
        ModelConfig(batch_size=0)
    with pytest.raises(ValueError, match="learning_rate"):
        ModelConfig(learning_rate=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        Decision("top_k", 2.5)


def test_choose_decision_picks_best_rule():
    y = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]], bool)
    # Scores rank the true tags first, with one or two per image: a threshold does best.
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.7, 0.2, 0.1, 0.0], [0.1, 0.9, 0.6, 0.0]])
    decision = choose_decision(y, scores, thresholds=[0.5, 0.3])
    assert decision == Decision("threshold", 0.5)
    assert decision.apply(scores).tolist() == y.tolist()
    assert choose_decision(y, scores, thresholds=[]) == Decision("top_k", 2)


def test_popularity_recommends_the_most_frequent_tags(data, popularity_score):
    X, Y = data["train"]
    model = models.create("popularity", ModelConfig(k=3)).fit(X, Y)
    assert model.decision == Decision("top_k", 3)
    predicted = model.predict(data["test"][0][:2])
    assert predicted.dtype == bool and predicted.sum(axis=1).tolist() == [3, 3]
    assert set(np.flatnonzero(predicted[0])) == set(np.argsort(-Y.sum(0), kind="stable")[:3])
    assert 0.3 < popularity_score["f1"] < 0.5


def test_knn_beats_popularity(data, popularity_score):
    model = models.create("knn").fit(*data["train"], *data["val"])
    result = model.score(*data["test"])
    assert result["f1"] > popularity_score["f1"] + 0.15
    assert result["map"] > popularity_score["map"] + 0.15


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_mlp_learns_and_reports_each_epoch(data, popularity_score, loss):
    recorder = Recorder()
    model = models.create("mlp", ModelConfig(**FAST, loss=loss))
    model.fit(*data["train"], *data["val"], callbacks=[recorder])
    assert [epoch for epoch, _ in recorder.calls] == [0, 1, 2, 3]
    assert {"loss", "val_f1", "val_p@5", "val_map"} <= set(recorder.calls[-1][1])
    assert len(model.history["loss"]) == 4 and model.history["loss"][-1] < model.history["loss"][0]
    assert model.score(*data["test"])["f1"] > popularity_score["f1"] + 0.15
    scores = model.predict_scores(data["test"][0])
    assert scores.dtype == np.float32 and scores.shape == data["test"][1].shape


def test_callback_can_stop_training(data):
    model = models.create("mlp", ModelConfig(**FAST))
    model.fit(*data["train"], *data["val"], callbacks=[Recorder(stop_after=2)])
    assert model.epochs_done == 2


def test_factorisation_model_trains_with_fixed_threshold(data, popularity_score):
    config = ModelConfig(**{**FAST, "epochs": 2, "batch_size": 256})
    model = models.create("factorisation", config).fit(*data["train"], *data["val"])
    assert model.decision == Decision("threshold", 0.5)
    scores = model.predict_scores(data["test"][0])
    assert ((scores >= 0) & (scores <= 1)).all()
    assert model.score(*data["test"])["f1"] > popularity_score["f1"]


def test_kernel_ridge_is_exact_up_to_its_landmarks_then_nystroem(data, popularity_score):
    """Up to `kernel_landmarks` rows: (K + lambda I)^-1 (Y - mean), solved directly here. With
    fewer landmarks (Nystroem) it still learns; refit keeps the penalty chosen on validation."""
    X, Y = data["train"]
    X, Y = X[:400], Y[:400]
    model = models.create("kernel", ModelConfig(kernel_lambda=0.3)).fit(X, Y)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    t = model.config.kernel_temperature
    K = np.exp(t * (unit @ unit.T - 1))
    alpha = np.linalg.solve(K + 0.3 * np.eye(len(K)), Y - Y.mean(0))
    X_test = data["test"][0]
    test_unit = X_test / np.linalg.norm(X_test, axis=1, keepdims=True)
    expected = np.exp(t * (test_unit @ unit.T - 1)) @ alpha + Y.mean(0)
    np.testing.assert_allclose(model.predict_scores(X_test), expected, rtol=1e-3, atol=1e-3)

    chosen = models.create("kernel", ModelConfig(kernel_landmarks=200)).fit(
        *data["train"], *data["val"]
    )
    assert len(chosen.landmarks) == 200 and chosen.penalty in models.KERNEL_LAMBDAS
    assert chosen.score(*data["test"])["f1@5"] > popularity_score["f1@5"]
    refit = chosen.refit(*data["val"])
    assert refit.penalty == chosen.penalty and refit.config.kernel_lambda == chosen.penalty
    with pytest.raises(ValueError, match="kernel_temperature"):
        ModelConfig(kernel_temperature=0)
    with pytest.raises(ValueError, match="kernel_landmarks must be in"):
        ModelConfig(kernel_landmarks=100_000)


@pytest.mark.parametrize("name", ["popularity", "knn", "kernel", "mlp", "factorisation"])
def test_save_load_roundtrip_without_pickle(tmp_path, data, name):
    X, Y = data["train"]
    vocab = [f"tag{i}" for i in range(Y.shape[1])]
    config = ModelConfig(**{**FAST, "epochs": 1})
    model = models.create(name, config).fit(X, Y, *data["val"], vocab=vocab)
    uri = str(tmp_path / name)
    model.save(uri, metadata={"embedder": {"name": "classic", "version": 1}})

    for path in (tmp_path / name).glob("*.npy"):
        np.load(path, allow_pickle=False)
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    assert manifest["model"] == name and manifest["version"] == models.VERSION

    loaded = models.load(uri)
    assert loaded.config == config and loaded.vocab == vocab and loaded.decision == model.decision
    assert loaded.metadata == {"embedder": {"name": "classic", "version": 1}}
    X_test = data["test"][0]
    np.testing.assert_allclose(loaded.predict_scores(X_test), model.predict_scores(X_test))


def test_the_factorisation_models_old_name_seed_still_creates_and_loads(tmp_path, data):
    """Saved models, Tune checkpoints and commands from before the rename say "seed"."""
    assert isinstance(models.create("seed"), models.Factorisation)
    X, Y = data["train"]
    model = models.create("factorisation", ModelConfig(**{**FAST, "epochs": 1})).fit(X, Y)
    uri = str(tmp_path / "old")
    model.save(uri)
    path = tmp_path / "old" / "manifest.json"
    path.write_text(path.read_text().replace('"model": "factorisation"', '"model": "seed"'))
    assert json.loads(path.read_text())["model"] == "seed"
    X_test = data["test"][0]
    loaded = models.load(uri)
    assert loaded.name == "factorisation"
    np.testing.assert_allclose(loaded.predict_scores(X_test), model.predict_scores(X_test))


def test_resume_from_checkpoint_continues_training(tmp_path, data):
    config = ModelConfig(**FAST)
    first = models.create("mlp", config)
    first.fit(*data["train"], *data["val"], callbacks=[Recorder(stop_after=2)])
    first.save(str(tmp_path / "ckpt"))

    resumed = models.load(str(tmp_path / "ckpt"))
    assert resumed.epochs_done == 2 and resumed.optimizer_state
    recorder = Recorder()
    resumed.fit(*data["train"], *data["val"], callbacks=[recorder], resume=True)
    assert [epoch for epoch, _ in recorder.calls] == [2, 3]
    assert resumed.epochs_done == 4 and len(resumed.history["loss"]) == 4

    in_memory = models.create("mlp", config).set_state(first.get_state())
    np.testing.assert_array_equal(
        in_memory.predict_scores(data["test"][0]), first.predict_scores(data["test"][0])
    )


def test_input_validation_messages(data):
    X, Y = data["train"]
    model = models.create("popularity")
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict_scores(X)
    with pytest.raises(ValueError, match="rows"):
        model.fit(X, Y[:10])
    with pytest.raises(ValueError, match="0/1"):
        model.fit(X, Y.astype(int) * 2)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.fit(bad, Y)
    with pytest.raises(ValueError, match="both"):
        model.fit(X, Y, X_val=X)
    model.fit(X, Y.astype(np.uint8))
    with pytest.raises(ValueError, match="embedding dim"):
        model.predict(X[:, :5])
    with pytest.raises(FileNotFoundError, match="manifest"):
        models.load("/nonexistent/model")


def _brute_force_knn_scores(model, X_train, Y_train, X):
    """The vote as it was before faiss: a dense similarity scan and a dense label matrix."""
    config = model.config
    base = model.features(X_train)
    base = base / np.linalg.norm(base, axis=1, keepdims=True)
    indices, sims = models.nearest_neighbours(model.features(X), base, config.knn_neighbours)
    if config.knn_temperature:
        weights = np.exp(config.knn_temperature * (sims - sims[:, :1]))
    else:
        weights = np.maximum(sims, 0.0) + 1e-6
    weights /= weights.sum(axis=1, keepdims=True)
    votes = np.einsum("bk,bkv->bv", weights, Y_train[indices].astype(np.float32))
    return (1 - config.prior_weight) * votes + config.prior_weight * Y_train.mean(axis=0)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        ModelConfig(knn_neighbours=20, knn_temperature=10.0, prior_weight=0.0, centre=True),
    ],
)
def test_exact_faiss_knn_equals_the_brute_force_scores(data, config):
    X, Y = data["train"]
    model = models.create("knn", config).fit(X, Y, *data["val"])
    import faiss

    assert model.index.ntotal == len(X) and type(model.index).__name__ == "IndexFlat"
    assert model.index.metric_type == faiss.METRIC_INNER_PRODUCT  # IndexFlatIP: exact
    X_test = data["test"][0]
    expected = _brute_force_knn_scores(model, X, Y, X_test)
    np.testing.assert_allclose(model.predict_scores(X_test), expected, rtol=1e-5, atol=1e-5)


def test_knn_from_blocks_and_approximate_index_round_trip(tmp_path, data):
    """Fitted from Blocks (as over the memory budget) it equals the fit on arrays; an IVF index
    is exported as index.faiss (with its sha256), labels as CSR, and loads back memory-mapped."""
    X, Y = data["train"]
    indptr, indices = models.csr_of(Y)
    blocks = models.Blocks(
        lambda order: array_blocks(X, indptr, indices, order, block_rows=300),
        len(X), X.shape[1], Y.shape[1],
    )  # fmt: skip
    from_arrays = models.create("knn").fit(X, Y)
    from_blocks = models.create("knn").fit(blocks, None)
    X_test = data["test"][0]
    np.testing.assert_allclose(
        from_blocks.predict_scores(X_test), from_arrays.predict_scores(X_test), atol=1e-6
    )
    approximate = models.create("knn", ModelConfig(knn_index="ivf-flat")).fit(blocks, None)
    assert "IVF" in type(approximate.index).__name__ and approximate.rows == len(X)
    uri = str(tmp_path / "knn")
    approximate.save(uri)
    manifest = json.loads((tmp_path / "knn" / "manifest.json").read_text())
    assert manifest["data_files"] == ["index.faiss"]
    assert set(manifest["files"]) == {
        "index.faiss", "labels_indptr.npy", "labels_indices.npy", "frequency.npy"
    }  # fmt: skip
    loaded = models.load(uri)
    np.testing.assert_allclose(loaded.predict_scores(X_test), approximate.predict_scores(X_test))
    # Exact vs approximate on this small set: the same quality, near enough.
    f1 = [m.score(*data["test"])["f1@5"] for m in (from_arrays, approximate)]
    assert abs(f1[0] - f1[1]) < 0.02


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_index_file_is_refused_by_name(tmp_path, data, damage):
    """The sha256 is checked before faiss parses the file (faiss on garbage can crash)."""
    uri = tmp_path / "knn"
    models.create("knn").fit(*data["train"]).save(str(uri))
    path = uri / "index.faiss"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[: len(raw) // 3]
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="index.faiss"):
        models.load(str(uri))


def test_knn_export_on_s3_round_trips_and_refuses_damage(s3_bucket, data):
    """On object storage the index is downloaded, checked (size, sha256), then parsed."""
    from hashtag import storage

    model = models.create("knn").fit(*data["train"])
    uri = f"{s3_bucket}/knn"
    model.save(uri)
    X_test = data["test"][0]
    np.testing.assert_allclose(
        models.load(uri).predict_scores(X_test), model.predict_scores(X_test)
    )
    raw = bytearray(storage.read_bytes(f"{uri}/index.faiss"))
    raw[100] ^= 0xFF
    storage.write_bytes(f"{uri}/index.faiss", bytes(raw))
    with pytest.raises(ArtifactError, match="index.faiss"):
        models.load(uri)


def test_index_plan_from_rows_and_dim():
    from hashtag import neighbours

    assert neighbours.plan(100_000, 2304).kind == "flat"  # exact up to EXACT_ROWS
    ivf = neighbours.plan(1_000_000, 256)  # 1 GB of float32 lists: under 2 GiB
    assert (ivf.kind, ivf.nlist, ivf.nprobe) == ("ivf-flat", 2048, 128)
    assert ivf.train_rows == neighbours.MAX_TRAIN_ROWS
    assert neighbours.plan(500_000, 2304).kind == "ivf-sq8"  # 4.6 GB raw, 1.2 GB as SQ8
    pq = neighbours.plan(10_000_000, 2304)
    assert pq.kind == "ivf-pq" and 2304 % pq.pq_m == 0 and 4 <= 2304 // pq.pq_m
    assert 10_000_000 * pq.pq_m <= neighbours.CODES_BYTES
    assert neighbours.plan(100, 8, kind="ivf-flat").nlist == 2  # at most n / 39 cells


def test_knn_on_a_pq_index_learns(data, popularity_score):
    model = models.create("knn", ModelConfig(knn_index="ivf-pq")).fit(*data["train"])
    assert type(model.index).__name__ == "IndexIVFPQ"
    assert model.score(*data["test"])["f1@5"] > popularity_score["f1@5"] + 0.1
