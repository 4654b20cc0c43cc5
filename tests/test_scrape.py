"""The scrape stage on a real local Ray: shards, skips, resume, a worker killed mid-shard, S3."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import signal
import threading
import time

import cv2
import numpy as np
import pytest
import ray
from cluster_util import SlowFiles
from conftest import missing

from hashtag import shards, storage
from hashtag.dataset import Dataset
from hashtag.errors import UserError
from hashtag.fetch import FetchConfig
from hashtag.merge import MergeConfig
from hashtag.merge import run as merge
from hashtag.scrape import ScrapeConfig
from hashtag.scrape import run as scrape


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _photo(rng: np.random.Generator, colour: tuple[int, int, int]) -> bytes:
    image = np.full((96, 128, 3), colour, np.uint8)
    image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def write_manifest(
    root: str, posts: int, *, bad: bool = True, image_base: str | None = None
) -> str:
    """A JSONL manifest with `posts` photos (plus a few bad files) written through storage."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(posts):
        colour = [(200, 30, 30), (30, 200, 30), (30, 30, 200)][i % 3]
        name = f"img{i:04d}.jpg"
        storage.write_bytes(storage.join(root, name), _photo(rng, colour))
        rows.append(
            {
                "id": f"p{i:04d}",
                "image": f"{image_base}/{name}" if image_base else name,
                "caption": f"colour {i % 3} #c{i % 3} #all #Photo{i % 2}",
            }
        )
    if bad:
        storage.write_bytes(storage.join(root, "empty.jpg"), b"")
        storage.write_bytes(storage.join(root, "text.jpg"), b"this is not an image")
        rows += [
            {"id": "bad-empty", "image": "empty.jpg", "tags": ["x"]},
            {"id": "bad-text", "image": "text.jpg", "tags": ["x"]},
            {"id": "bad-missing", "image": "nowhere.jpg", "tags": ["x"]},
        ]
    manifest = storage.join(root, "posts.jsonl")
    storage.write_text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_scrape_writes_shards_counts_skips_and_resumes(local_ray, tmp_path):
    manifest = write_manifest(str(tmp_path / "src"), 20)
    out = str(tmp_path / "out")
    config = ScrapeConfig(source=manifest, out=out, shard_size=8, embedder="classic")
    summary = scrape(config)
    assert summary["shards"] == 3 and summary["shards_written"] == 3
    assert summary["posts_embedded"] == 20
    assert sum(summary["skipped"].values()) == 3
    finished = shards.finished_shards(out)
    assert sorted(finished) == [0, 1, 2]
    assert finished[0]["embedder"]["name"] == "classic"
    data = shards.read_shard(out, 0)
    assert data.embeddings.dtype == np.float32 and data.embeddings.shape[0] == len(data.posts)
    np.load(os.path.join(shards.shard_uri(out, 0), "embeddings.npy"), allow_pickle=False)
    assert storage.read_json(storage.join(out, "scrape.json"))["posts_embedded"] == 20

    # A rerun finds every shard done; with one manifest gone, only that shard is redone.
    again = scrape(config)
    assert again["shards_already_done"] == 3 and again.get("shards_written", 0) == 0
    storage.remove(storage.join(shards.shard_uri(out, 1), "manifest.json"))
    third = scrape(config)
    assert third["shards_already_done"] == 2 and third["shards_written"] == 1
    assert third["posts_embedded"] == 20

    # A finished shard damaged in place (same size) is found by its hash and rebuilt.
    path = os.path.join(shards.shard_uri(out, 2), "posts.jsonl")
    data = bytearray(open(path, "rb").read())
    data[10] = ord("#") if data[10] != ord("#") else ord("x")
    open(path, "wb").write(bytes(data))
    fourth = scrape(config)
    assert fourth["shards_already_done"] == 2 and fourth["shards_written"] == 1
    assert shards.verify(out, 2, shards.read_manifest(out, 2)) is None

    # Another shard size or another source would mix slots: refused, nothing touched.
    with pytest.raises(UserError, match="another source or shard size.*new --out"):
        scrape(dataclasses.replace(config, shard_size=5))
    other = write_manifest(str(tmp_path / "src2"), 4)
    with pytest.raises(UserError, match="another source or shard size"):
        scrape(dataclasses.replace(config, source=other))
    assert shards.finished_shards(out).keys() == {0, 1, 2}


class _SlowImages(SlowFiles):
    delay_s = 0.15


