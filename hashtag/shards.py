"""The shard format: one folder per slice of the source, finished when its manifest exists.

    ROOT/shards/shard-00000/
      embeddings.npy   float32 (n, dim); row i belongs to line i of posts.jsonl; dim 0 if label-only
      posts.jsonl      one Post JSON row per kept post, plus "image_sha256" (hex or null)
      manifest.json    written LAST (see docs/design.md for its fields)

The data files are written first and the manifest last, each object atomically, so a shard
without manifest.json does not exist for readers: a worker killed half-way leaves stale data
files that the next run simply overwrites. Rewriting a finished shard removes its manifest first.

Pure: no Ray. scrape.py decides what goes into a shard; merge.py reads them back.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from hashtag import artifacts, storage
from hashtag.artifacts import MANIFEST
from hashtag.embedders import EmbedderSpec
from hashtag.errors import ArtifactError, UserError
from hashtag.posts import Post

log = logging.getLogger(__name__)

SHARD_FORMAT = "hashtag-shard"
SHARD_VERSION = 1
EMBEDDINGS = "embeddings.npy"
POSTS = "posts.jsonl"
MAX_DIM = 1 << 16  # an embedding wider than this is a tampered manifest, not a model
_SHARD_NAME = re.compile(r"^shard-(\d+)$")
# Stats a shard writer may report; missing ones default to these (copied) values.
_STAT_DEFAULTS: dict[str, Any] = {
    "posts_in": None,
    "skipped": {},
    "skips": [],
    "bytes_read": 0,
    "seconds": 0.0,
}


class ShardError(ArtifactError):
    """A finished shard whose data files do not match its manifest."""


@dataclass
class ShardData:
    """One shard read back: JSON rows (dicts), their embeddings and the manifest."""

    posts: list[dict[str, Any]]
    embeddings: np.ndarray
    manifest: dict[str, Any]

    @property
    def embedder(self) -> EmbedderSpec:
        """The spec of the embedder that made `embeddings`."""
        return embedder(self.manifest)


def shard_uri(root: str, index: int) -> str:
    """ROOT/shards/shard-00000 for index 0."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return storage.join(root, "shards", f"shard-{index:05d}")


