"""Image embedders, created by name from a registry: `create("classic")`, `create("tflite:m.tflite")`.

An embedder turns decoded RGB uint8 images into L2-normalised float32 vectors. It is split in
two steps so that the cheap per-image work (resize, colour conversion) can run on other cores
while the model runs on a batch:

    x = embedder.preprocess(rgb)            # one image -> model input, pure numpy/OpenCV
    vectors = embedder.embed_batch(stack)   # (n, ...) -> (n, dim) float32

`embedder.spec` is a JSON-serialisable description ({"name": ..., settings...}) recorded in every
shard manifest and exported model; `create_from_spec(spec)` rebuilds the same embedder.
`cached(name, **options)` returns one instance per process, so a Ray worker loads a model once
and reuses it across shards.

Names: "classic" (this module, no weights); "tflite:PATH_OR_URI[#tensor]" and "keras:NAME"
(hashtag/cnn.py, imported on first use so that `classic` never imports TensorFlow).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

_FACTORIES: dict[str, Callable[..., Embedder]] = {}
# Registry prefixes whose factories live in modules imported on first use.
_LAZY_MODULES = {"tflite": "hashtag.cnn", "keras": "hashtag.cnn"}


class Embedder:
    """Base class. Subclasses set `spec`, `dim` and implement preprocess / embed_batch."""

    spec: dict[str, Any]
    dim: int

    @property
    def name(self) -> str:
        return self.spec["name"]

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def lanes(self) -> int:
        """How many embed_batch calls may run at once (threads of the caller, each on its own
        copy of the model); 1: one at a time."""
        return 1

    @property
    def min_side(self) -> int | None:
        """Shorter side the preprocessing needs; decoders may shrink larger images to it."""
        return None

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_batch(np.stack([self.preprocess(image) for image in images]))


def register(prefix: str) -> Callable:
    """Decorator: `@register("classic")` on a factory `f(arg: str | None, **options)`."""

    def decorator(factory: Callable[..., Embedder]) -> Callable[..., Embedder]:
        _FACTORIES[prefix] = factory
        return factory

    return decorator


def available() -> list[str]:
    return sorted(set(_FACTORIES) | set(_LAZY_MODULES))


def create(name: str, **options: Any) -> Embedder:
    """Create an embedder by name: "classic", "tflite:PATH_OR_URI[#tensor]", "keras:NAME"."""
    prefix, _, arg = name.partition(":")
    if prefix not in _FACTORIES and prefix in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[prefix])
    if prefix not in _FACTORIES:
        raise ValueError(f"unknown embedder {name!r}; available: {', '.join(available())}")
    return _FACTORIES[prefix](arg or None, **options)


def create_from_spec(spec: dict[str, Any]) -> Embedder:
    """Rebuild the embedder a manifest or exported model recorded."""
    options = {k: v for k, v in spec.items() if k != "name"}
    return create(spec["name"], **options)


@functools.lru_cache(maxsize=4)
def _cached(name: str, frozen_options: tuple) -> Embedder:
    return create(name, **dict(frozen_options))


def cached(name: str, **options: Any) -> Embedder:
    """One embedder per process and settings: models load once per Ray worker."""
    return _cached(name, tuple(sorted(options.items())))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class ClassicEmbedder(Embedder):
    """Hand-made features with OpenCV and numpy: no weights, deterministic.

    Three blocks, each L2-normalised, then the whole vector:
    - colour: HSV histogram (8 hue x 4 saturation x 4 value = 128 bins) over the image, plus
      coarse hue/value histograms of the top, middle and bottom thirds (layout: sky vs ground);
    - shape: gradient-orientation histograms from Sobel (HOG-like, 9 bins on a 4x4 grid);
    - texture: a local-binary-pattern histogram (256 codes folded to 32 bins) on grey.
    """

    size = 128

    def __init__(self) -> None:
        self.spec = {"name": "classic", "version": 1}
        self.dim = 128 + 3 * (8 + 4) + 9 * 16 + 32

    @property
    def min_side(self) -> int:
        return self.size

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        return cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        return np.stack([self._features(image) for image in batch]).astype(np.float32)

    def _features(self, rgb: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        colour = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
        thirds = []
        for band in np.array_split(hsv, 3, axis=0):
            thirds.append(cv2.calcHist([band], [0], None, [8], [0, 180]).ravel())
            thirds.append(cv2.calcHist([band], [2], None, [4], [0, 256]).ravel())
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
        gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
        magnitude, angle = cv2.cartToPolar(gx, gy, angleInDegrees=True)
        bins = ((angle % 180.0) / 20.0).astype(np.int32).clip(0, 8)
        cell = self.size // 4
        shape = np.zeros((4, 4, 9), np.float32)
        for i in range(4):
            for j in range(4):
                window = (slice(i * cell, (i + 1) * cell), slice(j * cell, (j + 1) * cell))
                shape[i, j] = np.bincount(
                    bins[window].ravel(), weights=magnitude[window].ravel(), minlength=9
                )
        texture = self._lbp_histogram(grey)
        blocks = [colour, np.concatenate(thirds), shape.ravel(), texture]
        return l2_normalize(np.concatenate([l2_normalize(b) for b in blocks]))

    @staticmethod
    def _lbp_histogram(grey: np.ndarray) -> np.ndarray:
        centre = grey[1:-1, 1:-1]
        codes = np.zeros(centre.shape, np.int32)
        offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
        h, w = grey.shape
        for bit, (dy, dx) in enumerate(offsets):
            neighbour = grey[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]
            codes |= (neighbour >= centre).astype(np.int32) << bit
        return np.bincount(codes.ravel() >> 3, minlength=32).astype(np.float32)


@register("classic")
def _create_classic(arg: str | None = None, **options: Any) -> Embedder:
    if arg:
        raise ValueError("the classic embedder takes no argument: use 'classic'")
    options.pop("version", None)
    if options:
        raise ValueError(f"the classic embedder takes no options, got {sorted(options)}")
    return ClassicEmbedder()
