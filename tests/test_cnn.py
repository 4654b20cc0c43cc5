"""CNN embedders: TFLite on the real pretrained models in ../shared/models, Keras backbones
with random weights (no internet here), weights and models through a moto S3 endpoint."""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np
import pytest
from conftest import missing

from hashtag import cnn, embedders, storage

V2 = "mobilenet_v2_1.0_224_quant.tflite"
V1 = "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
V2_POOL = "MobilenetV2/Logits/AvgPool"


@pytest.fixture(scope="module")
def models_dir(shared_dir):
    folder = shared_dir / "models"
    if not (folder / V2).is_file() or not (folder / V1).is_file():
        missing("the pretrained TFLite models are not in ../shared/models")
    return folder


@pytest.fixture(scope="module")
def photos(shared_dir) -> list[np.ndarray]:
    files = sorted((shared_dir / "data" / "feedme-food" / "images").glob("*.jpg"))[:10]
    if len(files) < 10:
        missing("the feedme-food photos are not in ../shared/data")
    return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]


@pytest.fixture(scope="module")
def v2(models_dir):
    return embedders.create(f"tflite:{models_dir / V2}")


@pytest.fixture(scope="module")
def v1(models_dir):
    return embedders.create(f"tflite:{models_dir / V1}")


def edited(rgb: np.ndarray) -> np.ndarray:
    """The same photo as a user might repost it: cropped, brighter, softer, re-encoded."""
    h, w = rgb.shape[:2]
    dy, dx = int(h * 0.05), int(w * 0.05)
    image = rgb[dy : h - dy, dx : w - dx]
    image = cv2.convertScaleAbs(image, alpha=1.1, beta=15)
    image = cv2.GaussianBlur(image, (3, 3), 0.8)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    return cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def check_vectors(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("shape", [(350, 525, 3), (900, 300, 3), (100, 120, 3), (224, 224, 3)])
def test_resize_and_crop_gives_the_input_size(shape):
    rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert cnn.resize_and_crop(rgb, 224, 224).shape == (224, 224, 3)
    assert cnn.resize_and_crop(rgb, 64, 96).shape == (64, 96, 3)


def test_resize_and_crop_keeps_the_centre():
    rgb = np.zeros((200, 400, 3), np.uint8)
    rgb[:, 100:300] = 255  # the centre square is white, the sides black
    assert cnn.resize_and_crop(rgb, 50, 50).min() == 255


def test_grey_and_rgba_images_are_accepted_and_bad_ones_refused():
    assert cnn.as_rgb(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert cnn.as_rgb(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    with pytest.raises(ValueError, match="uint8"):
        cnn.as_rgb(np.zeros((5, 6, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        cnn.as_rgb(np.zeros((5, 6, 2), np.uint8))


# --------------------------------------------------------------------------------------------
# TFLite on the real models


def test_v2_auto_finds_the_pool_before_the_classifier(v2, models_dir, photos):
    assert v2.spec.get("tensor") == V2_POOL and v2.dim == 1280
    assert v2.batchable  # the classifier head, which fixes the batch at 1, is dropped
    batched = v2.embed(photos[:5])
    check_vectors(batched, 5, 1280)
    one_by_one = embedders.create(f"tflite:{models_dir / V2}", max_batch=1).embed(photos[:5])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_v2_tensor_by_name_matches_auto_and_output_is_the_classifier(v2, models_dir, photos):
    named = embedders.create(f"tflite:{models_dir / V2}#{V2_POOL}")
    np.testing.assert_array_equal(named.embed(photos[:3]), v2.embed(photos[:3]))
    classifier = embedders.create(f"tflite:{models_dir / V2}", tensor="output")
    assert classifier.dim == 1001 and classifier.spec.get("tensor") == "output"
    assert not classifier.batchable  # this file fixes the batch at 1: one invoke per image
    check_vectors(classifier.embed(photos[:2]), 2, 1001)


def test_v2_unknown_tensor_names_the_pools(models_dir):
    with pytest.raises(ValueError, match="AvgPool"):
        embedders.create(f"tflite:{models_dir / V2}#no/such/tensor")
    with pytest.raises(ValueError, match="not computed"):
        embedders.create(f"tflite:{models_dir / V2}#input")


def test_v1_uses_the_model_output_and_batches(v1, models_dir, photos):
    assert v1.dim == 1024 and v1.batchable and v1.spec.get("tensor") == "output"
    batched = v1.embed(photos)
    check_vectors(batched, len(photos), 1024)
    one_by_one = embedders.create(f"tflite:{models_dir / V1}", max_batch=1).embed(photos)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_side_by_side_interpreters_give_the_same_vectors(v2, models_dir, photos, tmp_path):
    from hashtag import ingest
    from hashtag.fetch import Fetcher
    from hashtag.posts import Post

    pair = embedders.create(f"tflite:{models_dir / V2}", interpreters=2, num_threads=2)
    assert pair.lanes == 2 and v2.lanes == 1
    np.testing.assert_array_equal(pair.embed(photos[:5]), v2.embed(photos[:5]))
    # Two callers at once, each on its own interpreter, through ingest's embedding lanes.
    posts = []
    for i, photo in enumerate(photos):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
        posts.append(Post(str(i), str(tmp_path / f"{i}.jpg"), ()))
    lanes = ingest.embed_posts(posts, pair, Fetcher(), threads=2, batch_size=2)
    single = ingest.embed_posts(posts, v2, Fetcher(), threads=2, batch_size=2)
    assert [p.id for p in lanes.posts] == [p.id for p in posts]
    np.testing.assert_array_equal(lanes.embeddings, single.embeddings)


@pytest.mark.parametrize("which", ["v2", "v1"])
def test_tflite_is_deterministic_and_rebuilds_from_its_spec(which, request, photos):
    embedder = request.getfixturevalue(which)
    first = embedder.embed(photos[:4])
    np.testing.assert_array_equal(first, embedder.embed(photos[:4]))
    rebuilt = embedders.create_from_spec(embedder.spec)
    np.testing.assert_array_equal(first, rebuilt.embed(photos[:4]))


@pytest.mark.parametrize("which", ["v2", "v1"])
def test_an_edited_copy_is_nearer_than_any_other_photo(which, request, photos):
    embedder = request.getfixturevalue(which)
    originals = embedder.embed(photos)
    copies = embedder.embed([edited(p) for p in photos])
    similarity = copies @ originals.T  # (copy i, original j)
    assert (similarity.argmax(axis=1) == np.arange(len(photos))).all(), similarity.round(2)
    assert np.diag(similarity).min() > 0.8


@pytest.mark.parametrize("which", ["v2", "v1"])
def test_uint8_models_run_as_int8_close_to_the_model_as_stored(which, request, models_dir, photos):
    fast = request.getfixturevalue(which)
    stored = embedders.create(fast.spec.name, int8=False)
    assert fast.int8 and fast.spec.get("int8") is True and stored.spec.get("int8") is False
    assert fast.input_dtype == np.int8 and stored.input_dtype == np.uint8
    a, b = fast.embed(photos), stored.embed(photos)
    assert (a * b).sum(axis=1).min() > 0.99  # per photo cosine similarity
    # Photo-to-photo similarities, what nearest neighbours rank by, barely move.
    assert np.abs(a @ a.T - b @ b.T).max() < 0.03
    assert embedders.create_from_spec(stored.spec).int8 is False


def test_requantize_leaves_float_models_alone(float_classifier):
    assert cnn._requantize_int8(open(float_classifier, "rb").read()) is None
    assert embedders.create(f"tflite:{float_classifier}").spec.get("int8") is False


def test_requantized_weights_are_exact_where_they_fit(models_dir):
    """A weight channel whose uint8 steps lie within 127 of the zero point keeps them exactly."""
    from tensorflow.lite.tools import flatbuffer_utils

    data = (models_dir / V2).read_bytes()
    before = flatbuffer_utils.convert_bytearray_to_object(bytearray(data)).subgraphs[0]
    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(cnn._requantize_int8(data)))
    graph = flat.subgraphs[0]
    conv = graph.operators[0]  # the first convolution: OHWI weights, per-tensor uint8
    old, new = before.tensors[conv.inputs[1]], graph.tensors[conv.inputs[1]]
    old_q = np.asarray(flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
                       .buffers[old.buffer].data, np.uint8).reshape(old.shape)  # fmt: skip
    new_q = np.asarray(flat.buffers[new.buffer].data, np.uint8).view(np.int8).reshape(new.shape)
    steps = old_q.astype(int) - old.quantization.zeroPoint[0]
    fits = np.abs(steps).reshape(len(steps), -1).max(axis=1) <= 127
    assert fits.any()
    np.testing.assert_array_equal(new_q[fits], steps[fits])
    np.testing.assert_allclose(new.quantization.scale[fits], old.quantization.scale[0])
    assert (np.asarray(new.quantization.zeroPoint) == 0).all()


def test_a_changed_model_file_is_refused(v1, models_dir, tmp_path):
    spec = dict(v1.spec.to_json(), sha256="0" * 64)
    with pytest.raises(ValueError, match="changed"):
        embedders.create_from_spec(spec)


def test_tflite_model_from_s3(v1, models_dir, s3_bucket, photos):
    uri = f"{s3_bucket}/models/v1.tflite"
    storage.upload(str(models_dir / V1), uri)
    remote = embedders.create(f"tflite:{uri}")
    assert remote.spec.name == f"tflite:{uri}" and remote.spec.get("sha256") == v1.spec.get(
        "sha256"
    )
    np.testing.assert_array_equal(remote.embed(photos[:3]), v1.embed(photos[:3]))


def test_missing_model_file_says_which_and_how(tmp_path, s3_bucket):
    missing = tmp_path / "nope.tflite"
    with pytest.raises(FileNotFoundError, match="nope.tflite.*local path or s3://"):
        embedders.create(f"tflite:{missing}")
    with pytest.raises(FileNotFoundError, match="absent.tflite"):
        embedders.create(f"tflite:{s3_bucket}/absent.tflite")
    with pytest.raises(ValueError, match="needs a model file"):
        embedders.create("tflite")


def test_corrupt_model_file_is_refused(tmp_path, models_dir):
    noise = tmp_path / "noise.tflite"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a TensorFlow Lite model"):
        embedders.create(f"tflite:{noise}")
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes((models_dir / V1).read_bytes()[:4000])
    with pytest.raises(ValueError, match="could not load TFLite model"):
        embedders.create(f"tflite:{truncated}")


def test_unknown_option_is_refused(models_dir):
    with pytest.raises(ValueError, match="num_threads"):
        embedders.create(f"tflite:{models_dir / V1}", threads=2)


def tiny_float_model(folder, head: int, softmax: bool) -> str:
    """A small float TFLite model with a dynamic batch: conv, global mean, dense head."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(head, activation="softmax" if softmax else None)(x)
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs))
    path = folder / f"tiny-{head}.tflite"
    path.write_bytes(converter.convert())
    return str(path)


@pytest.fixture(scope="module")
def float_classifier(tmp_path_factory) -> str:
    return tiny_float_model(tmp_path_factory.mktemp("float"), 1000, softmax=True)


def test_an_embedding_head_is_kept_as_the_output(tmp_path):
    model = tiny_float_model(tmp_path, 16, softmax=False)
    embedder = embedders.create(f"tflite:{model}")
    assert embedder.dim == 16 and embedder.spec.get("tensor") == "output"


def test_float_model_auto_pool_batches_and_input_range(float_classifier, photos):
    embedder = embedders.create(f"tflite:{float_classifier}", max_batch=4)
    assert embedder.dim == 8 and embedder.batchable
    assert embedder.spec.get("input_range") == (-1.0, 1.0)
    x = embedder.preprocess(photos[0])
    assert x.dtype == np.float32 and x.shape == (32, 32, 3) and -1 <= x.min() < x.max() <= 1
    vectors = embedder.embed(photos)  # 10 images: chunks of 4, 4, 2
    check_vectors(vectors, len(photos), 8)
    single = embedders.create(f"tflite:{float_classifier}", max_batch=1).embed(photos)
    np.testing.assert_allclose(vectors, single, atol=1e-5)
    unit = embedders.create(f"tflite:{float_classifier}", input_range=(0, 1))
    assert 0 <= unit.preprocess(photos[0]).min()


# --------------------------------------------------------------------------------------------
# Keras backbones (random weights: Keras cannot download ImageNet weights here)


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    """Ten synthetic RGB pictures of several sizes: random-weight Keras tests need no real
    photo, so they run (and fail) whether ../shared is there or not."""
    rng = np.random.default_rng(7)
    shapes = [(350, 525), (240, 240), (500, 300), (120, 160), (224, 224)] * 2
    out = []
    for n, (h, w) in enumerate(shapes):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * (n + 1)) % 256, (y * (n + 2)) % 256, (x + y) % 256], axis=-1)
        noise = rng.integers(0, 40, (h, w, 3))
        out.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def keras_small():
    return embedders.create("keras:mobilenet_v3_small", weights=None)


@pytest.fixture(scope="module")
def keras_vgg():
    return embedders.create("keras:vgg19_block3", weights="none")


def same_weights(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


@pytest.mark.parametrize(
    ("which", "dim", "size"), [("keras_small", 576, 224), ("keras_vgg", 256, 64)]
)
def test_keras_shapes_and_determinism(which, dim, size, request, pictures):
    embedder = request.getfixturevalue(which)
    assert embedder.dim == dim and embedder.min_side == size
    assert embedder.preprocess(pictures[0]).shape == (size, size, 3)
    vectors = embedder.embed(pictures[:5])
    check_vectors(vectors, 5, dim)
    np.testing.assert_array_equal(vectors, embedder.embed(pictures[:5]))
    rebuilt = embedders.create_from_spec(embedder.spec)  # same seed: the same random weights
    assert same_weights(rebuilt.model, embedder.model)


def test_keras_batches_match_single_images(keras_vgg, pictures):
    together = keras_vgg.embed(pictures[:7])
    keras_vgg.config = dataclasses.replace(keras_vgg.config, batch_size=3)
    try:
        in_threes = keras_vgg.embed(pictures[:7])
    finally:
        keras_vgg.config = dataclasses.replace(keras_vgg.config, batch_size=64)
    alone = np.concatenate([keras_vgg.embed([p]) for p in pictures[:3]])
    np.testing.assert_allclose(in_threes, together, atol=1e-5)
    np.testing.assert_allclose(alone, together[:3], atol=1e-5)


def test_vgg19_block3_unpooled_is_the_original_65536_vector(pictures):
    embedder = embedders.create("keras:vgg19_block3", weights=None, pooled=False)
    assert embedder.spec.get("pooled") is False
    check_vectors(embedder.embed(pictures[:2]), 2, 16 * 16 * 256)


@pytest.mark.slow
def test_efficientnet_b0_builds(pictures):
    embedder = embedders.create("keras:efficientnet_b0", weights=None)
    check_vectors(embedder.embed(pictures[:2]), 2, 1280)


@pytest.mark.parametrize("which", ["keras_small", "keras_vgg"])
def test_keras_weights_round_trip_through_s3(which, request, s3_bucket, pictures):
    trained = request.getfixturevalue(which)
    name = trained.config.name
    uri = f"{s3_bucket}/weights/{name}.weights.h5"
    trained.save_weights(uri)
    loaded = embedders.create(f"keras:{name}", weights=uri)
    assert loaded.spec.get("weights") == uri and loaded.spec.get("seed") is None
    np.testing.assert_array_equal(loaded.embed(pictures[:3]), trained.embed(pictures[:3]))
    other_seed = embedders.create(f"keras:{name}", weights=None, seed=8)
    assert not same_weights(other_seed.model, trained.model)


def test_keras_missing_or_wrong_weights_file(tmp_path, keras_small):
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        embedders.create("keras:mobilenet_v3_small", weights=str(tmp_path / "missing.weights.h5"))
    vgg_weights = str(tmp_path / "vgg.weights.h5")
    embedders.create("keras:vgg19_block3", weights=None).save_weights(vgg_weights)
    with pytest.raises(ValueError, match="could not load Keras weights"):
        embedders.create("keras:mobilenet_v3_small", weights=vgg_weights)


def test_keras_imagenet_offline_says_how_to_pass_a_file(tmp_path, monkeypatch):
    import keras.src.backend.config as keras_config

    # An empty Keras cache, and a proxy that refuses connections: the download fails fast
    # whether or not this machine has internet.
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(RuntimeError, match=r"weights='/path/to.weights.h5'.*s3://"):
        embedders.create("keras:mobilenet_v3_small")


def test_keras_bad_names_and_options():
    with pytest.raises(ValueError, match="mobilenet_v3_small"):
        embedders.create("keras:alexnet")
    with pytest.raises(ValueError, match="valid"):
        embedders.create("keras:mobilenet_v3_small", weights=None, colour="blue")
    with pytest.raises(ValueError, match="device"):
        embedders.create("keras:mobilenet_v3_small", weights=None, device="tpu")


def test_cpu_count_respects_affinity():
    assert 1 <= cnn.available_cpus() <= (os.cpu_count() or 1)


def test_a_tflite_embedder_is_quiet_on_stderr_unless_debug(models_dir, tmp_path):
    """TensorFlow's and TF Lite's C++ start-up lines (absl, oneDNN, cuda, XNNPACK) reach the
    process's stderr only with debug logging on (`-v`): a fresh process embeds one photo."""
    import subprocess
    import sys

    script = (
        "import logging, sys, numpy as np\n"
        "from hashtag import embedders\n"
        "if sys.argv[2] == 'debug': logging.getLogger('hashtag').setLevel(logging.DEBUG)\n"
        "e = embedders.create('tflite:' + sys.argv[1])\n"
        "print(e.embed([np.zeros((50, 60, 3), np.uint8)]).shape)\n"
    )
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", script, str(models_dir / V1), mode],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": ""},
        )  # fmt: skip
        for mode in ("quiet", "debug")
    }
    assert runs["quiet"].returncode == 0 and runs["quiet"].stdout.strip() == "(1, 1024)"
    assert runs["quiet"].stderr == ""
    assert "XNNPACK" in runs["debug"].stderr
