"""Merge finished shards into one dataset: contiguous ids, dedupe, vocabulary, split.

The merge runs as Ray tasks (the same command locally, where it starts a Ray, and on a cluster);
no process ever holds the whole dataset or its dedupe state. Shards are cut into G groups of
consecutive shards (one dataset part each) and post keys into P partitions by hash, both from
the data (G = rows / --part-rows, P = rows / 2^20), so a merge writes the same parts on any
cluster; each step submits all its tasks at once, which is what the autoscaler scales for:

1. keys (G tasks): read posts.jsonl of a group; write each row's order key (shard << 32 | row),
   id hash and image hash, sorted by partition, the row's tags as a compact CSR, and its split
   (`post_splits`, the same function step 5 writes the split with).
2. dedupe (2P tasks): partition p of the id hashes (then of the image hashes) from every group:
   duplicate ids meet in one task, as do duplicate images. A row is a duplicate if an earlier
   row in (shard index, row) order had the same post id, or the same image_sha256 (rows without
   an image, sha null, dedupe by id only): the first occurrence wins, exactly as a single pass
   over the shards in order would decide. Writes the order keys of the duplicates.
2b. near-duplicates (C tasks over chunks of ~65,536 rows, then the driver): pairs of kept rows
   at cosine similarity >= --near-duplicate-similarity by faiss range search (chunk c's index
   against the rows of chunks 0..c), joined into groups; a group's first post decides the split
   of all (`split_of`) or is the only one kept (`--near-duplicates drop`). See the section below.
3. count (G tasks): a group's kept rows and their tag counts (from the CSR of step 1), over the
   kept training posts (the vocabulary's) and over all kept posts (recorded only).
4. The driver adds the counts (per group: rows kept; per tag: training posts) and builds the
   vocabulary from the TRAINING split only, so that no validation or test label decides which
   tags exist: most frequent first, ties by tag name, at least min_count training posts, at
   most vocab_size tags. Group g's rows get the global ids after those of groups 0..g-1.
5. write (G tasks): each group streams its kept rows to its part folder (embeddings, ids, labels
   with tags outside the vocabulary dropped, split), then the driver writes the manifest LAST.

Global ids are 0..N-1 in (shard index, row) order: the same shards give the same ids, whatever
order they finished in. Posts left with no tag in the vocabulary are kept (they are true
negatives for every tag, and dropping them would make ids depend on vocab_size); their number is
reported as "unlabeled". The split of a post is a hash of (seed, post id), so it never moves
when shards are added or the vocabulary changes, except that a near-duplicate group takes its
first post's split (a repost added later joins its original's side). Ids and image digests are compared as 64-bit
blake2b hashes (a collision among a million posts has odds of about 1e-8).

Every task's output has its own manifest, written last, under OUT/.merge-work/<fingerprint of
the shards and the settings>/; a killed merge rerun with the same command redoes only what had
not finished. The previous dataset stays loadable until the new manifest replaces it; then the
old parts and the work folder are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hashtag import artifacts, shards, storage
from hashtag.dataset import (
    DATASET_FORMAT,
    DATASET_VERSION,
    EMBEDDING_DTYPES,
    FILES,
    OLDER_FILES,
    PARTS,
    DatasetWriter,
    csr_from_lists,
    split_code,
    write_parted_manifest,
)
from hashtag.embedders import EmbedderSpec
from hashtag.errors import ArtifactError, UserError
from hashtag.results import StageResult
from hashtag.shards import (
    ShardError,
    finished_shards,
    read_embeddings,
    read_rows,
    shard_uri,
    verify,
)

log = logging.getLogger(__name__)

NEAR_DUPLICATE_MODES = ("group", "drop", "keep")
# The cosine similarity at which two posts are near-duplicates, per embedder kind: calibrated
# by bench/bench_neardup.py on transformed copies of the shared photo sets (recall and false
# merges in docs/design.md). CNN features (tflite, keras, their ensembles): 0.85; the classic
# colour/texture features are all positive, so distinct photos sit closer: a higher bar.
NEAR_DUPLICATE_SIMILARITY = 0.85
NEAR_DUPLICATE_SIMILARITY_CLASSIC = 0.97
NEAR_CHUNK_ROWS = 65_536  # rows per near-duplicate index (one task each)
NEAR_EXACT_ROWS = 16_384  # a chunk's index is exact up to this, IVF above
NEAR_LINKS = 32  # at most this many near-duplicates kept per post (the most similar)


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
    dtype: str = field(
        default="float32",
        metadata={"help": "embedding dtype of the dataset: float32, or float16 (half the bytes)"},
    )
    part_rows: int = field(
        default=262144,
        metadata={"help": "rows per dataset part (and per merge task); memory per task ~ this"},
    )
    memory_per_task_mb: int = field(
        default=1024,
        metadata={
            "help": "memory each merge task declares to Ray (MB), so Ray packs them; 0 declares "
            "none (for node types that do not advertise memory)"
        },
    )
    max_retries: int = field(
        default=3,
        metadata={
            "help": "retries of a merge task that failed or whose worker died; then the merge "
            "stops naming it (a rerun resumes from the tasks that finished)"
        },
    )
    near_duplicates: str = field(
        default="group",
        metadata={
            "help": "posts whose embeddings are within --near-duplicate-similarity of each "
            "other: group (one split for the whole group), drop (keep the first post of each "
            "group) or keep (as they come; only counted)"
        },
    )
    near_duplicate_similarity: float = field(
        default=0.0,
        metadata={
            "help": "cosine similarity at or above which two posts are near-duplicates; 0: the "
            f"value calibrated for the embedder ({NEAR_DUPLICATE_SIMILARITY} for CNN features, "
            f"{NEAR_DUPLICATE_SIMILARITY_CLASSIC} for classic; bench/bench_neardup.py)"
        },
    )

    def __post_init__(self) -> None:
        if not self.shards or not self.out:
            raise ValueError(
                "MergeConfig needs shards (the scrape output) and out (a folder or URI)"
            )
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.dtype not in EMBEDDING_DTYPES:
            raise ValueError(
                f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.dtype!r}"
            )
        if self.near_duplicates not in NEAR_DUPLICATE_MODES:
            raise ValueError(
                f"near_duplicates must be one of {', '.join(NEAR_DUPLICATE_MODES)}, got "
                f"{self.near_duplicates!r}"
            )
        if not 0.0 <= self.near_duplicate_similarity <= 1.0:
            raise ValueError(
                "near_duplicate_similarity must be in [0, 1] (0: the calibrated default), got "
                f"{self.near_duplicate_similarity}"
            )
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")
        if self.memory_per_task_mb < 0 or self.max_retries < 0:
            raise ValueError(
                "memory_per_task_mb and max_retries must be >= 0, got "
                f"{self.memory_per_task_mb} and {self.max_retries}"
            )
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


def post_splits(config: MergeConfig, ids: list[str]) -> np.ndarray:
    """The posts' own split codes (a hash of the post id): recorded in step 1; the vocabulary
    count (step 3) and the written split (step 5) both apply `grouped_splits` to them, so the
    vocabulary is counted on exactly the posts written as training posts."""
    return assign_split(
        ids, seed=config.seed, val_fraction=config.val_fraction, test_fraction=config.test_fraction
    )


def _check_compatible(manifests: dict[int, dict[str, Any]]) -> EmbedderSpec:
    """The one embedder spec every shard was made with; UserError if they differ."""
    first_index = next(iter(manifests))
    first = manifests[first_index]
    spec = shards.embedder(first)
    for index, manifest in manifests.items():
        other = shards.embedder(manifest)
        if other != spec:
            raise UserError(
                f"shard {first_index} was embedded with {spec} but shard {index} with "
                f"{other}{_difference(spec, other)}; merge shards of one embedder set only "
                "(scrape the others again with the same --embedder flags, or into another folder)"
            )
        if manifest["dim"] != first["dim"]:
            raise UserError(
                f"shard {first_index} has dim {first['dim']} but shard {index} has dim "
                f"{manifest['dim']} (same embedder {spec}); rescrape one of them"
            )
    return spec


def _difference(a: EmbedderSpec, b: EmbedderSpec) -> str:
    """Why two specs differ, when their names alone do not say it."""
    if len(a.parts) == len(b.parts) > 0:  # the same set of names: say which part differs
        return "".join(_difference(p, q) for p, q in zip(a.parts, b.parts, strict=True) if p != q)
    if a.parts or b.parts:
        return f" ({len(a.parts) or 1} embedder(s) vs {len(b.parts) or 1})"
    if a.name == b.name:
        changed = sorted(k for k in dict(a.options) | dict(b.options) if a.get(k) != b.get(k))
        return f" ({a.name}: same model, different {', '.join(changed)})"
    return ""


# ---------------------------------------------------------------- the tasks (pure of Ray)

WORK = ".merge-work"
_DONE = "done.json"  # each task output's own manifest, written last


def _check_finite(root: str, index: int, manifest: dict[str, Any], block: int = 65536) -> None:
    """ShardError naming the shard when its embeddings hold NaN or Infinity (a model trained on
    them fails later without saying where they came from); read a block of rows at a time."""
    if not manifest.get("dim"):
        return
    embeddings = read_embeddings(root, index, manifest, mmap=True)
    for start in range(0, len(embeddings), block):
        finite = np.isfinite(embeddings[start : start + block]).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise ShardError(
                f"shard {index}: embeddings.npy row {row} holds NaN or Infinity; rebuild the "
                f"shard (delete {shard_uri(root, index)} and rerun "
                "the scrape)"
            )


def _order_keys(index: int, n: int) -> np.ndarray:
    """(shard index << 32) | row: sorting these is the (shard, row) order of a single pass."""
    return (np.uint64(index) << np.uint64(32)) | np.arange(n, dtype=np.uint64)


def _partition_sorted(
    keys: np.ndarray, orders: np.ndarray, partitions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(orders, keys) sorted by partition (key % partitions), and the partition bounds."""
    partition = keys % np.uint64(partitions)
    by = np.argsort(partition, kind="stable")
    bounds = np.searchsorted(partition[by], np.arange(partitions + 1, dtype=np.uint64))
    return orders[by], keys[by], bounds.astype(np.int64)


