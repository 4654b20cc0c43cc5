"""open_source on manifests (JSONL, CSV, S3), instaloader folders and the original project's files."""

import json
import logging
import lzma

import numpy as np
import pytest

from hashtag import storage
from hashtag.fetch import Fetcher
from hashtag.sources import (
    LOGGED_PER_REASON,
    InstaloaderSource,
    LegacyNpySource,
    ManifestSource,
    open_source,
)


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# manifests --------------------------------------------------------------------------------------


def test_feedme_manifest(shared_dir):
    manifest = shared_dir / "data" / "feedme-food" / "posts.jsonl"
    source = open_source(str(manifest))
    assert isinstance(source, ManifestSource)
    posts = list(source.posts())
    assert len(posts) == 603 and not source.skipped
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for post, row in zip(posts, rows, strict=True):
        assert post.tags == tuple(row["tags"])  # already normal: lower case, spaces kept
        assert post.image == str(manifest.parent / row["image"])
        assert post.caption == row["caption"]
        assert post.metadata["license"] == row["license"]
    assert posts[0].id == "1" and posts[-1].id == "603"
    assert "mexican food" in posts[0].tags
    assert [p.id for p in source.posts()] == [p.id for p in posts]  # deterministic


def test_folder_with_posts_jsonl_is_that_manifest(shared_dir):
    source = open_source(str(shared_dir / "data" / "feedme-food"))
    assert isinstance(source, ManifestSource)
    assert sum(1 for _ in source.posts()) == 603


