"""Recommendation quality on real photos: the exported model against the plain kNN vote.

    python bench/bench_quality.py                                  # both shared sets, 6 splits
    python bench/bench_quality.py --sets feedme-food --splits 10 --grid 16:1e-3,64:1e-3
    python bench/bench_quality.py --embedders v2                   # MobileNetV2 alone

For each shared photo set (../shared/data/feedme-food, ../shared/data/flickr8k-dev) it embeds
every photo once with the product's default embedder (MobileNetV2 and the MobileNetV1 extractor
shipped in hashtag/weights, side by side, through hashtag.ingest), cached in /tmp across runs
(never in the repository).

A design set is kept apart: the held-out share (`HELD_OUT`, 20%) of each set, chosen by a hash
of the post id (`held_out_mask`), is never in a split: no design choice (kernel temperature,
penalty grid, blend set, the bench's one MLP trial...) may look at it. `--splits` random
70/15/15 splits are drawn from the other 80% (the design splits, what choices are compared on).
On each, it does what `hashtag tune` does, with the product's own functions (vocabulary: tags
on >= 2 training posts, as merge counts on the training split): an MLP grid (`--grid`,
trained in this process, no Ray), the references (knn, ridge, kernel), the blends, selection on
validation by F1@5 (`selection.compete`), the refit of the winner on train + validation
(`selection.refit_winner`); and scores the exported model on the split's test side AND on the
held-out share, reported in two separate tables.

The reference is the plain cosine kNN vote of the data READMEs: 20 neighbours, weights
exp(10 x similarity), uncentred MobileNetV2 features, fitted on train + validation (the rows
the exported model learns from; `knn (train)` is the same vote on train only). Printed: F1@5 and
F1@10 (the product's per-image means) per model, mean +- standard deviation over the splits, and
the exported model's ratio to the reference (mean of per-split ratios, and how many splits won).
Nothing is chosen on the test split or on the held-out share; `--design-only` leaves the
held-out table out (what a design experiment should print). `--dtype float16` rounds the embeddings through float16
first, as `hashtag merge --dtype float16` stores them, to measure what that costs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KS = (5, 10)
HELD_OUT = 0.20  # share of each photo set kept apart from every design choice
HELD_OUT_SALT = "hashtag-design-held-out"
HELD = 3  # split code of the held-out share (0 train, 1 validation, 2 test)


def held_out_mask(ids: list[str], share: float = HELD_OUT) -> np.ndarray:
    """The posts of the held-out share: a hash of the post id (merge's hash64 with its own
    salt), so the same posts whatever the order, the splits or the embedder."""
    from hashtag.merge import hash64

    u = (hash64(ids, HELD_OUT_SALT) >> np.uint64(11)).astype(np.float64) / float(2**53)
    return u < share


def design_split(held: np.ndarray, seed: int) -> np.ndarray:
    """Split codes for one design split: a random 70/15/15 of the posts outside the held-out
    share (0 train, 1 validation, 2 test), HELD for the held-out posts."""
    split = np.full(len(held), HELD, np.int8)
    rest = np.flatnonzero(~held)
    order = np.random.default_rng(seed).permutation(rest)
    split[order[: int(0.70 * len(rest))]] = 0
    split[order[int(0.70 * len(rest)) : int(0.85 * len(rest))]] = 1
    split[order[int(0.85 * len(rest)) :]] = 2
    return split


def default_shared() -> Path:
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared"


def embed(posts: list, spec, cache: Path, label: str) -> np.ndarray:
    """Every post's vector by the product's embedder (hashtag.ingest), cached as .npy."""
    from hashtag import embedders, ingest
    from hashtag.fetch import FetchConfig, Fetcher

    key = json.dumps([spec.to_json(), [p.id for p in posts]], sort_keys=True)
    path = cache / f"{label}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    started = time.perf_counter()
    embedder = embedders.create_from_spec(spec)
    result = ingest.embed_posts(posts, embedder, Fetcher(FetchConfig()), threads=2)
    if result.skips:
        raise SystemExit(f"{label}: {len(result.skips)} photos failed to embed: {result.skips[:3]}")
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, result.embeddings, allow_pickle=False)
    print(f"{label}: embedded {len(posts)} photos in {time.perf_counter() - started:.0f} s")
    return result.embeddings


class SplitData:
    """One random split in memory: what tune's selection reads of a dataset (dim, vocab,
    vocab_size, embedder, rows) and the product's TrialData over its arrays (`data`)."""

    def __init__(self, X, tags, split, spec, min_count: int = 2):
        from hashtag import models, trial

        counts: dict[str, int] = {}
        for i in np.flatnonzero(split == 0):
            for tag in tags[i]:
                counts[tag] = counts.get(tag, 0) + 1
        vocab = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: -counts[t])
        index = {t: i for i, t in enumerate(vocab)}
        self.Y = np.zeros((len(X), len(vocab)), bool)
        for row, post_tags in enumerate(tags):
            for tag in post_tags:
                if tag in index:
                    self.Y[row, index[tag]] = True
        self.X, self.split, self.vocab, self.vocab_size = X, split, vocab, len(vocab)
        self.embedder, self.dim = spec, X.shape[1]
        arrays = {}
        for name in ("train", "val", "test"):
            X_part, Y_part = self.part(name)
            indptr, indices = models.csr_of(Y_part)
            arrays[name] = {"X": X_part, "indptr": indptr, "indices": indices}
        self.data = trial.TrialData("", arrays)

    def rows(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.split == ("train", "val", "test", "held").index(name))

    def part(self, name: str):
        rows = self.rows(name)
        return self.X[rows], self.Y[rows]