def _done(uri: str) -> dict[str, Any] | None:
    done = storage.join(uri, _DONE)
    return storage.read_json(done) if storage.exists(done) else None


def keys_task(
    shards_root: str,
    group: list[int],
    manifests: dict[int, dict],
    partitions: int,
    work: str,
    config: MergeConfig,
) -> dict[str, Any]:
    """Step 1 for one group of shards: order keys, id and image hashes by partition, tags,
    splits."""
    uri = storage.join(work, "keys", f"group-{group[0]:05d}")
    if (done := _done(uri)) is not None:
        return done
    orders, id_hashes, image_hashes, has_image, splits = [], [], [], [], []
    # Tags as a CSR over the group's own tag numbering, built shard by shard, so that what the
    # task holds beyond one shard's rows is a few integers per row (not Python lists).
    column: dict[str, int] = {}
    tag_counts_per_row, tag_indices = [], []
    bad: dict[str, str] = {}
    id_length = 0
    for index in group:
        problem = verify(shards_root, index, manifests[index])  # sizes and sha256
        if problem:  # the driver refuses the merge, naming the shard
            bad[str(index)] = problem
            continue
        try:
            rows = read_rows(shards_root, index, manifests[index])
            _check_finite(shards_root, index, manifests[index])
        except ShardError as error:
            bad[str(index)] = str(error)
            continue
        ids = [str(row["id"]) for row in rows]
        shas = [row.get("image_sha256") for row in rows]
        orders.append(_order_keys(index, len(rows)))
        id_hashes.append(hash64(ids))
        splits.append(post_splits(config, ids))
        has_image.append(np.array([isinstance(x, str) and bool(x) for x in shas], bool))
        image_hashes.append(hash64([x.lower() if isinstance(x, str) else "" for x in shas]))
        lists = [
            [
                column.setdefault(t, len(column))
                for t in sorted({str(t) for t in row.get("tags") or ()})
            ]
            for row in rows
        ]
        indptr, indices = csr_from_lists(lists)
        tag_counts_per_row.append(np.diff(indptr))
        tag_indices.append(indices)
        id_length = max(id_length, max(map(len, ids), default=0))
        del rows, lists

    def concat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    order, has = concat(orders, np.uint64), concat(has_image, bool)
    names = list(column)  # index j of tag_indices is names[j]
    tag_indptr = np.zeros(len(order) + 1, np.int64)
    np.cumsum(concat(tag_counts_per_row, np.int64), out=tag_indptr[1:])
    tag_indices = concat(tag_indices, np.int32)
    arrays = {"order": order, "tag_indptr": tag_indptr, "tag_indices": tag_indices}
    arrays["split"] = concat(splits, np.uint8)
    for kind, hashes, valid in (
        ("id", concat(id_hashes, np.uint64), np.ones(len(order), bool)),
        ("image", concat(image_hashes, np.uint64), has),
    ):
        sorted_orders, sorted_keys, bounds = _partition_sorted(
            hashes[valid], order[valid], partitions
        )
        arrays.update({f"{kind}_order": sorted_orders, f"{kind}_hash": sorted_keys})
        arrays[f"{kind}_bounds"] = bounds
    for name, array in arrays.items():
        storage.save_npy(storage.join(uri, f"{name}.npy"), array)
    storage.write_json(storage.join(uri, "tags.json"), names)
    done = {"rows": len(order), "bad": bad, "id_length": id_length}
    storage.write_json(storage.join(uri, _DONE), done)
    return done


