"""The default embedder's weights ship inside the package (hashtag/pretrained.py, hashtag/weights/):
loaded with no network and no ../shared, checked against their checksums, recorded by name and
checksum, carried by the wheel and the job upload."""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import yaml
from conftest import SHARED

from hashtag import cli, embedders, merge, pretrained, shards
from hashtag.embedders import EmbedderSpec
from hashtag.errors import UserError
from hashtag.posts import Post
from hashtag.scrape import ScrapeConfig

REPO = Path(__file__).resolve().parents[1]

# Run in a subprocess with HOME and the working dir elsewhere: any socket connection, or any
# open of a file under ../shared or Keras' weights cache, raises (an audit hook sees every Python open;
# the TFLite runtime gets the model's bytes from us, it opens no file of its own).
OFFLINE_EMBED = """
import sys
forbidden = [p for p in sys.argv[1:] if p]
def audit(event, args):
    if event == "socket.connect":
        raise RuntimeError(f"network access: {args[1]!r}")
    if event == "open" and isinstance(args[0], str):
        if any(args[0].startswith(p) for p in forbidden) or "/.keras/models" in args[0]:
            raise RuntimeError(f"opened {args[0]}")
sys.addaudithook(audit)

import json
import numpy as np
from hashtag import embedders

rng = np.random.default_rng(0)
image = np.zeros((180, 260, 3), np.uint8)
image[:90] = (40, 120, 220)  # sky over
image[90:] = rng.integers(0, 255, (90, 260, 3), dtype=np.uint8)  # rough ground
embedder = embedders.create("default", num_threads=1)
vectors = embedder.embed([image, image[:, ::-1]])
print(json.dumps({"spec": embedder.spec.to_json(), "shape": list(vectors.shape),
                  "norms": np.linalg.norm(vectors, axis=1).tolist(),
                  "finite": bool(np.isfinite(vectors).all()),
                  "cosine": float(vectors[0] @ vectors[1])}))
"""


def test_the_default_embeds_offline_from_the_package_alone(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "PYTHONPATH": str(REPO),  # the package, with hashtag/weights, and nothing else
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    forbidden = [str(SHARED or ""), str(REPO.parent / "shared")]
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_EMBED, *forbidden],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 1280 + 1024] and result["finite"]
    np.testing.assert_allclose(result["norms"], 1.0, atol=1e-5)
    assert 0.5 < result["cosine"] < 0.9999  # a mirror image: near, not the same
    parts = result["spec"]["parts"]
    assert [p["name"] for p in parts] == list(pretrained.DEFAULT)
    assert [p["sha256"] for p in parts] == [
        pretrained.SHIPPED[n].sha256 for n in pretrained.DEFAULT
    ]
    assert [p["dim"] for p in parts] == [1280, 1024]
    assert str(tmp_path) not in json.dumps(result["spec"]), "a spec names no install path"


