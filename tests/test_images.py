"""decode() on good images of every layout and on every kind of bad input, all made here."""

import struct
import zlib

import cv2
import numpy as np
import pytest

from hashtag import images
from hashtag.images import ImageError, decode, image_size

RED_BGR = (0, 0, 255)


def encode(image: np.ndarray, ext: str = ".png", params=()) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok
    return buffer.tobytes()


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def reason_of(data: bytes, **options) -> str:
    with pytest.raises(ImageError) as info:
        decode(data, **options)
    return info.value.reason


def set_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite IHDR's size (and its CRC, so that it stays a valid PNG header)."""
    ihdr = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + data[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


# good images ------------------------------------------------------------------------------------


def test_png_is_returned_exactly_in_rgb():
    bgr = noise(20, 30)
    rgb = decode(encode(bgr))
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 30, 3)
    np.testing.assert_array_equal(rgb, bgr[..., ::-1])


def test_jpeg_colour_order():
    bgr = np.full((32, 48, 3), RED_BGR, np.uint8)
    rgb = decode(encode(bgr, ".jpg"))
    assert rgb.shape == (32, 48, 3)
    assert rgb[..., 0].min() > 240 and rgb[..., 1:].max() < 15  # red is channel 0


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_grayscale_becomes_three_equal_channels(ext):
    gray = noise(16, 16, channels=1)
    rgb = decode(encode(gray, ext))
    assert rgb.shape == (16, 16, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_alpha_is_composited_on_white():
    bgra = np.zeros((10, 10, 4), np.uint8)
    bgra[:, :5] = (*RED_BGR, 255)  # opaque red
    bgra[:, 5:] = (*RED_BGR, 0)  # fully transparent
    bgra[0, 0] = (0, 0, 0, 128)  # half-transparent black
    rgb = decode(encode(bgra))
    assert rgb.shape == (10, 10, 3)
    assert tuple(rgb[5, 2]) == (255, 0, 0)
    assert tuple(rgb[5, 7]) == (255, 255, 255)
    assert tuple(rgb[0, 0]) == (127, 127, 127)


def test_16_bit_is_scaled_to_8_bit():
    bgr16 = np.zeros((8, 8, 3), np.uint16)
    bgr16[..., 0] = 65535  # blue full
    bgr16[..., 2] = 257 * 100  # red 100
    rgb = decode(encode(bgr16))
    assert rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (100, 0, 255)
    gray16 = np.full((8, 8), 257 * 7, np.uint16)
    assert tuple(decode(encode(gray16))[3, 3]) == (7, 7, 7)


def test_16_bit_with_alpha():
    bgra16 = np.zeros((8, 8, 4), np.uint16)
    bgra16[..., 3] = 0  # transparent
    bgra16[:4, :, 3] = 65535
    rgb = decode(encode(bgra16))
    assert tuple(rgb[7, 0]) == (255, 255, 255) and tuple(rgb[0, 0]) == (0, 0, 0)


@pytest.mark.parametrize("ext", [".bmp", ".webp", ".tiff"])
def test_other_formats(ext):
    bgr = noise(24, 40)
    try:
        data = encode(bgr, ext)
    except (AssertionError, cv2.error):
        pytest.skip(f"this OpenCV cannot write {ext}")
    rgb = decode(data)
    assert rgb.shape == (24, 40, 3)
    if ext != ".webp":  # lossless
        np.testing.assert_array_equal(rgb, bgr[..., ::-1])


def test_jpeg_with_trailing_bytes_after_eoi_is_fine():
    data = encode(noise(32, 32), ".jpg") + b"\x00" * 100 + b"appended by some camera"
    assert decode(data).shape == (32, 32, 3)


# reduced decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "min_side, shape",
    [
        (None, (1200, 1600)),
        (1000, (1200, 1600)),
        (600, (600, 800)),  # 1/2
        (224, (300, 400)),  # 1/4: 1200/8 = 150 would be under 224
        (100, (150, 200)),  # 1/8
    ],
)
def test_large_jpeg_is_decoded_reduced_but_never_below_min_side(min_side, shape):
    bgr = cv2.resize(noise(12, 16), (1600, 1200), interpolation=cv2.INTER_NEAREST)
    rgb = decode(encode(bgr, ".jpg"), min_side=min_side)
    assert rgb.shape[:2] == shape
    if min_side:
        assert min(rgb.shape[:2]) >= min_side


# bad input --------------------------------------------------------------------------------------


def test_empty():
    assert reason_of(b"") == "empty"


@pytest.mark.parametrize(
    "data",
    [b"hello, world", b"<html><body>404</body></html>", bytes(range(256)) * 4, b"\x00" * 1000],
)
def test_not_an_image(data):
    assert reason_of(data) == "unsupported-format"


