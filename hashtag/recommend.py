"""Use an exported model: hashtags for images, hashtag completion, and an evaluation table.

    hashtag recommend --model out/tune/model photo.jpg photos/ s3://bucket/pics/ --k 5
    hashtag recommend --model out/tune/model photo.jpg --tags pizza,dinner     # image + completion
    hashtag recommend --model out/tune/model --tags pizza,dinner               # completion alone
    hashtag recommend --model out/tune/model --manifest posts.jsonl --json    # one line per post
    hashtag evaluate --model out/tune/model --data out/dataset                 # Markdown table

The exported model folder (export.py owns its format; `hashtag tune` writes it through selection.py) is self-contained: the recommender's weights and
decision, its metadata (the embedder spec, the vocabulary) and a co-occurrence model fitted on
the training labels in `cooccurrence/`. Images go through the same fetch -> decode -> embed path
as the scrape (hashtag/ingest.py), with the embedder the model was trained on.

A bad image (missing, corrupt, too large) is an error line for that image; the others go on and
the exit status is 1.

`--manifest POSTS.jsonl` streams posts, one JSON object per line: `image` (optional: relative to
the manifest, a path, s3:// or http(s)), `tags` (the hashtags already written: a list or
"a,b"), `id` (optional; default the line number). One output line per post, carrying its id
and image, in the manifest's order; posts go through in batches of BATCH, so memory does not
grow with the file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hashtag import storage, tags
from hashtag.errors import UserError
from hashtag.export import EMBEDDER_WEIGHTS, ExportedModel  # noqa: F401 (ExportedModel's old home)
from hashtag.fetch import FetchConfig

BATCH = 64  # posts embedded and scored together in --manifest mode
MAX_LINE_BYTES = 1 << 20  # one --manifest line (sources.MAX_ROW_BYTES): longer is an error line
MAX_ECHO_CHARS = 256  # an id or image echoed back in a result is cut to this
MAX_BLOCKLIST_BYTES = 16 << 20
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class RecommendConfig:
    model: str = field(
        metadata={"help": "exported model folder (tune's OUT/model), local or s3://"}
    )
    images: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "images or folders of images: paths, s3:// or http(s) URLs",
            "positional": True,
            "metavar": "IMAGE",
        },
    )
    k: int = field(default=5, metadata={"help": "hashtags per image"})
    min_score: float = field(default=0.0, metadata={"help": "drop hashtags scoring below this"})
    exclude: str = field(
        default="",
        metadata={"help": "hashtags never to suggest: a file with one per line, or tag1,tag2"},
    )
    tags: str = field(
        default="",
        metadata={"help": "hashtags already given (tag1,tag2): complete them, never repeat them"},
    )
    manifest: str = field(
        default="",
        metadata={
            "help": "posts to recommend for, JSON Lines (- for standard input): image "
            "(optional), tags, id (optional)"
        },
    )
    json: bool = field(default=False, metadata={"help": "one JSON object per image and line"})
    completion_weight: float = field(
        default=0.5,
        metadata={"help": "with --tags and an image: weight of the image scores (0..1)"},
    )
    # The fetch settings offered as options (`--fetch-deadline-s`): declared in FetchConfig.
    fetch: FetchConfig = field(
        default_factory=FetchConfig, metadata={"embed": ("fetch_deadline_s",)}
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: the folder tune exported (OUT/model)")
        if isinstance(self.images, str):
            object.__setattr__(self, "images", (self.images,))
        if self.manifest and (self.images or self.tags.strip()):
            raise ValueError(
                "--manifest gives each post's image and tags: drop the IMAGE arguments and --tags"
            )
        if not self.images and not self.tags.strip() and not self.manifest:
            raise ValueError(
                "give at least one IMAGE (file, folder or URL), --tags to complete, "
                "or --manifest POSTS.jsonl"
            )
        if self.k < 1:
            raise ValueError(f"--k must be at least 1, got {self.k}")
        if not math.isfinite(self.min_score):
            raise ValueError(f"--min-score must be a finite number, got {self.min_score}")
        if not 0.0 <= self.completion_weight <= 1.0:
            raise ValueError(f"--completion-weight must be in [0, 1], got {self.completion_weight}")


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = field(metadata={"help": "exported model folder (tune's OUT/model)"})
    data: str = field(metadata={"help": "merged dataset whose test split is scored"})


def parse_tag_list(text: str) -> list[str]:
    """ "#Pizza, dinner" -> ["pizza", "dinner"] (normalised, deduplicated, in order)."""
    out: dict[str, None] = {}  # ordered, O(1) per lookup: 50k given tags stay linear
    for part in text.split(","):
        tag = tags.normalize(part.strip().lstrip("#"))
        if tag:
            out[tag] = None
    return list(out)


def read_blocklist(exclude: str) -> list[str]:
    """`--exclude`: a file (local or s3://) with one tag per line, else comma-separated tags."""
    exclude = exclude.strip()
    if not exclude:
        return []
    looks_like_file = (
        storage.is_remote(exclude) or os.path.sep in exclude or os.path.isfile(exclude)
    )
    if looks_like_file:
        if not storage.exists(exclude):
            raise UserError(f"--exclude file {exclude} does not exist")
        try:
            data = storage.read_bytes(exclude, limit=MAX_BLOCKLIST_BYTES)
        except storage.TooLarge:
            raise UserError(
                f"--exclude file {exclude} is over {MAX_BLOCKLIST_BYTES} bytes"
            ) from None
        lines = data.decode("utf-8", errors="replace").splitlines()
        return parse_tag_list(
            ",".join(line for line in lines if not line.lstrip().startswith("//"))
        )
    return parse_tag_list(exclude)


def expand_images(locations: tuple[str, ...]) -> list[str]:
    """Files and URLs as given; a folder (local or s3://) becomes its image files, sorted."""
    found: list[str] = []
    for location in locations:
        if location.startswith(("http://", "https://")):
            found.append(location)
            continue
        if _is_folder(location):
            names = [n for n in storage.listdir(location) if n.lower().endswith(IMAGE_SUFFIXES)]
            found.extend(storage.join(location, n) for n in names)
        else:
            found.append(location)
    return found


def _is_folder(location: str) -> bool:
    try:
        fs, path = storage.filesystem(location)
        return fs.isdir(path)
    except Exception:  # an unreachable location is reported when it is fetched
        return False


def top_hashtags(
    scores: np.ndarray, vocab: list[str], k: int, min_score: float = 0.0
) -> list[list[dict[str, Any]]]:
    """Per row, the k best {"tag", "score"} with score >= min_score; -inf means never."""
    scores = np.atleast_2d(np.asarray(scores, np.float32))
    k = min(k, scores.shape[1])
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = []
    for row, columns in zip(scores, best, strict=True):
        out.append(
            [
                {"tag": vocab[c], "score": round(float(row[c]), 4)}
                for c in columns
                if np.isfinite(row[c]) and row[c] >= min_score
            ]
        )
    return out


def _image_scores(
    exported: ExportedModel, images: list[str], fetch: FetchConfig | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Scores (V,) of every image that could be embedded, and the reason for every other one."""
    from hashtag import ingest
    from hashtag.fetch import Fetcher
    from hashtag.posts import Post

    if not images:
        return {}, {}
    if not exported.has_images:
        reason = "this model was trained on labels only (no image embedder): give tags alone"
        return {}, dict.fromkeys(images, reason)
    posts = [Post(id=str(n), image=location, tags=()) for n, location in enumerate(images)]
    fetcher = Fetcher(fetch or FetchConfig())
    result = ingest.embed_posts(posts, exported.embedder, fetcher, threads=4)
    errors = {images[int(post_id)]: reason for post_id, reason in result.skips}
    if not result.posts:
        return {}, errors
    scores = np.asarray(exported.recommender.predict_scores(result.embeddings), np.float32)
    return {p.image: s for p, s in zip(result.posts, scores, strict=True)}, errors


@dataclass(frozen=True)
class Query:
    """One post to recommend for: an image and/or the tags already written."""

    image: str | None
    given: tuple[str, ...] = ()
    id: str | None = None  # set in --manifest mode, echoed in the output
    error: str = ""  # a manifest line that could not be read


def _recommend_batch(
    exported: ExportedModel, queries: list[Query], config: RecommendConfig, blocked: np.ndarray
) -> list[dict[str, Any]]:
    """One result per query, in order: {"image", "hashtags"} (plus "id", "given") or "error"."""
    images = sorted({q.image for q in queries if q.image and not q.error})
    scores, errors = _image_scores(exported, images, config.fetch)
    results = []
    for query in queries:
        result: dict[str, Any] = {} if query.id is None else {"id": query.id}
        result["image"] = query.image
        if query.given or query.image is None:
            result["given"] = list(query.given)
        if query.error or (query.image is not None and query.image not in scores):
            result["error"] = query.error or errors.get(query.image, "not embedded")
            results.append(result)
            continue
        image = None if query.image is None else scores[query.image]
        result["hashtags"] = suggest(
            exported,
            image,
            query.given,
            blocked,
            k=config.k,
            min_score=config.min_score,
            completion_weight=config.completion_weight,
        )
        results.append(result)
    return results


def suggest(
    exported: ExportedModel,
    image_scores: np.ndarray | None,
    given: Iterable[str],
    blocked: np.ndarray,
    *,
    k: int,
    min_score: float = 0.0,
    completion_weight: float = 0.5,
) -> list[dict[str, Any]]:
    """The k best {"tag", "score"} for one post: its image's model scores (V,) or None, and the
    tags already written (normalised), completed by co-occurrence when given or alone. Blocked
    and given tags are never suggested. The one rule behind `recommend` and `serve`."""
    given = list(given)
    given_mask, _ = exported.tag_mask(given)  # unknown tags cannot help: ignored
    if given or image_scores is None:
        row = exported.cooccurrence.combine(
            None if image_scores is None else np.asarray(image_scores)[None, :],
            given_mask[None, :],
            completion_weight,
        )[0]
    else:
        row = np.asarray(image_scores, np.float32)
    row = np.where(blocked | given_mask, -np.inf, row)  # a given tag is never suggested again
    return top_hashtags(row, exported.vocab, k, min_score)[0]


def read_manifest(uri: str) -> Iterator[Query]:
    """The posts of a JSON Lines manifest (`-`: standard input), streamed line by line, each
    line read with at most MAX_LINE_BYTES in memory; a bad line is a Query with its error
    (which never quotes the line)."""
    if uri == "-":
        yield from queries(sys.stdin.buffer, ".")
        return
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise UserError(f"--manifest {uri}: no such file; give a JSON Lines file of posts")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    with fs.open(path, "rb") as f:
        yield from queries(f, base)


def queries(lines, base: str) -> Iterator[Query]:
    for number, line in storage.bounded_lines(lines, MAX_LINE_BYTES):
        if line is None:
            error = f"bad line: over {MAX_LINE_BYTES} bytes"
            yield Query(image=None, id=f"line {number}", error=error)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON object per line, got {type(row).__name__}")
            yield _query(row, number, base)
        except (ValueError, RecursionError) as error:  # also UnicodeDecodeError, deep nesting
            message = str(error)[:MAX_ECHO_CHARS]
            yield Query(image=None, id=f"line {number}", error=f"bad line: {message}")


def _query(row: dict, number: int, base: str) -> Query:
    post_id = row.get("id")
    if post_id is None or post_id == "":
        post_id = number
    if not isinstance(post_id, (str, int, float)) or isinstance(post_id, bool):
        raise ValueError("`id` must be a string or a number")
    if len(str(post_id)) > MAX_ECHO_CHARS:
        raise ValueError(f"`id` is over {MAX_ECHO_CHARS} characters")
    image = row.get("image") or None
    given = row.get("tags") or []
    if not isinstance(image, (str, type(None))):
        raise ValueError(f"`image` must be a string, got {type(image).__name__}")
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not all(isinstance(t, str) for t in given):
        raise ValueError("`tags` must be a list of strings or a string 'a,b'")
    if image and "://" not in image and not image.startswith("/"):
        image = storage.join(base, image) if storage.is_remote(base) else os.path.join(base, image)
    return Query(image=image, given=tuple(parse_tag_list(",".join(given))), id=str(post_id))


def recommend_stream(config: RecommendConfig) -> Iterator[dict[str, Any]]:
    """Results in input order, computed BATCH queries at a time (memory bounded by a batch)."""
    exported = ExportedModel(config.model)
    blocked, _ = exported.tag_mask(read_blocklist(config.exclude))
    if config.manifest:
        queries: Iterable[Query] = read_manifest(config.manifest)
    else:
        given = tuple(parse_tag_list(config.tags))
        unknown = exported.tag_mask(list(given))[1]
        if unknown:
            names = ", ".join(unknown)
            print(f"note: not in the model's vocabulary, ignored: {names}", file=sys.stderr)
        if config.images:
            images = expand_images(config.images)
            if not images:
                error = "no image files found"
                queries = [Query(image=", ".join(config.images), given=given, error=error)]
            else:
                queries = [Query(image=image, given=given) for image in images]
        else:
            queries = [Query(image=None, given=given)]
    queries = iter(queries)
    for batch in iter(lambda: list(itertools.islice(queries, BATCH)), []):
        yield from _recommend_batch(exported, batch, config, blocked)


def recommend(config: RecommendConfig) -> list[dict[str, Any]]:
    """One result per image or post (or one for completion alone): {"image", "hashtags"} or
    {"image", "error"}; with --manifest also "id" and "given"."""
    return list(recommend_stream(config))


def format_result(result: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(result, ensure_ascii=False)
    name = result["image"]
    if name is None:
        name = "given " + " ".join(f"#{t}" for t in result.get("given", []))
    if result.get("id") is not None:
        name = f"{result['id']} ({name})"
    if "error" in result:
        return f"{name}: error: {result['error']}"
    if not result["hashtags"]:
        return f"{name}: (no hashtag above the minimum score)"
    return f"{name}: " + "  ".join(f"#{h['tag']} {h['score']:.2f}" for h in result["hashtags"])


def run(config: RecommendConfig) -> int:
    """Print the recommendations as they come; exit status 0, or 1 when any post failed."""
    failed = 0
    for result in recommend_stream(config):
        failed += "error" in result
        print(format_result(result, config.json), flush=True)
    return 1 if failed else 0


SCORE_ROWS = 8192  # posts scored at a time by `evaluate`


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Score the model and the popularity baseline on the test split; print the decision table.
    A completion model (label-only posts) is scored as tune scores it: on held-out tags."""
    from hashtag import models
    from hashtag.dataset import Dataset
    from hashtag.report import ResultRow, decision_markdown, results_table

    exported = ExportedModel(config.model)
    dataset = Dataset.load(config.data)  # a missing dataset says so (FileNotFoundError)
    if list(dataset.vocab) != exported.vocab:
        raise UserError(
            f"{config.data} has a different hashtag vocabulary than the model {config.model}: "
            "evaluate on the dataset the model was trained on"
        )
    if exported.embedder_spec != dataset.embedder:
        raise UserError(
            f"the dataset's embedder {dataset.embedder} is not the model's {exported.embedder_spec}"
        )
    test_posts = dataset.split_count("test")
    if test_posts == 0:
        raise UserError(f"{config.data} has no test posts")
    if exported.has_images:
        # Streamed, SCORE_ROWS posts at a time (a remote dataset by ranged reads): memory does
        # not grow with the dataset. Popularity counts the training labels only.
        popularity = models.create("popularity", models.ModelConfig())
        train_labels = models.Blocks(
            lambda order: dataset.blocks("train", SCORE_ROWS, order, embeddings=False),
            dataset.split_count("train"),
            dataset.dim,
            dataset.vocab_size,
        )
        popularity.fit(train_labels, None)
        meta = exported.metadata
        rows = [
            ResultRow(
                model=meta.get("model", exported.recommender.name),
                batch_size=meta.get("batch_size"),
                learning_rate=meta.get("learning_rate"),
                epochs=meta.get("epochs"),
                test=exported.recommender.score_blocks(dataset.blocks("test", SCORE_ROWS)),
            ),
            ResultRow(
                model="popularity",
                test=popularity.score_blocks(dataset.blocks("test", SCORE_ROWS)),
            ),
        ]
    else:
        rows = _completion_rows(exported, dataset.part("train")[1], dataset.part("test")[1])
    print(decision_markdown(rows), end="")
    table = results_table(rows)
    return {"model": config.model, "data": config.data, "test_posts": test_posts, "table": table}


def _completion_rows(exported: ExportedModel, Y_train, Y_test) -> list:
    """The exported completion against popularity and plain co-occurrence, on held-out tags."""
    from hashtag.completion import PLAIN, held_out, popularity_scores, score_suggestions
    from hashtag.report import ResultRow

    given, hidden = held_out(Y_test)
    frequency = np.asarray(Y_train, bool).mean(axis=0)
    scorers = {
        "completion": exported.cooccurrence.scores_given,
        "cooccurrence": exported.cooccurrence.with_config(PLAIN).scores_given,
        "popularity": lambda g: popularity_scores(frequency, g),
    }
    return [
        ResultRow(model=n, test=score_suggestions(f(given), hidden)) for n, f in scorers.items()
    ]