def run_split(args, X, spec, tags, X_v2, held: np.ndarray, seed: int) -> list[dict]:
    """One design split: every candidate, the selection and the refit; rows carry "test" (the
    split's test side) and, for the exported model and the references, "held" (the held-out
    share)."""
    from hashtag import models, selection, trial, tune
    from hashtag.report import ResultRow

    split = design_split(held, seed)
    ds = SplitData(X, tags, split, spec)
    config = tune.TuneConfig(data="memory", out="memory", references=("knn", "ridge", "kernel"))
    X_train, Y_train = ds.part("train")
    X_val, Y_val = ds.part("val")

    def score(model, X, Y) -> dict:
        return {k: float(v) for k, v in model.score(X, Y).items()}

    trials, fitted_trials = [], {}
    settings = trial.TrialSettings(
        data="", model="mlp", epochs=args.epochs, loss="sigmoid", seed=0, cpus=2,
        blocks=spec.blocks,
    )  # fmt: skip
    for batch_size, learning_rate in args.grid:
        grid = {"batch_size": batch_size, "learning_rate": learning_rate}
        mlp = models.create("mlp", trial.model_config(grid, settings))
        mlp.fit(X_train, Y_train, X_val, Y_val, vocab=ds.vocab)
        row = ResultRow(
            model="mlp", batch_size=batch_size, learning_rate=learning_rate,
            val=score(mlp, X_val, Y_val), test=score(mlp, *ds.part("test")),
            epochs=mlp.epochs_done,
        )  # fmt: skip
        trials.append(row)
        fitted_trials[row.label] = mlp
    rules = config.selection()  # what tune's selection reads of its config
    references, fitted = selection.fit_references(ds, ds.data, config.references, seed=config.seed)
    rows, winner, chosen = selection.compete(
        ds, ds.data, trials, lambda r: fitted_trials[r.label], references, fitted,
        metric=rules.metric, blends=rules.blends,
    )  # fmt: skip
    exported, _, refit_row = selection.refit_winner(
        ds, ds.data, winner, chosen, refit=rules.refit, metric=rules.metric
    )

    # The reference: uncentred MobileNetV2, 20 neighbours, exp(10 x similarity), no prior.
    plain = models.ModelConfig(knn_neighbours=20, knn_temperature=10.0, prior_weight=0.0)
    v2 = SplitData(X_v2, tags, split, spec)
    train_val = [np.concatenate(a) for a in zip(v2.part("train"), v2.part("val"), strict=True)]
    reference = models.create("knn", plain).fit(*train_val)
    reference_train = models.create("knn", plain).fit(*v2.part("train"))
    out = [
        {
            "model": "knn reference (train+val)",
            "test": score(reference, *v2.part("test")),
            "held": score(reference, *v2.part("held")),
        },
        {
            "model": "knn reference (train)",
            "test": score(reference_train, *v2.part("test")),
            "held": score(reference_train, *v2.part("held")),
        },
    ]
    out += [{"model": r.label, "test": r.test, "val": r.val} for r in [*trials, *rows]]
    out.append(
        {
            "model": "exported",
            "test": refit_row.test,
            "held": score(exported, *ds.part("held")),
            "winner": winner.label,
        }
    )
    return [dict(r, seed=seed) for r in out]


def _kind(label: str) -> str:
    """A row's model without the blend weights: "blend: ridge + knn"."""
    return re.sub(r"\b[01]\.\d ", "", label)