def dedupe_task(kind: str, partition: int, groups: list[list[int]], work: str) -> dict[str, Any]:
    """Step 2: the order keys of the rows whose `kind` ("id" or "image") hash, in partition
    `partition`, appeared at an earlier order key."""
    uri = storage.join(work, "dupes", f"{kind}-{partition:05d}")
    if (done := _done(uri)) is not None:
        return done
    orders, hashes = [], []
    for group in groups:
        keys = storage.join(work, "keys", f"group-{group[0]:05d}")
        bounds = storage.load_npy(storage.join(keys, f"{kind}_bounds.npy"))
        part = slice(int(bounds[partition]), int(bounds[partition + 1]))
        orders.append(
            np.array(storage.load_npy(storage.join(keys, f"{kind}_order.npy"), True)[part])
        )
        hashes.append(
            np.array(storage.load_npy(storage.join(keys, f"{kind}_hash.npy"), True)[part])
        )
    order, hashed = np.concatenate(orders), np.concatenate(hashes)
    by = np.lexsort((order, hashed))  # by hash, then by order: the first of a run wins
    repeat = np.zeros(len(by), bool)
    repeat[1:] = hashed[by][1:] == hashed[by][:-1]
    duplicates = np.sort(order[by][repeat])
    storage.save_npy(storage.join(uri, "orders.npy"), duplicates)
    done = {"duplicates": len(duplicates)}
    storage.write_json(storage.join(uri, _DONE), done)
    return done


def _duplicates_in(work: str, kind: str, partitions: int, lo: int, hi: int) -> np.ndarray:
    """Duplicate order keys of `kind` in [lo, hi), from every partition, sorted."""
    found = []
    for partition in range(partitions):
        orders = storage.load_npy(
            storage.join(work, "dupes", f"{kind}-{partition:05d}", "orders.npy"), True
        )
        a, b = np.searchsorted(orders, [np.uint64(lo), np.uint64(hi)])
        found.append(np.array(orders[a:b]))
    return np.sort(np.concatenate(found))


