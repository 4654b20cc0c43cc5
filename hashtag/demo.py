"""Synthetic posts written as an instaloader folder, so the demo runs offline on the real ingest path.

    summary = run(DemoConfig(out="work/demo-posts", posts=600, seed=0))

Each post is a procedural photo of one scene (beach, sunset, forest, food, city, snow, flowers,
mountains) drawn with OpenCV and numpy, plus a caption whose hashtags follow the scene. The folder
looks like what the Instagram downloader writes:

    2024-01-01_12-00-00_UTC.jpg       the photo
    2024-01-01_12-00-00_UTC.txt       the caption (free text, hashtags, @mentions, a URL)
    2024-01-02_03-41-00_UTC_1.jpg     a multi-image post (instaloader's "sidecar"): _1, _2, ...
    2024-01-02_03-41-00_UTC.json.xz   metadata of some posts: lzma-compressed JSON
    2024-01-04_09-10-00_UTC.mp4       a video post (a few junk bytes), which readers skip
    demo-summary.json                 what was written: counts, the scene of every post, files

A few posts are deliberately bad (a zero-byte .jpg, a truncated .jpg, a text file named .jpg) and
one post reposts the exact image bytes of an earlier one, so skips and dedupe are exercised.

Everything is drawn from numpy Generators seeded by (seed, post index): the same config writes
the same bytes, and posts can be rendered in any order (here on a thread pool).
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import cv2
import numpy as np

from hashtag import storage

log = logging.getLogger(__name__)

SUMMARY_NAME = "demo-summary.json"
START = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
MIN_POSTS = 10  # room for the videos, multi-image posts, repost and the three broken files


@dataclass(frozen=True)
class DemoConfig:
    out: str = field(
        metadata={
            "help": "folder to write the instaloader-style posts to: a path or s3://bucket/prefix"
        }
    )
    posts: int = field(
        default=600,
        metadata={
            "help": "number of posts (photos, multi-image posts, videos, and three broken files)"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "random seed: the same seed writes the same bytes"}
    )
    image_size: int = field(
        default=256, metadata={"help": "side of the square JPEG photos, in pixels"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError(
                "out must be a folder path or s3://bucket/prefix, e.g. out='work/demo'"
            )
        if not _is_int(self.posts) or self.posts < MIN_POSTS:
            raise ValueError(
                f"posts must be an integer >= {MIN_POSTS} (room for videos, multi-image posts, "
                f"a repost and 3 broken files), got {self.posts!r}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.image_size) or not 64 <= self.image_size <= 4096:
            raise ValueError(
                f"image_size must be an integer in [64, 4096], got {self.image_size!r}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Captions: scene tags, a long-tailed pool of generic tags, mentions, URLs, messy spelling.

SCENE_TAGS = {
    "beach": ["beach", "sea", "summer", "sand", "waves", "ocean", "vacation", "beachlife", "coast"],
    "sunset": ["sunset", "goldenhour", "sky", "sunsetlovers", "dusk", "orange", "skyporn", "sun"],
    "forest": ["forest", "trees", "nature", "hiking", "woods", "green", "naturelovers", "trail"],
    "food": ["food", "foodporn", "yummy", "dinner", "delicious", "homemade", "foodie", "lunch"],
    "city": ["city", "architecture", "urban", "streetphotography", "skyline", "citylife", "travel"],
    "snow": ["snow", "winter", "cold", "snowday", "frozen", "ski", "wintervibes", "december"],
    "flowers": ["flowers", "flower", "spring", "garden", "bloom", "floral", "petals", "meadow"],
    "mountains": ["mountains", "mountain", "hiking", "alps", "landscape", "peak", "adventure"],
}
SCENES = tuple(SCENE_TAGS)

# Occasional non-Latin or accented spellings, so tag normalisation meets real Unicode.
FOREIGN_TAGS = {
    "beach": ["playa", "ビーチ", "plage"],
    "sunset": ["夕日", "coucherdesoleil", "закат"],
    "forest": ["森", "wald", "forêt"],
    "food": ["café", "料理", "délicieux", "comida"],
    "city": ["東京", "ciudad", "москва"],
    "snow": ["雪", "schnee", "зима"],
    "flowers": ["花", "fleurs", "çiçek"],
    "mountains": ["山", "montaña", "berge"],
}

# Neighbouring scenes whose tags sometimes spill over (a sunset at the beach...), so tags co-occur.
RELATED = {
    "beach": "sunset",
    "sunset": "beach",
    "forest": "mountains",
    "food": "city",
    "city": "food",
    "snow": "mountains",
    "flowers": "forest",
    "mountains": "snow",
}

# Most frequent first: sampled with Zipf weights, as on Instagram a few tags are everywhere.
GENERIC_TAGS = [
    "instagood", "photooftheday", "love", "nofilter", "photography", "picoftheday", "instadaily",
    "beautiful", "happy", "follow", "weekend", "travelgram", "photo", "life", "friends", "fun",
    "mood", "vibes", "instamood", "memories", "explore", "style", "art", "smile", "lifestyle",
    "goodtimes", "throwback", "tbt", "sundayfunday", "blessed", "wanderlust", "canon", "iphone",
    "mobilephotography", "relax", "holiday", "moments", "amazing", "inspiration", "today",
]  # fmt: skip
GENERIC_WEIGHTS = 1.0 / np.arange(1, len(GENERIC_TAGS) + 1) ** 1.1
GENERIC_WEIGHTS /= GENERIC_WEIGHTS.sum()

SCENE_TEXT = {
    "beach": ["Perfect day at the beach", "Salt in the air, sand in my hair", "Beach day!",
              "Can't get enough of this water", "Toes in the sand"],
    "sunset": ["What a sunset tonight", "Golden hour never disappoints", "The sky was on fire",
               "Chasing the sun", "End of another beautiful day"],
    "forest": ["Lost in the woods", "Morning walk among the trees", "Into the forest we go",
               "Fresh air and green everywhere", "The quiet of the forest"],
    "food": ["Dinner is served", "Homemade and delicious", "Tried a new recipe today",
             "Lunch with a view", "Best meal of the week"],
    "city": ["City lights and long walks", "Downtown vibes", "Exploring the streets",
             "Concrete jungle", "Rooftop views"],
    "snow": ["First snow of the year!", "Winter wonderland", "Everything is white today",
             "Cold hands, warm heart", "Snow day"],
    "flowers": ["Spring is here", "Stop and smell the flowers", "The garden is blooming",
                "Colours everywhere", "Wildflowers on the way home"],
    "mountains": ["The mountains are calling", "Worth every step of the climb", "Above it all",
                  "Peak views", "Mountain air"],
}  # fmt: skip
FILLERS = ["", "", "Weekend vibes.", "Can't wait to go back!", "Throwback to this one.",
           "Who else loves this?", "Good times with good people.", "☀️", "😍", "❤️"]  # fmt: skip
FRIENDS = [
    "anna_k",
    "marco.rossi",
    "yuki_travels",
    "the_foodie_club",
    "leo.photos",
    "sam_adventures",
]
OWNERS = ["demo_traveller", "demo_foodie", "demo_hiker", "demo_citywalker", "demo_photographer"]


def _spell(rng: np.random.Generator, tag: str) -> str:
    """Mixed-case spellings (#Beach, #BEACH) so readers must normalise."""
    roll = rng.random()
    if roll < 0.12:
        return tag.capitalize()
    if roll < 0.16:
        return tag.upper()
    return tag


def make_caption(rng: np.random.Generator, scene: str) -> str:
    """A caption for a post of `scene`: text, 5-12 hashtags, sometimes a mention and a URL."""
    total = int(rng.integers(5, 13))
    pool = SCENE_TAGS[scene]
    scene_weights = 1.0 / np.arange(1, len(pool) + 1) ** 0.7  # the scene's main tag comes first
    n_scene = int(rng.integers(2, 6))
    tags = list(rng.choice(pool, n_scene, replace=False, p=scene_weights / scene_weights.sum()))
    if rng.random() < 0.15:
        spill = [tag for tag in SCENE_TAGS[RELATED[scene]] if tag not in tags]
        tags.append(str(rng.choice(spill)))
    if rng.random() < 0.08:
        tags.append(str(rng.choice(FOREIGN_TAGS[scene])))
    n_generic = max(0, total - len(tags))
    tags += list(rng.choice(GENERIC_TAGS, n_generic, replace=False, p=GENERIC_WEIGHTS))
    tags = [_spell(rng, str(t)) for t in tags]
    if rng.random() < 0.05:  # the same tag twice in another case: dedupe after normalising
        tags.append(tags[0].upper() if tags[0].islower() else tags[0].lower())
    order = rng.permutation(len(tags))
    hashtags = ["#" + tags[i] for i in order]
    # Now and then punctuation glued to a tag, or two tags without a space between them.
    if rng.random() < 0.1:
        hashtags[0] += str(rng.choice(["!", ",", "."]))
    if len(hashtags) > 3 and rng.random() < 0.05:
        hashtags[1:3] = [hashtags[1] + hashtags[2]]

    text = str(rng.choice(SCENE_TEXT[scene]))
    filler = str(rng.choice(FILLERS))
    if rng.random() < 0.3:
        text += f" with @{rng.choice(FRIENDS)}"
    text = f"{text} {filler}".strip()
    if rng.random() < 0.15:
        text += f"\nMore photos: https://example.com/{scene}/{int(rng.integers(100, 999))}"

    layout = rng.random()
    if layout < 0.5:
        return f"{text} {' '.join(hashtags)}"
    if layout < 0.8:  # the Instagram habit of pushing tags below the fold
        return f"{text}\n.\n.\n.\n{' '.join(hashtags)}"
    cut = len(hashtags) // 2  # tags in the middle of the text
    return f"{' '.join(hashtags[:cut])} {text} {' '.join(hashtags[cut:])}"


# ---------------------------------------------------------------------------------------------
# Photos: each scene is a layout of colour regions, shapes and textures, with random variation.


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float = 18.0):
    return tuple(float(c) for c in np.clip(np.asarray(rgb) + rng.normal(0, amount, 3), 0, 255))


