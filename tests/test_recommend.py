"""recommend / evaluate on a small exported model: good and bad images, folders, S3, blocklists,
hashtag completion with and without an image."""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest
from test_tune import export_knn

from hashtag import models, recommend, storage
from hashtag.errors import ArtifactError
from hashtag.recommend import EvaluateConfig, RecommendConfig

DIM = 340  # the classic embedder's, so that real images can be scored


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    """A kNN model exported the way tune exports (metadata, co-occurrence); no TensorFlow."""
    return export_knn(tmp_path_factory.mktemp("model"), posts=200, dim=DIM, tags=8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        picture = cv2.GaussianBlur(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8), (9, 9), 3)
        cv2.imwrite(str(folder / name), picture)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, skipped by the folder listing")
    return folder


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_good_and_bad_images_and_a_folder(exported, images, capsys):
    config = RecommendConfig(
        model=exported,
        images=(str(images / "a.jpg"), str(images / "missing.jpg"), str(images)),
        k=3,
        json=True,
    )
    assert recommend.run(config) == 1  # some image failed, the others went on
    results = _lines(capsys)
    by_image = {r["image"]: r for r in results}
    assert [r["image"] for r in results] == [
        str(images / "a.jpg"),
        str(images / "missing.jpg"),
        storage.join(str(images), "a.jpg"),
        storage.join(str(images), "b.png"),
        storage.join(str(images), "broken.jpg"),
    ]
    good = by_image[str(images / "a.jpg")]["hashtags"]
    assert len(good) == 3 and all(set(h) == {"tag", "score"} for h in good)
    assert [h["score"] for h in good] == sorted((h["score"] for h in good), reverse=True)
    assert by_image[str(images / "missing.jpg")]["error"]
    assert by_image[storage.join(str(images), "broken.jpg")]["error"]


def test_all_good_exits_zero_and_prints_readable_lines(exported, images, capsys):
    assert recommend.run(RecommendConfig(model=exported, images=(str(images / "b.png"),))) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(images / "b.png") + ": #tag") and line.count("#") == 5


def test_blocklist_min_score_and_completion(exported, images, tmp_path):
    image = (str(images / "a.jpg"),)
    top = recommend.recommend(RecommendConfig(model=exported, images=image, k=8))[0]["hashtags"]
    first, second = top[0]["tag"], top[1]["tag"]

    blocked = recommend.recommend(
        RecommendConfig(model=exported, images=image, exclude=f"#{first}")
    )
    assert first not in {h["tag"] for h in blocked[0]["hashtags"]}
    blocklist = tmp_path / "block.txt"
    blocklist.write_text(f"{first}\n#{second.upper()}\n")
    blocked = recommend.recommend(
        RecommendConfig(model=exported, images=image, exclude=str(blocklist), k=8)
    )
    assert {first, second}.isdisjoint(h["tag"] for h in blocked[0]["hashtags"])
    assert len(blocked[0]["hashtags"]) == 6

    high = recommend.recommend(RecommendConfig(model=exported, images=image, min_score=1.5))
    assert high[0]["hashtags"] == []

    # Completion with an image: the given tag never comes back.
    mixed = recommend.recommend(RecommendConfig(model=exported, images=image, tags=first, k=8))
    assert first not in {h["tag"] for h in mixed[0]["hashtags"]}
    assert len(mixed[0]["hashtags"]) == 7


def test_completion_alone_suggests_cooccurring_tags(exported, capsys):
    vocab = models.load(exported).metadata["vocab"]
    given = vocab[0]
    assert (
        recommend.run(RecommendConfig(model=exported, tags=f"#{given}, unknown_tag", json=True))
        == 0
    )
    captured = capsys.readouterr()
    assert "unknown_tag" in captured.err
    (result,) = [json.loads(line) for line in captured.out.splitlines()]
    assert result["image"] is None and result["given"] == [given, "unknown_tag"]
    suggested = [h["tag"] for h in result["hashtags"]]
    assert given not in suggested and len(suggested) == 5
    # The synthetic posts always carry tag i with tag i+1: one of those neighbours leads.
    number = int(given.removeprefix("tag"))
    assert suggested[0] in {f"tag{(number + 1) % 8}", f"tag{(number - 1) % 8}"}


