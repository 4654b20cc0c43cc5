"""The scrape stage: read posts from a source, embed them in parallel Ray tasks, one per shard.

    hashtag scrape --source posts.jsonl --out s3://bucket/run [--embedder default]

Shard i holds posts i*S..(i+1)*S-1 of the source's deterministic order, so a rerun of the same
command finds the same shards and skips the finished ones (those with a manifest). A task that
dies with its worker is retried by Ray; a shard that still fails is reported, the others go on,
and a rerun picks it up.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from hashtag import embedders, ingest, options, shards, sources, storage
from hashtag.errors import UserError
from hashtag.fetch import FetchConfig, Fetcher
from hashtag.posts import Post
from hashtag.results import StageResult
from hashtag.sources import open_source

log = logging.getLogger(__name__)
SUMMARY = "scrape.json"

# What each kind of source reads posts from: said when a source holds none.
LOOKED_FOR = {
    "manifest": "rows with an `image` field (JSON Lines or CSV)",
    "instaloader": "instaloader posts (<date>_UTC.jpg with its .txt caption), searched recursively",
    "legacy-npy": "rows of the *_csvs.npy files",
}


@dataclass(frozen=True)
class ScrapeConfig:
    source: str = field(
        metadata={
            "help": "posts to ingest: a manifest (.jsonl/.csv), an instaloader folder, or "
            "the original project's folder (with --trust-pickle); local or s3://"
        }
    )
    out: str = field(metadata={"help": "output root; shards go to OUT/shards/shard-NNNNN"})
    embedder: tuple[str, ...] = field(
        default=(embedders.DEFAULT,),
        metadata={
            "help": "embedder: default (the MobileNetV2 + MobileNetV1 models shipped with "
            "hashtag, side by side), mobilenet_v2, mobilenet_v1, classic (fast, no weights), "
            "tflite:PATH_OR_URI[#tensor], keras:NAME; repeat the flag (--embedder A --embedder "
            "B) to store every post's vectors of each, side by side",
            "repeatable": True,
        },
    )
    embedder_weights: str = field(
        default="",
        metadata={"help": "keras embedders: imagenet, none, a .weights.h5 path or s3:// URI"},
    )
    shard_size: int = field(default=256, metadata={"help": "posts per shard (one Ray task each)"})
    cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs each embed task asks for"})
    gpus_per_task: float = field(
        default=0.0, metadata={"help": "GPUs each embed task asks for (Keras embedders use it)"}
    )
    max_in_flight: int = field(
        default=0,
        metadata={
            "help": "a fixed number of shard tasks in flight (0: the larger of --min-in-flight "
            "and twice the task slots the cluster has now, recomputed as nodes join or leave)"
        },
    )
    min_in_flight: int = field(
        default=64,
        metadata={
            "help": "shard tasks kept in flight however few CPUs the cluster has now: their "
            "queued demand is what makes the autoscaler launch workers (0 CPUs on the head)"
        },
    )
    max_retries: int = field(
        default=3,
        metadata={
            "help": "retries of a shard task whose worker died (crash, memory monitor) or that "
            "failed; then its posts are skipped and the shard reported as failed"
        },
    )
    memory_per_task_mb: int = field(
        default=1024,
        metadata={
            "help": "memory each embed task declares to Ray (MB), so Ray packs them; 0 declares "
            "none (for node types that do not advertise memory)"
        },
    )
    trust_pickle: bool = field(
        default=False,
        metadata={"help": "allow the original project's pickled .npy files (trusted input only)"},
    )
    max_pixels: int = field(
        default=ingest.MAX_PIXELS, metadata={"help": "largest decoded image, pixels"}
    )
    # The fetch settings offered as options (`--fetch-retries`...): declared in FetchConfig.
    fetch: FetchConfig = field(
        default_factory=FetchConfig,
        metadata={
            "embed": ("allow_private", "timeout_s", "retries", "fetch_deadline_s", "max_bytes")
        },
    )

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise ValueError("--cpus-per-task must be > 0 and --gpus-per-task >= 0")
        if self.memory_per_task_mb < 0:
            raise ValueError(f"--memory-per-task-mb must be >= 0, got {self.memory_per_task_mb}")
        if self.max_retries < 0 or self.max_in_flight < 0:
            raise ValueError("--max-retries and --max-in-flight must be >= 0")
        if self.min_in_flight < 1:
            raise ValueError(f"--min-in-flight must be at least 1, got {self.min_in_flight}")
        names = (self.embedder,) if isinstance(self.embedder, str) else tuple(self.embedder)
        object.__setattr__(self, "embedder", names)
        expanded = embedders.expand(names)
        if not names or len(set(expanded)) != len(expanded):
            raise UserError(f"--embedder: give one or more different embedders, got {names}")
        # Parsed once, here (a clear error for an unknown name), with the task's settings; not
        # a field: the names are the config, the specs what they mean.
        specs = tuple(self.with_task_settings(embedders.EmbedderSpec.parse(n)) for n in expanded)
        object.__setattr__(self, "_embedder_specs", specs)

    def embedder_specs(self) -> list[embedders.EmbedderSpec]:
        """The requested embedders ("default" as its parts), parsed, with the task's settings
        (threads, weights)."""
        return list(self._embedder_specs)

    @property
    def embedder_spec(self) -> embedders.EmbedderSpec:
        """The one spec of the requested embedders (an ensemble of several)."""
        return embedders.EmbedderSpec.ensemble(self._embedder_specs)

    def with_task_settings(self, spec: embedders.EmbedderSpec) -> embedders.EmbedderSpec:
        """The parsed spec with this stage's settings for it (threads, Keras weights)."""
        options: dict = {}
        if self.embedder_weights and spec.kind == "keras":
            options["weights"] = self.embedder_weights
        if spec.kind in embedders.TFLITE_KINDS:
            # The interpreters fill the task's CPUs, not the node's: Ray does not pin tasks to
            # cores, so the default (every CPU visible) would oversubscribe the node. One
            # single-threaded interpreter per CPU, each fed by its own embedding lane: its threads
            # never wait on each other's (bench_embed.py: 1-4% faster than one 2-thread one).
            cpus = max(1, round(self.cpus_per_task))
            options.update(num_threads=cpus, interpreters=cpus)
        return dataclasses.replace(spec, options=(*spec.options, *options.items()))