def _gradient(size: int, top, bottom, start: float = 0.0, stop: float = 1.0) -> np.ndarray:
    """A vertical colour gradient (size, size, 3) float32 from `top` at row start*size to `bottom`."""
    rows = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = np.clip((rows - start) / max(stop - start, 1e-6), 0.0, 1.0)[:, None, None]
    top, bottom = np.asarray(top, np.float32), np.asarray(bottom, np.float32)
    return np.broadcast_to(top + (bottom - top) * t, (size, size, 3)).copy()


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise (size, size, 1) in about [-1, 1]: blotches, clouds, canopy texture."""
    small = rng.standard_normal(cells, dtype=np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)[:, :, None]


def _rows_below(size: int, boundary: np.ndarray) -> np.ndarray:
    """Mask (size, size) of pixels below a per-column boundary row (a horizon, a shoreline)."""
    return np.arange(size)[:, None] >= boundary[None, :]


def _wavy(rng: np.random.Generator, size: int, y: float, amplitude: float) -> np.ndarray:
    x = np.arange(size)
    frequency = rng.uniform(1.0, 4.0) * 2 * np.pi / size
    return y + amplitude * np.sin(x * frequency + rng.uniform(0, 2 * np.pi))


def _beach(rng: np.random.Generator, s: int) -> np.ndarray:
    horizon = rng.uniform(0.28, 0.48) * s
    image = _gradient(
        s, _jitter(rng, (70, 135, 215)), _jitter(rng, (175, 215, 240)), 0, horizon / s
    )
    sea = _gradient(s, _jitter(rng, (25, 95, 165)), _jitter(rng, (45, 160, 185)), horizon / s, 0.8)
    shore = _wavy(rng, s, horizon + rng.uniform(0.15, 0.3) * s, rng.uniform(0.01, 0.04) * s)
    sand_colour = np.asarray(_jitter(rng, (228, 204, 155)), np.float32)
    sand = sand_colour + 14 * _smooth_noise(rng, s, (24, 24))
    image[_rows_below(s, np.full(s, horizon))] = sea[_rows_below(s, np.full(s, horizon))]
    below = _rows_below(s, shore)
    image[below] = sand[below]
    canvas = image.clip(0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(8, 25))):  # white wave crests on the water
        y = int(rng.uniform(horizon + 3, shore.min()))
        x = int(rng.uniform(0, s))
        cv2.line(canvas, (x, y), (x + int(rng.uniform(0.03, 0.12) * s), y), (235, 245, 250), 1)
    foam = np.stack([np.arange(s), shore], axis=1).astype(np.int32)
    cv2.polylines(canvas, [foam], False, (245, 248, 250), max(2, s // 80), cv2.LINE_AA)
    if rng.random() < 0.4:  # a beach umbrella
        cx, cy, r = int(rng.uniform(0.2, 0.8) * s), int(rng.uniform(0.75, 0.85) * s), s // 9
        cv2.line(canvas, (cx, cy - r), (cx, cy + r), (90, 70, 50), max(1, s // 100))
        colour = _jitter(rng, (220, 60, 50), 40)
        cv2.ellipse(canvas, (cx, cy - r), (r, r // 2), 0, 180, 360, colour, -1, cv2.LINE_AA)
    return canvas


def _sunset(rng: np.random.Generator, s: int) -> np.ndarray:
    horizon = rng.uniform(0.55, 0.75) * s
    split = horizon / s
    image = _gradient(s, _jitter(rng, (45, 30, 95)), _jitter(rng, (205, 80, 90)), 0, split * 0.6)
    low = _gradient(
        s, _jitter(rng, (205, 80, 90)), _jitter(rng, (255, 160, 55)), split * 0.6, split
    )
    image[int(split * 0.6 * s) :] = low[int(split * 0.6 * s) :]
    cx, radius = rng.uniform(0.2, 0.8) * s, rng.uniform(0.06, 0.13) * s
    cy = horizon - radius * rng.uniform(-0.4, 1.2)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    glow = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (2.5 * radius) ** 2))[:, :, None]
    image += glow * np.asarray([60, 40, 0], np.float32)
    canvas = image.clip(0, 255).astype(np.uint8)
    sun = _jitter(rng, (255, 225, 130), 10)
    cv2.circle(canvas, (int(cx), int(cy)), int(radius), sun, -1, cv2.LINE_AA)
    dark = np.asarray(_jitter(rng, (35, 22, 40), 10), np.float32)
    if rng.random() < 0.5:  # water with the sun's reflection
        canvas[int(horizon) :] = dark.astype(np.uint8)
        for y in range(int(horizon) + 2, s, max(2, s // 60)):
            half = radius * rng.uniform(0.3, 1.2) * (1 + (y - horizon) / s)
            colour = _jitter(rng, (240, 140, 60), 15)
            cv2.line(canvas, (int(cx - half), y), (int(cx + half), y), colour, 1)
    else:  # a black silhouette of hills
        hills = _wavy(rng, s, horizon, rng.uniform(0.02, 0.06) * s)
        canvas[_rows_below(s, hills)] = dark.astype(np.uint8)
    for _ in range(int(rng.integers(0, 5))):  # birds
        x, y, w = int(rng.uniform(0.1, 0.9) * s), int(rng.uniform(0.1, 0.4) * s), s // 40 + 2
        cv2.polylines(canvas, [np.int32([[x - w, y - w // 2], [x, y], [x + w, y - w // 2]])],
                      False, (30, 20, 30), 1, cv2.LINE_AA)  # fmt: skip
    return canvas


def _forest(rng: np.random.Generator, s: int) -> np.ndarray:
    image = _gradient(s, _jitter(rng, (25, 60, 30)), _jitter(rng, (55, 85, 40)))
    image += 20 * _smooth_noise(rng, s, (12, 12))
    canvas = image.clip(0, 255).astype(np.uint8)
    ground = int(rng.uniform(0.8, 0.92) * s)
    canvas[ground:] = np.asarray(_jitter(rng, (85, 70, 40)), np.uint8)
    for _ in range(int(rng.integers(6, 15))):  # trunks with vertical bark lines
        x, w = int(rng.uniform(0, s)), int(rng.uniform(0.02, 0.06) * s) + 2
        top, bottom = int(rng.uniform(0.1, 0.4) * s), int(rng.uniform(ground - 4, s))
        bark = _jitter(rng, (90, 60, 35), 15)
        cv2.rectangle(canvas, (x, top), (x + w, bottom), bark, -1)
        for _ in range(max(1, w // 4)):
            bx = x + int(rng.uniform(0, w))
            cv2.line(canvas, (bx, top), (bx, bottom), tuple(c * 0.6 for c in bark), 1)
    for _ in range(int(rng.integers(50, 110))):  # canopy: clumps of leaves
        x, y = int(rng.uniform(0, s)), int(rng.uniform(-0.05, 0.42) * s)
        leaf = _jitter(rng, (45, 120, 40), 25)
        cv2.circle(canvas, (x, y), int(rng.uniform(0.03, 0.09) * s), leaf, -1, cv2.LINE_AA)
    for _ in range(int(rng.integers(10, 30))):  # ferns on the ground
        x, y = int(rng.uniform(0, s)), int(rng.uniform(ground - 5, s))
        cv2.circle(canvas, (x, y), int(rng.uniform(0.01, 0.03) * s) + 1,
                   _jitter(rng, (60, 130, 45), 20), -1)  # fmt: skip
    return canvas


FOOD_COLOURS = [(200, 40, 35), (80, 160, 50), (240, 200, 60), (120, 70, 40), (240, 130, 40),
                (235, 220, 170), (150, 30, 80)]  # fmt: skip


def _food(rng: np.random.Generator, s: int) -> np.ndarray:
    if rng.random() < 0.7:  # a wooden table: brown with wavy grain
        wood = np.asarray(_jitter(rng, (150, 100, 60), 6), np.float32) * rng.uniform(0.75, 1.15)
        rows = np.arange(s, dtype=np.float32)[:, None, None] / s
        grain = np.sin(rows * rng.uniform(40, 90) + 4 * _smooth_noise(rng, s, (4, 8)))
        image = wood * (1 + 0.12 * grain)
    else:  # a checked tablecloth
        cloth = np.asarray(_jitter(rng, (190, 40, 45), 30), np.float32)
        square = int(rng.integers(s // 16, s // 6))
        yy, xx = np.mgrid[0:s, 0:s]
        checks = (((yy // square) + (xx // square)) % 2).astype(np.float32)[:, :, None]
        image = checks * cloth + (1 - checks) * np.float32(235)
    canvas = image.clip(0, 255).astype(np.uint8)
    cx = int(s / 2 + rng.uniform(-0.1, 0.1) * s)
    cy = int(s / 2 + rng.uniform(-0.1, 0.1) * s)
    rx = int(rng.uniform(0.3, 0.42) * s)
    ry = int(rx * rng.uniform(0.82, 1.0))  # seen at a slight angle
    cv2.ellipse(
        canvas, (cx + s // 60, cy + s // 40), (rx, ry), 0, 0, 360, (60, 45, 35), -1, cv2.LINE_AA
    )
    cv2.ellipse(
        canvas, (cx, cy), (rx, ry), 0, 0, 360, _jitter(rng, (242, 242, 236), 6), -1, cv2.LINE_AA
    )
    cv2.ellipse(
        canvas,
        (cx, cy),
        (int(rx * 0.78), int(ry * 0.78)),
        0,
        0,
        360,
        (215, 215, 210),
        1,
        cv2.LINE_AA,
    )
    for _ in range(int(rng.integers(3, 8))):  # heaps of food: clusters of blobs
        colour = FOOD_COLOURS[int(rng.integers(len(FOOD_COLOURS)))]
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
        fx, fy = cx + dist * rx * np.cos(angle), cy + dist * ry * np.sin(angle)
        for _ in range(int(rng.integers(3, 10))):
            px, py = fx + rng.normal(0, 0.05 * s), fy + rng.normal(0, 0.05 * s)
            axes = (int(rng.uniform(0.02, 0.07) * s) + 1, int(rng.uniform(0.02, 0.07) * s) + 1)
            cv2.ellipse(canvas, (int(px), int(py)), axes, rng.uniform(0, 180), 0, 360,
                        _jitter(rng, colour, 15), -1, cv2.LINE_AA)  # fmt: skip
    if rng.random() < 0.5:  # a fork beside the plate
        x = int(min(cx + rx + s * 0.06, s - 5))
        cv2.rectangle(
            canvas, (x, int(0.2 * s)), (x + max(2, s // 50), int(0.8 * s)), (190, 190, 195), -1
        )
    return canvas


def _city(rng: np.random.Generator, s: int) -> np.ndarray:
    if rng.random() < 0.6:
        image = _gradient(s, _jitter(rng, (90, 145, 210)), _jitter(rng, (185, 210, 235)))
    else:  # overcast
        image = _gradient(s, _jitter(rng, (150, 155, 165)), _jitter(rng, (200, 200, 205)))
    canvas = image.clip(0, 255).astype(np.uint8)
    street = int(rng.uniform(0.85, 0.93) * s)
    for layer, shade in ((0, 0.75), (1, 1.0)):  # far buildings paler, near ones darker
        x = int(rng.uniform(-0.1, 0) * s)
        while x < s:
            w = int(rng.uniform(0.1, 0.25) * s)
            top = int(rng.uniform(0.1, 0.5) * s) + layer * int(0.12 * s)
            wall = np.asarray(_jitter(rng, (125, 120, 115), 25)) * (1.25 if layer == 0 else 0.9)
            wall = tuple(float(c) for c in np.clip(wall * shade + (1 - shade) * 200, 0, 255))
            cv2.rectangle(canvas, (x, top), (x + w, street), wall, -1)
            window = _jitter(rng, (200, 220, 235) if rng.random() < 0.6 else (60, 65, 75), 15)
            step = max(4, s // 28)
            for wy in range(top + step // 2, street - step, step):
                for wx in range(x + step // 2, x + w - step // 2, step):
                    cv2.rectangle(canvas, (wx, wy), (wx + step // 2, wy + step // 2), window, -1)
            x += w + int(rng.uniform(0, 0.03) * s)
    canvas[street:] = np.asarray(_jitter(rng, (60, 60, 65), 8), np.uint8)
    for x in range(int(rng.uniform(0, s // 8)), s, s // 6):  # lane markings
        y = street + (s - street) // 2
        cv2.line(canvas, (x, y), (x + s // 12, y), (230, 230, 220), max(1, s // 120))
    return canvas


def _snow(rng: np.random.Generator, s: int) -> np.ndarray:
    image = _gradient(s, _jitter(rng, (150, 165, 185), 12), _jitter(rng, (205, 215, 228), 8))
    image += 8 * _smooth_noise(rng, s, (6, 6))
    ground_line = _wavy(rng, s, rng.uniform(0.35, 0.6) * s, rng.uniform(0.02, 0.08) * s)
    snow = np.asarray(_jitter(rng, (238, 243, 250), 5), np.float32)
    ground = snow - 14 * np.abs(_smooth_noise(rng, s, (10, 10))) * np.float32([1, 0.7, 0.2])
    below = _rows_below(s, ground_line)
    image[below] = ground[below]
    canvas = image.clip(0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 6))):  # snowy pines
        x = int(rng.uniform(0, s))
        base = int(np.interp(x, np.arange(s), ground_line)) + int(rng.uniform(0, 0.1) * s)
        h, w = int(rng.uniform(0.15, 0.35) * s), int(rng.uniform(0.05, 0.1) * s)
        green = _jitter(rng, (30, 60, 45), 10)
        pine = np.int32([[x - w, base], [x + w, base], [x, base - h]])
        cv2.fillPoly(canvas, [pine], green, cv2.LINE_AA)
        cv2.fillPoly(canvas, [np.int32([[x - w // 3, base - 2 * h // 3], [x + w // 3, base - 2 * h // 3], [x, base - h]])], (240, 244, 250), cv2.LINE_AA)  # fmt: skip
    flakes = rng.uniform(0, s, (int(rng.integers(40, 300)), 2)).astype(np.int32)
    for x, y in flakes:  # falling snow
        cv2.circle(canvas, (int(x), int(y)), int(rng.integers(1, 3)), (250, 250, 252), -1)
    return canvas


PETALS = [(220, 40, 50), (240, 120, 170), (250, 210, 40), (150, 70, 190), (250, 250, 245),
          (250, 140, 30)]  # fmt: skip


def _flowers(rng: np.random.Generator, s: int) -> np.ndarray:
    sky = rng.uniform(0, 0.3) * s if rng.random() < 0.5 else 0.0
    grass = np.asarray(_jitter(rng, (70, 145, 55), 15), np.float32)
    blades = cv2.resize(rng.standard_normal((s // 8, s), dtype=np.float32), (s, s))[:, :, None]
    image = grass * (1 + 0.15 * blades + 0.1 * _smooth_noise(rng, s, (8, 8)))
    if sky:
        top = _gradient(s, _jitter(rng, (110, 160, 225)), _jitter(rng, (190, 215, 240)), 0, sky / s)
        image[: int(sky)] = top[: int(sky)]
    canvas = image.clip(0, 255).astype(np.uint8)
    dominant = PETALS[int(rng.integers(len(PETALS)))]
    for _ in range(int(rng.integers(40, 150))):
        y = rng.uniform(sky, s)
        r = int((0.008 + 0.03 * (y - sky) / (s - sky + 1)) * s) + 1  # bigger when nearer
        colour = dominant if rng.random() < 0.6 else PETALS[int(rng.integers(len(PETALS)))]
        centre = (int(rng.uniform(0, s)), int(y))
        cv2.circle(canvas, centre, r, _jitter(rng, colour, 15), -1, cv2.LINE_AA)
        cv2.circle(canvas, centre, max(1, r // 3), (230, 180, 40), -1)
    return canvas


def _mountains(rng: np.random.Generator, s: int) -> np.ndarray:
    image = _gradient(s, _jitter(rng, (60, 120, 210)), _jitter(rng, (180, 210, 235)), 0, 0.6)
    layers = int(rng.integers(2, 4))
    x = np.arange(s)
    for layer in range(layers):  # far ridges hazy blue, near ones darker green-brown
        t = layer / max(layers - 1, 1)
        base = (0.3 + 0.35 * t + rng.uniform(-0.05, 0.05)) * s
        steps = rng.normal(0, 0.025 * s, s // 8 + 2).cumsum()
        ridge = base + np.interp(x, np.linspace(0, s, len(steps)), steps - steps.mean())
        ridge -= (
            rng.uniform(0.05, 0.15) * s * np.exp(-((x - rng.uniform(0, s)) ** 2) / (0.04 * s * s))
        )
        far, near = np.float32([120, 135, 170]), np.float32([70, 95, 55])
        colour = np.asarray(_jitter(rng, tuple(far + (near - far) * t), 12), np.float32)
        rows = np.arange(s, dtype=np.float32)[:, None, None]
        shade = colour * (1 - 0.25 * (rows / s)) + 10 * _smooth_noise(rng, s, (16, 16))
        below = _rows_below(s, ridge)
        image[below] = shade[below]
        if layer == 0 and rng.random() < 0.6:  # snow caps on the highest ridge
            cap = below & (np.arange(s)[:, None] < ridge.min() + 0.08 * s)
            image[cap] = np.float32([235, 238, 245])
    canvas = image.clip(0, 255).astype(np.uint8)
    if rng.random() < 0.3:  # a lake in front
        lake = int(rng.uniform(0.82, 0.92) * s)
        canvas[lake:] = np.asarray(_jitter(rng, (60, 110, 160), 12), np.uint8)
    return canvas


PAINTERS = {
    "beach": _beach,
    "sunset": _sunset,
    "forest": _forest,
    "food": _food,
    "city": _city,
    "snow": _snow,
    "flowers": _flowers,
    "mountains": _mountains,
}


def render_scene(rng: np.random.Generator, scene: str, size: int) -> np.ndarray:
    """One photo of `scene`: RGB uint8 (size, size, 3), with camera-like variation on top."""
    rgb = PAINTERS[scene](rng, size)
    if rng.random() < 0.5:  # zoomed in: a crop of 60-95% of the side, scaled back up
        side = int(size * rng.uniform(0.6, 0.95))
        y, x = rng.integers(0, size - side + 1, 2)
        rgb = cv2.resize(
            rgb[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_LINEAR
        )
    # Exposure and white balance in one lookup table per channel.
    gains = rng.uniform(0.75, 1.2) * rng.uniform(0.85, 1.15, 3)
    levels = np.arange(256)[:, None] * gains + rng.uniform(-15, 15)
    rgb = cv2.LUT(rgb, levels.clip(0, 255).astype(np.uint8)[:, None, :])
    # Sensor noise, uniform rather than Gaussian: integers are four times cheaper to draw.
    spread = int(rng.integers(4, 16))
    noise = rng.integers(-spread, spread + 1, rgb.shape, dtype=np.int16)
    rgb = (rgb.astype(np.int16) + noise).clip(0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    if rng.random() < 0.2:  # slightly out of focus
        rgb = cv2.GaussianBlur(np.ascontiguousarray(rgb), (0, 0), rng.uniform(0.6, 1.5))
    return np.ascontiguousarray(rgb)


def encode_jpeg(rng: np.random.Generator, rgb: np.ndarray) -> bytes:
    quality = int(rng.integers(75, 96))
    ok, buffer = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG; is opencv-python-headless installed?")
    return buffer.tobytes()


# ---------------------------------------------------------------------------------------------
# The plan: which post is what, decided up front so rendering can run in any order.


@dataclass(frozen=True)
class PlannedPost:
    index: int
    stem: str  # instaloader's file stem: the UTC date, "2024-01-01_12-00-00_UTC"
    scene: str
    kind: str  # photo | sidecar | video | repost | empty | truncated | not-an-image
    images: int = 1  # how many photos a sidecar has
    metadata: bool = False
    copy_of: int | None = None  # for a repost: the index of the post whose image it copies


BAD_KINDS = ("empty", "truncated", "not-an-image")


def plan_posts(config: DemoConfig) -> list[PlannedPost]:
    rng = np.random.default_rng([config.seed, 0])
    n = config.posts
    scenes = rng.choice(SCENES, n)
    gaps = rng.integers(2 * 3600, 30 * 3600, n)  # seconds between posts; the first is at START
    seconds = np.concatenate([[0], np.cumsum(gaps[:-1])])
    stems = [(START + timedelta(seconds=int(t))).strftime("%Y-%m-%d_%H-%M-%S_UTC") for t in seconds]

    kinds = np.full(n, "photo", dtype=object)
    n_videos, n_sidecars = max(1, n // 100), max(1, n // 25)
    special = rng.permutation(np.arange(1, n))  # post 0 stays a plain photo: the repost's source
    kinds[special[: len(BAD_KINDS)]] = BAD_KINDS
    kinds[special[3]] = "repost"
    kinds[special[4 : 4 + n_videos]] = "video"
    kinds[special[4 + n_videos : 4 + n_videos + n_sidecars]] = "sidecar"
    with_metadata = rng.random(n) < 0.1

    repost = int(special[3])
    sources = [i for i in range(repost) if kinds[i] == "photo"]
    source = int(sources[int(rng.integers(len(sources)))])
    planned = []
    for i in range(n):
        kind = str(kinds[i])
        scene = str(scenes[source] if kind == "repost" else scenes[i])
        planned.append(
            PlannedPost(
                index=i,
                stem=stems[i],
                scene=scene,
                kind=kind,
                images=int(rng.integers(2, 5)) if kind == "sidecar" else 1,
                metadata=bool(with_metadata[i]),
                copy_of=source if kind == "repost" else None,
            )
        )
    return planned


def _shortcode(rng: np.random.Generator) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(alphabet[i] for i in rng.integers(0, 64, 11))


def _metadata(rng: np.random.Generator, post: PlannedPost, caption: str) -> bytes:
    """The shape of instaloader's post JSON (a subset), lzma-compressed as it writes it."""
    typename = {"sidecar": "GraphSidecar", "video": "GraphVideo"}.get(post.kind, "GraphImage")
    taken = datetime.strptime(post.stem, "%Y-%m-%d_%H-%M-%S_UTC").replace(tzinfo=timezone.utc)
    owner = int(rng.integers(len(OWNERS)))
    node = {
        "__typename": typename,
        "id": str(3_000_000_000_000_000_000 + post.index),
        "shortcode": _shortcode(rng),
        "taken_at_timestamp": int(taken.timestamp()),
        "is_video": post.kind == "video",
        "owner": {"id": str(1_000_000 + owner), "username": OWNERS[owner]},
        "edge_media_preview_like": {"count": int(rng.zipf(1.8))},
        "edge_media_to_comment": {"count": int(rng.integers(0, 40))},
        "edge_media_to_caption": {"edges": [{"node": {"text": caption}}]},
    }
    document = {"node": node, "instaloader": {"version": "4.14", "node_type": "Post"}}
    return lzma.compress(json.dumps(document, ensure_ascii=False).encode("utf-8"))


