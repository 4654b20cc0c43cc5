import pytest

from hashtag.tags import normalize, parse_hashtags


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("food", "food"),
        ("#food", "food"),
        ("##food", "food"),
        ("#Food", "food"),
        ("FOOD", "food"),
        ("  food  ", "food"),
        ("# food", "food"),
        ("food!", "food"),
        ("food!!!", "food"),
        ("food.", "food"),
        ("food,", "food"),
        ("food…", "food"),
        ("food?!", "food"),
        ("food !", "food"),
        ("food_", "food_"),  # the underscore is a tag character
        ("my_food", "my_food"),
        ("Mexican Food", "mexican food"),
        ("  mexican   food ", "mexican food"),
        ("close-up", "close-up"),  # inner punctuation of free-form tags stays
        ("Café", "café"),
        ("Cafe\u0301", "café"),  # decomposed é composes to the same tag
        ("Straße", "strasse"),
        ("ＦＯＯＤ", "food"),  # full-width
        ("＃food", "food"),  # full-width number sign
        ("東京", "東京"),
        ("Привет", "привет"),
        ("طعام", "طعام"),
        ("नमस्ते", "नमस्ते"),
        ("2020", "2020"),
        ("ΣΟΦΙΑ", "σοφια"),
        ("love\ufe0f", "love"),
        ("", ""),
        ("#", ""),
        ("!!!", ""),
        ("   ", ""),
    ],
)
def test_normalize(tag, expected):
    assert normalize(tag) == expected


def test_normalize_is_idempotent():
    for tag in ["#Café!", "ＦＯＯＤ", "Straße", " Mexican  Food ", "東京"]:
        assert normalize(normalize(tag)) == normalize(tag)


def test_normalize_rejects_non_strings():
    with pytest.raises(TypeError, match="must be a str"):
        normalize(42)


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("", []),
        ("no tags here", []),
        ("#food", ["food"]),
        ("Lunch #food #yummy", ["food", "yummy"]),
        ("#Food #FOOD #food", ["food"]),  # deduplicated after case folding
        ("#b #a #b #c", ["b", "a", "c"]),  # order of first appearance
        ("#food, #yummy.", ["food", "yummy"]),
        ("#food! and #yummy?", ["food", "yummy"]),
        ("(#food)", ["food"]),
        ('"#food"', ["food"]),
        ("#food#yummy", ["food"]),  # a '#' right after a tag does not start one
        ("#café au lait", ["café"]),
        ("#Cafe\u0301", ["café"]),
        ("#東京 #東京タワー", ["東京", "東京タワー"]),
        ("#2020 #covid19", ["2020", "covid19"]),
        ("#привет #Москва", ["привет", "москва"]),
        ("#طعام #مطبخ", ["طعام", "مطبخ"]),
        ("#नमस्ते", ["नमस्ते"]),
        ("#ภาษาไทย", ["ภาษาไทย"]),
        ("#한국 #음식", ["한국", "음식"]),
        ("#ΣΟΦΙΑ", ["σοφια"]),
        ("#my_food", ["my_food"]),
        ("#love❤️", ["love"]),
        ("🍕#pizza🍕", ["pizza"]),
        ("#❤️ #🍕", []),
        ("#pizza🇮🇹 #pasta", ["pizza", "pasta"]),
        ("＃ramen", ["ramen"]),  # full-width number sign
        ("ＦＯＯＤ #ＦＯＯＤ", ["food"]),
        ("##food", ["food"]),
        ("# food", []),
        ("#", []),
        ("a#b", []),  # inside a word
        ("&#39;s great", []),  # HTML entity
        ("#don't", ["don"]),
        ("line one\n#food\n#yummy", ["food", "yummy"]),
        ("#food\t#yummy", ["food", "yummy"]),
        ("@foodie #food", ["food"]),
        ("@food #pizza", ["pizza"]),  # a mention is not a tag
        ("thanks @chef.bob#food", ["food"]),  # usernames cannot hold '#': the tag starts there
        ("https://example.com/page#section #food", ["food"]),
        ("http://example.com/#/route", []),
        ("www.example.com/#anchor", []),
        ("see example.com/recipes#pasta", []),
        ("#food https://x.org/#a #yummy", ["food", "yummy"]),
    ],
)
def test_parse_hashtags(caption, expected):
    assert parse_hashtags(caption) == expected


def test_parse_hashtags_returns_normalised_tags():
    caption = "Dinner! #Food #Café #東京 #MexicanFood."
    assert parse_hashtags(caption) == [
        normalize(t) for t in ["Food", "Café", "東京", "MexicanFood"]
    ]