@pytest.mark.parametrize("keep", [0.01, 0.3, 0.7, 0.99])
def test_truncated_jpeg(keep):
    data = encode(noise(200, 300), ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
    cut = max(4, int(len(data) * keep))
    assert reason_of(data[:cut]) == "truncated"
    assert reason_of(data[:-2]) == "truncated"  # only the EOI marker missing


def test_truncated_jpeg_with_an_embedded_thumbnail():
    # A comment segment holding a whole little JPEG, as EXIF thumbnails are held in APP1: its
    # EOI marker must not make a cut main image look complete.
    thumbnail = encode(noise(8, 8), ".jpg")
    segment = b"\xff\xfe" + struct.pack(">H", len(thumbnail) + 2) + thumbnail
    data = encode(noise(200, 300), ".jpg")
    data = data[:2] + segment + data[2:]
    assert decode(data).shape == (200, 300, 3)
    assert reason_of(data[: len(data) // 2]) == "truncated"


@pytest.mark.parametrize("keep", [0.002, 0.01, 0.5, 0.99])
def test_truncated_png(keep):
    data = encode(noise(200, 300))
    assert reason_of(data[: max(9, int(len(data) * keep))]) == "truncated"
    assert reason_of(data[:-12]) == "truncated"  # only IEND missing


def test_corrupt_png_data():
    data = bytearray(encode(noise(100, 100)))
    data[200:400] = bytes(200)  # zero a stretch of the compressed pixels (CRC fails)
    assert reason_of(bytes(data)) == "corrupt"


def test_jpeg_start_then_garbage():
    assert reason_of(b"\xff\xd8\xff" + b"garbage" * 20) == "corrupt"


def test_too_many_pixels_is_refused_from_the_header(monkeypatch):
    def no_decoding(*args):
        raise AssertionError("a bomb must be refused before decoding")

    monkeypatch.setattr(images.cv2, "imdecode", no_decoding)
    png = set_png_size(encode(np.zeros((10, 10, 3), np.uint8)), 60_000, 60_000)
    jpeg = set_jpeg_size(encode(np.zeros((10, 10, 3), np.uint8), ".jpg"), 60_000, 60_000)
    assert image_size(png) == (60_000, 60_000)
    assert image_size(jpeg) == (60_000, 60_000)
    assert reason_of(png) == "too-many-pixels"
    assert reason_of(jpeg) == "too-many-pixels"


def test_max_pixels_on_a_real_image():
    data = encode(np.zeros((1000, 1000, 3), np.uint8), ".jpg")
    assert reason_of(data, max_pixels=999_999) == "too-many-pixels"
    assert decode(data, max_pixels=1_000_000).shape == (1000, 1000, 3)


@pytest.mark.parametrize("shape", [(4, 100), (100, 7), (1, 1)])
def test_too_small(shape):
    image = noise(*shape)
    assert reason_of(encode(image)) == "too-small"
    assert reason_of(encode(image, ".jpg")) == "too-small"


def test_too_small_for_a_format_without_header_parsing():
    try:
        data = encode(noise(4, 4), ".tiff")
    except (AssertionError, cv2.error):
        pytest.skip("this OpenCV cannot write TIFF")
    assert reason_of(data) == "too-small"


def test_smallest_accepted_side():
    assert decode(encode(noise(8, 8))).shape == (8, 8, 3)
    assert reason_of(encode(noise(8, 8)), min_image_side=9) == "too-small"


# image_size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp"])
def test_image_size(ext):
    data = encode(noise(37, 53), ext)
    assert image_size(data) == (53, 37)


def test_image_size_of_lossless_webp():
    data = encode(noise(37, 53), ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert image_size(data) == (53, 37)


def test_image_size_of_a_png_cut_after_its_header():
    data = encode(noise(37, 53))
    assert image_size(data[:40]) == (53, 37)


@pytest.mark.parametrize("data", [b"", b"hello", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"])
def test_image_size_unknown(data):
    assert image_size(data) is None


def test_gif_header():
    gif = b"GIF89a" + struct.pack("<HH", 321, 123) + b"\x00" * 20
    assert image_size(gif) == (321, 123)


def test_real_photos(shared_dir):
    folder = shared_dir / "data" / "feedme-food" / "images"
    for path in sorted(folder.glob("*.jpg"))[:20]:
        data = path.read_bytes()
        width, height = image_size(data)
        rgb = decode(data, min_side=224)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert min(rgb.shape[:2]) >= min(224, width, height)


def test_progressive_jpeg():
    data = encode(noise(120, 160), ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert decode(data).shape == (120, 160, 3)
    assert decode(data, min_side=60).shape == (60, 80, 3)
    assert reason_of(data[: len(data) * 2 // 3]) == "truncated"
