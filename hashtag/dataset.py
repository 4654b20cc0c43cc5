"""The merged dataset format: what merge.py writes and every model trains on.

    OUT/
      embeddings.npy      float32 (N, dim), row = global id 0..N-1
      ids_utf8.npy        uint8: the source post ids, UTF-8, one after the other
      ids_offsets.npy     int64 (N+1,)  where id i is: ids_utf8[offsets[i]:offsets[i+1]]
      labels_indptr.npy   int64 (N+1,)  CSR rows over the vocabulary
      labels_indices.npy  int32 (nnz,)  sorted within each row
      split.npy           uint8 (N,): 0 train, 1 validation, 2 test
      vocab.json          {"tags": [...], "counts": [...]}, most frequent first
      manifest.json       written LAST; a folder without it holds no dataset

A large dataset (what `hashtag merge` writes: one part per group of shards, written by parallel
Ray tasks) is the same thing split into parts, each a complete folder of the layout above:

    OUT/
      parts/part-00000/   embeddings.npy, ids_utf8.npy, ... , manifest.json (rows 0..n0-1)
      parts/part-00001/   rows n0..n0+n1-1, and so on
      vocab.json
      manifest.json       version 2: lists the parts in row order with their counts; LAST

Embeddings are float32, or float16 when merged with `--dtype float16` (half the bytes; readers
get float32 blocks either way).

`DatasetWriter` streams rows in, chunk by chunk, straight to the files (plain sequential writes,
not a memory map, so that written pages are page cache and not the writer's resident memory);
its memory is bounded by the chunk it is given. Local outputs are written to temporary names in
OUT and renamed at the end; s3:// outputs are written to a local temporary folder and uploaded.
Either way the old manifest is removed first and the new one written last, so a reader sees the
old dataset, no dataset, or the whole new one. A reader that memory-mapped the old local files
keeps reading them: a rename does not touch an open file.

`Dataset.load(uri)` reads it back, memory-mapped when local; every file loads with
allow_pickle=False. Datasets written with the older fixed-width `ids.npy` (unicode (N,)) still
load.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from hashtag import artifacts, storage
from hashtag.embedders import EmbedderSpec
from hashtag.errors import UserError

DATASET_FORMAT = "hashtag-dataset"
DATASET_VERSION = 1
PARTED_VERSION = 2  # a manifest that lists part folders
PARTS = "parts"
EMBEDDING_DTYPES = {"float32": "<f4", "float16": "<f2"}
_FIX = "rerun `hashtag merge` to rebuild it"
MAX_DIM = 1 << 16  # wider embeddings, or more tags, are a tampered manifest, not a dataset
MAX_VOCAB = 10_000_000
MAX_VOCAB_BYTES = 1 << 30
MAX_ID_LENGTH = 256  # ids are capped by the sources (longer ones are `bad-id` rows)
VOCAB = "vocab.json"
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}
# name -> (dtype, shape of one row). Ids are UTF-8 bytes with CSR-like offsets: one long id
# must not widen every row, as a fixed-width "<U{longest}" array would.
_ARRAYS = {
    "embeddings": ("<f4", None),
    "ids_utf8": ("u1", ()),
    "ids_offsets": ("<i8", ()),
    "split": ("u1", ()),
    "labels_indptr": ("<i8", ()),
    "labels_indices": ("<i4", ()),
}
# The data files of a one-folder dataset (version 1), and of its older layout (fixed-width ids).
FILES = (*(f"{name}.npy" for name in _ARRAYS), VOCAB)
OLDER_FILES = ("ids.npy",)


def split_code(name: str) -> int:
    """0 for "train", 1 for "val" (or "validation"), 2 for "test"."""
    name = _SPLIT_ALIASES.get(name, name)
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
    return SPLITS.index(name)


def csr_from_lists(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(indptr starting at 0, indices) for a list of per-row column lists, sorted and unique."""
    lengths = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    flat = np.fromiter((c for r in rows for c in r), np.int64, count=int(lengths.sum()))
    row_of = np.repeat(np.arange(len(rows)), lengths)
    order = np.lexsort((flat, row_of))
    row_of, flat = row_of[order], flat[order]
    keep = np.ones(len(flat), bool)
    keep[1:] = (row_of[1:] != row_of[:-1]) | (flat[1:] != flat[:-1])
    row_of, flat = row_of[keep], flat[keep]
    indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=len(rows)), out=indptr[1:])
    return indptr, flat.astype(np.int32)