def test_jsonl_with_broken_rows(tmp_path, caplog):
    (tmp_path / "m").mkdir()
    manifest = tmp_path / "m" / "posts.jsonl"
    write_lines(
        manifest,
        [
            {"image": "a.jpg", "tags": ["#Food", "food", "Mexican Food!"], "license": "CC0"},
            "{not json",
            "",
            [1, 2],
            {"tags": ["x"]},
            {"image": "", "tags": ["x"]},
            {"image": 42},
            {"image": "b.jpg", "tags": {"a": 1}},
            {"image": "c.jpg", "caption": "Dinner #Pasta #東京 @chef"},
            {"image": "d.jpg", "tags": [], "caption": "#ignored"},
            {"image": "e.jpg", "id": "custom-7", "tags": "a|b c"},
            {"image": "f.jpg", "id": "custom-7"},
            {"image": "../shared/g.jpg", "id": 12},
            {"image": "https://example.org/h.jpg"},
            {"image": "s3://bucket/i.jpg"},
            {"image": "/abs/j.jpg"},
        ],
    )
    with open(manifest, "ab") as f:
        f.write(b'{"image": "k.jpg", "caption": "\xff\xfe"}\n')  # invalid UTF-8
    caplog.set_level(logging.WARNING, logger="hashtag.sources")
    source = open_source(str(manifest))
    posts = {p.id: p for p in source.posts()}
    assert source.skipped == {"bad-row": 5, "missing-image": 2, "duplicate-id": 1}
    base = tmp_path / "m"
    assert posts["1"].tags == ("food", "mexican food")
    assert posts["1"].image == str(base / "a.jpg")
    assert posts["1"].metadata == {"license": "CC0"}
    assert posts["9"].tags == ("pasta", "東京")
    assert posts["10"].tags == ()  # an explicit empty list: no tags, the caption is not read
    assert posts["custom-7"].tags == ("a", "b c")
    assert posts["12"].image == str(tmp_path / "shared" / "g.jpg")
    assert posts["14"].image == "https://example.org/h.jpg"
    assert posts["15"].image == "s3://bucket/i.jpg"
    assert posts["16"].image == "/abs/j.jpg"
    assert list(posts) == ["1", "9", "10", "custom-7", "12", "14", "15", "16"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    # Each reason's first LOGGED_PER_REASON posts are named; then one line, the rest counted.
    assert LOGGED_PER_REASON == 3
    for post_id in ("2", "4", "7", "5", "6", "custom-7"):
        assert f"post {post_id}:" in messages
    assert "post 8:" not in messages and "post 17:" not in messages
    assert messages.count("more posts with bad-row") == 1


def test_100k_bad_rows_cost_four_log_lines(tmp_path, caplog):
    manifest = tmp_path / "posts.jsonl"
    manifest.write_text("{broken\n" * 100_000 + json.dumps({"image": "a.jpg"}) + "\n")
    caplog.set_level(logging.WARNING, logger="hashtag.sources")
    source = open_source(str(manifest))
    assert [p.image for p in source.posts()] == [str(tmp_path / "a.jpg")]
    assert source.skipped == {"bad-row": 100_000}
    assert len(caplog.records) == LOGGED_PER_REASON + 1


def test_json_array_manifest(tmp_path):
    path = tmp_path / "posts.json"
    path.write_text(json.dumps([{"image": "a.jpg", "tags": ["x"]}, {"image": "b.jpg"}]))
    posts = list(open_source(str(path)).posts())
    assert [p.id for p in posts] == ["1", "2"]


def test_csv_manifest(tmp_path):
    path = tmp_path / "posts.csv"
    path.write_text(
        "id,image,tags,caption,license\n"
        "p1,a.jpg,mexican food|Tacos,,CC0\n"
        'p2,b.jpg,"food, Pizza",,CC0\n'
        "p3,c.jpg,#food #Pizza,,CC0\n"
        "p4,d.jpg,,Dinner #Yummy #café,CC0\n"
        "p5,,food,,CC0\n"
        "p6,e.jpg,food,,CC0,extra\n"
        ",f.jpg,food,,CC0\n"
        "p8,https://example.org/g.jpg,food,,CC-BY\n",
        encoding="utf-8",
    )
    source = open_source(str(path))
    posts = {p.id: p for p in source.posts()}
    assert source.skipped == {"missing-image": 1, "bad-row": 1}
    assert posts["p1"].tags == ("mexican food", "tacos")
    assert posts["p2"].tags == ("food", "pizza")
    assert posts["p3"].tags == ("food", "pizza")
    assert posts["p4"].tags == ("yummy", "café")
    assert posts["7"].image == str(tmp_path / "f.jpg")  # no id: the data row number
    assert posts["p8"].image == "https://example.org/g.jpg"
    assert posts["p1"].metadata == {"license": "CC0"}


def test_tsv_manifest_with_bom(tmp_path):
    path = tmp_path / "posts.tsv"
    path.write_bytes("\ufeffimage\ttags\na.jpg\tfood|drink\n".encode())
    assert [p.tags for p in open_source(str(path)).posts()] == [("food", "drink")]


def test_manifest_on_s3(s3_bucket, tmp_path):
    image = b"\xff\xd8\xff fake jpeg"
    storage.write_bytes(f"{s3_bucket}/m/images/a.jpg", image)
    local = write_lines(
        tmp_path / "posts.jsonl",
        [{"image": "images/a.jpg", "tags": ["Food"]}, {"image": "images/missing.jpg"}],
    )
    storage.upload(str(local), f"{s3_bucket}/m/posts.jsonl")
    for uri in (f"{s3_bucket}/m/posts.jsonl", f"{s3_bucket}/m"):
        source = open_source(uri)
        posts = list(source.posts())
        assert [p.image for p in posts] == [
            f"{s3_bucket}/m/images/a.jpg",
            f"{s3_bucket}/m/images/missing.jpg",
        ]
        assert posts[0].tags == ("food",)
    assert Fetcher().get(posts[0].image) == image


def test_open_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no source"):
        open_source(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "posts.xml").write_text("<posts/>")
    with pytest.raises(ValueError, match="cannot tell"):
        open_source(str(tmp_path / "posts.xml"))


# instaloader ------------------------------------------------------------------------------------


def xz_json(document) -> bytes:
    return lzma.compress(json.dumps(document).encode())


@pytest.fixture
def instaloader_folder(tmp_path):
    root = tmp_path / "alice"
    root.mkdir()
    files = {
        # a single picture, caption with hashtags in several scripts, metadata
        "2021-01-01_10-00-00_UTC.jpg": b"jpg",
        "2021-01-01_10-00-00_UTC.txt": "Sunset 🌅#Sunset #海 #закат #غروب #नमस्ते, see https://x.org/#a",
        "2021-01-01_10-00-00_UTC.json.xz": xz_json(
            {
                "node": {
                    "__typename": "GraphImage",
                    "shortcode": "ABC123",
                    "is_video": False,
                    "owner": {"id": "1", "username": "alice"},
                    "edge_media_preview_like": {"count": 42},
                    "edge_media_to_comment": {"count": 3},
                    "taken_at_timestamp": 1609495200,
                },
                "instaloader": {"node_type": "Post", "version": "4.10"},
            }
        ),
        # a sidecar of three pictures, no metadata
        "2021-01-02_10-00-00_UTC_1.jpg": b"jpg",
        "2021-01-02_10-00-00_UTC_2.jpg": b"jpg",
        "2021-01-02_10-00-00_UTC_3.jpg": b"jpg",
        "2021-01-02_10-00-00_UTC.txt": "#Food #東京 #food",
        # a video and its thumbnail
        "2021-01-03_10-00-00_UTC.jpg": b"thumbnail",
        "2021-01-03_10-00-00_UTC.mp4": b"mp4",
        "2021-01-03_10-00-00_UTC.txt": "#video",
        # corrupt metadata: the post stays
        "2021-01-04_10-00-00_UTC.jpg": b"jpg",
        "2021-01-04_10-00-00_UTC.txt": "#Café",
        "2021-01-04_10-00-00_UTC.json.xz": b"\xfd7zXZ\x00 this is not xz",
        # a caption without picture
        "2021-01-05_10-00-00_UTC.txt": "#lost",
        # no .txt: the caption comes from the metadata
        "2021-01-06_10-00-00_UTC.jpg": b"jpg",
        "2021-01-06_10-00-00_UTC.json.xz": xz_json(
            {
                "node": {
                    "shortcode": "DEF456",
                    "edge_media_to_caption": {"edges": [{"node": {"text": "#Pizza"}}]},
                }
            }
        ),
        # a sidecar whose second item is a video (with its thumbnail)
        "2021-01-07_10-00-00_UTC_1.png": b"png",
        "2021-01-07_10-00-00_UTC_2.jpg": b"thumbnail",
        "2021-01-07_10-00-00_UTC_2.mp4": b"mp4",
        # files that are not posts
        "2021-01-01_10-00-00_UTC_comments.json": "[]",
        "2021-01-01_10-00-00_UTC_location.txt": "Paris",
        "2020-12-31_00-00-00_UTC_profile_pic.jpg": b"jpg",
        "alice_123.json.xz": xz_json({"node": {"username": "alice"}}),
        "id": "123",
        # a nested target folder
        "#food/2021-02-01_10-00-00_UTC.jpg": b"jpg",
        "#food/2021-02-01_10-00-00_UTC.txt": "#food",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    return root


def test_instaloader_folder(instaloader_folder, caplog):
    caplog.set_level(logging.WARNING, logger="hashtag.sources")
    source = open_source(str(instaloader_folder))
    assert isinstance(source, InstaloaderSource)
    posts = list(source.posts())
    root = str(instaloader_folder)
    assert [p.id for p in posts] == [
        "#food/2021-02-01_10-00-00_UTC",
        "ABC123",
        "2021-01-02_10-00-00_UTC",
        "2021-01-04_10-00-00_UTC",
        "DEF456",
        "2021-01-07_10-00-00_UTC",
    ]
    nested, single, sidecar, corrupt, from_json, mixed = posts
    assert nested.image == f"{root}/#food/2021-02-01_10-00-00_UTC.jpg"
    assert single.image == f"{root}/2021-01-01_10-00-00_UTC.jpg"
    assert single.tags == ("sunset", "海", "закат", "غروب", "नमस्ते")
    assert single.metadata["owner_username"] == "alice"
    assert single.metadata["likes"] == 42 and single.metadata["comments"] == 3
    assert single.metadata["stem"] == "2021-01-01_10-00-00_UTC"
    assert sidecar.image == f"{root}/2021-01-02_10-00-00_UTC_1.jpg"
    assert sidecar.metadata["extra_images"] == [
        f"{root}/2021-01-02_10-00-00_UTC_2.jpg",
        f"{root}/2021-01-02_10-00-00_UTC_3.jpg",
    ]
    assert sidecar.tags == ("food", "東京")
    assert corrupt.tags == ("café",)
    assert from_json.tags == ("pizza",) and from_json.caption == "#Pizza"
    assert mixed.image.endswith("_UTC_1.png") and "extra_images" not in mixed.metadata
    assert source.skipped == {"video": 1, "no-image": 1}
    assert source.warnings == {"bad-metadata": 1}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "2021-01-03_10-00-00_UTC" in messages and "2021-01-04_10-00-00_UTC" in messages


def test_instaloader_video_flag_in_metadata(tmp_path):
    (tmp_path / "2021-01-01_10-00-00_UTC.jpg").write_bytes(b"jpg")
    meta = xz_json({"node": {"shortcode": "V1", "is_video": True, "__typename": "GraphVideo"}})
    (tmp_path / "2021-01-01_10-00-00_UTC.json.xz").write_bytes(meta)
    source = open_source(str(tmp_path))
    assert list(source.posts()) == [] and source.skipped == {"video": 1}


def test_instaloader_folder_on_s3(instaloader_folder, s3_bucket):
    for path in sorted(instaloader_folder.rglob("*")):
        if path.is_file():
            relative = path.relative_to(instaloader_folder).as_posix()
            storage.upload(str(path), f"{s3_bucket}/alice/{relative}")
    local = list(open_source(str(instaloader_folder)).posts())
    remote = list(open_source(f"{s3_bucket}/alice").posts())
    assert [p.id for p in remote] == [p.id for p in local]
    assert [p.tags for p in remote] == [p.tags for p in local]
    assert remote[1].image == f"{s3_bucket}/alice/2021-01-01_10-00-00_UTC.jpg"


# the original project's files -------------------------------------------------------------------


def test_legacy_npy_files_need_trust(shared_dir):
    folder = str(shared_dir / "data" / "seed-instagram")
    with pytest.raises(ValueError, match="trust_pickle=True") as info:
        open_source(folder)
    assert "pickle" in str(info.value) and "--trust-pickle" in str(info.value)


def test_legacy_npy_files(shared_dir):
    folder = shared_dir / "data" / "seed-instagram"
    source = open_source(str(folder), trust_pickle=True)
    assert isinstance(source, LegacyNpySource)
    posts = list(source.posts())
    assert len(posts) == 2936 and not source.skipped
    assert [p.id for p in posts] == [str(i) for i in range(2936)]
    assert all(p.image is None and p.embedding is None for p in posts)
    assert [p.metadata["split"] for p in posts].count("test") == 588
    assert posts[0].metadata["shortcode"] == "CHohnycjirY"
    hashtags = [line.strip() for line in (folder / "hashtags.txt").read_text().splitlines()]
    train = np.load(folder / "train_csvs.npy", allow_pickle=True)
    expected = tuple(hashtags[i].lstrip("#") for i in np.flatnonzero(train[0][2]))
    assert posts[0].tags == expected
    assert all(not t.startswith("#") for p in posts for t in p.tags)
    test_tags = sum(len(p.tags) for p in posts if p.metadata["split"] == "test")
    assert test_tags == 2433  # the README's count of test positives
    one_file = open_source(str(folder / "test_csvs.npy"), trust_pickle=True)
    assert sum(1 for _ in one_file.posts()) == 588


def test_legacy_npy_files_with_embeddings_and_bad_rows(tmp_path):
    (tmp_path / "hashtags.txt").write_text("#Love\n#food\n#東京\n")
    rows = np.empty((3,), dtype=object)
    rows[0] = (7, "sc7", [1, 0, 1], [0.5, -1.0])
    rows[1] = (8, "sc8", [1, 1], None)  # wrong vector length
    rows[2] = (9, "sc9", [0, 1, 0], [1.0, 2.0])
    np.save(tmp_path / "val_csvs.npy", rows, allow_pickle=True)
    source = open_source(str(tmp_path), trust_pickle=True)
    posts = list(source.posts())
    assert [p.id for p in posts] == ["7", "9"]
    assert posts[0].tags == ("love", "東京") and posts[0].embedding == (0.5, -1.0)
    assert posts[0].metadata == {"shortcode": "sc7", "split": "val"}
    assert source.skipped == {"bad-row": 1}
