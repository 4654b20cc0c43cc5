"""Online suggestions: an exported model behind a Ray Serve HTTP endpoint.

    hashtag serve --model runs/demo/tune/model                      # http://127.0.0.1:8000
    hashtag serve --model s3://.../model --host 0.0.0.0 --token-file /etc/hashtag/token
    serve deploy infra/serve.yaml                                   # a cluster: `app` below

API (version 1; every error is a 4xx/5xx with one JSON line {"error": ..., "reason": ...}):

    GET  /healthz                 {"status": "ok", "model": ID}          (no token needed)
    GET  /v1/model                {"id", "kind", "selected", "vocab_size", "embedder", "exported",
                                   "images", "completion"}
    POST /v1/recommend            JSON {"image": URL|null, "image_base64": ..., "tags": [...],
                                   "k": 5}, a multipart form (file field `image`, fields `tags`
                                   "a,b" and `k`), or the raw image bytes (Content-Type image/*,
                                   ?tags=a,b&k=5) -> {"hashtags": [{"tag", "score"}], "model": ID}
    POST /v1/recommend/batch      {"posts": [post, ...] (at most MAX_BATCH_POSTS), "k": 5} ->
                                  {"results": [{"hashtags"} | {"error", "reason"}], "model": ID}
                                  in order (a post's "id" echoed in its result)

The answers are `hashtag recommend`'s: images go through export.ExportedModel.prepare (the scrape's
admission: images.decode's format gating, pixel cap and decode limits), ExportedModel.
image_scores (embed + predict) and recommend.suggest (completion, blocklist, top k), the same
functions `recommend` uses. Only the embed + predict step is batched across requests
(`@serve.batch`); fetching, decoding and preprocessing run in a thread pool meanwhile.

Facing strangers: a bearer token (read from a file, compared in constant time) unless the
server is bound to loopback; the body capped on Content-Length and again while streaming it;
image URLs fetched only over http(s) through hashtag.fetch (private addresses refused unless
allowed, metadata addresses always, a deadline); a per-request deadline (504); Serve's queue
bounded (503 when full). Replicas autoscale between min and max on ongoing requests.

This module is orchestration (Ray Serve); the pure core it calls is recommend.py / models/.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from ray import serve

from hashtag import options, storage
from hashtag.artifacts import MANIFEST, MAX_MANIFEST_BYTES
from hashtag.errors import UserError
from hashtag.fetch import FetchConfig

log = logging.getLogger(__name__)

APP_NAME = "hashtag"
DEPLOYMENT = "Hashtags"
MAX_BATCH_POSTS = 32  # posts in one /v1/recommend/batch request
MAX_K = 100
MAX_TAGS = 100  # tags given with one post
MAX_TOKEN_BYTES = 4096

# How a replica fetches an image URL: few retries, short waits, few redirects, a deadline of 5 s
# (--fetch-deadline-s); ServeConfig fits the per-read timeout and the size cap to a request.
REPLICA_FETCH = FetchConfig(
    timeout_s=5.0,
    retries=1,
    backoff_s=0.2,
    max_backoff_s=1.0,
    max_redirects=3,
    fetch_deadline_s=5.0,
)


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(
        metadata={"help": "exported model folder (tune's OUT/model), local or s3://"}
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to listen on; anything but loopback needs --token-file"},
    )
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    token_file: str = field(
        default="",
        metadata={
            "help": "file holding the bearer token clients must send (Authorization: Bearer "
            "TOKEN); required unless --host is loopback, where it turns auth on"
        },
    )
    k: int = field(default=5, metadata={"help": "hashtags per post when a request gives no k"})
    min_score: float = field(default=0.0, metadata={"help": "drop hashtags scoring below this"})
    exclude: str = field(
        default="",
        metadata={"help": "hashtags never to suggest: a file with one per line, or tag1,tag2"},
    )
    completion_weight: float = field(
        default=0.5, metadata={"help": "with tags and an image: weight of the image scores"}
    )
    max_body_mb: float = field(
        default=16.0, metadata={"help": "largest request body accepted (MB)"}
    )
    max_pixels: int = field(
        default=50_000_000, metadata={"help": "largest image accepted (pixels, from its header)"}
    )
    request_timeout_s: float = field(
        default=10.0, metadata={"help": "deadline of one request, fetching included (seconds)"}
    )
    # The fetch settings offered as options (`--fetch-deadline-s`, `--allow-private-addresses`):
    # declared in FetchConfig; __post_init__ fits the rest to the request's budget.
    fetch: FetchConfig = field(
        default_factory=lambda: REPLICA_FETCH,
        metadata={"embed": ("fetch_deadline_s", "allow_private")},
    )
    batch_size: int = field(
        default=32, metadata={"help": "images embedded together (1: no batching)"}
    )
    batch_wait_ms: float = field(
        default=5.0, metadata={"help": "longest wait for a batch to fill (milliseconds)"}
    )
    min_replicas: int = field(default=1, metadata={"help": "fewest replicas"})
    max_replicas: int = field(default=1, metadata={"help": "most replicas (autoscaled)"})
    target_ongoing_requests: float = field(
        default=16.0, metadata={"help": "requests per replica the autoscaler aims at"}
    )
    max_ongoing_requests: int = field(
        default=64, metadata={"help": "requests a replica takes at once (fills its batches)"}
    )
    max_queued_requests: int = field(
        default=256, metadata={"help": "requests waiting for a replica; beyond: 503"}
    )
    replica_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per replica"})
    threads: int = field(default=4, metadata={"help": "fetch/decode threads per replica"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: the folder tune exported (OUT/model)")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be 1..65535, got {self.port}")
        if not is_loopback(self.host) and not self.token_file:
            raise ValueError(
                f"--host {self.host} faces the network: give --token-file FILE (a secret "
                "clients send as `Authorization: Bearer`), or serve on 127.0.0.1"
            )
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"--k must be 1..{MAX_K}, got {self.k}")
        if not np.isfinite(self.min_score):
            raise ValueError(f"--min-score must be a finite number, got {self.min_score}")
        if not 0.0 <= self.completion_weight <= 1.0:
            raise ValueError(f"--completion-weight must be in [0, 1], got {self.completion_weight}")
        for name in ("max_body_mb", "request_timeout_s", "replica_cpus"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        deadline = self.fetch.fetch_deadline_s
        if deadline >= self.request_timeout_s:
            raise ValueError("--fetch-deadline-s must be shorter than --request-timeout-s")
        # An image URL gets what a request has: each read and attempt within the fetch
        # deadline, at most as many bytes as a request body.
        fitted = dataclasses.replace(
            self.fetch,
            timeout_s=min(REPLICA_FETCH.timeout_s, deadline),
            attempt_deadline_s=deadline,
            max_bytes=self.max_body_bytes,
        )
        object.__setattr__(self, "fetch", fitted)
        if self.max_pixels < 1 or self.threads < 1 or self.batch_size < 1:
            raise ValueError("--max-pixels, --threads and --batch-size must be at least 1")
        if self.batch_wait_ms < 0:
            raise ValueError("--batch-wait-ms must be >= 0")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= --min-replicas <= --max-replicas")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            raise ValueError("--target-ongoing-requests and --max-ongoing-requests must be > 0")
        if self.max_queued_requests < 1:
            raise ValueError("--max-queued-requests must be at least 1")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)

    @property
    def token_required(self) -> bool:
        return bool(self.token_file) or not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> bytes:
    """The bearer token: the file's content without surrounding whitespace (as Ray's own
    token file); refused when empty, over 4 KB, or readable by everybody."""
    try:
        info = os.stat(path)
        with open(path, "rb") as f:
            token = f.read(MAX_TOKEN_BYTES + 1).strip()
    except OSError as error:
        raise UserError(f"--token-file {path}: {error.strerror or error}") from None
    if info.st_mode & 0o004:
        raise UserError(f"--token-file {path} is readable by everybody: chmod 600 it")
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise UserError(f"--token-file {path} must hold one token (1 to 4096 bytes)")
    return token


# requests ---------------------------------------------------------------------------------------


class ClientError(Exception):
    """A request we refuse: HTTP status, a short reason slug, a one-line message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class PostRequest:
    """One post to suggest for, validated: image bytes or an http(s) URL, the given tags."""

    image_url: str | None = None
    image_bytes: bytes | None = None
    tags: tuple[str, ...] = ()
    k: int = 5


