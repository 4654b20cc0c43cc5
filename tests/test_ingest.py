"""ingest.embed_posts: rows in post order whatever the number of embedding lanes, every bad post
a counted skip, a failing batch skips its posts and not the shard."""

from __future__ import annotations

import random
import threading
import time

import cv2
import numpy as np

from hashtag import ingest
from hashtag.classic import ClassicEmbedder
from hashtag.fetch import Fetcher
from hashtag.posts import Post


class SlowLanes(ClassicEmbedder):
    """The classic features with `lanes` concurrent callers allowed, each batch taking a random
    time (so batches finish out of order), and batches holding `poison` raising."""

    def __init__(self, lanes: int, poison: str | None = None) -> None:
        super().__init__()
        self._lanes, self.poison = lanes, poison
        self.calls, self.most_at_once, self._running = 0, 0, 0
        self._lock = threading.Lock()
        self._rng = random.Random(0)

    @property
    def lanes(self) -> int:
        return self._lanes

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls += 1
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
            pause = self._rng.uniform(0, 0.03)
        try:
            time.sleep(pause)
            if self.poison is not None and any(
                np.array_equal(image, self.poison_pixels) for image in batch
            ):
                raise RuntimeError("this batch cannot be embedded")
            return super().embed_batch(batch)
        finally:
            with self._lock:
                self._running -= 1


def make_posts(folder, count: int) -> list[Post]:
    rng = np.random.default_rng(0)
    posts = []
    for i in range(count):
        path = folder / f"{i:03d}.jpg"
        image = rng.integers(0, 256, (48 + i % 7, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(path), image)
        posts.append(Post(f"p{i:03d}", str(path), ("tag",)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    posts.insert(5, Post("broken", str(folder / "broken.jpg"), ("tag",)))
    posts.insert(17, Post("gone", str(folder / "missing.jpg"), ("tag",)))
    posts.insert(30, Post("no-image", "", ("tag",)))
    return posts


def test_lanes_keep_the_post_order_and_the_same_vectors(tmp_path):
    posts = make_posts(tmp_path, 60)
    one = ingest.embed_posts(posts, SlowLanes(1), Fetcher(), threads=2, batch_size=4)
    progress = []
    three = SlowLanes(3)
    many = ingest.embed_posts(
        posts, three, Fetcher(), threads=2, batch_size=4, on_progress=lambda *a: progress.append(a)
    )
    assert three.most_at_once > 1  # the lanes really ran side by side
    assert (
        [p.id for p in many.posts]
        == [p.id for p in one.posts]
        == [p.id for p in posts if p.id not in ("broken", "gone", "no-image")]
    )
    np.testing.assert_array_equal(many.embeddings, one.embeddings)
    assert many.image_sha256 == one.image_sha256 and many.bytes_read == one.bytes_read > 0
    assert many.skips == one.skips == [
        ("broken", "truncated"), ("gone", "not-found"), ("no-image", "missing-image")
    ]  # fmt: skip
    assert sum(done for done, _, _ in progress) == len(posts)
    assert sum(skipped for _, skipped, _ in progress) == 3
    assert sum(size for _, _, size in progress) == many.bytes_read


def test_a_failing_batch_skips_its_posts_and_the_other_lanes_go_on(tmp_path):
    posts = make_posts(tmp_path, 40)
    embedder = SlowLanes(2, poison="p010")
    embedder.poison_pixels = embedder.preprocess(cv2.imread(str(tmp_path / "010.jpg"))[..., ::-1])
    result = ingest.embed_posts(posts, embedder, Fetcher(), threads=2, batch_size=4)
    failed = {post_id for post_id, reason in result.skips if reason == "embed-error"}
    assert "p010" in failed and len(failed) == 4  # the whole batch of four
    kept = [p.id for p in result.posts]
    assert kept == sorted(kept) and not failed & set(kept)
    assert len(kept) + len(result.skips) == len(posts)
    assert result.embeddings.shape == (len(kept), embedder.dim)
