"""A hostile corpus made here (servers on 127.0.0.1 only, bounded loops): each attack ends in a
counted skip with its reason, in bounded time and memory, and loses nothing else."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import zlib

import cv2
import numpy as np
import pytest

from hashtag import images, sources, tags
from hashtag.fetch import FetchConfig, Fetcher, FetchError, is_metadata_address, is_public_address
from hashtag.images import ImageError


class RawServer:
    """A TCP server on 127.0.0.1 that runs `behaviour(conn, stop)` per connection, in a thread;
    every behaviour loops only while `stop` is unset and the client is still there."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            try:
                conn.recv(65536)  # the request
                self.behaviour(conn, self.stop)
            except OSError:
                pass  # the client gave up: that is the point

    def close(self):
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


def endless_continue(conn, stop):
    while not stop.is_set():
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.01)


def dribbled_headers(conn, stop):
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stop.is_set():
        conn.sendall(b"X-A: b\r\n")
        time.sleep(0.05)


def dribbled_body(conn, stop):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    while not stop.is_set():
        conn.sendall(b"x")
        time.sleep(0.05)


def silent_after_connect(conn, stop):
    stop.wait(30)


@pytest.fixture
def raw_server():
    servers = []

    def start(behaviour):
        servers.append(RawServer(behaviour))
        return servers[-1].url

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    "behaviour", [endless_continue, dribbled_headers, dribbled_body, silent_after_connect]
)
def test_fetch_deadline_covers_every_phase(raw_server, behaviour):
    url = raw_server(behaviour)
    # Each read succeeds within timeout_s: only the wall-clock deadline can stop these.
    config = FetchConfig(
        allow_private=True, timeout_s=0.5, retries=5, backoff_s=0.01, fetch_deadline_s=1.0
    )
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        Fetcher(config).get(f"{url}/photo.jpg")
    elapsed = time.monotonic() - started
    assert info.value.reason == "timeout"
    assert elapsed < 2.0, f"{behaviour.__name__} held the fetch for {elapsed:.1f}s"