class _NpyStream:
    """A .npy file written row chunk by row chunk; the header (with the final length) is
    written last into space reserved at the start. numpy pads headers with spaces the same way."""

    header_bytes = 256

    def __init__(self, path: str, dtype: str, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), row_shape
        self.rows = 0
        self.file = open(path, "wb")
        self.file.write(b" " * self.header_bytes)

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape[1:] != self.row_shape:
            raise ValueError(
                f"{os.path.basename(self.path)}: rows of shape {array.shape[1:]}, expected {self.row_shape}"
            )
        self.file.write(array.tobytes())
        self.rows += len(array)

    def close(self) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (int(self.rows), *(int(d) for d in self.row_shape)),
        }
        text = repr(header)
        # magic (6) + version (2) + header length (2) + text + padding + "\n"
        padding = self.header_bytes - 10 - len(text) - 1
        if padding < 0:
            raise ValueError(f"npy header too long for {self.path}: {text}")
        body = (text + " " * padding + "\n").encode("latin1")
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body)
        self.file.close()

    def discard(self) -> None:
        if not self.file.closed:
            with contextlib.suppress(OSError):  # flushing the buffer may fail again (disk full)
                self.file.close()
        if os.path.exists(self.path):
            os.remove(self.path)


class DatasetWriter:
    """Stream a merged dataset to `uri`, chunk by chunk.

        with DatasetWriter(out, dim=256, id_length=32) as writer:
            writer.append(embeddings, ids, split, label_indptr, label_indices)   # per chunk
            manifest = writer.finish(vocab=tags, tag_counts=counts, embedder=spec, extra={...})

    Leaving the `with` block without `finish` (an exception) discards the temporary files.
    """

    def __init__(self, uri: str, *, dim: int, id_length: int, dtype: str = "float32"):
        if dim < 0 or id_length < 0:
            raise ValueError(f"dim and id_length must be >= 0, got {dim} and {id_length}")
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {dtype!r}")
        self.uri, self.dim, self.id_length = str(uri), int(dim), max(int(id_length), 1)
        self.dtype = dtype
        if self.id_length > MAX_ID_LENGTH:
            raise ValueError(f"id_length {self.id_length} is over the cap of {MAX_ID_LENGTH}")
        self.remote = storage.is_remote(self.uri)
        # The old dataset (if any) stays loadable until finish() moves the new files in.
        if self.remote:
            self._tmpdir: str | None = tempfile.mkdtemp(prefix="hashtag-dataset-")
            folder, suffix = self._tmpdir, ""
        else:
            self._tmpdir = None
            folder = storage.filesystem(self.uri)[1]
            os.makedirs(folder, exist_ok=True)
            artifacts.remove_temporaries(self.uri, FILES)  # what a killed writer left
            suffix = artifacts.temporary_suffix()
        self._folder, self._suffix = folder, suffix
        self._streams: dict[str, _NpyStream] = {}
        for name, (dtype, row_shape) in _ARRAYS.items():
            dtype = EMBEDDING_DTYPES[self.dtype] if name == "embeddings" else dtype
            row_shape = (self.dim,) if row_shape is None else row_shape
            path = os.path.join(folder, f"{name}.npy{suffix}")
            self._streams[name] = _NpyStream(path, dtype, row_shape)
        self._streams["labels_indptr"].append(np.zeros(1, np.int64))
        self._streams["ids_offsets"].append(np.zeros(1, np.int64))
        self.count = 0
        self.id_bytes = 0
        self.nnz = 0
        self.unlabeled = 0
        self.max_label = -1
        self.split_counts = np.zeros(len(SPLITS), np.int64)
        self._done = False

    def append(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str],
        split: np.ndarray,
        label_indptr: np.ndarray,
        label_indices: np.ndarray,
    ) -> None:
        """Add n rows: embeddings (n, dim), ids (n,), split codes (n,), and their labels as a CSR
        chunk (label_indptr (n+1,) from 0, label_indices) over the vocabulary given to finish."""
        with self._disk_full_is_an_error():
            self._append(embeddings, ids, split, label_indptr, label_indices)

    def _append(self, embeddings, ids, split, label_indptr, label_indices) -> None:
        n = len(ids)
        embeddings = np.asarray(embeddings).reshape(n, self.dim)
        split = np.asarray(split, np.uint8)
        label_indptr = np.asarray(label_indptr, np.int64)
        label_indices = np.asarray(label_indices, np.int32)
        if split.shape != (n,) or (n and split.max() >= len(SPLITS)):
            raise ValueError(f"split must be {n} codes in 0..{len(SPLITS) - 1}")
        if (
            label_indptr.shape != (n + 1,)
            or label_indptr[0] != 0
            or label_indptr[-1] != len(label_indices)
            or np.any(np.diff(label_indptr) < 0)
        ):
            raise ValueError(
                "label_indptr must be (n+1,), start at 0, grow, end at len(label_indices)"
            )
        if len(label_indices) and label_indices.min() < 0:
            raise ValueError("label indices must be >= 0")
        ids = [str(i) for i in ids]
        if len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} rows")
        longest = max(map(len, ids), default=0)
        if longest > self.id_length:
            raise ValueError(
                f"an id has {longest} characters, more than id_length={self.id_length}"
            )
        encoded = [i.encode("utf-8") for i in ids]
        lengths = np.fromiter(map(len, encoded), np.int64, count=n)
        streams = self._streams
        streams["embeddings"].append(embeddings)
        streams["ids_utf8"].append(np.frombuffer(b"".join(encoded), np.uint8))
        streams["ids_offsets"].append(np.cumsum(lengths) + self.id_bytes)
        self.id_bytes += int(lengths.sum())
        streams["split"].append(split)
        streams["labels_indptr"].append(label_indptr[1:] + self.nnz)
        streams["labels_indices"].append(label_indices)
        self.count += n
        self.nnz += len(label_indices)
        self.unlabeled += int(np.count_nonzero(np.diff(label_indptr) == 0))
        self.split_counts += np.bincount(split, minlength=len(SPLITS))
        if len(label_indices):
            self.max_label = max(self.max_label, int(label_indices.max()))

    def finish(
        self,
        *,
        vocab: Sequence[str],
        tag_counts: Sequence[int],
        embedder: EmbedderSpec | dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Move the files into place, write vocab.json, then manifest.json; return the manifest.
        `embedder`: the spec the embeddings were made with (or its JSON)."""
        if len(vocab) != len(tag_counts):
            raise ValueError(f"{len(vocab)} tags but {len(tag_counts)} counts")
        if self.max_label >= len(vocab):
            raise ValueError(
                f"a label index {self.max_label} is outside the vocabulary of {len(vocab)}"
            )
        with self._disk_full_is_an_error():
            manifest = self._finish(vocab, tag_counts, embedder, extra)
        self._done = True
        self._cleanup()
        return manifest

    def _finish(self, vocab, tag_counts, embedder, extra) -> dict[str, Any]:
        vocab_bytes = storage.dumps({"tags": list(vocab), "counts": [int(c) for c in tag_counts]})
        vocab_path = os.path.join(self._folder, VOCAB + self._suffix)
        with open(vocab_path, "w", encoding="utf-8") as f:
            f.write(vocab_bytes + "\n")
        staged = {f"{name}.npy": stream.path for name, stream in self._streams.items()}
        staged[VOCAB] = vocab_path
        for stream in self._streams.values():
            stream.close()
        files = {name: artifacts.file_entry(path) for name, path in staged.items()}
        # Everything is on disk: only now does the old dataset stop existing (renames and the
        # manifest take no space, so a full disk cannot strike in between).
        artifacts.remove_manifest(self.uri)
        for name, path in staged.items():
            final = storage.join(self.uri, name)
            if self.remote:
                storage.upload(path, final)
            else:
                os.replace(path, storage.filesystem(final)[1])
        fields = dict(extra or {})
        fields.update(
            count=self.count,
            dim=self.dim,
            dtype=self.dtype,
            embedder=EmbedderSpec.from_json(embedder).to_json(),
            vocab_size=len(vocab),
            splits={name: int(c) for name, c in zip(SPLITS, self.split_counts, strict=True)},
            label_nnz=self.nnz,
            unlabeled=self.unlabeled,
        )
        return artifacts.write_manifest(self.uri, DATASET_FORMAT, DATASET_VERSION, files, **fields)

    @contextlib.contextmanager
    def _disk_full_is_an_error(self) -> Iterator[None]:
        """A full disk: temporaries removed, one clear error, the previous dataset untouched."""
        try:
            yield
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            self.abort()
            self._done = True
            raise UserError(
                f"no space left writing the dataset {self.uri} ({error.strerror}); its temporary "
                "files were removed and any previous dataset there is unchanged: free space (or "
                "use another --out) and rerun `hashtag merge`"
            ) from None

    def abort(self) -> None:
        """Discard everything written so far (the output keeps no manifest)."""
        for stream in self._streams.values():
            stream.discard()
        vocab_path = os.path.join(self._folder, VOCAB + self._suffix)
        if self._suffix and os.path.exists(vocab_path):
            os.remove(vocab_path)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._done:
            self.abort()


class Dataset:
    """A merged dataset, loaded. Rows are global ids 0..N-1.

    embeddings (N, dim) float32 or float16, ids (N,) str, split (N,) uint8, vocab (list of V
    tags, most frequent first), tag_counts (V,) int64, embedder (an EmbedderSpec, parsed once
    at load), manifest (dict, as stored);
    labels(rows) -> bool (n, V), rows(name) -> indices, part(name) -> (X, Y) in memory, and
    blocks(name) -> (X, labels CSR) a block of rows at a time, for data larger than memory.

    A parted dataset keeps `parts` (one Dataset per part folder, memory-mapped when local); its
    whole-dataset arrays are concatenated only when first asked for.
    """

    def __init__(
        self,
        uri: str,
        manifest: dict[str, Any],
        arrays: dict[str, np.ndarray] | None,
        vocab: list[str],
        tag_counts: np.ndarray,
        parts: list[Dataset] | None = None,
    ):
        self.uri = uri
        self.manifest = manifest
        self._arrays = arrays
        self.parts = parts if parts is not None else [self]
        self.vocab = vocab
        self.tag_counts = tag_counts
        self.embedder = _embedder_spec(uri, manifest)

    def _array(self, name: str) -> np.ndarray:
        if name == "ids" and self.parts[0] is self:  # a one-folder dataset
            if "ids" not in self._arrays:  # UTF-8 + offsets, decoded once (older: ids.npy)
                self._arrays["ids"] = _decode_ids(self)
            return self._arrays["ids"]
        if self._arrays is None:  # a parted dataset, asked for a whole array: concatenate once
            self._arrays = {}
        if name not in self._arrays and len(self.parts) == 1:  # one part: its own (mapped) array
            return self.parts[0]._array(name)
        if name not in self._arrays:
            pieces = [part._array(name) for part in self.parts]
            if name == "labels_indptr":
                offsets = np.cumsum([0] + [int(p[-1]) for p in pieces[:-1]])
                pieces = [pieces[0][:1]] + [p[1:] + o for p, o in zip(pieces, offsets, strict=True)]
            self._arrays[name] = np.concatenate(pieces)
        return self._arrays[name]

    embeddings = property(lambda self: self._array("embeddings"))
    ids = property(lambda self: self._array("ids"))
    split = property(lambda self: self._array("split"))
    labels_indptr = property(lambda self: self._array("labels_indptr"))
    labels_indices = property(lambda self: self._array("labels_indices"))

    @classmethod
    def load(cls, uri: str, mmap: bool = True) -> Dataset:
        """Load the dataset at `uri` (memory-mapped when local and `mmap`)."""
        artifact = artifacts.read(
            uri, DATASET_FORMAT, (DATASET_VERSION, PARTED_VERSION), what="dataset", fix=_FIX
        )
        if artifact.manifest["version"] == PARTED_VERSION:
            return cls._load_parts(artifact, mmap)
        names = list(_ARRAYS)
        if "ids.npy" in artifact.files:  # written before ids were stored as UTF-8 + offsets
            names = [n for n in names if not n.startswith("ids_")] + ["ids"]
        # Remote and lazy: every array is read by byte ranges when its rows are asked for, so
        # loading costs the manifest and the vocabulary; the contents are checked per block.
        lazy = mmap and storage.is_remote(artifact.uri)
        if lazy:
            arrays = {name: artifact.open_array(f"{name}.npy") for name in names}
        else:
            arrays = {name: artifact.load_array(f"{name}.npy", mmap=mmap) for name in names}
        vocab, tag_counts = _read_vocab(artifact)
        _check(artifact, arrays, vocab, tag_counts, contents=not lazy)
        return cls(artifact.uri, artifact.manifest, arrays, vocab, tag_counts)

    @classmethod
    def _load_parts(cls, artifact: artifacts.Artifact, mmap: bool) -> Dataset:
        """A parted dataset: every part is a checked dataset folder; their row counts must add
        up to the manifest's, and they share one vocabulary."""
        listed = artifact.manifest.get("parts")
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(p, dict) and isinstance(p.get("count"), int) for p in listed)
        ):
            raise artifact.error("its manifest's 'parts' is not a list of {name, count}")
        folder = storage.join(artifact.uri, PARTS)
        parts = []
        for p in listed:
            part = cls.load(
                storage.join(folder, artifacts.check_name(folder, p.get("name"), _FIX)), mmap
            )
            if parts and part.vocab != parts[0].vocab:
                raise artifact.error("its parts do not share the manifest's vocabulary")
            if parts:  # one vocabulary in memory, not one per part (hundreds at 100M posts)
                part.vocab, part.tag_counts = parts[0].vocab, parts[0].tag_counts
            parts.append(part)
        counts = [len(part) for part in parts]
        if counts != [p["count"] for p in listed] or sum(counts) != artifact.int_field("count"):
            raise artifact.error(f"its parts hold {counts} rows, its manifest says otherwise")
        vocab = parts[0].vocab
        if len(vocab) != artifact.int_field("vocab_size", high=MAX_VOCAB):
            raise artifact.error("its parts do not share the manifest's vocabulary")
        return cls(artifact.uri, artifact.manifest, None, vocab, parts[0].tag_counts, parts)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return f"Dataset({self.uri!r}, count={len(self)}, dim={self.dim}, vocab_size={self.vocab_size})"

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def rows(self, name: str) -> np.ndarray:
        """Global ids of the rows in split `name` ("train", "val" or "test"), ascending."""
        return np.flatnonzero(np.asarray(self.split) == split_code(name))

    def labels_csr(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indptr from 0, indices) of the labels of `rows` (global ids), without densifying."""
        return csr_rows(np.asarray(self.labels_indptr), self.labels_indices, rows)

    def labels(self, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Dense bool (n, V) label matrix of `rows` (ids or a bool mask; all rows if None)."""
        if rows is None:
            rows = np.arange(len(self))
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return dense_labels(*self.labels_csr(rows), self.vocab_size)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(X float32 (n, dim), Y bool (n, V)) of split `name`, in memory."""
        rows = self.rows(name)
        return np.asarray(self.embeddings[rows], np.float32), self.labels(rows)

    def split_bytes(self, name: str) -> int:
        """Bytes split `name` takes in memory as float32 embeddings + CSR labels (an estimate
        from the manifest: the share of the split times the whole)."""
        share = self.manifest["splits"][split_code_name(name)] / max(1, len(self))
        nnz = self.manifest.get("label_nnz", 0)
        return int(share * (len(self) * (self.dim * 4 + 8) + nnz * 4))

    def blocks(
        self,
        name: str,
        block_rows: int = 65536,
        order: np.random.Generator | None = None,
        *,
        embeddings: bool = True,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(X float32 (b, dim), labels indptr (b+1,), indices) of split `name`, block by block,
        each block at most `block_rows` rows of one part. With `order` (a Generator) blocks come
        in a random order and rows are shuffled within each block (a per-epoch shuffle that
        never holds more than one block). Every block re-opens its memory maps, so the pages it
        touched leave this process with it: memory stays at one block, whatever N. A remote
        part is read by byte ranges: a block costs its rows' bytes, never the whole part.
        `embeddings=False`: labels only (X is (b, 0); no embedding is read)."""
        code = split_code(name)
        spans = []
        for part in self.parts:
            count = int(part.manifest["count"])
            spans += [(part, a, min(a + block_rows, count)) for a in range(0, count, block_rows)]
        if order is not None:
            spans = [spans[i] for i in order.permutation(len(spans))]
        for part, start, stop in spans:
            arrays = part._reopen()
            codes = np.asarray(arrays["split"][start:stop])
            indptr = np.asarray(arrays["labels_indptr"][start : stop + 1], np.int64)
            part._check_block(codes, indptr, len(arrays["labels_indices"]))
            rows = np.flatnonzero(codes == code)
            if order is not None:
                rows = order.permutation(rows)
            if len(rows) == 0:
                continue
            if embeddings:
                lo = int(rows.min()) if order is not None else int(rows[0])
                span = arrays["embeddings"][start + lo : start + int(rows.max()) + 1]
                X = np.asarray(span[rows - lo], np.float32)
                del span
            else:
                X = np.zeros((len(rows), 0), np.float32)
            first = int(indptr[0])
            labels = np.asarray(arrays["labels_indices"][first : int(indptr[-1])], np.int32)
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.vocab_size):
                raise artifacts.ArtifactError(
                    f"dataset {part.uri}: labels_indices.npy holds a tag index outside the "
                    f"vocabulary of {self.vocab_size}; {_FIX}"
                )
            block_indptr, indices = csr_rows(indptr - first, labels, rows)
            del arrays
            yield X, block_indptr, indices

    def _check_block(self, codes: np.ndarray, indptr: np.ndarray, nnz: int) -> None:
        """The rows a block read are well formed (a remote part is not checked whole at load)."""
        if (
            (len(codes) and int(codes.max()) >= len(SPLITS))
            or len(indptr) != len(codes) + 1
            or (len(indptr) and (int(indptr[0]) < 0 or int(indptr[-1]) > nnz))
            or bool(np.any(np.diff(indptr) < 0))
        ):
            raise artifacts.ArtifactError(
                f"dataset {self.uri}: split.npy or labels_indptr.npy is malformed; {_FIX}"
            )

    def _reopen(self) -> dict[str, np.ndarray]:
        """This part's arrays again: fresh memory maps when local (see `blocks`); remote, the
        range readers themselves (they hold no data)."""
        names = ("embeddings", "split", "labels_indptr", "labels_indices")  # what a block needs
        if self._arrays is None or storage.is_remote(self.uri):
            return {name: self._array(name) for name in names}
        return {
            name: storage.load_npy(storage.join(self.uri, f"{name}.npy"), mmap=True)
            for name in names
        }

    def split_count(self, name: str) -> int:
        """Rows of split `name`, from the manifest (nothing read)."""
        return int(self.manifest["splits"][split_code_name(name)])


