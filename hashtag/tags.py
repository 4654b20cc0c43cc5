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

Hostile text: zero-width, bidi and control characters are removed from tags (ZWNJ/ZWJ are kept
only between two letters, where Persian and Indic words need them), so look-alike tags cannot be
made with invisible characters. Parsing is linear (no backtracking pattern) and reads at most
MAX_CAPTION_CHARS characters of a caption (Instagram allows 2,200).
"""

from __future__ import annotations

import re
import unicodedata

MAX_CAPTION_CHARS = 20_000
# Removed before scanning, token by token (linear): URLs (with or without scheme:
# "example.com/a#b") and @mentions.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_DOMAIN_END = re.compile(r"\.[a-z]{2,}$", re.IGNORECASE)
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


def _is_invisible(text: str, i: int) -> bool:
    """Control, format (zero-width, bidi), private-use and separator characters; ZWNJ/ZWJ only
    count as invisible when not between two letters or marks."""
    char = text[i]
    if char in _ZERO_WIDTH_JOINERS:
        inside = 0 < i < len(text) - 1
        return not (inside and _is_letter(text[i - 1]) and _is_letter(text[i + 1]))
    return unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp")


def _is_letter(char: str) -> bool:
    return unicodedata.category(char)[0] in "LM"


def _without_urls(text: str) -> str:
    """Each whitespace-separated token minus its URL part (the text before a URL stays)."""
    kept = []
    for token in text.split():
        cut = len(token)
        scheme = token.find("://")
        if scheme > 0:
            start = scheme
            while start > 0 and (
                token[start - 1].isascii()
                and (token[start - 1].isalnum() or token[start - 1] in "+.-")
            ):
                start -= 1
            if _SCHEME.match(token, start):
                cut = start
        www = token.lower().find("www.")
        if 0 <= www < cut:
            cut = www
        slash = token.find("/")
        if 0 < slash and _DOMAIN_END.search(token, 0, slash):
            cut = 0  # "example.com/a#b": the whole token is a link
        kept.append(token[:cut])
    return " ".join(kept)


def normalize(tag: str) -> str:
    """The normal form of one tag: '#Tokyo!' -> 'tokyo', ' Mexican  Food ' -> 'mexican food'.

    Returns '' when nothing is left (callers drop empty tags).
    """
    if not isinstance(tag, str):
        raise TypeError(f"a tag must be a str, got {type(tag).__name__}: {tag!r}")
    text = unicodedata.normalize("NFKC", tag)
    text = "".join(c for i, c in enumerate(text) if not _is_invisible(text, i))
    text = text.strip().lstrip("#").strip()
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
    text = unicodedata.normalize("NFKC", caption[:MAX_CAPTION_CHARS])  # also '＃' -> '#'
    text = _MENTION.sub(" ", _without_urls(text))
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
