"""Claims about human units: durations and sizes parse strictly and print briefly."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from daemon.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize("text, seconds", [
    ("10m", 600), ("1h30m", 5400), ("90s", 90), ("250ms", 0.25), ("2d", 172800), ("1.5h", 5400),
    ("45", 45), (" 10 m ", 600), ("1H", 3600), (90, 90), (0.5, 0.5),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10 minutes", "m", "10x", "-5", "-5m", "0", 0, -1, "1h-5m", True, None, [10],
                                 float("nan"), float("inf"), "10m5"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text, size", [
    ("5GB", 5_000_000_000), ("350MiB", 350 * 2**20), ("1k", 1000), ("2KiB", 2048), ("0", 0), (123, 123),
    ("1.5 GB", 1_500_000_000), ("10b", 10), ("1TB", 10**12), ("1gi", 2**30),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "lots", "5 GBs", "-1", -1, "5XB", True, None, float("nan"), float("inf")])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3600, "1h00m"),
                                           (90061, "1d01h"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("n, text", [(0, "0B"), (999, "999B"), (1000, "1.0KB"), (5e9, "5.0GB"), (3e15, "3000.0TB")])
def test_format_size(n, text):
    assert format_size(n) == text


@given(st.integers(1, 10**7))
def test_a_formatted_duration_parses_back_to_within_its_last_unit(n):
    # status shows "1h05m", "2d03h": the last unit shown bounds the rounding
    precision = 0 if n < 3600 else 60 if n < 86400 else 3600
    assert abs(parse_duration(format_duration(n)) - n) < max(precision, 0.5)
