"""`hashtag serve` over real HTTP on 127.0.0.1: one server (its own local Ray and Serve) for the
whole module, started as a user starts it, with token auth forced on (--token-file).

The endpoint's hashtags equal `hashtag recommend --json`'s for the same photos and tags; no token
or a wrong one is 401; hostile requests (garbage bytes, a 50 MB body, pixel bombs, private and
metadata URLs, malformed JSON, a client that dribbles its body) each get a one-line JSON 4xx or
504 quickly, and the server answers a good request right after each.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from test_tune import CLASSIC_SPEC, export_knn

from hashtag import storage

pytestmark = pytest.mark.slow  # one Serve start (~15-30 s on a loaded machine) for the module

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "feedme-food" / "images"
TOKEN = "a-test-token-" + "0123456789abcdef" * 2
# Each hostile request is refused in well under a second here (~0.01-0.2 s measured); the
# bound is looser because the test machine is shared.
QUICK_S = 3.0
REQUEST_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    """A kNN model on the classic embedder, exported the way tune exports it."""
    return export_knn(tmp_path_factory.mktemp("model"), posts=200, dim=340, tags=8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Three shared food photos when they are there, and two made here (JPEG, PNG)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    made = []
    for name in ("made.jpg", "made.png"):
        picture = cv2.GaussianBlur(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8), (9, 9), 3)
        cv2.imwrite(str(folder / name), picture)
        made.append(folder / name)
    shared = sorted(SHARED_PHOTOS.glob("*.jpg"))[:3] if SHARED_PHOTOS.is_dir() else []
    return shared + made


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exported_on_s3(exported, s3_endpoint) -> str:
    """The same export copied to a bucket of the S3 API server: the server loads it from there
    (as on a cluster), while `recommend --json` reads the local folder."""
    import boto3

    bucket = f"serve-{os.urandom(6).hex()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/runs/r1/tune/model"
    for path in sorted(Path(exported).rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{uri}/{path.relative_to(exported).as_posix()}", path.read_bytes())
    return uri


@pytest.fixture(scope="module")
def server(exported_on_s3, tmp_path_factory):
    """`hashtag serve` in a subprocess on 127.0.0.1 with --token-file, serving the model from
    S3 (the AWS_* variables of the S3 fixture reach it and its replicas); stopped by SIGTERM."""
    folder = tmp_path_factory.mktemp("serve")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    command = [
        sys.executable, "-m", "hashtag.cli", "serve", "--model", exported_on_s3, "--port", str(port),
        "--token-file", str(token_file), "--request-timeout-s", str(REQUEST_TIMEOUT_S),
        "--fetch-deadline-s", "2", "--max-body-mb", "8",
    ]  # fmt: skip
    log = open(folder / "serve.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (folder / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (folder / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode == 0, (folder / "serve.log").read_text()[-3000:]


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _post(url: str, path: str = "/v1/recommend", **kwargs) -> requests.Response:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    return requests.post(url + path, headers=headers, timeout=30, **kwargs)


def _cli_recommend(model: str, photos: list[Path], tags: str = "") -> dict[str, list]:
    command = [sys.executable, "-m", "hashtag.cli", "recommend", "--model", model, "--json"]
    command += ["--tags", tags] if tags else []
    result = subprocess.run(
        command + [str(p) for p in photos], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {line["image"]: line["hashtags"] for line in lines}


def test_answers_equal_hashtag_recommend_json(server, exported, photos):
    expected = _cli_recommend(exported, photos)
    expected_tags = _cli_recommend(exported, photos, tags="#Tag1,tag3")
    for photo in photos:
        data = photo.read_bytes()
        want = expected[str(photo)]
        assert len(want) == 5
        # The three ways to send a photo: multipart, JSON base64, raw bytes.
        multipart = _post(server, files={"image": (photo.name, data)})
        assert multipart.status_code == 200, multipart.text
        assert multipart.json()["hashtags"] == want
        assert multipart.json()["model"].startswith("knn-")
        encoded = base64.b64encode(data).decode()
        assert _post(server, json={"image_base64": encoded}).json()["hashtags"] == want
        raw = _post(server, data=data, headers={"Content-Type": "image/jpeg"})
        assert raw.json()["hashtags"] == want
        # With the tags already written (completion mixed in), as `recommend --tags`.
        with_tags = _post(
            server, files={"image": (photo.name, data)}, data={"tags": "#Tag1,tag3"}
        ).json()["hashtags"]
        assert with_tags == expected_tags[str(photo)]
        json_tags = _post(server, json={"image_base64": encoded, "tags": ["#Tag1", "tag3"]})
        assert json_tags.json()["hashtags"] == expected_tags[str(photo)]
    # Completion from tags alone.
    alone = _cli_recommend(exported, [], tags="tag2")[None]
    assert _post(server, json={"tags": ["tag2"], "k": 5}).json()["hashtags"] == alone
    assert (
        _post(server, json={"image": None, "tags": "tag2", "k": 2}).json()["hashtags"] == alone[:2]
    )


def test_batch_form_answers_each_post_in_order(server, exported, photos):
    expected = _cli_recommend(exported, photos)
    posts = [{"image_base64": base64.b64encode(p.read_bytes()).decode()} for p in photos]
    posts.insert(1, {"image": "ftp://example.org/x.jpg", "id": "p1"})
    posts.append({"tags": ["tag2"]})
    reply = _post(server, "/v1/recommend/batch", json={"posts": posts, "k": 5})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == len(posts)
    assert results[1] == {
        "id": "p1",
        "error": "`image` must be an http(s) URL",
        "reason": "bad-url",
    }
    good = [r["hashtags"] for i, r in enumerate(results[:-1]) if i != 1]
    assert good == [expected[str(p)] for p in photos]
    assert results[-1]["hashtags"]
    too_many = _post(server, "/v1/recommend/batch", json={"posts": [{"tags": ["a"]}] * 33})
    assert too_many.status_code == 400 and too_many.json()["reason"] == "too-many-posts"


def test_concurrent_requests_all_answered_alike(server, exported, photos):
    """Many requests at once fill the embedder's batches; each answer is still its own."""
    from concurrent.futures import ThreadPoolExecutor

    expected = _cli_recommend(exported, photos)
    jobs = [photos[i % len(photos)] for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(
            pool.map(lambda p: _post(server, files={"image": (p.name, p.read_bytes())}), jobs)
        )
    assert [r.json()["hashtags"] for r in replies] == [expected[str(p)] for p in jobs]


def test_model_and_health(server, exported):
    health = requests.get(f"{server}/healthz", timeout=10)  # no token needed for probes
    assert health.status_code == 200 and health.json()["status"] == "ok"
    info = requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()
    assert info["kind"] == "knn" and info["vocab_size"] == 8
    assert info["embedder"] == CLASSIC_SPEC and info["exported"].endswith("+00:00")
    assert info["id"] == health.json()["model"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}],
    ids=["none", "wrong", "basic", "longer", "empty"],
)  # fmt: skip
def test_no_token_or_a_wrong_one_is_401(server, headers):
    for method, path in (("POST", "/v1/recommend"), ("GET", "/v1/model")):
        reply = requests.request(
            method, server + path, headers=headers, json={"tags": ["tag1"]}, timeout=10
        )
        assert reply.status_code == 401, reply.text
        assert reply.json()["reason"] == "unauthorized"
        assert reply.headers["WWW-Authenticate"] == "Bearer"


