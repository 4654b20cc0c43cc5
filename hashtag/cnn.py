"""Pretrained CNN embedders: "tflite:PATH_OR_URI[#tensor]", "keras:NAME", and the models shipped
in the package by name ("mobilenet_v2", "mobilenet_v1": TFLite files of hashtag/weights/, see
pretrained.py), which the default embedder puts side by side.

Both follow the Embedder contract of embedders.py: `preprocess(rgb)` (shorter side resized to
the model's input size, centre crop, linear below 2x shrink, else area; cheap, runs on decode threads) then
`embed_batch(batch)` -> L2-normalised float32 (n, dim).

TFLite: any image model, float or quantised. The embedding is the model's output, or an
internal tensor: named (`tflite:m.tflite#MobilenetV2/Logits/AvgPool`), or found automatically
when the model ends in a classifier (the last global AVERAGE_POOL_2D / MEAN before it). The
tensor is exposed by rewriting the flatbuffer in memory: it becomes the only output and the
operators after it are dropped. Quantised outputs are dequantised (scale, zero point). Batches
go through one invoke when the model accepts them (probed), else one image per invoke;
`num_threads` defaults to the CPUs this process may use (pass a Ray task's CPUs), and
`interpreters=k` keeps k interpreters (num_threads split between them) so that k callers can
embed batches at once (`embedder.lanes`; ingest runs that many embedding threads): k
single-threaded interpreters beat one k-threaded one when decoding shares the cores, as their
threads never wait on each other. Input conventions:
uint8 models get the raw pixels (their input quantisation does the normalising), int8 models
the pixels minus 128, float models the pixels scaled to `input_range` ([-1, 1] by default, as
MobileNets expect; pass input_range=(0, 1) or (0, 255) for other models).

Keras: tf.keras.applications backbones, global-average pooled, with each application's own
preprocess_input. `weights` is "imagenet" (downloaded by Keras, needs internet), a local file
or s3:// URI of a weights file (`embedder.save_weights(uri)` writes one), or None (random init
from `seed`, for tests and baselines).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import queue
import random
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from hashtag import pretrained, storage, tfimport
from hashtag.embedders import Embedder, EmbedderSpec, register
from hashtag.errors import UserError
from hashtag.metrics import l2_normalize

# flatbuffer BuiltinOperator codes (tensorflow/lite/schema/schema.fbs)
_ADD, _AVERAGE_POOL_2D, _CONCATENATION, _CONV_2D, _DEPTHWISE_CONV_2D = 0, 1, 2, 3, 4
_FULLY_CONNECTED, _MAX_POOL_2D, _RESHAPE, _SOFTMAX, _MEAN, _SQUEEZE = 9, 17, 22, 25, 40, 43
_UINT8, _INT8 = 3, 9  # flatbuffer TensorType codes
# Operators whose int8 kernels take any zero point, and the operator version that declares int8
# (per-channel for the convolutions): the ones requantize_int8 may rewrite.
_INT8_VERSIONS = {
    _ADD: 2, _AVERAGE_POOL_2D: 2, _CONCATENATION: 2, _CONV_2D: 3, _DEPTHWISE_CONV_2D: 3,
    _FULLY_CONNECTED: 4, _MAX_POOL_2D: 2, _RESHAPE: 1, _SOFTMAX: 2, _MEAN: 2, _SQUEEZE: 1,
}  # fmt: skip
# Below this cosine similarity to the uint8 model's embedding, the int8 rewrite is not used.
_INT8_MIN_COSINE = 0.98
# An output this wide is a classifier's (ImageNet: 1000 or 1001 classes).
_CLASSIFIER_MIN_CLASSES = 900


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset / Ray's affinity), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resize_and_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Shorter side scaled to the target, centre crop: RGB uint8 (height, width, 3).

    Crops in source coordinates first, then one resize: same result as resize-then-crop up to
    rounding, with fewer pixels to resample.
    """
    rgb = as_rgb(rgb)
    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    crop_h = min(h, max(1, round(height / scale)))
    crop_w = min(w, max(1, round(width / scale)))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = rgb[top : top + crop_h, left : left + crop_w]
    if crop.shape[:2] == (height, width):
        return np.ascontiguousarray(crop)
    # INTER_AREA averages every source pixel (no aliasing) but costs ~5x INTER_LINEAR at
    # non-integer ratios; below 2x shrink (what a reduced JPEG decode leaves) linear samples
    # every pixel anyway.
    interpolation = cv2.INTER_AREA if scale <= 0.5 else cv2.INTER_LINEAR
    return cv2.resize(crop, (width, height), interpolation=interpolation)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate a decoded image: uint8 HxWx3 (grey and RGBA are converted)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}: decode with hashtag.images")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    return image