def _int_field(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ClientError(400, "bad-field", f"`{name}` must be an integer in {low}..{high}")
    return value


def _tags_field(value: Any) -> tuple[str, ...]:
    from hashtag.recommend import parse_tag_list

    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ClientError(400, "bad-field", "`tags` must be a list of strings or 'a,b'")
    if len(value) > MAX_TAGS or any(len(t) > 200 for t in value):
        raise ClientError(400, "bad-field", f"`tags`: at most {MAX_TAGS}, 200 characters each")
    return tuple(parse_tag_list(",".join(value)))


def parse_post(row: Any, default_k: int) -> PostRequest:
    """A JSON post: {"image": URL|null, "image_base64": str|null, "tags": [...], "k": n}."""
    if not isinstance(row, dict):
        raise ClientError(400, "bad-json", "a post is a JSON object")
    unknown = set(row) - {"image", "image_base64", "tags", "k", "id"}
    if unknown:
        raise ClientError(400, "bad-field", f"unknown field(s): {', '.join(sorted(unknown))}")
    url, encoded = row.get("image"), row.get("image_base64")
    if url is not None and encoded is not None:
        raise ClientError(400, "bad-field", "give `image` (a URL) or `image_base64`, not both")
    data = None
    if url is not None:
        if not isinstance(url, str) or urlsplit(url).scheme.lower() not in ("http", "https"):
            raise ClientError(400, "bad-url", "`image` must be an http(s) URL")
    if encoded is not None:
        if not isinstance(encoded, str):
            raise ClientError(400, "bad-field", "`image_base64` must be a string")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError(400, "bad-base64", "`image_base64` is not valid base64") from None
    k = _int_field(row.get("k", default_k), "k", 1, MAX_K)
    return PostRequest(image_url=url, image_bytes=data, tags=_tags_field(row.get("tags")), k=k)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ClientError(400, "bad-json", f"malformed JSON: {message}") from None


_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.I)
_FIELD_NAME = re.compile(r'(?:^|;)\s*name="([^"]*)"', re.I)


