"""Storage is a URI: a local path or s3://bucket/prefix, through fsspec.

Nothing else in the package cares which one it is. The S3 endpoint can be overridden with
AWS_ENDPOINT_URL (or `set_s3_endpoint`, which the CLI's --s3-endpoint flag calls), so the same
code runs against AWS, MinIO or a moto server on 127.0.0.1.

Writes are atomic per object: a local file is written to a temporary name and renamed; an S3
PUT is atomic by itself. Multi-file objects (shards, datasets) get their atomicity from a
manifest written last (see shards.py and dataset.py).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# Bytes this process read from remote objects (benchmarks and tests report them).
_remote_bytes = [0]
_remote_bytes_lock = threading.Lock()


def remote_bytes_read() -> int:
    """Bytes this process has read from remote (s3://...) objects so far."""
    return _remote_bytes[0]


def _count_remote(uri: str, n: int) -> None:
    if is_remote(str(uri)):
        with _remote_bytes_lock:
            _remote_bytes[0] += n


def set_s3_endpoint(url: str | None) -> None:
    """Point every s3:// URI of this process (and of Ray workers it starts) at `url`."""
    if url:
        os.environ[ENDPOINT_ENV] = url
        fsspec.config.conf.pop("s3", None)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for `uri`."""
    uri = str(uri)
    if uri.startswith(("s3://", "s3a://")):
        options: dict[str, Any] = {"use_listings_cache": False}
        endpoint = os.environ.get(ENDPOINT_ENV)
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return url_to_fs(uri, **options)
    return url_to_fs(uri)


# Query-string keys whose values are secrets (presigned URLs, API keys): redacted, not dropped,
# so that a log still shows which parameter was there.
_SECRET_KEY = re.compile(
    r"^(x-amz-.*|x-goog-.*|token|.*_token|key|.*_key|apikey|api-key|sig|signature|secret|"
    r"password|passwd|pwd|auth|authorization|credential|credentials)$",
    re.IGNORECASE,
)


def redact(uri: str | None) -> str | None:
    """`uri` without its `user:password@` part (everything up to the LAST `@` of the authority:
    `user:p@ss@host` leaks nothing) and with the values of secret-looking query parameters
    (token, key, sig, signature, X-Amz-*, access_token, password, ...) replaced by `REDACTED`:
    what may be logged or stored."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    end = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if at >= 0:
            end = min(end, at)
    authority, tail = rest[:end], rest[end:]
    authority = authority.rpartition("@")[2]
    if "?" in tail:
        path, _, query = tail.partition("?")
        query, hash_mark, fragment = query.partition("#")
        fields = []
        for field in query.split("&"):
            name, eq, value = field.partition("=")
            if eq and value and _SECRET_KEY.match(name):
                field = f"{name}=REDACTED"
            fields.append(field)
        tail = f"{path}?{'&'.join(fields)}{hash_mark}{fragment}"
    return f"{scheme}://{authority}{tail}"


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """`text` (an error message) with every URL in it redacted."""

    def one(match: re.Match) -> str:
        url = match.group(0)
        kept = url.rstrip(":,.;)")  # punctuation after a URL is the sentence's
        return redact(kept) + url[len(kept) :]

    return _URL_IN_TEXT.sub(one, text)


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *[str(p).strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under `uri`; [] when it does not exist."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def size(uri: str) -> int | None:
    """The object's size in bytes (None when the store does not say)."""
    fs, path = filesystem(uri)
    return fs.size(path)


class TooLarge(ValueError):
    """An object bigger than the caller's limit (it was not read past limit + 1 bytes)."""


class NotRegularFile(OSError):
    """A local path that is a device, FIFO, socket or folder: never read (it may never end)."""


class LinkRefused(OSError):
    """A local path that is a symbolic link, or resolves outside the folder it must stay in."""


def open_local(path: str, *, follow_links: bool = True, within: str | None = None) -> int:
    """THE guarded open of a local file we did not write ourselves: a file descriptor of a
    regular file, opened without blocking (a FIFO cannot hold us) and checked with fstat (a
    device, FIFO or folder is NotRegularFile). `follow_links=False`: a symbolic link as the last
    component is refused (O_NOFOLLOW: the check and the open are one system call, no race).
    `within`: the file actually opened (its real path, read back from the descriptor) must lie
    inside that folder, so no link anywhere on the path leads out of it (LinkRefused)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if not follow_links and error.errno == errno.ELOOP:
            raise LinkRefused(f"{path} is a symbolic link: links are not followed") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file (device, FIFO or folder)")
        if within is not None:
            real = _real_path(fd, path)
            root = os.path.realpath(within)
            if os.path.commonpath([real, root]) != root:
                raise LinkRefused(f"{path} leads outside {within} (to {real}): not read")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _real_path(fd: int, path: str) -> str:
    """Where an open descriptor really points (Linux: /proc/self/fd; else realpath)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def read_bytes(
    uri: str,
    limit: int | None = None,
    *,
    follow_links: bool = True,
    within: str | None = None,
) -> bytes:
    """The object's bytes; TooLarge when it has more than `limit` bytes (at most limit + 1 are
    read). Local paths go through `open_local` (regular files only, a FIFO or /dev/zero refused
    without reading; `follow_links` and `within` as there)."""
    fs, path = filesystem(uri)
    if not is_remote(str(uri)):  # plain os.open: fsspec's local file object costs ~3x per photo
        fd = open_local(path, follow_links=follow_links, within=within)
        with open(fd, "rb") as f:
            return _read_capped(f, uri, limit)
    with fs.open(path, "rb") as f:
        data = _read_capped(f, uri, limit)
    _count_remote(uri, len(data))
    return data


def read_range(uri: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of the object: one ranged GET on S3, a seek and a read locally, so
    that a reader of a few rows never fetches the whole object. Short when the object is."""
    start, stop = int(start), int(stop)
    if start < 0 or stop < start:
        raise ValueError(f"bad byte range [{start}, {stop}) of {uri}")
    if stop == start:
        return b""
    fs, path = filesystem(uri)
    if not is_remote(str(uri)):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    data = fs.cat_file(path, start=start, end=stop)
    _count_remote(uri, len(data))
    return data


def iter_chunks(uri: str, chunk: int = 4 * 2**20) -> Iterator[bytes]:
    """The object's bytes, `chunk` at a time (bounded memory, whatever its size)."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        while data := f.read(chunk):
            _count_remote(uri, len(data))
            yield data


def bounded_lines(f: Any, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a binary file object, each line read with at most `limit` + 1
    bytes in memory; a longer line is skipped to its end without being held, and given as None
    (the caller reports "line N is over LIMIT bytes", never the line itself)."""
    f = f if hasattr(f, "peek") else io.BufferedReader(f)
    number = 0
    while line := f.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, line


def _read_capped(f: Any, uri: str, limit: int | None) -> bytes:
    data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise TooLarge(f"{uri} has more than {limit} bytes")
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically: readers see the old object or the whole new one."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float (not JSON) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(obj: Any, **options: Any) -> str:
    """Strict JSON (NaN and Infinity are not JSON: refused, so sanitise floats first)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, **options)


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, dumps(obj, indent=2, sort_keys=True) + "\n")


def npy_bytes(array: np.ndarray, where: str = "a file") -> bytes:
    """`array` as .npy bytes; object arrays are refused, so every file loads without pickle."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError(f"refusing to write an object array to {where}: it would need pickle")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def save_npy(uri: str, array: np.ndarray) -> None:
    """Save an array as .npy (never pickled)."""
    write_bytes(uri, npy_bytes(array, uri))


def load_npy(uri: str, mmap: bool = False) -> np.ndarray:
    """Load a .npy file with allow_pickle=False; memory-mapped when local and `mmap`."""
    if mmap and not is_remote(uri):
        _, path = filesystem(uri)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)


UPLOAD_PART = 16 * 2**20


def upload(local_path: str, uri: str) -> None:
    """Copy a local file to `uri` (atomically: an S3 multipart upload is visible only once it
    completes). Remote copies go UPLOAD_PART bytes at a time, so memory stays bounded whatever
    the file's size (a whole-file put holds all of its parts in flight at once)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        with open(local_path, "rb") as source, fs.open(path, "wb", block_size=UPLOAD_PART) as f:
            shutil.copyfileobj(source, f, UPLOAD_PART)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path holding the object at `uri`: the file itself, or a temporary download."""
    if not is_remote(uri):
        yield filesystem(uri)[1]
        return
    fs, path = filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="hashtag-") as tmp:
        local = os.path.join(tmp, os.path.basename(path) or "object")
        fs.get_file(path, local)
        _count_remote(uri, os.path.getsize(local))
        yield local
