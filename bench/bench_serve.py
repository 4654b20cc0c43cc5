"""Online serving throughput: `hashtag serve` under concurrent clients against the batch path.

    python bench/bench_serve.py                       # MobileNetV2 (TFLite), 1/8/32 clients
    python bench/bench_serve.py --quick               # fewer requests, for a smoke run
    python bench/bench_serve.py --embedder classic    # no TensorFlow

What it does, all in one run on this machine:
1. Builds a real model: the shared food photos (../shared/data/feedme-food) embedded by the
   product's embedder (hashtag.ingest), their tags as labels (tags on >= 2 photos), a kNN fitted
   and exported by `selection.export_model`, into /tmp (never the repository).
2. The batch reference: `hashtag recommend --manifest` (a subprocess, as a user runs it) over
   the photos; images/s end to end, and in steady state (the run of 1 photo subtracted: process
   start, imports, model load); and the same path warm in this process
   (recommend.recommend_stream, second pass), before and after the serving loads.
3. `hashtag serve`'s application (hashtag.serve.start, its own local Ray) on 127.0.0.1, posted
   the raw photo bytes by 1, 8 and 32 concurrent keep-alive clients (threads in this process):
   images/s, p50 and p99 latency; then redeployed with batching off (batch size 1) and the
   same loads again. The redeploy is Serve's rolling update: the clients of a load running
   across it are counted (answers, failures) too.
4. Two replicas under 16 clients, one replica killed (ray.kill) mid-load: every request is
   counted as answered, answered after one retry (a 5xx or a dropped connection), failed, or
   hung (no answer within 30 s).
Peak resident memory (VmHWM) of the Serve processes and of the CLI run are printed.

The machine is shared with other work: the load average is printed before and after, and
the ratios (served / batch, batched / unbatched) are taken within this one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


def build_model(photos: Path, spec_text: str, out: Path) -> tuple[str, list[Path]]:
    """Embed the photos, fit a kNN on their tags, export it like tune: (model URI, photos)."""
    from hashtag import embedders, ingest, models, selection
    from hashtag.dataset import Dataset, DatasetWriter, csr_from_lists
    from hashtag.fetch import FetchConfig, Fetcher
    from hashtag.posts import Post
    from hashtag.report import ResultRow

    rows = [json.loads(line) for line in (photos / "posts.jsonl").read_text().splitlines()]
    posts = [Post(id=str(i), image=str(photos / r["image"]), tags=()) for i, r in enumerate(rows)]
    embedder = embedders.create_from_spec(embedders.EmbedderSpec.parse(spec_text))
    started = time.perf_counter()
    result = ingest.embed_posts(posts, embedder, Fetcher(FetchConfig()), threads=2)
    kept = [int(p.id) for p in result.posts]
    print(f"model: {len(kept)} photos embedded in {time.perf_counter() - started:.1f} s")
    tags = [rows[i]["tags"] for i in kept]
    counts: dict[str, int] = {}
    for post_tags in tags:
        for tag in post_tags:
            counts[tag] = counts.get(tag, 0) + 1
    vocab = sorted((t for t, c in counts.items() if c >= 2), key=lambda t: (-counts[t], t))
    index = {t: i for i, t in enumerate(vocab)}
    indptr, indices = csr_from_lists([sorted(index[t] for t in ts if t in index) for ts in tags])
    split = np.resize(np.array([0, 0, 0, 0, 1], np.uint8), len(kept))
    data = str(out / "dataset")
    with DatasetWriter(data, dim=result.embeddings.shape[1], id_length=8) as writer:
        writer.append(result.embeddings, [str(i) for i in kept], split, indptr, indices)
        writer.finish(
            vocab=vocab, tag_counts=[counts[t] for t in vocab], embedder=embedder.spec.to_json()
        )
    dataset = Dataset.load(data)
    X, Y = dataset.part("train")
    X_val, Y_val = dataset.part("val")
    knn = models.create("knn", models.ModelConfig()).fit(X, Y, X_val, Y_val, vocab=dataset.vocab)
    row = ResultRow(model="knn", val=knn.score(X_val, Y_val))
    uri = selection.export_model(
        dataset, knn, row, out=str(out / "tune"), dataset_uri=data, loss="sigmoid"
    )
    return uri, [Path(posts[i].image) for i in kept]


def batch_reference(model: str, photos: list[Path], out: Path) -> dict:
    """`hashtag recommend --manifest` over the photos, and over one photo (start-up cost)."""

    def timed(files: list[Path], name: str) -> float:
        manifest = out / name
        manifest.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in files))
        command = [sys.executable, "-m", "hashtag.cli", "recommend", "--model", model]
        started = time.perf_counter()
        done = subprocess.run(
            command + ["--manifest", str(manifest), "--json"], capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
        answered = sum('"hashtags"' in line for line in done.stdout.splitlines())
        if answered != len(files):
            raise SystemExit(f"recommend --manifest answered {answered} of {len(files)}")
        return seconds

    one = timed(photos[:1], "one.jsonl")
    every = timed(photos, "all.jsonl")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    steady = (len(photos) - 1) / max(every - one, 1e-9)
    print(
        f"recommend --manifest: {len(photos)} photos in {every:.2f} s = "
        f"{len(photos) / every:.1f} images/s end to end; 1 photo in {one:.2f} s (start-up); "
        f"steady {steady:.1f} images/s; peak RSS {peak_mb:.0f} MB"
    )
    return {"end_to_end": len(photos) / every, "steady": steady, "peak_mb": peak_mb}


def batch_in_process(model: str, manifest: Path) -> float:
    """images/s of the same batch path warm: recommend.recommend_stream over the manifest
    (what `recommend --manifest` runs after its start-up), the second of two passes."""
    from hashtag import recommend

    config = recommend.RecommendConfig(model=model, manifest=str(manifest), json=True)
    for _ in range(2):
        started = time.perf_counter()
        answered = sum("hashtags" in result for result in recommend.recommend_stream(config))
        seconds = time.perf_counter() - started
    return answered / seconds


class Client:
    """One keep-alive HTTP connection posting raw photo bytes."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.connection: http.client.HTTPConnection | None = None

    def post(self, data: bytes, timeout: float = 30.0) -> int:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            self.connection.request(
                "POST",
                "/v1/recommend?k=5",
                body=data,
                headers={
                    "Content-Type": "image/jpeg",
                    "Authorization": f"Bearer {self.token}",
                },
            )
            response = self.connection.getresponse()
            body = response.read()
            if response.status == 200 and b'"hashtags"' not in body:
                return 599
            return response.status
        except TimeoutError:
            self.close()
            return -1  # hung: no answer within the timeout
        except (OSError, http.client.HTTPException):
            self.close()
            return 0  # connection dropped

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def load(port: int, token: str, blobs: list[bytes], clients: int, requests: int) -> dict:
    """`requests` posts spread over `clients` concurrent clients; images/s and latencies."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client(number: int) -> None:
        me = Client(port, token)
        for i in range(number, requests, clients):
            started = time.perf_counter()
            status = me.post(blobs[i % len(blobs)])
            took = time.perf_counter() - started
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(took)
        me.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - started
    ok = statuses.get(200, 0)
    latencies.sort()
    return {
        "clients": clients,
        "requests": requests,
        "ok": ok,
        "statuses": statuses,
        "images_s": ok / seconds,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else float("nan"),
    }


def serve_peaks_mb() -> dict[str, float]:
    """Peak RSS (VmHWM, MB) of Serve's processes below this one (the local Ray it started),
    by role; /proc read by bench_scale's `_processes`."""
    from bench_scale import _processes

    table = _processes()
    below, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier}
        below |= frontier
    roles = {"ray::ServeController": "controller", "ray::ProxyActor": "proxy"}
    peaks = {}
    for pid in sorted(below):
        _, title, hwm = table[pid]
        role = next((r for prefix, r in roles.items() if title.startswith(prefix)), None)
        if title.startswith("ray::ServeReplica"):
            role = f"replica {pid}"
        if role:
            peaks[role] = hwm / 2**20
    return peaks


