"""Hashtags: one normal form for every tag, and the hashtags of a caption.

normalize("#Café!") == "café": Unicode NFKC (so full-width and composed forms compare equal),
case-folded ("Straße" -> "strasse"), surrounding whitespace and trailing punctuation dropped,
inner whitespace collapsed to one space (free-form tags such as "mexican food" keep theirs).

parse_hashtags(caption) finds `#tag` in any script (#café, #東京, #2020, #привет, #طعام, #नमस्ते).
A tag is made of letters, marks, digits and underscores (Instagram's rule; "#don't" gives "don"),
starts at a '#' that does not follow a tag character or '&' (so "a#b" and "&#39;" are not tags),
and ends at the first other character (emoji, punctuation, space). @mentions and URLs are removed
first, so "https://x.org/page#section" gives nothing. Tags are normalised and deduplicated in
order of appearance.
"""

from __future__ import annotations

import re
import unicodedata

# Removed before scanning: URLs (with or without scheme: "example.com/a#b") and @mentions.
_URL = re.compile(r"(?:[a-z][a-z0-9+.-]*://|www\.)\S+|\S+\.[a-z]{2,}/\S*", re.IGNORECASE)
_MENTION = re.compile(r"@[\w.]+")
_ZERO_WIDTH_JOINERS = {"\u200c", "\u200d"}  # needed inside Persian and Indic words


def _is_tag_char(char: str) -> bool:
    if char in _ZERO_WIDTH_JOINERS:
        return True
    category = unicodedata.category(char)
    # Letters, marks (Devanagari vowel signs, Arabic harakat), digits, and the underscore (Pc).
    # Variation selectors are marks too, but belong to the emoji before them, not to the tag.
    return char == "_" or (category[0] in "LMN" and not _is_variation_selector(char))


def _is_variation_selector(char: str) -> bool:
    return "\ufe00" <= char <= "\ufe0f" or "\U000e0100" <= char <= "\U000e01ef"


def _is_trailing_junk(char: str) -> bool:
    """Punctuation (but not '_'), whitespace, format characters and variation selectors."""
    if char == "_":
        return False
    category = unicodedata.category(char)
    return category[0] in "PZ" or category == "Cf" or char.isspace() or _is_variation_selector(char)


def normalize(tag: str) -> str:
    """The normal form of one tag: '#Tokyo!' -> 'tokyo', ' Mexican  Food ' -> 'mexican food'.

    Returns '' when nothing is left (callers drop empty tags).
    """
    if not isinstance(tag, str):
        raise TypeError(f"a tag must be a str, got {type(tag).__name__}: {tag!r}")
    text = unicodedata.normalize("NFKC", tag).strip().lstrip("#").strip()
    # Casefolding can produce unnormalised sequences, so normalise again after it.
    text = unicodedata.normalize("NFKC", text.casefold())
    text = " ".join(text.split())
    end = len(text)
    while end and _is_trailing_junk(text[end - 1]):
        end -= 1
    return text[:end]


def parse_hashtags(caption: str) -> list[str]:
    """The normalised hashtags of `caption`, deduplicated, in order of appearance."""
    if not caption:
        return []
    text = unicodedata.normalize("NFKC", caption)  # also turns the full-width '＃' into '#'
    text = _MENTION.sub(" ", _URL.sub(" ", text))
    tags: list[str] = []
    seen: set[str] = set()
    i, n = 0, len(text)
    while i < n:
        if text[i] != "#" or (i and (_is_tag_char(text[i - 1]) or text[i - 1] in "&#")):
            i += 1
            continue
        start = i + 1
        while start < n and text[start] == "#":  # "##tag" is "#tag"
            start += 1
        end = start
        while end < n and _is_tag_char(text[end]):
            end += 1
        tag = normalize(text[start:end])
        if tag and tag not in seen:
            seen.add(tag)
            tags.append(tag)
        i = max(end, i + 1)
    return tags
