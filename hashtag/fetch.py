"""Fetch the bytes behind a location: an http(s) URL, an s3:// URI, file:// or a local path.

    fetcher = Fetcher(FetchConfig(timeout_s=5))
    data = fetcher.get("https://example.org/cat.jpg")     # raises FetchError(message, reason)

HTTP goes through http.client from the standard library, with what a scraper needs to be a good
citizen and to survive the web:
- wall-clock deadlines: every socket operation (connect, request, status line, endless interim
  `100 Continue` responses, header lines, body) gets at most the time left before the attempt's
  deadline (attempt_deadline_s) and the image's (fetch_deadline_s, retries and waits included),
  so a server that dribbles one byte a second cannot hold a worker longer than that;
- bounded retries with exponential backoff for 5xx, 429 and connection errors / timeouts; 429 and
  503 honour Retry-After (seconds or an HTTP date), capped by max_backoff_s; other 4xx fail at once;
- a size cap checked against Content-Length and again while streaming;
- redirects followed by hand, at most max_redirects, each hop's host checked again;
- by default no private, loopback, link-local (cloud metadata at 169.254.169.254), multicast,
  reserved or unspecified addresses: every address the host resolves to is checked, and the
  connection goes to the checked address (a second DNS answer cannot swap it: no rebinding).
Environment proxies are not used.

Everything else goes through hashtag.storage, with the same size cap (from the object's size,
before reading). FetchError.reason is a short slug ("http-404", "timeout", "too-large",
"private-address", "too-many-redirects", "not-found", ...) used as the skip reason in shards.
"""

from __future__ import annotations

import email.utils
import http.client
import io
import ipaddress
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from hashtag import storage

_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 1 << 16


