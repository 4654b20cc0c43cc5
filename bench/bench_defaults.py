"""What a new user gets: the defaults end to end on real photos, against the floors.

    python bench/bench_defaults.py                          # both shared photo sets
    python bench/bench_defaults.py --sets feedme-food --tune-args "--epochs 5"

For each shared photo set it runs the command line as a user would, with no embedder flag (so
the default embedder, the two MobileNets shipped with the package) and no option beyond the
paths: `hashtag scrape`, `hashtag merge`, `hashtag tune`, then `hashtag recommend --manifest`
on the photos of the dataset's test split (each photo fetched, decoded and embedded again by
the exported model's embedder, as for a new photo). It prints F1@5 on those test photos of:

- the exported model (from `recommend`'s suggestions; beside it, the same model scored on the
  stored embeddings of the same rows, as tune's table does),
- popularity: the 5 tags most used on the training and validation posts,
- the plain kNN vote of the data READMEs: cosine similarity on the uncentred MobileNetV2 block
  of the same embeddings, 20 neighbours, weights exp(10 x similarity), fitted on training +
  validation (the rows the exported model learns from).

F1@5 is the per-photo mean of 2 hits / (5 + true tags) over test photos with a tag in the
vocabulary (hashtag/metrics.py). One split (merge's), so differences of a few thousandths are
noise: bench_quality.py has the 6-split comparison. Each stage's wall time is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def default_shared() -> Path:
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared"


def hashtag(*argv: str, stdout=None) -> float:
    """One `hashtag` command in its own process; its wall time (fails loudly on error)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    for _ in range(3):  # each stage resumes; a local Ray that could not start is retried
        done = subprocess.run(
            [sys.executable, "-m", "hashtag.cli", *argv],
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        if "timed out during startup" not in done.stderr:  # Ray's 30 s, on a loaded machine
            break
    if done.returncode not in (0, 1) or (done.returncode and argv[0] != "recommend"):
        raise SystemExit(f"hashtag {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def f1_at_5_of_suggestions(lines: list[str], ids: list[str], Y: np.ndarray, vocab: list[str]):
    """F1@5 of recommend's JSON lines against the dataset's labels of the same posts."""
    from hashtag import metrics

    column = {tag: j for j, tag in enumerate(vocab)}
    row_of = {post_id: i for i, post_id in enumerate(ids)}
    scores = np.zeros(Y.shape, np.float32)
    answered = np.zeros(len(ids), bool)
    for line in lines:
        result = json.loads(line)
        if "error" in result:
            continue
        i = row_of[str(result["id"])]
        answered[i] = True
        for rank, suggestion in enumerate(result["hashtags"]):
            # Rank, not score: exactly the 5 suggested tags count, in their order.
            scores[i, column[suggestion["tag"]]] = len(vocab) - rank
    return metrics.at_k(Y, scores, ks=(5,))["f1@5"], int(answered.sum())


def run_set(name: str, args: argparse.Namespace) -> list[str]:
    from hashtag import models
    from hashtag.dataset import Dataset
    from hashtag.metrics import l2_normalize
    from hashtag.recommend import ExportedModel
    from hashtag.sources import open_source

    source = args.data / name / "posts.jsonl"
    out = args.out / name
    seconds = {}
    seconds["scrape"] = hashtag("scrape", "--source", str(source), "--out", str(out))
    seconds["merge"] = hashtag("merge", "--shards", str(out), "--out", str(out / "dataset"))
    tune = ["tune", "--data", str(out / "dataset"), "--out", str(out / "tune")]
    seconds["tune"] = hashtag(*tune, *shlex.split(args.tune_args))

    dataset = Dataset.load(str(out / "dataset"))
    spec = dataset.embedder
    ids = [str(i) for i in dataset.ids]
    test = dataset.rows("test")
    posts = {p.id: p for p in open_source(str(source)).posts()}
    manifest = out / "test-posts.jsonl"
    manifest.write_text(
        "".join(json.dumps({"id": ids[i], "image": posts[ids[i]].image}) + "\n" for i in test)
    )
    suggestions = out / "test-suggestions.jsonl"
    model = str(out / "tune" / "model")
    with open(suggestions, "w") as file:
        seconds["recommend"] = hashtag(
            "recommend", "--model", model, "--manifest", str(manifest), "--json", stdout=file
        )
    Y = dataset.labels()
    test_ids = [ids[i] for i in test]
    exported, answered = f1_at_5_of_suggestions(
        suggestions.read_text().splitlines(), test_ids, Y[test], dataset.vocab
    )
    # The same model on the stored embeddings of the same rows (what tune's table reports).
    exported_model = ExportedModel(model)
    stored = exported_model.recommender.score(dataset.embeddings[test], Y[test])["f1@5"]

    # The floors, on the same rows and labels, fitted on train + validation.
    known = np.concatenate([dataset.rows("train"), dataset.rows("val")])
    popularity = models.create("popularity").fit(dataset.embeddings[known], Y[known])
    v2 = spec.blocks[0] if spec.blocks else dataset.dim
    X_v2 = l2_normalize(dataset.embeddings[:, :v2])
    plain = models.ModelConfig(knn_neighbours=20, knn_temperature=10.0, prior_weight=0.0)
    knn = models.create("knn", plain).fit(X_v2[known], Y[known])
    f1 = {
        "exported (recommend on the test photos)": exported,
        "exported (stored embeddings of the same rows)": stored,
        "popularity": popularity.score(dataset.embeddings[test], Y[test])["f1@5"],
        "kNN vote (V2, 20, exp(10 s))": knn.score(X_v2[test], Y[test])["f1@5"],
    }
    meta = exported_model.metadata
    lines = [
        f"\n{name}: {len(ids)} posts ({len(test)} test photos, {answered} answered by recommend), "
        f"{dataset.vocab_size} tags, embedder {spec} ({dataset.dim}-d)",
        "stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        f"exported model: {meta.get('model', exported_model.recommender.name)}",
        f"{'':44} {'F1@5':>7} {'x kNN':>6} {'x pop':>6}",
    ]
    for label, value in f1.items():
        ratios = (
            f"{value / f1['kNN vote (V2, 20, exp(10 s))']:6.3f} {value / f1['popularity']:6.3f}"
        )
        lines.append(f"{label:44} {value:7.4f} {ratios}")
    return lines


def main() -> None:
    shared = default_shared()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="feedme-food,flickr8k-dev")
    parser.add_argument("--data", type=Path, default=shared / "data")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hashtag-bench-defaults"))
    parser.add_argument("--tune-args", default="", help="extra `hashtag tune` flags (none)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    lines = []
    for name in args.sets.split(","):
        started = time.perf_counter()
        lines += run_set(name, args)
        print("\n".join(lines[-8:]), f"\n({time.perf_counter() - started:.0f} s)", flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
