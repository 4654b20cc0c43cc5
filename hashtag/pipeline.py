"""The whole job: scrape -> merge -> tune -> export, then a few recommendations.

    hashtag pipeline --demo --out runs/demo          # synthetic posts, no network needed
    hashtag pipeline --source posts.jsonl --out s3://bucket/run

Everything lands under OUT:
    OUT/posts/          the demo posts (an instaloader folder), with --demo
    OUT/shards/         scrape's shards            OUT/scrape.json
    OUT/dataset/        the merged dataset         OUT/dataset/merge.json
    OUT/tune/           Tune tables, plots, model  OUT/tune/tune.json, OUT/tune/model/
    OUT/pipeline.json   this summary

Each stage resumes: finished shards are skipped, merge rewrites the same dataset, and an
interrupted Tune experiment is restored, so rerunning the same command after a crash finishes
the work instead of redoing it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from hashtag import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    out: str = field(metadata={"help": "root URI under which every stage writes (local or s3://)"})
    source: str = field(
        default="",
        metadata={
            "help": "posts to ingest (manifest, instaloader folder, original files); or --demo"
        },
    )
    demo: bool = field(
        default=False,
        metadata={"help": "generate synthetic demo posts under OUT/posts and use them"},
    )
    demo_posts: int = field(default=600, metadata={"help": "how many demo posts --demo generates"})
    embedder: tuple[str, ...] = field(
        default=("classic",),
        metadata={
            "help": "classic, tflite:PATH_OR_URI[#tensor], keras:NAME; repeat the flag for "
            "several embedders side by side",
            "repeatable": True,
        },
    )
    embedder_weights: str = field(
        default="",
        metadata={"help": "keras embedders: imagenet, none, a .weights.h5 path or s3:// URI"},
    )
    shard_size: int = field(default=256, metadata={"help": "posts per shard (one Ray task each)"})
    cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs per embed task"})
    gpus_per_task: float = field(default=0.0, metadata={"help": "GPUs per embed task"})
    trust_pickle: bool = field(
        default=False, metadata={"help": "allow the original project's pickled files"}
    )
    allow_private_addresses: bool = field(
        default=False, metadata={"help": "let image URLs reach private addresses (tests)"}
    )
    vocab_size: int = field(default=1000, metadata={"help": "largest hashtag vocabulary"})
    min_count: int = field(default=2, metadata={"help": "hashtags used by fewer posts are dropped"})
    model: str = field(default="mlp", metadata={"help": "trainable model of the grid: mlp or seed"})
    loss: str = field(default="sigmoid", metadata={"help": "mlp loss: sigmoid or softmax"})
    batch_sizes: tuple[int, ...] = field(
        default=(16, 64, 256), metadata={"help": "grid batch sizes"}
    )
    learning_rates: tuple[float, ...] = field(
        default=(1e-2, 1e-3, 1e-4), metadata={"help": "grid learning rates"}
    )
    epochs: int = field(default=20, metadata={"help": "epochs per trial"})
    cpus_per_trial: float = field(default=1.0, metadata={"help": "CPUs per Tune trial"})
    gpus_per_trial: float = field(
        default=0.0, metadata={"help": "GPUs per Tune trial (fractions share a GPU)"}
    )
    examples: int = field(default=3, metadata={"help": "images to recommend for at the end"})

    def __post_init__(self) -> None:
        if not self.demo and not self.source:
            raise ValueError("give --source URI (posts to ingest) or --demo (synthetic posts)")
        if self.demo and self.source:
            raise ValueError("--demo generates its own posts: drop --source, or drop --demo")
        if self.demo_posts < 10:
            raise ValueError(f"--demo-posts must be at least 10, got {self.demo_posts}")


def _stage(name: str, summaries: dict, func, *args):
    start = time.perf_counter()
    log.info("== %s ==", name)
    result = func(*args)
    summaries[name] = {"seconds": round(time.perf_counter() - start, 2)}
    return result


def _example_images(source_uri: str, count: int) -> tuple[str, ...]:
    """A few photos of the source folder to recommend for, leaving out the demo's broken files."""
    summary_uri = storage.join(source_uri, "demo-summary.json")
    broken = (
        set(storage.read_json(summary_uri).get("bad", {})) if storage.exists(summary_uri) else set()
    )
    found = [
        name
        for name in storage.listdir(source_uri)
        if name.lower().endswith((".jpg", ".jpeg", ".png")) and name.rsplit(".", 1)[0] not in broken
    ]
    step = max(1, len(found) // max(count, 1))
    return tuple(storage.join(source_uri, name) for name in found[::step][:count])


def run(config: PipelineConfig) -> dict:
    from hashtag import demo, merge, raycluster, recommend, scrape, tune

    raycluster.connect()
    start = time.perf_counter()
    stages: dict = {}
    source = config.source
    if config.demo:
        source = storage.join(config.out, "posts")
        _stage("demo", stages, demo.run, demo.DemoConfig(out=source, posts=config.demo_posts))

    scraped = _stage(
        "scrape",
        stages,
        scrape.run,
        scrape.ScrapeConfig(
            source=source,
            out=config.out,
            embedder=config.embedder,
            embedder_weights=config.embedder_weights,
            shard_size=config.shard_size,
            cpus_per_task=config.cpus_per_task,
            gpus_per_task=config.gpus_per_task,
            trust_pickle=config.trust_pickle,
            allow_private_addresses=config.allow_private_addresses,
        ),
    )
    if scraped.get("failed_shards"):
        raise RuntimeError(
            f"{len(scraped['failed_shards'])} shard(s) failed: {scraped['failed_shards']}; "
            "rerun the same command to retry them (finished shards are kept)"
        )
    dataset_uri = storage.join(config.out, "dataset")
    _stage(
        "merge",
        stages,
        merge.run,
        merge.MergeConfig(
            shards=config.out,
            out=dataset_uri,
            vocab_size=config.vocab_size,
            min_count=config.min_count,
        ),
    )
    tune_uri = storage.join(config.out, "tune")
    tuned = _stage(
        "tune",
        stages,
        tune.run,
        tune.TuneConfig(
            data=dataset_uri,
            out=tune_uri,
            model=config.model,
            loss=config.loss,
            batch_sizes=config.batch_sizes,
            learning_rates=config.learning_rates,
            epochs=config.epochs,
            cpus_per_trial=config.cpus_per_trial,
            gpus_per_trial=config.gpus_per_trial,
        ),
    )
    model_uri = storage.join(tune_uri, "model")
    examples = _example_images(source, config.examples) if not config.trust_pickle else ()
    if examples:
        print("\nRecommendations from the exported model:")
        _stage(
            "recommend",
            stages,
            recommend.run,
            recommend.RecommendConfig(model=model_uri, images=examples, k=5),
        )
    summary = {
        "stage": "pipeline",
        "config": asdict(config),
        "stages": stages,
        "outputs": {
            "shards": storage.join(config.out, "shards"),
            "dataset": dataset_uri,
            "tune": tune_uri,
            "results": storage.join(tune_uri, "results.md"),
            "model": model_uri,
        },
        "best": tuned.get("best") if isinstance(tuned, dict) else None,
        "seconds": round(time.perf_counter() - start, 2),
    }
    storage.write_json(storage.join(config.out, "pipeline.json"), summary)
    log.info(
        "pipeline done in %.1f s; results: %s; model: %s",
        summary["seconds"],
        summary["outputs"]["results"],
        model_uri,
    )
    return summary