def test_hostile_images_end_in_one_error_each_in_bounded_time(exported, images, tmp_path):
    from test_hostile import png_bomb, tiff_bomb

    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "tiff.tif").write_bytes(tiff_bomb())
    (tmp_path / "png.png").write_bytes(png_bomb())
    hostile = [str(tmp_path / n) for n in ("pipe.jpg", "tiff.tif", "png.png")] + ["/dev/zero"]
    config = RecommendConfig(model=exported, images=(str(images / "a.jpg"), *hostile), k=3)
    started = time.monotonic()
    results = {r["image"]: r for r in recommend.recommend(config)}
    assert time.monotonic() - started < 10
    assert results[str(images / "a.jpg")]["hashtags"]
    assert {image: results[image]["error"] for image in hostile} == {
        hostile[0]: "not-a-file", hostile[1]: "too-many-pixels",
        hostile[2]: "too-many-pixels", hostile[3]: "not-a-file",
    }  # fmt: skip


def test_config_validation():
    with pytest.raises(ValueError, match="IMAGE"):
        RecommendConfig(model="m")
    with pytest.raises(ValueError, match="--k"):
        RecommendConfig(model="m", images=("a.jpg",), k=0)
    with pytest.raises(ValueError, match="completion-weight"):
        RecommendConfig(model="m", tags="a", completion_weight=2)


def test_not_an_exported_model(tmp_path):
    with pytest.raises(ArtifactError, match="give --model the folder"):
        recommend.recommend(RecommendConfig(model=str(tmp_path), tags="a"))


def test_evaluate_prints_a_markdown_table(exported, capsys):
    data = str(models.load(exported).metadata["trained_on"]["data"])
    result = recommend.evaluate(EvaluateConfig(model=exported, data=data))
    printed = capsys.readouterr().out
    assert "| model |" in printed and "popularity" in printed and "knn" in printed
    assert {row["model"] for row in result["table"]} == {"knn", "popularity"}
    knn = next(row for row in result["table"] if row["model"] == "knn")
    assert knn["lift_f1"] > 1


def test_model_and_images_on_s3(exported, images, s3_bucket, capsys):
    fs, path = storage.filesystem(s3_bucket)
    fs.put(exported, f"{path}/model", recursive=True)
    for name in ("a.jpg", "broken.jpg"):
        storage.upload(str(images / name), f"{s3_bucket}/pics/{name}")
    config = RecommendConfig(model=f"{s3_bucket}/model", images=(f"{s3_bucket}/pics",), json=True)
    assert recommend.run(config) == 1
    results = {r["image"]: r for r in _lines(capsys)}
    assert len(results[f"{s3_bucket}/pics/a.jpg"]["hashtags"]) == 5
    assert "error" in results[f"{s3_bucket}/pics/broken.jpg"]


def test_manifest_of_images_and_tags_answers_each_post_in_order(exported, images, tmp_path):
    vocab = models.load(exported).metadata["vocab"]
    rows = [
        {"id": "x", "image": str(images / "a.jpg"), "tags": [vocab[0]]},
        {"id": "y", "image": str(images / "broken.jpg")},
        {"id": "z", "tags": f"#{vocab[1]}"},
        {"image": str(images / "b.png")},
    ]
    manifest = tmp_path / "posts.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RecommendConfig(model=exported, manifest=str(manifest), json=True)
    results = recommend.recommend(config)
    assert [r["id"] for r in results] == ["x", "y", "z", "4"]
    assert vocab[0] not in {h["tag"] for h in results[0]["hashtags"]}
    assert "error" in results[1] and results[1]["image"] == str(images / "broken.jpg")
    assert results[2]["image"] is None and len(results[2]["hashtags"]) == 5
    assert len(results[3]["hashtags"]) == 5 and "given" not in results[3]
    with pytest.raises(ValueError, match="--manifest gives each post"):
        RecommendConfig(model=exported, manifest=str(manifest), tags="a")