def parse_multipart(body: bytes, content_type: str, max_parts: int = 16) -> dict[str, bytes]:
    """The fields of a multipart/form-data body (already capped): name -> bytes. Linear in the
    body (bytes.find), at most `max_parts` parts, part headers at most 8 KB: the standard
    library's email parser takes seconds on a 15 MB upload and minutes on many tiny parts."""
    found = _BOUNDARY.search(content_type)
    if not found:
        raise ClientError(400, "bad-multipart", "multipart/form-data without a boundary")
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    position = body.find(delimiter)
    if position < 0:
        raise ClientError(400, "bad-multipart", "malformed multipart body: no boundary in it")
    position += len(delimiter)
    fields: dict[str, bytes] = {}
    for _ in range(max_parts + 1):
        if body.startswith(b"--", position):  # the closing delimiter
            return fields
        if not body.startswith(b"\r\n", position) or len(fields) == max_parts:
            break
        head_end = body.find(b"\r\n\r\n", position + 2, position + 2 + 8192)
        end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            break
        headers = body[position + 2 : head_end].decode("latin-1").split("\r\n")
        for header in headers:
            key, _, value = header.partition(":")
            if key.strip().lower() == "content-disposition":
                name = _FIELD_NAME.search(value)
                if name:
                    fields.setdefault(name.group(1), body[head_end + 4 : end])
        position = end + 2 + len(delimiter)
    raise ClientError(
        400, "bad-multipart", f"malformed multipart body (or more than {max_parts} parts)"
    )


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(400, "bad-field", f"`{name}` is not UTF-8 text") from None


def error_body(reason: str, message: str) -> dict[str, str]:
    return {"error": " ".join(str(message).split())[:500], "reason": reason}


# the replica ------------------------------------------------------------------------------------


