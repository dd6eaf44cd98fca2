"""Redactor: secrets out of everything journaled, the fast path equal to every pattern."""

from __future__ import annotations

import base64
import json
import re
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.redaction import (
    BUILTIN_PATTERNS,
    NUL_REPLACEMENT,
    REDACTED,
    Redactor,
    may_hold_builtin,
)
from agent.tools.shell import run_command

BOT_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawA"

# -- Redactor ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        ("Authorization: Bearer abcdefghijklmnopqrstuv", "abcdefghijklmnop", "Authorization:"),
        ('curl -H "authorization: bearer eyJhbGciOi.e30.sig-xyz"', "eyJhbGciOi", "curl -H"),
        ("login password=hunter22 user=bob", "hunter22", "user=bob"),
        ("PASSWD: s3cr3t!x done", "s3cr3t", "done"),
        ("api_key=abcd1234&page=2", "abcd1234", "&page=2"),
        ("secret: opensesame", "opensesame", ""),
        ("key AKIAIOSFODNN7EXAMPLE in use", "AKIAIOSFODNN7EXAMPLE", "key "),
        (f"token is {BOT_TOKEN} ok", BOT_TOKEN.split(":")[1], "token is"),
        ("ghp_" + "a1" * 18 + " pushed", "a1a1a1a1a1", "pushed"),
        ("sk-" + "x9" * 12 + " used", "x9x9x9x9x9", "used"),
        ("xoxb-1234567890-abcdef slack", "1234567890-abcdef", "slack"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAK\n-----END RSA PRIVATE KEY-----",
            "MIIEow",
            "",
        ),
    ],
)
def test_builtin_shapes_are_redacted(text: str, secret: str, kept: str) -> None:
    redacted = Redactor().text(text)
    assert secret not in redacted
    assert REDACTED in redacted
    assert kept in redacted


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://alice:pa55word@db.example.com:5432/app",
            f"https://{REDACTED}@db.example.com:5432/app",
        ),
        ("postgres://u:p@h/db", f"postgres://{REDACTED}@h/db"),
        ("see redis://default:hunter2@cache:6379 now", f"see redis://{REDACTED}@cache:6379 now"),
    ],
)
def test_user_and_password_in_urls_keep_scheme_and_host(url: str, expected: str) -> None:
    assert Redactor().text(url) == expected


