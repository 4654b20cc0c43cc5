"""Merge finished shards into one dataset: contiguous ids, dedupe, vocabulary, split.

Two passes over the shards, one shard in memory at a time:

1. posts.jsonl of each shard, in shard index order: drop reposts and count tags.
   A row is a duplicate if an earlier row (shard index, then row) had the same post id, or the
   same image_sha256 (rows without an image, sha null, dedupe by id only). The first occurrence
   wins. Seen ids and image digests are kept as sorted numpy uint64 hashes (8 bytes a row; a
   64-bit collision among a million posts has odds of about 1e-8), and the rows kept as one bool
   per row.
2. The vocabulary is built from the tag counts of the kept rows (all splits: it is the label
   space, not a feature): most frequent first, ties by tag name, at least min_count posts, at
   most vocab_size tags. Then each shard is streamed to a DatasetWriter: embeddings, ids, labels
   (tags outside the vocabulary dropped) and split.

Global ids are 0..N-1 in (shard index, row) order: the same shards give the same ids, whatever
order they finished in. Posts left with no tag in the vocabulary are kept (they are true
negatives for every tag, and dropping them would make ids depend on vocab_size); their number is
reported as "unlabeled". The split of a post is a hash of (seed, post id), so it never moves
when shards are added or the vocabulary changes.

Rerunning into the same OUT is fine: the old manifest is removed first, the new one written last.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hashtag import storage
from hashtag.dataset import DatasetWriter, csr_from_lists, split_code
from hashtag.embedders import EmbedderSpec
from hashtag.errors import UserError
from hashtag.shards import ShardError, finished_shards, read_embeddings, read_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeConfig:
    shards: str = field(metadata={"help": "scrape output: the folder or s3:// URI holding shards/"})
    out: str = field(metadata={"help": "where to write the merged dataset (folder or s3:// URI)"})
    vocab_size: int = field(default=1000, metadata={"help": "keep at most this many hashtags"})
    min_count: int = field(
        default=2, metadata={"help": "keep only hashtags used by at least this many posts"}
    )
    val_fraction: float = field(
        default=0.15, metadata={"help": "fraction of posts in the validation split"}
    )
    test_fraction: float = field(
        default=0.15, metadata={"help": "fraction of posts in the test split"}
    )
    seed: str = field(
        default="hashtag",
        metadata={"help": "salt of the post-id hash that assigns splits; change it to reshuffle"},
    )

    def __post_init__(self) -> None:
        if not self.shards or not self.out:
            raise ValueError(
                "MergeConfig needs shards (the scrape output) and out (a folder or URI)"
            )
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves "
                "no training posts; make their sum < 1"
            )


def hash64(strings: list[str], salt: str = "") -> np.ndarray:
    """uint64 blake2b digests of `salt` + NUL + each string (deterministic across processes)."""
    prefix = f"{salt}\0".encode() if salt else b""
    digests = b"".join(
        hashlib.blake2b(prefix + s.encode("utf-8"), digest_size=8).digest() for s in strings
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def assign_split(
    ids: list[str], *, seed: str, val_fraction: float, test_fraction: float
) -> np.ndarray:
    """uint8 split codes from a hash of each post id: u < test -> test, < test+val -> val, else train."""
    u = (hash64(ids, seed) >> np.uint64(11)).astype(np.float64) / float(2**53)  # uniform [0, 1)
    split = np.full(len(ids), split_code("train"), np.uint8)
    split[u < test_fraction + val_fraction] = split_code("val")
    split[u < test_fraction] = split_code("test")
    return split


class _SeenSet:
    """A growing set of uint64 hashes, kept sorted in one array."""

    def __init__(self) -> None:
        self.values = np.zeros(0, np.uint64)

    def first_occurrences(self, hashes: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Bool mask: hash i was not seen before (in this set or earlier in `hashes`); adds them.
        Rows where `valid` is False are ignored and reported as first occurrences."""
        valid = np.ones(len(hashes), bool) if valid is None else valid
        first = np.zeros(len(hashes), bool)
        candidates = np.flatnonzero(valid)
        unique, where = np.unique(hashes[candidates], return_index=True)
        seen = np.zeros(len(unique), bool)
        if len(self.values):
            position = np.minimum(np.searchsorted(self.values, unique), len(self.values) - 1)
            seen = self.values[position] == unique
        first[candidates[where[~seen]]] = True
        # Both inputs are sorted: a stable sort (timsort) merges them in linear time.
        self.values = np.sort(np.concatenate([self.values, unique[~seen]]), kind="stable")
        return first | ~valid


def _check_compatible(manifests: dict[int, dict[str, Any]]) -> None:
    first_index = next(iter(manifests))
    first = manifests[first_index]
    spec = EmbedderSpec.from_json(first["embedder"])
    for index, manifest in manifests.items():
        other = EmbedderSpec.from_json(manifest["embedder"])
        if other != spec:
            raise UserError(
                f"shard {first_index} was embedded with {spec} but shard {index} with "
                f"{other}{_difference(spec, other)}; merge shards of one embedder set only "
                "(scrape the others again with the same --embedder flags, or into another folder)"
            )
        if manifest["dim"] != first["dim"]:
            raise UserError(
                f"shard {first_index} has dim {first['dim']} but shard {index} has dim "
                f"{manifest['dim']} (same embedder {first['embedder']}); rescrape one of them"
            )