def _photo(config: DemoConfig, index: int, scene: str, number: int = 0) -> bytes:
    rng = np.random.default_rng([config.seed, 1, index, number])
    return encode_jpeg(rng, render_scene(rng, scene, config.image_size))


def render_post(config: DemoConfig, post: PlannedPost) -> dict[str, bytes]:
    """The files of one post, by name: photos (or a video or a broken file), caption, metadata."""
    rng = np.random.default_rng([config.seed, 2, post.index])
    caption = make_caption(rng, post.scene)
    files = {f"{post.stem}.txt": caption.encode("utf-8")}
    if post.kind == "photo":
        files[f"{post.stem}.jpg"] = _photo(config, post.index, post.scene)
    elif post.kind == "repost":
        files[f"{post.stem}.jpg"] = _photo(config, post.copy_of, post.scene)
    elif post.kind == "sidecar":  # instaloader numbers every photo of a sidecar from 1
        for number in range(1, post.images + 1):
            files[f"{post.stem}_{number}.jpg"] = _photo(config, post.index, post.scene, number)
    elif post.kind == "video":  # an MP4 box header and junk: readers only need to skip it
        files[f"{post.stem}.mp4"] = b"\x00\x00\x00\x18ftypmp42" + rng.bytes(64)
    elif post.kind == "empty":
        files[f"{post.stem}.jpg"] = b""
    elif post.kind == "truncated":  # an interrupted download: OpenCV refuses it
        data = _photo(config, post.index, post.scene)
        files[f"{post.stem}.jpg"] = data[: len(data) // 2]
    elif post.kind == "not-an-image":  # an error page saved under the image's name
        files[f"{post.stem}.jpg"] = b"<html><body><h1>429 Too Many Requests</h1></body></html>\n"
    if post.metadata:
        files[f"{post.stem}.json.xz"] = _metadata(rng, post, caption)
    return files


# ---------------------------------------------------------------------------------------------
# The stage: plan, render and write on a thread pool (OpenCV and numpy release the GIL).


def _check_out(out: str) -> dict[str, Any] | None:
    """Refuse to mix synthetic posts into a folder that is not a previous demo output."""
    entries = storage.listdir(out)
    if not entries:
        return None
    if SUMMARY_NAME not in entries:
        raise ValueError(
            f"{out} is not empty and holds no {SUMMARY_NAME}, so it is not a demo folder; "
            "pass a new or empty folder as out so real posts are not mixed with synthetic ones"
        )
    try:
        return storage.read_json(storage.join(out, SUMMARY_NAME))
    except ValueError as error:
        raise ValueError(
            f"{storage.join(out, SUMMARY_NAME)} is unreadable ({error}); delete the folder {out} "
            "and run the demo again"
        ) from error


def run(config: DemoConfig) -> dict[str, Any]:
    """Write `config.posts` synthetic posts to `config.out`; return a summary (also in the folder)."""
    started = time.perf_counter()
    previous = _check_out(config.out)
    planned = plan_posts(config)

    def write(post: PlannedPost) -> list[str]:
        files = render_post(config, post)
        for name, data in files.items():
            storage.write_bytes(storage.join(config.out, name), data)
        return list(files)

    workers = (
        min(16, 2 * (os.cpu_count() or 1)) if storage.is_remote(config.out) else os.cpu_count() or 1
    )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        names = [name for files in pool.map(write, planned) for name in files]

    if previous:  # a rerun with other settings: drop the old posts this run did not rewrite
        for stale in sorted(set(previous.get("files", [])) - set(names)):
            storage.remove(storage.join(config.out, stale))

    readable = [p for p in planned if p.kind in ("photo", "sidecar", "repost")]
    source = {p.index: p.stem for p in planned}
    summary = {
        "out": config.out,
        "seed": config.seed,
        "image_size": config.image_size,
        "posts": len(planned),
        "posts_with_images": len(readable),
        "images": sum(p.images for p in readable),
        "scenes": dict(sorted(Counter(p.scene for p in readable).items())),
        "sidecars": sum(p.kind == "sidecar" for p in planned),
        "videos": sum(p.kind == "video" for p in planned),
        "with_metadata": sum(p.metadata for p in planned),
        "reposts": {p.stem: source[p.copy_of] for p in planned if p.kind == "repost"},
        "bad": {p.stem: p.kind for p in planned if p.kind in BAD_KINDS},
        "seconds": round(time.perf_counter() - started, 3),
    }
    # The file leaves out the wall time: a rerun into the same folder writes the same bytes,
    # so the scrape that reads the folder sees the same source (its identity is sizes and names).
    record = {
        **{k: v for k, v in summary.items() if k != "seconds"},
        "scene_of": {p.stem: p.scene for p in planned},
        "files": sorted(names),
    }
    storage.write_json(storage.join(config.out, SUMMARY_NAME), record)
    log.info(
        "wrote %d demo posts (%d with images, %d videos, %d broken) to %s in %.1f s",
        summary["posts"], summary["posts_with_images"], summary["videos"], len(summary["bad"]),
        config.out, summary["seconds"],
    )  # fmt: skip
    return summary