# ---------------------------------------------------------------- near-duplicates (step 2b)
#
# Chunks of consecutive shards (~NEAR_CHUNK_ROWS kept rows each, in order-key order). Task c
# builds a faiss index (neighbours.py: exact up to NEAR_EXACT_ROWS rows, IVF above) of chunk c's
# kept rows and range-searches it with the rows of chunks 0..c: every pair of posts within the
# similarity threshold is found exactly once (by the task of the later post's chunk), each task
# holds one chunk's index and one query block, and the tasks run in parallel at any N. The
# driver joins the pairs into groups (connected components); a group's first post (lowest order
# key) decides the split of every member (`split_of`), or is the only one kept (drop).
# Cost: task c reads chunks 0..c, so C (C + 1) / 2 chunk reads in all (C = 16 at 1M rows), and
# each query scans nprobe / nlist of a chunk's rows once the chunk is over NEAR_EXACT_ROWS.


def _chunk_rows(
    shards_root: str, chunk: list[int], manifests: dict[int, dict], partitions: int, work: str
) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[int]]]:
    """(shard index, order keys, float32 embeddings, rows in the shard) of the rows of each
    shard that survived the exact dedupe, shard by shard."""
    for index in chunk:
        count = int(manifests[index]["count"])
        if count == 0:
            continue
        lo, hi = index << 32, (index + 1) << 32
        order = _order_keys(index, count)
        dupes = np.union1d(
            _duplicates_in(work, "id", partitions, lo, hi),
            _duplicates_in(work, "image", partitions, lo, hi),
        )
        kept = np.flatnonzero(~np.isin(order, dupes))
        if len(kept) == 0:
            continue
        embeddings = read_embeddings(shards_root, index, manifests[index], mmap=True)
        yield index, order[kept], np.asarray(embeddings[kept], np.float32), kept.tolist()


def near_task(
    config: MergeConfig,
    chunks: list[list[int]],
    c: int,
    manifests: dict[int, dict],
    partitions: int,
    work: str,
) -> dict[str, Any]:
    """Step 2b for chunk c: the near-duplicate pairs (earlier order key, later order key) whose
    later post is in chunk c, and chunk c's kept order keys with their own (id-hash) splits."""
    from hashtag import neighbours

    uri = storage.join(work, "near", f"chunk-{chunks[c][0]:05d}")
    if (done := _done(uri)) is not None:
        return done
    orders, embeddings, splits = [], [], []
    for shard, shard_orders, X, rows in _chunk_rows(
        config.shards, chunks[c], manifests, partitions, work
    ):
        ids = [str(row["id"]) for row in read_rows(config.shards, shard, manifests[shard])]
        orders.append(shard_orders)
        embeddings.append(X)
        splits.append(post_splits(config, [ids[i] for i in rows]))
    base_order = np.concatenate(orders) if orders else np.zeros(0, np.uint64)
    pairs = [np.zeros((0, 2), np.uint64)]
    capped = 0
    if len(base_order):
        X = np.concatenate(embeddings)
        dim = X.shape[1]
        index = neighbours.build(
            X, index_plan=neighbours.plan(len(X), dim, exact_rows=NEAR_EXACT_ROWS)
        )
        del X, embeddings
        for earlier in range(c + 1):
            for _, q_order, Q, _ in _chunk_rows(
                config.shards, chunks[earlier], manifests, partitions, work
            ):
                found, cut = _near_pairs(index, Q, q_order, base_order, config)
                pairs.append(found)
                capped += cut
    storage.save_npy(storage.join(uri, "pairs.npy"), np.concatenate(pairs))
    storage.save_npy(storage.join(uri, "order.npy"), base_order)
    storage.save_npy(
        storage.join(uri, "split.npy"), np.concatenate(splits) if splits else np.zeros(0, np.uint8)
    )
    done = {"rows": len(base_order), "pairs": int(sum(len(p) for p in pairs)), "capped": capped}
    storage.write_json(storage.join(uri, _DONE), done)
    return done


def near_duplicate_similarity(spec: EmbedderSpec, given: float = 0.0) -> float:
    """`given`, or (0) the threshold calibrated for this embedder kind."""
    if given:
        return float(given)
    kinds = {part.kind for part in spec.parts} if spec.parts else {spec.kind}
    return NEAR_DUPLICATE_SIMILARITY_CLASSIC if "classic" in kinds else NEAR_DUPLICATE_SIMILARITY


def _near_pairs(
    index, Q: np.ndarray, q_order: np.ndarray, base_order: np.ndarray, config: MergeConfig
) -> tuple[np.ndarray, int]:
    """(pairs (m, 2) of order keys (earlier, later), how many were cut by NEAR_LINKS) of the
    query rows against the index, 4,096 queries at a time."""
    from hashtag import neighbours

    found, capped = [], 0
    for start in range(0, len(Q), 4096):
        rows, hits = neighbours.range_pairs(
            index, Q[start : start + 4096], config.near_duplicate_similarity
        )
        a, b = q_order[start + rows], base_order[hits]
        keep = a < b  # each pair once; a row never pairs with itself
        a, b = a[keep], b[keep]
        if len(a):  # at most NEAR_LINKS per later post (a mass of copies stays linear)
            by = np.lexsort((a, b))
            a, b = a[by], b[by]
            first = np.searchsorted(b, b, side="left")
            rank = np.arange(len(b)) - first
            capped += int(np.count_nonzero(rank >= NEAR_LINKS))
            a, b = a[rank < NEAR_LINKS], b[rank < NEAR_LINKS]
        found.append(np.stack([a, b], axis=1))
    return (np.concatenate(found) if found else np.zeros((0, 2), np.uint64)), capped