def _our_embed_workers() -> list[int]:
    """Pids of Ray workers running embed_shard that descend from this test process (the
    machine may run other people's Ray: never touch those)."""
    parents, found = {}, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parents[int(pid)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::embed_shard"):
                    found.append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    ours = []
    for pid in found:
        ancestor, hops = pid, 0
        while ancestor > 1 and ancestor != os.getpid() and hops < 10:
            ancestor, hops = parents.get(ancestor, 0), hops + 1
        if ancestor == os.getpid():
            ours.append(pid)
    return ours


def _kill_embed_tasks(stop: threading.Event, killed: list, most: int) -> None:
    """SIGKILL up to `most` of our embed_shard workers, as they appear."""
    while not stop.is_set() and len(killed) < most:
        for pid in _our_embed_workers()[: most - len(killed)]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                continue
        time.sleep(0.05)


def test_worker_killed_mid_shard_is_retried_without_losing_or_duplicating_posts(
    local_ray, tmp_path
):
    src = tmp_path / "src"
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _SlowImages(*a, directory=str(src), **k)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        manifest = write_manifest(str(src), 24, bad=False, image_base=base)
        out = str(tmp_path / "out")
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_embed_tasks, args=(stop, killed, 1))
        killer.start()
        summary = scrape(
            ScrapeConfig(
                source=manifest, out=out, shard_size=6, fetch=FetchConfig(allow_private=True),
                max_retries=3, embedder="classic",
            )
        )  # fmt: skip
        stop.set()
        killer.join()
    finally:
        server.shutdown()
    assert killed, "no embed_shard worker was seen to kill"
    assert summary["failed_shards"] == {}
    assert summary["posts_embedded"] == 24
    ids = [p["id"] for i in range(4) for p in shards.read_shard(out, i).posts]
    assert sorted(ids) == [f"p{i:04d}" for i in range(24)]


def test_a_shard_that_keeps_dying_is_retried_a_bounded_number_of_times(local_ray, tmp_path):
    src = tmp_path / "src"
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _SlowImages(*a, directory=str(src), **k)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        manifest = write_manifest(str(src), 6, bad=False, image_base=base)
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_embed_tasks, args=(stop, killed, 20))
        killer.start()
        started = time.monotonic()
        summary = scrape(
            ScrapeConfig(
                source=manifest, out=str(tmp_path / "out"), shard_size=6,
                fetch=FetchConfig(allow_private=True), max_retries=1, embedder="classic",
            )
        )  # fmt: skip
        stop.set()
        killer.join()
    finally:
        server.shutdown()
    assert len(killed) == 2  # the first attempt and one retry, then the driver gives up
    assert list(summary["failed_shards"]) == [0] and summary["task_retries"] == 1
    assert summary["skipped"]["shard-failed"] == 6 and summary.get("posts_embedded", 0) == 0
    assert time.monotonic() - started < 60


def test_hostile_rows_are_counted_skips_and_every_good_photo_is_embedded(local_ray, tmp_path):
    from test_hostile import RawServer, endless_continue, png_bomb, repeated_scan_jpeg, tiff_bomb

    src = tmp_path / "src"
    manifest = write_manifest(str(src), 6, bad=False)
    (src / "tiff.tif").write_bytes(tiff_bomb())
    (src / "png.png").write_bytes(png_bomb())
    (src / "scans.jpg").write_bytes(repeated_scan_jpeg())
    os.mkfifo(src / "pipe.jpg")
    server = RawServer(endless_continue)
    hostile = {
        "tiff": "tiff.tif", "png": "png.png", "scans": "scans.jpg", "fifo": "pipe.jpg",
        "zero": "/dev/zero", "continue": f"{server.url}/a.jpg",
    }  # fmt: skip
    rows = [json.dumps({"id": k, "image": v, "tags": ["x"]}) for k, v in hostile.items()]
    rows += ["[" * 100_000, json.dumps({"id": "i" * 1000, "image": "a.jpg"})]
    with open(manifest, "a") as f:
        f.write("\n".join(rows) + "\n")
    started = time.monotonic()
    try:
        summary = scrape(
            ScrapeConfig(
                source=manifest, out=str(tmp_path / "out"), shard_size=4,
                fetch=FetchConfig(allow_private=True, fetch_deadline_s=1.0, timeout_s=0.5),
                embedder="classic",
            )
        )  # fmt: skip
    finally:
        server.close()
    assert time.monotonic() - started < 60
    assert summary["failed_shards"] == {} and summary["posts_embedded"] == 6
    assert summary["skipped"] == {
        "not-a-file": 2, "timeout": 1, "too-many-pixels": 2, "too-many-scans": 1,
        "source:bad-row": 1, "source:bad-id": 1,
    }  # fmt: skip


