"""One way to write and read every folder we store: shard, dataset, exported model, co-occurrence.

    FOLDER/
      <data files>    written FIRST, each atomically (a temporary name renamed, or one S3 PUT)
      manifest.json   written LAST: {"format": F, "version": v, "files": {name: {"bytes": n,
                      "sha256": hex}}, ...the artifact's own fields}

A folder without a valid manifest.json holds no artifact. Reading checks the format and version,
that every file name stays inside the folder (no "/", "..", absolute path), and the sizes of the
files (cheap); content hashes are checked on demand (`verify`). Shapes, dtypes and index ranges
are the caller's knowledge: it checks them with the small helpers below. Every problem is an
`ArtifactError` naming the folder and saying what to do (`fix`), which the CLI prints as one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from hashtag import storage
from hashtag.errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TEMPORARY = ".tmp-"  # a data file written in place is NAME.tmp-<hex> until renamed to NAME
# A manifest is metadata (a model's vocabulary and history at most): anything bigger is hostile.
MAX_MANIFEST_BYTES = 64 * 2**20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 4 * 2**20
# The entry of a data file that a legacy manifest (no files listed) does not describe.
_UNLISTED: dict[str, Any] = {"bytes": None, "sha256": None}


class ArtifactMissing(ArtifactError, FileNotFoundError):
    """The folder holds no artifact (no manifest.json): not built yet, or the wrong path."""


def check_name(folder: str, name: Any, fix: str = "rebuild it") -> str:
    """`name` if it is a plain file name inside `folder`, else ArtifactError (tampered manifest)."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..", MANIFEST)
        or any(c in name for c in "/\\\0")
        or os.path.isabs(name)
        or len(name) > 255
    ):
        raise ArtifactError(
            f"{folder}: its manifest names the file {str(name)[:80]!r}, which is not a plain file "
            f"name inside the folder; the folder was tampered with: {fix}"
        )
    return name


