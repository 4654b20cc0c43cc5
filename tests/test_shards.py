import json
import os

import numpy as np
import pytest

from hashtag import shards, storage
from hashtag.posts import Post

SPEC = {"name": "classic", "version": 1}


def make_posts(n, prefix="p"):
    return [
        Post(id=f"{prefix}{i}", image=f"/img/{prefix}{i}.jpg", tags=("a", f"t{i % 3}"), caption="c")
        for i in range(n)
    ]


def write(root, index, n=4, dim=3, prefix="p", **stats):
    posts = make_posts(n, prefix)
    embeddings = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    shas = [f"{i:064x}" for i in range(n)]
    stats = {"skipped": {"decode": 1}, "skips": [{"id": "x", "reason": "decode"}], **stats}
    manifest = shards.write_shard(
        root, index, posts, embeddings, embedder=SPEC, image_sha256=shas, stats=stats
    )
    return posts, embeddings, manifest


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/run"


def test_shard_uri():
    assert shards.shard_uri("s3://b/out", 7) == "s3://b/out/shards/shard-00007"


def test_round_trip(root):
    posts, embeddings, manifest = write(root, 3)
    assert manifest["format"] == shards.SHARD_FORMAT and manifest["version"] == 1
    assert (manifest["shard"], manifest["count"], manifest["dim"]) == (3, 4, 3)
    assert manifest["embedder"] == SPEC and manifest["posts_in"] == 4
    assert manifest["skipped"] == {"decode": 1}
    assert set(manifest["files"]) == {"embeddings.npy", "posts.jsonl"}
    data = shards.read_shard(root, 3)
    np.testing.assert_array_equal(data.embeddings, embeddings)
    assert [r["id"] for r in data.posts] == [p.id for p in posts]
    assert data.posts[1]["tags"] == ["a", "t1"] and data.posts[1]["image_sha256"] == f"{1:064x}"
    assert Post.from_json(json.dumps(data.posts[0])).image == "/img/p0.jpg"
    assert data.manifest == manifest
    assert shards.finished_shards(root) == {3: manifest}
    # Every data file loads without pickle.
    uri = storage.join(shards.shard_uri(root, 3), "embeddings.npy")
    with storage.local_file(uri) as path:
        np.load(path, allow_pickle=False)


def test_label_only_shard(tmp_path):
    root = str(tmp_path)
    posts = [Post(id="a", image=None, tags=("x",), embedding=(0.5, 0.5))]
    manifest = shards.write_shard(
        root, 0, posts, np.zeros((1, 0), np.float32), embedder={"name": "none"},
        image_sha256=[None], stats={},
    )  # fmt: skip
    assert manifest["dim"] == 0 and manifest["skipped"] == {} and manifest["bytes_read"] == 0
    data = shards.read_shard(root, 0)
    assert data.embeddings.shape == (1, 0)
    assert data.posts[0]["image_sha256"] is None and "embedding" not in data.posts[0]


def test_half_written_shard_is_ignored_then_rewritten(tmp_path):
    root = str(tmp_path)
    write(root, 0)
    folder = tmp_path / "shards" / "shard-00001"
    folder.mkdir()
    (folder / "posts.jsonl").write_text('{"id": "stale"}\n' * 9)
    (folder / "embeddings.npy").write_bytes(b"garbage")
    assert list(shards.finished_shards(root)) == [0]
    assert shards.read_manifest(root, 1) is None
    with pytest.raises(FileNotFoundError, match="not finished"):
        shards.read_shard(root, 1)
    posts, embeddings, _ = write(root, 1, n=2, prefix="q")
    data = shards.read_shard(root, 1)
    assert [r["id"] for r in data.posts] == ["q0", "q1"]
    np.testing.assert_array_equal(data.embeddings, embeddings)
    assert sorted(os.listdir(folder)) == ["embeddings.npy", "manifest.json", "posts.jsonl"]


