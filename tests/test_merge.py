import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from hashtag import merge, shards, storage
from hashtag.dataset import Dataset, DatasetWriter, csr_from_lists
from hashtag.errors import ArtifactError
from hashtag.posts import Post

SPEC = {"name": "classic", "version": 1}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """The merge runs as Ray tasks: one local Ray for the whole module."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def write(root, index, rows, dim=2, embedder=SPEC):
    """rows: (id, tags, sha or None); embedding row = [hash-free marker of the id, index]."""
    posts = [
        Post(id=i, image=None if sha is None else f"/{i}.jpg", tags=tuple(t)) for i, t, sha in rows
    ]
    embeddings = np.array(
        [[float(len(i)) + k, float(index)] for k, (i, _, _) in enumerate(rows)], np.float32
    )
    embeddings = embeddings.reshape(len(rows), 2)[:, :dim]
    shards.write_shard(
        root, index, posts, embeddings, embedder=embedder,
        image_sha256=[sha for _, _, sha in rows], stats={},
    )  # fmt: skip


SHARD_ROWS = [
    [("a", ["cat", "dog"], "s1"), ("b", ["cat"], "s2"), ("a", ["cat"], "s9")],  # id repeat inside
    [("c", ["dog", "sun"], "s3"), ("d", ["cat", "rare"], "s1"), ("b", ["sun"], "s4")],
    [("e", ["sun", "dog"], None), ("f", [], None), ("g", ["Cat"], "s5")],
]


def make(root, order=(0, 1, 2)):
    for index in order:
        write(root, index, SHARD_ROWS[index])


def config(shards_root, out, **kw):
    # These shards' 2-d embeddings are near-duplicates of each other by cosine: the exact
    # rules are tested here, the near-duplicate groups in their own tests below.
    kw.setdefault("near_duplicates", "keep")
    return merge.MergeConfig(shards=shards_root, out=out, **kw)


# Every post a training post: the small hand-made cases count their vocabulary on all of them.
ALL_TRAIN = {"val_fraction": 0.0, "test_fraction": 0.0}


def test_merge_dedupes_and_builds_vocab(tmp_path):
    make(str(tmp_path / "s"))
    summary = merge.run(config(str(tmp_path / "s"), str(tmp_path / "d"), min_count=2))
    ds = Dataset.load(str(tmp_path / "d"))
    # a (repeat of "a" in shard 0), d (image s1 again), b (repeat in shard 1) are dropped.
    assert ds.ids.tolist() == ["a", "b", "c", "e", "f", "g"]
    assert summary["duplicates"] == {"id": 2, "image": 1} and summary["posts_in"] == 9
    assert summary["count"] == len(ds) == 6
    # The vocabulary is counted on the training posts only (c is a validation post, g a test
    # post): cat: a, b; dog: a, e; sun: e (and c: not counted); rare: its post was a repost.
    splits = dict(zip(ds.ids.tolist(), ds.split.tolist(), strict=True))
    assert (splits["c"], splits["g"]) == (1, 2) and splits["a"] == splits["e"] == 0
    assert ds.vocab == ["cat", "dog"] and ds.tag_counts.tolist() == [2, 2]
    assert summary["distinct_tags"] == 4 and summary["distinct_train_tags"] == 3
    expected = np.array(
        [[1, 1], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0]], bool
    )  # rows a, b, c, e, f, g
    np.testing.assert_array_equal(ds.labels(), expected)
    np.testing.assert_array_equal(ds.labels([4, 0]), expected[[4, 0]])
    np.testing.assert_array_equal(ds.labels(np.arange(6) == 2), expected[[2]])
    assert ds.labels([]).shape == (0, 2)
    assert summary["unlabeled"] == ds.manifest["unlabeled"] == 2
    # With every post a training post, every kept post counts: sun (c, e) joins.
    everything = merge.run(config(str(tmp_path / "s"), str(tmp_path / "all"), **ALL_TRAIN))
    assert Dataset.load(str(tmp_path / "all")).vocab == ["dog", "cat", "sun"]
    assert everything["distinct_train_tags"] == 4
    # Rows keep their own embeddings: shard 1's "c" is row 0 of shard 1.
    np.testing.assert_array_equal(ds.embeddings[2], [1.0, 1.0])
    assert ds.embedder.to_json() == SPEC and ds.dim == 2
    assert storage.read_json(str(tmp_path / "d" / "merge.json"))["count"] == 6


def test_vocab_cap_and_min_count(tmp_path):
    make(str(tmp_path / "s"))
    ds_root = str(tmp_path / "d")
    merge.run(config(str(tmp_path / "s"), ds_root, min_count=1, vocab_size=4, **ALL_TRAIN))
    # ties (cat=2, sun=2; Cat=1 ...) broken by name, most frequent first
    assert Dataset.load(ds_root).vocab == ["dog", "cat", "sun", "Cat"]
    merge.run(config(str(tmp_path / "s"), ds_root, min_count=3, **ALL_TRAIN))
    ds = Dataset.load(ds_root)
    assert ds.vocab == ["dog"] and ds.manifest["unlabeled"] == 3
    assert len(ds) == 6  # ids do not depend on the vocabulary


def test_ids_stable_across_reruns_and_completion_order(tmp_path):
    make(str(tmp_path / "s1"), order=(0, 1, 2))
    make(str(tmp_path / "s2"), order=(2, 0, 1))
    merge.run(config(str(tmp_path / "s1"), str(tmp_path / "d1")))
    merge.run(config(str(tmp_path / "s2"), str(tmp_path / "d2")))
    first = Dataset.load(str(tmp_path / "d1"), mmap=False)
    merge.run(config(str(tmp_path / "s1"), str(tmp_path / "d1")))  # rerun in place
    for other in (Dataset.load(str(tmp_path / "d1")), Dataset.load(str(tmp_path / "d2"))):
        np.testing.assert_array_equal(other.ids, first.ids)
        np.testing.assert_array_equal(other.embeddings, first.embeddings)
        np.testing.assert_array_equal(other.split, first.split)
        np.testing.assert_array_equal(other.labels(), first.labels())
    names = sorted(os.listdir(tmp_path / "d1"))
    assert not [n for n in names if ".tmp-" in n], names


def test_split_is_stable_when_a_shard_is_added(tmp_path):
    root = str(tmp_path / "s")
    ids = [f"post-{i}" for i in range(400)]
    write(root, 0, [(i, ["x"], None) for i in ids[:200]])
    merge.run(config(root, str(tmp_path / "d1"), val_fraction=0.2, test_fraction=0.3))
    write(root, 1, [(i, ["x"], None) for i in ids[200:]])
    merge.run(config(root, str(tmp_path / "d2"), val_fraction=0.2, test_fraction=0.3))
    before, after = Dataset.load(str(tmp_path / "d1")), Dataset.load(str(tmp_path / "d2"))
    np.testing.assert_array_equal(after.split[:200], before.split)
    np.testing.assert_array_equal(after.ids[:200], before.ids)
    counts = np.bincount(after.split, minlength=3) / 400
    assert (
        abs(counts[0] - 0.5) < 0.1 and abs(counts[1] - 0.2) < 0.08 and abs(counts[2] - 0.3) < 0.08
    )
    X, Y = after.part("val")
    assert X.shape == (after.manifest["splits"]["val"], 2) and Y.shape == (len(X), 1)
    assert after.rows("validation").tolist() == np.flatnonzero(after.split == 1).tolist()
    with pytest.raises(ValueError, match="unknown split"):
        after.rows("dev")


def test_assign_split_is_a_function_of_seed_and_id():
    ids = [f"id{i}" for i in range(5000)]
    split = merge.assign_split(ids, seed="s", val_fraction=0.1, test_fraction=0.2)
    assert split.dtype == np.uint8
    np.testing.assert_array_equal(
        split[::-1], merge.assign_split(ids[::-1], seed="s", val_fraction=0.1, test_fraction=0.2)
    )
    np.testing.assert_allclose(np.bincount(split) / 5000, [0.7, 0.1, 0.2], atol=0.03)
    other = merge.assign_split(ids, seed="t", val_fraction=0.1, test_fraction=0.2)
    assert (other != split).mean() > 0.2


def test_mixed_embedders_and_dims_are_refused(tmp_path):
    root = str(tmp_path / "s")
    write(root, 0, [("a", ["x"], "1")])
    write(root, 1, [("b", ["x"], "2")], embedder={"name": "keras:mobilenet_v2"})
    with pytest.raises(ValueError, match=r"classic.*keras:mobilenet_v2"):
        merge.run(config(root, str(tmp_path / "d")))
    root = str(tmp_path / "s2")
    write(root, 0, [("a", ["x"], "1")])
    write(root, 1, [("b", ["x"], "2")], dim=1)
    with pytest.raises(ValueError, match="dim 2 but shard 1 has dim 1"):
        merge.run(config(root, str(tmp_path / "d")))
    assert not os.path.exists(tmp_path / "d" / "manifest.json")


def test_label_only_shards(tmp_path):
    root = str(tmp_path / "s")
    spec = {"name": "none"}
    write(root, 0, [("a", ["x", "y"], None), ("b", ["x"], None)], dim=0, embedder=spec)
    write(root, 1, [("a", ["y"], None), ("c", ["x"], None)], dim=0, embedder=spec)
    merge.run(config(root, str(tmp_path / "d"), min_count=1))
    ds = Dataset.load(str(tmp_path / "d"))
    assert ds.embeddings.shape == (3, 0) and ds.ids.tolist() == ["a", "b", "c"]
    assert ds.vocab == ["x", "y"] and ds.embedder.to_json() == spec


def test_missing_and_damaged_shards(tmp_path, caplog):
    root = str(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="run `hashtag scrape` first"):
        merge.run(config(root, str(tmp_path / "d")))
    make(root)
    (tmp_path / "s" / "shards" / "shard-00002" / "manifest.json").unlink()  # unfinished
    (tmp_path / "s" / "shards" / "shard-00001" / "posts.jsonl").write_text("{broken\n")
    write(root, 3, [("z", ["dog"], "s7")])
    # A damaged shard is refused by name (dropping it would lose its posts silently).
    with pytest.raises(ArtifactError, match="shard 1 is damaged.*rerun the same `hashtag scrape`"):
        merge.run(config(root, str(tmp_path / "d"), min_count=1))
    assert not (tmp_path / "d" / "manifest.json").exists()
    (tmp_path / "s" / "shards" / "shard-00001" / "manifest.json").unlink()  # as if rebuilding
    summary = merge.run(config(root, str(tmp_path / "d"), min_count=1))
    assert summary["missing_shards"] == [1, 2] and summary["bad_shards"] == []
    assert Dataset.load(str(tmp_path / "d")).ids.tolist() == ["a", "b", "z"]


def test_every_file_loads_without_pickle(tmp_path):
    make(str(tmp_path / "s"))
    merge.run(config(str(tmp_path / "s"), str(tmp_path / "d"), part_rows=3))  # 3 parts
    for path in (tmp_path / "d").rglob("*"):
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        elif path.is_file():
            json.loads(path.read_text())
    ds = Dataset.load(str(tmp_path / "d"), mmap=True)
    assert len(ds.parts) > 1 and all(isinstance(p.embeddings, np.memmap) for p in ds.parts)


def test_groups_and_partitions_come_from_the_data_not_the_cpus():
    manifests = {i: {"count": 100} for i in range(10)}
    assert merge._groups(manifests, part_rows=1000) == [list(range(10))]
    assert merge._groups(manifests, part_rows=250) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    assert len(merge._groups(manifests, part_rows=1)) == 10  # at most one group per shard


def test_a_task_that_keeps_failing_is_retried_a_bounded_number_of_times(tmp_path, caplog):
    make(str(tmp_path / "s"))
    out = tmp_path / "d"
    out.mkdir()
    (out / merge.WORK).write_text("a file where the work folder goes: every keys task fails")
    with pytest.raises(RuntimeError, match="merge task 'keys of shards 0-2' failed 3 times"):
        merge.run(config(str(tmp_path / "s"), str(out), max_retries=2))
    retries = [r.message for r in caplog.records if "retry" in r.message]
    assert len(retries) == 2 and "keys of shards 0-2" in retries[0]


def test_load_refuses_unfinished_or_other_versions(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `hashtag merge`"):
        Dataset.load(str(tmp_path))
    make(str(tmp_path / "s"))
    merge.run(config(str(tmp_path / "s"), str(tmp_path / "d")))
    manifest = tmp_path / "d" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        Dataset.load(str(tmp_path / "d"))


def test_writer_abort_leaves_nothing(tmp_path):
    out = tmp_path / "d"
    with pytest.raises(RuntimeError), DatasetWriter(str(out), dim=1, id_length=3) as writer:
        writer.append(np.zeros((1, 1)), ["abc"], np.zeros(1), *csr_from_lists([[0]]))
        raise RuntimeError("boom")
    assert os.listdir(out) == []
    with DatasetWriter(str(out), dim=1, id_length=2) as writer:
        with pytest.raises(ValueError, match="more than id_length"):
            writer.append(np.zeros((1, 1)), ["abc"], np.zeros(1), *csr_from_lists([[0]]))


def test_config_validation():
    with pytest.raises(ValueError, match="sum < 1"):
        merge.MergeConfig(shards="s", out="d", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="min_count"):
        merge.MergeConfig(shards="s", out="d", min_count=0)
    with pytest.raises(ValueError, match="needs shards"):
        merge.MergeConfig(shards="", out="d")
    for bad in ({"memory_per_task_mb": -1}, {"max_retries": -1}):
        with pytest.raises(ValueError, match="must be >= 0"):
            merge.MergeConfig(shards="s", out="d", **bad)
    fields = merge.MergeConfig.__dataclass_fields__
    assert all(f.metadata.get("help") for f in fields.values())


def test_s3_round_trip(s3_bucket):
    root, out = f"{s3_bucket}/scrape", f"{s3_bucket}/dataset"
    make(root)
    summary = merge.run(config(root, out))
    ds = Dataset.load(out)
    assert ds.ids.tolist() == ["a", "b", "c", "e", "f", "g"] and summary["count"] == 6
    assert ds.vocab == ["cat", "dog"]  # counted on the training posts
    assert storage.exists(f"{out}/merge.json")
    X, Y = ds.part("train")
    assert X.dtype == np.float32 and Y.dtype == bool and len(X) == len(Y)


def test_stale_temporaries_of_a_killed_merge_are_removed(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "embeddings.npy.tmp-0123abcd").write_bytes(b"half")
    (out / "notes.tmp-1").write_text("not ours")
    make(str(tmp_path / "s"))
    merge.run(config(str(tmp_path / "s"), str(out)))
    names = os.listdir(out)
    assert "embeddings.npy.tmp-0123abcd" not in names and "notes.tmp-1" in names


def test_empty_shards_are_fine(tmp_path):
    root = str(tmp_path / "s")
    write(root, 0, [])
    write(root, 1, [("a", ["x"], "s1"), ("b", ["x"], "s1")])
    write(root, 2, [])
    summary = merge.run(config(root, str(tmp_path / "d")))
    ds = Dataset.load(str(tmp_path / "d"))
    assert ds.ids.tolist() == ["a"] and summary["shards"] == 3 and ds.vocab == []
    assert ds.labels().shape == (1, 0) and summary["unlabeled"] == 1


# ---------------------------------------------------------------- merge as tasks = one pass


def single_pass(root: str, vocab_size: int = 1000, min_count: int = 2):
    """Today's rule, written plainly: one pass over the rows in (shard, row) order; a row is
    kept if it is the first of its post id and the first of its image (rows without an image
    dedupe by id only). Returns (kept rows, vocabulary)."""
    seen_ids, seen_images, kept, counts = set(), set(), [], Counter()
    for index, manifest in sorted(shards.finished_shards(root).items()):
        for row in shards.read_rows(root, index, manifest):
            sha = (row.get("image_sha256") or "").lower()
            new = row["id"] not in seen_ids and not (sha and sha in seen_images)
            seen_ids.add(row["id"])
            if sha:
                seen_images.add(sha)
            if new:
                kept.append(row)
                split = merge.assign_split(
                    [str(row["id"])], seed="hashtag", val_fraction=0.15, test_fraction=0.15
                )
                if split[0] == 0:  # the vocabulary is counted on the training posts only
                    counts.update({str(t) for t in row["tags"]})
    ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return kept, ranked[:vocab_size]


def assert_same_as_single_pass(root: str, out: str, **settings) -> Dataset:
    kept, vocab = single_pass(root, **settings)
    ds = Dataset.load(out)
    ids = [str(r["id"]) for r in kept]
    assert ds.ids.tolist() == ids and ds.vocab == vocab
    column = {t: i for i, t in enumerate(vocab)}
    expected = np.zeros((len(kept), len(vocab)), bool)
    for i, row in enumerate(kept):
        expected[i, [column[t] for t in row["tags"] if t in column]] = True
    np.testing.assert_array_equal(ds.labels(), expected)
    split = merge.assign_split(ids, seed="hashtag", val_fraction=0.15, test_fraction=0.15)
    np.testing.assert_array_equal(ds.split, split)
    return ds


def planted(root: str, shards_count: int = 12, rows: int = 20) -> None:
    """Shards whose ids and images repeat across shards and inside them; some rows unimaged."""
    rng = np.random.default_rng(5)
    for index in range(shards_count):
        ids = rng.integers(0, 150, rows)
        images = rng.integers(0, 120, rows)
        posts = [
            (
                f"id{i}",
                [f"t{t}" for t in rng.integers(0, 12, 3)],
                None if rng.random() < 0.1 else f"{s:064X}",
            )
            for i, s in zip(ids.tolist(), images.tolist(), strict=True)
        ]
        write(root, index, posts)


def test_tasks_equal_one_pass_with_planted_duplicates(tmp_path):
    root, out = str(tmp_path / "s"), str(tmp_path / "d")
    planted(root)
    summary = merge.run(config(root, out, part_rows=30))
    assert summary["parts"] > 4 and summary["duplicates"]["id"] > 0
    assert summary["duplicates"]["image"] > 0
    assert_same_as_single_pass(root, out)
    # A float16 merge keeps the same rows, at half the embedding bytes.
    half = merge.run(config(root, str(tmp_path / "h"), dtype="float16"))
    ds = Dataset.load(str(tmp_path / "h"))
    assert half["count"] == summary["count"] and ds.parts[0].embeddings.dtype == np.float16
    np.testing.assert_allclose(ds.embeddings, Dataset.load(out).embeddings, rtol=1e-3)


def test_tasks_equal_one_pass_on_the_demo(tmp_path):
    from hashtag import demo, scrape

    demo.run(demo.DemoConfig(out=str(tmp_path / "posts"), posts=40, seed=7, image_size=64))
    root = str(tmp_path / "scrape")
    scrape.run(
        scrape.ScrapeConfig(
            source=str(tmp_path / "posts"), out=root, shard_size=8, embedder="classic"
        )
    )
    summary = merge.run(config(root, str(tmp_path / "d"), part_rows=10, min_count=1))
    assert summary["duplicates"]["image"] >= 1  # the demo's repost
    assert_same_as_single_pass(root, str(tmp_path / "d"), min_count=1)


@pytest.mark.slow
def test_a_killed_merge_resumes_and_loses_nothing(tmp_path):
    """SIGKILL the merge's driver once some task outputs exist; the rerun reuses them and gives
    the dataset a merge that was never killed gives."""
    root, out = str(tmp_path / "s"), str(tmp_path / "d")
    planted(root, shards_count=40, rows=50)
    script = (
        "import sys\nfrom hashtag import merge\n"
        "merge.run(merge.MergeConfig(shards=sys.argv[1], out=sys.argv[2], part_rows=100))\n"
    )
    env = {**os.environ, "TQDM_DISABLE": "1"}
    child = subprocess.Popen([sys.executable, "-c", script, root, out], env=env)
    work = tmp_path / "d" / merge.WORK
    deadline = time.monotonic() + 120
    while not list(work.glob("*/dupes/*/done.json")) and time.monotonic() < deadline:
        assert child.poll() is None, "the merge ended before it could be killed"
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert not (tmp_path / "d" / "manifest.json").exists()
    assert list(work.glob("*/keys/*/done.json"))  # finished task outputs, kept for the rerun
    merge.run(config(root, out, part_rows=100))
    assert_same_as_single_pass(root, out)
    assert not work.exists()  # removed once the dataset is complete
    merge.run(config(root, str(tmp_path / "clean"), part_rows=100))
    a, b = Dataset.load(out), Dataset.load(str(tmp_path / "clean"))
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.ids, b.ids)


def _rewrite_embeddings(shard: str, embeddings: np.ndarray, **manifest_fields) -> None:
    """Tamper with a shard as an attacker with write access would: new embeddings.npy, and a
    manifest whose size and sha256 agree with it (so only a content check can tell)."""
    from hashtag import artifacts

    path = os.path.join(shard, "embeddings.npy")
    np.save(path, embeddings, allow_pickle=False)
    manifest_path = os.path.join(shard, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["files"]["embeddings.npy"] = artifacts.file_entry(path)
    manifest.update(manifest_fields)
    open(manifest_path, "w").write(json.dumps(manifest))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_embeddings_are_refused_naming_the_shard(tmp_path, value):
    root = str(tmp_path / "s")
    make(root)
    bad = np.ones((3, 2), np.float32)
    bad[1, 0] = value
    _rewrite_embeddings(os.path.join(root, "shards", "shard-00001"), bad)
    with pytest.raises(ArtifactError, match=r"shard 1 is damaged.*row 1 holds NaN or Infinity"):
        merge.run(config(root, str(tmp_path / "d"), min_count=1))
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_a_tampered_shard_is_refused_by_name_not_as_a_ray_error(tmp_path):
    root = str(tmp_path / "s")
    make(root)
    # Hashes that agree, but an array of another shape than the manifest's count x dim.
    _rewrite_embeddings(os.path.join(root, "shards", "shard-00002"), np.ones((5, 2), np.float32))
    with pytest.raises(ArtifactError, match="shard 2") as info:
        merge.run(config(root, str(tmp_path / "d"), min_count=1))
    assert "RayTaskError" not in repr(info.value) and "Traceback" not in str(info.value)


def _copy_on_other_side(seed: str = "hashtag") -> tuple[str, str]:
    """Two post ids whose own (id-hash) splits differ: original in train, copy in test."""
    for i in range(10_000):
        original, copy = f"photo-{i}", f"repost-{i}"
        splits = merge.assign_split(
            [original, copy], seed=seed, val_fraction=0.15, test_fraction=0.15
        )
        if splits.tolist() == [0, 2]:
            return original, copy
    raise AssertionError("no such pair")


def _photo_and_reencoded_copy() -> tuple[np.ndarray, np.ndarray]:
    """The classic embedder's vectors of a photo (JPEG q95) and of it re-encoded at q50."""
    import cv2

    from hashtag import embedders, images

    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    picture = cv2.GaussianBlur(
        cv2.resize(small, (320, 240), interpolation=cv2.INTER_CUBIC), (0, 0), 3
    )
    embedder = embedders.create("classic")

    def embedded(data: bytes) -> np.ndarray:
        return embedder.embed([images.decode(data, max_pixels=10**7)])[0]

    first = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    decoded = cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR)
    again = cv2.imencode(".jpg", decoded, [cv2.IMWRITE_JPEG_QUALITY, 50])[1].tobytes()
    assert first != again  # not byte-identical: the exact dedupe cannot see it
    return embedded(first), embedded(again)


