"""Sources of posts: where the scraper reads which images to fetch and which tags they carry.

    source = open_source("s3://bucket/posts.jsonl")
    for post in source.posts():          # deterministic order: shards are slices of it
        ...
    source.skipped                       # Counter: reason -> posts left out

Three kinds, told apart by the URI (every read goes through hashtag.storage, so local paths,
file:// and s3:// all work):

1. A manifest, one post per row: JSON Lines (.jsonl, .ndjson, .json; a .json holding one JSON
   array works too) or CSV (.csv, .tsv). Fields:
     image    required: a path relative to the manifest's folder, an absolute path, an
              http(s) URL or an s3:// URI. Post.image holds it resolved (absolute).
     id       optional; default: the row number, 1-based, as a string ("1", "2", ...): the line
              number in a JSONL file, the data row number (header not counted) in a CSV.
     tags     a list (JSON), or a string (CSV, or JSON too) split on '|' if it holds one, else on
              ',' if it holds one, else on whitespace: "mexican food|tacos", "food, pizza",
              "#food #pizza". Tags are normalised (tags.normalize) and keep inner spaces.
     caption  free text; its hashtags become the tags only when `tags` is absent (missing, null,
              or an empty CSV cell). An empty JSON list means "no tags".
     anything else goes into Post.metadata.
   A folder holding posts.jsonl, posts.csv, manifest.jsonl or manifest.csv is that manifest.
2. An instaloader folder (searched recursively): `<date>_UTC.jpg`, the caption in
   `<date>_UTC.txt`, sidecar images `<date>_UTC_1.jpg`, `_2.jpg`..., metadata in
   `<date>_UTC.json.xz` (or .json). One post per stem: its first image is Post.image, the others
   are metadata["extra_images"]. The id is the JSON's shortcode, else the stem (with its
   subfolder when nested). Video posts (an .mp4, or is_video in the JSON; their .jpg is only a
   thumbnail) are skipped as "video". Broken metadata is logged and counted in `warnings`, and
   the post kept without it.
3. The original project's files: a folder with hashtags.txt and *_csvs.npy (or one *_csvs.npy).
   Label-only posts (image None). The .npy files are object arrays that only pickle can load,
   and pickle can run code from the file: open_source refuses them unless trust_pickle=True.

Rows that cannot be used are never fatal: each is logged with its post id and counted in
`skipped` ("bad-row", "bad-id", "missing-image", "video", "no-image", "duplicate-id").

Hostile files are read in bounded memory and linear time: a JSON row, a CSV record and an
element of a JSON array are each at most MAX_ROW_BYTES (longer: a "bad-row", skipped without
being held in memory; a JSON array is decoded one element at a time), nesting too deep for the
parser is a "bad-row", ids are at most MAX_ID_CHARS characters ("bad-id"), tags are deduplicated
in linear time, instaloader metadata (.json.xz) is inflated to at most MAX_METADATA_BYTES, and a
CSV quote that is never closed (within MAX_ROW_BYTES) makes the line it starts on a "bad-row":
parsing resumes on the next line, so it swallows no later row. An instaloader folder is walked
without following symbolic links (a link is a counted "symlink" warning, never read), and its
captions and metadata are read through storage.open_local, inside the folder only.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import lzma
import os
import posixpath
import re
import stat
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from hashtag import storage
from hashtag.posts import Post
from hashtag.tags import normalize, parse_hashtags

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("posts.jsonl", "posts.csv", "manifest.jsonl", "manifest.csv")
_JSON_EXTENSIONS = (".jsonl", ".ndjson", ".json")
_CSV_EXTENSIONS = (".csv", ".tsv")
_LEGACY_SUFFIX = "_csvs.npy"
MAX_ROW_BYTES = 1 << 20
MAX_ID_CHARS = 256
LOGGED_PER_REASON = 3  # skips and warnings logged one by one per reason; the rest are counted
MAX_METADATA_BYTES = 16 << 20
# A CSV cell may be as long as a row (Python's default limit, 128 KB, is a csv.Error that
# used to leave the reader in the middle of the file).
csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))


class _Skip(Exception):
    """A row or post that cannot be used; becomes a counted, logged skip."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


