"""Hashtag completion on hand-made counts and on the original project's seed data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import missing

from hashtag import metrics
from hashtag.completion import Cooccurrence, CooccurrenceConfig, hide_half


def load_seed_labels(shared_dir) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) bool label matrices of the seed files (trusted: they need pickle)."""
    folder = shared_dir / "data" / "seed-instagram"
    if not folder.is_dir():
        missing("seed-instagram data is not in ../shared")

    def labels(name: str) -> np.ndarray:
        rows = np.load(folder / name, allow_pickle=True)  # trusted file, tests only
        return np.array([row[2] for row in rows], dtype=bool)

    return labels("train_csvs.npy"), labels("test_csvs.npy")


def suggest_f1(scores: np.ndarray, hidden: np.ndarray, k: int = 5) -> float:
    """Micro F1 of the k best suggestions against the hidden tags (the README's F1@k)."""
    return metrics.micro_prf(hidden, metrics.top_k_mask(scores, k))["f1"]


def test_scores_given_never_repeats_and_prefers_cooccurring_tags():
    # tags: 0 generic (everywhere), 1 & 2 travel together, 3 & 4 food together.
    y = np.array(
        [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 1], [1, 0, 0, 1, 1], [1, 1, 0, 0, 0]]
        + [[1, 0, 0, 0, 0]] * 6,
        bool,
    )
    model = Cooccurrence().fit(y)
    given = np.array([[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]], bool)
    scores = model.scores_given(given)
    assert scores.dtype == np.float32
    assert np.isneginf(scores[given]).all()
    assert np.argmax(scores[0]) == 2  # travel -> travel, not the generic tag
    assert np.argmax(scores[1]) == 4


def test_no_given_tags_falls_back_to_popularity():
    y = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    scores = Cooccurrence().fit(y).scores_given(np.zeros((1, 3), bool))
    assert list(np.argsort(-scores[0])) == [0, 1, 2]


def test_combine_with_image_scores_and_validation():
    y = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], bool)
    model = Cooccurrence().fit(y)
    given = np.array([[1, 0, 0]], bool)
    image = np.array([[0.9, 0.0, 1.0]], np.float32)
    assert np.array_equal(model.combine(None, given), model.scores_given(given))
    combined = model.combine(image, given, weight=1.0)
    assert np.isneginf(combined[0, 0]) and np.argmax(combined[0]) == 2
    with pytest.raises(ValueError, match="weight"):
        model.combine(image, given, weight=2.0)
    with pytest.raises(ValueError, match="hashtag columns"):
        model.scores_given(np.zeros((1, 4), bool))
    with pytest.raises(ValueError, match="0/1"):
        model.fit(np.full((2, 3), 2))
    with pytest.raises(ValueError, match=">= 0"):
        CooccurrenceConfig(lift_power=-1)
    with pytest.raises(RuntimeError, match="not fitted"):
        Cooccurrence().scores_given(given)


def test_hide_half_is_deterministic_and_splits_every_row():
    y = np.random.default_rng(1).random((50, 20)) < 0.3
    given, hidden = hide_half(y, seed=0)
    again, _ = hide_half(y, seed=0)
    assert np.array_equal(given, again)
    assert not (given & hidden).any() and np.array_equal(given | hidden, y)
    assert np.array_equal(given.sum(1), y.sum(1) // 2)


def test_save_load_roundtrip(tmp_path):
    y = np.random.default_rng(2).random((30, 8)) < 0.4
    model = Cooccurrence(CooccurrenceConfig(idf_power=1.0)).fit(y)
    model.save(str(tmp_path / "cooc"))
    for path in (tmp_path / "cooc").glob("*.npy"):
        np.load(path, allow_pickle=False)
    loaded = Cooccurrence.load(str(tmp_path / "cooc"))
    given = y[:5] & (np.random.default_rng(3).random((5, 8)) < 0.5)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.scores_given(given), model.scores_given(given))