def _check_options(kind: str, options: dict[str, Any], allowed: type) -> None:
    names = {f for f in allowed.__dataclass_fields__ if f not in ("name", "uri")}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {kind}; valid: {sorted(names)}")


# --------------------------------------------------------------------------------------------
# TensorFlow Lite


@dataclass(frozen=True)
class TFLiteConfig:
    uri: str = field(metadata={"help": "local path or s3:// URI of a .tflite image model"})
    tensor: str | None = field(
        default=None,
        metadata={
            "help": "embedding tensor name; None: auto (pool before a classifier, else "
            "the output); 'output': the model's output"
        },
    )
    input_range: tuple[float, float] = field(
        default=(-1.0, 1.0), metadata={"help": "pixel range fed to float models"}
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "interpreter threads; None: the CPUs this process has"}
    )
    interpreters: int = field(
        default=1,
        metadata={
            "help": "interpreters side by side, num_threads split between them: up to this "
            "many embed_batch calls run at once (ingest runs one embedding thread per interpreter)"
        },
    )
    max_batch: int = field(default=64, metadata={"help": "images per invoke when batchable"})
    int8: bool = field(
        default=True,
        metadata={
            "help": "run uint8-quantised models as int8 (weights requantised symmetric per "
            "channel): XNNPACK's int8 kernels are ~2x faster; embeddings differ by < 2%"
        },
    )
    sha256: str | None = field(
        default=None, metadata={"help": "expected hash of the model file (from a spec)"}
    )

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError(
                "tflite needs a model file: 'tflite:/path/model.tflite' or 'tflite:s3://bucket/m.tflite'"
            )
        low, high = (float(v) for v in self.input_range)
        if not high > low:
            raise ValueError(
                f"input_range must be (low, high) with high > low, got {self.input_range}"
            )
        object.__setattr__(self, "input_range", (low, high))
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if self.interpreters < 1:
            raise ValueError(f"interpreters must be >= 1, got {self.interpreters}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


def read_model_bytes(uri: str, what: str = "TFLite model") -> bytes:
    """The bytes at `uri`, with an error that says which file is missing and how to pass one."""
    from hashtag.embedders import MAX_WEIGHTS_BYTES

    try:
        return storage.read_bytes(uri, limit=MAX_WEIGHTS_BYTES)
    except storage.TooLarge:
        raise ValueError(
            f"{what} {storage.redact(uri)!r} is over {MAX_WEIGHTS_BYTES} bytes: refused"
        ) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise FileNotFoundError(
            f"{what} not found: {uri!r} ({type(err).__name__}). Pass an existing local path or "
            f"s3:// URI, e.g. 'tflite:/models/mobilenet_v2.tflite' or "
            f"'tflite:s3://bucket/models/mobilenet_v2.tflite' (set AWS_ENDPOINT_URL or "
            f"--s3-endpoint for a non-AWS endpoint)"
        ) from err


def _is_tflite(data: bytes) -> bool:
    # A flatbuffer starts with a uint32 root offset, then the 4-byte file identifier.
    return len(data) >= 8 and data[4:8] == b"TFL3"


def _new_interpreter(model: bytes, num_threads: int):
    """LiteRT's interpreter when installed, else TensorFlow's (deprecated, same runtime)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tfimport.tensorflow().lite.Interpreter
    with warnings.catch_warnings(), tfimport.quiet_native():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_content=model, num_threads=num_threads)


def _flatbuffer_utils():
    """TFLite's flatbuffer reader; TensorFlow imported through tfimport first, quietly (the
    submodule's own import would start TensorFlow with its C++ start-up lines on stderr)."""
    tfimport.tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils


def _expose_tensor(model: bytes, tensor: str | None) -> tuple[bytes, str | None]:
    """Rewrite the model's output list so that the embedding tensor is the output, and drop the
    operators after it.

    Returns the model bytes (unchanged when the embedding is the output) and the tensor name
    (None when the model's own output is used).
    """
    flatbuffer_utils = _flatbuffer_utils()
    if tensor == "output":
        return model, None
    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    graph = flat.subgraphs[0]
    names = [t.name.decode("utf-8", "replace") if t.name else "" for t in graph.tensors]
    if tensor is None:
        tensor = _find_pool_before_classifier(flat, names)
        if tensor is None:
            return model, None
    if tensor not in names:
        pools = [n for n in names if "pool" in n.lower() or "mean" in n.lower()]
        raise ValueError(
            f"tensor {tensor!r} is not in the model; tensors that look like pools: "
            f"{pools[:10] or 'none'}. Use 'tflite:FILE#TENSOR_NAME', or '#output' for the output"
        )
    index = names.index(tensor)
    if list(graph.outputs) == [index]:
        return model, tensor
    producers = [i for i, op in enumerate(graph.operators) if index in list(op.outputs)]
    if not producers:
        raise ValueError(f"tensor {tensor!r} is not computed by the model (an input or constant)")
    graph.outputs = np.array([index], np.int32)
    # Operators are stored in execution order, so nothing after the producer feeds the new
    # output: dropping the head saves its work and often lifts a batch size fixed by its
    # reshapes (MobileNetV2's classifier squeeze refuses batches > 1; its pool does not).
    graph.operators = graph.operators[: producers[0] + 1]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(flat)), tensor


