"""Image embedders, created by name from a registry: `create("default")`, `create("classic")`,
`create("tflite:m.tflite")`.

An embedder turns decoded RGB uint8 images into L2-normalised float32 vectors. It is split in
two steps so that the cheap per-image work (resize, colour conversion) can run on other cores
while the model runs on a batch:

    x = embedder.preprocess(rgb)            # one image -> model input, pure numpy/OpenCV
    vectors = embedder.embed_batch(stack)   # (n, ...) -> (n, dim) float32

`embedder.spec` is an `EmbedderSpec`, the one typed value of an embedder's identity: parsed once
from the command line (`EmbedderSpec.parse("tflite:m.tflite")`), recorded in every shard manifest
and exported model as `spec.to_json()` ({"name": ..., settings...}), read back with
`EmbedderSpec.from_json`; `create_from_spec(spec)` rebuilds the same embedder.

Several embedders at once (`create_from_spec(EmbedderSpec.ensemble([a, b]))`, the scrape's
`--embedder A --embedder B`): one `EnsembleEmbedder` whose vector is the parts' L2-normalised
vectors concatenated (each scaled by 1/sqrt(parts), so the whole has unit norm); its spec keeps
the parts and their dims (`spec.blocks`), so that models can centre and weigh each part.
`cached(spec)` returns one instance per process, so a Ray worker loads a model once
and reuses it across shards.

Names: "default" (the ensemble of the two models shipped in the package: "mobilenet_v2" +
"mobilenet_v1", hashtag/pretrained.py; a spec records the parts, never the alias), "classic"
(hashtag/classic.py: OpenCV features, no weights, fast); "tflite:PATH_OR_URI[#tensor]",
"keras:NAME" and the shipped names (hashtag/cnn.py). Both modules are imported on first use:
`classic` never imports TensorFlow, and this module (the specs) never imports OpenCV.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hashtag import pretrained
from hashtag.errors import ArtifactError, UserError
from hashtag.metrics import l2_normalize

_FACTORIES: dict[str, Callable[..., Embedder]] = {}
# Registry prefixes whose factories live in modules imported on first use.
_LAZY_MODULES = {"classic": "hashtag.classic", "tflite": "hashtag.cnn", "keras": "hashtag.cnn"}
_LAZY_MODULES.update({name: "hashtag.cnn" for name in pretrained.SHIPPED})
# Kinds that run a TFLite interpreter: they take the caller's thread settings.
TFLITE_KINDS = frozenset({"tflite", *pretrained.SHIPPED})
DEFAULT = "default"  # the alias of the default embedder: the shipped models side by side
ENSEMBLE = "ensemble"  # the kind of a spec made of several embedders
LABEL_ONLY = "none"  # the kind of label-only data: no embedder


def _frozen(value: Any) -> Any:
    """JSON values as hashable ones: lists become tuples."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _thawed(value: Any) -> Any:
    return [_thawed(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class EmbedderSpec:
    """Which embedder, with which settings: kind ("classic", "tflite", "keras", "none",
    "ensemble"), its argument (model path or URI, backbone name), its options as sorted
    (name, value) pairs, and for an ensemble its parts. Hashable; equal specs embed alike."""

    kind: str
    arg: str = ""
    options: tuple[tuple[str, Any], ...] = ()
    parts: tuple[EmbedderSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.kind:
            raise UserError("an embedder needs a name: default, classic, tflite:PATH, keras:NAME")
        object.__setattr__(
            self,
            "options",
            tuple(sorted((str(k), _frozen(v)) for k, v in dict(self.options).items())),
        )
        object.__setattr__(self, "parts", tuple(self.parts))
        if (self.kind == ENSEMBLE) != bool(self.parts) or len(self.parts) == 1:
            raise UserError("an ensemble spec needs two or more parts, and only it has parts")
        if any(p.kind in (ENSEMBLE, LABEL_ONLY) for p in self.parts):
            raise UserError("an ensemble's parts are plain embedders (no ensemble, no 'none')")

    @classmethod
    def parse(cls, text: str, **options: Any) -> EmbedderSpec:
        """From the command line's string: "default", "classic", "mobilenet_v2",
        "tflite:PATH_OR_URI[#tensor]", "keras:NAME". "default" gives the ensemble it stands for."""
        kind, _, arg = str(text).strip().partition(":")
        if kind == DEFAULT:
            if arg:
                raise UserError(f"'default' takes no argument, got {text!r}")
            return cls.ensemble([cls.parse(name, **options) for name in pretrained.DEFAULT])
        if kind not in available() and kind != LABEL_ONLY:
            raise UserError(f"unknown embedder {text!r}; use one of: {', '.join(available())}")
        return cls(kind, arg, tuple(options.items()))

    @classmethod
    def ensemble(cls, parts: Sequence[EmbedderSpec]) -> EmbedderSpec:
        """Several embedders in one: one spec for one embedder, else an ensemble (an ensemble
        among the parts, such as "default", gives its own parts)."""
        parts = tuple(q for p in parts for q in (p.parts or (p,)))
        return parts[0] if len(parts) == 1 else cls(ENSEMBLE, parts=parts)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind

    def get(self, option: str, default: Any = None) -> Any:
        return dict(self.options).get(option, default)

    @property
    def dim(self) -> int | None:
        if self.parts:
            dims = [p.dim for p in self.parts]
            return None if None in dims else sum(dims)
        return self.get("dim")

    @property
    def blocks(self) -> tuple[int, ...]:
        """The dims of an ensemble's parts, in order; () for one embedder."""
        return tuple(int(p.dim or 0) for p in self.parts)

    def to_json(self) -> dict[str, Any]:
        if self.parts:
            return {"name": ENSEMBLE, "parts": [p.to_json() for p in self.parts]}
        return {"name": self.name, **{k: _thawed(v) for k, v in self.options}}

    @classmethod
    def from_json(cls, value: dict[str, Any] | EmbedderSpec) -> EmbedderSpec:
        if isinstance(value, EmbedderSpec):
            return value
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise UserError(f"not an embedder spec: {value!r} (expected {{'name': ...}})")
        if value["name"] == ENSEMBLE:
            return cls(ENSEMBLE, parts=tuple(cls.from_json(p) for p in value.get("parts") or ()))
        kind, _, arg = value["name"].partition(":")
        options = tuple((k, v) for k, v in value.items() if k != "name")
        return cls(kind, arg, options)

    def __str__(self) -> str:
        return " + ".join(p.name for p in self.parts) if self.parts else self.name


class Embedder:
    """Base class. Subclasses set `spec`, `dim` and implement preprocess / embed_batch."""

    spec: EmbedderSpec
    dim: int

    @property
    def name(self) -> str:
        return self.spec.name

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
    return sorted(set(_FACTORIES) | set(_LAZY_MODULES) | {DEFAULT})


def expand(names: Sequence[str]) -> tuple[str, ...]:
    """Embedder names with "default" replaced by the names it stands for."""
    return tuple(n for name in names for n in (pretrained.DEFAULT if name == DEFAULT else (name,)))


def create(name: str, **options: Any) -> Embedder:
    """Create an embedder by name: "default", "classic", "mobilenet_v2", "mobilenet_v1",
    "tflite:PATH_OR_URI[#tensor]", "keras:NAME"; `options` go to its factory."""
    if name == DEFAULT:
        return create_from_spec(EmbedderSpec.parse(name), **options)
    spec = EmbedderSpec.parse(name)  # the one parse of the name: kind and argument
    return _build(spec.kind, spec.arg, options)


def create_from_spec(spec: EmbedderSpec | dict[str, Any], **settings: Any) -> Embedder:
    """Rebuild the embedder a manifest or exported model recorded (a spec or its JSON).
    `settings` (threads...) go to every part that accepts them, not into the identity."""
    spec = EmbedderSpec.from_json(spec)
    if spec.kind == LABEL_ONLY:
        raise UserError("this data has no image embedder (label-only posts): nothing to embed")
    if spec.parts:
        return EnsembleEmbedder([create_from_spec(p, **settings) for p in spec.parts])
    options = {k: _thawed(v) for k, v in spec.options}
    if spec.kind in TFLITE_KINDS:
        options.update(settings)
    return _build(spec.kind, spec.arg, options)


def _build(kind: str, arg: str, options: dict[str, Any]) -> Embedder:
    """The registry's factory for `kind` (its module imported on first use), called."""
    if kind not in _FACTORIES and kind in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[kind])
    if kind not in _FACTORIES:
        name = f"{kind}:{arg}" if arg else kind
        raise ValueError(f"unknown embedder {name!r}; available: {', '.join(available())}")
    return _FACTORIES[kind](arg or None, **options)


@functools.lru_cache(maxsize=4)
def cached(spec: EmbedderSpec) -> Embedder:
    """One embedder per process and spec: models load once per Ray worker. An ensemble's
    parts are cached one by one."""
    if spec.parts:
        return EnsembleEmbedder([cached(p) for p in spec.parts])
    return create_from_spec(spec)


# --- where weights may come from when an artifact names them ----------------------------------

# Weights shipped inside the package (pretrained.py: the default CNN's), by name -> local path.
# A spec read from an artifact may name these; every other location it names must be a copy
# inside the artifact's own folder.
PACKAGED_WEIGHTS: dict[str, str] = {name: str(s.path) for name, s in pretrained.SHIPPED.items()}
WEIGHTS_FORMAT = "hashtag-weights"
MAX_WEIGHTS_BYTES = 1 << 30  # a TFLite or Keras weights file; larger is refused, not read


def packaged_weights(name: str) -> str | None:
    """The local path of the weights the package ships under `name`, else None."""
    return PACKAGED_WEIGHTS.get(name)


def weights_locations(spec: EmbedderSpec) -> list[str]:
    """Every file location a spec loads weights from (a TFLite model, a Keras weights file),
    leaving out package-shipped names and Keras' own "imagenet"."""
    return [location for location, _ in _weights(spec)]


def _weights(spec: EmbedderSpec) -> list[tuple[str, str | None]]:
    """(location, expected sha256 or None) of every weights file of `spec`."""
    if spec.parts:
        return [found for part in spec.parts for found in _weights(part)]
    if spec.kind == "tflite":
        location = spec.arg.partition("#")[0]
    elif spec.kind == "keras":
        location = spec.get("weights")
    else:
        return []
    if not location or location == "imagenet" or packaged_weights(str(location)):
        return []
    sha = spec.get("sha256")
    return [(str(location), sha if isinstance(sha, str) else None)]


def export_weights(spec: EmbedderSpec, folder: str) -> dict[str, str]:
    """Copy every weights file `spec` loads into `folder` (an artifact of format
    WEIGHTS_FORMAT: each file listed with its sha256) and return {location: file name}, what
    `confined` needs to load the spec from that folder. The locations come from a dataset's
    manifest: they are fetched like a post's image (hashtag.fetch: no private addresses, no
    symbolic links, regular files only, at most MAX_WEIGHTS_BYTES), and a TFLite file must
    have the sha256 its spec recorded (the model the embeddings were made with)."""
    import hashlib
    import posixpath
    import re

    from hashtag import artifacts, storage
    from hashtag.fetch import FetchConfig, Fetcher, FetchError

    found = dict(_weights(spec))
    if not found:
        return {}
    fetcher = Fetcher(FetchConfig(max_bytes=MAX_WEIGHTS_BYTES, retries=1))
    copies, files = {}, {}
    for number, (location, sha) in enumerate(found.items()):
        try:
            data = fetcher.get(location)
        except FetchError as error:
            raise UserError(
                f"cannot copy the embedder's weights {storage.redact(location)} into {folder}: "
                f"{error}"
            ) from None
        if sha and hashlib.sha256(data).hexdigest() != sha:
            raise UserError(
                f"{storage.redact(location)} is not the file the embeddings were made with "
                f"(sha256 differs from the spec's {sha}): restore it or re-embed"
            )
        base = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(location.split("?")[0]))
        name = f"{number}-{base or 'weights'}"[:200]
        files[name] = artifacts.write_file(folder, name, data)
        copies[location] = name
    artifacts.write_manifest(folder, WEIGHTS_FORMAT, 1, files)
    return copies


def confined(spec: EmbedderSpec, folder: str, copies: dict[str, str]) -> EmbedderSpec:
    """`spec` as read from the artifact at `folder`, with every weights location replaced by
    its copy inside the folder (`copies`: location -> file name, listed in the folder's
    manifest); a location without a copy (an absolute path, s3:// or http(s):// URI) is refused
    with an ArtifactError naming the folder: loading a model never reads or fetches a location
    its folder chose."""
    if spec.parts:
        return EmbedderSpec(ENSEMBLE, parts=tuple(confined(p, folder, copies) for p in spec.parts))
    locations = weights_locations(spec)
    if not locations:
        return spec
    (location,) = locations
    name = copies.get(location) if isinstance(copies, dict) else None
    if not isinstance(name, str):
        raise ArtifactError(
            f"{folder}: its embedder {spec.name[:200]!r} loads weights from "
            f"{location[:200]!r}, outside the folder; refused (a model folder must carry its "
            "embedder's weights): re-export the model with `hashtag tune`, which copies them in"
        )
    inside = _join(folder, name)
    if spec.kind == "tflite":
        return EmbedderSpec("tflite", inside, spec.options)
    options = dict(spec.options)
    options["weights"] = inside
    return EmbedderSpec(spec.kind, spec.arg, tuple(options.items()))


def _join(folder: str, name: str) -> str:
    from hashtag import artifacts, storage

    return storage.join(folder, artifacts.check_name(folder, name))


class EnsembleEmbedder(Embedder):
    """Several embedders on the same photos: their vectors side by side (see the module doc).

    `preprocess` runs every part's preprocessing and packs the results as bytes in one row, so
    that ingest's decode threads and batches work unchanged; `embed_batch` unpacks them."""

    def __init__(self, parts: Sequence[Embedder]) -> None:
        if len(parts) < 2:
            raise UserError("an ensemble needs two or more embedders")
        self.parts = list(parts)
        self.spec = EmbedderSpec.ensemble([p.spec for p in self.parts])
        self.dim = sum(p.dim for p in self.parts)
        side = max(p.min_side or 32 for p in self.parts)
        probe = np.zeros((side, side, 3), np.uint8)
        self._inputs = [np.asarray(p.preprocess(probe)) for p in self.parts]  # shapes, dtypes
        self._ends = np.cumsum([x.nbytes for x in self._inputs])

    @property
    def min_side(self) -> int | None:
        sides = [p.min_side for p in self.parts if p.min_side]
        return max(sides) if sides else None

    @property
    def lanes(self) -> int:
        return min(p.lanes for p in self.parts)

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.ascontiguousarray(p.preprocess(rgb)).view(np.uint8).ravel() for p in self.parts]
        )

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.uint8)
        if batch.ndim != 2 or batch.shape[1] != self._ends[-1]:
            raise ValueError(f"expected packed inputs (n, {self._ends[-1]}), got {batch.shape}")
        vectors = []
        for part, like, start, end in zip(
            self.parts, self._inputs, [0, *self._ends[:-1]], self._ends, strict=True
        ):
            inputs = np.ascontiguousarray(batch[:, start:end]).view(like.dtype)
            vectors.append(l2_normalize(part.embed_batch(inputs.reshape(len(batch), *like.shape))))
        return np.concatenate(vectors, axis=1) / np.float32(np.sqrt(len(vectors)))
