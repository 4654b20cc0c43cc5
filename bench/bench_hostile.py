"""Benchmark: a scrape of good photos mixed with hostile rows, on a real local Ray.

    python bench/bench_hostile.py [--good 24] [--fetch-deadline-s 10] [--cpus 2]

The manifest holds `--good` real photos (feedme-food from ../shared when present, else photos
drawn with OpenCV) and one row of each attack: a 16k x 16k deflate TIFF and PNG (decompression
bombs), a progressive JPEG whose last scan is repeated 2,000 times (CPU bomb), /dev/zero, a FIFO,
an HTTP server answering `100 Continue` forever, one dribbling its headers a byte at a time, one
dribbling its body, a JSON row nested 100,000 deep, a 100,000-character caption and a
100,000-character id; and (issue 19) a TIFF with two ImageWidth tags, a float64 RGBA TIFF and a
16-bit RGBA PNG of 7071 x 7071 (under the pixel cap, GBs decoded), a PNG of zTXt chunks that
inflate to 1 GB, an image that is a symbolic link out of the folder, and a row of 95,000 distinct
tags. Every server listens on 127.0.0.1 only.

Then the readers of untrusted text, in this process (wall time and the growth of a reset peak
RSS): a CSV whose unclosed quote precedes 5,000 good rows, a JSON-array manifest of `--array-mb`
MB of `[],`, a `recommend --manifest` line of `--line-mb` MB through a pipe, 50,000 given tags.

Prints the wall time, the peak resident memory of any process of the run (this driver, Ray's
GCS, raylet and workers: VmHWM from /proc, sampled every 0.2 s), the skip reasons, and whether
every good photo was embedded. Target: the run ends, peak RSS < 1 GB, every good photo embedded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import ray

from hashtag import scrape, shards
from hashtag.fetch import FetchConfig

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "feedme-food"


# -- the hostile corpus ------------------------------------------------------------------------


def _deflate_zeros(size: int) -> bytes:
    """zlib of `size` zero bytes, compressed in 16 MB steps (never holding them)."""
    packer, chunk, out = zlib.compressobj(9), bytes(16 << 20), []
    for start in range(0, size, len(chunk)):
        out.append(packer.compress(chunk[: min(len(chunk), size - start)]))
    return b"".join(out) + packer.flush()


def tiff_bomb(side: int = 16384) -> bytes:
    """A little-endian RGB TIFF of side x side, one deflate strip of zeros (~800 KB)."""
    strip = _deflate_zeros(side * side * 3)
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 2),
               (273, 4, 256), (277, 3, 3), (278, 4, side), (279, 4, len(strip))]  # fmt: skip
    ifd = len(entries).to_bytes(2, "little")
    for tag, kind, value in entries:
        ifd += tag.to_bytes(2, "little") + kind.to_bytes(2, "little") + (1).to_bytes(4, "little")
        ifd += value.to_bytes(4, "little")
    head = b"II*\x00" + (8).to_bytes(4, "little") + ifd + b"\0\0\0\0"
    return head + b"\0" * (256 - len(head)) + strip


def png_bomb(side: int = 16384) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    pixels = _deflate_zeros(side * (side * 3 + 1))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def repeated_scan_jpeg(repeats: int = 2000) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + b"\xff\xd9"


def tiff(entries: list[tuple[int, int, int, int]], tail: bytes = b"") -> bytes:
    """A little-endian TIFF of one IFD of (tag, type, count, value) entries, as given."""
    ifd = len(entries).to_bytes(2, "little")
    for tag, kind, count, value in entries:
        ifd += tag.to_bytes(2, "little") + kind.to_bytes(2, "little")
        ifd += count.to_bytes(4, "little") + value.to_bytes(4, "little")
    return b"II*\x00" + (8).to_bytes(4, "little") + ifd + b"\0\0\0\0" + tail


def tiff_two_widths() -> bytes:
    """Two ImageWidth tags: a check keeping the last sees 64 px; libtiff decodes the first."""
    strip = _deflate_zeros(200_000 * 3 * 64)
    return tiff([(256, 4, 1, 200_000), (256, 4, 1, 64), (257, 4, 1, 31_000), (258, 3, 1, 8),
                 (259, 3, 1, 8), (262, 3, 1, 2), (273, 4, 1, 122), (277, 3, 1, 3),
                 (279, 4, 1, len(strip))], strip)  # fmt: skip


def tiff_float64_rgba(side: int = 7071) -> bytes:
    strip = _deflate_zeros(side * 64 * 32)
    return tiff([(256, 4, 1, side), (257, 4, 1, side), (258, 3, 4, 134), (259, 3, 1, 8),
                 (262, 3, 1, 2), (273, 4, 1, 142), (277, 3, 1, 4), (278, 4, 1, 64),
                 (279, 4, 1, len(strip)), (339, 3, 1, 3)],
                (64).to_bytes(2, "little") * 4 + strip)  # fmt: skip


def _png(header: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    body = b"".join(chunk(kind, data) for kind, data in chunks)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")


def png_rgba16(side: int = 7071) -> bytes:
    header = side.to_bytes(4, "big") * 2 + bytes([16, 6, 0, 0, 0])
    return _png(header, (b"IDAT", _deflate_zeros(side * (side * 8 + 1))))


def png_ztxt(chunks: int = 200) -> bytes:
    header = (64).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    text = b"k\0\0" + zlib.compress(b"x" * 5_000_000, 9)
    pixels = zlib.compress(b"\0" * 64 * (64 * 3 + 1))
    return _png(header, *[(b"zTXt", text)] * chunks, (b"IDAT", pixels))


def serve(behaviour, stop: threading.Event) -> str:
    """A TCP server on 127.0.0.1 running `behaviour(conn)` per connection until `stop`."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                while not stop.is_set():
                    behaviour(conn)
            except OSError:
                pass  # the client gave up

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
        listener.close()

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def _continue(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    time.sleep(0.01)


def _drip_header(conn: socket.socket, sent: list = []) -> None:  # noqa: B006 (per server)
    conn.sendall(b"HTTP/1.1 200 OK\r\n" if not sent else b"X: y\r\n")
    sent.append(1)
    time.sleep(0.2)


def _drip_body(conn: socket.socket, sent: list = []) -> None:  # noqa: B006 (per server)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9999999\r\n\r\n" if not sent else b"x")
    sent.append(1)
    time.sleep(0.2)


def good_photos(folder: Path, n: int) -> list[dict]:
    rows = []
    if (SHARED_PHOTOS / "posts.jsonl").exists():
        lines = (SHARED_PHOTOS / "posts.jsonl").read_text().splitlines()[:n]
        for i, line in enumerate(lines):
            row = json.loads(line)
            rows.append(
                {"id": f"good{i}", "image": str(SHARED_PHOTOS / row["image"]), "tags": row["tags"]}
            )
    rng = np.random.default_rng(0)
    for i in range(len(rows), n):  # drawn photos when ../shared is absent
        image = np.full((240, 320, 3), rng.integers(0, 255, 3), np.uint8)
        cv2.circle(image, (160, 120), 40 + i, (255, 255, 255), -1)
        cv2.imwrite(str(folder / f"good{i}.jpg"), image)
        rows.append({"id": f"good{i}", "image": str(folder / f"good{i}.jpg"), "tags": ["drawn"]})
    return rows


def hostile_rows(folder: Path, stop: threading.Event) -> list[str]:
    (folder / "tiff-bomb.tif").write_bytes(tiff_bomb())
    (folder / "png-bomb.png").write_bytes(png_bomb())
    (folder / "scans.jpg").write_bytes(repeated_scan_jpeg())
    os.mkfifo(folder / "fifo.jpg")
    (folder / "two-widths.tif").write_bytes(tiff_two_widths())
    (folder / "float64.tif").write_bytes(tiff_float64_rgba())
    (folder / "rgba16.png").write_bytes(png_rgba16())
    (folder / "ztxt.png").write_bytes(png_ztxt())
    (folder / "link.jpg").symlink_to("/etc/passwd")
    images = {
        "tiff-two-widths": str(folder / "two-widths.tif"),
        "tiff-float64-rgba": str(folder / "float64.tif"),
        "png-rgba16": str(folder / "rgba16.png"),
        "png-ztxt": str(folder / "ztxt.png"),
        "symlink-out": str(folder / "link.jpg"),
        "tiff-bomb": str(folder / "tiff-bomb.tif"),
        "png-bomb": str(folder / "png-bomb.png"),
        "repeated-scans": str(folder / "scans.jpg"),
        "dev-zero": "/dev/zero",
        "fifo": str(folder / "fifo.jpg"),
        "endless-100-continue": serve(_continue, stop) + "/a.jpg",
        "dribbled-headers": serve(_drip_header, stop) + "/b.jpg",
        "dribbled-body": serve(_drip_body, stop) + "/c.jpg",
    }
    rows = [
        json.dumps({"id": name, "image": image, "tags": ["x"]}) for name, image in images.items()
    ]
    rows.append("[" * 100_000 + "]" * 100_000)  # nested JSON
    rows.append(json.dumps({"id": "huge-caption", "image": "/dev/null", "caption": "a." * 50_000}))
    rows.append(json.dumps({"id": "i" * 100_000, "image": "/dev/null", "tags": ["x"]}))
    tags = [f"t{i}" for i in range(95_000)]  # one ~800 KB row; quadratic dedupe took ~45 s
    rows.append(json.dumps({"id": "95k-tags", "image": "/dev/null", "tags": tags}))
    return rows


# -- the readers of untrusted text, in this process ---------------------------------------------


def _hwm_reset_mb() -> float:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measured(name: str, work) -> None:
    base = _hwm_reset_mb()
    start = time.perf_counter()
    outcome = work()
    wall = time.perf_counter() - start
    print(f"  {name:<34} {outcome:<44} {wall:6.2f} s  +{_status_mb('VmHWM') - base:6.1f} MB")


def readers(folder: Path, array_mb: int, line_mb: int) -> None:
    from hashtag import recommend, sources

    print("readers (this process): attack, outcome, wall time, growth of the peak RSS")
    csv_path = folder / "posts.csv"
    good = "\n".join(f"p{i},/img/{i}.jpg,food|t{i}" for i in range(5000))
    csv_path.write_text('id,image,tags\nbad,"/img/x.jpg,never closed\n' + good + "\n")

    def csv_rows() -> str:
        source = sources.open_source(str(csv_path))
        kept = sum(1 for _ in source.posts())
        return f"{kept}/5000 good rows kept, skipped {dict(source.skipped)}"

    measured("CSV quote never closed", csv_rows)

    array_path = folder / "array.json"
    with open(array_path, "w") as f:
        f.write("[")
        f.write("[]," * (array_mb * 2**20 // 3))
        f.write('{"id": "last", "image": "/x.jpg"}]')

    def array_rows() -> str:
        source = sources.open_source(str(array_path))
        kept = [p.id for p in source.posts()]
        return f"kept {kept}, {source.skipped['bad-row']} bad rows"

    measured(f"JSON array, {array_mb} MB of `[],`", array_rows)

    def long_line() -> str:
        read, write = os.pipe()

        def writer() -> None:
            with os.fdopen(write, "wb") as pipe:
                pipe.write(b'{"image": "')
                block = b"A" * (1 << 20)
                for _ in range(line_mb):
                    pipe.write(block)
                pipe.write(b'"}\n{"id": "after", "tags": ["x"]}\n')

        thread = threading.Thread(target=writer)
        thread.start()
        with os.fdopen(read, "rb") as pipe:
            queries = list(recommend.queries(pipe, "."))
        thread.join()
        shown = max(len(repr(q)) for q in queries)
        return f"{queries[0].error[:28]}; next ok: {queries[1].id}; {shown} chars out"

    measured(f"recommend --manifest {line_mb} MB line", long_line)

    given = ",".join(f"g{i}" for i in range(50_000))
    measured(
        "recommend --tags 50,000 tags",
        lambda: f"{len(recommend.parse_tag_list(given))} tags (quadratic: ~13 s)",
    )


# -- memory of every process of the run ---------------------------------------------------------


class PeakRss:
    """Samples VmHWM (peak RSS) of this process and all its descendants every 0.2 s."""

    def __init__(self) -> None:
        self.peak: dict[int, tuple[int, str]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.2)

    def sample(self) -> None:
        parents, status = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            parents[int(pid)] = int(fields.get("PPid", "0"))
            status[int(pid)] = fields
        ours = {os.getpid()}
        for _ in range(6):  # descendants, a few generations deep
            ours |= {pid for pid, parent in parents.items() if parent in ours}
        for pid in ours:
            hwm = status[pid].get("VmHWM", "0 kB").split()[0]
            kb = int(hwm) if hwm.isdigit() else 0
            if kb > self.peak.get(pid, (0, ""))[0]:
                self.peak[pid] = (kb, status[pid].get("Name", "?").strip())

    def close(self) -> tuple[int, str]:
        self.stop.set()
        self.thread.join()
        self.sample()
        return max(self.peak.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--good", type=int, default=24)
    parser.add_argument("--fetch-deadline-s", type=float, default=10.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--array-mb", type=int, default=10)
    parser.add_argument("--line-mb", type=int, default=1536)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="hashtag-hostile-"))
    stop = threading.Event()
    try:
        good = good_photos(folder, args.good)
        rows = [json.dumps(r) for r in good] + hostile_rows(folder, stop)
        manifest = folder / "posts.jsonl"
        manifest.write_text("\n".join(rows) + "\n")
        print(f"manifest: {args.good} good photos + {len(rows) - args.good} hostile rows "
              f"({manifest.stat().st_size / 1e6:.1f} MB)")  # fmt: skip

        memory = PeakRss()
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        summary = scrape.run(
            scrape.ScrapeConfig(
                source=str(manifest),
                out=str(folder / "out"),
                shard_size=8,
                fetch=FetchConfig(  # the hostile servers are on 127.0.0.1
                    allow_private=True, fetch_deadline_s=args.fetch_deadline_s, timeout_s=2.0
                ),
                embedder=("classic",),  # the figures below are the fetch and decode defences'
            )
        )
        wall = time.perf_counter() - start
        ray.shutdown()
        peak_kb, peak_name = memory.close()

        embedded = {row["id"] for i in shards.finished_shards(str(folder / "out"))
                    for row in shards.read_rows(str(folder / "out"), i)}  # fmt: skip
        missing = [r["id"] for r in good if r["id"] not in embedded]
        print(f"wall time: {wall:.1f} s (fetch deadline {args.fetch_deadline_s:g} s)")
        print(f"peak RSS of any process: {peak_kb / 1024:.0f} MB ({peak_name}); target < 1024 MB")
        print(f"failed shards: {summary['failed_shards'] or 'none'}")
        print("skipped:", json.dumps(summary["skipped"], sort_keys=True))
        print(f"good photos embedded: {args.good - len(missing)}/{args.good}"
              + (f" (missing: {missing})" if missing else ""))  # fmt: skip
        readers(folder, args.array_mb, args.line_mb)
    finally:
        stop.set()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