def array_blocks(
    X: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    order: np.random.Generator | None = None,
    block_rows: int = 65536,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`Dataset.blocks` over arrays already in memory (for example read-only views of Ray's
    object store): blocks of at most `block_rows` rows, copied one block at a time, never the
    whole; with `order`, the rows of all blocks are one random permutation."""
    rows = order.permutation(len(X)) if order is not None else np.arange(len(X))
    for start in range(0, len(rows), block_rows):
        block = rows[start : start + block_rows]
        yield (np.asarray(X[block], np.float32), *csr_rows(indptr, indices, block))


class SharedPages:
    """The pages of read-only arrays that live in shared memory (views of Ray's object store),
    which this process may drop from its resident set once it has copied what it needs:
    `madvise(MADV_DONTNEED)` on a shared mapping only unmaps them here (the object store keeps
    the data; a later read maps them again). Without it, a trial that reads a split from the
    object store every epoch ends up with the whole split in its resident memory. Arrays in
    private memory are never touched (there the call would zero them)."""

    _MADV_DONTNEED = 4

    def __init__(self, arrays: Iterable[np.ndarray]):
        self.spans: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps") as f:
                shared = [
                    tuple(int(x, 16) for x in fields[0].split("-"))
                    for fields in (line.split() for line in f)
                    if len(fields) > 1 and fields[1][3:4] == "s"
                ]
            self._libc = ctypes.CDLL(None, use_errno=True)
        except (OSError, AttributeError):  # not Linux: nothing to drop
            return
        page = mmap.PAGESIZE
        for array in arrays:
            if array.flags.writeable or array.nbytes < page:
                continue
            start = array.__array_interface__["data"][0]
            end = start + array.nbytes
            if any(lo <= start and end <= hi for lo, hi in shared):
                first, last = -(-start // page) * page, end // page * page  # whole pages inside
                if last > first:
                    self.spans.append((first, last - first))

    @classmethod
    def object_store(cls) -> SharedPages:
        """Every page of Ray's object store mapped in this process (e.g. what a task wrote there
        when it returned or yielded a block): drop() unmaps them here, the store keeps them."""
        pages = cls(())
        try:
            with open("/proc/self/maps") as f:
                for fields in (line.split() for line in f):
                    if len(fields) > 5 and fields[1][3:4] == "s" and "plasma" in fields[5]:
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        pages.spans.append((lo, hi - lo))
        except OSError:
            pages.spans = []
        return pages

    def drop(self) -> None:
        for address, length in self.spans:
            self._libc.madvise(
                ctypes.c_void_p(address), ctypes.c_size_t(length), self._MADV_DONTNEED
            )


def piece_blocks(
    pieces: Sequence[dict[str, np.ndarray]],
    order: np.random.Generator | None = None,
    block_rows: int = 65536,
    *,
    embeddings: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`array_blocks` over a split held as consecutive pieces ({"X", "indptr", "indices"} each,
    e.g. read-only views of the object store, one object per piece): blocks of at most
    `block_rows` rows copied one at a time; with `order`, the rows of all pieces are one random
    permutation. `embeddings=False`: labels only (X is (b, 0))."""
    pages = [SharedPages(piece.values()) for piece in pieces]
    sizes = [len(p["indptr"]) - 1 for p in pieces]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    dim = pieces[0]["X"].shape[1] if pieces else 0
    rows = order.permutation(int(starts[-1])) if order is not None else np.arange(starts[-1])
    for first in range(0, len(rows), block_rows):
        block = rows[first : first + block_rows]
        which = np.searchsorted(starts, block, side="right") - 1
        X = np.empty((len(block), dim if embeddings else 0), np.float32)
        lengths = np.zeros(len(block), np.int64)
        gathered = []
        for k in np.unique(which):
            mine = np.flatnonzero(which == k)
            local = block[mine] - starts[k]
            if embeddings:
                X[mine] = pieces[k]["X"][local]
            indptr, indices = csr_rows(pieces[k]["indptr"], pieces[k]["indices"], local)
            lengths[mine] = np.diff(indptr)
            gathered.append((mine, indptr, indices))
            pages[k].drop()  # copied: a random block touches one piece's pages at a time
        indptr = np.zeros(len(block) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), np.int32)
        for mine, local_indptr, local_indices in gathered:  # back in the block's row order
            where = np.repeat(indptr[mine] - local_indptr[:-1], np.diff(local_indptr))
            indices[where + np.arange(len(local_indices))] = local_indices
        yield X, indptr, indices