def write_embedded(root, index, ids, embeddings):
    posts = [Post(id=i, image=f"/{i}.jpg", tags=("cat", "dog")) for i in ids]
    shards.write_shard(
        root, index, posts, np.asarray(embeddings, np.float32), embedder=SPEC,
        image_sha256=[f"sha-{i}" for i in ids], stats={},
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["group", "drop", "keep"])
def test_a_planted_near_copy_ends_on_its_originals_side(tmp_path, mode):
    """A repost that is not byte-identical (the photo re-encoded at JPEG quality 50, another
    image sha) whose id hashes to test while its original is in train: grouped, it joins the
    original's split; dropped, it is gone; kept, it stays a leak, counted."""
    rng = np.random.default_rng(0)
    original, copy = _copy_on_other_side()
    photo, reencoded = _photo_and_reencoded_copy()
    X = rng.normal(size=(60, photo.shape[0])).astype(np.float32)  # distinct: cosine ~0
    X[7] = photo
    noisy = reencoded
    ids0 = [f"p{i}" for i in range(30)]
    ids0[7] = original
    write_embedded(str(tmp_path / "s"), 0, ids0, X[:30])
    ids1 = [f"q{i}" for i in range(30)]
    ids1[12] = copy
    later = X[30:].copy()
    later[12] = noisy
    write_embedded(str(tmp_path / "s"), 1, ids1, later)
    summary = merge.run(config(str(tmp_path / "s"), str(tmp_path / "d"), near_duplicates=mode))
    ds = Dataset.load(str(tmp_path / "d"))
    ids = ds.ids.tolist()
    near = summary["near_duplicates"]
    assert near["groups"] == 1 and near["posts_in_groups"] == 2
    assert near["test_with_train_copy"]["before"] == 1
    assert ds.manifest["near_duplicates"] == near
    from hashtag import tune

    line = tune.near_duplicate_line(ds)  # printed under tune's table
    after = 1 if mode == "keep" else 0
    assert f"1 test posts had a near-duplicate in train before grouping, {after} after" in line
    if mode == "group":
        assert ds.split[ids.index(copy)] == ds.split[ids.index(original)] == 0
        assert near["moved"] == 1 and near["test_with_train_copy"]["after"] == 0
        assert len(ds) == 60
    elif mode == "drop":
        assert copy not in ids and original in ids and len(ds) == 59 and near["dropped"] == 1
        assert near["test_with_train_copy"]["after"] == 0
    else:
        assert ds.split[ids.index(copy)] == 2 and near["test_with_train_copy"]["after"] == 1


def test_near_duplicate_groups_are_connected_components():
    pairs = np.array([[5, 9], [1, 5], [20, 30], [30, 40], [2, 40]], np.uint64)
    nodes, roots = merge.connected_components(pairs)
    assert dict(zip(nodes.tolist(), roots.tolist(), strict=True)) == {
        1: 1, 5: 1, 9: 1, 2: 2, 20: 2, 30: 2, 40: 2
    }  # fmt: skip
