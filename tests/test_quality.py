"""The exported model against the plain kNN vote on real photos: one design split of
feedme-food through bench_quality's own code (the product's embedders, tune's candidates,
`compete`, `refit_winner`), scored on the split's test side and on the held-out share."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_quality.py"


def bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_exported_model_against_the_knn_vote_on_real_photos(shared_dir):
    bench = bench_quality()
    args = bench.parse_args(["--data", str(shared_dir / "data")])  # the shipped default CNN
    # Embedded once, cached in /tmp (the bench's cache): ~20 s the first time.
    X, spec, tags, X_v2, posts = bench.load_set(args, "feedme-food")
    held = bench.held_out_mask([p.id for p in posts])
    assert 0.15 < held.mean() < 0.25  # the held-out share: ~20% by a hash of the post id
    assert bench.held_out_mask([p.id for p in reversed(posts)])[::-1].tolist() == held.tolist()
    split = bench.design_split(held, seed=0)
    assert (split[held] == bench.HELD).all() and (split[~held] != bench.HELD).all()

    rows = bench.run_split(args, X, spec, tags, X_v2, held, seed=0)
    by_model = {r["model"]: r for r in rows}
    reference, exported = by_model["knn reference (train+val)"], by_model["exported"]
    ratios = {on: exported[on]["f1@5"] / reference[on]["f1@5"] for on in ("test", "held")}
    print("feedme-food split 0, exported / kNN vote F1@5:", ratios, "winner:", exported["winner"])
    # Selected on validation among every candidate: the winner is one of them, not test-picked.
    candidates = [r for r in rows if "val" in r]
    assert max(candidates, key=lambda r: r["val"]["f1@5"])["model"] == exported["winner"]
    # Above the plain vote on both, within this small set's noise (~90 validation photos).
    assert ratios["test"] > 0.98 and ratios["held"] > 0.98
