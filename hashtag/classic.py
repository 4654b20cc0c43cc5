"""The classic embedder: hand-made colour, shape and texture features with OpenCV and numpy; no
weights, fast, deterministic. Registered as "classic" in embedders.py's registry, which imports
this module on first use (so that the embedder specs and the models never import OpenCV).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from hashtag.embedders import Embedder, EmbedderSpec, register
from hashtag.metrics import l2_normalize


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
        self.spec = EmbedderSpec("classic", options=(("version", 1),))
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