def _difference(a: EmbedderSpec, b: EmbedderSpec) -> str:
    """Why two specs differ, when their names alone do not say it."""
    if a.parts or b.parts:
        return f" ({len(a.parts) or 1} embedder(s) vs {len(b.parts) or 1})"
    if a.name == b.name:
        changed = sorted(k for k in dict(a.options) | dict(b.options) if a.get(k) != b.get(k))
        return f" (same model, different {', '.join(changed)})"
    return ""


def run(config: MergeConfig) -> dict[str, Any]:
    """Merge the finished shards under config.shards into a dataset at config.out; return the
    summary (also written as OUT/merge.json)."""
    started = time.monotonic()
    manifests = finished_shards(config.shards)
    if not manifests:
        raise FileNotFoundError(
            f"no finished shards under {storage.join(config.shards, 'shards')}; run `hashtag scrape` first"
        )
    _check_compatible(manifests)
    first = next(iter(manifests.values()))
    embedder, dim = first["embedder"], first["dim"]
    indices = sorted(manifests)
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        log.warning("shards %s are not finished; merging the %d others", missing, len(indices))

    # Pass 1: which rows survive dedupe, and how often each tag is used by them.
    seen_ids, seen_images = _SeenSet(), _SeenSet()
    keep: dict[int, np.ndarray] = {}
    bad_shards: dict[int, str] = {}
    tag_counts: Counter[str] = Counter()
    posts_in = duplicate_ids = duplicate_images = id_length = 0
    for index in tqdm(indices, desc="merge 1/2: dedupe, count tags", unit="shard"):
        try:
            rows = read_rows(config.shards, index, manifests[index])
        except ShardError as error:
            log.error("skipping shard %d: %s", index, error)
            bad_shards[index] = str(error)
            continue
        ids = [str(row["id"]) for row in rows]
        shas = [row.get("image_sha256") for row in rows]
        new_id = seen_ids.first_occurrences(hash64(ids))
        has_image = np.array([isinstance(s, str) and bool(s) for s in shas], bool)
        image_hashes = hash64([s.lower() if isinstance(s, str) else "" for s in shas])
        new_image = seen_images.first_occurrences(image_hashes, has_image)
        kept = new_id & new_image
        keep[index] = kept
        posts_in += len(rows)
        duplicate_ids += int(np.count_nonzero(~new_id))
        duplicate_images += int(np.count_nonzero(new_id & ~new_image))
        kept_rows = list(itertools.compress(rows, kept.tolist()))
        tag_counts.update(
            itertools.chain.from_iterable({str(t) for t in r.get("tags") or ()} for r in kept_rows)
        )
        id_length = max(id_length, max(map(len, ids), default=0))  # over all rows: an upper bound

    vocab = sorted(
        (tag for tag, count in tag_counts.items() if count >= config.min_count),
        key=lambda tag: (-tag_counts[tag], tag),
    )[: config.vocab_size]
    column = {tag: i for i, tag in enumerate(vocab)}
    good = [i for i in indices if i in keep]

    # Pass 2: stream the kept rows into the dataset, shard by shard.
    with DatasetWriter(config.out, dim=dim, id_length=id_length) as writer:
        for index in tqdm(good, desc="merge 2/2: write dataset", unit="shard"):
            try:
                rows = read_rows(config.shards, index, manifests[index])
                embeddings = read_embeddings(config.shards, index, manifests[index], mmap=True)
            except ShardError as error:  # changed since pass 1: ids would shift, so stop here
                raise RuntimeError(f"shard {index} changed during the merge: {error}") from error
            kept = keep[index]
            kept_rows = list(itertools.compress(rows, kept.tolist()))
            ids = [str(row["id"]) for row in kept_rows]
            labels = [
                [column[t] for t in map(str, row.get("tags") or ()) if t in column]
                for row in kept_rows
            ]
            label_indptr, label_indices = csr_from_lists(labels)
            split = assign_split(
                ids,
                seed=config.seed,
                val_fraction=config.val_fraction,
                test_fraction=config.test_fraction,
            )
            writer.append(embeddings[kept], ids, split, label_indptr, label_indices)
            del rows, kept_rows, embeddings
        manifest = writer.finish(
            vocab=vocab,
            tag_counts=[tag_counts[t] for t in vocab],
            embedder=embedder,
            extra={
                "shards": good,
                "missing_shards": missing,
                "bad_shards": bad_shards,
                "posts_in": posts_in,
                "duplicates": {"id": duplicate_ids, "image": duplicate_images},
                "distinct_tags": len(tag_counts),
                "config": asdict(config),
            },
        )

    seconds = time.monotonic() - started
    summary = {
        "out": config.out,
        "count": manifest["count"],
        "dim": dim,
        "embedder": embedder,
        "vocab_size": len(vocab),
        "splits": manifest["splits"],
        "unlabeled": manifest["unlabeled"],
        "shards": len(good),
        "missing_shards": missing,
        "bad_shards": sorted(bad_shards),
        "posts_in": posts_in,
        "duplicates": manifest["duplicates"],
        "distinct_tags": len(tag_counts),
        "seconds": round(seconds, 3),
        "rows_per_second": round(posts_in / seconds, 1) if seconds > 0 else None,
    }
    storage.write_json(storage.join(config.out, "merge.json"), summary)
    log.info(
        "merged %d shards: %d posts in, %d kept, %d tags in the vocabulary",
        len(good),
        posts_in,
        manifest["count"],
        len(vocab),
    )
    return summary
