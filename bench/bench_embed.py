"""Embedding throughput, end to end: read file, decode, resize/crop, embed. Images per second.

    python bench/bench_embed.py                       # the 603 feedme photos, 1 and 2 CPUs
    python bench/bench_embed.py --quick               # fewer settings and images
    python bench/bench_embed.py --images DIR --models DIR --cpus 2

The pipeline measured is ingest.py's: a thread pool reads, decodes (images.decode, which lets
libjpeg shrink large photos) and preprocesses while the main thread runs embed_batch; OpenCV and
the TFLite interpreter release the GIL, so the two overlap. Settings swept: interpreter threads
(TFLite) and decode threads, on 1 and 2 CPUs. Each CPU count runs in its own process pinned to
that many cores (thread pools take their size from the affinity at start-up).

Next to it, the original project's pattern: one Keras `model.predict` call per image (VGG19 at
64x64, block3_conv3 raveled), against our batched call of the same model on the same photos.
Keras models use random weights (no download here); speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
V2 = "mobilenet_v2_1.0_224_quant.tflite"
V1 = "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"


@dataclass(frozen=True)
class Case:
    label: str
    embedder: str  # registry name
    options: dict = field(default_factory=dict)  # options for embedders.create
    interpreter_threads: int | None = None  # TFLite num_threads (in all)
    interpreters: int = 1  # TFLite interpreters side by side, sharing interpreter_threads
    decode_threads: int = 1  # 0: decode in the main thread, no overlap
    batch_size: int = 32
    pattern: str = "pipeline"  # or "predict-per-image" (the original project's)


def default_shared() -> Path:
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared"


def cases_for(cpus: int, models: Path, quick: bool) -> list[Case]:
    v2, v1 = f"tflite:{models / V2}", f"tflite:{models / V1}"
    # (interpreters, threads in all, decode threads) for the V2 sweep
    if cpus == 1:
        settings = [(1, 1, 1)] if quick else [(1, 1, 0), (1, 1, 1), (1, 1, 2)]
    elif quick:
        settings = [(1, cpus, cpus), (cpus, cpus, cpus)]
    else:
        settings = [(1, 1, 1), (1, cpus, 1), (1, cpus, cpus), (1, cpus, cpus + 1)]
        settings += [(cpus, cpus, 1), (cpus, cpus, cpus), (cpus, cpus, cpus + 1)]
    cases = [Case("tflite V2", v2, {}, threads, n, decode) for n, threads, decode in settings]
    cases.append(Case("tflite V1", v1, {}, cpus, 1, cpus))
    cases.append(Case("classic", "classic", {}, None, 1, cpus))
    random_weights = {"weights": None}
    cases.append(
        Case("keras mobilenet_v3_small", "keras:mobilenet_v3_small", random_weights, None, 1, cpus)
    )
    vgg = {"weights": None, "pooled": False}
    cases.append(Case("keras vgg19_block3 batched", "keras:vgg19_block3", vgg, None, 1, cpus, 64))
    cases.append(
        Case(
            "keras vgg19_block3 predict/image",
            "keras:vgg19_block3",
            vgg,
            None,
            1,
            0,
            1,
            "predict-per-image",
        )  # fmt: skip
    )
    return cases


def run_pipeline(files: list[Path], embedder, decode_threads: int, batch_size: int) -> int:
    """ingest.py's pattern: decode on a pool, embed batches on this thread. Returns images done."""
    from hashtag import images

    def load(path: Path) -> np.ndarray:
        rgb = images.decode(path.read_bytes(), min_side=embedder.min_side)
        return embedder.preprocess(rgb)

    done = 0
    with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool:
        arrays = pool.map(load, files) if decode_threads else map(load, files)
        batch: list[np.ndarray] = []
        for array in arrays:
            batch.append(array)
            if len(batch) == batch_size:
                done += len(embedder.embed_batch(np.stack(batch)))
                batch = []
        if batch:
            done += len(embedder.embed_batch(np.stack(batch)))
    return done


def run_predict_per_image(files: list[Path], embedder) -> int:
    """The original project's loop: decode in full, resize, one model.predict call per image."""
    import cv2

    for path in files:
        bgr = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        x = embedder.preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))[None].astype(np.float32)
        embedder.model.predict(embedder._preprocess_input(x), verbose=0)
    return len(files)


def measure(case: Case, files: list[Path], repeats: int) -> dict:
    from hashtag import embedders

    options = dict(case.options)
    if case.interpreter_threads is not None:
        options["num_threads"] = case.interpreter_threads
        options["interpreters"] = case.interpreters
    started = time.perf_counter()
    embedder = embedders.create(case.embedder, **options)
    load_seconds = time.perf_counter() - started

    def once(subset: list[Path]) -> int:
        if case.pattern == "predict-per-image":
            return run_predict_per_image(subset, embedder)
        return run_pipeline(subset, embedder, case.decode_threads, case.batch_size)

    once(files[: case.batch_size * 2])  # warm-up: graph tracing, allocations, file cache
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        count = once(files)
        rates.append(count / (time.perf_counter() - started))
    return {
        **asdict(case),
        "images": len(files),
        "dim": embedder.dim,
        "images_per_s": max(rates),  # best of the repeats: other work on the machine only slows
        "load_s": load_seconds,
    }


