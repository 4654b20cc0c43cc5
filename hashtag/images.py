"""Decode image bytes into RGB uint8 arrays (H, W, 3), or say why not with ImageError.reason.

    rgb = decode(data, min_side=224)    # ImageError("...", reason="truncated") on bad input

The header is read first, in Python and cheaply (JPEG, PNG, GIF, BMP, WebP, and TIFF's first
IFD): the pixel count is checked against `max_pixels` before any pixel is decoded (decompression
bombs: a 1 MB deflate TIFF or PNG of 16k x 16k never reaches the decoder), and images whose
shorter side is under `min_image_side` are refused as "too-small". Only these formats are ever
decoded: anything else (PPM, HDR, JPEG 2000, AVIF, HTML, ...) is an "unsupported-format" skip
without decoding, since OpenCV would decode it in full before we could check its size. Decode
work is bounded too: a progressive JPEG with more than MAX_JPEG_SCANS scans ("too-many-scans";
real ones have about 10) would cost a full pass over the coefficients per scan.

Truncated files: a JPEG without an EOI marker after its first scan, or a PNG whose chunks stop
before IEND, is refused as "truncated". OpenCV would return such a JPEG "successfully" in many
versions, padded with grey where the data stopped; a half-grey picture would be embedded as if it
were real, so we never accept one.

Conversions: grayscale -> 3 equal channels; alpha -> composited on white (transparent logos and
stickers become what a viewer sees, not black); 16-bit -> 8-bit (rounded, /257); EXIF
orientation is applied for JPEG (OpenCV's default).

Speed: when `min_side` is given, a JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8
scale by libjpeg itself (IMREAD_REDUCED_COLOR_*), keeping the shorter side >= min_side. That is
several times faster than decoding in full and resizing.

Reasons: "empty", "unsupported-format", "truncated", "corrupt", "too-many-pixels",
"too-many-scans", "too-small", "unsupported".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np

MIN_IMAGE_SIDE = 8
MAX_JPEG_SCANS = 100
# Bytes of decoded pixels per allowed pixel when the caller gives no max_decoded_bytes: an RGBA
# image of 8 bits at max_pixels, i.e. the pixel cap as it always meant; 16-bit or float images
# must be that many times smaller.
DECODED_BYTES_PER_PIXEL = 4
# PNG ancillary chunks (text, ICC, EXIF...): libpng reads and inflates them all before the first
# row; real files carry kilobytes. More is refused from the chunk headers, before decoding.
MAX_PNG_METADATA_BYTES = 1 << 20
_BAND_PIXELS = 1 << 20  # conversions to RGB8 run on bands of rows of about this many pixels
# TIFF tags read: ImageWidth, ImageLength, BitsPerSample, Photometric, SamplesPerPixel,
# TileWidth, TileLength, SampleFormat.
_TIFF_TAGS = (256, 257, 258, 262, 277, 322, 323, 339)
# OpenCV >= 4.10 decodes straight to RGB with this flag (None before).
_COLOR_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_REDUCED_FLAGS = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
# JPEG start-of-frame markers (C0-CF without DHT C4, JPG C8 and DAC CC) carry the image size.
_JPEG_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class ImageError(ValueError):
    """Image bytes that cannot be used; `reason` is a short slug for skip counts."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Header:
    """What the header tells before decoding: format, size, and how to decode it."""

    kind: str
    width: int
    height: int
    # PNGs with alpha, 16 bits or a transparent palette must be read IMREAD_UNCHANGED;
    # IMREAD_COLOR would drop the alpha onto black and truncate 16 bits.
    needs_unchanged: bool = False
    scan_offset: int = 0  # JPEG: where the first scan starts
    # What the decoder will return per pixel, at most: channels x bytes per sample.
    channels: int = 4
    sample_bytes: int = 1


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a JPEG, PNG, GIF, BMP or WebP; None if unknown.

    For JPEG this is the stored size, before any EXIF rotation.
    """
    try:
        header = _read_header(data, complete=False)
    except ImageError:
        return None
    return (header.width, header.height) if header else None


def decode(
    data: bytes,
    *,
    max_pixels: int = 50_000_000,
    min_side: int | None = None,
    min_image_side: int = MIN_IMAGE_SIDE,
    max_decoded_bytes: int | None = None,
) -> np.ndarray:
    """Decode `data` into an RGB uint8 (H, W, 3) array, or raise ImageError with a reason.

    max_pixels:     refuse images with more pixels than this (checked on the header).
    max_decoded_bytes: refuse images whose decoded buffer (pixels x channels x bytes per sample,
                    from the header) is larger ("too-many-pixels"); None: 4 x max_pixels.
    min_side:       the shorter side the caller needs; larger JPEGs are decoded at reduced scale,
                    never below it. None: full size.
    min_image_side: refuse images whose shorter side is below this ("too-small").
    """
    if data is None or len(data) == 0:
        raise ImageError("empty image: zero bytes", "empty")
    header = _read_header(data)
    if header is None:
        raise ImageError(
            f"not a format whose size can be checked before decoding (starts with "
            f"{bytes(data[:8])!r}); use JPEG, PNG, WebP, GIF, BMP or TIFF",
            "unsupported-format",
        )
    _check_size(header.width, header.height, max_pixels, min_image_side)
    _check_decoded_bytes(
        header,
        DECODED_BYTES_PER_PIXEL * max_pixels if max_decoded_bytes is None else max_decoded_bytes,
    )
    if header.kind == "jpeg":
        _check_jpeg_complete(data, header)
        scans = data.count(b"\xff\xda", header.scan_offset)  # FF is stuffed inside scans
        if scans > MAX_JPEG_SCANS:
            raise ImageError(
                f"JPEG with {scans} scans, over {MAX_JPEG_SCANS}: decoding would cost a pass "
                "per scan",
                "too-many-scans",
            )
    flags = cv2.IMREAD_COLOR
    if header.needs_unchanged or header.kind not in ("jpeg", "png"):
        flags = cv2.IMREAD_UNCHANGED  # unknown layout: take it as stored, convert below
    elif min_side is not None:
        flags = _REDUCED_FLAGS.get(_reduction(header, min_side), cv2.IMREAD_COLOR)
    already_rgb = flags != cv2.IMREAD_UNCHANGED and _COLOR_RGB is not None
    if already_rgb:  # libjpeg writes RGB directly: no BGR->RGB pass over the pixels
        flags = (flags & ~cv2.IMREAD_COLOR) | _COLOR_RGB
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ImageError(f"OpenCV cannot decode this image: {e}", "corrupt") from e
    if image is None:
        raise ImageError(f"OpenCV cannot decode this {header.kind} image", "corrupt")
    if image.shape[0] * image.shape[1] > header.width * header.height:  # a lying header
        raise ImageError(f"the {header.kind} decoded larger than its header said", "corrupt")
    return image if already_rgb else _to_rgb8(image)


def _check_size(width: int, height: int, max_pixels: int, min_image_side: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} is {width * height} pixels, over max_pixels={max_pixels}",
            "too-many-pixels",
        )
    if min(width, height) < min_image_side:
        raise ImageError(
            f"{width}x{height} is smaller than {min_image_side} px on a side", "too-small"
        )


def _check_decoded_bytes(header: _Header, limit: int) -> None:
    decoded = header.width * header.height * header.channels * header.sample_bytes
    if decoded > limit:
        raise ImageError(
            f"{header.width}x{header.height} with {header.channels} channels of "
            f"{header.sample_bytes} byte(s) decodes to {decoded} bytes, over {limit}",
            "too-many-pixels",
        )


def _reduction(header: _Header, min_side: int) -> int:
    """The largest of 8, 4, 2 that keeps the shorter side >= min_side (1: decode in full)."""
    shorter = min(header.width, header.height)
    for factor in (8, 4, 2):
        if shorter // factor >= min_side:
            return factor
    return 1


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """BGR, BGRA or grayscale of any depth OpenCV returns -> RGB uint8, a band of rows at a
    time into one output array: the only full-size allocation besides the decoded image is the
    RGB8 result (a 16-bit or float RGBA image is never copied whole, in any type)."""
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ImageError(f"unsupported pixel type {image.dtype}", "unsupported")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3, 4):
        raise ImageError(f"unsupported channel count {channels}", "unsupported")
    if image.dtype == np.uint8 and channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place
    height, width = image.shape[:2]
    out = np.empty((height, width, 3), np.uint8)
    step = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, step):
        out[top : top + step] = _band_to_rgb8(image[top : top + step], channels)
    return out


def _band_to_rgb8(band: np.ndarray, channels: int) -> np.ndarray:
    if band.dtype == np.uint16:
        band = cv2.convertScaleAbs(band, alpha=1 / 257)
    elif band.dtype != np.uint8:  # float: 0..1
        band = (np.clip(band, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if channels == 1:
        return cv2.cvtColor(band.reshape(band.shape[:2]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(band, cv2.COLOR_BGR2RGB)
    # composite on white: out = rgb * a + 255 * (1 - a), in integers
    alpha = band[..., 3:4].astype(np.uint16)
    rgb = band[..., 2::-1].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


# headers ----------------------------------------------------------------------------------------


def _read_header(data: bytes, complete: bool = True) -> _Header | None:
    """The header of a known format (raises ImageError if it is cut or broken), else None.

    complete: also check that a PNG's chunks reach IEND (a JPEG's end is checked separately).
    """
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header(data, complete)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        _need(data, 10)
        return _Header("gif", _le(data, 6, 2), _le(data, 8, 2))
    if data[:2] == b"BM" and len(data) >= 18:
        return _bmp_header(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_header(data)
    return None


def _jpeg_header(data: bytes) -> _Header:
    """Walk the markers up to the first scan (SOS); the frame header (SOFn) gives the size."""
    i, size = 2, None
    while True:
        _need(data, i + 4)
        if data[i] != 0xFF:
            raise ImageError(f"broken JPEG: no marker at byte {i}", "corrupt")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD8, 0xD9) or marker < 0xC0:  # 02-BF are reserved, never in files
            raise ImageError(f"broken JPEG: unexpected marker {marker:#x} in header", "corrupt")
        length = _be(data, i + 2, 2)
        if length < 2:
            raise ImageError("broken JPEG: bad segment length", "corrupt")
        if marker == 0xDA:
            if size is None:
                raise ImageError("broken JPEG: scan before frame header", "corrupt")
            return _Header("jpeg", *size, scan_offset=i, channels=3)
        if marker in _JPEG_SOF:
            _need(data, i + 9)
            size = (_be(data, i + 7, 2), _be(data, i + 5, 2))  # stored as height, width
        i += 2 + length


def _check_jpeg_complete(data: bytes, header: _Header) -> None:
    # Inside entropy-coded data every 0xFF is followed by 0x00 or a restart marker, so the first
    # FF D9 after the first scan is the end of image; an EXIF thumbnail's own EOI comes before.
    # Most files end with it: checking the last two bytes spares a scan of the whole file.
    if data.endswith(b"\xff\xd9") and len(data) - 2 >= header.scan_offset:
        return
    if data.find(b"\xff\xd9", header.scan_offset) < 0:
        raise ImageError("truncated JPEG: no end-of-image marker", "truncated")


def _png_header(data: bytes, complete: bool) -> _Header:
    """IHDR gives the size and pixel layout; walking the chunks to IEND finds truncation."""
    _need(data, 33)
    if data[12:16] != b"IHDR":
        raise ImageError("broken PNG: first chunk is not IHDR", "corrupt")
    width, height = _be(data, 16, 4), _be(data, 20, 4)
    bit_depth, color_type = data[24], data[25]
    has_transparency = False
    i, n, metadata = 8, len(data), 0
    while complete:
        if i + 8 > n:
            raise ImageError("truncated PNG: chunks stop before IEND", "truncated")
        chunk = data[i + 4 : i + 8]
        length = _be(data, i, 4)
        if chunk == b"IEND":
            break
        if chunk == b"tRNS":
            has_transparency = True
        elif chunk[:1].islower():  # ancillary: text, ICC profile, EXIF, ...
            body = data[i + 8 : i + 8 + min(length, MAX_PNG_METADATA_BYTES + 1)]
            metadata += _png_chunk_bytes(chunk, body, MAX_PNG_METADATA_BYTES + 1 - metadata)
            if metadata > MAX_PNG_METADATA_BYTES:
                raise ImageError(
                    f"PNG with over {MAX_PNG_METADATA_BYTES} bytes of ancillary chunks "
                    f"({chunk.decode('latin-1')!r} ...): libpng would inflate them all first",
                    "too-much-metadata",
                )
        i += 12 + length
    # color types 4 and 6 carry alpha
    alpha = color_type in (4, 6) or has_transparency
    needs_unchanged = bit_depth == 16 or alpha
    channels = 4 if alpha else 1 if color_type == 0 else 3
    return _Header("png", width, height, needs_unchanged, channels=channels,
                   sample_bytes=2 if bit_depth == 16 else 1)  # fmt: skip


def _png_chunk_bytes(chunk: bytes, body: bytes, budget: int) -> int:
    """What an ancillary chunk costs libpng: its bytes, inflated for the compressed kinds
    (zTXt, iCCP, compressed iTXt: 5 KB of zlib can inflate to 5 MB), inflating at most
    `budget` bytes of it here."""
    try:
        keyword_end = body.index(b"\0")
        if chunk in (b"zTXt", b"iCCP"):
            stream = body[keyword_end + 2 :]
        elif chunk == b"iTXt" and body[keyword_end + 1] == 1:
            rest = body[keyword_end + 3 :]
            stream = rest[rest.index(b"\0") + 1 :]
            stream = stream[stream.index(b"\0") + 1 :]
        else:
            return len(body)
        return max(len(body), len(zlib.decompressobj().decompress(stream, max(budget, 1))))
    except (ValueError, IndexError, zlib.error):
        return len(body)  # broken: libpng refuses it, at the cost of its bytes


def _bmp_header(data: bytes) -> _Header:
    dib_size = _le(data, 14, 4)
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER
        _need(data, 22)
        return _Header("bmp", _le(data, 18, 2), _le(data, 20, 2))
    _need(data, 26)
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)  # negative: stored top-down
    return _Header("bmp", abs(width), abs(height), needs_unchanged=True)


def _webp_header(data: bytes) -> _Header:
    _need(data, 30)
    chunk = data[12:16]
    if chunk == b"VP8 ":
        return _Header("webp", _le(data, 26, 2) & 0x3FFF, _le(data, 28, 2) & 0x3FFF)
    if chunk == b"VP8L":
        bits = _le(data, 21, 4)
        return _Header("webp", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
    if chunk == b"VP8X":
        return _Header("webp", 1 + _le(data, 24, 3), 1 + _le(data, 27, 3))
    raise ImageError(f"broken WebP: unknown chunk {chunk!r}", "corrupt")


def _tiff_header(data: bytes) -> _Header | None:
    """The first IFD, read as libtiff reads it: the size, samples and bits per sample the
    decoder will use. A tag given twice, or a size tag holding more than one value, is refused:
    libtiff and a header check could each take a different one (two ImageWidth tags: an 18 KB
    file decoded at 6 GB). None (unsupported) without ImageWidth and ImageLength."""
    order = "little" if data[:2] == b"II" else "big"

    def number(offset: int, size: int) -> int:
        _need(data, offset + size)
        return int.from_bytes(data[offset : offset + size], order)

    ifd = number(4, 4)
    count = number(ifd, 2)
    values: dict[int, list[int]] = {}
    seen: set[int] = set()
    for k in range(min(count, 4096)):  # a real IFD has a few dozen entries
        entry = ifd + 2 + 12 * k
        tag, kind, n = number(entry, 2), number(entry + 2, 2), number(entry + 4, 4)
        if tag in seen:
            raise ImageError(f"TIFF whose first IFD repeats tag {tag}", "corrupt")
        seen.add(tag)
        if tag not in _TIFF_TAGS:
            continue
        if kind not in (3, 4) or n < 1 or (tag in (256, 257, 322, 323) and n != 1):
            raise ImageError(f"TIFF tag {tag} of type {kind} with {n} values", "corrupt")
        size = 2 if kind == 3 else 4
        at = entry + 8 if n * size <= 4 else number(entry + 8, 4)
        values[tag] = [number(at + size * j, size) for j in range(min(n, 8))]
    if 256 not in values or 257 not in values:
        return None
    width, height = values[256][0], values[257][0]
    samples = values.get(277, [1])[0]
    # libtiff allocates a whole tile, and a buffer per sample: bound them like the image.
    tile = values.get(322, [1])[0] * values.get(323, [1])[0]
    if samples > 4 or tile > max(width * height, 1 << 16):
        raise ImageError(
            f"TIFF with {samples} samples per pixel or {tile}-pixel tiles", "too-many-pixels"
        )
    bits = max(values.get(258, [1]))
    if bits > 64:
        raise ImageError(f"TIFF with {bits} bits per sample", "corrupt")
    palette = values.get(262, [1])[0] == 3
    channels = 1 if samples == 1 and not palette else 4 if samples in (2, 4) else 3
    return _Header(
        "tiff", width, height, needs_unchanged=True, channels=channels,
        sample_bytes=max(1, (bits + 7) // 8),
    )  # fmt: skip


def _need(data: bytes, n: int) -> None:
    if len(data) < n:
        raise ImageError(f"truncated image: header needs {n} bytes, got {len(data)}", "truncated")


def _be(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "big")


def _le(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")