@pytest.mark.parametrize(
    "text",
    [
        "https://example.com/a:b@c",  # not userinfo: after the first '/'
        "https://example.com:8443/healthz",
        "token=abc",  # too short to be a secret
        "kubectl get pods -n production -l app=checkout-api -o wide",
        "p99 latency 812 ms at 12:30:45",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert Redactor().text(text) == text


def test_configured_patterns_and_secret_values() -> None:
    redactor = Redactor(patterns=[r"corp-\d{6}"], secret_values=["s3cr3t-value", "abc", ""])
    redacted = redactor.text("ticket corp-123456 with s3cr3t-value; abc stays")
    assert redacted == f"ticket {REDACTED} with {REDACTED}; abc stays"  # < 4 chars: ignored


def test_longer_secret_values_win_over_their_prefixes() -> None:
    redactor = Redactor(secret_values=["hunter", "hunter2-long"])
    assert redactor.text("pw hunter2-long") == f"pw {REDACTED}"


def test_secret_values_are_literal_not_regexes() -> None:
    redactor = Redactor(secret_values=["a.b*c+"])
    assert redactor.text("x a.b*c+ y aXbbbc z") == f"x {REDACTED} y aXbbbc z"


def test_data_is_redacted_recursively() -> None:
    redactor = Redactor(secret_values=["topsecret"])
    data = {
        "argv": ["psql", "postgres://u:pw1234@db/app"],
        "env": {"PASS": "topsecret", "nested": [{"out": "Bearer abcdefghijklmnop"}]},
        "tuple": ("password=hunter22",),
        "count": 3,
        "ok": True,
        "none": None,
    }
    redacted = redactor.data(data)
    assert redacted == {
        "argv": ["psql", f"postgres://{REDACTED}@db/app"],
        "env": {"PASS": REDACTED, "nested": [{"out": REDACTED}]},
        "tuple": [f"password={REDACTED}"],
        "count": 3,
        "ok": True,
        "none": None,
    }
    assert data["env"]["PASS"] == "topsecret", "the input is not modified"


def test_nul_characters_are_kept_out_of_everything_journaled() -> None:
    """PostgreSQL's JSON types cannot hold U+0000: each becomes U+FFFD, in strings too short
    to hold a secret, in keys, and beside a secret that is still redacted."""
    redactor = Redactor()
    assert redactor.text("\x00") == redactor.slow_text("\x00") == NUL_REPLACEMENT
    assert redactor.text("before\x00after") == f"before{NUL_REPLACEMENT}after"
    assert redactor.data({"k\x00": ["a\x00", {"out": "x\x00 token=abcdefgh12345678"}]}) == {
        f"k{NUL_REPLACEMENT}": [
            f"a{NUL_REPLACEMENT}",
            {"out": f"x{NUL_REPLACEMENT} token={REDACTED}"},
        ]
    }


SECRETS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=4, max_size=24)
FILLER = st.text(alphabet=" ,.;()[]{}\n\t", max_size=10)


@settings(max_examples=200)
@given(SECRETS, st.lists(FILLER, min_size=1, max_size=5))
def test_secret_values_never_survive(secret: str, fillers: list[str]) -> None:
    text = secret.join(fillers) + secret
    redactor = Redactor(secret_values=[secret])
    assert secret not in redactor.text(text)
    assert secret not in str(redactor.data({"k": [text, {"deep": (text,)}]}))


def test_bot_token_in_telegram_api_url_is_redacted() -> None:
    url = f"https://api.telegram.org/bot{BOT_TOKEN}/getMe"
    assert BOT_TOKEN.split(":")[1] not in Redactor().text(url)


@pytest.mark.parametrize(
    "text",
    [
        "DB_PASSWORD=hunter22",
        "PGPASSWORD=hunter22 psql -h db",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENG",
    ],
)
def test_env_style_secret_assignments_are_redacted(text: str) -> None:
    assert "hunter22" not in Redactor().text(text)
    assert "wJalrXUtnFEMIK7MDENG" not in Redactor().text(text)


@pytest.mark.parametrize(
    "text", ['password="hunter22"', "password: 'hunter22'", '{"password": "hunter22"}']
)
def test_quoted_secret_values_are_redacted(text: str) -> None:
    assert "hunter22" not in Redactor().text(text)


# -- encodings, cut secrets, and names that are no secret ---------------------------------------

BOT_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw1"


@pytest.mark.parametrize(
    "encode",
    [
        lambda v: urllib.parse.quote(v, safe=""),
        lambda v: urllib.parse.quote_plus(v),
        lambda v: base64.b64encode(v.encode()).decode(),
        lambda v: base64.b64encode(v.encode()).decode().rstrip("="),
        lambda v: base64.urlsafe_b64encode(v.encode()).decode(),
        lambda v: json.dumps(v)[1:-1],
    ],
    ids=["url", "url-plus", "base64", "base64-unpadded", "base64-urlsafe", "json"],
)
@pytest.mark.parametrize("secret", [BOT_TOKEN, 'p@ss "word"/ü+=&x', "sk-live-0123456789abcdef"])
def test_a_known_secret_is_redacted_in_the_encodings_it_travels_in(
    encode: Callable[[str], str], secret: str
) -> None:
    encoded = encode(secret)
    text = f'GET /bot/{encoded}/getMe HTTP/1.1 and {{"v": "{encoded}"}}'
    redacted = Redactor(secret_values=[secret]).text(text)
    assert encoded not in redacted and secret not in redacted
    assert redacted.count(REDACTED) == 2, redacted


def test_a_url_encoded_bot_token_is_redacted_by_its_shape_alone() -> None:
    quoted = urllib.parse.quote(BOT_TOKEN, safe="")
    assert quoted.startswith("123456789%3A")
    assert Redactor().text(f"https://api.telegram.org/bot{quoted}/getMe") == (
        f"https://api.telegram.org/bot{REDACTED}/getMe"
    )


@pytest.mark.parametrize("kept", [8, 9, 23, len(BOT_TOKEN) - 1])
def test_a_known_secret_cut_short_is_redacted_where_the_output_ends(kept: int) -> None:
    """An output cap can cut a secret anywhere: 8 or more of its first characters at the end
    of a line or of the text are redacted, so at most 7 are ever kept."""
    redactor = Redactor(secret_values=[BOT_TOKEN])
    cut = BOT_TOKEN[:kept]
    for text in (f"token is {cut}", f"token is {cut}\n[… truncated: 99 more bytes]"):
        assert cut not in redactor.text(text)
        assert redactor.text(text).startswith(f"token is {REDACTED}")
    assert redactor.text(f"{BOT_TOKEN[:7]}\n") == f"{BOT_TOKEN[:7]}\n"  # too short to tell


async def test_a_secret_a_real_command_prints_past_the_output_cap_is_never_kept(
    tmp_path: Path,
) -> None:
    """A real command prints the bot token URL-encoded and then plainly, cut by the cap: no
    8 characters of it in a row survive redaction."""
    script = tmp_path / "leak.py"
    quoted = urllib.parse.quote(BOT_TOKEN, safe="")
    script.write_text(f"print({quoted!r}); print('x' * 16 + {BOT_TOKEN!r})\n")
    cap = len(quoted) + 1 + 16 + 23  # the plain token is cut after 23 characters
    result = await run_command([sys.executable, str(script)], timeout=30, env={}, output_cap=cap)
    assert result.truncated and BOT_TOKEN[:23] in result.stdout
    redacted = Redactor(secret_values=[BOT_TOKEN]).text(result.stdout)
    pieces = {BOT_TOKEN[i : i + 8] for i in range(len(BOT_TOKEN) - 7)}
    pieces |= {quoted[i : i + 8] for i in range(len(quoted) - 7)}
    assert [p for p in pieces if p in redacted] == [], redacted


@pytest.mark.parametrize("text", ["PWD=/srv/app", "cd back to OLDPWD=/home/sam/src"])
def test_the_working_directory_is_no_secret(text: str) -> None:
    assert Redactor().text(text) == text


@pytest.mark.parametrize(
    "text", ["PWD=hunter2secret", "https://x/login?user=a&pwd=/hunter2", "DB_PWD=/x/y"]
)
def test_a_password_named_like_the_working_directory_still_is_one(text: str) -> None:
    assert REDACTED in Redactor().text(text)


# -- the fast path (prefilter + cache) redacts exactly what every pattern does ----------------


def _recased(text: str, swaps: list[int]) -> str:
    """`text` with some letters' case changed, and some into the non-ASCII letters that
    (?i) matches them with (Kelvin sign for k, long s for s, dotless i for i)."""
    unicode = {"k": "\u212a", "s": "\u017f", "i": "\u0131"}
    out = list(text)
    for n in swaps:
        at = n % len(out)
        c = out[at]
        out[at] = unicode[c] if n % 3 == 0 and c in unicode else c.swapcase()
    return "".join(out)


KEYWORDS = st.sampled_from(
    [
        "password",
        "passwd",
        "pwd",
        "secret",
        "api_key",
        "api-key",
        "apikey",
        "access_key",
        "accesskey",
        "token",
        "bearer",
        "basic",
    ]
)
NAME = st.text(alphabet="abcXYZ019_.-", max_size=45)
VALUE = st.text(alphabet="abcdefXYZ0123456789-_./+=~%", min_size=0, max_size=40)
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghij"
SHAPES = st.one_of(
    st.builds(  # name=value, name: "value", Bearer <token>
        lambda name, key, swaps, quote, space, sep, value: (
            f"{name}{_recased(key, swaps)}{name[:3]}{quote}{space}{sep}{space}{quote}{value}"
        ),
        NAME,
        KEYWORDS,
        st.lists(st.integers(0, 99), max_size=4),
        st.sampled_from(["", "'", '"']),
        st.sampled_from(["", " ", "\t", " \n "]),
        st.sampled_from(["=", ":", " ", ""]),
        VALUE,
    ),
    st.builds(lambda s: "AKIA" + s, st.text(alphabet=ALNUM[:36], min_size=14, max_size=18)),
    st.builds(
        lambda p, s: f"gh{p}_{s}",
        st.sampled_from("pousrx"),
        st.text(ALNUM, min_size=28, max_size=34),
    ),
    st.builds(lambda s: "sk-" + s, st.text(ALNUM + "_-", min_size=18, max_size=24)),
    st.builds(lambda p, s: f"xox{p}-{s}", st.sampled_from("abprsz"), VALUE),
    st.builds(  # Telegram tokens, with ASCII or other Unicode digits, URL-encoded or not
        lambda d, sep, s: f"{d}{sep}{s}",
        st.text(alphabet="0123456789\u0663\uff11", min_size=5, max_size=13),
        st.sampled_from([":", "%3A", "%3a", "%3", "%"]),
        st.text(ALNUM + "_-", min_size=28, max_size=34),
    ),
    st.builds(
        lambda kind, body: (
            f"-----BEGIN {kind}PRIVATE KEY-----{body}-----END {kind}PRIVATE KEY-----"
        ),
        st.sampled_from(["", "RSA ", "EC "]),
        VALUE,
    ),
    st.builds(
        lambda user, pw, host: f"https://{user}:{pw}@{host}/x",
        st.text("ab:1@/", min_size=0, max_size=8),
        st.text("xy:2@/", max_size=8),
        NAME,
    ),
)
FILL = st.text(
    alphabet=st.sampled_from(
        [*"aksiK =:'\"/@-_.,;}&\n\t0123456789", "\u212a", "\u017f", "\u2014", "\x00"]
    ),
    max_size=12,
)
TEXTS = st.lists(st.one_of(SHAPES, FILL), max_size=8).map("".join)


@settings(max_examples=500)
@given(TEXTS)
def test_fast_path_redacts_exactly_what_every_pattern_does(text: str) -> None:
    redactor = Redactor()
    assert redactor.text(text) == redactor.slow_text(text)
    assert redactor.text(text) == redactor.slow_text(text), "and again, from the cache"
    long = text + " " * 600 + text  # past the cached length
    assert redactor.text(long) == redactor.slow_text(long)


@settings(max_examples=500)
@given(TEXTS)
def test_prefilter_never_rules_out_a_match(text: str) -> None:
    if any(re.search(pattern, text) for pattern in BUILTIN_PATTERNS):
        assert may_hold_builtin(text)


@settings(max_examples=300)
@given(TEXTS, st.lists(st.text("abcdef123", min_size=4, max_size=8), max_size=3))
def test_fast_path_with_configured_patterns_and_values(text: str, values: list[str]) -> None:
    # A configured pattern sees the built-in replacements: skipping them must change nothing.
    redactor = Redactor(patterns=[r"REDACTED\]\w*", r"corp-\d{6}"], secret_values=values)
    text = f"{text} corp-123456 {' '.join(values)}"
    assert redactor.text(text) == redactor.slow_text(text)