def test_scrape_and_merge_on_s3(local_ray, s3_bucket, tmp_path):
    manifest = write_manifest(s3_bucket + "/source", 12)
    out = s3_bucket + "/run"
    summary = scrape(ScrapeConfig(source=manifest, out=out, shard_size=5, embedder="classic"))
    assert summary["posts_embedded"] == 12
    assert storage.exists(storage.join(out, "shards", "shard-00002", "manifest.json"))
    merged = merge(MergeConfig(shards=out, out=out + "/dataset", min_count=1))
    assert merged["count"] == 12
    ids = Dataset.load(out + "/dataset").ids  # parted: ids live in the parts
    assert sorted(np.asarray(ids).tolist()) == [f"p{i:04d}" for i in range(12)]


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="shard-size"):
        ScrapeConfig(source="x", out="y", shard_size=0)
    with pytest.raises(ValueError, match="unknown embedder"):
        ScrapeConfig(source="x", out="y", embedder="nope")


def test_the_window_follows_the_cluster_so_the_autoscaler_sees_demand():
    from hashtag.scrape import window

    config = ScrapeConfig(source="x", out="y")
    # A head with CPU 0 and no worker yet: the queued tasks are the autoscaler's only signal.
    assert window(config, {"CPU": 0.0}) == config.min_in_flight == 64
    assert window(config, {"CPU": 96.0}) == 192  # one running and one queued per task slot
    assert window(dataclasses.replace(config, cpus_per_task=2), {"CPU": 96.0}) == 96
    gpu = dataclasses.replace(config, gpus_per_task=1, min_in_flight=1)
    assert window(gpu, {"CPU": 96.0, "GPU": 2.0}) == 4
    assert window(dataclasses.replace(config, max_in_flight=3), {"CPU": 96.0}) == 3  # fixed
    with pytest.raises(ValueError, match="min-in-flight"):
        ScrapeConfig(source="x", out="y", min_in_flight=0)


def test_pending_posts_are_bounded_in_bytes_whatever_the_window(local_ray, tmp_path, monkeypatch):
    from hashtag import scrape as stage

    manifest = write_manifest(str(tmp_path / "src"), 12, bad=False)
    config = ScrapeConfig(source=manifest, out=str(tmp_path / "out"), shard_size=3)
    assert scrape(config)["peak_in_flight"] == 4  # every shard at once: the window is 64
    monkeypatch.setattr(stage, "PENDING_BYTES", 1)  # room for one chunk at a time
    summary = scrape(dataclasses.replace(config, out=str(tmp_path / "out2")))
    assert summary["peak_in_flight"] == 1 and summary["posts_embedded"] == 12


def test_tflite_interpreters_get_the_task_cpus_not_the_node_cpus(tmp_path):
    tflite = ScrapeConfig(source="m.jsonl", out=str(tmp_path), embedder="tflite:m.tflite")
    assert tflite.embedder == ("tflite:m.tflite",)
    assert dict(tflite.embedder_spec.options) == {"num_threads": 1, "interpreters": 1}
    wide = dataclasses.replace(tflite, cpus_per_task=4)
    assert dict(wide.embedder_spec.options) == {"num_threads": 4, "interpreters": 4}
    classic = ScrapeConfig(source="m.jsonl", out=str(tmp_path), embedder="classic")
    assert dict(classic.embedder_spec.options) == {}
    keras = ScrapeConfig(
        source="m.jsonl", out=str(tmp_path), embedder="keras:VGG19", embedder_weights="w.h5"
    )
    assert dict(keras.embedder_spec.options) == {"weights": "w.h5"}


def test_scrape_with_the_real_tflite_model_on_two_lanes(local_ray, shared_dir, tmp_path):
    """A 2-CPU task runs two single-threaded interpreters side by side; its rows are the same
    vectors, in the same order, as one interpreter embedding the same photos."""
    from hashtag import embedders, ingest
    from hashtag.fetch import Fetcher
    from hashtag.posts import Post

    model = shared_dir / "models" / "mobilenet_v2_1.0_224_quant.tflite"
    photos = sorted((shared_dir / "data" / "feedme-food" / "images").glob("*.jpg"))[:20]
    if not model.is_file() or len(photos) < 20:
        missing("the MobileNetV2 model or the feedme photos are not in ../shared")
    rows = [{"id": f"f{i:02d}", "image": str(p), "tags": ["food"]} for i, p in enumerate(photos)]
    manifest = tmp_path / "posts.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    config = ScrapeConfig(
        source=str(manifest), out=out, embedder=f"tflite:{model}", shard_size=12, cpus_per_task=2
    )
    summary = scrape(config)
    assert summary["posts_embedded"] == 20
    first = shards.read_shard(out, 0)
    assert first.manifest["embedder"]["int8"] is True and first.embeddings.shape == (12, 1280)
    single = embedders.create(f"tflite:{model}", num_threads=1)
    posts = [Post(r["id"], r["image"], ()) for r in rows[:12]]
    expected = ingest.embed_posts(posts, single, Fetcher(), threads=1).embeddings
    assert [p["id"] for p in first.posts] == [r["id"] for r in rows[:12]]
    np.testing.assert_array_equal(first.embeddings, expected)