def test_special_files_are_never_read(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    fetcher = Fetcher(FetchConfig(max_bytes=1000))
    started = time.monotonic()
    for location in (str(fifo), "/dev/zero", str(tmp_path)):
        with pytest.raises(FetchError) as info:
            fetcher.get(location)
        assert info.value.reason == "not-a-file", location
    assert time.monotonic() - started < 1.0
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(10**9)  # sparse: only max_bytes + 1 of it may be read
    with pytest.raises(FetchError) as info:
        fetcher.get(str(big))
    assert info.value.reason == "too-large"


@pytest.mark.parametrize(
    "address",
    [
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "::ffff:192.168.1.1",  # IPv4-mapped
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
    ],
)
def test_embedded_ipv4_is_unwrapped(address):
    assert not is_public_address(address)


def test_metadata_addresses_are_refused_even_when_private_ones_are_allowed():
    for address in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        assert is_metadata_address(address)
    assert not is_metadata_address("127.0.0.1")
    fetcher = Fetcher(FetchConfig(allow_private=True, retries=0))
    with pytest.raises(FetchError) as info:
        fetcher.get("http://169.254.169.254/latest/meta-data/")
    assert info.value.reason == "metadata-address"


# images ---------------------------------------------------------------------------------------


def tiff_bomb(width=16384, height=16384) -> bytes:
    """A little-endian TIFF whose one IFD claims width x height RGB, deflate-compressed."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8),
               (262, 3, 1, 2), (273, 4, 1, 200), (277, 3, 1, 3), (278, 4, 1, height),
               (279, 4, 1, 64)]  # fmt: skip
    ifd = len(entries).to_bytes(2, "little") + b"".join(
        t.to_bytes(2, "little") + k.to_bytes(2, "little") + n.to_bytes(4, "little")
        + v.to_bytes(4, "little")
        for t, k, n, v in entries
    ) + b"\0\0\0\0"  # fmt: skip
    data = b"II*\x00" + (8).to_bytes(4, "little") + ifd
    return data + b"\0" * (200 - len(data)) + zlib.compress(b"\0" * 100_000)[:64]


def png_bomb(side=16384) -> bytes:
    def chunk(kind, body):
        return (
            len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        )

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\0" * 1_000_000, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def repeated_scan_jpeg(repeats=2000) -> bytes:
    """A real progressive JPEG whose last scan is repeated: each scan costs a decoding pass."""
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = encoded.tobytes()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + b"\xff\xd9"


@pytest.mark.parametrize(
    "make, reason",
    [
        (tiff_bomb, "too-many-pixels"),
        (png_bomb, "too-many-pixels"),
        (repeated_scan_jpeg, "too-many-scans"),
        (lambda: b"P6\n16384 16384\n255\n" + b"\0" * 1000, "unsupported-format"),
        (
            lambda: b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 16384 +X 16384\n",
            "unsupported-format",
        ),
    ],
)
def test_image_bombs_are_refused_before_decoding(make, reason):
    data = make()
    base_mb = _reset_peak_rss_mb()
    started, cpu = time.monotonic(), time.process_time()
    with pytest.raises(ImageError) as info:
        images.decode(data, max_pixels=50_000_000)
    assert info.value.reason == reason
    assert time.monotonic() - started < 0.5 and time.process_time() - cpu < 0.5
    # A decoded 16k x 16k RGB would be 768 MB: the peak may not grow by anything near that.
    assert _status_mb("VmHWM") - base_mb < 200


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss_mb() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS; return that, in MB. The
    lifetime peak of the test process says nothing about the call under test."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_mb("VmRSS")


def test_a_small_tiff_still_decodes():
    image = np.random.default_rng(1).integers(0, 255, (20, 30, 3), np.uint8)
    ok, encoded = cv2.imencode(".tiff", image)
    assert images.image_size(encoded.tobytes()) == (30, 20)
    assert images.decode(encoded.tobytes()).shape == (20, 30, 3)


# parsers --------------------------------------------------------------------------------------


def test_a_huge_caption_parses_in_linear_time():
    caption = (
        "#food " + "a." * 50_000 + "x" * 100_000 + " #late"
    )  # quadratic for a backtracking URL pattern
    started = time.monotonic()
    assert tags.parse_hashtags(caption) == ["food"]  # the rest is past MAX_CAPTION_CHARS
    assert tags.parse_hashtags("#a " + "b" * 100_000 + "/x " + "#c")[:1] == ["a"]
    assert time.monotonic() - started < 1.0
    assert tags.parse_hashtags("see (https://x.org/p#frag) #ok www.y.com/#no z.org/a#no") == ["ok"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("#ca\u200bt", "cat"),  # zero-width space
        ("#\u202ecat", "cat"),  # right-to-left override
        ("#c\u0007at\u200e", "cat"),  # control and left-to-right mark
        ("#ｃａｔ", "cat"),  # full width (NFKC)
        ("#\u200dcat\u200d", "cat"),  # ZWJ not between letters
        ("#می\u200cخواهم", "می\u200cخواهم"),  # Persian ZWNJ between letters stays
    ],
)
def test_invisible_characters_leave_tags(raw, expected):
    assert tags.normalize(raw) == expected


def test_hostile_jsonl_rows_are_counted_not_fatal(tmp_path):
    rows = [
        json.dumps({"id": "ok1", "image": "a.jpg", "tags": ["x"]}),
        "[" * 200_000 + "]" * 200_000,  # nesting: RecursionError in json
        json.dumps({"id": "big", "image": "b.jpg", "caption": "y" * (sources.MAX_ROW_BYTES + 10)}),
        json.dumps({"id": "i" * 100_000, "image": "c.jpg"}),
        json.dumps({"id": "nan", "image": "d.jpg", "metadata": float("nan")}),
        json.dumps({"id": "ok2", "image": "e.jpg", "tags": ["x"]}),
    ]
    path = tmp_path / "posts.jsonl"
    path.write_text("\n".join(rows) + "\n")
    source = sources.open_source(str(path))
    posts = list(source.posts())
    assert [p.id for p in posts] == ["ok1", "nan", "ok2"]
    assert source.skipped == {"bad-row": 2, "bad-id": 1}
    # NaN is not JSON: what we write is strict (sanitised to null).
    row = json.loads(posts[1].to_json())
    assert row["metadata"]["metadata"] is None


def test_unterminated_csv_quote_is_reported(tmp_path, caplog):
    path = tmp_path / "posts.csv"
    path.write_text('id,image,tags\na,a.jpg,x\nb,"b.jpg,y\nc,c.jpg,z\nd,d.jpg,w\n')
    source = sources.open_source(str(path))
    # The bad row is its first line alone: parsing starts again on the line after it.
    assert [p.id for p in source.posts()] == ["a", "c", "d"]
    assert source.skipped == {"bad-row": 1}
    assert "line 3 is never closed" in caplog.text.replace("opened on line", "line")


def test_xz_bomb_metadata_is_capped(tmp_path):
    import lzma

    folder = tmp_path / "insta"
    folder.mkdir()
    image = np.zeros((16, 16, 3), np.uint8)
    cv2.imwrite(str(folder / "2020-01-01_00-00-00_UTC.jpg"), image)
    (folder / "2020-01-01_00-00-00_UTC.txt").write_text("#kept")
    bomb = lzma.compress(b" " * (sources.MAX_METADATA_BYTES + 1), preset=9)
    (folder / "2020-01-01_00-00-00_UTC.json.xz").write_bytes(bomb)
    assert len(bomb) < 100_000
    source = sources.open_source(str(folder))
    posts = list(source.posts())
    assert [p.tags for p in posts] == [("kept",)] and source.warnings == {"bad-metadata": 1}


# secrets --------------------------------------------------------------------------------------


def test_no_secret_travels_in_runtime_env_or_stored_urls(monkeypatch, tmp_path):
    from hashtag import raycluster, shards, storage
    from hashtag.posts import Post

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRET")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    assert raycluster.worker_env() == {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}}

    url = "http://alice:hunter2@127.0.0.1:9/a.jpg"
    assert storage.redact(url) == "http://127.0.0.1:9/a.jpg"
    with pytest.raises(FetchError) as info:
        Fetcher(FetchConfig(allow_private=True, retries=0, timeout_s=0.5)).get(url)
    assert "hunter2" not in str(info.value) and "alice" not in str(info.value)
    post = Post(id="p", image=url, tags=("x",))
    shards.write_shard(
        str(tmp_path), 0, [post], np.zeros((1, 0), np.float32), embedder={"name": "classic"},
        image_sha256=[None], stats={},
    )  # fmt: skip
    stored = (tmp_path / "shards" / "shard-00000" / "posts.jsonl").read_text()
    assert "hunter2" not in stored and "127.0.0.1:9/a.jpg" in stored


def test_a_tiff_with_giant_tiles_is_refused():
    data = bytearray(tiff_bomb(width=64, height=64))
    # Turn the RowsPerStrip entry (278) into TileWidth and the StripByteCounts one into
    # TileLength, both 65535: a small image whose one tile would need 4 G pixels.
    for old, new in ((278, 322), (279, 323)):
        at = data.index(old.to_bytes(2, "little") + (4).to_bytes(2, "little"))
        data[at : at + 2] = new.to_bytes(2, "little")
        data[at + 8 : at + 12] = (65535).to_bytes(4, "little")
    with pytest.raises(ImageError) as info:
        images.decode(bytes(data))
    assert info.value.reason == "too-many-pixels"


def test_a_stalling_resolver_is_bounded_by_the_deadline(monkeypatch):
    # The system resolver (not our code) stalls, as a slow authoritative server would make it.
    real = socket.getaddrinfo

    def slow(*args, **kwargs):
        time.sleep(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    config = FetchConfig(allow_private=True, retries=3, backoff_s=0.01, fetch_deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        Fetcher(config).get("http://slow-dns.example/a.jpg")
    assert info.value.reason == "timeout" and time.monotonic() - started < 1.5


# round 2 (issue 19) ------------------------------------------------------------------------


def test_links_in_an_instaloader_folder_never_lead_out(tmp_path):
    """A caption, metadata or image that is a symbolic link (or sits in a linked folder) is
    never read: the secret stays out of the posts, the linked image is not embedded."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "credentials"
    secret.write_text("aws_secret=TOPSECRET #leak")
    picture = outside / "photo.jpg"
    cv2.imwrite(str(picture), np.full((32, 32, 3), 200, np.uint8))
    folder = tmp_path / "insta"
    folder.mkdir()
    cv2.imwrite(str(folder / "2020-01-01_00-00-00_UTC.jpg"), np.zeros((32, 32, 3), np.uint8))
    (folder / "2020-01-01_00-00-00_UTC.txt").symlink_to(secret)
    (folder / "2020-01-01_00-00-00_UTC.json").symlink_to(secret)
    (folder / "2020-01-02_00-00-00_UTC.jpg").symlink_to(picture)
    (folder / "2020-01-02_00-00-00_UTC.txt").write_text("#linked")
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    (outside / "2020-01-03_00-00-00_UTC.jpg").symlink_to(picture)
    source = sources.open_source(str(folder))
    posts = list(source.posts())
    assert [p.id for p in posts] == ["2020-01-01_00-00-00_UTC"]
    assert "TOPSECRET" not in posts[0].to_json() and posts[0].tags == ()
    assert source.skipped == {"no-image": 1}  # its only image was a link
    assert source.warnings["symlink"] == 4  # caption, metadata, image, folder

    # The one guarded open: links refused at the fetch too (O_NOFOLLOW, no race with a check).
    with pytest.raises(FetchError) as info:
        Fetcher(FetchConfig()).get(str(folder / "2020-01-02_00-00-00_UTC.jpg"))
    assert info.value.reason == "symlink"
    # A path through a linked folder: the real file is outside the folder it must stay in.
    from hashtag import storage

    with pytest.raises(storage.LinkRefused, match="leads outside"):
        storage.read_bytes(str(folder / "sub" / "credentials"), within=str(folder))


def tiff(entries, order="little", tail=b"") -> bytes:
    """A TIFF with one IFD of (tag, type, count, value) entries, as given (order, repeats)."""

    def u(value, size):
        return value.to_bytes(size, order)

    ifd = u(len(entries), 2) + b"".join(
        u(tag, 2) + u(kind, 2) + u(count, 4) + u(value, 4) for tag, kind, count, value in entries
    )
    head = (b"II*\x00" if order == "little" else b"MM\x00*") + u(8, 4)
    return head + ifd + b"\0\0\0\0" + tail


def test_a_tiff_whose_tags_disagree_is_refused_before_decoding():
    # Two ImageWidth tags: a header check keeping the last saw 64 px, libtiff used the first.
    data = tiff([(256, 4, 1, 200_000), (256, 4, 1, 64), (257, 4, 1, 31_000), (258, 3, 1, 8),
                 (259, 3, 1, 8), (262, 3, 1, 2), (273, 4, 1, 200), (277, 3, 1, 3),
                 (279, 4, 1, 64)], tail=zlib.compress(b"\0" * 100_000))  # fmt: skip
    base_mb = _reset_peak_rss_mb()
    with pytest.raises(ImageError) as info:
        images.decode(data)
    assert info.value.reason == "corrupt" and "repeats tag 256" in str(info.value)
    assert _status_mb("VmHWM") - base_mb < 50
    # A size tag with two values is as ambiguous.
    with pytest.raises(ImageError, match="256"):
        images.decode(tiff([(256, 3, 2, 64 | (60_000 << 16)), (257, 4, 1, 64)]))


@pytest.mark.parametrize(
    "make",
    [
        # float64 RGBA, 7071 x 7071: under max_pixels (50 M), 1.6 GB decoded.
        lambda: tiff([(256, 4, 1, 7071), (257, 4, 1, 7071), (258, 3, 4, 122), (259, 3, 1, 8),
                      (262, 3, 1, 2), (273, 4, 1, 130), (277, 3, 1, 4), (279, 4, 1, 64),
                      (339, 3, 1, 3)],
                     tail=(64).to_bytes(2, "little") * 4 + zlib.compress(b"\0" * 10_000)),
        # 16-bit RGBA PNG, 7071 x 7071: 400 MB decoded, and the conversion copies.
        lambda: png_bomb_rgba16(7071),
    ],
    ids=["float64-rgba-tiff", "16bit-rgba-png"],
)  # fmt: skip
def test_decoded_bytes_are_capped_from_the_header(make):
    data = make()
    base_mb = _reset_peak_rss_mb()
    with pytest.raises(ImageError) as info:
        images.decode(data, max_pixels=50_000_000)
    assert info.value.reason == "too-many-pixels" and "decodes to" in str(info.value)
    assert _status_mb("VmHWM") - base_mb < 50


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def png_bomb_rgba16(side: int) -> bytes:
    ihdr = side.to_bytes(4, "big") * 2 + bytes([16, 6, 0, 0, 0])
    idat = zlib.compress(b"\0" * 1_000_000, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )  # fmt: skip


def test_a_16_bit_rgba_png_converts_band_by_band_to_the_same_pixels():
    rng = np.random.default_rng(3)
    bgra = rng.integers(0, 65535, (300, 70, 4), np.uint16)
    ok, encoded = cv2.imencode(".png", bgra)
    rgb = images.decode(encoded.tobytes())
    eight = np.round(bgra / 257).astype(np.uint16)
    alpha = eight[..., 3:4]
    expected = (eight[..., 2::-1] * alpha + 255 * (255 - alpha) + 127) // 255
    assert rgb.shape == (300, 70, 3) and np.abs(rgb.astype(int) - expected).max() <= 1


def test_a_png_of_huge_text_chunks_is_refused_from_the_chunk_headers():
    ztxt = b"k\0\0" + zlib.compress(b"x" * 5_000_000, 9)
    ihdr = (64).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\0" * (64 * (64 * 3 + 1)))
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    data += png_chunk(b"zTXt", ztxt) * 200 + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    cpu = time.process_time()
    with pytest.raises(ImageError) as info:
        images.decode(data)
    assert info.value.reason == "too-much-metadata"
    assert time.process_time() - cpu < 0.5
    # A few kilobytes of text (what real files carry) are fine.
    small = data.replace(png_chunk(b"zTXt", ztxt) * 200, png_chunk(b"tEXt", b"Title\0cat" * 100))
    assert images.decode(small).shape == (64, 64, 3)


def test_an_unclosed_csv_quote_swallows_no_later_row(tmp_path):
    good = [f"p{i},/img/{i}.jpg,food|tag{i}" for i in range(5000)]  # ~170 KB after the bad row
    path = tmp_path / "posts.csv"
    path.write_text('id,image,tags\nbad,"/img/x.jpg,never closed\n' + "\n".join(good) + "\n")
    source = sources.open_source(str(path))
    posts = list(source.posts())
    assert len(posts) == 5000 and posts[0].id == "p0" and posts[-1].id == "p4999"
    assert source.skipped == {"bad-row": 1}
    # A quote that closes only after a megabyte: the row is bounded, the rest read again.
    filler = [f"q{i},/img/{i}.jpg,x" for i in range(60_000)]  # ~1.3 MB
    path.write_text('id,image,tags\nbad,"/a.jpg,x\n' + "\n".join(filler) + '\nlate,"z"",y\n')
    source = sources.open_source(str(path))
    assert sum(1 for _ in source.posts()) == 60_000 and source.skipped == {"bad-row": 2}


def test_a_json_array_manifest_is_streamed_an_element_at_a_time(tmp_path):
    path = tmp_path / "posts.json"
    rows = [{"id": "a", "image": "a.jpg", "tags": ["x"]}] + [[]] * 300_000
    rows.append({"id": "z", "image": "z.jpg", "tags": "y"})
    path.write_text(json.dumps(rows))  # json.loads would hold 300k lists (~20 MB)
    del rows
    base_mb = _reset_peak_rss_mb()
    source = sources.open_source(str(path))
    assert [p.id for p in source.posts()] == ["a", "z"]
    assert source.skipped == {"bad-row": 300_000}
    assert _status_mb("VmHWM") - base_mb < 10
    path.write_text('[{"id": "a", "image": "a.jpg"}, {"id": "b", "image": ')
    with pytest.raises(ValueError, match="not valid JSON|never closed"):
        list(sources.open_source(str(path)).posts())


def test_tags_are_linear_in_their_number():
    tags_95k = "|".join(f"t{i}" for i in range(95_000))  # one ~800 KB row
    started = time.monotonic()
    assert len(sources._tag_field(tags_95k)) == 95_000
    from hashtag import recommend

    assert len(recommend.parse_tag_list(",".join(f"g{i}" for i in range(50_000)))) == 50_000
    # Quadratic dedupe took ~45 s and ~13 s; linear takes well under a second each.
    assert time.monotonic() - started < 10


def test_recommend_manifest_lines_are_bounded_and_never_echoed():
    import io

    from hashtag import recommend

    huge = b'{"image": "' + b"A" * (3 * recommend.MAX_LINE_BYTES) + b'"}\n'
    stream = io.BytesIO(huge + b'{"tags": ["x"], "id": "ok"}\n' + b"[1]\n")
    base_mb = _reset_peak_rss_mb()
    queries = list(recommend.queries(stream, "."))
    assert _status_mb("VmHWM") - base_mb < 2 * recommend.MAX_LINE_BYTES / 2**20 + 10
    assert queries[0].error == f"bad line: over {recommend.MAX_LINE_BYTES} bytes"
    assert queries[1].id == "ok" and queries[1].given == ("x",) and not queries[1].error
    assert queries[2].error and len(repr(queries)) < 2000  # no line is echoed back whole
    long_id = io.BytesIO(json.dumps({"id": "i" * 100_000, "tags": ["x"]}).encode() + b"\n")
    (query,) = recommend.queries(long_id, ".")
    assert query.error and len(query.error) < 300


def test_secrets_in_urls_are_redacted_whole(tmp_path):
    from hashtag import storage

    assert storage.redact("http://user:p@ss@127.0.0.1:9/a.jpg") == "http://127.0.0.1:9/a.jpg"
    signed = "https://b.s3.amazonaws.com/a.jpg?X-Amz-Credential=AK&X-Amz-Signature=ff&size=2"
    assert storage.redact(signed) == (
        "https://b.s3.amazonaws.com/a.jpg?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&size=2"
    )
    for key in ("token", "key", "sig", "signature", "access_token", "password", "api_key"):
        assert "hunter2" not in storage.redact(f"http://h/x?{key}=hunter2"), key
    url = "http://bob:p@ss@127.0.0.1:9/a.jpg?access_token=hunter2"
    with pytest.raises(FetchError) as info:
        Fetcher(FetchConfig(allow_private=True, retries=0, timeout_s=0.5)).get(url)
    assert "hunter2" not in str(info.value) and "p@ss" not in str(info.value)
    assert "ss@" not in str(info.value)


@pytest.mark.parametrize(
    "address, metadata",
    [
        ("fec0::1", False),  # site-local (deprecated): internal, not public
        ("::169.254.169.254", True),  # IPv4-compatible
        ("::a9fe:a9fe", True),
        ("64:ff9b:1::a9fe:a9fe", True),  # local-use NAT64, /96 layout
        ("64:ff9b:1:a9fe:a9:fe00::", True),  # local-use NAT64, RFC 6052 /48 layout
        ("::127.0.0.1", False),
    ],
)
def test_more_embedded_addresses_are_unwrapped(address, metadata):
    assert not is_public_address(address)
    assert is_metadata_address(address) is metadata
    if metadata:
        fetcher = Fetcher(FetchConfig(allow_private=True, retries=0))
        with pytest.raises(FetchError) as info:
            fetcher.get(f"http://[{address}]/latest/meta-data/")
        assert info.value.reason == "metadata-address"


def _export_with_embedder(root, embedder_spec: dict, dim: int) -> str:
    """A kNN model exported the way tune exports it, on a dataset made with `embedder_spec`."""
    from test_tune import export_knn

    return export_knn(root, posts=120, dim=dim, tags=6, embedder=embedder_spec)


def test_a_model_folder_cannot_make_recommend_read_or_fetch_a_location(tmp_path, raw_server):
    from hashtag import artifacts, recommend
    from hashtag.errors import ArtifactError

    requests = []
    url = raw_server(lambda conn, stop: requests.append(1))
    model = _export_with_embedder(tmp_path, {"name": "classic", "version": 1}, dim=340)
    manifest_path = os.path.join(model, artifacts.MANIFEST)
    original = json.loads(open(manifest_path).read())
    huge = tmp_path / "huge.tflite"
    with open(huge, "wb") as f:
        f.truncate(3 * 10**9)  # sparse: reading it whole would take 3 GB
    for spec in (f"tflite:{url}/m.tflite", f"tflite:{huge}", "tflite:s3://elsewhere/m.tflite",
                 "tflite:../huge.tflite"):  # fmt: skip
        manifest = json.loads(json.dumps(original))
        manifest["extra"]["embedder"] = {"name": spec, "sha256": "0" * 64}
        open(manifest_path, "w").write(json.dumps(manifest))
        exported = recommend.ExportedModel(model)
        base_mb = _reset_peak_rss_mb()
        with pytest.raises(ArtifactError, match=f"{model}.*outside the folder.*re-export"):
            exported.embedder  # noqa: B018
        assert _status_mb("VmHWM") - base_mb < 50
    time.sleep(0.3)
    assert requests == [], "no request was sent to the location a model folder named"


def test_an_export_carries_its_tflite_weights(tmp_path, shared_dir):
    """The export copies the .tflite into the model folder (sha256 in its manifest); the
    original can go away, recommend still embeds; a changed copy is refused."""
    import shutil

    from hashtag import artifacts, embedders, recommend
    from hashtag.errors import ArtifactError

    source = shared_dir / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
    if not source.is_file():
        pytest.skip("the TFLite models are not in ../shared/models")
    weights = tmp_path / "mine.tflite"
    shutil.copyfile(source, weights)
    embedder = embedders.create(f"tflite:{weights}", num_threads=1)
    model = _export_with_embedder(tmp_path, embedder.spec.to_json(), dim=embedder.dim)
    weights.unlink()  # the model no longer depends on the file it was made with
    exported = recommend.ExportedModel(model)
    (name,) = exported.metadata["embedder_files"].values()
    folder = os.path.join(model, recommend.EMBEDDER_WEIGHTS)
    listed = artifacts.read(folder, embedders.WEIGHTS_FORMAT, (1,), what="w", fix="")
    assert listed.files[name]["sha256"] == embedder.spec.get("sha256")
    image = np.random.default_rng(0).integers(0, 255, (240, 240, 3), np.uint8)
    vector = exported.embedder.embed([image])
    np.testing.assert_allclose(vector, embedder.embed([image]), atol=1e-5)
    with open(os.path.join(folder, name), "r+b") as f:  # tampered copy
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(ArtifactError, match="damaged"):
        recommend.ExportedModel(model).embedder  # noqa: B018


def test_a_model_file_linked_out_of_its_folder_is_not_read(tmp_path):
    """An artifact's data file that is a link to a file elsewhere (even one with the listed
    size and sha256) is refused: a folder is read inside the folder only."""
    import shutil

    from hashtag import models
    from hashtag.errors import ArtifactError

    model = _export_with_embedder(tmp_path, {"name": "classic", "version": 1}, dim=340)
    name = next(n for n in os.listdir(model) if n.endswith(".npy"))
    outside = tmp_path / "elsewhere.npy"
    shutil.move(os.path.join(model, name), outside)
    os.symlink(outside, os.path.join(model, name))
    with pytest.raises(ArtifactError, match="leads outside"):
        models.load(model)


def test_a_dataset_array_linked_out_of_its_folder_is_not_mapped(tmp_path):
    import shutil

    from test_tune import write_dataset

    from hashtag.dataset import Dataset
    from hashtag.errors import ArtifactError

    dataset = write_dataset(str(tmp_path / "data"), posts=60, dim=4, tags=3)
    folder = tmp_path / "data"
    (part,) = {p.parent for p in folder.rglob("embeddings.npy")}
    shutil.move(part / "embeddings.npy", tmp_path / "elsewhere.npy")
    os.symlink(tmp_path / "elsewhere.npy", part / "embeddings.npy")
    with pytest.raises(ArtifactError, match="leads outside"):
        Dataset.load(dataset.uri).part("train")
