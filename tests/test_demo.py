import json
import lzma
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from hashtag import demo, embedders, storage
from hashtag.demo import DemoConfig

STEM = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_UTC"
POST_FILE = re.compile(rf"^({STEM})(_\d+)?\.(jpg|txt|mp4|json\.xz)$")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _record(folder) -> dict:
    return storage.read_json(storage.join(str(folder), demo.SUMMARY_NAME))


def _decode(data: bytes):
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """120 posts, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("demo") / "posts"
    demo.run(DemoConfig(out=str(out), posts=120, seed=7, image_size=128))
    return out


@pytest.mark.parametrize(
    "options, message",
    [
        ({"out": ""}, "out must be"),
        ({"posts": 3}, "posts must be an integer >= 10"),
        ({"posts": 12.5}, "posts must be"),
        ({"seed": -1}, "seed must be"),
        ({"image_size": 16}, r"image_size must be an integer in \[64, 4096\]"),
        ({"image_size": True}, "image_size must be"),
    ],
)
def test_config_validation(options, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**{"out": "x", **options})


def test_same_seed_same_bytes(tmp_path):
    config = {"posts": 25, "seed": 3, "image_size": 64}
    demo.run(DemoConfig(out=str(tmp_path / "a"), **config))
    demo.run(DemoConfig(out=str(tmp_path / "b"), **config))
    demo.run(DemoConfig(out=str(tmp_path / "c"), **{**config, "seed": 4}))
    a, b, c = (_files(tmp_path / name) for name in "abc")
    demo.run(DemoConfig(out=str(tmp_path / "a"), **config))  # a rerun into the same folder
    assert _files(tmp_path / "a") == a  # every byte the same, the summary too: one source
    for files in (a, b, c):
        files.pop(demo.SUMMARY_NAME)  # names its folder
    assert a == b
    assert a.keys() != c.keys()  # another seed: other dates, other photos


def test_summary_counts_and_file_names(folder):
    record = _record(folder)
    names = [p.name for p in folder.iterdir() if p.name != demo.SUMMARY_NAME]
    assert all(POST_FILE.match(name) for name in names), names
    stems = sorted({POST_FILE.match(name).group(1) for name in names})
    assert len(stems) == record["posts"] == 120
    assert stems[0] == "2024-01-01_12-00-00_UTC"
    assert sorted(record["scene_of"]) == stems
    assert sorted(record["files"]) == sorted(names)
    # Every post has its caption; sidecars are numbered from 1 with no unnumbered photo.
    assert all(f"{stem}.txt" in names for stem in stems)
    sidecars = [s for s in stems if f"{s}_1.jpg" in names]
    assert len(sidecars) == record["sidecars"] >= 1
    assert all(f"{s}.jpg" not in names and f"{s}_2.jpg" in names for s in sidecars)
    videos = [s for s in stems if f"{s}.mp4" in names]
    assert len(videos) == record["videos"] >= 1
    assert all(f"{s}.jpg" not in names for s in videos)
    assert sum(n.endswith(".json.xz") for n in names) == record["with_metadata"] >= 1
    jpgs = [n for n in names if n.endswith(".jpg")]
    assert len(jpgs) == record["images"] + len(record["bad"])
    assert sum(record["scenes"].values()) == record["posts_with_images"]
    assert record["posts_with_images"] == 120 - record["videos"] - len(record["bad"])
    assert set(record["scenes"]) == set(demo.SCENES)
    summary = {k: v for k, v in record.items() if k not in ("scene_of", "files")}
    assert json.loads(json.dumps(summary)) == summary


def test_metadata_is_instaloader_json(folder):
    for path in sorted(folder.glob("*.json.xz")):
        document = json.loads(lzma.decompress(path.read_bytes()))
        node = document["node"]
        assert document["instaloader"]["node_type"] == "Post"
        assert len(node["shortcode"]) == 11 and node["owner"]["username"]
        assert node["edge_media_preview_like"]["count"] >= 1
        caption = path.with_name(path.name.replace(".json.xz", ".txt")).read_text("utf-8")
        assert node["edge_media_to_caption"]["edges"][0]["node"]["text"] == caption


def test_captions_follow_the_scene(folder):
    scene_of = _record(folder)["scene_of"]
    captions = {stem: (folder / f"{stem}.txt").read_text("utf-8") for stem in scene_of}
    for stem, caption in captions.items():
        tags = {t.lower() for t in re.findall(r"#(\w+)", caption)}
        assert 5 <= len(tags) <= 12, caption
        assert len(tags & set(demo.SCENE_TAGS[scene_of[stem]])) >= 2, caption
    text = "\n".join(captions.values())
    assert re.search(r"#[A-Z]", text)  # mixed case, for normalisation
    assert re.search(r"#\w*[^\x00-\x7f]", text)  # non-Latin or accented tags
    assert "@" in text and "https://" in text
    # Generic tags are long-tailed (Zipf): the most popular is far more common than the tail.
    generic = Counter(t.lower() for t in re.findall(r"#(\w+)", text))
    head, tail = generic["instagood"], np.mean([generic[t] for t in demo.GENERIC_TAGS[-10:]])
    assert head > 4 * tail, (head, tail)


def test_photos_decode_to_the_size_asked(folder):
    record = _record(folder)
    bad = {f"{stem}.jpg" for stem in record["bad"]}
    photos = [p for p in sorted(folder.glob("*.jpg")) if p.name not in bad]
    assert len(photos) == record["images"]
    for path in photos:
        image = _decode(path.read_bytes())
        assert image is not None and image.shape == (128, 128, 3), path.name


def test_broken_files_and_the_repost(folder):
    record = _record(folder)
    assert sorted(record["bad"].values()) == ["empty", "not-an-image", "truncated"]
    for stem, kind in record["bad"].items():
        data = (folder / f"{stem}.jpg").read_bytes()
        assert (data == b"") == (kind == "empty")
        assert _decode(data) is None if data else True
        assert (folder / f"{stem}.txt").exists()  # a caption, so readers count a skip
    [(repost, original)] = record["reposts"].items()
    assert repost != original
    assert (folder / f"{repost}.jpg").read_bytes() == (folder / f"{original}.jpg").read_bytes()
    assert record["scene_of"][repost] == record["scene_of"][original]


def test_classic_embedder_recovers_the_scenes(folder):
    """1-nearest-neighbour on the classic features, leave one out: far above chance (1/8)."""
    record = _record(folder)
    stems = [s for s in record["scene_of"] if (folder / f"{s}.jpg").exists()]
    stems = [s for s in stems if s not in record["bad"]]
    rgb = [
        cv2.cvtColor(_decode((folder / f"{s}.jpg").read_bytes()), cv2.COLOR_BGR2RGB) for s in stems
    ]
    vectors = embedders.create("classic").embed(rgb)
    scenes = np.array([record["scene_of"][s] for s in stems])
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    # The repost's nearest neighbour is its own copy: leave the pair out of the vote.
    copies = [stems.index(s) for pair in record["reposts"].items() for s in pair]
    similarity[np.ix_(copies, copies)] = -np.inf
    accuracy = float(np.mean(scenes[similarity.argmax(axis=1)] == scenes))
    assert accuracy > 0.7, accuracy


def test_rerun_replaces_an_old_demo_and_refuses_other_folders(tmp_path):
    out = tmp_path / "posts"
    demo.run(DemoConfig(out=str(out), posts=30, seed=1, image_size=64))
    summary = demo.run(DemoConfig(out=str(out), posts=12, seed=2, image_size=64))
    names = {p.name for p in out.iterdir()} - {demo.SUMMARY_NAME}
    assert names == set(_record(out)["files"])
    assert len({POST_FILE.match(n).group(1) for n in names}) == summary["posts"] == 12

    other = tmp_path / "real-downloads"
    other.mkdir()
    (other / "2020-05-01_10-00-00_UTC.jpg").write_bytes(b"a real photo")
    with pytest.raises(ValueError, match="not empty"):
        demo.run(DemoConfig(out=str(other), posts=12))
    assert [p.name for p in other.iterdir()] == ["2020-05-01_10-00-00_UTC.jpg"]

    (out / demo.SUMMARY_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        demo.run(DemoConfig(out=str(out), posts=12))


def test_s3_output_matches_local(tmp_path, s3_bucket):
    config = {"posts": 12, "seed": 5, "image_size": 64}
    uri = f"{s3_bucket}/demo/posts"
    summary = demo.run(DemoConfig(out=uri, **config))
    demo.run(DemoConfig(out=str(tmp_path / "local"), **config))
    local = _files(tmp_path / "local")
    assert summary["out"] == uri and summary["posts"] == 12
    assert storage.listdir(uri) == sorted(local)
    for name, data in local.items():
        if name != demo.SUMMARY_NAME:
            assert storage.read_bytes(storage.join(uri, name)) == data, name


def test_the_instaloader_reader_sees_every_post(folder):
    """The real ingest path: every post but the videos comes out, with its scene's tags."""
    from hashtag import sources

    record = _record(folder)
    source = sources.open_source(str(folder))
    posts = list(source.posts())
    assert len(posts) == record["posts"] - record["videos"]
    assert source.skipped == {"video": record["videos"]}
    for post in posts:
        scene = record["scene_of"][post.metadata.get("stem", post.id)]
        assert len(set(post.tags) & set(demo.SCENE_TAGS[scene])) >= 2, post