class FetchError(Exception):
    """A location could not be fetched; `reason` is a short slug for skip counts."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FetchConfig:
    """How an image (or weights file) is fetched: the one declaration of these settings. The
    stages embed it (ScrapeConfig.fetch, RecommendConfig.fetch, ServeConfig.fetch) and offer
    some of its fields as options, under the metadata `option` name when a field has one
    (hashtag/options.py): `--fetch-retries`, `--max-image-bytes`, `--allow-private-addresses`."""

    timeout_s: float = field(
        default=10.0, metadata={"help": "HTTP connect and per-read timeout (seconds)"}
    )
    retries: int = field(
        default=3,
        metadata={
            "help": "HTTP retries per image (5xx, 429, timeouts, connection errors)",
            "option": "fetch_retries",
        },
    )
    backoff_s: float = field(
        default=0.5, metadata={"help": "first retry delay; doubles on every retry"}
    )
    max_backoff_s: float = field(
        default=30.0, metadata={"help": "longest wait between retries, Retry-After included"}
    )
    max_bytes: int = field(
        default=20_000_000,
        metadata={"help": "largest image download (bytes)", "option": "max_image_bytes"},
    )
    max_redirects: int = field(default=5, metadata={"help": "most HTTP redirects followed"})
    allow_private: bool = field(
        default=False,
        metadata={
            "help": "let image URLs reach private, loopback and link-local addresses (cloud "
            "metadata addresses never)",
            "option": "allow_private_addresses",
        },
    )
    user_agent: str = field(default="hashtag/0.1", metadata={"help": "HTTP User-Agent header"})
    attempt_deadline_s: float = field(
        default=120.0,
        metadata={"help": "wall-clock limit of one HTTP attempt, against slow-drip servers"},
    )
    fetch_deadline_s: float = field(
        default=60.0,
        metadata={
            "help": "wall-clock limit of fetching one image, retries and waits included (seconds)"
        },
    )

    def __post_init__(self):
        def named(name: str) -> str:  # the option users set, and where it is declared
            option = type(self).__dataclass_fields__[name].metadata.get("option", name)
            return f"--{option.replace('_', '-')} (FetchConfig.{name})"

        for name in ("timeout_s", "attempt_deadline_s", "fetch_deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{named(name)} must be > 0, got {getattr(self, name)}")
        for name in ("retries", "max_redirects", "max_bytes", "backoff_s", "max_backoff_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{named(name)} must be >= 0, got {getattr(self, name)}")


class _Retry(Exception):
    """One attempt failed in a way worth retrying; carries the error to raise when out of tries."""

    def __init__(self, error: FetchError, wait_s: float | None = None):
        super().__init__(str(error))
        self.error = error
        self.wait_s = wait_s  # from Retry-After, else None for exponential backoff


class Fetcher:
    """Fetches locations under one FetchConfig; counts retries and bytes (thread-safe)."""

    def __init__(self, config: FetchConfig | None = None, *, sleep: Callable = time.sleep):
        self.config = config or FetchConfig()
        self.retries = 0
        self.bytes_read = 0
        self._sleep = sleep
        self._lock = threading.Lock()
        self._ssl_context = ssl.create_default_context()

    def __getstate__(self) -> dict:  # picklable (Ray): locks and TLS contexts are rebuilt
        return {"config": self.config, "sleep": self._sleep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], sleep=state["sleep"])

    def get(self, location: str) -> bytes:
        """The bytes at `location`, or FetchError with a reason slug."""
        location = str(location)
        scheme = urlsplit(location).scheme.lower() if "://" in location else ""
        try:
            if scheme in ("http", "https"):
                data = self._get_http(location)
            elif scheme in ("", "file", "s3", "s3a"):
                data = self._get_storage(location)
            else:
                raise FetchError(
                    f"cannot fetch {location!r}: use http(s)://, s3://, file:// or a local path",
                    "bad-location",
                )
        except FetchError as error:
            # The message is logged and may be stored: never with a URL's user:password or
            # its query-string tokens (the location's, or a redirect's).
            message = str(error).replace(location, storage.redact(location))
            redacted = storage.redact_text(message)
            if redacted == str(error):
                raise
            raise FetchError(redacted, error.reason) from None
        with self._lock:
            self.bytes_read += len(data)
        return data

    # storage ----------------------------------------------------------------------------------

    def _get_storage(self, uri: str) -> bytes:
        try:
            # Never through a symbolic link: a post's file is the file itself (a link in an
            # instaloader folder must not make us read /etc/passwd or ~/.aws/credentials).
            data = storage.read_bytes(uri, limit=self.config.max_bytes, follow_links=False)
        except storage.TooLarge as e:
            raise FetchError(f"{uri} is over max_bytes={self.config.max_bytes}", "too-large") from e
        except storage.NotRegularFile as e:
            raise FetchError(f"{uri} is not a regular file (device, FIFO)", "not-a-file") from e
        except storage.LinkRefused as e:
            raise FetchError(f"{e}", "symlink") from e
        except FileNotFoundError as e:
            raise FetchError(f"{uri} does not exist", "not-found") from e
        except IsADirectoryError as e:
            raise FetchError(f"{uri} is a folder, not a file", "not-a-file") from e
        except PermissionError as e:
            raise FetchError(f"no permission to read {uri}: {e}", "forbidden") from e
        except OSError as e:
            raise FetchError(f"cannot read {uri}: {e}", "read-error") from e
        return data

    # http -------------------------------------------------------------------------------------

    def _get_http(self, url: str) -> bytes:
        deadline = time.monotonic() + self.config.fetch_deadline_s
        for _hop in range(self.config.max_redirects + 1):
            status, location, body = self._request_with_retries(url, deadline)
            if status not in _REDIRECTS:
                return body
            if not location:
                raise FetchError(f"{url}: HTTP {status} without a Location header", "bad-redirect")
            next_url = urljoin(url, location)
            if urlsplit(next_url).scheme.lower() not in ("http", "https"):
                raise FetchError(f"{url} redirects to {next_url!r}: not http(s)", "bad-redirect")
            url = next_url
        raise FetchError(
            f"more than max_redirects={self.config.max_redirects} redirects (last: {url})",
            "too-many-redirects",
        )

    def _request_with_retries(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        config = self.config
        for attempt in range(config.retries + 1):
            try:
                return self._request_once(url, deadline)
            except _Retry as retry:
                if attempt == config.retries or time.monotonic() >= deadline:
                    raise retry.error from None
                if retry.wait_s is not None:
                    wait = min(retry.wait_s, config.max_backoff_s)
                else:
                    # Jitter, so that many workers throttled together do not retry together.
                    wait = min(config.backoff_s * 2**attempt, config.max_backoff_s)
                    wait *= random.uniform(0.5, 1.0)
                if time.monotonic() + wait >= deadline:  # no time left for another attempt
                    raise retry.error from None
                with self._lock:
                    self.retries += 1
                self._sleep(wait)
        raise AssertionError("unreachable")

    def _request_once(self, url: str, fetch_deadline: float) -> tuple[int, str | None, bytes]:
        """One HTTP request: (status, Location, body); the body is read only for 2xx."""
        config = self.config
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise FetchError(f"{url!r} has no host", "bad-location")
        https = parts.scheme.lower() == "https"
        try:
            port = parts.port or (443 if https else 80)
        except ValueError as e:
            raise FetchError(f"{url!r}: {e}", "bad-location") from e
        deadline = min(time.monotonic() + config.attempt_deadline_s, fetch_deadline)
        address = self._checked_address(host, port, deadline)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if https:
            conn = _PinnedHTTPSConnection(
                host, port, address, config.timeout_s, deadline, self._ssl_context
            )
        else:
            conn = _PinnedHTTPConnection(host, port, address, config.timeout_s, deadline)
        try:
            conn.request(
                "GET",
                target,
                headers={"User-Agent": config.user_agent, "Accept": "*/*", "Connection": "close"},
            )
            response = conn.getresponse()
            status = response.status
            if status in _REDIRECTS:
                return status, response.getheader("Location"), b""
            if status == 429 or status >= 500:
                wait = _retry_after_s(response.getheader("Retry-After"))
                raise _Retry(FetchError(f"{url}: HTTP {status}", f"http-{status}"), wait)
            if not 200 <= status < 300:
                raise FetchError(f"{url}: HTTP {status} {response.reason}", f"http-{status}")
            return status, None, self._read_body(url, response)
        except TimeoutError as e:
            raise _Retry(FetchError(f"{url}: timed out ({e or 'no answer'})", "timeout")) from e
        except ssl.SSLCertVerificationError as e:
            raise FetchError(f"{url}: TLS certificate not valid: {e}", "tls-error") from e
        except (OSError, http.client.HTTPException) as e:
            raise _Retry(FetchError(f"{url}: {type(e).__name__}: {e}", "connection-error")) from e
        finally:
            conn.close()

    def _read_body(self, url: str, response: http.client.HTTPResponse) -> bytes:
        limit = self.config.max_bytes
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > limit:
            raise FetchError(
                f"{url}: Content-Length {int(length)} over max_bytes={limit}", "too-large"
            )
        chunks, total = [], 0
        while chunk := response.read1(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise FetchError(f"{url}: body over max_bytes={limit}", "too-large")
            chunks.append(chunk)
        if length and length.strip().isdigit() and total < int(length):
            # The server closed early; http.client's read1 does not raise for this.
            raise _Retry(FetchError(f"{url}: got {total} of {length} bytes", "incomplete"))
        return b"".join(chunks)

    def _checked_address(self, host: str, port: int, deadline: float) -> str:
        """Resolve `host` (within the deadline); refuse it if any address is not public (unless
        allow_private), and the cloud metadata addresses always."""
        try:
            infos = _resolve(host, port, deadline)
        except TimeoutError as e:
            raise _Retry(FetchError(f"{host!r}: {e}", "timeout")) from e
        except socket.gaierror as e:
            error = FetchError(f"cannot resolve host {host!r}: {e}", "dns-error")
            if e.errno == socket.EAI_AGAIN:  # a temporary failure of the resolver
                raise _Retry(error) from e
            raise error from e
        addresses = [info[4][0] for info in infos]
        for address in addresses:
            if is_metadata_address(address):
                raise FetchError(
                    f"refusing {host!r}: it resolves to the cloud metadata address {address}, "
                    "which is never fetched (not even with --allow-private-addresses)",
                    "metadata-address",
                )
        if not self.config.allow_private:
            for address in addresses:
                if not is_public_address(address):
                    raise FetchError(
                        f"refusing {host!r}: it resolves to the non-public address {address}; "
                        "set allow_private=True (--allow-private-addresses) to fetch from your own network",
                        "private-address",
                    )
        return addresses[0]


# Cloud metadata endpoints (AWS, GCP, Azure, ... IPv4 link-local; AWS's IPv6 one): never
# fetched, not even with allow_private, since they hand out the node's credentials.
_METADATA_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 8215's local-use NAT64 prefix: a site picks any length inside it, so the IPv4 address may
# sit in the last 32 bits (a /96) or in RFC 6052's /48 layout (bits 48-63 and 72-87).
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def _unwrapped(address: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The address and every IPv4 address embedded in it (IPv4-mapped, 6to4, Teredo, NAT64),
    so that 2002:7f00:1:: is judged as the 127.0.0.1 it reaches."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    found = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.extend(ip.teredo)
        if ip in _NAT64:
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _LOCAL_NAT64:
            packed = ip.packed
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            found.append(ipaddress.IPv4Address(packed[6:8] + packed[9:11]))
        if int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible (deprecated): ::a.b.c.d
            found.append(ipaddress.IPv4Address(int(ip)))
    return found


def is_metadata_address(address: str) -> bool:
    """True for a cloud metadata address (169.254/16, fd00:ec2::254), also when embedded."""
    return any(
        ip.version == net.version and ip in net
        for ip in _unwrapped(address)
        for net in _METADATA_NETWORKS
    )


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; False for loopback, private, etc., also
    when an IPv6 address embeds such an IPv4 one."""
    return all(
        ip.is_global
        and not (
            ip.is_private
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_reserved
            or ip.is_unspecified
            or getattr(ip, "is_site_local", False)  # fec0::/10: deprecated, still internal
        )
        for ip in _unwrapped(address)
    )


