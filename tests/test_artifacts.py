"""The artifact layer: tampered or damaged folders end in one ArtifactError naming the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hashtag import artifacts, models
from hashtag.completion import Cooccurrence
from hashtag.dataset import Dataset, DatasetWriter, csr_from_lists
from hashtag.errors import ArtifactError
from hashtag.models import ModelConfig

SPEC = {"name": "classic", "version": 1}


def edit_manifest(folder, **changes):
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def make_dataset(tmp_path, name="d", n=12):
    """A one-folder dataset written by DatasetWriter (what each merged part is), without Ray."""
    out = tmp_path / name
    ids = [f"p{i}" for i in range(n)]
    labels = [[0] if i % 2 else [0, 1] for i in range(n)]
    indptr, indices = csr_from_lists(labels)
    with DatasetWriter(str(out), dim=2, id_length=4) as writer:
        writer.append(
            np.arange(2 * n, dtype=np.float32).reshape(n, 2), ids, np.zeros(n, np.uint8),
            indptr, indices,
        )  # fmt: skip
        writer.finish(vocab=["cat", "dog"], tag_counts=[n, n // 2], embedder=SPEC)
    return out


def test_names_outside_the_folder_are_refused(tmp_path):
    for bad in ["../x.npy", "/etc/passwd", "a/b.npy", "..", "", "manifest.json"]:
        with pytest.raises(ArtifactError, match="not a plain file name"):
            artifacts.check_name(str(tmp_path), bad)
    artifacts.write_manifest(
        str(tmp_path), "f", 1, {"a.bin": artifacts.write_file(str(tmp_path), "a.bin", b"x")}
    )
    edit_manifest(tmp_path, files={"../../a.bin": {"bytes": 1, "sha256": "0" * 64}})
    with pytest.raises(ArtifactError, match="tampered"):
        artifacts.read(str(tmp_path), "f", 1, what="thing", fix="rebuild it")


def test_missing_foreign_and_oversized_manifests(tmp_path):
    with pytest.raises(artifacts.ArtifactMissing, match="no thing at .*rebuild it"):
        artifacts.read(str(tmp_path / "none"), "f", 1, what="thing", fix="rebuild it")
    (tmp_path / "manifest.json").write_text("[" * 100_000)  # deep nesting: not a crash
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifacts.read(str(tmp_path), "f", 1, what="thing", fix="rebuild it")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "g", "version": 1}))
    with pytest.raises(ArtifactError, match="not a thing"):
        artifacts.read(str(tmp_path), "f", 1, what="thing", fix="rebuild it")


@pytest.mark.parametrize(
    "damage, match",
    [
        ("negative", "labels_indices.npy holds values"),
        ("out_of_range", "labels_indices.npy holds values"),
        ("indptr", "not a valid CSR"),
        ("shape", "embeddings.npy"),
        ("vocab_size", "vocab_size"),
        ("huge_vocab", "vocab_size"),
        ("array_name", "not a plain file name"),
    ],
)
def test_tampered_dataset_is_one_artifact_error(tmp_path, damage, match):
    out = make_dataset(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())

    def rewrite(name, array):
        np.save(out / name, array, allow_pickle=False)
        entry = artifacts.file_entry(str(out / name))
        edit_manifest(out, files={**manifest["files"], name: entry})

    indices = np.load(out / "labels_indices.npy")
    if damage == "negative":
        rewrite("labels_indices.npy", np.where(indices == 0, -5, indices).astype(np.int32))
    elif damage == "out_of_range":
        rewrite("labels_indices.npy", indices + 7)
    elif damage == "indptr":
        indptr = np.load(out / "labels_indptr.npy")
        indptr[3] = indptr[4] + 1
        rewrite("labels_indptr.npy", indptr)
    elif damage == "shape":
        rewrite("embeddings.npy", np.zeros((3, 2), np.float32))
    elif damage == "vocab_size":
        edit_manifest(out, vocab_size=5)
    elif damage == "huge_vocab":
        edit_manifest(out, vocab_size=10**12)
    elif damage == "array_name":
        edit_manifest(out, files={**manifest["files"], "/etc/passwd": 3})
    with pytest.raises(ArtifactError, match=match) as info:
        Dataset.load(str(out))
    assert str(out) in str(info.value) and "hashtag merge" in str(info.value)


def test_tampered_model_is_one_artifact_error(tmp_path):
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 4)).astype(np.float32), rng.random((30, 3)) < 0.4
    model = models.create("knn", ModelConfig()).fit(X, Y, vocab=["a", "b", "c"])
    uri = tmp_path / "m"
    model.save(str(uri))
    assert models.load(str(uri)).vocab == ["a", "b", "c"]
    manifest = json.loads((uri / "manifest.json").read_text())

    edit_manifest(uri, arrays=["../../../etc/passwd"])
    with pytest.raises(ArtifactError, match="not a plain file name"):
        models.load(str(uri))
    edit_manifest(uri, arrays=manifest["arrays"], vocab=["a"])
    with pytest.raises(ArtifactError, match="vocabulary"):
        models.load(str(uri))
    edit_manifest(uri, vocab=None, n_tags=5)
    with pytest.raises(ArtifactError, match="inconsistent|predicts"):
        models.load(str(uri))
    edit_manifest(uri, vocab=manifest["vocab"], n_tags=3)
    np.save(uri / "frequency.npy", np.zeros(3, np.float32))  # same size, other bytes
    with pytest.raises(ArtifactError, match="sha256"):
        models.load(str(uri))


def test_tampered_cooccurrence_is_one_artifact_error(tmp_path):
    model = Cooccurrence().fit(np.array([[1, 1, 0], [0, 1, 1]], bool))
    model.save(str(tmp_path / "c"))
    assert Cooccurrence.load(str(tmp_path / "c")).counts.shape == (3, 3)
    np.save(tmp_path / "c" / "counts.npy", -np.ones((3, 3), np.int64))
    edit_manifest(
        tmp_path / "c",
        files={"counts.npy": artifacts.file_entry(str(tmp_path / "c" / "counts.npy"))},
    )
    with pytest.raises(ArtifactError, match="square count matrix"):
        Cooccurrence.load(str(tmp_path / "c"))


FULL_DISK = """
import resource, signal, sys
import numpy as np
from hashtag.dataset import DatasetWriter
from hashtag.errors import UserError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    with DatasetWriter(sys.argv[1], dim=64, id_length=4) as writer:
        for _ in range(10):
            n = 100
            writer.append(np.ones((n, 64), np.float32), ["x"] * n, np.zeros(n, np.uint8),
                          np.zeros(n + 1, np.int64), np.zeros(0, np.int32))
        writer.finish(vocab=["a"], tag_counts=[1], embedder={"name": "classic"})