def split_code_name(name: str) -> str:
    """The canonical split name ("validation" -> "val")."""
    return SPLITS[split_code(name)]


def csr_rows(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The CSR (indptr from 0, indices) of `rows` of the CSR matrix (indptr, indices)."""
    rows = np.asarray(rows).astype(np.int64, copy=False).reshape(-1)
    starts = np.asarray(indptr[rows], np.int64)
    lengths = np.asarray(indptr[rows + 1], np.int64) - starts
    ends = np.cumsum(lengths)
    # Position of every label of the selected rows in `indices`, without a Python loop.
    positions = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(
        starts - ends + lengths, lengths
    )
    out = np.zeros(len(rows) + 1, np.int64)
    out[1:] = ends
    return out, np.asarray(indices[positions] if len(positions) else indices[:0], np.int32)


def dense_labels(indptr: np.ndarray, indices: np.ndarray, n_tags: int, dtype=bool) -> np.ndarray:
    """Dense (n, n_tags) matrix of the CSR rows (indptr from 0, indices)."""
    out = np.zeros((len(indptr) - 1, n_tags), dtype)
    out[np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), indices] = 1
    return out


def write_parted_manifest(
    uri: str,
    parts: Sequence[dict[str, Any]],
    *,
    vocab: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the manifest of a dataset made of the part folders OUT/parts/<name>, given their
    manifests (each with its "name") in row order. The parts carry the vocabulary (vocab.json),
    so this one write replaces an older dataset at OUT at once."""
    if not parts:
        raise ValueError("a parted dataset needs at least one part")
    first = parts[0]
    manifest = dict(extra or {})
    manifest.update(
        count=sum(int(p["count"]) for p in parts),
        dim=first["dim"],
        dtype=first.get("dtype", "float32"),
        embedder=first["embedder"],
        vocab_size=len(vocab),
        splits={s: sum(int(p["splits"][s]) for p in parts) for s in SPLITS},
        label_nnz=sum(int(p["label_nnz"]) for p in parts),
        unlabeled=sum(int(p["unlabeled"]) for p in parts),
        parts=[{"name": p["name"], "count": int(p["count"])} for p in parts],
    )
    return artifacts.write_manifest(uri, DATASET_FORMAT, PARTED_VERSION, {}, **manifest)


def _embedder_spec(uri: str, manifest: dict[str, Any]) -> EmbedderSpec:
    """The manifest's embedder as a spec; a manifest without a readable one is damaged."""
    try:
        return EmbedderSpec.from_json(manifest.get("embedder"))
    except UserError as error:
        raise artifacts.ArtifactError(f"dataset {uri}: {error}; {_FIX}") from None


def _read_vocab(artifact: artifacts.Artifact) -> tuple[list[str], np.ndarray]:
    try:
        if VOCAB in artifact.files:
            data = artifact.read_bytes(VOCAB)
        else:  # a dataset written before vocab.json was listed in its manifest
            data = storage.read_bytes(storage.join(artifact.uri, VOCAB), limit=MAX_VOCAB_BYTES)
        vocab_json = json.loads(data)
        tags, counts = vocab_json["tags"], vocab_json["counts"]
        if not all(isinstance(t, str) for t in tags) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise ValueError("tags must be strings and counts non-negative integers")
    except artifacts.ArtifactError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as error:
        raise artifact.error(f"{VOCAB} is unreadable or malformed ({error})") from None
    return list(tags), np.asarray(counts, np.int64)


def _check(
    artifact: artifacts.Artifact,
    arrays: dict[str, np.ndarray],
    vocab: list[str],
    tag_counts: np.ndarray,
    contents: bool = True,
) -> None:
    """Shapes, dtypes and index ranges: a tampered dataset is an ArtifactError, not a crash.
    Without `contents` (arrays read by ranges) only what the headers say: `blocks` checks the
    rows it reads (`_check_block`)."""
    count = artifact.int_field("count")
    dim = artifact.int_field("dim", high=MAX_DIM)
    vocab_size = artifact.int_field("vocab_size", high=MAX_VOCAB)
    indptr = arrays["labels_indptr"]
    artifact.check_array("embeddings.npy", arrays["embeddings"], shape=(count, dim), kinds="f")
    if "ids" in arrays:  # the fixed-width layout of older datasets
        artifact.check_array("ids.npy", arrays["ids"], shape=(count,), kinds="U")
    else:
        utf8, offsets = arrays["ids_utf8"], arrays["ids_offsets"]
        artifact.check_array("ids_utf8.npy", utf8, shape=(len(utf8),), kinds="u")
        artifact.check_array("ids_offsets.npy", offsets, shape=(count + 1,), kinds="i")
        if contents:
            artifact.check_csr("ids_offsets.npy", offsets, len(utf8))
            if count and int(np.diff(offsets).max()) > 4 * MAX_ID_LENGTH:
                raise artifact.error(f"an id is longer than {MAX_ID_LENGTH} characters")
    artifact.check_array("split.npy", arrays["split"], shape=(count,), kinds="u")
    artifact.check_array("labels_indptr.npy", indptr, shape=(count + 1,), kinds="i")
    indices = arrays["labels_indices"]
    artifact.check_array("labels_indices.npy", indices, shape=(len(indices),), kinds="i")
    if contents:
        artifact.check_csr("labels_indptr.npy", indptr, len(indices))
        artifact.check_range("labels_indices.npy", indices, 0, vocab_size)
        artifact.check_range("split.npy", arrays["split"], 0, len(SPLITS))
    if len(vocab) != vocab_size or len(tag_counts) != len(vocab):
        raise artifact.error(
            f"{VOCAB} has {len(vocab)} tags and {len(tag_counts)} counts, the manifest says "
            f"vocab_size {vocab_size}"
        )


def _decode_ids(dataset: Dataset) -> np.ndarray:
    """The ids of a one-folder dataset as a variable-width string array (StringDType)."""
    data = np.asarray(dataset._arrays["ids_utf8"]).tobytes()
    offsets = np.asarray(dataset._arrays["ids_offsets"]).tolist()
    try:
        ids = [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    except UnicodeDecodeError as error:
        raise artifacts.ArtifactError(
            f"dataset {dataset.uri}: ids_utf8.npy is not UTF-8 ({error}); rerun `hashtag merge`"
        ) from None
    return np.array(ids, dtype=np.dtypes.StringDType())
