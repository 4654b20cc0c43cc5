"""Remote datasets are streamed: a block costs its rows' bytes (ranged GETs), never the part's."""

from __future__ import annotations

import numpy as np
import pytest

from hashtag import artifacts, storage
from hashtag.dataset import Dataset
from tests.test_tune import write_dataset


def test_remote_blocks_are_read_by_byte_ranges(tmp_path, s3_bucket):
    local = write_dataset(str(tmp_path / "data"), posts=2000, dim=64)
    remote_uri = f"{s3_bucket}/data"
    write_dataset(remote_uri, posts=2000, dim=64)
    part_bytes = local.manifest["files"]["embeddings.npy"]["bytes"]

    before = storage.remote_bytes_read()
    remote = Dataset.load(remote_uri)
    loaded = storage.remote_bytes_read() - before
    assert loaded < part_bytes / 20, loaded  # the manifest, the vocabulary and headers only

    before = storage.remote_bytes_read()
    X, indptr, indices = next(remote.blocks("train", block_rows=50))
    one_block = storage.remote_bytes_read() - before
    assert len(X) > 0 and one_block < part_bytes / 10, (one_block, part_bytes)

    # Every block equals the local memory-mapped dataset's, in order and shuffled alike.
    for name in ("train", "val", "test"):
        for order in (None, 1):
            a = local.blocks(name, 300, None if order is None else np.random.default_rng(order))
            b = remote.blocks(name, 300, None if order is None else np.random.default_rng(order))
            for (Xa, pa, ia), (Xb, pb, ib) in zip(a, b, strict=True):
                np.testing.assert_array_equal(Xa, Xb)
                np.testing.assert_array_equal(pa, pb)
                np.testing.assert_array_equal(ia, ib)
    # Labels only: no embedding byte is read.
    before = storage.remote_bytes_read()
    total = sum(len(p) - 1 for _, p, _ in remote.blocks("train", 500, embeddings=False))
    assert total == remote.split_count("train")
    assert storage.remote_bytes_read() - before < part_bytes / 10


def test_ranged_reader_refuses_a_pickled_array(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    try:
        artifacts.NpyRanges(str(path))
    except ValueError as error:
        assert "pickle" in str(error)
    else:
        raise AssertionError("an object array was accepted")


def test_ranged_reader_refuses_a_header_bigger_than_its_file(tmp_path):
    """A .npy whose header claims a huge shape (a legacy entry has no size in its manifest):
    refused from the file's own size before anything of that shape is allocated or read."""
    path = tmp_path / "big.npy"
    with open(path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (4_000_000_000_000,)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros(4, np.float32).tobytes())
    for size in (None, path.stat().st_size):
        with pytest.raises(ValueError, match="its header says"):
            artifacts.NpyRanges(str(path), size)