def _resolve(host: str, port: int, deadline: float) -> list:
    """getaddrinfo, given at most the time left before `deadline`: the resolver is a blocking
    call that a slow authoritative server (chosen by whoever wrote the URL) can stretch. A lookup
    that overruns keeps its daemon thread until the resolver's own timeout ends it."""
    found: list = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            found.append(error)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not found:
        raise TimeoutError(f"resolving {host!r} did not finish before the deadline")
    if isinstance(found[0], OSError):
        raise found[0]
    return found[0]


def _retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: '120' or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _DeadlineSocket:
    """A socket whose every send and receive gets at most the time left before `deadline`
    (and at most `timeout_s`): a wall-clock limit that a dribbling server cannot stretch, since
    http.client's own loops (interim responses, header lines) all read through recv_into."""

    def __init__(self, sock: socket.socket, deadline: float, timeout_s: float):
        self._sock, self._deadline, self._timeout_s = sock, deadline, timeout_s

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the wall-clock deadline passed")
        self._sock.settimeout(min(self._timeout_s, left))

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, nbytes)

    def recv(self, nbytes: int) -> bytes:
        self._arm()
        return self._sock.recv(nbytes)

    def sendall(self, data) -> None:
        self._arm()
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs):
        # Reads through this object (recv_into above), not the raw socket. Counted like
        # socket.makefile does, so closing the connection waits for the response to close.
        self._sock._io_refs += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"))

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def _connect(address: str, port: int, timeout_s: float, deadline: float) -> socket.socket:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the wall-clock deadline passed before connecting")
    return socket.create_connection((address, port), min(timeout_s, left))


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand, while Host stays the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float, deadline: float):
        super().__init__(host, port, timeout=timeout)
        self._address, self._deadline = address, deadline

    def connect(self):
        sock = _connect(self._address, self.port, self.timeout, self._deadline)
        self.sock = _DeadlineSocket(sock, self._deadline, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The same over TLS: SNI and certificate checks use the URL's host name."""

    def __init__(self, host, port, address, timeout, deadline, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address, self._deadline = address, deadline
        self._tls_context = context

    def connect(self):
        sock = _connect(self._address, self.port, self.timeout, self._deadline)
        sock.settimeout(max(0.001, min(self.timeout, self._deadline - time.monotonic())))
        tls = self._tls_context.wrap_socket(sock, server_hostname=self.host)
        self.sock = _DeadlineSocket(tls, self._deadline, self.timeout)