def kill_one_replica_under_load(port: int, token: str, blobs: list[bytes], seconds: float) -> None:
    """16 clients for `seconds`; a third of the way in, one of two replicas is killed. A 5xx
    or a dropped connection is retried once (after 0.2 s); everything is counted."""
    import ray

    counts = {"answered": 0, "answered after a retry": 0, "failed (5xx/dropped twice)": 0}
    counts["hung (no answer in 30 s)"] = 0
    other: dict[int, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        me = Client(port, token)
        i = number
        while not stop.is_set():
            status = me.post(blobs[i % len(blobs)])
            outcome = "answered"
            if status in (0, 500, 502, 503, 504):
                time.sleep(0.2)
                status = me.post(blobs[i % len(blobs)])
                outcome = "answered after a retry"
                if status != 200:
                    outcome = "failed (5xx/dropped twice)"
            if status == -1:
                outcome = "hung (no answer in 30 s)"
            with lock:
                if status not in (200, 0, 500, 502, 503, 504, -1):
                    other[status] = other.get(status, 0) + 1
                counts[outcome] += 1
            i += 16
        me.close()

    with ThreadPoolExecutor(16) as pool:
        running = [pool.submit(client, n) for n in range(16)]
        time.sleep(seconds / 3)
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "SERVE_REPLICA" in a["name"]
        ]
        victim = sorted(names)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.perf_counter()
        print(f"killed replica {victim.split('#')[-1]} of {len(names)} under load")
        time.sleep(2 * seconds / 3)
        stop.set()
        for future in running:
            future.result()
    total = sum(counts.values())
    print(
        f"replica killed: {total} requests in {seconds:.0f} s: "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + (f"; other statuses {other}" if other else "")
        + f" (load went on {time.perf_counter() - killed_at:.0f} s after the kill)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=default_shared())
    parser.add_argument("--embedder", default="", help="embedder spec (default: MobileNetV2)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=600, help="posts per load (at >= 8)")
    parser.add_argument("--quick", action="store_true", help="120 posts per load, short kill")
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--no-kill", action="store_true", help="skip the killed-replica run")
    args = parser.parse_args()
    requests = 120 if args.quick else args.requests
    photos_dir = args.shared / "data" / "feedme-food"
    spec = args.embedder or f"tflite:{args.shared / 'models' / V2}"
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs, shared with other work)")  # fmt: skip

    from hashtag import serve as hashtag_serve

    work = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    model, photos = build_model(photos_dir, spec, work)
    blobs = [p.read_bytes() for p in photos]
    reference = batch_reference(model, photos, work)
    warm_before = batch_in_process(model, work / "all.jsonl")
    print(f"recommend --manifest's path in this process, warm: {warm_before:.1f} images/s")

    token = "bench-" + os.urandom(16).hex()
    token_file = work / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    # One replica on the 2 CPUs; the proxy and the clients share them.
    config = hashtag_serve.ServeConfig(
        model=model, port=args.port, token_file=str(token_file), replica_cpus=1, threads=2
    )
    started = time.perf_counter()
    hashtag_serve.start(config)
    print(f"serve: started in {time.perf_counter() - started:.1f} s")
    clients = [int(c) for c in args.clients.split(",")]
    results = {}
    for batching in (True, False):
        if not batching:  # a rolling update to batch size 1, under load from 8 clients
            from ray import serve

            swap = ThreadPoolExecutor(1).submit(load, args.port, token, blobs, 8, requests)
            config = hashtag_serve.ServeConfig(
                model=model, port=args.port, token_file=str(token_file), replica_cpus=1,
                threads=2, batch_size=1,
            )  # fmt: skip
            serve.run(hashtag_serve.build(config), name=hashtag_serve.APP_NAME, route_prefix="/")
            during = swap.result()
            print(
                f"rolling update (batching off) under 8 clients: {during['ok']} of "
                f"{during['requests']} answered, statuses {during['statuses']}"
            )
        load(args.port, token, blobs, 4, 16)  # warm-up
        for n in clients:
            result = load(args.port, token, blobs, n, requests if n > 1 else requests // 4)
            results[(batching, n)] = result
            ratio = result["images_s"] / reference["steady"]
            print(
                f"serve batching {'on ' if batching else 'off'} {n:3d} clients: "
                f"{result['images_s']:6.1f} images/s ({ratio:4.0%} of recommend --manifest "
                f"steady), p50 {result['p50_ms']:6.0f} ms, p99 {result['p99_ms']:6.0f} ms, "
                f"statuses {result['statuses']}"
            )
    warm_after = batch_in_process(model, work / "all.jsonl")
    warm = (warm_before + warm_after) / 2
    print(
        f"recommend --manifest's path in this process, warm, after the loads: "
        f"{warm_after:.1f} images/s (mean of before and after: {warm:.1f})"
    )
    top = max(clients)
    for batching in (True, False):
        if (batching, top) in results:
            print(
                f"at {top} clients, batching {'on' if batching else 'off'}: "
                f"{results[(batching, top)]['images_s'] / warm:.0%} of the warm batch path, "
                f"{results[(batching, top)]['images_s'] / reference['steady']:.0%} of "
                "recommend --manifest steady"
            )
    if (True, top) in results and (False, top) in results:
        gain = results[(True, top)]["images_s"] / results[(False, top)]["images_s"]
        print(f"batching on / off at {top} clients: {gain:.2f}x")
    for role, peak in serve_peaks_mb().items():
        print(f"peak RSS {role}: {peak:.0f} MB")

    if not args.no_kill:
        from ray import serve

        config = hashtag_serve.ServeConfig(
            model=model, port=args.port, token_file=str(token_file), replica_cpus=0.5,
            min_replicas=2, max_replicas=2, threads=2,
        )  # fmt: skip
        serve.run(hashtag_serve.build(config), name=hashtag_serve.APP_NAME, route_prefix="/")
        kill_one_replica_under_load(args.port, token, blobs, 15 if args.quick else 30)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()