def connected_components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order keys of every post in a pair, the lowest order key of its connected component)."""
    nodes, edges = np.unique(pairs, return_inverse=True)
    edges = edges.reshape(-1, 2)
    label = np.arange(len(nodes))
    while True:  # min-label propagation with pointer jumping: O(log diameter) rounds
        low = np.minimum(label[edges[:, 0]], label[edges[:, 1]])
        new = label.copy()
        np.minimum.at(new, edges[:, 0], low)
        np.minimum.at(new, edges[:, 1], low)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    return nodes, nodes[label]


def near_groups(
    config: MergeConfig, chunks: list[list[int]], results: list[dict[str, Any]], work: str
) -> dict[str, Any]:
    """The driver's step 2b: pairs -> groups; writes each non-first member's order key with
    the split it takes (its group's first post's) for `split_of`, and its stats."""
    uri = storage.join(work, "near", "groups")
    if (done := _done(uri)) is not None:
        return done
    folders = [storage.join(work, "near", f"chunk-{chunk[0]:05d}") for chunk in chunks]
    pairs = np.concatenate(
        [np.zeros((0, 2), np.uint64)]
        + [storage.load_npy(storage.join(f, "pairs.npy")).reshape(-1, 2) for f in folders]
    )
    nodes, roots = connected_components(pairs) if len(pairs) else (np.zeros(0, np.uint64),) * 2
    # Every node's own split, from the chunk that holds it (order keys ascend across chunks).
    own = np.zeros(len(nodes), np.uint8)
    for folder in folders:
        order = storage.load_npy(storage.join(folder, "order.npy"))
        split = storage.load_npy(storage.join(folder, "split.npy"))
        if len(order) == 0:
            continue
        at = np.searchsorted(order, nodes)
        hit = (at < len(order)) & (order[np.minimum(at, len(order) - 1)] == nodes)
        own[hit] = split[at[hit]]
    root_split = own[np.searchsorted(nodes, roots)]
    members = nodes != roots
    train, test = split_code("train"), split_code("test")
    group_has_train = np.zeros(len(nodes), bool)
    root_at = np.searchsorted(nodes, roots)
    np.logical_or.at(group_has_train, root_at, own == train)
    leaked = int(np.count_nonzero((own == test) & group_has_train[root_at]))
    after = leaked if config.near_duplicates == "keep" else 0
    storage.save_npy(storage.join(uri, "members.npy"), nodes[members])
    storage.save_npy(storage.join(uri, "member_split.npy"), root_split[members])
    done = {
        "mode": config.near_duplicates,
        "similarity": config.near_duplicate_similarity,
        "groups": int(np.count_nonzero(~members)),
        "posts_in_groups": len(nodes),
        "pairs": len(pairs),
        "links_capped": sum(int(r["capped"]) for r in results),
        "moved": int(np.count_nonzero(members & (own != root_split)))
        if config.near_duplicates == "group"
        else 0,
        "dropped": int(np.count_nonzero(members)) if config.near_duplicates == "drop" else 0,
        "test_with_train_copy": {"before": leaked, "after": after},
    }
    storage.write_json(storage.join(uri, _DONE), done)
    return done


def _near_members(work: str, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of `orders` that are non-first members of a near-duplicate group, the split each
    of those takes); nothing when the step did not run (label-only data)."""
    uri = storage.join(work, "near", "groups", "members.npy")
    mask = np.zeros(len(orders), bool)
    if not storage.exists(uri):
        return mask, np.zeros(0, np.uint8)
    members = np.asarray(storage.load_npy(uri, True))
    if len(members) == 0:
        return mask, np.zeros(0, np.uint8)
    at = np.searchsorted(members, orders)
    mask = members[np.minimum(at, len(members) - 1)] == orders
    split = storage.load_npy(storage.join(work, "near", "groups", "member_split.npy"), True)
    return mask, np.asarray(split)[at[mask]]


def near_dropped(config: MergeConfig, work: str, orders: np.ndarray) -> np.ndarray:
    """Mask of the rows (order keys) that `--near-duplicates drop` removes."""
    if config.near_duplicates != "drop":
        return np.zeros(len(orders), bool)
    return _near_members(work, orders)[0]


def split_of(config: MergeConfig, work: str, ids: list[str], orders: np.ndarray) -> np.ndarray:
    """THE split of kept rows (post ids and their order keys): the hash of the post id
    (assign_split), except that a near-duplicate group takes its first post's split under
    `--near-duplicates group`. Vocabulary counts per split must use this too."""
    return grouped_splits(config, work, post_splits(config, ids), orders)