def entry(data: bytes) -> dict[str, Any]:
    """The manifest entry of a file holding `data`: its size and sha256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_entry(local_path: str) -> dict[str, Any]:
    """The manifest entry of a local file, hashed in chunks (bounded memory)."""
    digest, size = hashlib.sha256(), 0
    with open(local_path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def write_file(folder: str, name: str, data: bytes) -> dict[str, Any]:
    """Write one data file atomically; return its manifest entry."""
    storage.write_bytes(storage.join(folder, check_name(folder, name)), data)
    return entry(data)


def write_array(folder: str, name: str, array: np.ndarray) -> dict[str, Any]:
    """Write one .npy data file atomically (never pickled); return its manifest entry."""
    return write_file(folder, name, storage.npy_bytes(array, storage.join(folder, name)))


def write_local_file(folder: str, name: str, local_path: str) -> dict[str, Any]:
    """Copy a local file (e.g. one a library wrote, such as a faiss index) into the folder as
    data file `name`, atomically; return its manifest entry (hashed in chunks)."""
    found = file_entry(local_path)
    storage.upload(local_path, storage.join(folder, check_name(folder, name)))
    return found


def remove_manifest(folder: str) -> None:
    """The artifact stops existing (its data files are about to change)."""
    storage.remove(storage.join(folder, MANIFEST))


def exists(folder: str) -> bool:
    """Whether `folder` holds a finished artifact (its manifest was written; `read` checks it)."""
    return storage.exists(storage.join(str(folder).rstrip("/"), MANIFEST))


def temporary_suffix() -> str:
    """The suffix of a data file written in place under a temporary name, then renamed."""
    return f"{TEMPORARY}{uuid.uuid4().hex}"


def remove_temporaries(folder: str, names: Iterable[str]) -> None:
    """Remove what a killed writer left of data files `names` in `folder`: NAME.tmp-* (never
    part of an artifact). Only local folders have them: an S3 object is one PUT."""
    if storage.is_remote(folder):
        return
    path = storage.filesystem(folder)[1]
    staged = tuple(f"{name}{TEMPORARY}" for name in names)
    if not staged or not os.path.isdir(path):
        return
    for name in os.listdir(path):
        if name.startswith(staged):
            os.remove(os.path.join(path, name))


def remove_files(folder: str, names: Iterable[str]) -> None:
    """Remove data files `names` from `folder`, and their temporaries (e.g. the files of an
    older layout once the new manifest is written)."""
    names = [check_name(folder, name) for name in names]
    for name in names:
        storage.remove(storage.join(folder, name))
    remove_temporaries(folder, names)


def write_manifest(
    folder: str, format: str, version: int, files: dict[str, dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """Write manifest.json LAST (after every data file in `files`); return the manifest."""
    for name in files:
        check_name(folder, name)
    manifest = {**fields, "format": format, "version": version, "files": dict(files)}
    storage.write_json(storage.join(folder, MANIFEST), manifest)
    return manifest


class Artifact:
    """A folder whose manifest was read and checked; `path`, `read_bytes`, `load_array`.

    With `unlisted` (formats that were written before manifests listed their files), a legacy
    manifest that lists none lets any plain file name of the folder be read, its size and
    contents unchecked: the one place that rule lives."""

    def __init__(self, uri: str, manifest: dict[str, Any], fix: str, *, unlisted: bool = False):
        self.uri, self.manifest, self.fix = uri, manifest, fix
        self.unlisted = unlisted

    @property
    def _within(self) -> str | None:
        """Local folders: no data file is read through a link leading out of the folder."""
        return None if storage.is_remote(self.uri) else storage.filesystem(self.uri)[1]

    def error(self, problem: str) -> ArtifactError:
        """An ArtifactError naming this folder and the fix."""
        return ArtifactError(f"{self.uri}: {problem}" + (f"; {self.fix}" if self.fix else ""))

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("files") or {}

    @property
    def legacy(self) -> bool:
        """Written before manifests listed their files (see the class)."""
        return self.unlisted and not self.files

    def entry(self, name: str) -> dict[str, Any]:
        """The manifest entry of data file `name` ({"bytes", "sha256"}; both None if legacy)."""
        if name in self.files:
            return self.files[name]
        if self.legacy:
            check_name(self.uri, name, self.fix)
            return _UNLISTED
        raise self.error(f"its manifest does not list {name!r}")

    def path(self, name: str) -> str:
        """The URI of data file `name` (it must be listed in the manifest, unless legacy)."""
        self.entry(name)
        return storage.join(self.uri, name)

    def check_size(self, name: str) -> None:
        expected = self.entry(name)["bytes"]
        try:
            actual = storage.size(self.path(name))
        except (OSError, ValueError) as error:
            raise self.error(f"cannot read {name} ({error})") from None
        if actual is not None and expected is not None and actual != expected:
            raise self.error(f"{name} has {actual} bytes, its manifest says {expected}")

    def read_bytes(self, name: str, *, verify: bool = True) -> bytes:
        """The bytes of data file `name`, checked against its manifest entry."""
        expected = self.entry(name)
        limit = expected["bytes"] if expected["bytes"] is not None else None
        try:
            data = storage.read_bytes(self.path(name), limit=limit, within=self._within)
        except (OSError, ValueError) as error:
            raise self.error(f"cannot read {name} ({error})") from None
        if expected["bytes"] is not None and len(data) != expected["bytes"]:
            raise self.error(f"{name} has {len(data)} bytes, its manifest says {expected['bytes']}")
        if verify and expected["sha256"] and hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise self.error(f"{name} does not match its manifest's sha256 (damaged)")
        return data

    def load_array(self, name: str, *, mmap: bool = False, verify: bool = False) -> np.ndarray:
        """Data file `name` as an array (allow_pickle=False; memory-mapped if local and `mmap`).
        Local files go through the guarded open (regular, inside the folder); a remote one is
        read in chunks straight into the array (hashed on the way with `verify`): one copy in
        memory, never the object's bytes and the array side by side."""
        uri = self.path(name)
        try:
            if mmap and not storage.is_remote(uri) and not verify:
                self.check_size(name)
                # The file that was checked (inside the folder, regular) is the one mapped: the
                # map opens the descriptor's own /proc entry, not the path again.
                fd = storage.open_local(storage.filesystem(uri)[1], within=self._within)
                try:
                    proc = f"/proc/self/fd/{fd}"
                    where = proc if os.path.exists(proc) else storage.filesystem(uri)[1]
                    return np.load(where, mmap_mode="r", allow_pickle=False)
                finally:
                    os.close(fd)
            if not storage.is_remote(uri):  # through the guarded open, inside the folder
                return np.load(io.BytesIO(self.read_bytes(name, verify=verify)), allow_pickle=False)
            return self._read_array(name, verify)  # remote: chunks into the array, one copy
        except ArtifactError:
            raise
        except (OSError, ValueError, EOFError) as error:
            raise self.error(f"{name} is not a readable .npy file ({error})") from None

    def open_array(self, name: str) -> np.ndarray | NpyRanges:
        """Data file `name` without reading it: a memory map when local, an `NpyRanges` (rows
        fetched by byte range on demand) when remote. Sizes checked, contents not."""
        uri = self.path(name)
        try:
            if not storage.is_remote(uri):
                return self.load_array(name, mmap=True)
            return NpyRanges(uri, self.entry(name)["bytes"])
        except ArtifactError:
            raise
        except (OSError, ValueError, EOFError) as error:
            raise self.error(f"{name} is not a readable .npy file ({error})") from None

    def _read_array(self, name: str, verify: bool) -> np.ndarray:
        expected = self.entry(name)
        header = NpyRanges(self.path(name), expected["bytes"])
        array = np.empty(header.shape, header.dtype)
        flat = array.reshape(-1).view(np.uint8)
        digest, position = hashlib.sha256(), 0
        for chunk in storage.iter_chunks(self.path(name), _HASH_CHUNK):
            if verify:
                digest.update(chunk)
            # The part of this chunk past the header, into the array's bytes.
            lo, hi = max(position, header.offset), position + len(chunk)
            if hi > lo:
                end = hi - header.offset
                if end > len(flat):
                    raise self.error(f"{name} is longer than its header says")
                flat[lo - header.offset : end] = np.frombuffer(chunk, np.uint8)[lo - position :]
            position = hi
        if expected["bytes"] is not None and position != expected["bytes"]:
            raise self.error(f"{name} has {position} bytes, its manifest says {expected['bytes']}")
        if position != header.offset + len(flat):
            raise self.error(f"{name} is shorter than its header says")
        if verify and expected["sha256"] and digest.hexdigest() != expected["sha256"]:
            raise self.error(f"{name} does not match its manifest's sha256 (damaged)")
        return array

    @contextlib.contextmanager
    def local_file(self, name: str) -> Iterator[tuple[str, bool]]:
        """(local path, whether it is the folder's own file) of data file `name`, its size and
        sha256 checked first: for readers in native code that trust what they parse (faiss).
        A remote file is downloaded to a temporary folder (after its size is checked)."""
        if not storage.is_remote(self.path(name)):
            self.verify([name])
            yield storage.filesystem(self.path(name))[1], True
            return
        self.check_size(name)
        with contextlib.ExitStack() as stack:
            try:
                path = stack.enter_context(storage.local_file(self.path(name)))
                found = file_entry(path)
            except (OSError, ValueError) as error:
                raise self.error(f"cannot read {name} ({error})") from None
            expected = self.entry(name)
            if (expected["bytes"] is not None and found["bytes"] != expected["bytes"]) or (
                expected["sha256"] and found["sha256"] != expected["sha256"]
            ):
                raise self.error(f"{name} does not match its manifest (size or sha256: damaged)")
            yield path, False

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Check the sizes and content hashes of the data files (all of them by default)."""
        for name in self.files if names is None else names:
            expected = self.entry(name)
            if not expected["sha256"]:
                self.check_size(name)
                continue
            digest, size = hashlib.sha256(), 0
            try:
                fs, path = storage.filesystem(self.path(name))
                if self._within is None:
                    f = fs.open(path, "rb")
                else:
                    f = open(storage.open_local(path, within=self._within), "rb")
                with f:
                    while chunk := f.read(_HASH_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
            except (OSError, ValueError) as error:
                raise self.error(f"cannot read {name} ({error})") from None
            if size != expected["bytes"] or digest.hexdigest() != expected["sha256"]:
                raise self.error(f"{name} does not match its manifest (size or sha256: damaged)")

    # -- checks of what the caller knows

    def int_field(self, key: str, *, low: int = 0, high: int | None = None) -> int:
        """manifest[key] as an int in [low, high]."""
        value = self.manifest.get(key)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise self.error(f"its manifest's {key!r} is {str(value)[:40]}, not an integer {bound}")
        return value

    def check_array(
        self, name: str, array: np.ndarray, *, shape: tuple[int, ...], kinds: str
    ) -> None:
        """`array` (file `name`) has exactly `shape` and a dtype kind in `kinds` (e.g. "f", "iu")."""
        if array.shape != tuple(shape) or array.dtype.kind not in kinds:
            raise self.error(
                f"{name} is {array.dtype} {array.shape}, expected kind {kinds!r} {tuple(shape)}"
            )

    def check_range(self, name: str, values: np.ndarray, low: int, high: int) -> None:
        """Every value of `values` (file `name`) is in [low, high)."""
        values = np.asarray(values)
        if len(values) and (int(values.min()) < low or int(values.max()) >= high):
            raise self.error(
                f"{name} holds values in [{int(values.min())}, {int(values.max())}], "
                f"outside [{low}, {high})"
            )

    def check_csr(self, name: str, indptr: np.ndarray, n_indices: int) -> None:
        """`indptr` starts at 0, never decreases and ends at `n_indices`."""
        indptr = np.asarray(indptr)
        if (
            len(indptr) == 0
            or int(indptr[0]) != 0
            or int(indptr[-1]) != n_indices
            or (len(indptr) > 1 and bool(np.any(np.diff(indptr) < 0)))
        ):
            raise self.error(
                f"{name} is not a valid CSR row index (from 0, growing, to {n_indices})"
            )


class NpyRanges:
    """A .npy file read by byte ranges (the one bounded reader of remote arrays): its header
    gives dtype, shape and where the rows start; `a[i:j]`, `a[rows]` fetch only those rows'
    bytes (one ranged GET on S3). `np.asarray(a)` reads it all, in chunks."""

    MAX_HEADER = 1 << 16

    def __init__(self, uri: str, size: int | None = None):
        self.uri = uri
        if size is None:  # a legacy entry: the object's own size, so that the header must match
            size = storage.size(uri)
        head = storage.read_range(uri, 0, min(4096, size) if size else 4096)
        if len(head) >= 10 and head[:6] == b"\x93NUMPY" and head[6] in (1, 2):
            length_bytes = 2 if head[6] == 1 else 4
            header_len = int.from_bytes(head[8 : 8 + length_bytes], "little")
            if header_len > self.MAX_HEADER:
                raise ValueError(f"a .npy header of {header_len} bytes")
            need = 8 + length_bytes + header_len
            if need > len(head):
                head = storage.read_range(uri, 0, need)
        stream = io.BytesIO(head)
        version = np.lib.format.read_magic(stream)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version} is not read here")
        shape, fortran, dtype = read_header(stream, max_header_size=self.MAX_HEADER)
        if dtype.hasobject or fortran:
            raise ValueError("an object or Fortran-ordered array (refused: it would need pickle)")
        self.shape, self.dtype, self.offset = tuple(shape), dtype, stream.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        expected = self.offset + self.row_bytes * (self.shape[0] if self.shape else 1)
        if size is not None and size != expected:  # before any array of that shape is made
            raise ValueError(f"{size} bytes, its header says {expected}")

    ndim = property(lambda self: len(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) (clipped to the array), read-only."""
        start, stop = max(0, int(start)), min(len(self), int(stop))
        stop = max(start, stop)
        data = storage.read_range(
            self.uri, self.offset + start * self.row_bytes, self.offset + stop * self.row_bytes
        )
        if len(data) != (stop - start) * self.row_bytes:
            raise ValueError(f"{self.uri} is shorter than its header says")
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:]))

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            rows = self.rows(start, max(start, stop) if step > 0 else start)
            return rows if step == 1 else np.asarray(self)[key]
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} rows")
            return self.rows(index, index + 1)[0]
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False)
        if index.size == 0:
            return np.empty((0, *self.shape[1:]), self.dtype)
        lo, hi = int(index.min()), int(index.max()) + 1
        if lo < 0 or hi > len(self):
            raise IndexError(f"row indices outside [0, {len(self)})")
        return self.rows(lo, hi)[index - lo]  # one ranged read spanning the rows

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.empty(self.shape, self.dtype)
        step = max(1, _HASH_CHUNK // max(1, self.row_bytes))
        for start in range(0, len(self), step):
            array[start : start + step] = self.rows(start, start + step)
        return array if dtype is None else array.astype(dtype)


def read_manifest(uri: str, *, what: str = "artifact", fix: str = "rebuild it") -> dict[str, Any]:
    """FOLDER/manifest.json as a dict, read bounded (MAX_MANIFEST_BYTES) and parsed; its
    format, version and files are not checked (`read` does). ArtifactMissing without one."""
    uri = str(uri).rstrip("/")
    try:
        data = storage.read_bytes(storage.join(uri, MANIFEST), limit=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ArtifactMissing(
            f"no {what} at {uri}: {MANIFEST} is missing (not built, or not finished); {fix}"
        ) from None
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{uri}: cannot read its {MANIFEST} ({error}); {fix}") from None
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError):
        raise ArtifactError(f"{uri}: its {MANIFEST} is not valid JSON (damaged); {fix}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{uri}: its {MANIFEST} is not a JSON object (damaged); {fix}")
    return manifest


def read_finished(
    uri: str, format: str, versions: int | tuple[int, ...], *, what: str, fix: str
) -> Artifact | None:
    """`read`, or None when the folder holds no finished artifact: no manifest, or one that does
    not check (logged). What a resumed job asks of an output it may have written already: None
    means (re)write it."""
    try:
        return read(uri, format, versions, what=what, fix=fix)
    except ArtifactMissing:
        return None
    except ArtifactError as error:
        log.warning("%s", error)
        return None


def read(
    uri: str,
    format: str,
    versions: int | tuple[int, ...],
    *,
    what: str,
    fix: str,
    unlisted: bool = False,
) -> Artifact:
    """Read and check FOLDER/manifest.json: format, version, file names and entries.

    `what` names the artifact in messages ("dataset"), `fix` says what to do ("rerun `hashtag
    merge`"). ArtifactMissing (also a FileNotFoundError) without a manifest, ArtifactError else.
    Legacy entries that record only a size ({name: bytes}) are read as size-checked only; a
    manifest that lists no files at all is legacy with `unlisted` (see `Artifact`).
    """
    uri = str(uri).rstrip("/")
    versions = (versions,) if isinstance(versions, int) else tuple(versions)
    manifest = read_manifest(uri, what=what, fix=fix)
    if manifest.get("format") != format:
        raise ArtifactError(
            f"{uri} is not a {what} (manifest format {str(manifest.get('format'))[:40]!r}, "
            f"expected {format!r}); point at a {what} folder or {fix}"
        )
    if manifest.get("version") not in versions:
        raise ArtifactError(
            f"{uri} is {what} format version {str(manifest.get('version'))[:20]}; this code reads "
            f"version {' or '.join(map(str, versions))}: {fix}"
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ArtifactError(f"{uri}: its manifest's 'files' is not an object (damaged); {fix}")
    manifest["files"] = {
        check_name(uri, name, fix): _entry(uri, name, value, fix) for name, value in files.items()
    }
    return Artifact(uri, manifest, fix, unlisted=unlisted)


def _entry(uri: str, name: str, value: Any, fix: str) -> dict[str, Any]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return {"bytes": value, "sha256": None}  # legacy: a size only
    if (
        isinstance(value, dict)
        and isinstance(value.get("bytes"), int)
        and not isinstance(value.get("bytes"), bool)
        and value["bytes"] >= 0
        and isinstance(value.get("sha256"), str)
        and _HEX64.match(value["sha256"])
    ):
        return {"bytes": value["bytes"], "sha256": value["sha256"]}
    raise ArtifactError(f"{uri}: its manifest's entry for {name!r} is malformed (damaged); {fix}")