def summarise(name: str, rows: list[dict], splits: int, on: str = "test") -> list[str]:
    """The table of one set: F1@k on the design splits' test sides (`on="test"`) or on the
    held-out share (`on="held"`, only the rows scored there)."""
    title = {
        "test": f"{splits} design splits of the other {1 - HELD_OUT:.0%}, scored on their test sides",
        "held": f"the held-out {HELD_OUT:.0%} (never used by a design choice), "
        f"models of the {splits} design splits",
    }[on]
    lines = [f"\n{name}: {title} (mean +- sd over splits; ratio = per-split mean)"]
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        if on in r:
            by_model.setdefault(_kind(r["model"]), []).append(r)
    reference = {r["seed"]: r for r in by_model["knn reference (train+val)"]}
    header = f"{'model':44} " + " ".join(f"{'F1@' + str(k):>15} {'x ref':>6}" for k in KS)
    lines += [header, "-" * len(header)]
    for model, mine in by_model.items():
        cells = []
        for k in KS:
            values = np.array([r[on][f"f1@{k}"] for r in mine])
            ratios = np.array(
                [r[on][f"f1@{k}"] / reference[r["seed"]][on][f"f1@{k}"] for r in mine]
            )
            cells.append(f"{values.mean():.4f} +- {values.std():.4f} {ratios.mean():6.3f}")
        lines.append(f"{model[:44]:44} " + " ".join(cells))
    exported = by_model["exported"]
    wins = {
        k: sum(r[on][f"f1@{k}"] > reference[r["seed"]][on][f"f1@{k}"] for r in exported) for k in KS
    }
    winners: dict[str, int] = {}
    for r in exported:
        kind = _kind(r["winner"])
        winners[kind] = winners.get(kind, 0) + 1
    lines.append(
        f"exported above the reference on {wins[5]}/{len(exported)} splits (F1@5), {wins[10]}/{len(exported)} (F1@10); winners: {winners}"
    )
    train_only = {r["seed"]: r for r in by_model.get("knn reference (train)", [])}
    if train_only:  # the READMEs' protocol: the vote fitted on the training split alone
        ratio = np.mean([r[on]["f1@5"] / train_only[r["seed"]][on]["f1@5"] for r in exported])
        lines.append(f"exported / the vote fitted on train only: {ratio:.3f} (F1@5)")
    return lines


def load_set(args, name: str):
    """One shared photo set: (X, its embedder spec, tags per post, X of MobileNetV2 alone for
    the reference vote, posts), embedded once with the product's ensemble (cached)."""
    from hashtag import embedders
    from hashtag.embedders import EmbedderSpec
    from hashtag.metrics import l2_normalize
    from hashtag.sources import open_source

    specs = {"v2": EmbedderSpec.parse("mobilenet_v2"), "v1": EmbedderSpec.parse("mobilenet_v1")}
    posts = list(open_source(str(args.data / name / "posts.jsonl")).posts())
    tags = [p.tags for p in posts]
    # One pass of the product's ensemble embedder; V2 alone is its first block, renormalised.
    both = EmbedderSpec.ensemble([specs["v2"], specs["v1"]])
    full = embed(posts, both, args.cache, name)
    if args.dtype == "float16":  # what the dataset's readers get back from float16 files
        full = full.astype(np.float16).astype(np.float32)
    built = embedders.create_from_spec(both)
    spec = EmbedderSpec.ensemble([built.parts[0].spec, built.parts[1].spec])
    X_v2 = l2_normalize(full[:, : built.parts[0].dim])
    if args.embedders.split(",") == ["v2", "v1"]:
        return full, spec, tags, X_v2, posts
    return X_v2, spec.parts[0], tags, X_v2, posts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = default_shared()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="feedme-food,flickr8k-dev")
    parser.add_argument("--data", type=Path, default=shared / "data")
    parser.add_argument("--embedders", default="v2,v1", help="comma list of v2, v1 (an ensemble)")
    parser.add_argument("--splits", type=int, default=6)
    parser.add_argument(
        "--grid", default="64:1e-3", help="MLP trials batch:lr, comma list ('' none)"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hashtag-quality-cache"))
    parser.add_argument(
        "--dtype",
        default="float32",
        help="float16: round the embeddings as `hashtag merge --dtype float16` stores them",
    )
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument(
        "--design-only",
        action="store_true",
        help="print only the design splits' table (for design experiments: no held-out figure)",
    )
    args = parser.parse_args(argv)
    args.grid = [(int(b), float(lr)) for b, lr in (c.split(":") for c in args.grid.split(",") if c)]
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    lines, everything = [], []
    for name in args.sets.split(","):
        X, spec, tags, X_v2, posts = load_set(args, name)
        held = held_out_mask([p.id for p in posts])
        print(f"{name}: {len(posts)} photos, {int(held.sum())} in the held-out share", flush=True)
        rows = []
        for seed in range(args.splits):
            started = time.perf_counter()
            rows += run_split(args, X, spec, tags, X_v2, held, seed)
            print(
                f"{name} split {seed}: {rows[-1]['winner']} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        lines += summarise(name, rows, args.splits)
        if not args.design_only:
            lines += summarise(name, rows, args.splits, on="held")
        everything += [dict(r, set=name) for r in rows]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2) + "\n")


if __name__ == "__main__":
    main()