class Source:
    """Posts from one place. Subclasses implement `_iter_posts`.

    name:     a short human name for logs and summaries.
    skipped:  reason -> posts left out, for the last (or current) pass of posts().
    warnings: reason -> problems that did not cost a post (e.g. unreadable instaloader metadata).
    """

    kind = "source"

    def __init__(self, uri: str, name: str):
        self.uri = uri
        self.name = name
        self.skipped: Counter = Counter()
        self.warnings: Counter = Counter()

    def posts(self) -> Iterator[Post]:
        """Every usable post, in the same order on every call; counts restart on each call."""
        self.skipped.clear()
        self.warnings.clear()
        seen: set[str] = set()
        for post in self._iter_posts():
            if len(post.id) > MAX_ID_CHARS:  # ids are stored at a fixed width: keep it bounded
                self._skip(post.id[:40] + "...", "bad-id", f"{len(post.id)} characters")
                continue
            if post.id in seen:
                self._skip(post.id, "duplicate-id", "an earlier post has the same id")
                continue
            seen.add(post.id)
            yield post

    def _iter_posts(self) -> Iterator[Post]:
        raise NotImplementedError

    def _skip(self, post_id: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self._log(self.skipped[reason], "skipping post", post_id, reason, detail)

    def _warn(self, post_id: str, reason: str, detail: str = "") -> None:
        self.warnings[reason] += 1
        self._log(self.warnings[reason], "post", post_id, reason, detail)

    def _log(self, count: int, what: str, post_id: str, reason: str, detail: str) -> None:
        """The first LOGGED_PER_REASON of each reason, then one line saying the rest are only
        counted: a source of a million bad rows must not write a million log lines."""
        if count <= LOGGED_PER_REASON:
            suffix = f" ({detail})" if detail else ""
            log.warning("%s: %s %s: %s%s", self.name, what, post_id, reason, suffix)
        elif count == LOGGED_PER_REASON + 1:
            log.warning(
                "%s: more posts with %s: counted in the summary, not logged one by one",
                self.name,
                reason,
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def open_source(uri: str, *, trust_pickle: bool = False) -> Source:
    """The source at `uri`: a manifest file, an instaloader folder or the original project's
    files (hashtags.txt and *_csvs.npy, as in the seed-instagram data set)."""
    uri = _absolute(str(uri))
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"no source at {uri}: give a manifest (.jsonl/.csv), an instaloader folder "
            "or a folder with hashtags.txt and *_csvs.npy"
        )
    if fs.isdir(path):
        names = storage.listdir(uri)
        if "hashtags.txt" in names and any(n.endswith(_LEGACY_SUFFIX) for n in names):
            npy_files = [storage.join(uri, n) for n in names if n.endswith(_LEGACY_SUFFIX)]
            return LegacyNpySource(uri, npy_files, trust_pickle=trust_pickle)
        for manifest in MANIFEST_NAMES:
            if manifest in names:
                return ManifestSource(storage.join(uri, manifest))
        return InstaloaderSource(uri)
    lower = uri.lower()
    if lower.endswith(_JSON_EXTENSIONS + _CSV_EXTENSIONS):
        return ManifestSource(uri)
    if lower.endswith(_LEGACY_SUFFIX):
        return LegacyNpySource(_parent(uri), [uri], trust_pickle=trust_pickle)
    raise ValueError(
        f"cannot tell what kind of source {uri} is: use a .jsonl/.json/.csv/.tsv manifest, "
        "an instaloader folder or a *_csvs.npy file"
    )


def identity(uri: str) -> dict[str, Any]:
    """What tells this source from another (a scrape records it to refuse mixing on resume):
    its URI (without user:password), and its size and ETag (a file) or file count and total size
    (a folder)."""
    uri = _absolute(str(uri))
    fs, path = storage.filesystem(uri)
    if fs.isdir(path):
        infos = list(fs.find(path, detail=True).values())
        total = sum(int(info.get("size") or 0) for info in infos)
        return {"uri": storage.redact(uri), "files": len(infos), "bytes": total}
    info = fs.info(path)
    found = {"uri": storage.redact(uri), "bytes": info.get("size")}
    etag = info.get("ETag") or info.get("etag")
    return {**found, "etag": str(etag).strip('"')} if etag else found


# manifests --------------------------------------------------------------------------------------


class ManifestSource(Source):
    """One post per row of a JSON Lines or CSV file (see the module docstring for the fields)."""

    kind = "manifest"

    def __init__(self, uri: str):
        super().__init__(uri, name=posixpath.join(*_split(uri)[-2:]))
        self.base = _parent(uri)

    def _iter_posts(self) -> Iterator[Post]:
        rows = self._csv_rows() if self.uri.lower().endswith(_CSV_EXTENSIONS) else self._json_rows()
        for number, row in rows:
            post_id = str(number)
            try:
                if isinstance(row, _Skip):
                    raise row
                post_id = _row_id(row, number)
                yield self._post(post_id, row)
            except _Skip as skip:
                self._skip(post_id, skip.reason, skip.detail)

    def _json_rows(self) -> Iterator[tuple[int, Any]]:
        fs, path = storage.filesystem(self.uri)
        with fs.open(path, "rb") as raw:
            f = io.BufferedReader(raw)  # readline(limit) on every filesystem
            first = f.peek(1 << 12)[: 1 << 12].lstrip()
            if first.startswith(b"["):  # one JSON array rather than JSON Lines
                yield from _json_array_rows(f, self.uri)
                return
            for number, line in storage.bounded_lines(f, MAX_ROW_BYTES):
                if line is None or line.strip():
                    yield number, _json_row(line, f"line {number}")

    def _csv_rows(self) -> Iterator[tuple[int, Any]]:
        """Rows as dicts. Records are cut from physical lines by the parity of their quotes
        (RFC 4180: a quoted cell may hold newlines, and "" is an escaped quote), so a record
        is complete when its quote count is even. One record holds at most MAX_ROW_BYTES: a
        quote that is never closed (or closes a megabyte later) makes its FIRST line a bad
        row, and parsing starts again on the line after it, so it swallows no later row."""
        fs, path = storage.filesystem(self.uri)
        delimiter = "\t" if self.uri.lower().endswith(".tsv") else ","
        with fs.open(path, "rb") as raw:
            header: list[str] | None = None
            number = 0
            for start, record in _csv_records(io.BufferedReader(raw)):
                if isinstance(record, _Skip):
                    if header is not None:
                        number += 1
                        yield number, record
                        continue
                    raise ValueError(f"{self.uri}: the header line {record.detail}")
                try:
                    (cells,) = list(csv.reader(record, delimiter=delimiter))
                except (csv.Error, ValueError) as e:
                    if header is None:
                        raise ValueError(f"{self.uri}: the header line is not CSV: {e}") from None
                    number += 1
                    yield number, _Skip("bad-row", f"CSV row {number} (line {start}): {e}")
                    continue
                if header is None:
                    header = cells
                    continue
                if not any(cells):
                    continue  # a blank line, as csv.DictReader skips it
                number += 1
                if len(cells) > len(header):
                    yield (
                        number,
                        _Skip("bad-row", f"CSV row {number} has more cells than the header"),
                    )
                    continue
                cells += [None] * (len(header) - len(cells))
                yield number, dict(zip(header, cells, strict=True))

    def _post(self, post_id: str, row: dict) -> Post:
        image = row.get("image")
        if image is None or (isinstance(image, str) and not image.strip()):
            raise _Skip("missing-image", "no `image` field")
        if not isinstance(image, str):
            raise _Skip("bad-row", f"`image` must be a string, got {type(image).__name__}")
        caption = row.get("caption")
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            raise _Skip("bad-row", f"`caption` must be a string, got {type(caption).__name__}")
        raw_tags = row.get("tags")
        tags = parse_hashtags(caption) if raw_tags in (None, "") else _tag_field(raw_tags)
        metadata = {k: v for k, v in row.items() if k not in ("id", "image", "tags", "caption")}
        return Post(
            id=post_id,
            image=self._resolve(image.strip()),
            tags=tuple(tags),
            caption=caption,
            metadata=metadata,
        )

    def _resolve(self, image: str) -> str:
        """An image location relative to the manifest's folder, made absolute."""
        if "://" in image or image.startswith("/"):
            return image
        if storage.is_remote(self.base):
            return storage.join(self.base, image)
        return os.path.normpath(os.path.join(self.base, image))


def _json_row(line: bytes, where: str) -> Any:
    """One JSON row, sanitised (NaN -> None), or a _Skip saying why not (never the row)."""
    if line is None:
        return _Skip("bad-row", f"{where} is over {MAX_ROW_BYTES} bytes")
    try:  # sanitised here: a row too deep for json_safe is a bad row, not a crash
        return storage.json_safe(json.loads(line))
    except RecursionError:
        return _Skip("bad-row", f"{where} is nested too deeply")
    except ValueError as e:  # also UnicodeDecodeError
        return _Skip("bad-row", f"{where} is not JSON: {e}")


_JSON_SPACE = re.compile(r"[ \t\r\n]*")


def _json_array_rows(f: io.BufferedReader, uri: str) -> Iterator[tuple[int, Any]]:
    """The elements of one top-level JSON array, streamed: each element is decoded on its own
    from a window of at most MAX_ROW_BYTES + one chunk, so memory is one element whatever the
    file's size (a 100 MB array of `[],` holds one `[]` at a time)."""
    decoder = json.JSONDecoder()
    reader = io.TextIOWrapper(f, encoding="utf-8", errors="replace")
    buffer, pos, eof, number = "", 0, False, 0

    def fill() -> bool:
        """Append a chunk (dropping what was consumed); False at the end of the file."""
        nonlocal buffer, pos, eof
        if eof:
            return False
        more = reader.read(1 << 16)
        eof = not more
        buffer, pos = buffer[pos:] + more, 0
        return bool(more)

    def skip_space() -> str:
        """The next significant character ('' at the end of the file)."""
        nonlocal pos
        while True:
            pos = _JSON_SPACE.match(buffer, pos).end()
            if pos < len(buffer) or not fill():
                return buffer[pos : pos + 1]

    if skip_space() != "[":
        raise ValueError(f"{uri} is not a JSON array")
    pos += 1
    while True:
        mark = skip_space()
        if not mark:
            raise ValueError(f"{uri}: the JSON array is never closed (after element {number})")
        if mark == "]":
            return
        if number:
            if mark != ",":
                raise ValueError(f"{uri}: expected ',' or ']' after element {number}")
            pos += 1
            skip_space()
        while True:
            try:
                value, end = decoder.raw_decode(buffer, pos)
                # A number may continue in the next chunk: decode it again with more data.
                if end < len(buffer) or eof or not isinstance(value, (int, float)):
                    break
                fill()
            except RecursionError:
                raise ValueError(f"{uri}: element {number + 1} is nested too deeply") from None
            except ValueError as e:
                if len(buffer) - pos > MAX_ROW_BYTES:
                    raise ValueError(
                        f"{uri}: element {number + 1} of the JSON array is over {MAX_ROW_BYTES} "
                        "bytes or broken; write the posts as JSON Lines (one per line) so that "
                        "a bad one is skipped alone"
                    ) from None
                if not fill():
                    raise ValueError(f"{uri} is not valid JSON: {e}") from None
        number += 1
        pos = end
        try:
            yield number, storage.json_safe(value)
        except RecursionError:
            yield number, _Skip("bad-row", f"element {number} is nested too deeply")


def _csv_records(f: io.BufferedReader) -> Iterator[tuple[int, list[str] | _Skip]]:
    """(first line number, the lines of one CSV record) of a binary file, decoded as UTF-8 (a
    leading BOM dropped); a record over MAX_ROW_BYTES is a _Skip for its first line, and the
    lines after that first one are read again as new records (resynchronised)."""
    pending: deque[tuple[int, str | None]] = deque()  # read ahead, parsed again after a bad row
    source = storage.bounded_lines(f, MAX_ROW_BYTES)
    first_line = True

    def next_line() -> tuple[int, str | None] | None:
        nonlocal first_line
        if pending:
            return pending.popleft()
        found = next(source, None)
        if found is None:
            return None
        number, raw = found
        if raw is None:
            return number, None
        if first_line and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        first_line = False
        return number, raw.decode("utf-8", errors="replace")

    while (item := next_line()) is not None:
        start, line = item
        if line is None:
            yield start, _Skip("bad-row", f"line {start} is over {MAX_ROW_BYTES} bytes")
            continue
        record, size, quotes = [line], len(line), line.count('"')
        while quotes % 2:
            item = next_line()
            if item is None or item[1] is None or size + len(item[1]) > MAX_ROW_BYTES:
                if item is not None:
                    pending.appendleft(item)
                pending.extendleft(reversed([(start + k, t) for k, t in enumerate(record[1:], 1)]))
                reason = (
                    "at the end of the file" if item is None else f"within {MAX_ROW_BYTES} bytes"
                )
                yield (
                    start,
                    _Skip(
                        "bad-row",
                        f"the quote opened on line {start} is never closed ({reason}); close it",
                    ),
                )
                break
            record.append(item[1])
            size += len(item[1])
            quotes += item[1].count('"')
        else:
            yield start, record


def _row_id(row: Any, number: int) -> str:
    if not isinstance(row, dict):
        raise _Skip("bad-row", f"row {number} is a {type(row).__name__}, not an object")
    value = row.get("id")
    if value is None or value == "":
        return str(number)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Skip("bad-row", f"`id` must be a string or number, got {str(value)[:80]!r}")
    return str(value)


def _tag_field(value: Any) -> list[str]:
    """Normalised, deduplicated tags from a list or a '|' / ',' / whitespace separated string."""
    if isinstance(value, str):
        separator = "|" if "|" in value else "," if "," in value else None
        items = value.split(separator)
    elif isinstance(value, list):
        items = value
    else:
        raise _Skip("bad-row", f"`tags` must be a list or a string, got {type(value).__name__}")
    tags: dict[str, None] = {}  # ordered and O(1) per lookup: 95k distinct tags stay linear
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise _Skip("bad-row", f"a tag must be a string, got {str(item)[:80]!r}")
        tag = normalize(str(item))
        if tag:
            tags[tag] = None
    return list(tags)


# instaloader folders ----------------------------------------------------------------------------

# <stem>_UTC[_<n>].<ext>; "_UTC_comments.json", "_UTC_location.txt", profile pictures do not match.
_INSTALOADER_FILE = re.compile(
    r"^(?P<stem>.+_UTC)(?:_(?P<index>\d+))?\.(?P<ext>jpe?g|png|webp|mp4|txt|json\.xz|json)$",
    re.IGNORECASE,
)
_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp"}


class InstaloaderSource(Source):
    """Posts downloaded by instaloader into a folder (and its subfolders), in stem order."""

    kind = "instaloader"

    def __init__(self, uri: str):
        super().__init__(uri, name=_split(uri)[-1])

    def _files(self) -> Iterator[str]:
        """Every file's path relative to the folder. A local folder is walked without following
        links: a symbolic link (to a file or a folder) and anything but a regular file is left
        out and counted as a "symlink" / "not-a-file" warning, so nothing outside the folder is
        ever listed (and the reads refuse links again: storage.open_local)."""
        if storage.is_remote(self.uri):
            fs, root = storage.filesystem(self.uri)
            root = root.rstrip("/")
            for path in fs.find(root):
                yield str(path)[len(root) :].lstrip("/")
            return
        for folder, subfolders, names in os.walk(self.uri, followlinks=False):
            relative_folder = os.path.relpath(folder, self.uri)
            for name in sorted(subfolders + names):
                relative = os.path.normpath(os.path.join(relative_folder, name))
                mode = os.lstat(os.path.join(folder, name)).st_mode
                if stat.S_ISLNK(mode):
                    self._warn(relative, "symlink", "a symbolic link: not followed")
                elif stat.S_ISREG(mode):
                    yield relative.replace(os.sep, "/")
                elif not stat.S_ISDIR(mode):
                    self._warn(relative, "not-a-file", "a device, FIFO or socket: not read")

    def _read(self, location: str, limit: int) -> bytes:
        """A caption or metadata file: never through a link, never outside the folder."""
        within = None if storage.is_remote(self.uri) else self.uri
        return storage.read_bytes(location, limit=limit, follow_links=False, within=within)

    def _groups(self) -> dict[str, dict[str, Any]]:
        """relative stem -> {"media": {index: {ext: location}}, "txt": loc, "json": loc}."""
        groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"media": defaultdict(dict)})
        for relative in self._files():
            folder, name = posixpath.split(relative)
            match = _INSTALOADER_FILE.match(name)
            if not match:
                continue
            stem = posixpath.join(folder, match["stem"])
            ext = match["ext"].lower()
            location = storage.join(self.uri, relative)
            group = groups[stem]
            if ext in ("txt", "json", "json.xz"):
                if match["index"] is None:
                    group["json" if ext.startswith("json") else "txt"] = location
            else:
                index = int(match["index"] or 0)
                group["media"][index]["image" if ext in _IMAGE_EXTENSIONS else "video"] = location
        return groups

    def _iter_posts(self) -> Iterator[Post]:
        groups = self._groups()
        for stem in sorted(groups):
            try:
                yield self._post(stem, groups[stem])
            except _Skip as skip:
                self._skip(stem, skip.reason, skip.detail)

    def _post(self, stem: str, group: dict[str, Any]) -> Post:
        node = self._metadata(stem, group.get("json"))
        media = group["media"]
        is_video = bool(node.get("is_video")) and node.get("__typename") != "GraphSidecar"
        if is_video or "video" in media.get(0, {}):
            raise _Skip("video", "video post (its .jpg is only a thumbnail)")
        # a sidecar's video items also come with thumbnails: keep only true images
        images = [m["image"] for _, m in sorted(media.items()) if "image" in m and "video" not in m]
        if not images:
            raise _Skip("no-image", "no picture file for this post")
        caption = _node_caption(node)
        if "txt" in group:
            try:
                data = self._read(group["txt"], MAX_ROW_BYTES)
                caption = data.decode("utf-8", errors="replace")
            except (OSError, storage.TooLarge) as e:
                self._warn(stem, "bad-caption", f"{group['txt']}: {e}")
        metadata: dict[str, Any] = {"stem": stem}
        if len(images) > 1:
            metadata["extra_images"] = images[1:]
        metadata.update(_node_metadata(node))
        return Post(
            id=str(node.get("shortcode") or node.get("code") or stem),
            image=images[0],
            tags=tuple(parse_hashtags(caption)),
            caption=caption.strip(),
            metadata=metadata,
        )

    def _metadata(self, stem: str, location: str | None) -> dict[str, Any]:
        """The post node of instaloader's JSON ({} when absent or unreadable)."""
        if location is None:
            return {}
        try:
            data = self._read(location, MAX_METADATA_BYTES)
            if location.lower().endswith(".xz"):
                data = _inflate_xz(data, MAX_METADATA_BYTES)
            document = json.loads(data)
        except (lzma.LZMAError, EOFError, OSError, ValueError, RecursionError) as e:
            self._warn(stem, "bad-metadata", f"{location}: {type(e).__name__}: {e}")
            return {}
        if not isinstance(document, dict):
            self._warn(stem, "bad-metadata", f"{location}: not a JSON object")
            return {}
        node = document.get("node", document)
        return node if isinstance(node, dict) else {}