def _damaged_copy(tmp_path: Path, monkeypatch, how: str) -> Path:
    copy = tmp_path / "weights"
    shutil.copytree(pretrained.WEIGHTS_DIR, copy)
    target = copy / pretrained.SHIPPED["mobilenet_v2"].file
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    if how == "flipped":
        data[len(data) // 2] ^= 0x01  # one bit, same size
    elif how == "truncated":
        data = data[:-100]
    elif how == "longer":
        data += b"\0"
    target.write_bytes(bytes(data))
    if how == "missing":
        target.unlink()
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", copy)
    return target


@pytest.mark.parametrize("how", ["flipped", "truncated", "longer"])
def test_a_damaged_shipped_file_is_refused_by_its_checksum(tmp_path, monkeypatch, how):
    target = _damaged_copy(tmp_path, monkeypatch, how)
    for make in (
        lambda: embedders.create("mobilenet_v2"),
        lambda: embedders.create("default"),
        lambda: embedders.create_from_spec({"name": "mobilenet_v2"}),
    ):
        with pytest.raises(
            UserError, match=f"weights file {target} is damaged: sha256 .*reinstall"
        ):
            make()
    # The other, intact file still loads its bytes.
    assert len(pretrained.read("mobilenet_v1")) == pretrained.SHIPPED["mobilenet_v1"].size


def test_a_missing_shipped_file_says_how_to_get_it(tmp_path, monkeypatch):
    _damaged_copy(tmp_path, monkeypatch, "missing")
    with pytest.raises(UserError, match="missing from this installation.*reinstall.*working-dir"):
        embedders.create("mobilenet_v2")


def test_shipped_files_notice_and_checksums_agree():
    notice = (pretrained.WEIGHTS_DIR / "NOTICE").read_text()
    assert "google-coral/test_data" in notice and "104342d" in notice and "Apache" in notice
    assert (pretrained.WEIGHTS_DIR / "LICENSE").read_text().lstrip().startswith("Apache License")
    for shipped in pretrained.SHIPPED.values():
        data = shipped.path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == shipped.sha256 and len(data) == shipped.size
        assert shipped.file in notice and shipped.sha256 in notice
        assert pretrained.read(shipped.name) == data
    with pytest.raises(UserError, match="not a model shipped with hashtag; shipped: mobilenet_v2"):
        pretrained.resolve("resnet50")


def test_the_default_spec_names_its_parts_and_scrape_uses_it():
    default = EmbedderSpec.parse("default")
    assert [p.kind for p in default.parts] == ["mobilenet_v2", "mobilenet_v1"]
    assert EmbedderSpec.parse("mobilenet_v2") == default.parts[0]
    assert "default" in embedders.available() and "mobilenet_v1" in embedders.available()
    config = ScrapeConfig(source="posts.jsonl", out="out", cpus_per_task=2)
    assert config.embedder == ("default",)
    specs = config.embedder_specs()  # the scrape task's threads go to each TFLite part
    assert [s.kind for s in specs] == ["mobilenet_v2", "mobilenet_v1"]
    assert [(s.get("num_threads"), s.get("interpreters")) for s in specs] == [(2, 2), (2, 2)]
    with_classic = ScrapeConfig(source="p", out="o", embedder=("default", "classic"))
    assert [s.kind for s in with_classic.embedder_specs()] == [
        "mobilenet_v2",
        "mobilenet_v1",
        "classic",
    ]
    with pytest.raises(UserError, match="different embedders"):
        ScrapeConfig(source="p", out="o", embedder=("default", "mobilenet_v1"))
    with pytest.raises(ValueError, match="takes no argument"):
        embedders.create("mobilenet_v2:/elsewhere/model.tflite")
    with pytest.raises(UserError, match="takes no argument"):
        EmbedderSpec.parse("default:/elsewhere")
    # On the command line, one --embedder replaces the default (it is not added to it).
    parser = argparse.ArgumentParser()
    cli.add_config_arguments(parser, ScrapeConfig)
    args = parser.parse_args(["--source", "s", "--out", "o", "--embedder", "classic"])
    assert cli.config_from_args(ScrapeConfig, args).embedder == ("classic",)


def test_embeddings_of_other_weights_are_refused(tmp_path):
    """A spec records each file's sha256: data or a model made with other weights is refused
    by the embedder (recommend) and by merge, not silently mixed."""
    shipped = EmbedderSpec.parse("mobilenet_v2").kind
    other = {"name": shipped, "sha256": "0" * 64, "dim": 1280, "int8": True}
    with pytest.raises(UserError, match="other mobilenet_v2 weights .*embed again"):
        embedders.create_from_spec(other)
    with pytest.raises(UserError, match="other mobilenet_v2 weights"):
        embedders.create_from_spec({"name": "ensemble", "parts": [other, {"name": "classic"}]})

    ours = dict(other, sha256=pretrained.SHIPPED["mobilenet_v2"].sha256)
    root = str(tmp_path / "run")
    for index, spec in enumerate([ours, other]):
        post = Post(id=f"p{index}", image=f"/p{index}.jpg", tags=("x",))
        vectors = np.ones((1, 1280), np.float32)
        shards.write_shard(
            root, index, [post], vectors, embedder=spec, image_sha256=["0"], stats={}
        )
    with pytest.raises(
        UserError, match="mobilenet_v2: same model, different sha256.*one embedder set"
    ):
        merge.run(merge.MergeConfig(shards=root, out=str(tmp_path / "dataset"), min_count=1))


def test_the_wheel_and_the_job_upload_carry_the_weights():
    from ray._private.runtime_env.packaging import _get_excludes

    files = [s.file for s in pretrained.SHIPPED.values()] + ["LICENSE", "NOTICE"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["hashtag"]
    for name in files:
        assert any(fnmatch.fnmatch(f"weights/{name}", p) for p in patterns), name
    excludes = yaml.safe_load((REPO / "infra" / "runtime_env.yaml").read_text())["excludes"]
    excluded = _get_excludes(REPO, excludes)  # Ray's own matcher for working_dir uploads
    for name in files:
        assert not excluded(REPO / "hashtag" / "weights" / name), name
    assert excluded(REPO / "model.tflite") and excluded(REPO / "hashtag" / "other.tflite")


def test_shipped_names_embed_as_the_same_files_given_by_path(shared_dir):
    """The quality figures were measured with ../shared/models' files by path: the shipped
    names are the same bytes and give the same vectors."""
    models = shared_dir / "models"
    if not (models / pretrained.SHIPPED["mobilenet_v1"].file).is_file():
        pytest.skip("the TFLite models are not in ../shared/models")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (240, 300, 3), dtype=np.uint8) for _ in range(3)]
    for name, shipped in pretrained.SHIPPED.items():
        by_name = embedders.create(name, num_threads=1)
        by_path = embedders.create(f"tflite:{models / shipped.file}", num_threads=1)
        np.testing.assert_array_equal(by_name.embed(images), by_path.embed(images))
        assert dict(by_name.spec.options) == dict(by_path.spec.options)
