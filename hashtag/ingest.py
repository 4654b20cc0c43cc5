"""Turn one shard of posts into embeddings: fetch, decode, preprocess, embed. No Ray here.

Fetching, decoding and preprocessing run in a thread pool (urllib, OpenCV and the TFLite
interpreter release the GIL) while the model embeds earlier batches, so decoding never leaves a
core idle behind the model. An embedder with several lanes (TFLite with `interpreters=k`) gets
k embedding threads, each taking the next batch as soon as its interpreter is free. Every
failure is a counted skip with the post id and a reason; nothing in here raises for a bad post.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hashtag import images, storage
from hashtag.embedders import LABEL_ONLY, Embedder, EmbedderSpec
from hashtag.fetch import Fetcher, FetchError
from hashtag.posts import Post

log = logging.getLogger(__name__)

LABEL_ONLY_SPEC = EmbedderSpec(LABEL_ONLY)
# Decompression-bomb guard: 50 megapixels is larger than any phone photo.
MAX_PIXELS = 50_000_000


@dataclass
class ShardResult:
    """What one shard produced: kept posts, their embeddings (row i = posts[i]) and the skips."""

    posts: list[Post]
    embeddings: np.ndarray
    image_sha256: list[str | None]
    skips: list[tuple[str, str]] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def skipped(self) -> Counter:
        return Counter(reason for _, reason in self.skips)


@dataclass
class _Loaded:
    post: Post
    array: np.ndarray | None = None
    sha256: str | None = None
    size: int = 0
    reason: str | None = None


def _load(post: Post, embedder: Embedder, fetcher: Fetcher, max_pixels: int) -> _Loaded:
    if not post.image:
        return _Loaded(post, reason="missing-image")
    try:
        data = fetcher.get(post.image)
        rgb = images.decode(data, max_pixels=max_pixels, min_side=embedder.min_side)
        array = embedder.preprocess(rgb)
    except FetchError as error:
        return _Loaded(post, reason=error.reason)
    except images.ImageError as error:
        return _Loaded(post, reason=error.reason, size=0)
    except Exception as error:  # a bad post must never fail the shard
        log.exception(
            "post %s: unexpected error while loading %s", post.id, storage.redact(post.image)
        )
        return _Loaded(post, reason=f"error-{type(error).__name__}")
    return _Loaded(post, array, hashlib.sha256(data).hexdigest(), len(data))


def _read_ahead(
    pool: ThreadPoolExecutor, load: Callable[[Post], _Loaded], posts: list[Post], window: int
) -> Iterator[_Loaded]:
    """pool.map(load, posts) in order, with at most `window` posts loaded ahead of the consumer:
    a shard of large photos must not sit decoded in memory while the model catches up."""
    pending: deque[Future] = deque()
    for post in posts:
        pending.append(pool.submit(load, post))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(items: Iterator[_Loaded], size: int) -> Iterator[list[_Loaded]]:
    batch: list[_Loaded] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_posts(
    posts: list[Post],
    embedder: Embedder,
    fetcher: Fetcher,
    *,
    max_pixels: int = MAX_PIXELS,
    threads: int | None = None,
    batch_size: int = 32,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> ShardResult:
    """Embed the images of `posts`. `on_progress(posts_done, skipped, bytes)` after each batch.

    Rows come out in the order of `posts`, whatever the number of lanes.
    """
    threads = threads or len(os.sched_getaffinity(0))
    lanes = max(1, embedder.lanes)
    done: dict[int, _Embedded] = {}
    take, report = threading.Lock(), threading.Lock()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        loaded = _read_ahead(
            pool,
            lambda p: _load(p, embedder, fetcher, max_pixels),
            posts,
            (lanes + 1) * batch_size,
        )
        numbered = enumerate(_batches(loaded, batch_size))

        def lane() -> None:
            while True:
                with take:  # generators are not thread-safe: one lane pulls at a time
                    index, batch = next(numbered, (-1, None))
                if batch is None:
                    return
                done[index] = embedded = _embed(batch, embedder)
                if on_progress:
                    with report:
                        on_progress(len(batch), len(embedded.skips), embedded.bytes_read)

        if lanes == 1:
            lane()
        else:
            with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="embed") as embedding:
                for running in [embedding.submit(lane) for _ in range(lanes)]:
                    running.result()
    result = ShardResult([], np.zeros((0, embedder.dim), np.float32), [])
    chunks = []
    for embedded in (done[index] for index in sorted(done)):
        result.posts.extend(item.post for item in embedded.good)
        result.image_sha256.extend(item.sha256 for item in embedded.good)
        result.bytes_read += embedded.bytes_read
        result.skips.extend(embedded.skips)
        if embedded.good:
            chunks.append(embedded.vectors)
    if chunks:
        result.embeddings = np.concatenate(chunks)
    return result


@dataclass
class _Embedded:
    good: list[_Loaded]
    vectors: np.ndarray | None
    skips: list[tuple[str, str]]

    @property
    def bytes_read(self) -> int:
        return sum(item.size for item in self.good)


def _embed(batch: list[_Loaded], embedder: Embedder) -> _Embedded:
    """One batch through the model; a failure skips the batch's posts, not the shard."""
    good, skips = [], []
    for item in batch:
        if item.reason is None:
            good.append(item)
        else:
            log.warning(
                "skip post %s (%s): %s", item.post.id, storage.redact(item.post.image), item.reason
            )
            skips.append((item.post.id, item.reason))
    if not good:
        return _Embedded([], None, skips)
    try:
        vectors = np.asarray(embedder.embed_batch(np.stack([item.array for item in good])))
    except Exception:
        log.exception("embedding a batch of %d images failed", len(good))
        return _Embedded([], None, skips + [(item.post.id, "embed-error") for item in good])
    return _Embedded(good, vectors.astype(np.float32, copy=False), skips)


def label_only(posts: list[Post]) -> ShardResult:
    """Posts without images (the original project's files): keep their precomputed embeddings,
    or none at all (dimension 0) when the source has none."""
    with_vectors = [p for p in posts if p.embedding is not None]
    if with_vectors and len(with_vectors) != len(posts):
        dims = {len(p.embedding) for p in with_vectors}
        if len(dims) != 1:
            raise ValueError(f"precomputed embeddings of different sizes in one shard: {dims}")
    keep = with_vectors if with_vectors else posts
    skips = [(p.id, "missing-embedding") for p in posts if with_vectors and p.embedding is None]
    if with_vectors:
        embeddings = np.asarray([p.embedding for p in keep], np.float32)
    else:
        embeddings = np.zeros((len(keep), 0), np.float32)
    return ShardResult(list(keep), embeddings, [None] * len(keep), skips)