def _inflate_xz(data: bytes, limit: int) -> bytes:
    """The decompressed bytes, at most `limit` of them (an xz bomb is a ValueError)."""
    decompressor = lzma.LZMADecompressor()
    out = decompressor.decompress(data, max_length=limit + 1)
    if len(out) > limit:
        raise ValueError(f"inflates to more than {limit} bytes")
    if not decompressor.eof:
        raise EOFError("truncated xz data")
    return out


def _node_caption(node: dict[str, Any]) -> str:
    try:
        return node["edge_media_to_caption"]["edges"][0]["node"]["text"] or ""
    except (KeyError, IndexError, TypeError):
        caption = node.get("caption")
        if isinstance(caption, dict):  # the newer API: {"text": ...}
            caption = caption.get("text")
        return caption if isinstance(caption, str) else ""


def _node_metadata(node: dict[str, Any]) -> dict[str, Any]:
    """The few fields of instaloader's post node worth keeping (the node itself is huge)."""

    def count(*keys: str) -> int | None:
        for key in keys:
            value = node.get(key)
            if isinstance(value, dict):
                value = value.get("count")
            if isinstance(value, int):
                return value
        return None

    owner = node.get("owner") if isinstance(node.get("owner"), dict) else {}
    location = node.get("location") if isinstance(node.get("location"), dict) else {}
    fields = {
        "shortcode": node.get("shortcode") or node.get("code"),
        "owner_username": owner.get("username"),
        "owner_id": owner.get("id"),
        "likes": count("edge_media_preview_like", "edge_liked_by", "like_count"),
        "comments": count("edge_media_to_comment", "comment_count"),
        "timestamp": node.get("taken_at_timestamp") or node.get("taken_at"),
        "typename": node.get("__typename"),
        "location": location.get("name"),
        "accessibility_caption": node.get("accessibility_caption"),
    }
    return {k: v for k, v in fields.items() if v is not None}


