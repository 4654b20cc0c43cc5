"""Embedding throughput, end to end: read file, decode, resize/crop, embed. Images per second.

    python bench/bench_embed.py                       # the 603 feedme photos, 1 and 2 CPUs
    python bench/bench_embed.py --quick               # fewer settings and images
    python bench/bench_embed.py --images DIR --models DIR --cpus 2
    python bench/bench_embed.py --only default,classic   # the default embedder, and classic

The pipeline measured is the product's, ingest.embed_posts: a thread pool reads, decodes
(images.decode, which lets libjpeg shrink large photos) and preprocesses while embedding lanes
(one per TFLite interpreter) run embed_batch; OpenCV and the TFLite interpreter release the GIL,
so they overlap. Settings swept: interpreters x threads each (TFLite) and decode threads, on 1
and 2 CPUs; a scrape task of N CPUs runs N single-threaded interpreters and N decode threads. Each CPU count
runs in its own process pinned to that many cores (thread pools take their size from the
affinity at start-up).

The ceiling printed is what these cores can do at best, compared like with like: the model
alone on decoded arrays is measured in every interpreter layout the pipeline is (1 interpreter
x N threads, N interpreters x 1 thread, each lane on its own thread as ingest runs them), and
one thread's decoding; the ceiling of a layout is N / (1/decode + N/model of that layout). The
best pipeline row is reported against the ceiling of its own layout, and the best pipeline over
all settings against the best ceiling over all layouts.
The V2 file is uint8-quantised; the embedder runs it as int8 (cnn._requantize_int8), and the
"uint8 as stored" row is the same pipeline without that rewrite.

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
    interpreters: int = 1  # TFLite interpreters (embedding lanes), sharing interpreter_threads
    decode_threads: int = 1  # ingest's thread pool size
    batch_size: int = 32
    # "pipeline" (ingest.embed_posts), "predict-per-image" (the original project's loop),
    # "model-alone" (embed_batch on decoded arrays), "decode-alone" (one thread, no model)
    pattern: str = "pipeline"


def default_shared() -> Path:
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared"


def cases_for(cpus: int, models: Path, quick: bool) -> list[Case]:
    v2, v1 = f"tflite:{models / V2}", f"tflite:{models / V1}"
    # (interpreters, threads in all, decode threads) for the V2 sweep
    if cpus == 1:
        settings = [(1, 1, 1)] if quick else [(1, 1, 1), (1, 1, 2)]
    elif quick:
        settings = [(1, cpus, cpus), (cpus, cpus, cpus)]
    else:
        settings = [(1, 1, 1), (1, cpus, 1), (1, cpus, cpus), (1, cpus, cpus + 1)]
        settings += [(cpus, cpus, 1), (cpus, cpus, cpus), (cpus, cpus, cpus + 1)]
    # The default embedder (the shipped V2 + V1 side by side), as a scrape task of `cpus` CPUs
    # runs it: one single-threaded interpreter per CPU in each part, `cpus` decode threads.
    cases = [Case("default (V2 + V1, shipped)", "default", {}, cpus, cpus, cpus)]
    cases += [Case("tflite V2", v2, {}, threads, n, decode) for n, threads, decode in settings]
    # What bounds it: the model on decoded arrays, one thread's decoding, and the model file as
    # stored (uint8 kernels, no int8 rewrite) through the same pipeline.
    for n in sorted({n for n, _, _ in settings}):  # every layout the pipeline runs
        cases.append(Case("tflite V2 model alone", v2, {}, cpus, n, 0, 32, "model-alone"))
    cases.append(Case("tflite V2 decode alone", v2, {}, cpus, 1, 1, 32, "decode-alone"))
    # The rest run as a scrape task of `cpus` CPUs does: one interpreter (lane) per CPU.
    uint8 = {"int8": False}
    cases.append(Case("tflite V2 uint8 as stored", v2, uint8, cpus, cpus, cpus))
    cases.append(Case("tflite V1", v1, {}, cpus, cpus, cpus))
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
    """The product's path: ingest.embed_posts (read, decode and preprocess on a thread pool while
    this thread embeds batches). Returns the images embedded."""
    from hashtag import ingest
    from hashtag.fetch import Fetcher
    from hashtag.posts import Post

    posts = [Post(path.stem, str(path), ()) for path in files]
    result = ingest.embed_posts(
        posts, embedder, Fetcher(), threads=decode_threads, batch_size=batch_size
    )
    return len(result.posts)


def run_model_alone(files: list[Path], embedder, batch_size: int) -> tuple[int, float]:
    """embed_batch on arrays decoded beforehand (not timed), on `embedder.lanes` threads as
    ingest runs the lanes: the model's own ceiling in this interpreter layout."""
    from concurrent.futures import ThreadPoolExecutor

    from hashtag import images

    arrays = [
        embedder.preprocess(images.decode(p.read_bytes(), min_side=embedder.min_side))
        for p in files
    ]
    batches = [np.stack(arrays[i : i + batch_size]) for i in range(0, len(arrays), batch_size)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, embedder.lanes)) as pool:
        list(pool.map(embedder.embed_batch, batches))
    return len(arrays), time.perf_counter() - started


