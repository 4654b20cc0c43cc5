"""export.py, the export format's one owner: what tune writes reads back, and a foreign, newer
or malformed export is one ArtifactError naming the folder, before any array is read."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_tune import export_knn

from hashtag import artifacts, export, recommend
from hashtag.errors import ArtifactError


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    return export_knn(tmp_path_factory.mktemp("export"), posts=120, dim=8, tags=5)


def _copy_with(exported: str, tmp_path, **changes) -> str:
    """A copy of the export whose metadata has `changes` (None deletes a key), its arrays gone:
    the check must come before any of them is read."""
    folder = str(tmp_path / "model")
    shutil.copytree(exported, folder)
    path = os.path.join(folder, artifacts.MANIFEST)
    manifest = json.loads(open(path).read())
    for key, value in changes.items():
        if value is None:
            manifest["extra"].pop(key, None)
        else:
            manifest["extra"][key] = value
    open(path, "w").write(json.dumps(manifest))
    for name in os.listdir(folder):
        if name.endswith(".npy"):
            os.remove(os.path.join(folder, name))
    return folder


def test_an_export_reads_back(exported):
    model = export.ExportedModel(exported)
    assert model.metadata["format"] == export.FORMAT
    assert model.metadata["version"] == export.VERSION
    assert model.embedder_spec.to_json() == model.metadata["embedder"]
    assert recommend.ExportedModel is export.ExportedModel  # the old import still works
    assert model.cooccurrence.counts.shape == (len(model.vocab), len(model.vocab))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "someone-else"}, "not a model exported by `hashtag tune`.*'someone-else'"),
        ({"format": None}, "not a model exported by `hashtag tune`.*no export format"),
        ({"version": 2}, "version 2, newer than this hashtag reads.*upgrade hashtag"),
        ({"version": "1"}, "export version '1' is not a version; re-export"),
        ({"vocab": None}, "no vocabulary or embedder"),
    ],
)
def test_a_foreign_or_newer_export_is_one_clear_error(exported, tmp_path, changes, message):
    folder = _copy_with(exported, tmp_path, **changes)
    with pytest.raises(ArtifactError, match=f"{folder}.*{message}"):
        export.ExportedModel(folder)


def test_no_export_at_all_says_what_to_give(tmp_path):
    with pytest.raises(ArtifactError, match="give --model the folder `hashtag tune` exported"):
        export.ExportedModel(str(tmp_path / "nothing"))


def test_a_manifest_with_the_retired_seed_sigmoid_bug_setting_still_loads(exported, tmp_path):
    folder = str(tmp_path / "old")
    shutil.copytree(exported, folder)
    path = os.path.join(folder, artifacts.MANIFEST)
    manifest = json.loads(open(path).read())
    manifest["config"]["seed_sigmoid_bug"] = False  # what every model saved before carries
    open(path, "w").write(json.dumps(manifest))
    assert export.ExportedModel(folder).vocab == export.ExportedModel(exported).vocab