def worker(args: argparse.Namespace) -> None:
    """Run the cases of one CPU count in this (pinned) process; print one JSON line each."""
    files = sorted(Path(args.images).glob("*.jpg"))[: args.limit or None]
    for raw in json.loads(args.cases):
        case = Case(**raw)
        subset = files[: args.original_limit or None] if case.pattern != "pipeline" else files
        result = measure(case, subset, 1 if case.pattern != "pipeline" else args.repeats)
        result["cpus"] = len(os.sched_getaffinity(0))
        print("RESULT " + json.dumps(result), flush=True)


def run_pinned(cpus: int, cases: list[Case], args: argparse.Namespace) -> list[dict]:
    command = [
        sys.executable, __file__, "--worker", "--images", str(args.images),
        "--repeats", str(args.repeats), "--limit", str(args.limit),
        "--original-limit", str(args.original_limit),
        "--cases", json.dumps([asdict(c) for c in cases]),
    ]  # fmt: skip
    cores = sorted(os.sched_getaffinity(0))[:cpus]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    process = subprocess.run(
        command, env=env, capture_output=True, text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )  # fmt: skip
    results = [
        json.loads(line[7:]) for line in process.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if process.returncode != 0:
        sys.stderr.write(process.stderr[-3000:])
        raise SystemExit(f"benchmark worker for {cpus} CPU(s) failed (exit {process.returncode})")
    return results


def interpreters(result: dict) -> str:
    """'2 x 1 thread': interpreters side by side x threads each."""
    count = result["interpreters"]
    each = max(1, result["interpreter_threads"] // count)
    return f"{count} x {each} thr"


def print_table(results: list[dict]) -> None:
    header = (
        f"{'embedder':34} {'cpus':>4} {'interpreters':>12} {'decode':>6} {'batch':>5} "
        f"{'dim':>6} {'img/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        interp = interpreters(r) if r["interpreter_threads"] is not None else "-"
        print(
            f"{r['label']:34} {r['cpus']:>4} {interp:>12} {r['decode_threads']:>6} "
            f"{r['batch_size']:>5} {r['dim']:>6} {r['images_per_s']:>7.1f}"
        )


def summarise(results: list[dict]) -> None:
    for cpus in sorted({r["cpus"] for r in results}):
        mine = [r for r in results if r["cpus"] == cpus]
        v2 = [r for r in mine if r["label"] == "tflite V2"]
        if v2:
            best = max(v2, key=lambda r: r["images_per_s"])
            print(
                f"{cpus} CPU(s): best tflite V2 {best['images_per_s']:.0f} images/s with "
                f"interpreters {interpreters(best)}, {best['decode_threads']} decode thread(s)"
            )
        batched = [r for r in mine if r["label"] == "keras vgg19_block3 batched"]
        original = [r for r in mine if r["pattern"] == "predict-per-image"]
        if batched and original:
            ratio = batched[0]["images_per_s"] / original[0]["images_per_s"]
            print(
                f"{cpus} CPU(s): vgg19_block3 batched {batched[0]['images_per_s']:.0f} vs "
                f"predict per image {original[0]['images_per_s']:.1f} images/s: {ratio:.0f}x"
            )


def main() -> None:
    shared = default_shared()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=shared / "data" / "feedme-food" / "images")
    parser.add_argument("--models", type=Path, default=shared / "models")
    parser.add_argument("--cpus", type=str, default="1,2", help="CPU counts to pin to, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=2, help="passes per case; the best counts")
    parser.add_argument("--limit", type=int, default=0, help="use the first N photos (0: all)")
    parser.add_argument(
        "--original-limit", type=int, default=0, help="photos for predict-per-image (0: all)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer settings, 200 photos")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not any(args.images.glob("*.jpg")):
        raise SystemExit(f"no .jpg photos in {args.images}: pass --images DIR")
    if not (args.models / V2).is_file():
        raise SystemExit(f"{V2} is not in {args.models}: pass --models DIR")
    if args.quick:
        args.limit, args.original_limit, args.repeats = (
            args.limit or 200,
            args.original_limit or 60,
            1,
        )
    available = len(os.sched_getaffinity(0))
    counts = [int(c) for c in args.cpus.split(",") if 0 < int(c) <= available]
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {available} CPU(s)", flush=True)
    results = []
    for cpus in counts:
        results += run_pinned(cpus, cases_for(cpus, args.models, args.quick), args)
    print_table(results)
    summarise(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