def test_completion_beats_cooccurrence_baseline_on_seed_data(shared_dir):
    train, test = load_seed_labels(shared_dir)
    posts = test[test.sum(axis=1) >= 2]
    given, hidden = hide_half(posts, seed=0)
    assert len(posts) == 376

    frequency = train.sum(axis=0).astype(np.float32)
    popularity = np.where(given, -np.inf, np.tile(frequency, (len(posts), 1)))
    plain = train.T.astype(np.float32) @ train / np.maximum(frequency[:, None], 1)
    np.fill_diagonal(plain, 0)  # plain[g, t] = P(t | g)
    conditional = np.where(given, -np.inf, given.astype(np.float32) @ plain)
    ours = Cooccurrence().fit(train).scores_given(given)

    figures = {
        "popularity": suggest_f1(popularity, hidden),
        "P(tag|given)": suggest_f1(conditional, hidden),
        "completion": suggest_f1(ours, hidden),
    }
    print("seed completion F1@5:", {k: round(v, 4) for k, v in figures.items()})
    assert figures["popularity"] == pytest.approx(0.144, abs=0.002)
    assert figures["P(tag|given)"] == pytest.approx(0.231, abs=0.005)
    assert figures["completion"] > 0.231
    assert figures["completion"] > figures["P(tag|given)"] + 0.03


def test_original_style_popularity_f1_on_seed_data(shared_dir):
    train, test = load_seed_labels(shared_dir)
    scores = np.tile(train.sum(axis=0).astype(np.float32), (len(test), 1))
    figures = {k: metrics.micro_prf(test, metrics.top_k_mask(scores, k))["f1"] for k in (3, 5, 6)}
    print("seed popularity micro F1:", {k: round(v, 4) for k, v in figures.items()})
    assert figures[3] == pytest.approx(0.121, abs=0.001)
    assert figures[5] == pytest.approx(0.138, abs=0.001)
    assert figures[6] == pytest.approx(0.143, abs=0.001)


@pytest.mark.slow
def test_completion_from_the_original_files_through_the_cli(shared_dir, tmp_path):
    """scrape --trust-pickle -> merge -> tune -> recommend --manifest, each a `hashtag` process:
    tune exports a completion model that beats popularity and plain co-occurrence on test, and
    batch recommend reproduces tune's test F1 on the same held-out tags."""
    import csv
    import json
    import subprocess
    import sys

    from hashtag.dataset import Dataset

    folder = shared_dir / "data" / "seed-instagram"
    if not folder.is_dir():
        missing("seed-instagram data is not in ../shared")

    def hashtag(*argv: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "hashtag.cli", *argv], capture_output=True, text=True
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        return done

    run = tmp_path / "run"
    hashtag("scrape", "--source", str(folder), "--trust-pickle", "--out", str(run))
    hashtag("merge", "--shards", str(run), "--out", str(run / "dataset"))
    tuned = hashtag("tune", "--data", str(run / "dataset"), "--out", str(run / "tune"))
    assert len(tuned.stdout.splitlines()) <= 8 and "completion model" in tuned.stdout
    with open(run / "tune" / "results.csv") as f:
        table = {row["model"]: row for row in csv.DictReader(f)}
    f1 = {name: float(row["f1@5"]) for name, row in table.items()}
    print("seed completion through the CLI, test F1@5:", f1)
    assert f1["completion"] > f1["cooccurrence"] > f1["popularity"]
    assert f1["completion"] > 1.5 * f1["popularity"]
    # The decision rule: the better of plain and weighted on validation F1@5 is exported.
    val = {name: float(table[name]["val_f1@5"]) for name in ("cooccurrence", "completion")}
    selected = [name for name, row in table.items() if row["selected"] == "True"]
    assert selected == [
        "cooccurrence" if val["cooccurrence"] >= val["completion"] else "completion"
    ]

    # The same held-out tags as tune's test rows, through batch recommend.
    dataset = Dataset.load(str(run / "dataset"))
    _, labels = dataset.part("test")
    labels = labels[labels.sum(axis=1) >= 2]
    given, hidden = hide_half(labels, seed=0)
    manifest = tmp_path / "posts.jsonl"
    with open(manifest, "w") as f:
        for n, row in enumerate(given):
            tags = [dataset.vocab[i] for i in np.flatnonzero(row)]
            f.write(json.dumps({"id": f"post{n}", "tags": tags}) + "\n")
    done = hashtag(
        "recommend", "--model", str(run / "tune" / "model"), "--manifest", str(manifest), "--json"
    )
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in results] == [f"post{n}" for n in range(len(given))]
    index = {tag: i for i, tag in enumerate(dataset.vocab)}
    suggested = np.zeros_like(hidden)
    for n, result in enumerate(results):
        suggested[n, [index[h["tag"]] for h in result["hashtags"]]] = True
    micro = metrics.micro_prf(hidden, suggested)["f1"]
    assert micro == pytest.approx(float(table[selected[0]]["f1"]), abs=0.005)