# A new model (another export URI) rolls out a quarter of the replicas at a time, each
# replacement started and healthy before the replica it replaces stops (surge, no downtime).
@serve.deployment(name=DEPLOYMENT, rolling_update_percentage=0.25, max_surge_percent=25)
class Hashtags:
    """One replica: the exported model, its embedder, the HTTP routes."""

    def __init__(self, settings: dict[str, Any]):
        from hashtag import recommend
        from hashtag.export import ExportedModel
        from hashtag.fetch import Fetcher

        self.config = config = options.build(ServeConfig, settings)
        if config.token_required and not config.token_file:
            raise UserError("token auth is on but no token_file was given")
        self._token = read_token(config.token_file) if config.token_file else None
        self.exported = exported = ExportedModel(config.model)
        self.blocked, _ = exported.tag_mask(recommend.read_blocklist(config.exclude))
        self.has_completion = True
        try:
            _ = exported.cooccurrence  # loaded now, not by the first request
        except Exception as error:  # an export without cooccurrence/: images only
            log.warning("%s: no completion (%s)", storage.redact(config.model), error)
            self.has_completion = False
        if exported.has_images:
            _ = exported.embedder  # built (weights loaded) before the first request
        self.fetcher = Fetcher(config.fetch)
        self._pool = ThreadPoolExecutor(config.threads, thread_name_prefix="prepare")
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._score_batch.set_max_batch_size(config.batch_size)
        self._score_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        self.info = self._model_info()
        self.model_id = self.info["id"]
        log.info("serving %s (%s)", storage.redact(config.model), self.model_id)

    def _model_info(self) -> dict[str, Any]:
        exported, meta = self.exported, self.exported.metadata
        manifest = storage.read_bytes(
            storage.join(self.config.model, MANIFEST), limit=MAX_MANIFEST_BYTES
        )
        kind = str(meta.get("model") or exported.recommender.name)
        return {
            "id": f"{kind}-{hashlib.sha256(manifest).hexdigest()[:12]}",
            "kind": kind,
            "selected": meta.get("selected"),
            "vocab_size": len(exported.vocab),
            "embedder": exported.embedder_spec.to_json(),
            "exported": _exported_at(self.config.model),
            "images": exported.has_images,
            "completion": self.has_completion,
        }

    async def __call__(self, request) -> Any:
        from starlette.responses import JSONResponse

        started = time.monotonic()
        try:
            status, body = await asyncio.wait_for(
                self._route(request), timeout=self.config.request_timeout_s
            )
        except ClientError as error:
            status, body = error.status, error_body(error.reason, str(error))
        except TimeoutError:
            status = 504
            body = error_body(
                "deadline", f"not answered within {self.config.request_timeout_s:g} s"
            )
        except Exception as error:  # ours: logged here, one line to the client
            log.exception("request failed: %s", type(error).__name__)
            status, body = 500, error_body("internal", "internal error; the server logged it")
        if status >= 400:
            log.info(
                "%s %s -> %d %s (%.0f ms)",
                request.method,
                request.url.path,
                status,
                body.get("reason"),
                1000 * (time.monotonic() - started),
            )
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)

    async def _route(self, request) -> tuple[int, dict[str, Any]]:
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {
            "/healthz": ("GET", self._healthz, False),
            "/v1/model": ("GET", self._model, True),
            "/v1/recommend": ("POST", self._recommend, True),
            "/v1/recommend/batch": ("POST", self._recommend_batch, True),
        }
        if path not in routes:
            raise ClientError(404, "not-found", f"no route {path[:100]}; see /v1/recommend")
        allowed, handler, needs_token = routes[path]
        if needs_token:
            self._check_token(request.headers.get("authorization", ""))
        if method != allowed:
            raise ClientError(405, "method", f"{path} takes {allowed}")
        return 200, await handler(request)

    def _check_token(self, header: str) -> None:
        if self._token is None:
            return
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        good = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), self._token
        )
        if not good:
            raise ClientError(401, "unauthorized", "send `Authorization: Bearer TOKEN`")

    async def _healthz(self, request) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id}

    async def _model(self, request) -> dict[str, Any]:
        return dict(self.info)

    async def _recommend(self, request) -> dict[str, Any]:
        post = await self._read_post(request)
        return {"hashtags": await self._answer(post), "model": self.model_id}

    async def _recommend_batch(self, request) -> dict[str, Any]:
        self._check_json_type(request)
        envelope = await self._run(parse_json, await self._read_body(request))
        if not isinstance(envelope, dict) or not isinstance(envelope.get("posts"), list):
            raise ClientError(400, "bad-json", 'expected {"posts": [post, ...], "k": n}')
        rows = envelope["posts"]
        if not 1 <= len(rows) <= MAX_BATCH_POSTS:
            raise ClientError(400, "too-many-posts", f"give 1 to {MAX_BATCH_POSTS} posts")
        k = _int_field(envelope.get("k", self.config.k), "k", 1, MAX_K)

        async def one(row: Any) -> dict[str, Any]:
            # A post's own "id" (a string or a number) is echoed to help match the answers.
            post_id = row.get("id") if isinstance(row, dict) else None
            result = {"id": post_id} if isinstance(post_id, (str, int)) else {}
            try:
                result["hashtags"] = await self._answer(parse_post(row, k))
            except ClientError as error:
                result.update(error_body(error.reason, str(error)))
            return result

        results = await asyncio.gather(*(one(row) for row in rows))
        return {"results": list(results), "model": self.model_id}

    # reading ----------------------------------------------------------------------------------

    async def _read_body(self, request) -> bytes:
        """The body, refused (413) as soon as it passes the cap: on Content-Length before any
        byte is read, else while streaming (chunked bodies)."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise ClientError(400, "bad-length", "Content-Length is not a number")
            if int(length) > limit:
                raise ClientError(
                    413, "too-large", f"body of {int(length)} bytes, over {limit} bytes"
                )
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ClientError(415, "encoding", "send the body without Content-Encoding")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ClientError(413, "too-large", f"body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _content_type(request) -> str:
        return request.headers.get("content-type", "").split(";")[0].strip().lower()

    def _check_json_type(self, request) -> None:
        kind = self._content_type(request)
        if kind not in ("application/json", ""):
            raise ClientError(415, "content-type", "send Content-Type: application/json")

    async def _read_post(self, request) -> PostRequest:
        kind = self._content_type(request)
        query = parse_qs(request.url.query, max_num_fields=8)
        body = await self._read_body(request)
        if kind in ("application/json", ""):
            return parse_post(await self._run(parse_json, body), self.config.k)
        if kind == "multipart/form-data":
            fields = await self._run(parse_multipart, body, request.headers["content-type"])
            if "image" not in fields and "tags" not in fields:
                raise ClientError(400, "bad-multipart", "send the photo as the form field `image`")
            tags = _text(fields["tags"], "tags") if "tags" in fields else None
            k = _text(fields["k"], "k") if "k" in fields else self.config.k
            image = fields.get("image")
            return PostRequest(
                image_bytes=image or None,
                tags=_tags_field(tags),
                k=_int_field(k, "k", 1, MAX_K),
            )
        if kind.startswith("image/") or kind == "application/octet-stream":
            tags = ",".join(query.get("tags", []))
            k = query.get("k", [self.config.k])[0]
            return PostRequest(
                image_bytes=body, tags=_tags_field(tags), k=_int_field(k, "k", 1, MAX_K)
            )
        raise ClientError(
            415,
            "content-type",
            "send application/json, multipart/form-data or the image bytes (image/*)",
        )

    # answering --------------------------------------------------------------------------------

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def _answer(self, post: PostRequest) -> list[dict[str, Any]]:
        from hashtag import recommend
        from hashtag.errors import ArtifactError
        from hashtag.fetch import FetchError
        from hashtag.images import ImageError

        scores = None
        if post.image_url is not None or post.image_bytes is not None:
            if not self.exported.has_images:
                raise ClientError(
                    422, "labels-only", "this model was trained on labels only: give tags alone"
                )
            data = post.image_bytes
            if post.image_url is not None:
                try:
                    data = await self._run(self.fetcher.get, post.image_url)
                except FetchError as error:
                    status = 400 if error.reason in _REFUSED_URLS else 422
                    raise ClientError(status, error.reason, f"image URL: {error}") from None
            try:
                prepared = await self._run(self.exported.prepare, data, self.config.max_pixels)
            except ImageError as error:
                status = 413 if error.reason == "too-many-pixels" else 422
                raise ClientError(status, error.reason, f"image: {error}") from None
            scores = await self._score_batch(prepared)
        elif not post.tags:
            raise ClientError(400, "empty", "give `image`, `image_base64` or `tags`")
        if post.tags and not self.has_completion:
            raise ClientError(422, "no-completion", "this model has no completion: drop `tags`")
        try:
            return recommend.suggest(
                self.exported,
                scores,
                post.tags,
                self.blocked,
                k=post.k,
                min_score=self.config.min_score,
                completion_weight=self.config.completion_weight,
            )
        except ArtifactError as error:
            raise ClientError(422, "no-completion", str(error)) from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _score_batch(self, prepared: list[np.ndarray]) -> list[np.ndarray]:
        """Embed + predict the images of concurrent requests together, off the event loop."""
        scores = await asyncio.get_running_loop().run_in_executor(
            self._model_thread, self.exported.image_scores, np.stack(prepared)
        )
        return list(scores)


_REFUSED_URLS = {"private-address", "metadata-address", "bad-location", "bad-redirect"}


def _exported_at(model: str) -> str | None:
    """When the model folder's manifest was written (UTC, ISO 8601), from storage."""
    try:
        fs, path = storage.filesystem(storage.join(model, MANIFEST))
        info = fs.info(path)
    except Exception:  # the time is informative only
        return None
    when = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(when, datetime):
        when = when.timestamp()
    if not isinstance(when, (int, float)):
        return None
    return datetime.fromtimestamp(float(when), UTC).isoformat(timespec="seconds")


