"""Near-duplicate threshold calibration on real photos, and what grouping does to test figures.

    python bench/bench_neardup.py                          # both shared sets, 150 photos copied
    python bench/bench_neardup.py --sets feedme-food --photos 60 --thresholds 0.85,0.9,0.95

For each shared photo set (../shared/data/feedme-food, flickr8k-dev) it embeds every photo with
the product's embedder (the V2 + V1 TFLite ensemble of ../shared/models, through hashtag.ingest,
as bench_quality.py; cached in /tmp; `--embedder classic` for the colour/texture one), then `--photos` of them (seeded) again after each
transformation a repost goes through: JPEG re-encoding (quality 50, 75, 95), resizing (50%,
75%, 200%), cropping (5% and 10% off the sides), mirroring, a colour shift (hue, saturation,
brightness) and a combination (75% + crop 5% + JPEG 70). Cosine similarity on the stored
embeddings, L2-normalised (what merge's near-duplicate search compares).

1. Calibration table: for each threshold, the recall of each transformation (the share of
   copies at or above the threshold from their original) and the false merges: the share of
   the set's distinct photos that have another distinct photo at or above it (they would be
   grouped), and the number of such pairs.
2. Flattering: over `--splits` random 70/15/15 splits, every copied photo's transformed copy
   (one random transformation each) is planted as a new post with the same tags and its own
   split (a hash of its own id, as merge assigns). F1@5 on test of tune's kNN reference (train
   only): without copies, with copies as they fall, and with copies grouped by the product's
   code (neighbours.range_pairs + merge.connected_components at the default threshold: a copy takes its
   group's first post's split).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TRANSFORMS = (
    "jpeg q50", "jpeg q75", "jpeg q95", "resize 50%", "resize 75%", "resize 200%",
    "crop 5%", "crop 10%", "mirror", "colour shift", "75% + crop 5% + q70",
)  # fmt: skip


def transform(image: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """(BGR image, JPEG quality to write it at)."""
    import cv2

    h, w = image.shape[:2]
    if name.startswith("jpeg"):
        return image, int(name.split("q")[1])
    if name.startswith("resize"):
        scale = int(name.split()[1].rstrip("%")) / 100
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA), 90
    if name.startswith("crop"):
        cut = int(name.split()[1].rstrip("%")) / 100 / 2  # half off each side
        dy, dx = round(h * cut), round(w * cut)
        return image[dy : h - dy, dx : w - dx], 90
    if name == "mirror":
        return image[:, ::-1], 90
    if name == "colour shift":
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + 8) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * 1.25, 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] + 20, 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR), 90
    if name == "75% + crop 5% + q70":
        small, _ = transform(image, "resize 75%")
        cropped, _ = transform(small, "crop 5%")
        return cropped, 70
    raise ValueError(name)


def copies(posts: list, chosen: np.ndarray, folder: Path) -> list:
    """Posts of every transformation of every chosen photo, written as JPEG files."""
    import cv2

    from hashtag.posts import Post

    out = []
    for i in chosen.tolist():
        image = cv2.imread(str(posts[i].image), cv2.IMREAD_COLOR)
        for t, name in enumerate(TRANSFORMS):
            changed, quality = transform(image, name)
            path = folder / f"{i}-{t}.jpg"
            cv2.imwrite(
                str(path), np.ascontiguousarray(changed), [cv2.IMWRITE_JPEG_QUALITY, quality]
            )
            out.append(Post(id=f"copy-{i}-{t}", image=str(path), tags=posts[i].tags))
    return out


def calibration(name: str, X: np.ndarray, C: np.ndarray, chosen, thresholds) -> list[str]:
    """X: the set's photos (n, d) unit rows; C: (len(chosen), len(TRANSFORMS), d) their copies."""
    sims = np.einsum("ctd,cd->ct", C, X[chosen])  # copy vs its original
    gram = X @ X.T
    np.fill_diagonal(gram, -1.0)
    header = f"{'transformation':24}" + "".join(f"{t:>8.3f}" for t in thresholds)
    lines = [
        f"\n{name}: {len(X)} photos, {len(chosen)} of them copied {len(TRANSFORMS)} ways; "
        "recall (copies >= threshold from their original)",
        header,
        "-" * len(header),
    ]
    for t, transform_name in enumerate(TRANSFORMS):
        lines.append(
            f"{transform_name:24}"
            + "".join(f"{np.mean(sims[:, t] >= th):8.3f}" for th in thresholds)
        )
    lines.append(f"{'all copies':24}" + "".join(f"{np.mean(sims >= th):8.3f}" for th in thresholds))
    lines.append(
        f"{'false merges (photos)':24}"
        + "".join(f"{np.mean((gram >= th).any(axis=1)):8.4f}" for th in thresholds)
    )
    lines.append(
        f"{'false pairs':24}"
        + "".join(f"{int(np.count_nonzero(np.triu(gram >= th))):8d}" for th in thresholds)
    )
    same = int(np.count_nonzero(np.triu(gram >= 0.99)))
    lines.append(f"(pairs of the set's own photos at >= 0.99, copies already in it: {same})")
    q = np.percentile(sims, [1, 5, 50], axis=0)
    worst = TRANSFORMS[int(np.argmin(q[1]))]
    lines.append(
        f"copy similarity: 1st percentile {np.percentile(sims, 1):.3f}, median "
        f"{np.median(sims):.3f} (hardest: {worst}); distinct photos: max "
        f"{gram.max():.3f}, 99.9th percentile of a photo's nearest {np.percentile(gram.max(1), 99.9):.3f}"
    )
    return lines