def _find_pool_before_classifier(flat: Any, names: list[str]) -> str | None:
    """The last global-pool tensor when a classifier follows it, else None (use the output).

    A classifier: a learned layer (fully connected or 1x1 conv) after the pool, and a softmax at
    the end or ~1000 outputs. A model whose head is a small learned projection (an embedding
    model) keeps its output.
    """
    graph = flat.subgraphs[0]
    ops = [flat.operatorCodes[op.opcodeIndex] for op in graph.operators]
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in ops]
    pool = None
    for position in range(len(codes) - 1, -1, -1):
        shape = list(graph.tensors[graph.operators[position].outputs[0]].shape)
        is_global = len(shape) == 2 or (len(shape) == 4 and shape[1] == shape[2] == 1)
        if codes[position] in (_AVERAGE_POOL_2D, _MEAN) and is_global:
            pool = position
            break
    if pool is None or not {_FULLY_CONNECTED, _CONV_2D} & set(codes[pool + 1 :]):
        return None
    output = graph.tensors[graph.outputs[0]]
    width = int(np.prod(output.shape[1:]))
    if _SOFTMAX not in codes[pool + 1 :] and width < _CLASSIFIER_MIN_CLASSES:
        return None
    return names[graph.operators[pool].outputs[0]]


def _requantize_int8(model: bytes) -> bytes | None:
    """The uint8-quantised `model` rewritten as an int8 one, or None when it is not uint8 or has
    an operator outside _INT8_VERSIONS.

    Same arithmetic, shifted: every uint8 tensor becomes int8 with its zero point minus 128 (and
    constant data XOR 0x80). Only the weights may change values: int8 kernels need symmetric
    weights (zero point 0), so a convolution's weights become `q - zero_point` per output
    channel, exact where they fit in [-127, 127] and rescaled where they do not, and its int32
    bias is rescaled to match. XNNPACK has VNNI/AVX-512 kernels for signed int8 and slower ones for uint8.
    """
    flatbuffer_utils = _flatbuffer_utils()
    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    graph = flat.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in flat.operatorCodes]
    if not any(t.type == _UINT8 for t in graph.tensors) or not all(
        codes[op.opcodeIndex] in _INT8_VERSIONS for op in graph.operators
    ):
        return None
    tensors = graph.tensors

    def data(index: int) -> np.ndarray:
        return np.asarray(flat.buffers[tensors[index].buffer].data, np.uint8)

    for op in graph.operators:
        code = codes[op.opcodeIndex]
        if code not in (_CONV_2D, _DEPTHWISE_CONV_2D, _FULLY_CONNECTED):
            continue
        inputs = list(op.inputs)
        weights = tensors[inputs[1]]
        quant = weights.quantization
        if weights.type != _UINT8 or len(quant.scale) != 1:
            return None
        # Output channels: first axis (OHWI, FC's OI), last for depthwise (1HWO); FC's int8
        # kernel takes one scale only.
        axis = {_CONV_2D: 0, _DEPTHWISE_CONV_2D: 3, _FULLY_CONNECTED: None}[code]
        steps = data(inputs[1]).reshape(weights.shape).astype(np.int32) - quant.zeroPoint[0]
        reduce = tuple(i for i in range(steps.ndim) if i != axis)
        peak = np.abs(steps).max(axis=reduce, keepdims=True)
        # A channel whose steps fit in [-127, 127] keeps them and the scale: exact. Wider ones
        # (a zero point far from 128) are rescaled to span [-127, 127].
        stretch = np.maximum(peak, 127) / 127.0
        symmetric = np.round(steps / stretch).astype(np.int8)
        scale = quant.scale[0] * stretch
        flat.buffers[weights.buffer].data = symmetric.view(np.uint8).ravel()
        weights.type = _INT8
        quant.scale = scale.ravel().astype(np.float32)
        quant.zeroPoint = np.zeros(quant.scale.size, np.int64)
        quant.quantizedDimension = axis or 0
        if len(inputs) > 2 and inputs[2] >= 0:  # bias: int32 at input scale x weight scale
            bias = tensors[inputs[2]]
            value = data(inputs[2]).view(np.int32).astype(np.float64) * bias.quantization.scale[0]
            bias_scale = tensors[inputs[0]].quantization.scale[0] * quant.scale.astype(np.float64)
            rounded = np.round(value / bias_scale).astype(np.int32)
            flat.buffers[bias.buffer].data = rounded.view(np.uint8)
            bias.quantization.scale = bias_scale.astype(np.float32)
            bias.quantization.zeroPoint = np.zeros(bias_scale.size, np.int64)
            bias.quantization.quantizedDimension = 0
    for tensor in tensors:
        if tensor.type != _UINT8:
            continue
        tensor.type = _INT8
        tensor.quantization.zeroPoint = np.asarray(tensor.quantization.zeroPoint, np.int64) - 128
        buffer = flat.buffers[tensor.buffer]
        if buffer.data is not None and len(buffer.data):
            buffer.data = np.asarray(buffer.data, np.uint8) ^ 0x80
    for code in flat.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        code.version = max(code.version, _INT8_VERSIONS[builtin])
    return bytes(flatbuffer_utils.convert_object_to_bytearray(flat))