def grouped_splits(
    config: MergeConfig, work: str, split: np.ndarray, orders: np.ndarray
) -> np.ndarray:
    """Own (id-hash) split codes of rows with their order keys, each near-duplicate group's
    members moved to their first post's split under `--near-duplicates group`."""
    if config.near_duplicates == "group":
        mask, member_split = _near_members(work, np.asarray(orders, np.uint64))
        split = np.array(split, np.uint8)
        split[mask] = member_split
    return split


def count_task(config: MergeConfig, group: list[int], partitions: int, work: str) -> dict[str, Any]:
    """Step 3: which rows of a group are kept, and how many kept posts carry each tag: among
    the training posts ("tags", what the vocabulary is built from) and among all ("tags_all")."""
    uri = storage.join(work, "counts", f"group-{group[0]:05d}")
    if (done := _done(uri)) is not None:
        return done
    keys = storage.join(work, "keys", f"group-{group[0]:05d}")
    order = storage.load_npy(storage.join(keys, "order.npy"))
    lo, hi = group[0] << 32, (group[-1] + 1) << 32
    id_dupes = np.isin(order, _duplicates_in(work, "id", partitions, lo, hi))
    image_dupes = np.isin(order, _duplicates_in(work, "image", partitions, lo, hi))
    kept = ~id_dupes & ~image_dupes & ~near_dropped(config, work, order)
    indptr = storage.load_npy(storage.join(keys, "tag_indptr.npy"))
    indices = storage.load_npy(storage.join(keys, "tag_indices.npy"))
    names = storage.read_json(storage.join(keys, "tags.json"))
    split = grouped_splits(config, work, storage.load_npy(storage.join(keys, "split.npy")), order)
    train = kept & (split == split_code("train"))
    counts = np.bincount(indices[np.repeat(train, np.diff(indptr))], minlength=len(names))
    counts_all = np.bincount(indices[np.repeat(kept, np.diff(indptr))], minlength=len(names))
    storage.save_npy(storage.join(uri, "kept_order.npy"), order[kept])
    done = {
        "kept": int(np.count_nonzero(kept)),
        "posts_in": len(order),
        "duplicates": {
            "id": int(np.count_nonzero(id_dupes)),
            "image": int(np.count_nonzero(~id_dupes & image_dupes)),
        },
        "tags": {name: int(c) for name, c in zip(names, counts, strict=True) if c},
        "tags_all": {name: int(c) for name, c in zip(names, counts_all, strict=True) if c},
    }
    storage.write_json(storage.join(uri, _DONE), done)
    return done


def write_task(
    config: MergeConfig,
    group: list[int],
    manifests: dict[int, dict],
    embedder: EmbedderSpec,
    vocab: list[str],
    tag_counts: list[int],
    id_length: int,
    part_name: str,
    work: str,
) -> dict[str, Any]:
    """Step 5: stream a group's kept rows into its part folder; returns the part's manifest."""
    part = storage.join(config.out, PARTS, part_name)
    written = artifacts.read_finished(  # a resumed merge: the part a killed run finished
        part, DATASET_FORMAT, DATASET_VERSION, what="dataset part", fix="the merge writes it again"
    )
    if written is not None:
        return {**written.manifest, "name": part_name}
    kept_order = storage.load_npy(
        storage.join(work, "counts", f"group-{group[0]:05d}", "kept_order.npy")
    )
    column = {tag: i for i, tag in enumerate(vocab)}
    dim = manifests[group[0]]["dim"]
    with DatasetWriter(part, dim=dim, id_length=id_length, dtype=config.dtype) as writer:
        for index in group:
            lo, hi = np.searchsorted(
                kept_order, [np.uint64(index << 32), np.uint64((index + 1) << 32)]
            )
            if lo == hi:
                continue  # a bad shard, or no row of it kept
            try:
                rows = read_rows(config.shards, index, manifests[index])
                embeddings = read_embeddings(config.shards, index, manifests[index], mmap=True)
            except ShardError as error:  # changed since step 1: ids would shift, so stop here
                raise ShardError(f"shard {index} changed during the merge: {error}") from None
            kept = (kept_order[lo:hi] & np.uint64(0xFFFFFFFF)).astype(np.int64)
            kept_rows = [rows[i] for i in kept.tolist()]
            ids = [str(row["id"]) for row in kept_rows]
            labels = [
                [column[t] for t in map(str, row.get("tags") or ()) if t in column]
                for row in kept_rows
            ]
            label_indptr, label_indices = csr_from_lists(labels)
            split = split_of(config, work, ids, kept_order[lo:hi])
            writer.append(embeddings[kept], ids, split, label_indptr, label_indices)
            del rows, kept_rows, embeddings
        manifest = writer.finish(vocab=vocab, tag_counts=tag_counts, embedder=embedder)
    return {**manifest, "name": part_name}


# ---------------------------------------------------------------- the driver