def run_decode_alone(files: list[Path], embedder) -> int:
    """Read, decode and preprocess on this one thread: one core's decode rate."""
    from hashtag import images

    for path in files:
        embedder.preprocess(images.decode(path.read_bytes(), min_side=embedder.min_side))
    return len(files)


def run_predict_per_image(files: list[Path], embedder) -> int:
    """The original project's loop: decode in full, resize, one model.predict call per image."""
    import cv2

    for path in files:
        bgr = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        x = embedder.preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))[None].astype(np.float32)
        embedder.model.predict(embedder.preprocess_input(x), verbose=0)
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

    def once(subset: list[Path]) -> tuple[int, float | None]:
        if case.pattern == "predict-per-image":
            return run_predict_per_image(subset, embedder), None
        if case.pattern == "model-alone":
            return run_model_alone(subset, embedder, case.batch_size)
        if case.pattern == "decode-alone":
            return run_decode_alone(subset, embedder), None
        return run_pipeline(subset, embedder, case.decode_threads, case.batch_size), None

    once(files[: case.batch_size * 2])  # warm-up: graph tracing, allocations, file cache
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        count, seconds = once(files)
        rates.append(count / (seconds or time.perf_counter() - started))
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
        # The ceiling's parts get the same repeats as the pipeline (a low one would flatter the
        # pipeline's share of it); only the slow original loop runs once.
        result = measure(case, subset, 1 if case.pattern == "predict-per-image" else args.repeats)
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
        by_label = {r["label"]: r["images_per_s"] for r in mine}
        if v2:
            best = max(v2, key=lambda r: r["images_per_s"])
            print(
                f"{cpus} CPU(s): best tflite V2 {best['images_per_s']:.0f} images/s with "
                f"interpreters {interpreters(best)}, {best['decode_threads']} decode thread(s)"
            )
        alone = {
            r["interpreters"]: r["images_per_s"]
            for r in mine
            if r["label"] == "tflite V2 model alone"
        }
        decode = by_label.get("tflite V2 decode alone")
        if v2 and alone and decode:
            # Every image costs 1/decode core-seconds to decode plus cpus/model to embed (the
            # model's rate measured with all cpus, in one interpreter layout): the most the
            # cores can do end to end in that layout.
            ceiling = {n: cpus / (1 / decode + cpus / rate) for n, rate in alone.items()}
            own = best["interpreters"]
            if own in alone:
                print(
                    f"{cpus} CPU(s): same layout ({interpreters(best)}): model alone "
                    f"{alone[own]:.0f}/s, decoding {decode:.0f}/s per core: ceiling "
                    f"{ceiling[own]:.0f}/s; pipeline at {best['images_per_s'] / ceiling[own]:.0%}"
                )
            top = max(ceiling, key=ceiling.get)
            print(
                f"{cpus} CPU(s): best over best: pipeline {best['images_per_s']:.0f}/s (best of "
                f"{len(v2)} settings) vs ceiling {ceiling[top]:.0f}/s (best of {len(alone)} "
                f"layouts, model alone {alone[top]:.0f}/s with {top} interpreter(s)): "
                f"{best['images_per_s'] / ceiling[top]:.0%}"
            )
        as_scraped = [r for r in v2 if r["interpreters"] == cpus and r["decode_threads"] == cpus]
        if as_scraped and "tflite V2 uint8 as stored" in by_label:
            ratio = as_scraped[0]["images_per_s"] / by_label["tflite V2 uint8 as stored"]
            print(f"{cpus} CPU(s): int8 rewrite vs the uint8 model as stored: {ratio:.2f}x")
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
    parser.add_argument("--only", default="", help="cases whose label starts so, comma list")
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
        cases = cases_for(cpus, args.models, args.quick)
        if args.only:
            cases = [c for c in cases if c.label.startswith(tuple(args.only.split(",")))]
        results += run_pinned(cpus, cases, args)
    print_table(results)
    summarise(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