def write_shard(
    root: str,
    index: int,
    posts: list[Post],
    embeddings: np.ndarray,
    *,
    embedder: EmbedderSpec | dict[str, Any],
    image_sha256: list[str | None],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Write shard `index` under ROOT/shards and return its manifest (written last).

    `embeddings` is (len(posts), dim) float32, dim 0 for label-only data; `embedder` the spec
    that made them (or its JSON), recorded as its JSON; `image_sha256[i]` is
    the hex digest of post i's image bytes (None without image); `stats` holds posts_in,
    skipped ({reason: count}), skips ([{"id", "reason"}]), bytes_read and seconds; extra keys
    are recorded as given. A post's own `embedding` field is not repeated in posts.jsonl: its
    vector lives in embeddings.npy.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(posts):
        raise ValueError(
            f"embeddings must be (len(posts), dim) = ({len(posts)}, dim); got {embeddings.shape}"
        )
    if len(image_sha256) != len(posts):
        raise ValueError(f"image_sha256 has {len(image_sha256)} entries for {len(posts)} posts")
    reserved = {"format", "version", "shard", "count", "dim", "embedder", "files"}
    if reserved & set(stats):
        raise ValueError(f"stats may not set {sorted(reserved & set(stats))}: write_shard does")

    uri = shard_uri(root, index)
    # A finished shard being rewritten must stop existing before its data files change.
    artifacts.remove_manifest(uri)
    files = {EMBEDDINGS: artifacts.write_array(uri, EMBEDDINGS, embeddings)}
    lines = []
    for post, sha in zip(posts, image_sha256, strict=True):
        row = json.loads(post.to_json())
        row.pop("embedding", None)
        row["image"] = storage.redact(row["image"])  # a URL's user:password is never stored
        row["image_sha256"] = sha
        lines.append(storage.dumps(row, sort_keys=True))
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    files[POSTS] = artifacts.write_file(uri, POSTS, text)

    fields: dict[str, Any] = {k: _copy(v) for k, v in _STAT_DEFAULTS.items()}
    fields.update(stats)
    if fields["posts_in"] is None:
        fields["posts_in"] = len(posts)
    fields.update(
        shard=int(index),
        count=len(posts),
        dim=int(embeddings.shape[1]),
        embedder=EmbedderSpec.from_json(embedder).to_json(),
    )
    return artifacts.write_manifest(uri, SHARD_FORMAT, SHARD_VERSION, files, **fields)


def open_shard(root: str, index: int) -> artifacts.Artifact:
    """Shard `index` with its manifest checked (ArtifactMissing when unfinished, ArtifactError
    when its manifest is foreign or damaged)."""
    shard = artifacts.read(
        shard_uri(root, index),
        SHARD_FORMAT,
        SHARD_VERSION,
        what="shard",
        fix="rerun the same `hashtag scrape` to rebuild it",
        unlisted=True,  # a manifest built by hand (tests) lists no files: the files are the truth
    )
    manifest = shard.manifest
    if manifest.get("shard") != index:
        raise shard.error(f"its manifest names shard {str(manifest.get('shard'))[:20]}")
    shard.int_field("count")
    shard.int_field("dim", high=MAX_DIM)
    try:
        embedder(manifest)
    except UserError:
        raise shard.error("its manifest has no embedder spec") from None
    if shard.files and set(shard.files) != {EMBEDDINGS, POSTS}:
        raise shard.error(f"its manifest lists {sorted(manifest['files'])}")
    return shard


def embedder(manifest: dict[str, Any]) -> EmbedderSpec:
    """The spec of the embedder that made a shard's embeddings (`open_shard` checked it)."""
    return EmbedderSpec.from_json(manifest.get("embedder"))


def read_manifest(root: str, index: int) -> dict[str, Any] | None:
    """Shard `index`'s manifest, or None when the shard is not finished (absent or corrupt)."""
    try:
        return open_shard(root, index).manifest
    except artifacts.ArtifactMissing:
        return None
    except ArtifactError as error:
        log.warning("shard %d: %s; treating it as unfinished", index, error)
        return None


def verify(root: str, index: int, manifest: dict[str, Any]) -> str | None:
    """None when shard `index`'s data files match `manifest` (sizes and sha256), else the problem."""
    try:
        _artifact(root, index, manifest, fix="").verify([EMBEDDINGS, POSTS])  # caller says the fix
    except ArtifactError as error:
        return str(error)
    return None


def finished_shards(root: str) -> dict[int, dict[str, Any]]:
    """{index: manifest} of the shards under ROOT/shards that have a valid manifest, by index."""
    indices = []
    for name in storage.listdir(storage.join(root, "shards")):
        match = _SHARD_NAME.match(name)
        if match:
            indices.append(int(match.group(1)))
    finished = {}
    for index in sorted(indices):
        manifest = read_manifest(root, index)
        if manifest is not None:
            finished[index] = manifest
    return finished


def read_rows(
    root: str, index: int, manifest: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The JSON rows of posts.jsonl of a finished shard, checked against its manifest."""
    manifest = manifest if manifest is not None else _require_manifest(root, index)
    uri = storage.join(shard_uri(root, index), POSTS)
    try:
        text = _artifact(root, index, manifest).read_bytes(POSTS).decode("utf-8")
    except ArtifactError as error:
        raise ShardError(f"shard {index}: {error}") from None
    except ValueError as error:
        raise ShardError(f"shard {index}: cannot read {uri}: {error}") from None
    # Split on "\n" only: JSON escapes it inside strings, but not U+2028 and its kin, which
    # str.splitlines() would also split on.
    lines = [line for line in text.split("\n") if line.strip()]
    try:  # one parse for the whole file is ~2x faster than one json.loads per line
        rows = json.loads("[" + ",".join(lines) + "]")
    except ValueError:
        rows = None
    if rows is None or len(rows) != len(lines):  # find the bad line, for the message
        for number, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except ValueError as error:
                raise ShardError(f"shard {index}: line {number} of {uri}: {error}") from error
        raise ShardError(f"shard {index}: {uri} is not one JSON object per line")
    if len(rows) != manifest["count"]:
        raise ShardError(
            f"shard {index}: {uri} has {len(rows)} rows but its manifest says {manifest['count']}; "
            f"delete {shard_uri(root, index)} and rerun the scrape to rebuild it"
        )
    for row in rows:
        if not isinstance(row, dict) or "id" not in row:
            raise ShardError(f"shard {index}: a row of {uri} has no 'id': {str(row)[:200]}")
    return rows


def read_embeddings(
    root: str, index: int, manifest: dict[str, Any] | None = None, *, mmap: bool = False
) -> np.ndarray:
    """The (count, dim) float32 embeddings of a finished shard (memory-mapped if local and `mmap`)."""
    manifest = manifest if manifest is not None else _require_manifest(root, index)
    uri = storage.join(shard_uri(root, index), EMBEDDINGS)
    try:
        embeddings = _artifact(root, index, manifest).load_array(
            EMBEDDINGS, mmap=mmap, verify=not mmap
        )
    except ArtifactError as error:
        raise ShardError(f"shard {index}: {error}") from None
    expected = (manifest["count"], manifest["dim"])
    if embeddings.shape != expected or embeddings.dtype != np.float32:
        raise ShardError(
            f"shard {index}: {uri} is {embeddings.dtype} {embeddings.shape}, the manifest says "
            f"float32 {expected}; delete {shard_uri(root, index)} and rerun the scrape"
        )
    return embeddings


def read_shard(root: str, index: int, *, mmap: bool = False) -> ShardData:
    """Read a finished shard; FileNotFoundError if it has no valid manifest, ShardError if its
    files do not match the manifest."""
    manifest = _require_manifest(root, index)
    rows = read_rows(root, index, manifest)
    embeddings = read_embeddings(root, index, manifest, mmap=mmap)
    return ShardData(posts=rows, embeddings=embeddings, manifest=manifest)


def _require_manifest(root: str, index: int) -> dict[str, Any]:
    manifest = read_manifest(root, index)
    if manifest is None:
        raise FileNotFoundError(
            f"shard {index} under {root} is not finished (no valid {MANIFEST}); run the scrape"
        )
    return manifest


def _artifact(
    root: str, index: int, manifest: dict[str, Any], fix: str = "rerun the same `hashtag scrape`"
) -> artifacts.Artifact:
    return artifacts.Artifact(shard_uri(root, index), manifest, fix, unlisted=True)


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))