@dataclass(frozen=True)
class ScrapeResult(StageResult):
    shards_uri: str
    posts_embedded: int
    failed_shards: dict[int, str]

    @property
    def exit_code(self) -> int:
        """1 when a shard failed (a rerun retries it), else 0."""
        return 1 if self.failed_shards else 0


def embed_shard(
    config: ScrapeConfig, index: int, posts: list[Post], label_only: bool, source: dict
) -> dict:
    """Embed one shard and write it (data files first, manifest last). Runs in a Ray task."""
    start = time.perf_counter()
    if label_only:
        result, spec = ingest.label_only(posts), ingest.LABEL_ONLY_SPEC
    else:
        embedder = embedders.cached(config.embedder_spec)
        # One decode thread per CPU the task holds: more would steal cores from other tasks.
        threads = max(1, int(config.cpus_per_task))
        result = ingest.embed_posts(
            posts,
            embedder,
            Fetcher(config.fetch),
            max_pixels=config.max_pixels,
            threads=threads,
        )
        spec = embedder.spec
    stats = {
        "posts_in": len(posts),
        "skipped": dict(result.skipped),
        "skips": [{"id": post_id, "reason": reason} for post_id, reason in result.skips],
        "bytes_read": result.bytes_read,
        "seconds": round(time.perf_counter() - start, 3),
        "source": source,
        "shard_size": config.shard_size,
    }
    return shards.write_shard(
        config.out,
        index,
        result.posts,
        result.embeddings,
        embedder=spec,
        image_sha256=result.image_sha256,
        stats=stats,
    )


# The most the chunks of the tasks in flight may hold (driver's memory, object store), whatever
# the window: a source's rows are capped at 1 MB each, so 64 chunks of 256 such rows would be
# 16 GB; past this bound the driver waits for a task to finish before it submits the next.
PENDING_BYTES = 256 * 2**20
# How often the window follows the cluster's resources (a GCS call), at most.
WINDOW_REFRESH_S = 1.0


