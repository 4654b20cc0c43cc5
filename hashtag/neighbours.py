"""Nearest neighbours by cosine similarity on faiss: the index behind `knn` and behind merge's
near-duplicate groups.

    index = neighbours.build(X)                          # every row of X (n, dim), or blocks
    indices, sims = neighbours.search(index, Q, k)       # (n_q, k) each, best first
    entry = neighbours.write(index, folder, "index.faiss")   # an artifact data file
    index = neighbours.read(artifact, "index.faiss")     # sha256 checked BEFORE faiss parses it

Vectors are L2-normalised, so the inner product is the cosine similarity. `plan(n, dim)` picks
the index from the row count and dim (stated in docs/design.md):

- up to EXACT_ROWS rows: `IndexFlatIP`, exact (the same neighbours as a brute-force scan);
- above: IVF (an inverted file over `nlist` k-means cells, `nprobe` of them searched per query)
  with nlist = 2 x sqrt(n) rounded to a power of two (at most n / 39, faiss's minimum of training
  points per cell), nprobe = nlist / 16 within [8, 256]; the quantiser is trained on the first
  min(n, 64 x nlist, 131,072) rows (a random sample: a dataset's rows are in post-id-hash split
  order), then every row is added block by block. The lists hold the raw float32 vectors while
  n x dim x 4 bytes fit `codes_bytes` (2 GiB), else 8-bit scalar-quantised ones (SQ8, 1 byte per
  dim) while those fit, else PQ codes (the widest m dividing dim that fits, at most dim / 4, 8 bits each).

A faiss index file is parsed by C++ code that trusts it (a damaged file can crash the process),
so `read` takes it only from the artifact layer after its size and sha256 matched the manifest.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

EXACT_ROWS = 100_000
CODES_BYTES = 2 * 2**30
MAX_TRAIN_ROWS = 131_072
KINDS = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq")


def _faiss():
    import faiss

    return faiss


@dataclass(frozen=True)
class IndexPlan:
    """Which faiss index, with which parameters: see the module docstring."""

    kind: str
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    train_rows: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")

    def factory(self) -> str:
        codes = {"flat": "Flat", "ivf-flat": "Flat", "ivf-sq8": "SQ8", "ivf-pq": f"PQ{self.pq_m}"}
        return "Flat" if self.kind == "flat" else f"IVF{self.nlist},{codes[self.kind]}"

    def describe(self) -> str:
        if self.kind == "flat":
            return "exact (IndexFlatIP)"
        return f"IVF {self.factory()} nprobe={self.nprobe} (trained on {self.train_rows} rows)"


def plan(
    n: int,
    dim: int,
    *,
    exact_rows: int = EXACT_ROWS,
    codes_bytes: int = CODES_BYTES,
    kind: str | None = None,
) -> IndexPlan:
    """The index for n rows of `dim` (`kind` forces one of KINDS, e.g. to compare with exact)."""
    if n < 1 or dim < 1:
        raise ValueError(f"an index needs rows and a dim >= 1, got {n} x {dim}")
    if kind is None:
        if n <= exact_rows:
            kind = "flat"
        elif n * dim * 4 <= codes_bytes:
            kind = "ivf-flat"
        elif n * dim <= codes_bytes:
            kind = "ivf-sq8"
        else:
            kind = "ivf-pq"
    if kind == "flat":
        return IndexPlan("flat")
    nlist = 1 << max(0, round(math.log2(max(1.0, 2 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39))
    nprobe = min(nlist, max(8, min(256, nlist // 16)))
    pq_m = 0
    if kind == "ivf-pq":
        # at least 4 dims per sub-quantiser (faiss's PQ training crashed on 1-dim ones here)
        widest = max(1, min(dim // 4, codes_bytes // n))
        pq_m = max(m for m in range(1, widest + 1) if dim % m == 0)
    train_rows = min(n, 64 * nlist, MAX_TRAIN_ROWS)
    if kind == "ivf-pq":  # PQ's 256 centroids per sub-vector want >= 39 x 256 points
        train_rows = min(n, max(train_rows, 39 * 256))
    return IndexPlan(kind, nlist, nprobe, pq_m, train_rows)


def normalised(X: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, unit rows (zero rows stay zero): what the index holds."""
    X = np.ascontiguousarray(X, np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.maximum(norms, 1e-12), np.float32)


