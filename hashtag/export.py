"""The export format: the model folder `hashtag tune` writes (OUT/tune/model) and `recommend`,
`evaluate` and `serve` read. This module is its one owner: the format name and version, writing
the folder, reading it back (checked before any array is loaded), and `ExportedModel`.

    OUT/tune/model/
      manifest.json, *.npy   a saved recommender (models/, format "hashtag-model"), whose
                             manifest's "extra" is the export metadata: {"format": FORMAT,
                             "version": VERSION, "model", "selected", "embedder" (spec),
                             "embedder_files" ({location: file}), "vocab", "decision", ...}
      embedder/              a "hashtag-weights" artifact: a copy of every weights file the
                             embedder spec loads (loading reads only those, or shipped weights)
      cooccurrence/          the co-occurrence of the labels the model learnt from (completion)

A folder of another format (not exported by `hashtag tune`) or of a newer version is one
ArtifactError naming the folder and what to do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hashtag import artifacts, embedders, storage
from hashtag.embedders import LABEL_ONLY, EmbedderSpec
from hashtag.errors import ArtifactError, UserError

FORMAT = "hashtag-export"
VERSION = 1  # the newest version this code writes and reads; older ones are read too
EMBEDDER_WEIGHTS = "embedder"  # the model folder's copy of its embedder's weights
COOCCURRENCE = "cooccurrence"
_GIVE = "give --model the folder `hashtag tune` exported (OUT/tune/model)"


def write(
    uri: str, recommender, *, embedder: EmbedderSpec, selected: str, vocab: list[str], **fields
):
    """Write the model folder `uri` afresh: the embedder's weights copied into `embedder/`, then
    `recommender` saved with the export metadata (format, version, `fields`; the embedder spec
    as its JSON). Returns the metadata. The co-occurrence model goes in with
    `write_cooccurrence`."""
    storage.remove(uri)  # no file of an older export may survive beside the new one
    # The folder carries its embedder's weights: loading it never reads a location it names.
    weights = embedders.export_weights(embedder, storage.join(uri, EMBEDDER_WEIGHTS))
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "model": recommender.name,
        "selected": selected,
        "embedder": embedder.to_json(),
        "embedder_files": weights,
        "vocab": vocab,
        **fields,
    }
    for part in [recommender, *getattr(recommender, "parts", [])]:
        if getattr(part, "optimizer_state", None):
            # Recommending needs no Adam moments (twice the weights); checkpoints keep them.
            part.optimizer_state = []
    recommender.save(uri, metadata=metadata)
    return metadata


def write_cooccurrence(uri: str, cooccurrence) -> None:
    """The fitted co-occurrence model into the export folder `uri` (for --tags completion)."""
    cooccurrence.save(storage.join(uri, COOCCURRENCE))


def check_metadata(uri: str, metadata: Any) -> dict[str, Any]:
    """The export metadata of the folder `uri`, checked: its format, a version this code reads,
    a vocabulary and an embedder; an ArtifactError naming the folder and what to do otherwise."""
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{uri}: its export metadata is not a mapping; {_GIVE}")
    found = metadata.get("format")
    if found != FORMAT:
        said = f"format {str(found)[:40]!r}" if found is not None else "no export format"
        raise ArtifactError(
            f"{uri} is not a model exported by `hashtag tune` (its metadata has {said}, "
            f"expected {FORMAT!r}); {_GIVE}, or export one with `hashtag tune`"
        )
    version = metadata.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(
            f"{uri}: its export version {str(version)[:20]!r} is not a version; "
            "re-export it with `hashtag tune`"
        )
    if version > VERSION:
        raise ArtifactError(
            f"{uri} is a {FORMAT} of version {version}, newer than this hashtag reads "
            f"(up to {VERSION}): upgrade hashtag, or re-export the model with this version's "
            "`hashtag tune`"
        )
    if "vocab" not in metadata or "embedder" not in metadata:
        raise ArtifactError(
            f"{uri} has no vocabulary or embedder in its metadata: it is not a model "
            "exported by `hashtag tune` (OUT/model); export one with `hashtag tune`"
        )
    return metadata


class ExportedModel:
    """An exported model folder, loaded: recommender, vocabulary, embedder spec, completion.
    The core `recommend` and `serve` share (`prepare`, `image_scores`, `tag_mask`)."""

    def __init__(self, uri: str):
        from hashtag import models

        self.uri = str(uri)
        try:
            # The metadata is checked before any array is read: a foreign or newer export
            # costs one manifest.
            self.recommender = models.load(self.uri, check_extra=check_metadata)
        except FileNotFoundError as error:
            raise ArtifactError(f"{error}; {_GIVE}") from error
        self.metadata: dict[str, Any] = dict(self.recommender.metadata)
        self.vocab: list[str] = [str(t) for t in self.metadata["vocab"]]
        self.index = {tag: i for i, tag in enumerate(self.vocab)}
        try:  # parsed once, here: everything downstream gets the spec
            self.embedder_spec = EmbedderSpec.from_json(self.metadata["embedder"])
        except UserError as error:
            raise ArtifactError(
                f"{self.uri}: its embedder spec is malformed ({error}); re-export the model "
                "with `hashtag tune`"
            ) from None
        self._cooccurrence = None
        self._embedder = None

    @property
    def embedder(self):
        """The model's embedder, built once (a --manifest run embeds many batches with it)."""
        if self._embedder is None:
            self._embedder = embedders.create_from_spec(self.runnable_spec())
        return self._embedder

    def runnable_spec(self) -> EmbedderSpec:
        """The embedder spec with its weights read from this folder's own copy (the export
        puts them in `embedder/`, listed with sha256) or shipped with the package; a spec that
        points anywhere else (a path, s3://, http://) is refused, naming the folder."""
        folder = storage.join(self.uri, EMBEDDER_WEIGHTS)
        copies = self.metadata.get("embedder_files") or {}
        if not isinstance(copies, dict):
            raise ArtifactError(f"{self.uri}: its embedder_files is not a mapping; re-export it")
        if copies:
            weights = artifacts.read(
                folder, embedders.WEIGHTS_FORMAT, (1,), what="embedder weights",
                fix="re-export the model with `hashtag tune`",
            )  # fmt: skip
            for name in copies.values():
                weights.path(name)  # listed in the manifest, else ArtifactError
            weights.verify([n for n in copies.values() if isinstance(n, str)])
        return embedders.confined(self.embedder_spec, folder, copies)

    def prepare(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        """Image bytes -> the embedder's input, through the scrape's admission rule
        (images.decode: format gating, pixel cap, decode limits); ImageError otherwise."""
        from hashtag import images, ingest

        embedder = self.embedder
        rgb = images.decode(
            data, max_pixels=max_pixels or ingest.MAX_PIXELS, min_side=embedder.min_side
        )
        return embedder.preprocess(rgb)

    def image_scores(self, inputs: np.ndarray) -> np.ndarray:
        """A stack of prepared images (n, ...) -> the model's scores (n, V): embed, predict."""
        vectors = np.asarray(self.embedder.embed_batch(inputs)).astype(np.float32, copy=False)
        return np.asarray(self.recommender.predict_scores(vectors), np.float32)

    @property
    def cooccurrence(self):
        from hashtag.completion import Cooccurrence

        if self._cooccurrence is None:
            location = storage.join(self.uri, COOCCURRENCE)
            if not artifacts.exists(location):
                raise ArtifactError(
                    f"{self.uri} has no {COOCCURRENCE}/: re-export it to use --tags"
                )
            self._cooccurrence = Cooccurrence.load(location)
        return self._cooccurrence

    @property
    def has_images(self) -> bool:
        return self.embedder_spec.kind != LABEL_ONLY

    def tag_mask(self, names: list[str]) -> tuple[np.ndarray, list[str]]:
        """bool (V,) of the known tags among `names`, and the unknown ones."""
        mask = np.zeros(len(self.vocab), bool)
        unknown = []
        for name in names:
            if name in self.index:
                mask[self.index[name]] = True
            else:
                unknown.append(name)
        return mask, unknown