def _agreement(model: bytes, candidate: bytes) -> float:
    """Cosine similarity of the two models' dequantised outputs on a fixed test pattern."""
    runners = [_Runner(model, 1), _Runner(candidate, 1)]
    height, width = (int(side) for side in runners[0].input["shape"][1:3])
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    noisy = ramp * np.array([1.0, 0.6, 0.3]) + rng.normal(0, 24, (height, width, 3))
    pixels = np.clip(noisy, 0, 255).astype(np.uint8)[None]
    outputs = []
    for runner in runners:
        feed = pixels if runner.input["dtype"] == np.uint8 else (pixels ^ 0x80).view(np.int8)
        raw = runner.run(feed, 1).astype(np.float64).ravel()
        scale, zero = runner.output["quantization"]
        outputs.append((raw - zero) * scale if scale else raw)
    a, b = outputs
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class _Runner:
    """One interpreter and the batch size its tensors are allocated for."""

    def __init__(self, model: bytes, num_threads: int) -> None:
        self.interpreter = _new_interpreter(model, num_threads)
        with tfimport.quiet_native():  # where TF Lite announces its XNNPACK delegate
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])

    def run(self, images: np.ndarray, step: int) -> np.ndarray:
        """Raw outputs for `images`, `step` images per invoke."""
        return np.concatenate(
            [self._invoke(images[i : i + step]) for i in range(0, len(images), step)]
        )

    def _invoke(self, chunk: np.ndarray) -> np.ndarray:
        if len(chunk) != self.batch:
            self.interpreter.resize_tensor_input(
                self.input["index"], [len(chunk), *chunk.shape[1:]]
            )
            self.interpreter.allocate_tensors()
            self.batch = len(chunk)
        self.interpreter.set_tensor(self.input["index"], np.ascontiguousarray(chunk))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()