# applications -----------------------------------------------------------------------------------


def build(config: ServeConfig):
    """The Serve application of `config`: one deployment, autoscaled between min and max
    replicas; the replicas read the token file themselves (it never enters Serve's config)."""
    from hashtag import raycluster

    settings: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "ray_actor_options": {"num_cpus": config.replica_cpus, **_runtime_env(raycluster)},
        "graceful_shutdown_timeout_s": config.request_timeout_s,
    }
    if config.max_replicas > config.min_replicas:
        settings["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    else:
        settings["num_replicas"] = config.min_replicas
    return Hashtags.options(**settings).bind(options.flatten(config))


def _runtime_env(raycluster) -> dict[str, Any]:
    env = raycluster.worker_env()
    return {"runtime_env": env} if env else {}


def app(args: dict[str, Any]):
    """`serve deploy` / `serve run hashtag.serve:app model=URI token_file=PATH`: the builder
    named by infra/serve.yaml. A cluster faces the network: the token file is required."""
    types = {o.name: o.annotation for o in options.options(ServeConfig)}
    settings = {str(k).replace("-", "_"): v for k, v in dict(args or {}).items()}
    unknown = set(settings) - set(types)
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; known: {sorted(types)}")
    if not settings.get("token_file"):
        raise ValueError(
            "args.token_file is required: the file (on every node) holding the bearer token"
        )
    for name, value in settings.items():  # `serve run` passes key=value strings
        if isinstance(value, str) and types[name] in (int, float):
            settings[name] = types[name](value)
        elif isinstance(value, str) and types[name] is bool:
            settings[name] = value.lower() in ("1", "true", "yes")
    return build(options.build(ServeConfig, settings))


def start(config: ServeConfig) -> str:
    """Serve `config` on this process's Ray (started here unless RAY_ADDRESS names one);
    returns the base URL once the application answers."""
    import ray

    from hashtag import raycluster

    if config.token_file:
        read_token(config.token_file)  # a bad token file fails here, not in every replica
    raycluster.connect()
    if not raycluster.verbose():  # Serve's start-up notices; -v shows them
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(
        http_options={
            "host": config.host,
            "port": config.port,
            # Serve's own backstop: our deadline answers 504 first.
            "request_timeout_s": config.request_timeout_s + 5,
        }
    )
    try:
        serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False)
    except ray.exceptions.RayTaskError as error:
        raise UserError(f"the replicas did not start: {error.cause or error}") from None
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.port}"


def run(config: ServeConfig) -> int:
    """`hashtag serve`: serve until interrupted (Ctrl-C or SIGTERM), then shut Serve down."""
    url = start(config)
    auth = "token required" if config.token_required else "no token (loopback)"
    log.info("serving %s on %s (%s); Ctrl-C stops", storage.redact(config.model), url, auth)
    stop = threading.Event()
    # Both signals set the event (a background job's SIGINT is otherwise ignored).
    stopping = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in stopping}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        serve.shutdown()
    log.info("stopped")
    return 0