def _blocks(X: np.ndarray, rows: int = 65_536) -> Iterator[np.ndarray]:
    for start in range(0, len(X), rows):
        yield X[start : start + rows]


def build(
    X: np.ndarray | Iterable[np.ndarray],
    *,
    n: int | None = None,
    dim: int | None = None,
    index_plan: IndexPlan | None = None,
):
    """A faiss index of every row, in the order given: X is an array or an iterable of (b, dim)
    blocks (then give `n` and `dim`). IVF: the quantiser is trained on the first
    `train_rows` rows (buffered), then every block is added as it comes: one pass, the memory of
    one block plus the training sample plus the index itself."""
    faiss = _faiss()
    if isinstance(X, np.ndarray):
        n, dim = X.shape
        X = _blocks(X)
    if n is None or dim is None:
        raise ValueError("blocks of rows need n and dim")
    chosen = index_plan or plan(n, dim)
    index = faiss.index_factory(int(dim), chosen.factory(), faiss.METRIC_INNER_PRODUCT)
    pending: list[np.ndarray] = []
    buffered = 0
    for block in X:
        block = normalised(block)
        if index.is_trained:
            index.add(block)
            continue
        pending.append(block)
        buffered += len(block)
        if buffered >= chosen.train_rows:
            _train_and_add(index, pending, chosen)
            pending = []
    if not index.is_trained:
        _train_and_add(index, pending, chosen)
    if chosen.nprobe:
        faiss.extract_index_ivf(index).nprobe = chosen.nprobe
    return index


def _train_and_add(index, pending: list[np.ndarray], chosen: IndexPlan) -> None:
    rows = np.concatenate(pending) if pending else np.zeros((0, index.d), np.float32)
    if len(rows) == 0:
        raise ValueError("an index needs at least one row")
    index.train(rows[: chosen.train_rows])
    index.add(rows)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64, cosine similarities float32), each (n_queries, k), best first; a row's
    missing neighbours (an IVF probe that found fewer than k) are index -1."""
    k = max(1, min(int(k), int(index.ntotal)))
    sims, indices = index.search(normalised(queries), k)
    return indices.astype(np.int64, copy=False), sims.astype(np.float32, copy=False)


def range_pairs(index, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (query row, index row) pair with cosine similarity >= threshold."""
    limits, sims, indices = index.range_search(normalised(queries), float(threshold))
    rows = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(limits.astype(np.int64)))
    return rows, indices.astype(np.int64, copy=False)


def describe(index) -> str:
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return f"exact IndexFlatIP over {index.ntotal} rows"
    return f"IVF nlist={ivf.nlist} nprobe={ivf.nprobe} over {index.ntotal} rows"


def is_ivf(index) -> bool:
    try:
        _faiss().extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def write(index, folder: str, name: str) -> dict:
    """Write the index as data file `name` of artifact `folder` (atomically; a local temporary
    file uploaded for s3://); return its manifest entry (bytes, sha256)."""
    from hashtag import artifacts

    faiss = _faiss()
    with tempfile.TemporaryDirectory(prefix="hashtag-index-") as tmp:
        path = os.path.join(tmp, name)
        faiss.write_index(index, path)
        return artifacts.write_local_file(folder, name, path)


def read(artifact, name: str):
    """The index in data file `name` of a read artifact: its size and sha256 are checked
    first (a damaged file is an ArtifactError naming it, never a faiss parse); memory-mapped
    when the folder is local (a downloaded copy otherwise)."""
    faiss = _faiss()
    with artifact.local_file(name) as (path, local):
        if local:
            with open(path, "rb") as f:  # faiss's fourcc: "Iw.." inverted files, "Ix.." flat
                ivf = f.read(4).startswith(b"Iw")
            flags = faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC
            try:
                return faiss.read_index(path, flags | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                pass  # an index type without a memory-mapped reader: read it whole
        try:
            return faiss.read_index(path)
        except RuntimeError as error:
            raise artifact.error(f"{name} is not a faiss index ({str(error)[:200]})") from None