# the original project's files -------------------------------------------------------------------


class LegacyNpySource(Source):
    """Label-only posts from the original project's hashtags.txt and *_csvs.npy files."""

    kind = "legacy-npy"
    _SPLIT_ORDER = {"train": 0, "val": 1, "validation": 1, "test": 2}

    def __init__(self, folder: str, files: list[str], *, trust_pickle: bool = False):
        super().__init__(folder, name=_split(folder)[-1])
        if not trust_pickle:
            raise ValueError(
                f"{', '.join(_split(f)[-1] for f in files)} in {folder} are numpy object arrays: "
                "loading them needs pickle, which can run code hidden in the file. If you trust "
                "these files, pass trust_pickle=True (--trust-pickle on the command line)."
            )
        hashtags_uri = storage.join(folder, "hashtags.txt")
        if not storage.exists(hashtags_uri):
            raise FileNotFoundError(f"{hashtags_uri} is missing: the label vectors need it")
        lines = storage.read_text(hashtags_uri).splitlines()
        self.vocabulary = [normalize(line) for line in lines if line.strip()]
        self.files = sorted(files, key=lambda f: (self._SPLIT_ORDER.get(_split_name(f), 3), f))

    def _iter_posts(self) -> Iterator[Post]:
        for uri in self.files:
            rows = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=True)
            split = _split_name(uri)
            for number, row in enumerate(rows):
                post_id = f"{split}[{number}]"
                try:
                    post_id = str(int(row[0]))
                    yield self._post(post_id, row, split)
                except _Skip as skip:
                    self._skip(post_id, skip.reason, skip.detail)
                except (IndexError, TypeError, ValueError) as e:
                    self._skip(post_id, "bad-row", f"{type(e).__name__}: {e}")

    def _post(self, post_id: str, row: Any, split: str) -> Post:
        vector = np.asarray(row[2], dtype=np.float64).ravel()
        if vector.shape[0] != len(self.vocabulary):
            raise _Skip(
                "bad-row",
                f"hashtag vector has {vector.shape[0]} entries, hashtags.txt {len(self.vocabulary)}",
            )
        tags = list(dict.fromkeys(self.vocabulary[i] for i in np.flatnonzero(vector)))
        tags = [tag for tag in tags if tag]
        embedding = None
        if len(row) > 3 and row[3] is not None:
            embedding = tuple(float(x) for x in np.asarray(row[3], dtype=np.float64).ravel())
        return Post(
            id=post_id,
            image=None,
            tags=tuple(tags),
            metadata={"shortcode": str(row[1]), "split": split},
            embedding=embedding,
        )


def _split_name(uri: str) -> str:
    """'train' from '.../train_csvs.npy'."""
    return _split(uri)[-1][: -len(_LEGACY_SUFFIX)] or "data"


# paths ------------------------------------------------------------------------------------------


def _absolute(uri: str) -> str:
    """Local paths (and file:// URIs) as absolute paths, so that Post.image is absolute."""
    uri = uri.rstrip("/") or "/"
    if storage.is_remote(uri):
        return uri
    return os.path.abspath(storage.filesystem(uri)[1])


def _split(uri: str) -> list[str]:
    """The path components of a URI, without the scheme."""
    return [part for part in uri.split("://", 1)[-1].split("/") if part]


def _parent(uri: str) -> str:
    """The folder holding `uri` ("/" for a file at the root)."""
    if "/" not in uri.split("://", 1)[-1]:
        return uri
    return uri.rsplit("/", 1)[0] or "/"