def flattering(name, X, C, chosen, tags, spec, splits: int, similarity: float) -> list[str]:
    from bench_quality import SplitData

    from hashtag import merge, models, neighbours, selection

    rng = np.random.default_rng(0)
    picked = rng.integers(len(TRANSFORMS), size=len(chosen))
    planted = C[np.arange(len(chosen)), picked]
    rows = {"without copies": [], "copies as they fall": [], "copies grouped": []}
    moved_counts, leaks = [], []
    for seed in range(splits):
        ids = [f"{seed}-photo-{i}" for i in range(len(X))]
        copy_ids = [f"{seed}-repost-{i}" for i in chosen.tolist()]
        own = merge.assign_split(ids + copy_ids, seed="s", val_fraction=0.15, test_fraction=0.15)
        all_X = np.concatenate([X, planted])
        all_tags = list(tags) + [tags[i] for i in chosen.tolist()]
        # The product's grouping: pairs by range search on one index, groups by components.
        index = neighbours.build(all_X)
        a, b = neighbours.range_pairs(index, all_X, similarity)
        pairs = np.stack([a, b], 1)[a < b].astype(np.uint64)
        grouped = own.copy()
        if len(pairs):
            nodes, roots = merge.connected_components(pairs)
            grouped[nodes.astype(np.int64)] = own[roots.astype(np.int64)]
        moved_counts.append(int(np.count_nonzero(grouped != own)))
        copy_split = own[len(X) :]
        leaks.append(int(np.count_nonzero((copy_split == 2) & (own[chosen] == 0))))
        for label, features, post_tags, split in (
            ("without copies", X, tags, own[: len(X)]),
            ("copies as they fall", all_X, all_tags, own),
            ("copies grouped", all_X, all_tags, grouped),
        ):
            data = SplitData(features, post_tags, split.astype(np.int8), spec)
            knn = models.create("knn", selection.reference_config("knn", 0, spec.blocks))
            knn.fit(*data.part("train"), *data.part("val"))
            rows[label].append(knn.score(*data.part("test"))["f1@5"])
    lines = [
        f"\n{name}: kNN (tune's reference, train only) F1@5 on test over {splits} splits, "
        f"{len(chosen)} copies planted (one random transformation each), grouping at cosine >= "
        f"{similarity}; test copies of a train photo as they fall: {np.mean(leaks):.1f} per split; "
        f"posts moved by grouping: {np.mean(moved_counts):.1f} per split"
    ]
    for label, values in rows.items():
        values = np.array(values)
        lines.append(f"  {label:22} {values.mean():.4f} +- {values.std():.4f}")
    gain = np.array(rows["copies as they fall"]) - np.array(rows["copies grouped"])
    lines.append(f"  flattering removed by grouping: {gain.mean():+.4f} F1@5 ({gain.std():.4f})")
    return lines


def main() -> None:
    from bench_quality import default_shared, embed

    from hashtag import embedders, merge
    from hashtag.embedders import EmbedderSpec
    from hashtag.neighbours import normalised
    from hashtag.sources import open_source

    shared = default_shared()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="feedme-food,flickr8k-dev")
    parser.add_argument("--data", type=Path, default=shared / "data")
    parser.add_argument("--photos", type=int, default=150, help="photos copied per set")
    parser.add_argument("--thresholds", default="0.8,0.85,0.88,0.9,0.92,0.94,0.96")
    parser.add_argument(
        "--embedder", default="v2+v1", help="v2+v1 (the product's ensemble) or classic"
    )
    parser.add_argument("--similarity", type=float, default=0.0, help="0: merge's default")
    parser.add_argument("--splits", type=int, default=6)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hashtag-quality-cache"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if args.embedder == "classic":
        both = spec = EmbedderSpec.parse("classic")
    else:
        both = EmbedderSpec.parse("default")  # the shipped MobileNetV2 + MobileNetV1
        built = embedders.create_from_spec(both)
        spec = EmbedderSpec.ensemble([p.spec for p in built.parts])
    similarity = args.similarity or merge.near_duplicate_similarity(spec)
    lines = []
    for name in args.sets.split(","):
        started = time.perf_counter()
        posts = list(open_source(str(args.data / name / "posts.jsonl")).posts())
        X = normalised(embed(posts, both, args.cache, name))
        chosen = np.sort(np.random.default_rng(1).choice(len(posts), args.photos, replace=False))
        with tempfile.TemporaryDirectory(prefix="hashtag-neardup-") as folder:
            copied = copies(posts, chosen, Path(folder))
            label = f"{name}-copies-{args.photos}"
            C = normalised(embed(copied, both, args.cache, label))
        C = C.reshape(len(chosen), len(TRANSFORMS), -1)
        lines += calibration(name, X, C, chosen, thresholds)
        tags = [p.tags for p in posts]
        lines += flattering(name, X, C, chosen, tags, spec, args.splits, similarity)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
