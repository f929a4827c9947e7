"""One way to print bytes, seconds and ranges, and one range grammar: pure, no cluster."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbparallel import format as fmt
from nbparallel import gpu, partition
from nbparallel.errors import UsageError


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (999, "999 B"), (1000, "1000 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
    (1536, "1.5 KiB"), (12_345, "12.1 KiB"), (99 * 1024, "99.0 KiB"), (100 * 1024, "100 KiB"),
    (1023 * 1024, "1023 KiB"), (2**20, "1.0 MiB"), (10 * 2**20, "10.0 MiB"),
    (16_000_000, "15.3 MiB"), (512 * 2**20, "512 MiB"), (3 * 2**30, "3.0 GiB"),
    (141 * 2**30, "141 GiB"), (2.5 * 2**40, "2.5 TiB"), (3 * 2**60, "3072 PiB"),
    (-2048, "-2.0 KiB"), (0.4, "0 B"), (None, "?"),
])
def test_nbytes(n, text):
    assert fmt.nbytes(n) == text


def test_nbytes_rounds_up_into_the_next_unit_rather_than_print_1024():
    assert fmt.nbytes(1023.6) == "1.0 KiB"
    assert fmt.nbytes(2**20 - 1) == "1.0 MiB"
    assert fmt.nbytes(int(99.96 * 2**20)) == "100 MiB"  # never "100.0 MiB"


@given(st.integers(min_value=0, max_value=2**70))
def test_nbytes_is_short_and_in_one_of_the_binary_units(n):
    number, unit = fmt.nbytes(n).split(" ")
    assert unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    assert len(number) <= 4 or unit == "PiB"
    assert float(number) < 1024 or unit == "PiB"


@pytest.mark.parametrize("s, text", [
    (0, "0 s"), (4.567, "4.57 s"), (1.0, "1 s"), (0.9999, "1 s"), (12.34, "12.3 s"), (150.0, "150 s"),
    (999.4, "999 s"), (4321.0, "4321 s"), (0.0123, "12.3 ms"), (0.001, "1 ms"), (0.00099999, "1 ms"),
    (2.5e-5, "25 µs"), (1.5e-7, "0.15 µs"), (-0.5, "-500 ms"),
])
def test_seconds(s, text):
    assert fmt.seconds(s) == text


@pytest.mark.parametrize("ids, text", [
    ([], ""), ([7], "7"), ([0, 1, 2, 3, 6], "0-3,6"), ([6, 3, 2, 1, 0], "0-3,6"), ([1, 1, 2], "1-2"),
    ([0, 2, 4], "0,2,4"), (range(3, 9), "3-8"), ((5, 4), "4-5"),
])
def test_ranges(ids, text):
    assert fmt.ranges(ids) == text


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=40))
def test_parse_ranges_reads_what_ranges_writes(ids):
    text = fmt.ranges(ids)
    if ids:
        assert fmt.parse_ranges(text, "--engines") == sorted(set(ids))


@pytest.mark.parametrize("spec, ids", [
    ("0", [0]), ("0-3,6", [0, 1, 2, 3, 6]), (" 1 - 2 , 5 ", [1, 2, 5]), ("2,2,1", [2, 1]),
    ("3-5,4", [3, 4, 5]), ("007", [7]),
])
def test_parse_ranges(spec, ids):
    assert fmt.parse_ranges(spec, "--engines") == ids


@pytest.mark.parametrize("spec, message", [
    ("0-", r"cannot read --engines '0-': '0-' is not an id or a range\. Write ids and ranges "
           r"separated by commas, like 0-3,6\.$"),
    ("", r"'' is not an id or a range"), ("0,,1", r"'' is not an id or a range"),
    ("0,", r"'' is not an id or a range"), ("-1", r"'-1' is not an id"), ("1.5", r"'1.5' is not an id"),
    ("0;1", r"'0;1' is not an id"), ("__import__('os')", r"is not an id"),
    ("\u0663", r"is not an id"),  # an Arabic-Indic 3: ids are ASCII digits
    ("3-1", r"cannot read --engines '3-1': the range 3-1 runs backwards; write 1-3\.$"),
])
def test_parse_ranges_refuses_what_it_cannot_read(spec, message):
    with pytest.raises(UsageError, match=message):
        fmt.parse_ranges(spec, "--engines")


def test_parse_ranges_names_the_option_the_item_and_the_hint():
    with pytest.raises(UsageError, match=r"^cannot read --gpus 'x': 'x' is not a device or a range\. "
                                         r"Say 0\.$"):
        fmt.parse_ranges("x", "--gpus", item="a device", hint="Say 0.")


def test_engines_and_gpus_share_the_grammar_and_keep_their_messages():
    for spec in ("0", "0-3,6", " 1 - 2 , 5 ", "2,2,1"):
        assert partition.parse_engines(spec) == fmt.parse_ranges(spec, "--engines")
        assert gpu.parse_gpus(spec) == tuple(fmt.parse_ranges(spec, "--gpus"))
    # docs/errors.md quotes these two word for word (tests/test_catalogue.py checks them).
    with pytest.raises(UsageError, match=r"^cannot read --engines '0-': '0-' is not an engine id or a "
                                         r"range\. Write ids and ranges separated by commas, like 0-3,6\.$"):
        partition.parse_engines("0-")
    with pytest.raises(UsageError, match=r"the range 3-1 runs backwards; write 1-3\.$"):
        partition.parse_engines("3-1")
    with pytest.raises(UsageError, match=r"^cannot read --gpus 'some': 'some' is not a CUDA device "
                                         r"number or a range\. Write all, none, or CUDA device numbers"):
        gpu.parse_gpus("some")
    with pytest.raises(UsageError, match=r"^cannot read --gpus '3-1': the range 3-1 runs backwards"):
        gpu.parse_gpus("3-1")
