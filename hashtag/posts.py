"""A post: one image (or none, for label-only data) and the hashtags its author gave it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hashtag import storage


@dataclass(frozen=True)
class Post:
    """One post, as every source yields it and every shard stores it.

    id:        unique within its source (instaloader: the file stem; manifests: the `id` field or
               the row number; the seed files: the original id).
    image:     where the image lives: an absolute local path, file://, s3:// or http(s) URI;
               None for label-only posts (the original project's files have no images left).
    tags:      normalised hashtags (see tags.normalize), deduplicated, in order of appearance.
    caption:   the free text, kept for reference; models never read it.
    metadata:  every other field of the source row, JSON-serialisable.
    embedding: a precomputed embedding (the seed files' optional fourth field), else None.
    """

    id: str
    image: str | None
    tags: tuple[str, ...]
    caption: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: tuple[float, ...] | None = None

    def to_json(self) -> str:
        row = {
            "id": self.id,
            "image": self.image,
            "tags": list(self.tags),
            "caption": self.caption,
            "metadata": self.metadata,
        }
        if self.embedding is not None:
            row["embedding"] = list(self.embedding)
        # Source metadata may hold NaN (not JSON): stored as null, and the output stays strict.
        return storage.dumps(storage.json_safe(row), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Post:
        row = json.loads(line)
        embedding = row.get("embedding")
        return cls(
            id=str(row["id"]),
            image=row.get("image"),
            tags=tuple(row.get("tags") or ()),
            caption=row.get("caption") or "",
            metadata=row.get("metadata") or {},
            embedding=tuple(embedding) if embedding is not None else None,
        )