def window(config: ScrapeConfig, resources: dict[str, float]) -> int:
    """How many shard tasks to keep in flight, given the cluster's resources now.

    Queued tasks are the demand the autoscaler launches workers for: a window sized once from
    the CPUs present at start (none on a head with CPU 0) would never ask for more than a node
    or two. So it is twice the task slots the cluster has now (one running and one queued per
    slot), at least --min-in-flight, and recomputed as nodes join; --max-in-flight fixes it.
    It grows with the cluster, which the autoscaler's max_workers bounds."""
    if config.max_in_flight:
        return config.max_in_flight
    slots = resources.get("CPU", 0.0) / config.cpus_per_task
    if config.gpus_per_task:
        slots = min(slots, resources.get("GPU", 0.0) / config.gpus_per_task)
    return max(config.min_in_flight, 2 * int(slots))


def _approx_bytes(chunk: list[Post]) -> int:
    """About what a chunk weighs once serialised (cheaper than serialising it)."""
    return sum(
        len(p.id)
        + len(p.image or "")
        + len(p.caption)
        + sum(map(len, p.tags))
        + (len(repr(p.metadata)) if p.metadata else 0)
        + 8 * len(p.embedding or ())
        + 64
        for p in chunk
    )


def _chunks(posts: Iterator[Post], size: int) -> Iterator[tuple[int, list[Post]]]:
    for index in itertools.count():
        chunk = list(itertools.islice(posts, size))
        if not chunk:
            return
        yield index, chunk


def _resumable(config: ScrapeConfig, identity: dict) -> dict[int, dict]:
    """The finished shards a rerun may keep: refuses another source or shard size (mixing them
    would lose or repeat posts); a shard whose files do not match its manifest is rebuilt."""
    summary_uri = storage.join(config.out, SUMMARY)
    recorded = []
    if storage.exists(summary_uri):
        try:
            previous = storage.read_json(summary_uri)
        except (OSError, ValueError, RecursionError):  # damaged: the shard manifests still say
            previous = None
        if isinstance(previous, dict) and "source" in previous:
            recorded.append((previous["source"], previous.get("shard_size"), summary_uri))
    finished = shards.finished_shards(config.out)
    for index, manifest in finished.items():
        if "source" in manifest:
            recorded.append((manifest["source"], manifest.get("shard_size"), f"shard {index}"))
    for source, shard_size, where in recorded:
        if source != identity or shard_size != config.shard_size:
            raise UserError(
                f"{config.out} holds a scrape of another source or shard size ({where}: "
                f"{source}, shard size {shard_size}; now: {identity}, shard size "
                f"{config.shard_size}); mixing them would lose or repeat posts: use a new --out, "
                "or delete the old one"
            )
    kept = {}
    for index, manifest in finished.items():
        problem = shards.verify(config.out, index, manifest)
        if problem:
            log.warning("shard %d is damaged (%s); rebuilding it", index, problem)
            continue
        kept[index] = manifest
    return kept