except UserError as error:
    print(error)
    sys.exit(2)
"""


def test_a_full_disk_keeps_the_previous_dataset(tmp_path):
    out = make_dataset(tmp_path)
    before = sorted(os.listdir(out))
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "no space left" in result.stdout and "Traceback" not in result.stderr
    assert sorted(os.listdir(out)) == before  # no temporaries left
    assert len(Dataset.load(str(out))) == 12  # the previous dataset still loads


def test_one_long_id_costs_only_its_own_bytes(tmp_path):
    """Ids are UTF-8 + offsets: a 256-character id does not widen the other rows' storage."""
    n = 1000
    ids = [f"p{i}" for i in range(n - 2)] + ["x" * 256, "é" * 256]
    indptr, indices = csr_from_lists([[0]] * n)
    with DatasetWriter(str(tmp_path / "d"), dim=1, id_length=256) as writer:
        writer.append(np.zeros((n, 1), np.float32), ids, np.zeros(n, np.uint8), indptr, indices)
        writer.finish(vocab=["cat"], tag_counts=[n], embedder=SPEC)
    stored = sum(os.path.getsize(tmp_path / "d" / f) for f in ("ids_utf8.npy", "ids_offsets.npy"))
    assert stored < 20_000  # a fixed-width <U256 array would be 1 MB
    assert Dataset.load(str(tmp_path / "d")).ids.tolist() == ids


def test_ids_of_a_tampered_or_older_dataset(tmp_path):
    out = make_dataset(tmp_path)
    offsets = np.load(out / "ids_offsets.npy")
    offsets[3] = 10**9  # an offset past the end of the bytes
    np.save(out / "ids_offsets.npy", offsets)
    with pytest.raises(ArtifactError):
        Dataset.load(str(out))
    # A dataset written before ids were UTF-8 + offsets (one fixed-width ids.npy) still loads.
    old = make_dataset(tmp_path, "old")
    manifest = json.loads((old / "manifest.json").read_text())
    for name in ("ids_utf8.npy", "ids_offsets.npy"):
        os.remove(old / name)
        del manifest["files"][name]
    np.save(old / "ids.npy", np.array([f"p{i}" for i in range(12)]))
    manifest["files"]["ids.npy"] = artifacts.file_entry(str(old / "ids.npy"))
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert Dataset.load(str(old)).ids.tolist() == [f"p{i}" for i in range(12)]


def test_the_legacy_no_files_rule_is_opt_in_and_confined(tmp_path):
    """A manifest listing no files: read unchecked only by formats once written that way
    (`unlisted=True`), and only plain names inside the folder."""
    folder = tmp_path / "old"
    artifacts.write_array(str(folder), "a.npy", np.arange(3))
    artifacts.write_manifest(str(folder), "f", 1, {})
    old = artifacts.read(str(folder), "f", 1, what="thing", fix="rebuild it", unlisted=True)
    assert old.legacy and old.load_array("a.npy", verify=True).tolist() == [0, 1, 2]
    with pytest.raises(ArtifactError, match="not a plain file name"):
        old.path("../a.npy")
    strict = artifacts.read(str(folder), "f", 1, what="thing", fix="rebuild it")
    with pytest.raises(ArtifactError, match="does not list 'a.npy'"):
        strict.load_array("a.npy")


def test_exists_read_finished_and_temporaries(tmp_path, caplog):
    """What a resumed job asks of an output: finished (checked), or to be written again."""
    out = make_dataset(tmp_path)
    assert artifacts.exists(str(out)) and not artifacts.exists(str(tmp_path / "none"))
    read = {"format": "hashtag-dataset", "versions": 1, "what": "part", "fix": "rewrite it"}
    assert artifacts.read_finished(str(out), **read).manifest["count"] == 12
    assert artifacts.read_finished(str(tmp_path / "none"), **read) is None
    assert artifacts.read_manifest(str(out))["count"] == 12
    (out / "manifest.json").write_text("{damaged")
    assert artifacts.read_finished(str(out), **read) is None
    assert "not valid JSON" in caplog.text
    # A killed writer's temporaries go; other files stay.
    (out / f"vocab.json{artifacts.temporary_suffix()}").write_text("x")
    (out / "notes.txt").write_text("keep")
    artifacts.remove_files(str(out), ["vocab.json", "split.npy"])
    assert sorted(os.listdir(out)) == sorted(
        ["embeddings.npy", "ids_utf8.npy", "ids_offsets.npy", "labels_indptr.npy",
         "labels_indices.npy", "manifest.json", "notes.txt"]
    )  # fmt: skip