def _groups(manifests: dict[int, dict], part_rows: int) -> list[list[int]]:
    """Consecutive shard indices cut into ceil(rows / part_rows) groups of ~equal rows (at most
    one per shard): from the data alone, so the parts are the same on any cluster."""
    indices = sorted(manifests)
    counts = np.array([int(manifests[i]["count"]) for i in indices], np.int64)
    total = int(counts.sum())
    n = min(len(indices), max(-(-total // part_rows), 1))
    # Cut where the running row count crosses each multiple of total / n.
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(1, n) * total / n, side="left") + 1
    groups = [g.tolist() for g in np.split(np.array(indices), np.unique(cuts)) if len(g)]
    return groups


# Rows of one dedupe partition: its task holds ~24 B a row of hashes (~24 MB).
PARTITION_ROWS = 2**20


def _fingerprint(config: MergeConfig, manifests: dict[int, dict], partitions: int) -> str:
    """Same value for the same shards (their manifests) and the same settings: what a rerun
    may resume from."""
    # Not the task resources: a rerun with more memory per task resumes.
    ignored = ("shards", "out", "memory_per_task_mb", "max_retries")
    settings = {k: v for k, v in asdict(config).items() if k not in ignored}
    shards = {str(i): m for i, m in sorted(manifests.items())}
    text = json.dumps([settings, shards, partitions], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run_stage(
    config: MergeConfig, desc: str, task, calls: list[tuple], labels: list[str]
) -> list[Any]:
    """Run `task` on each argument tuple as Ray tasks, all submitted at once (queued tasks are
    the demand the autoscaler launches workers for); results in the order of `calls`.

    Each task declares one CPU and --memory-per-task-mb. Ray's own retries are off
    (max_retries=0 also bounds memory kills, which Ray otherwise retries forever): the driver
    resubmits a failed task at most --max-retries times, then stops the merge naming it (the
    finished tasks' outputs stay: a rerun redoes only the others)."""
    import ray

    from hashtag import raycluster

    remote = ray.remote(task).options(
        name=f"merge_{task.__name__.removesuffix('_task')}",
        num_cpus=1,
        memory=config.memory_per_task_mb * 2**20 or None,
        max_retries=0,
        retry_exceptions=False,
        runtime_env=raycluster.worker_env() or None,
    )
    pending = {remote.remote(*args): i for i, args in enumerate(calls)}
    results: dict[int, Any] = {}
    attempts: Counter[int] = Counter()
    with tqdm(total=len(calls), desc=desc, unit="task") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except Exception as error:  # the task raised, or its worker or node died
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, UserError):  # a full disk, a damaged shard: one line
                        raise cause from None
                    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    attempts[i] += 1
                    if attempts[i] > config.max_retries:
                        raise RuntimeError(
                            f"merge task '{labels[i]}' failed {attempts[i]} times, last with "
                            f"{reason}; rerun the same merge to resume from the tasks that "
                            "finished (if its worker was killed for memory, raise "
                            "--memory-per-task-mb or lower --part-rows)"
                        ) from None
                    log.warning("merge task '%s' failed (%s); retry", labels[i], reason)
                    pending[remote.remote(*calls[i])] = i
                    continue
                bar.update()
    return [results[i] for i in range(len(calls))]


def _near_duplicate_step(
    config: MergeConfig,
    manifests: dict[int, dict],
    partitions: int,
    work: str,
    dim: int,
) -> dict[str, Any] | None:
    """Step 2b (after the exact dedupe, before the counts): near-duplicate groups by embedding;
    None for label-only data (no embeddings)."""
    if dim == 0 or not manifests:
        return None
    chunks = _groups(manifests, NEAR_CHUNK_ROWS)
    results = _run_stage(
        config,
        "merge 2b: near-duplicates",
        near_task,
        [
            (
                config,
                chunks,
                c,
                {i: manifests[i] for g in chunks[: c + 1] for i in g},
                partitions,
                work,
            )
            for c in range(len(chunks))
        ],
        [f"near-duplicates of shards {g[0]}-{g[-1]}" for g in chunks],
    )
    near = near_groups(config, chunks, results, work)
    return near


@dataclass(frozen=True)
class MergeResult(StageResult):
    out: str
    count: int
    vocab_size: int


def run(config: MergeConfig) -> MergeResult:
    """Merge the finished shards under config.shards into a dataset at config.out; return the
    summary (also written as OUT/merge.json)."""
    from hashtag import raycluster

    started = time.monotonic()
    manifests = finished_shards(config.shards)
    if not manifests:
        raise FileNotFoundError(
            f"no finished shards under {storage.join(config.shards, 'shards')}; run `hashtag scrape` first"
        )
    embedder = _check_compatible(manifests)
    dim = next(iter(manifests.values()))["dim"]
    config = replace(  # 0: the threshold calibrated for this embedder, recorded as such
        config,
        near_duplicate_similarity=near_duplicate_similarity(
            embedder, config.near_duplicate_similarity
        ),
    )
    indices = sorted(manifests)
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        log.warning("shards %s are not finished; merging the %d others", missing, len(indices))

    raycluster.connect()
    # From the data, not from the CPUs present (none yet on an autoscaling cluster's head).
    groups = _groups(manifests, config.part_rows)
    posts_total = sum(int(m["count"]) for m in manifests.values())
    partitions = max(1, -(-posts_total // PARTITION_ROWS))
    fingerprint = _fingerprint(config, manifests, partitions)
    work = storage.join(config.out, WORK, fingerprint)

    shards_of = [f"shards {g[0]}-{g[-1]}" for g in groups]
    keys = _run_stage(
        config,
        "merge 1/4: keys",
        keys_task,
        [
            (config.shards, g, {i: manifests[i] for i in g}, partitions, work, config)
            for g in groups
        ],
        [f"keys of {name}" for name in shards_of],
    )
    dedupes = [(kind, p) for kind in ("id", "image") for p in range(partitions)]
    _run_stage(
        config,
        "merge 2/4: dedupe",
        dedupe_task,
        [(kind, p, groups, work) for kind, p in dedupes],
        [f"dedupe of {kind} partition {p}" for kind, p in dedupes],
    )
    damaged = {int(i) for k in keys for i in k["bad"]}  # refused below, after the counts
    near = _near_duplicate_step(
        config,
        {i: m for i, m in manifests.items() if i not in damaged},
        partitions,
        work,
        dim,
    )
    counts = _run_stage(
        config,
        "merge 3/4: count tags",
        count_task,
        [(config, g, partitions, work) for g in groups],
        [f"tag counts of {name}" for name in shards_of],
    )
    # The vocabulary from the training posts only; all posts' counts are recorded beside it.
    tag_counts: Counter[str] = Counter()
    all_counts: Counter[str] = Counter()
    for count in counts:
        tag_counts.update(count["tags"])
        all_counts.update(count.get("tags_all", count["tags"]))
    vocab = sorted(
        (tag for tag, count in tag_counts.items() if count >= config.min_count),
        key=lambda tag: (-tag_counts[tag], tag),
    )[: config.vocab_size]
    bad_shards = {int(i): e for k in keys for i, e in k["bad"].items()}
    if bad_shards:  # refused, not dropped: dropping would lose their posts silently
        index, error = min(bad_shards.items())
        raise ArtifactError(
            f"shard {index} is damaged ({error}); {len(bad_shards)} damaged shard(s) in all "
            f"({sorted(bad_shards)}): rerun the same `hashtag scrape` (it rebuilds damaged "
            "shards), then merge again"
        )
    good = [i for i in indices if i not in bad_shards]
    id_length = max(k["id_length"] for k in keys)
    written = [
        (g, f"{fingerprint}-{n:05d}")
        for n, (g, c) in enumerate(zip(groups, counts, strict=True))
        if c["kept"]
    ]
    if not written:  # nothing kept: one empty part, so that the dataset exists
        written = [(groups[0], f"{fingerprint}-00000")]
    counts_in_vocab = [tag_counts[t] for t in vocab]
    parts = _run_stage(
        config,
        "merge 4/4: write parts",
        write_task,
        [
            (
                config,
                g,
                {i: manifests[i] for i in g},
                embedder,
                vocab,
                counts_in_vocab,
                id_length,
                name,
                work,
            )
            for g, name in written
        ],
        [f"part {name} of shards {g[0]}-{g[-1]}" for g, name in written],
    )
    posts_in = sum(c["posts_in"] for c in counts)
    duplicates = {k: sum(c["duplicates"][k] for c in counts) for k in ("id", "image")}
    manifest = write_parted_manifest(
        config.out,
        parts,
        vocab=vocab,
        extra={
            "shards": good,
            "missing_shards": missing,
            "bad_shards": {str(i): e for i, e in sorted(bad_shards.items())},
            "posts_in": posts_in,
            "duplicates": duplicates,
            "distinct_tags": len(all_counts),
            "distinct_train_tags": len(tag_counts),
            "vocab_counted_on": "train",
            "near_duplicates": near,
            "config": asdict(config),
        },
    )
    _remove_stale(config.out, {p["name"] for p in parts})

    seconds = time.monotonic() - started
    summary = {
        "out": config.out,
        "count": manifest["count"],
        "dim": dim,
        "embedder": embedder.to_json(),
        "vocab_size": len(vocab),
        "splits": manifest["splits"],
        "unlabeled": manifest["unlabeled"],
        "shards": len(good),
        "missing_shards": missing,
        "bad_shards": sorted(bad_shards),
        "posts_in": posts_in,
        "duplicates": duplicates,
        "distinct_tags": len(all_counts),
        "distinct_train_tags": len(tag_counts),
        "near_duplicates": near,
        "parts": len(parts),
        "tasks_per_step": {"groups": len(groups), "partitions": partitions},
        "seconds": round(seconds, 3),
        "rows_per_second": round(posts_in / seconds, 1) if seconds > 0 else None,
    }
    storage.write_json(storage.join(config.out, "merge.json"), summary)
    log.info(
        "merged %d shards: %d posts in, %d kept, %d tags in the vocabulary%s",
        len(good),
        posts_in,
        manifest["count"],
        len(vocab),
        f"; {near['groups']} near-duplicate groups ({near['posts_in_groups']} posts, "
        f"--near-duplicates {near['mode']})"
        if near
        else "",
    )
    return MergeResult(summary, config.out, summary["count"], summary["vocab_size"])


def _remove_stale(out: str, parts: set[str]) -> None:
    """After the new manifest: parts of older merges, the work folder, and the files of the
    single-folder layout (version 1) that an older merge left at OUT's top."""
    for name in storage.listdir(storage.join(out, PARTS)):
        if name not in parts:
            storage.remove(storage.join(out, PARTS, name))
    storage.remove(storage.join(out, WORK))
    artifacts.remove_files(out, FILES + OLDER_FILES)
