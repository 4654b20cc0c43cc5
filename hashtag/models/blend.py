"""`blend`: a weighted sum of other models' scores, weights chosen on validation. What it
does differently from other models (its name, what a refit keeps) it overrides."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np

from hashtag import artifacts, storage
from hashtag.models.base import (
    _MAX_PARTS,
    SELECT_METRIC,
    Blocks,
    ModelConfig,
    Recommender,
    load,
    metric_value,
    register,
)


@register
class Blend(Recommender):
    """A weighted sum of other models' scores: `Blend.of([mlp, knn], X_val, Y_val)` takes fitted
    models and picks the weights (steps of 0.1 summing to 1) by `metric` on validation.
    `fit` refits every part on new data and keeps the weights (and the decision rule): how
    the chosen blend is retrained on train + validation. Saved with each part in `part-N/`."""

    name = "blend"
    streams = True  # refit from Blocks: parts that stream get them, the others rows in memory

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.parts: list[Recommender] = []
        self.weights = np.zeros(0, np.float32)

    @classmethod
    def of(
        cls,
        parts: Sequence[Recommender],
        X_val: np.ndarray,
        Y_val: np.ndarray,
        metric: str = SELECT_METRIC,
        steps: int = 10,
    ) -> Blend:
        if len(parts) < 2 or any(p.n_tags is None for p in parts):
            raise ValueError("a blend needs at least two fitted models")
        blend = cls()
        blend.parts = list(parts)
        blend.vocab, blend.dim, blend.n_tags = parts[0].vocab, parts[0].dim, parts[0].n_tags
        scores = [p.predict_scores(X_val) for p in parts]
        best = -np.inf
        for weights in _simplex(len(parts), steps):
            value = metric_value(Y_val, sum(w * s for w, s in zip(weights, scores, strict=True)))
            if value > best:
                best, blend.weights = value, weights
        # A part weighted 0 adds nothing but size: drop it. Fewer than two parts left means
        # the best "blend" is one of the parts (the caller already has that candidate).
        kept = blend.weights > 0
        blend.parts = [p for p, k in zip(blend.parts, kept, strict=True) if k]
        blend.weights = blend.weights[kept]
        blend._end_epoch(0, {}, X_val, Y_val, [])  # the decision rule, on validation
        return blend

    def _fit(self, X, Y, X_val, Y_val, callbacks) -> None:
        if not self.parts:
            raise ValueError("create a blend with Blend.of(fitted models, X_val, Y_val)")
        if not isinstance(X, Blocks):
            self.parts = [part.refit(X, Y) for part in self.parts]
            return
        arrays = functools.cache(X.in_memory)  # read once, for every part that needs arrays
        self.parts = [
            part.refit(X, None) if part.streams else part.refit(*arrays()) for part in self.parts
        ]

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return sum(w * p.predict_scores(X) for w, p in zip(self.weights, self.parts, strict=True))

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights = arrays["weights"].astype(np.float32)
        self._restore_check()

    def _save_parts(self, uri: str) -> None:
        for i, part in enumerate(self.parts):
            part.save(storage.join(uri, f"part-{i}"), metadata={})

    def _load_parts(self, uri: str) -> None:
        # part-0, part-1...: each a verified model artifact of its own (at most _MAX_PARTS).
        self.parts = []
        while len(self.parts) < _MAX_PARTS:
            part = storage.join(uri, f"part-{len(self.parts)}")
            if not artifacts.exists(part):
                break
            self.parts.append(load(part))

    def _restore_check(self) -> None:
        if len(self.parts) < 2 or len(self.weights) != len(self.parts):
            raise ValueError(f"{len(self.weights)} blend weights for {len(self.parts)} parts")

    def describe(self) -> str:
        return " + ".join(
            f"{w:.1f} {p.describe()}" for w, p in zip(self.weights, self.parts, strict=True)
        )

    def _unfitted_copy(self, metric: str) -> Blend:
        """A refit keeps the parts' kinds and the weights chosen on validation; `fit` refits
        each part."""
        fresh = Blend(self.config)
        fresh.parts, fresh.weights = self.parts, self.weights
        return fresh


def _simplex(n: int, steps: int) -> list[np.ndarray]:
    """Every weight vector of n non-negative multiples of 1/steps that sum to 1."""
    return [
        np.array([*head, steps - sum(head)], np.float32) / steps
        for head in itertools.product(range(steps + 1), repeat=n - 1)
        if sum(head) <= steps
    ]