def _png_bomb() -> bytes:
    from test_hostile import png_bomb

    return png_bomb()


HOSTILE = {
    "garbage bytes": dict(data=os.urandom(5000), headers={"Content-Type": "image/jpeg"}),
    "garbage multipart": dict(files={"image": ("x.jpg", b"\x00garbage" * 100)}),
    "50 MB body": dict(data=b"\0" * 50_000_000, headers={"Content-Type": "image/jpeg"}),
    "50 MB chunked": dict(
        data=(b"\0" * 1_000_000 for _ in range(50)), headers={"Content-Type": "image/jpeg"}
    ),
    "pixel bomb": dict(data=_png_bomb, headers={"Content-Type": "image/png"}),
    "private URL": dict(json={"image": "http://127.0.0.1:1/photo.jpg"}),
    "metadata URL": dict(json={"image": "http://169.254.169.254/latest/meta-data/"}),
    "local path": dict(json={"image": "/etc/passwd"}),
    "file URL": dict(json={"image": "file:///etc/passwd"}),
    "10k multipart parts": dict(
        data=b"".join(
            b'--XX\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i
            for i in range(10_000)
        )
        + b"--XX--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=XX"},
    ),
    "multipart without boundary": dict(
        data=b"abc", headers={"Content-Type": "multipart/form-data"}
    ),
    "malformed JSON": dict(data=b'{"image": ', headers={"Content-Type": "application/json"}),
    "deep JSON": dict(data=b"[" * 100_000, headers={"Content-Type": "application/json"}),
    "not an object": dict(json=[1, 2]),
    "bad base64": dict(json={"image_base64": "!!not base64!!"}),
    "bad k": dict(json={"tags": ["tag1"], "k": 10**9}),
    "nothing": dict(json={}),
    "unknown field": dict(json={"imgae": "x"}),
    "wrong type": dict(data=b"x", headers={"Content-Type": "text/plain"}),
    "gzip": dict(data=b"x", headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_requests_are_refused_quickly_and_the_server_goes_on(server, photos, name):
    kwargs = dict(HOSTILE[name])
    if callable(kwargs.get("data")):
        kwargs["data"] = kwargs["data"]()
    started = time.monotonic()
    reply = _post(server, **kwargs)
    elapsed = time.monotonic() - started
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    body = reply.json()  # one JSON line, never a traceback
    assert set(body) == {"error", "reason"} and "\n" not in body["error"]
    assert "Traceback" not in reply.text
    assert elapsed < QUICK_S, f"{name}: {elapsed:.2f} s"
    good = _post(server, files={"image": ("p.jpg", photos[0].read_bytes())})
    assert good.status_code == 200 and len(good.json()["hashtags"]) == 5


def test_expected_statuses(server):
    big = _post(server, data=b"\0" * 50_000_000, headers={"Content-Type": "image/jpeg"})
    assert big.status_code == 413 and big.json()["reason"] == "too-large"
    bomb = _post(server, data=_png_bomb(), headers={"Content-Type": "image/png"})
    assert bomb.status_code == 413 and bomb.json()["reason"] == "too-many-pixels"
    private = _post(server, json={"image": "http://10.0.0.1/x.jpg"})
    assert private.status_code == 400 and private.json()["reason"] == "private-address"
    assert requests.get(f"{server}/nowhere", headers=AUTH, timeout=10).status_code == 404
    assert requests.get(f"{server}/v1/recommend", headers=AUTH, timeout=10).status_code == 405


def test_a_client_that_dribbles_its_body_meets_the_deadline(server, photos):
    """Headers promise 100 kB, then one byte a second: 504 at the request deadline, and the
    server answers others meanwhile."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n".encode()
        )
        started = time.monotonic()
        good = _post(server, files={"image": ("p.jpg", photos[0].read_bytes())})
        assert good.status_code == 200
        sock.settimeout(0.5)
        reply = b""
        while time.monotonic() - started < REQUEST_TIMEOUT_S + 20 and b"\r\n\r\n" not in reply:
            try:
                sock.sendall(b"\xff")
                reply += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 504"), reply[:200]
    assert elapsed < REQUEST_TIMEOUT_S + 10