def test_corrupt_or_foreign_manifest_means_unfinished(tmp_path, caplog):
    root = str(tmp_path)
    write(root, 0)
    write(root, 1)
    (tmp_path / "shards" / "shard-00000" / "manifest.json").write_text("{not json")
    manifest_1 = tmp_path / "shards" / "shard-00001" / "manifest.json"
    manifest_1.write_text(json.dumps({**json.loads(manifest_1.read_text()), "shard": 5}))
    (tmp_path / "shards" / "notes.txt").write_text("ignored")
    assert shards.finished_shards(root) == {}
    assert "treating it as unfinished" in caplog.text


def test_data_not_matching_manifest_is_a_shard_error(tmp_path):
    root = str(tmp_path)
    write(root, 0, n=3)
    (tmp_path / "shards" / "shard-00000" / "posts.jsonl").write_text('{"id": "only"}\n')
    with pytest.raises(shards.ShardError, match="posts.jsonl has 15 bytes, its manifest says"):
        shards.read_shard(root, 0)
    # A legacy manifest (sizes only, no hashes) still gets the row count checked.
    manifest = tmp_path / "shards" / "shard-00000" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "files": {}}))
    with pytest.raises(shards.ShardError, match="1 rows but its manifest says 3"):
        shards.read_shard(root, 0)


def test_same_size_damage_is_caught_by_the_hash(tmp_path):
    root = str(tmp_path)
    _, _, manifest = write(root, 0, n=3)
    assert shards.verify(root, 0, manifest) is None
    path = tmp_path / "shards" / "shard-00000" / "embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert "sha256" in shards.verify(root, 0, manifest)
    shards.read_embeddings(root, 0, manifest, mmap=True)  # mmap: sizes only, as documented
    with pytest.raises(shards.ShardError, match="sha256"):
        shards.read_embeddings(root, 0, manifest)


def test_rewriting_a_finished_shard(tmp_path):
    root = str(tmp_path)
    write(root, 0, n=5)
    _, embeddings, manifest = write(root, 0, n=2)
    data = shards.read_shard(root, 0, mmap=True)
    assert manifest["count"] == 2 and len(data.posts) == 2
    np.testing.assert_array_equal(data.embeddings, embeddings)


def test_bad_arguments_are_refused(tmp_path):
    posts = make_posts(2)
    with pytest.raises(ValueError, match="embeddings must be"):
        shards.write_shard(
            str(tmp_path), 0, posts, np.zeros((3, 2)), embedder=SPEC, image_sha256=[None] * 2,
            stats={},
        )  # fmt: skip
    with pytest.raises(ValueError, match="image_sha256"):
        shards.write_shard(
            str(tmp_path), 0, posts, np.zeros((2, 2)), embedder=SPEC, image_sha256=[None],
            stats={},
        )  # fmt: skip
    with pytest.raises(ValueError, match="stats may not set"):
        shards.write_shard(
            str(tmp_path), 0, posts, np.zeros((2, 2)), embedder=SPEC, image_sha256=[None] * 2,
            stats={"count": 9},
        )  # fmt: skip
    assert shards.finished_shards(str(tmp_path)) == {}


def test_line_separators_inside_strings_survive(tmp_path):
    root = str(tmp_path)
    post = Post(id="u", image=None, tags=("x",), caption="one\u2028two\u0085three\nfour")
    shards.write_shard(
        root, 0, [post], np.zeros((1, 0), np.float32), embedder=SPEC, image_sha256=[None],
        stats={},
    )  # fmt: skip
    assert shards.read_shard(root, 0).posts[0]["caption"] == post.caption


def test_a_broken_line_is_named(tmp_path):
    root = str(tmp_path)
    write(root, 0, n=3)
    path = tmp_path / "shards" / "shard-00000" / "posts.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{oops", lines[2]]) + "\n")
    manifest = tmp_path / "shards" / "shard-00000" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "files": {}}))
    with pytest.raises(shards.ShardError, match="line 2 of"):
        shards.read_shard(root, 0)
