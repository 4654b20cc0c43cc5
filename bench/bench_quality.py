"""Recommendation quality on real photos: every model of the grid and the references, per embedder.

    python bench/bench_quality.py                          # feedme-food, classic + MobileNetV2
    python bench/bench_quality.py --embedders classic --epochs 5
    python bench/bench_quality.py --posts posts.jsonl --models DIR --out runs/quality

For each embedder it runs the product's own stages on a local Ray: scrape (embed every photo into
shards), merge (vocabulary, the hash split: 70/15/15), then one Tune grid per trainable model
(mlp by default; `--trainable mlp,seed` adds the original's method, whose batch size 16 trains
on every image x hashtag cell and takes ~20 minutes a trial here) with the popularity and kNN
references. It prints F1@k and P@k on merge's test split for every row, marks the trial each
grid picks on validation, and ends with the picked model against kNN and popularity. The test
split of 603 photos is ~85 posts, so `--splits 3` repeats merge and the grids with other split
salts and reports the mean and how often the picked model beat kNN. Stages resume, so a rerun
only redoes what changed. `--min-count N` sets merge's vocabulary (tags on >= N posts; default
2): absolute F1 rises as rare tags leave the label space, so compare rows of one vocabulary.
`--dtype float16` merges half-size embeddings (into dataset-float16 folders beside the float32
ones), to compare their quality on the same splits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
V2 = "mobilenet_v2_1.0_224_quant.tflite"


def default_shared() -> Path:
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared"


def run_embedder(args: argparse.Namespace, embedder: str, label: str) -> list[dict]:
    from hashtag import merge, scrape, storage, tune

    root = storage.join(str(args.out), label)
    scrape.run(scrape.ScrapeConfig(source=str(args.posts), out=root, embedder=embedder))
    rows = []
    for split in range(args.splits):
        # Split 0 is merge's default split; the others reshuffle with another salt.
        salt = "hashtag" if split == 0 else f"hashtag-{split}"
        dataset = storage.join(root, "dataset" if split == 0 else f"dataset-{split}")
        if args.dtype != "float32":
            dataset += f"-{args.dtype}"
        merge.run(
            merge.MergeConfig(
                shards=root, out=dataset, seed=salt, min_count=args.min_count, dtype=args.dtype
            )
        )
        for model in args.trainable:
            summary = tune.run(
                tune.TuneConfig(
                    data=dataset,
                    out=storage.join(
                        root,
                        f"tune-{model}"
                        + (f"-{split}" if split else "")
                        + (f"-{args.dtype}" if args.dtype != "float32" else ""),
                    ),
                    model=model,
                    epochs=args.epochs,
                    batch_sizes=tuple(args.batch_sizes),
                    learning_rates=tuple(args.learning_rates),
                )
            )
            best = summary["best"]
            for trial in summary["trials"]:
                cell = (trial["batch_size"], trial["learning_rate"])
                picked = cell == (best["batch_size"], best["learning_rate"])
                rows.append(dict(trial, embedder=label, split=split, picked=picked))
            if model == args.trainable[0]:
                rows += [
                    dict(r, embedder=label, split=split, picked=False)
                    for r in summary["references"]
                ]
    return rows


def print_table(rows: list[dict], ks: tuple[int, ...]) -> None:
    columns = [f"{m}@{k}" for k in ks for m in ("f1", "p")] + ["f1"]
    header = f"{'embedder':10} {'model':24} " + " ".join(f"{c:>7}" for c in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        name = r["model"]
        if r.get("batch_size"):
            name += f" bs {r['batch_size']} lr {r['learning_rate']:g}"
        name += " *" if r["picked"] else ""
        cells = " ".join(f"{r['test'].get(c, float('nan')):7.3f}" for c in columns)
        print(f"{r['embedder']:10} {name:24} {cells}")
    print("* the trial the grid picks on validation F1 (and exports)")


def summarise(rows: list[dict], ks: tuple[int, ...]) -> None:
    """The picked trial against kNN and popularity: mean over splits, and wins per split."""
    for embedder in dict.fromkeys(r["embedder"] for r in rows):
        mine = [r for r in rows if r["embedder"] == embedder]
        splits = sorted({r["split"] for r in mine})
        for model in dict.fromkeys(r["model"] for r in mine if r["picked"]):
            for k in ks:
                metric = f"f1@{k}"
                ours, knn, pop = ([] for _ in range(3))
                for split in splits:
                    here = [r for r in mine if r["split"] == split]
                    ours += [r["test"][metric] for r in here if r["model"] == model and r["picked"]]
                    knn += [r["test"][metric] for r in here if r["model"] == "knn"]
                    pop += [r["test"][metric] for r in here if r["model"] == "popularity"]
                wins = sum(o > n for o, n in zip(ours, knn, strict=True))
                print(
                    f"{embedder}: picked {model} F1@{k} {np.mean(ours):.3f} = "
                    f"{np.mean(ours) / np.mean(knn):.2f}x kNN ({np.mean(knn):.3f}), "
                    f"{np.mean(ours) / np.mean(pop):.2f}x popularity ({np.mean(pop):.3f}); "
                    f"above kNN on {wins} of {len(splits)} split(s)"
                )


def main() -> None:
    shared = default_shared()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--posts", type=Path, default=shared / "data" / "feedme-food" / "posts.jsonl"
    )
    parser.add_argument("--models", type=Path, default=shared / "models")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quality")
    parser.add_argument(
        "--embedders", default="classic,v2", help="comma list of classic, v2 or registry names"
    )
    parser.add_argument(
        "--trainable", default="mlp", help="grid models, comma list (seed: slow, see docstring)"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-sizes", default="16,64,256")
    parser.add_argument("--learning-rates", default="1e-2,1e-3,1e-4")
    parser.add_argument(
        "--splits", type=int, default=1, help="train/val/test splits (merge salts) to average"
    )
    parser.add_argument(
        "--min-count",
        type=int,
        default=2,
        help="merge's vocabulary: tags on at least this many posts (fewer rare tags, higher F1)",
    )
    parser.add_argument(
        "--dtype", default="float32", help="merge's embedding dtype: float32 or float16"
    )
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.trainable = args.trainable.split(",")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.learning_rates = [float(r) for r in args.learning_rates.split(",")]
    if not args.posts.is_file():
        raise SystemExit(f"no posts at {args.posts}: pass --posts posts.jsonl")
    names = {"classic": "classic", "v2": f"tflite:{args.models / V2}"}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows = []
    for item in args.embedders.split(","):
        label = item if item in names else item.replace(":", "-").replace("/", "-")[-24:]
        rows += run_embedder(args, names.get(item, item), label)
    ks = (5, 10)
    print()
    print_table([r for r in rows if r["split"] == 0], ks)
    summarise(rows, ks)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
