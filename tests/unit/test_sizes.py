"""cramfs.sizes: parse_size / format_size."""

import pytest

from cramfs.sizes import format_size, format_size_approx, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("4M", 4 << 20),
        ("512M", 512 << 20),
        ("4G", 4 << 30),
        ("2T", 2 << 40),
        (" 8G ", 8 << 30),
        ("1 G", 1 << 30),
        ("1GiB", 1 << 30),
        ("1GB", 1 << 30),
        ("16KiB", 16 << 10),
        (0, 0),
        (12345, 12345),
    ],
)
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "G", "-1", "-1G", "1.5G", "1X", "1GG", "4 M B", "abc", "0x10", "1e3", "1P",
     -1, True, False],
)
def test_parse_size_bad(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_message_quotes_the_text():
    with pytest.raises(ValueError, match="'12Q'"):
        parse_size("12Q")


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (1, "1"), (1000, "1000"), (1024, "1K"), (1536, "1536"), (4 << 20, "4M"),
     (1 << 30, "1G"), (3 << 40, "3T"), ((1 << 30) + 4096, "1048580K")],
)
def test_format_size(value, text):
    assert format_size(value) == text


@pytest.mark.parametrize("value", [0, 1, 4096, 1 << 20, 5 << 30, 7 << 40, 123 << 10])
def test_format_then_parse_roundtrip(value):
    assert parse_size(format_size(value)) == value


def test_format_size_approx():
    assert format_size_approx(512) == "512B"
    assert format_size_approx(1536) == "1.5K"
    assert format_size_approx(3 << 30) == "3.0G"
