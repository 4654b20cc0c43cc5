"""Fetcher against a real HTTP server on 127.0.0.1, local files and the address checks."""

import email.utils
import pickle
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hashtag import fetch
from hashtag.fetch import FetchConfig, Fetcher, FetchError, is_public_address

IMAGE = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40 + b"\xff\xd9"


class Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()  # path -> requests seen, for "fail first, then succeed" routes

    def log_message(self, *args):  # keep the test output quiet
        pass

    def send(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if not any(key == "Content-Length" for key, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Handler.hits[self.path] += 1
        first = Handler.hits[self.path] == 1
        path = self.path
        if path == "/ok":
            self.send(200, IMAGE, [("Content-Type", "image/jpeg")])
        elif path == "/ua":
            self.send(200, self.headers["User-Agent"].encode())
        elif path == "/404":
            self.send(404, b"no")
        elif path == "/500":
            self.send(500, b"down")
        elif path.startswith("/500-then-ok"):
            self.send(500, b"down") if first else self.send(200, IMAGE)
        elif path.startswith("/429-seconds"):
            self.send(429, headers=[("Retry-After", "2")]) if first else self.send(200, IMAGE)
        elif path.startswith("/429-date"):
            when = email.utils.formatdate(time.time() + 3, usegmt=True)
            self.send(429, headers=[("Retry-After", when)]) if first else self.send(200, IMAGE)
        elif path.startswith("/429-huge"):
            self.send(429, headers=[("Retry-After", "86400")]) if first else self.send(200, IMAGE)
        elif path == "/slow":
            time.sleep(1.0)
            self.send(200, IMAGE)
        elif path == "/too-large":
            self.send(200, b"x" * 5000)
        elif path == "/too-large-chunked":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/lying-length":  # declares more than it sends, then closes
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
        elif path == "/loop":
            self.send(302, headers=[("Location", "/loop")])
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            target = f"/chain/{n - 1}" if n > 0 else "/ok"
            self.send(301 if n % 2 else 307, headers=[("Location", target)])
        elif path == "/to-metadata":
            self.send(302, headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
        elif path == "/to-file":
            self.send(302, headers=[("Location", "file:///etc/passwd")])
        else:
            self.send(404)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that time out on purpose leave broken pipes behind


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def reason_of(fetcher: Fetcher, location: str) -> str:
    with pytest.raises(FetchError) as info:
        fetcher.get(location)
    return info.value.reason


def make_fetcher(**overrides):
    """A fetcher allowed on 127.0.0.1, with tiny backoffs; records sleeps instead of sleeping."""
    options = dict(allow_private=True, backoff_s=0.001, timeout_s=2.0)
    options.update(overrides)
    sleeps = []
    return Fetcher(FetchConfig(**options), sleep=sleeps.append), sleeps


def unique(path):
    """A fresh path for routes that fail only on their first request."""
    return f"{path}-{time.monotonic_ns()}"


def test_ok(server):
    fetcher, sleeps = make_fetcher()
    assert fetcher.get(f"{server}/ok") == IMAGE
    assert fetcher.retries == 0 and sleeps == []
    assert fetcher.bytes_read == len(IMAGE)


def test_sends_user_agent(server):
    fetcher, _ = make_fetcher(user_agent="hashtag-test/1")
    assert fetcher.get(f"{server}/ua") == b"hashtag-test/1"


def test_404_is_not_retried(server):
    fetcher, sleeps = make_fetcher()
    assert reason_of(fetcher, f"{server}/404") == "http-404"
    assert fetcher.retries == 0 and sleeps == []


def test_500_then_ok_is_retried(server):
    fetcher, sleeps = make_fetcher()
    assert fetcher.get(f"{server}{unique('/500-then-ok')}") == IMAGE
    assert fetcher.retries == 1 and len(sleeps) == 1


def test_500_gives_up_after_retries_with_exponential_backoff(server):
    fetcher, sleeps = make_fetcher(retries=3, backoff_s=0.1, max_backoff_s=0.25)
    assert reason_of(fetcher, f"{server}/500") == "http-500"
    assert fetcher.retries == 3
    # 0.1, 0.2, 0.4 capped to 0.25; each with jitter in [50%, 100%]
    for wait, ceiling in zip(sleeps, [0.1, 0.2, 0.25], strict=True):
        assert ceiling / 2 <= wait <= ceiling


def test_429_honours_retry_after_seconds(server):
    fetcher, sleeps = make_fetcher()
    assert fetcher.get(f"{server}{unique('/429-seconds')}") == IMAGE
    assert sleeps == [2.0] and fetcher.retries == 1


def test_429_honours_retry_after_date(server):
    fetcher, sleeps = make_fetcher()
    assert fetcher.get(f"{server}{unique('/429-date')}") == IMAGE
    assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 3.5


def test_retry_after_is_capped(server):
    fetcher, sleeps = make_fetcher(max_backoff_s=0.5)
    assert fetcher.get(f"{server}{unique('/429-huge')}") == IMAGE
    assert sleeps == [0.5]


def test_slow_response_times_out(server):
    fetcher, sleeps = make_fetcher(timeout_s=0.2, retries=1)
    started = time.monotonic()
    assert reason_of(fetcher, f"{server}/slow") == "timeout"
    assert fetcher.retries == 1
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("path", ["/too-large", "/too-large-chunked"])
def test_too_large(server, path):
    fetcher, sleeps = make_fetcher(max_bytes=4096)
    assert reason_of(fetcher, f"{server}{path}") == "too-large"
    assert fetcher.retries == 0


def test_body_shorter_than_content_length(server):
    fetcher, _ = make_fetcher(retries=1)
    with pytest.raises(FetchError) as info:
        fetcher.get(f"{server}/lying-length")
    assert info.value.reason in ("incomplete", "connection-error")


def test_redirect_chain_is_followed(server):
    fetcher, _ = make_fetcher(max_redirects=5)
    assert fetcher.get(f"{server}/chain/4") == IMAGE  # 5 redirects: 4, 3, 2, 1, 0 -> /ok


def test_redirect_chain_longer_than_the_cap(server):
    fetcher, _ = make_fetcher(max_redirects=3)
    assert reason_of(fetcher, f"{server}/chain/4") == "too-many-redirects"


def test_redirect_loop(server):
    fetcher, _ = make_fetcher(max_redirects=5)
    assert reason_of(fetcher, f"{server}/loop") == "too-many-redirects"


def test_redirect_to_non_http_is_refused(server):
    fetcher, _ = make_fetcher()
    assert reason_of(fetcher, f"{server}/to-file") == "bad-redirect"


def test_every_redirect_hop_is_checked(server, monkeypatch):
    # Pretend 127.0.0.1 is a public server: its redirect to the metadata address must be refused.
    monkeypatch.setattr(
        fetch, "is_public_address", lambda a: a == "127.0.0.1" or is_public_address(a)
    )
    fetcher, _ = make_fetcher(allow_private=False)
    assert fetcher.get(f"{server}/ok") == IMAGE
    assert reason_of(fetcher, f"{server}/to-metadata") == "metadata-address"
    # Allowing private addresses never opens the metadata address, on a redirect either.
    fetcher, _ = make_fetcher(allow_private=True, retries=0)
    assert reason_of(fetcher, f"{server}/to-metadata") == "metadata-address"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:8080/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost/",
        "http://0.0.0.0/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "https://172.16.0.1/",
        "http://224.0.0.1/",
        "http://2130706433/",  # 127.0.0.1 written as a number
    ],
)
def test_private_addresses_are_refused_before_connecting(url, monkeypatch):
    def no_connection(*args, **kwargs):
        raise AssertionError("a refused host must not be connected to")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    with pytest.raises(FetchError, match="allow_private|never fetched") as info:
        Fetcher(FetchConfig()).get(url)
    assert info.value.reason in ("private-address", "metadata-address")


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::", False),
        ("255.255.255.255", False),
        ("240.0.0.1", False),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fetcher, sleeps = make_fetcher(retries=2)
    assert reason_of(fetcher, f"http://127.0.0.1:{port}/x.jpg") == "connection-error"
    assert fetcher.retries == 2


def test_local_path_and_file_uri(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(IMAGE)
    fetcher = Fetcher()
    assert fetcher.get(str(path)) == IMAGE
    assert fetcher.get(path.as_uri()) == IMAGE


def test_local_errors(tmp_path):
    fetcher = Fetcher(FetchConfig(max_bytes=10))
    assert reason_of(fetcher, str(tmp_path / "missing.jpg")) == "not-found"
    (tmp_path / "big.jpg").write_bytes(b"x" * 11)
    assert reason_of(fetcher, str(tmp_path / "big.jpg")) == "too-large"


def test_s3(s3_bucket):
    from hashtag import storage

    storage.write_bytes(f"{s3_bucket}/img/a.jpg", IMAGE)
    assert Fetcher().get(f"{s3_bucket}/img/a.jpg") == IMAGE
    assert reason_of(Fetcher(), f"{s3_bucket}/img/missing.jpg") == "not-found"
    assert reason_of(Fetcher(FetchConfig(max_bytes=10)), f"{s3_bucket}/img/a.jpg") == "too-large"


@pytest.mark.parametrize("location", ["ftp://example.org/a.jpg", "gopher://x/y"])
def test_unknown_scheme(location):
    assert reason_of(Fetcher(), location) == "bad-location"


@pytest.mark.parametrize(
    "options", [dict(timeout_s=0), dict(retries=-1), dict(max_bytes=-1), dict(backoff_s=-1)]
)
def test_config_validation(options):
    with pytest.raises(ValueError, match="FetchConfig"):
        FetchConfig(**options)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """The same handler over TLS, with a self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", cert
    httpd.shutdown()
    httpd.server_close()


def test_https_checks_certificates(tls_server, monkeypatch):
    url, cert = tls_server
    fetcher, _ = make_fetcher()
    assert reason_of(fetcher, f"{url}/ok") == "tls-error"  # self-signed: not trusted
    assert fetcher.retries == 0
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust it: read when a fetcher is made
    fetcher, _ = make_fetcher()
    assert fetcher.get(f"{url}/ok") == IMAGE
    assert fetcher.get(f"{url}/chain/1") == IMAGE


def test_fetcher_pickles():
    fetcher = pickle.loads(pickle.dumps(Fetcher(FetchConfig(timeout_s=3.0))))
    assert fetcher.config.timeout_s == 3.0 and fetcher.retries == 0