def run(config: ScrapeConfig) -> ScrapeResult:
    """Scrape and embed every post of `config.source` into shards under `config.out`."""
    import ray

    from hashtag import raycluster

    start = time.perf_counter()
    try:  # an unknown kind, pickled files without --trust-pickle, a manifest that is not JSON
        source = open_source(config.source, trust_pickle=config.trust_pickle)
        posts = iter(source.posts())
        first = next(posts, None)
    except ValueError as error:
        raise UserError(str(error)) from error
    if first is None:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(source.skipped.items()))
        raise UserError(
            f"no posts in {config.source}: looked for "
            f"{LOOKED_FOR.get(source.kind, 'posts')}"
            + (f"; skipped: {skipped}" if skipped else "")
            + "; check the path, or give a manifest (.jsonl/.csv)"
        )
    label_only = first.image is None
    posts = itertools.chain([first], posts)
    identity = sources.identity(config.source)
    finished = _resumable(config, identity)
    raycluster.connect()
    # Ray's own retries are off (max_retries=0 also turns off its OOM retries, which are
    # otherwise unbounded): the driver resubmits a failed shard at most config.max_retries times.
    task = ray.remote(embed_shard).options(
        name="embed_shard",
        num_cpus=config.cpus_per_task,
        num_gpus=config.gpus_per_task,
        memory=config.memory_per_task_mb * 2**20 or None,
        max_retries=0,
        retry_exceptions=False,
        runtime_env=raycluster.worker_env() or None,
    )
    totals: Counter = Counter()
    skipped: Counter = Counter()
    failed: dict[int, str] = {}
    attempts: Counter = Counter()
    in_flight: dict = {}  # ref -> (shard index, its posts, their approximate bytes)
    config_ref = ray.put(config)
    progress = tqdm(desc="scrape", unit="post", dynamic_ncols=True)
    limit = {"tasks": window(config, ray.cluster_resources()), "at": time.monotonic()}

    def submit(index: int, chunk: list[Post], size: int) -> None:
        ref = task.remote(config_ref, index, chunk, label_only, identity)
        in_flight[ref] = (index, chunk, size)
        totals["peak_in_flight"] = max(totals["peak_in_flight"], len(in_flight))

    def full(size: int) -> bool:
        """Whether a chunk of `size` bytes must wait for a task to finish."""
        if time.monotonic() - limit["at"] >= WINDOW_REFRESH_S:
            limit.update(tasks=window(config, ray.cluster_resources()), at=time.monotonic())
        pending = sum(s for _, _, s in in_flight.values())
        return bool(in_flight) and (
            len(in_flight) >= limit["tasks"] or pending + size > PENDING_BYTES
        )

    def collect(ready: list) -> None:
        for ref in ready:
            index, chunk, size = in_flight.pop(ref)
            try:
                manifest = ray.get(ref)
            except Exception as error:  # reported, the other shards go on; a rerun retries it
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                attempts[index] += 1
                if attempts[index] <= config.max_retries:
                    log.warning("shard %d failed (%s); retry %d", index, reason, attempts[index])
                    totals["task_retries"] += 1
                    submit(index, chunk, size)
                    continue
                log.error("shard %d failed after %d retries: %s", index, config.max_retries, reason)
                failed[index] = reason
                skipped["shard-failed"] += len(chunk)
                progress.update(len(chunk))
                continue
            record(manifest, written=True)

    def record(manifest: dict, written: bool) -> None:
        totals["shards_written" if written else "shards_already_done"] += 1
        totals["posts_in"] += manifest.get("posts_in", manifest["count"])
        totals["posts_embedded"] += manifest["count"]
        totals["bytes_read"] += manifest.get("bytes_read", 0)
        skipped.update(manifest.get("skipped", {}))
        progress.update(manifest.get("posts_in", manifest["count"]))
        progress.set_postfix(
            embedded=totals["posts_embedded"],
            skipped=sum(skipped.values()),
            MB=round(totals["bytes_read"] / 1e6, 1),
        )

    for index, chunk in _chunks(posts, config.shard_size):
        totals["shards"] += 1
        if index in finished:
            record(finished[index], written=False)
            continue
        size = _approx_bytes(chunk)
        while full(size):
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            collect(ready)
        submit(index, chunk, size)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        collect(ready)
    progress.close()

    skipped.update({f"source:{reason}": n for reason, n in source.skipped.items()})
    seconds = time.perf_counter() - start
    summary = {
        "stage": "scrape",
        "config": options.flatten(config),
        "source": identity,
        "shard_size": config.shard_size,
        "shards_uri": storage.join(config.out, "shards"),
        **dict(totals),
        "skipped": dict(sorted(skipped.items())),
        "source_warnings": dict(getattr(source, "warnings", {})),
        "failed_shards": failed,
        "seconds": round(seconds, 2),
        "posts_per_second": round(totals["posts_in"] / seconds, 1) if seconds else None,
    }
    storage.write_json(storage.join(config.out, SUMMARY), summary)
    log.info(
        "scrape: %d shards (%d already done), %d posts embedded, %d skipped -> %s",
        totals["shards"],
        totals["shards_already_done"],
        totals["posts_embedded"],
        sum(skipped.values()),
        summary["shards_uri"],
    )
    return ScrapeResult(summary, summary["shards_uri"], totals["posts_embedded"], failed)