class TFLiteEmbedder(Embedder):
    """A TensorFlow Lite image model; see the module docstring for conventions."""

    def __init__(self, config: TFLiteConfig, data: bytes | None = None) -> None:
        """`data`: the model's bytes when the caller has read them (a shipped file, checked)."""
        self.config = config
        data = read_model_bytes(config.uri) if data is None else data
        if not _is_tflite(data):
            raise ValueError(
                f"{config.uri!r} is not a TensorFlow Lite model (no 'TFL3' flatbuffer identifier, "
                f"{len(data)} bytes): pass a .tflite file (convert Keras/SavedModels with "
                f"tf.lite.TFLiteConverter)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if config.sha256 and config.sha256 != digest:
            raise ValueError(
                f"model file {config.uri!r} changed: sha256 {digest} but the spec recorded "
                f"{config.sha256}; embeddings would not match. Use the original file or re-embed"
            )
        try:
            model, tensor = _expose_tensor(data, config.tensor)
            model, self.int8 = self._maybe_int8(model) if config.int8 else (model, False)
            self.num_threads = config.num_threads or available_cpus()
            threads_each = max(1, self.num_threads // config.interpreters)
            self._runners = [_Runner(model, threads_each) for _ in range(config.interpreters)]
        except ValueError:
            raise
        except Exception as err:  # the flatbuffer parser and the runtime raise various types
            raise ValueError(
                f"could not load TFLite model {config.uri!r}: {type(err).__name__}: {err}"
            ) from err
        self._model = model
        # An interpreter is not thread-safe: each call takes a free one and gives it back.
        self._free: queue.SimpleQueue[_Runner] = queue.SimpleQueue()
        for runner in self._runners:
            self._free.put(runner)
        inp, out = self._runners[0].input, self._runners[0].output
        if len(inp["shape"]) != 4 or inp["shape"][3] != 3:
            raise ValueError(
                f"{config.uri!r} is not an RGB image model: input shape {inp['shape']}"
            )
        self.input_height, self.input_width = int(inp["shape"][1]), int(inp["shape"][2])
        self.input_dtype = np.dtype(inp["dtype"])
        self._out_scale, self._out_zero = out["quantization"]
        self.batchable = self._probe_batching()
        self.dim = int(np.prod(out["shape"][1:]))
        spec = {"tensor": tensor or "output", "sha256": digest, "dim": self.dim}
        if self.input_dtype.kind == "f":
            spec["input_range"] = list(config.input_range)
        # Whether the int8 rewrite ran: its embeddings differ slightly from the stored model's,
        # so a spec must rebuild the same one (and merge must not mix the two).
        spec["int8"] = self.int8
        self.spec = EmbedderSpec("tflite", config.uri, tuple(spec.items()))

    @staticmethod
    def _maybe_int8(model: bytes) -> tuple[bytes, bool]:
        candidate = _requantize_int8(model)
        if candidate is None:
            return model, False
        if _agreement(model, candidate) < _INT8_MIN_COSINE:
            return model, False
        return candidate, True

    @property
    def min_side(self) -> int:
        return max(self.input_height, self.input_width)

    @property
    def lanes(self) -> int:
        return len(self._runners)

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        pixels = resize_and_crop(rgb, self.input_height, self.input_width)
        if self.input_dtype == np.uint8:
            return pixels
        if self.input_dtype == np.int8:
            return (pixels ^ 0x80).view(np.int8)  # minus 128, in place of a widening copy
        low, high = self.config.input_range
        return (pixels.astype(np.float32) * ((high - low) / 255.0) + low).astype(self.input_dtype)

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, self.input_dtype)
        expected = (self.input_height, self.input_width, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"expected a batch of shape (n, {expected}), got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self.config.max_batch if self.batchable else 1
        runner = self._free.get()
        try:
            raw = runner.run(batch, step)
        finally:
            self._free.put(runner)
        raw = raw.reshape(len(batch), -1)
        if raw.dtype.kind in "iu" and self._out_scale:
            raw = (raw.astype(np.float32) - self._out_zero) * self._out_scale
        return l2_normalize(raw)

    def _probe_batching(self) -> bool:
        """Whether the model runs on batches > 1 (many converted models fix the batch at 1)."""
        if self.config.max_batch == 1:
            return False
        try:
            probe = _Runner(self._model, 1)
            pair = np.zeros((2, self.input_height, self.input_width, 3), self.input_dtype)
            return probe.run(pair, 2).shape[0] == 2
        except Exception:  # "failed to prepare", shape errors...: fall back to one at a time
            return False


@register("tflite")
def _create_tflite(arg: str | None = None, **options: Any) -> Embedder:
    if not arg:
        raise ValueError(
            "tflite needs a model file: 'tflite:/path/model.tflite[#tensor_name]' or "
            "'tflite:s3://bucket/model.tflite'"
        )
    uri, _, tensor = arg.partition("#")
    options.pop("dim", None)  # recorded in specs, derived from the model
    _check_options("tflite", options, TFLiteConfig)
    if tensor:
        if options.get("tensor") not in (None, tensor):
            raise ValueError(f"tensor given twice: '#{tensor}' and tensor={options['tensor']!r}")
        options["tensor"] = tensor
    if "input_range" in options:
        options["input_range"] = tuple(options["input_range"])
    return TFLiteEmbedder(TFLiteConfig(uri=uri, **options))


def _create_shipped(name: str, arg: str | None = None, **options: Any) -> Embedder:
    """A model shipped in hashtag/weights/ (pretrained.py): its file read and checked against
    the package's checksum, and, from a recorded spec, against the spec's too. The spec names
    the model, not the install path: shards and models move between machines."""
    if arg:
        raise ValueError(f"the {name} embedder takes no argument: use '{name}'")
    shipped = pretrained.resolve(name)
    options.pop("dim", None)  # recorded in specs, derived from the model
    recorded = options.pop("sha256", None)
    if recorded is not None and recorded != shipped.sha256:
        raise UserError(
            f"these embeddings were made with other {name} weights (sha256 {recorded}) than "
            f"the ones this hashtag ships ({shipped.sha256}): vectors of the two do not mix. "
            f"Use the hashtag release that made them, or embed again (hashtag scrape) with this one"
        )
    if options.get("tensor", shipped.tensor) != shipped.tensor:
        raise ValueError(f"{name} embeds tensor {shipped.tensor!r}, not {options['tensor']!r}")
    options["tensor"] = shipped.tensor
    _check_options(name, options, TFLiteConfig)
    config = TFLiteConfig(uri=str(shipped.path), sha256=shipped.sha256, **options)
    embedder = TFLiteEmbedder(config, data=pretrained.read(name))
    embedder.spec = EmbedderSpec(name, "", embedder.spec.options)
    return embedder


for _name in pretrained.SHIPPED:
    register(_name)(functools.partial(_create_shipped, _name))


# --------------------------------------------------------------------------------------------
# Keras applications


@dataclass(frozen=True)
class Backbone:
    constructor: str  # class in keras.applications
    module: str  # keras.applications submodule holding its preprocess_input
    size: int  # input side
    layer: str | None = None  # cut the network here (None: the backbone's last layer)


BACKBONES = {
    "mobilenet_v3_small": Backbone("MobileNetV3Small", "mobilenet_v3", 224),
    "mobilenet_v2": Backbone("MobileNetV2", "mobilenet_v2", 224),
    "efficientnet_b0": Backbone("EfficientNetB0", "efficientnet", 224),
    "resnet50": Backbone("ResNet50", "resnet50", 224),
    # The original project's features: VGG19 at 64x64, block3_conv3 (16x16x256).
    "vgg19_block3": Backbone("VGG19", "vgg19", 64, layer="block3_conv3"),
}


@dataclass(frozen=True)
class KerasConfig:
    name: str = field(metadata={"help": f"backbone: {', '.join(BACKBONES)}"})
    weights: str | None = field(
        default="imagenet",
        metadata={"help": "'imagenet' (download), a weights file path or s3:// URI, or None"},
    )
    pooled: bool = field(
        default=True, metadata={"help": "global-average pool; False: the raveled feature map"}
    )
    seed: int = field(default=0, metadata={"help": "random init seed when weights is None"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    device: str | None = field(
        default=None, metadata={"help": "'cpu', 'gpu', 'gpu:1'...; None: a GPU when present"}
    )

    def __post_init__(self) -> None:
        if self.name not in BACKBONES:
            raise ValueError(
                f"unknown Keras backbone {self.name!r}; available: {', '.join(BACKBONES)}"
            )
        if isinstance(self.weights, str) and self.weights.lower() in ("none", "null", ""):
            object.__setattr__(self, "weights", None)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device is not None and self.device.lower().split(":")[0] not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu', 'gpu' or 'gpu:N', got {self.device!r}")


@functools.lru_cache(maxsize=1)
def _gpus() -> tuple[str, ...]:
    """Visible GPUs, with memory growth on so that several workers can share one."""
    tf = tfimport.tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised: keep its setting
            tf.config.experimental.set_memory_growth(gpu, True)
    return tuple(gpu.name for gpu in gpus)


def _tf_device(device: str | None) -> str:
    gpus = _gpus()
    if device is None:
        return "/GPU:0" if gpus else "/CPU:0"
    kind, _, number = device.lower().partition(":")
    if kind == "gpu" and int(number or 0) >= len(gpus):
        raise ValueError(f"device {device!r} requested but {len(gpus)} GPU(s) visible: use 'cpu'")
    return f"/{kind.upper()}:{int(number or 0)}"


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed Keras' initialisers without leaving the global random states changed."""
    import keras

    python_state, numpy_state = random.getstate(), np.random.get_state()
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _build_backbone(name: str, backbone: Backbone, weights: str | None, seed: int):
    import keras

    constructor = getattr(keras.applications, backbone.constructor)

    def build(w):
        return constructor(include_top=False, weights=w, input_shape=(backbone.size,) * 2 + (3,))

    if weights is None:
        with _seeded(seed):
            return build(None)
    if weights == "imagenet":
        try:
            return build("imagenet")
        except Exception as err:
            raise RuntimeError(
                f"could not download the ImageNet weights of keras:{name} ({err}). Without "
                f"internet, download them on another machine (Keras caches them under "
                f"~/.keras/models), or save them with embedder.save_weights(uri), and pass the "
                f"file: create('keras:{name}', weights='/path/to.weights.h5') or "
                f"weights='s3://bucket/to.weights.h5'"
            ) from err
    model = build(None)
    read_model_bytes(weights, what="Keras weights file")  # a clear error when it is missing
    with storage.local_file(weights) as path:
        try:
            model.load_weights(path)
        except Exception as err:
            raise ValueError(
                f"could not load Keras weights {weights!r} into keras:{name}: {err}. The file "
                f"must hold the weights of {backbone.constructor}(include_top=False) with input "
                f"{backbone.size}x{backbone.size}, as embedder.save_weights(uri) writes them"
            ) from err
    return model


class KerasEmbedder(Embedder):
    """A keras.applications backbone, optionally cut at an inner layer, pooled."""

    def __init__(self, config: KerasConfig) -> None:
        tf = tfimport.tensorflow()
        import keras

        self.config = config
        self.backbone_info = backbone = BACKBONES[config.name]
        self._device = _tf_device(config.device)
        with tf.device(self._device):
            self.backbone = _build_backbone(config.name, backbone, config.weights, config.seed)
            features = (
                self.backbone.get_layer(backbone.layer).output
                if backbone.layer
                else self.backbone.output
            )
            if config.pooled:
                features = keras.layers.GlobalAveragePooling2D()(features)
            else:
                features = keras.layers.Flatten()(features)
            self.model = keras.Model(self.backbone.input, features)
        self.preprocess_input = getattr(keras.applications, backbone.module).preprocess_input
        # One graph traced for any batch size: several times faster than eager calls, and
        # the last, smaller batch of a shard does not trigger a new trace.
        size = backbone.size
        self._forward = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
        )
        self.dim = int(np.prod(self.model.output.shape[1:]))
        spec = {"weights": config.weights, "pooled": config.pooled, "dim": self.dim}
        if config.weights is None:
            spec["seed"] = config.seed
        self.spec = EmbedderSpec("keras", config.name, tuple(spec.items()))

    @property
    def min_side(self) -> int:
        return self.backbone_info.size

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        size = self.backbone_info.size
        return resize_and_crop(rgb, size, size)

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        tf = tfimport.tensorflow()

        batch = np.asarray(batch)
        size = self.backbone_info.size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(f"expected a batch of shape (n, {size}, {size}, 3), got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self.config.batch_size
        parts = []
        with tf.device(self._device):
            for i in range(0, len(batch), step):
                x = self.preprocess_input(batch[i : i + step].astype(np.float32))
                parts.append(np.asarray(self._forward(tf.constant(x))))
        return l2_normalize(np.concatenate(parts).reshape(len(batch), -1))

    def save_weights(self, uri: str) -> None:
        """Write the backbone's weights (a .weights.h5 file) to a local path or s3:// URI."""
        if not uri.endswith(".weights.h5"):
            raise ValueError(f"Keras weights files end in '.weights.h5', got {uri!r}")
        with tempfile.TemporaryDirectory(prefix="hashtag-") as tmp:
            local = os.path.join(tmp, "backbone.weights.h5")
            self.backbone.save_weights(local)
            storage.upload(local, uri)


@register("keras")
def _create_keras(arg: str | None = None, **options: Any) -> Embedder:
    if not arg:
        raise ValueError(
            f"keras needs a backbone name: 'keras:NAME' with NAME in {list(BACKBONES)}"
        )
    options.pop("dim", None)  # recorded in specs, derived from the model
    _check_options("keras", options, KerasConfig)
    return KerasEmbedder(KerasConfig(name=arg, **options))
