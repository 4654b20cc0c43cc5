"""Pretrained weights shipped inside the package (hashtag/weights/), by name, checked on load.

    pretrained.resolve("mobilenet_v2")   # Shipped(name, file, sha256, size, ...); .path: the file
    pretrained.read("mobilenet_v2")      # its bytes, refused unless size and sha256 match

The two ImageNet models of google-coral/test_data (commit 104342d, Apache-2.0: weights/NOTICE
and weights/LICENSE) travel with the code: in the wheel and the cluster image (package data),
and in a `ray job submit --working-dir .` upload (infra/runtime_env.yaml keeps hashtag/weights).
Nothing is downloaded. Their checksums live here, in code, so a damaged or swapped file is
refused whatever else in the folder changed with it.

The registry (embedders.py) knows each name as an embedder (`--embedder mobilenet_v2`), and
`default` as DEFAULT, the two side by side: the configuration README's quality figures measure.
A spec records the name and the file's sha256, never the install path, so shards, datasets and
models made on one machine are read on another; weights of another release are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from hashtag.errors import UserError

# The folder of the shipped files (a module attribute: tests point it at a damaged copy).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Shipped:
    """One shipped model file: its registry name, file name under WEIGHTS_DIR, checksum, size,
    and how the embedder reads it (the embedding tensor, its width)."""

    name: str
    file: str
    sha256: str
    size: int
    tensor: str  # the embedding tensor; "output": the model's own output
    dim: int

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


SHIPPED = {
    s.name: s
    for s in (
        Shipped(
            "mobilenet_v2",
            "mobilenet_v2_1.0_224_quant.tflite",
            "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
            3_610_798,
            "MobilenetV2/Logits/AvgPool",
            1280,
        ),
        Shipped(
            "mobilenet_v1",
            "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite",
            "f409ef4f73fcbb9667841965623c5c8524aac33d41b9bf5f3667161fb4a76319",
            3_251_736,
            "output",
            1024,
        ),
    )
}
# The default embedder: both, side by side (MobileNetV2's pooled 1280-D + MobileNetV1's 1024-D).
DEFAULT = ("mobilenet_v2", "mobilenet_v1")


def resolve(name: str) -> Shipped:
    """The shipped file a registry name stands for: path and expected sha256 (no I/O)."""
    try:
        return SHIPPED[name]
    except (KeyError, TypeError):
        raise UserError(
            f"{name!r} is not a model shipped with hashtag; shipped: {', '.join(SHIPPED)}"
        ) from None


def read(name: str) -> bytes:
    """The shipped file's bytes, after checking its size and sha256 against this module's."""
    shipped = resolve(name)
    path = shipped.path
    try:
        with open(path, "rb") as file:
            data = file.read(shipped.size + 1)  # never more than one byte past the known size
    except OSError as err:
        raise UserError(
            f"the weights of {name!r} are missing from this installation ({path}: "
            f"{type(err).__name__}): hashtag/weights/ must come with the package; reinstall it "
            f"(pip install --force-reinstall hashtag), or on a cluster use the project's image or "
            f"`ray job submit --working-dir . --runtime-env infra/runtime_env.yaml`"
        ) from err
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != shipped.size or digest != shipped.sha256:
        raise UserError(
            f"the shipped weights file {path} is damaged: sha256 {digest} ({len(data)} bytes"
            f"{'+' if len(data) > shipped.size else ''}), expected {shipped.sha256} "
            f"({shipped.size} bytes); refusing to load it. Reinstall hashtag (pip install "
            f"--force-reinstall hashtag) or restore the file from the repository"
        )
    return data
