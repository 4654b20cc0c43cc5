"""The whole job: scrape -> merge -> tune -> export, then a few recommendations.

    hashtag pipeline --demo --out runs/demo          # synthetic posts, no network needed
    hashtag pipeline --source posts.jsonl --out s3://bucket/run --tune.epochs 10
    hashtag pipeline --config job.yaml               # scrape: {...}, merge: {...}, tune: {...}

Every option of every stage is settable here: `--SECTION.OPTION` (`--scrape.max-retries 5`,
`--tune.batch-sizes 16,64`) or a `SECTION:` mapping in the YAML file. What the pipeline derives
(scrape's --out, merge's --shards and --out, tune's --data and --out, recommend's --model) is not
an option. The whole configuration is validated before any work starts.

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

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from hashtag import options, storage
from hashtag.errors import UserError
from hashtag.merge import MergeConfig
from hashtag.recommend import RecommendConfig
from hashtag.results import StageResult
from hashtag.scrape import ScrapeConfig
from hashtag.tune import TuneConfig

log = logging.getLogger(__name__)


def _section(config_cls: type, derived: tuple[str, ...], help_text: str):
    """A stage's whole config inside PipelineConfig. `derived` fields are filled by the pipeline
    (merge's --shards is scrape's --out...), so they are no options of `hashtag pipeline`; every
    other field is `--SECTION.OPTION` on the command line and `SECTION: {OPTION: ...}` in YAML."""
    return field(
        default=None,
        metadata={"section": config_cls, "derived": derived, "help": help_text},
    )


@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline's own options, then one section per stage. A section may be given as a
    mapping of options (the CLI, YAML) or as the stage's config; either way __post_init__ builds
    and validates every stage's config with the derived fields filled, before any work starts."""

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
    examples: int = field(default=3, metadata={"help": "images to recommend for at the end"})
    scrape: ScrapeConfig = _section(
        ScrapeConfig, ("source", "out"), "source and out come from --source/--demo and --out"
    )
    merge: MergeConfig = _section(
        MergeConfig, ("shards", "out"), "shards is OUT, out is OUT/dataset"
    )
    tune: TuneConfig = _section(TuneConfig, ("data", "out"), "data is OUT/dataset, out is OUT/tune")
    recommend: RecommendConfig = _section(
        RecommendConfig,
        ("model", "images", "manifest"),
        "model is OUT/tune/model, images a few of the posts",
    )

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise UserError("--out is required: the root URI every stage writes under")
        if not self.demo and not self.source:
            raise UserError("give --source URI (posts to ingest) or --demo (synthetic posts)")
        if self.demo and self.source:
            raise UserError("--demo generates its own posts: drop --source, or drop --demo")
        if self.demo_posts < 10:
            raise UserError(f"--demo-posts must be at least 10, got {self.demo_posts}")
        if self.examples < 0:
            raise UserError(f"--examples must be >= 0, got {self.examples}")
        derived = {
            "scrape": {"source": self.posts_uri, "out": self.out},
            "merge": {"shards": self.out, "out": storage.join(self.out, "dataset")},
            "tune": {"data": storage.join(self.out, "dataset"), "out": self.tune_uri},
            # The example images are chosen after the scrape; validated with the source.
            "recommend": {"model": self.model_uri, "images": (self.posts_uri,), "manifest": ""},
        }
        for f in dataclasses.fields(self):
            config_cls = f.metadata.get("section")
            if config_cls is None:
                continue
            given = getattr(self, f.name)
            try:
                if isinstance(given, config_cls):
                    built = dataclasses.replace(given, **derived[f.name])
                else:  # a mapping of options (the CLI, YAML)
                    given = dict(given or {})
                    clash = sorted(set(given) & set(derived[f.name]))
                    if clash:
                        raise TypeError(f"{', '.join(clash)} is set by the pipeline")
                    built = options.build(config_cls, {**given, **derived[f.name]})
            except TypeError as error:  # an unknown or derived option in the mapping
                raise UserError(f"{f.name}: {error}") from None
            except ValueError as error:
                raise UserError(f"{f.name}: {error}") from None
            object.__setattr__(self, f.name, built)

    @property
    def posts_uri(self) -> str:
        return storage.join(self.out, "posts") if self.demo else self.source

    @property
    def tune_uri(self) -> str:
        return storage.join(self.out, "tune")

    @property
    def model_uri(self) -> str:
        return storage.join(self.tune_uri, "model")


@dataclass(frozen=True)
class PipelineResult(StageResult):
    model: str
    failed: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _stage(name: str, summaries: dict, func, *args):
    start = time.perf_counter()
    log.debug("== %s ==", name)
    result = func(*args)
    summaries[name] = {"seconds": round(time.perf_counter() - start, 2)}
    return result


def _example_images(source_uri: str, count: int) -> tuple[str, ...]:
    """A few photos of the source folder to recommend for, leaving out the demo's broken files."""
    fs, path = storage.filesystem(source_uri)
    if count < 1 or not fs.isdir(path):  # a manifest source: no folder of photos to pick from
        return ()
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


def run(config: PipelineConfig) -> PipelineResult:
    from hashtag import demo, merge, recommend, scrape, tune

    start = time.perf_counter()
    stages: dict = {}
    if config.demo:
        _stage(
            "demo", stages, demo.run, demo.DemoConfig(out=config.posts_uri, posts=config.demo_posts)
        )

    scraped = _stage("scrape", stages, scrape.run, config.scrape)
    if scraped.failed_shards:
        raise RuntimeError(
            f"{len(scraped.failed_shards)} shard(s) failed: {scraped.failed_shards}; "
            "rerun the same command to retry them (finished shards are kept)"
        )
    _stage("merge", stages, merge.run, config.merge)
    tuned = _stage("tune", stages, tune.run, config.tune)
    if tuned.exit_code:
        failed: tuple[str, ...] = tuple(tuned.failed) or ("tune",)
    else:
        failed = ()
    examples = _example_images(config.posts_uri, config.examples)
    if examples and tuned.model and tuned.has_images:
        print("\nRecommendations from the exported model:")
        _stage(
            "recommend",
            stages,
            recommend.run,
            dataclasses.replace(config.recommend, images=examples),
        )
    summary: dict[str, Any] = {
        "stage": "pipeline",
        "config": options.flatten(config),
        "stages": stages,
        "outputs": {
            "shards": storage.join(config.out, "shards"),
            "dataset": config.merge.out,
            "tune": config.tune_uri,
            "results": storage.join(config.tune_uri, "results.md"),
            "model": tuned.model,
        },
        "best": tuned.get("best"),
        "seconds": round(time.perf_counter() - start, 2),
    }
    storage.write_json(storage.join(config.out, "pipeline.json"), summary)
    log.info(
        "pipeline done in %.0f s; results: %s; model: %s",
        summary["seconds"],
        summary["outputs"]["results"],
        tuned.model or "(none)",
    )
    return PipelineResult(summary, tuned.model, failed)
