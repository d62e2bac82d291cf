"""Seeds, labels, versions and numbers as people write them (service/frontends/text.py): pure unit tests."""

import time

import pytest

from service.errors import InvalidArgument
from service.frontends import text


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("7", ([7], None)), ("0-3", (None, (0, 4))), ("1,5,9", ([1, 5, 9], None)), ("0-2,9", ([0, 1, 2, 9], None)),
        (" 3 - 4 ", (None, (3, 2))), ("18446744073709551615", ([2**64 - 1], None)), ("5-3", (None, (5, 0))),
    ],
)  # fmt: skip
def test_seeds(written, expected):
    seeds = text.seeds(written, "seeds")
    listed, ranged = expected
    if listed is not None:
        assert list(seeds.values) == listed
    else:
        assert (seeds.start, seeds.count) == ranged


@pytest.mark.parametrize("written", ["", "x", "1,,2", "-1", "1-", "0-1-2", "1.5", "9" * 21])
def test_seeds_refuse_what_is_not_seeds(written):
    with pytest.raises(InvalidArgument, match=r"^seeds: "):
        text.seeds(written, "seeds")


def test_a_long_seed_list_is_refused_before_it_is_built():
    with pytest.raises(InvalidArgument, match="more than 65,536 seeds"):
        text.seeds("0-70000,5", "seeds")


def test_megabytes_of_seeds_text_are_refused_by_length_before_anything_is_split():
    """3.8 MB of `1,1,1,...` took 2.9 s on the event loop when it was expanded first."""
    written = ",".join(["1"] * 2_000_000)
    start = time.process_time()
    with pytest.raises(InvalidArgument, match=r"^parameters.seeds: 3,999,999 characters, more than 65,536"):
        text.seeds(written, "parameters.seeds")
    with pytest.raises(InvalidArgument, match=r"^parameters.labels: 3,999,999 characters"):
        text.labels(written, "parameters.labels")
    assert time.process_time() - start < 0.05  # a length check, not a parse: microseconds, with a wide margin


@pytest.mark.parametrize("parse", [text.integer, text.version])
def test_integers_past_python_s_digit_limit_are_refused_naming_the_field(parse):
    """int() of more than 4,300 digits raises ValueError, which reached clients as HTTP 500 / INTERNAL."""
    with pytest.raises(InvalidArgument, match=r"^version: "):
        parse("9" * 5000, "version")


def test_integers_and_versions():
    assert text.integer(" -12 ", "steps") == -12
    assert text.version("", "version") == 0 and text.version("3", "version") == 3
    for bad in ("0", "v1", "-1", "1.0"):
        with pytest.raises(InvalidArgument, match="version: "):
            text.version(bad, "version")


def test_labels_by_index_and_name_and_a_huge_index_stays_text():
    assert [lab.index for lab in text.labels("3,5", "labels")] == [3, 5]
    assert text.labels("seven", "labels")[0].name == "seven"
    assert text.label("9" * 5000).name == "9" * 5000  # the data plane refuses it as an unknown class, quoted short


@pytest.mark.parametrize("written", ["nan", "inf", "x", "1" * 100])
def test_numbers_are_finite_and_short(written):
    with pytest.raises(InvalidArgument, match=r"^psi: a number"):
        text.number(written, "psi")


def test_the_client_cli_reads_seeds_as_the_server_does():
    assert text.ints("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match="not seeds"):
        text.ints("3-x")
