"""Hashtag completion: suggest more hashtags from those the user already wrote (and the image).

The co-occurrence model counts, over the training posts, how often each pair of hashtags appears
together. Given tags g_1..g_m, a candidate tag t scores

    score(t) = sum_i idf(g_i)^a * P(t | g_i)  /  P(t)^b   (+ a small popularity prior)

- P(t | g) = count(g, t) / count(g): the plain co-occurrence estimate.
- idf(g) = log((N + 1) / (count(g) + 1)): a rare given tag (#bobatea) says more about the post
  than a generic one (#love), so it gets more weight; a = `idf_power`.
- dividing by P(t)^b (b = `lift_power`) moves the ranking from "frequent with g" towards the
  lift P(t | g) / P(t): without it generic tags (#instagood) win every post. b = 1 would be pure
  lift, which over-promotes rare tags seen once with g; b = 0.5 sits between.
- the prior (popularity, weight `prior_weight` on a row scaled to max 1) breaks ties and gives
  sensible answers when no tag is given.

a = b = 0.5 are the defaults (`hashtag tune` chooses its own on validation, never on test, and
keeps plain co-occurrence when the weights do not beat it there). Given tags are never
suggested again: their score is -inf.

On the original project's seed train/test files (hide a seeded-random half of each test post's
tags, suggest 5, micro F1) the defaults score 0.296 F1@5, against 0.144 for popularity and 0.230
for plain P(tag | given), as `pytest -s tests/test_completion.py -k seed_data` prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from hashtag import artifacts, metrics

FORMAT = "hashtag-cooccurrence"
VERSION = 1
COUNTS = "counts.npy"
MAX_TAGS = 100_000  # a (V, V) int64 matrix: more tags than this is a tampered folder


@dataclass(frozen=True)
class CooccurrenceConfig:
    idf_power: float = 0.5
    lift_power: float = 0.5
    prior_weight: float = 0.01

    def __post_init__(self) -> None:
        for name in ("idf_power", "lift_power", "prior_weight"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


# The plain co-occurrence baseline: P(tag | given tag) summed over the given tags.
PLAIN = CooccurrenceConfig(idf_power=0.0, lift_power=0.0, prior_weight=0.0)


def _as_bool_matrix(y: np.ndarray, name: str, n_tags: int | None = None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"{name} must be 2-D (posts, hashtags), got shape {y.shape}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name} must be bool or 0/1, got values outside 0/1 ({y.dtype})")
        y = y.astype(bool)
    if n_tags is not None and y.shape[1] != n_tags:
        raise ValueError(
            f"{name} has {y.shape[1]} hashtag columns but the model was fit on {n_tags}"
        )
    return y


def _scale_rows(scores: np.ndarray) -> np.ndarray:
    """Scale each row so its largest finite value is 1 (rows of zeros stay zeros)."""
    finite = np.where(np.isfinite(scores), scores, 0.0)
    top = np.abs(finite).max(axis=1, keepdims=True)
    return finite / np.where(top > 0, top, 1.0)


def hide_half(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split each post's tags into (given, hidden), bool (n, V) each, for completion tests.

    Each row's tags are ordered by a seeded random key; the first floor(m / 2) are given, the
    other ceil(m / 2) hidden (a post with one tag gives nothing). Deterministic for a seed.
    """
    y = _as_bool_matrix(y, "y")
    keys = np.where(y, np.random.default_rng(seed).random(y.shape), np.inf)
    rank = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    given = rank < (y.sum(axis=1, keepdims=True) // 2)
    return given, y & ~given


def held_out(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(given, hidden) of the posts with two tags or more: `hide_half` of those rows. The
    evaluation protocol of completion (tune's table on label-only data, `hashtag evaluate`)."""
    y = _as_bool_matrix(y, "y")
    return hide_half(y[y.sum(axis=1) >= 2], seed=seed)


def score_suggestions(scores: np.ndarray, hidden: np.ndarray, k: int = 5) -> dict[str, float]:
    """Every metric of the k best suggestions against the hidden tags: `f1`, `precision` and
    `recall` are micro over the k suggested (-inf, i.e. given, tags are never suggested);
    f1@k, p@k, r@k, map as metrics.evaluate computes them."""
    chosen = metrics.top_k_mask(scores, k) & np.isfinite(scores)
    return {name: float(v) for name, v in metrics.evaluate(hidden, scores, chosen).items()}


def popularity_scores(frequency: np.ndarray, given: np.ndarray) -> np.ndarray:
    """The baseline: every post gets the tag frequencies; given tags -inf."""
    given = _as_bool_matrix(given, "given", len(frequency))
    return np.where(given, -np.inf, np.broadcast_to(np.float32(frequency), given.shape))


class Cooccurrence:
    """Hashtag co-occurrence counts and the completion scores built on them."""

    def __init__(self, config: CooccurrenceConfig | None = None) -> None:
        self.config = config or CooccurrenceConfig()
        self.counts: np.ndarray | None = None  # int64 (V, V), diagonal = tag counts
        self.n_posts = 0

    def fit(self, y_train: np.ndarray) -> Cooccurrence:
        """Count the hashtag pairs of the training posts: bool (n, V)."""
        return self.fit_blocks([y_train])

    def fit_blocks(self, blocks: Iterable[np.ndarray]) -> Cooccurrence:
        """`fit` on the training labels given as bool (b, V) blocks of posts, one in memory at
        a time. Memory is the (V, V) tables: ~5 x 8 x V**2 bytes while fitting (40 MB at the
        default 1,000-tag vocabulary, 4 GB at 10,000): the vocabulary cap bounds it, not N."""
        self.counts, self.n_posts = None, 0
        for block in blocks:
            y = _as_bool_matrix(block, "y_train", self.counts.shape[0] if self.n_posts else None)
            y = y.astype(np.float32)
            # float32 matmul is exact for counts below 2**24 per block; the sum is int64.
            counts = np.rint(y.T @ y).astype(np.int64)
            self.counts = counts if self.counts is None else self.counts + counts
            self.n_posts += int(y.shape[0])
        if not self.n_posts:
            raise ValueError("y_train has no posts: fit on at least one tagged post")
        self._derive()
        return self

    def with_config(self, config: CooccurrenceConfig) -> Cooccurrence:
        """The same counts scored with other weights: no refit (how tune tries weights)."""
        self._check_fitted()
        model = Cooccurrence(config)
        model.counts, model.n_posts = self.counts, self.n_posts
        model._derive()
        return model

    def _derive(self) -> None:
        counts = self.counts.astype(np.float64)
        tag_counts = np.diag(counts).copy()
        conditional = counts / np.maximum(tag_counts[:, None], 1.0)  # [g, t] = P(t | g)
        np.fill_diagonal(conditional, 0.0)
        n_tags = len(tag_counts)
        prior = (tag_counts + 1.0) / (self.n_posts + n_tags)  # add-one: no tag has P(t) = 0
        idf = np.log((self.n_posts + 1.0) / (tag_counts + 1.0)) ** self.config.idf_power
        # One (V, V) matrix does the whole scoring: given (n, V) @ weights (V, V).
        self._weights = (
            idf[:, None] * conditional / prior[None, :] ** self.config.lift_power
        ).astype(np.float32)
        self._prior = (prior / prior.max()).astype(np.float32)

    @property
    def n_tags(self) -> int:
        self._check_fitted()
        return self.counts.shape[0]

    def _check_fitted(self) -> None:
        if self.counts is None:
            raise RuntimeError("this Cooccurrence is not fitted: call fit(y_train) or load(uri)")

    def scores_given(self, given: np.ndarray) -> np.ndarray:
        """float32 (n, V): completion scores for each post's given tags; -inf at given tags."""
        self._check_fitted()
        given = _as_bool_matrix(given, "given", self.n_tags)
        scores = _scale_rows(given.astype(np.float32) @ self._weights)
        scores += self.config.prior_weight * self._prior
        return np.where(given, -np.inf, scores).astype(np.float32)

    def combine(
        self, image_scores: np.ndarray | None, given: np.ndarray, weight: float = 0.5
    ) -> np.ndarray:
        """Blend image scores (weight) with completion scores (1 - weight), each row scaled to
        max 1; with `image_scores=None` this is `scores_given`. Given tags get -inf."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        tags = self.scores_given(given)
        if image_scores is None:
            return tags
        image_scores = np.asarray(image_scores, np.float32)
        if image_scores.shape != tags.shape:
            raise ValueError(
                f"image_scores has shape {image_scores.shape}, given has {tags.shape}: "
                "pass one row per post and one column per hashtag in both"
            )
        blended = weight * _scale_rows(image_scores) + (1.0 - weight) * _scale_rows(tags)
        return np.where(np.isneginf(tags), -np.inf, blended).astype(np.float32)

    def save(self, uri: str) -> None:
        self._check_fitted()
        artifacts.remove_manifest(uri)
        files = {COUNTS: artifacts.write_array(uri, COUNTS, self.counts)}
        artifacts.write_manifest(
            uri, FORMAT, VERSION, files, n_posts=self.n_posts, config=asdict(self.config)
        )

    @classmethod
    def load(cls, uri: str) -> Cooccurrence:
        """ArtifactError when the folder is missing, foreign or damaged."""
        artifact = artifacts.read(
            uri,
            FORMAT,
            VERSION,
            what="co-occurrence model",
            fix="rebuild it from the dataset",
            unlisted=True,  # written before manifests listed their files
        )
        n_posts = artifact.int_field("n_posts")
        try:
            model = cls(CooccurrenceConfig(**artifact.manifest["config"]))
        except (KeyError, TypeError, ValueError) as error:
            raise artifact.error(f"its config is invalid ({error})") from None
        counts = artifact.load_array(COUNTS, verify=True)
        n = counts.shape[0] if counts.ndim else 0
        artifact.check_array(COUNTS, counts, shape=(n, n), kinds="iu")
        if n > MAX_TAGS or (counts.size and int(counts.min()) < 0):
            raise artifact.error(
                f"{COUNTS} must be a square count matrix of at most {MAX_TAGS} tags"
            )
        model.counts = counts.astype(np.int64)
        model.n_posts = n_posts
        model._derive()
        return model
