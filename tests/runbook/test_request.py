"""parse_request: incident text plus `key=value` params, and nothing but RequestError on bad
input."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.errors import RequestError
from agent.runbook.request import MAX_REQUEST_BYTES, ParsedRequest, parse_request

KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,31}", fullmatch=True)
# Anything but whitespace (shlex's and Unicode's), quotes, backslashes, NUL and surrogates.
VALUES = st.text(
    alphabet=st.characters(
        exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc"),
        exclude_characters="\"'\\",
    ),
    max_size=40,
)


def test_params_are_split_from_the_text() -> None:
    parsed = parse_request("incident: API latency spike service=checkout namespace=staging")
    assert parsed == ParsedRequest(
        text="incident: API latency spike",
        params={"service": "checkout", "namespace": "staging"},
    )


def test_params_anywhere_and_text_order_kept() -> None:
    parsed = parse_request("disk mount=/var almost full journal_max=1G now")
    assert parsed.text == "disk almost full now"
    assert parsed.params == {"mount": "/var", "journal_max": "1G"}


def test_no_params() -> None:
    assert parse_request("  disk   full ") == ParsedRequest(text="disk full", params={})


@pytest.mark.parametrize(
    ("message", "params"),
    [
        ('latency note="two words"', {"note": "two words"}),
        ("latency note='single quoted value'", {"note": "single quoted value"}),
        ('latency "note=quoted whole word"', {"note": "quoted whole word"}),
        ('latency note="a \\"b\\" c"', {"note": 'a "b" c'}),
        ('latency note=""', {"note": ""}),
        ("latency empty=", {"empty": ""}),
        ("latency url=http://h:80/x?a=b", {"url": "http://h:80/x?a=b"}),
    ],
)
def test_quoted_and_unusual_values(message: str, params: dict[str, str]) -> None:
    parsed = parse_request(message)
    assert parsed.text == "latency"
    assert parsed.params == params


@pytest.mark.parametrize(
    "word",
    ["Service=x", "1st=x", "=x", "a-b=x", "k" * 33 + "=x", "key:x", "no equals"],
)
def test_words_that_are_not_params_stay_in_the_text(word: str) -> None:
    parsed = parse_request(f"latency '{word}'")
    assert parsed.params == {}
    assert parsed.text == f"latency {word}"


def test_duplicate_key_is_an_error() -> None:
    with pytest.raises(RequestError, match="'service' is given twice"):
        parse_request("latency service=a service=b")


def test_duplicate_key_with_the_same_value_is_an_error_too() -> None:
    with pytest.raises(RequestError, match="given twice"):
        parse_request("latency service=a service=a")


def test_nul_is_an_error() -> None:
    with pytest.raises(RequestError, match="NUL"):
        parse_request("latency\x00 service=a")


@pytest.mark.parametrize("message", ['latency "open', "latency 'open", "latency trailing\\"])
def test_unbalanced_quotes_are_an_error(message: str) -> None:
    with pytest.raises(RequestError, match="cannot parse message"):
        parse_request(message)


def test_size_limit_is_in_utf8_bytes() -> None:
    assert parse_request("a" * MAX_REQUEST_BYTES).text == "a" * MAX_REQUEST_BYTES
    with pytest.raises(RequestError, match=f"longer than {MAX_REQUEST_BYTES} bytes"):
        parse_request("a" * (MAX_REQUEST_BYTES + 1))
    # 1366 three-byte characters are 4098 bytes, though only 1366 characters.
    with pytest.raises(RequestError, match="longer than"):
        parse_request("€" * 1366)
    assert parse_request("€" * 1365).text == "€" * 1365


def test_request_errors_are_one_line() -> None:
    for message in ['a "b', "a\x00", "x" * 5000, "a=1 a=2"]:
        with pytest.raises(RequestError) as caught:
            parse_request(message)
        assert "\n" not in str(caught.value)
        assert isinstance(caught.value, ValueError)


@settings(max_examples=400)
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=300))
@example("\udcff")
@example("a=1 a=2")
@example('"')
@example("\\")
@example("x" * (MAX_REQUEST_BYTES + 1))
def test_arbitrary_text_parses_or_raises_request_error(message: str) -> None:
    try:
        parsed = parse_request(message)
    except RequestError as exc:
        assert str(exc)
        return
    assert isinstance(parsed, ParsedRequest)
    assert all(isinstance(v, str) for v in parsed.params.values())


@settings(max_examples=200)
@given(
    st.integers(MAX_REQUEST_BYTES - 60, MAX_REQUEST_BYTES + 20),
    st.text(alphabet=string.ascii_letters + "€ =\t\n'\"\\", max_size=40),
)
def test_text_around_the_size_limit(padding: int, tail: str) -> None:
    message = "x" * padding + " " + tail
    too_long = len(message.encode()) > MAX_REQUEST_BYTES
    try:
        parse_request(message)
    except RequestError as exc:
        assert ("longer than" in str(exc)) == too_long  # the size is checked first
        return
    assert not too_long


@settings(max_examples=300)
@given(st.dictionaries(KEYS, VALUES, max_size=12))
def test_generated_params_round_trip(params: dict[str, str]) -> None:
    message = " ".join(f"{key}={value}" for key, value in params.items())
    parsed = parse_request(message)
    assert parsed.params == params
    assert list(parsed.params) == list(params)
    assert parsed.text == ""


@settings(max_examples=200)
@given(
    st.lists(st.from_regex(r"[A-Za-z:,.!?-]{1,12}", fullmatch=True), min_size=1, max_size=8),
    st.dictionaries(KEYS, VALUES, max_size=6),
)
def test_text_and_params_mixed_round_trip(words: list[str], params: dict[str, str]) -> None:
    # Text words have no '=', so none of them can be taken for a param.
    message = " ".join([*words, *(f"{key}={value}" for key, value in params.items())])
    parsed = parse_request(message)
    assert parsed.text == " ".join(words)
    assert parsed.params == params
