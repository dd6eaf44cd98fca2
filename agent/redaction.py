"""Secret redaction: applied by the kernel to everything it journals or shows a policy.

The same pass replaces U+0000 with U+FFFD: PostgreSQL's JSON types cannot hold U+0000 and
refuse any text that escapes it, so a command's binary output or a model's stray character
would make its journal entry, or the approval request quoting it, impossible to store there.

Invariant: `Redactor.text(s) == Redactor.slow_text(s)` for every string `s`. `slow_text` runs
every pattern over the string; `text` first asks a prefilter, which only answers "no built-in
shape can match here" when that is certain (each shape needs a literal the string lacks), and
keeps recent answers for short strings in a bounded cache. Most strings a run journals (keys,
tool names, statuses, dry-run argv) hold no secret, so they cost a few substring tests, or a
cache hit.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"
NUL_REPLACEMENT = "\ufffd"

# Shapes of credentials that show up in command output and URLs often enough to catch by default.
# A pattern with a `secret` group has only that group replaced, so the key name stays readable.
# Runs of name characters are bounded ({0,40}) so a long word cannot make matching quadratic.
BUILTIN_PATTERNS = (
    r"(?i)\b(?:bearer|token|basic)\s+[A-Za-z0-9._~+/=-]{12,}",
    r"(?i)(?P<name>[A-Za-z0-9_.-]{0,40}(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key"
    r"|token)[A-Za-z0-9_.-]{0,40})[\"']?\s*[=:]\s*[\"']?(?P<secret>[^\s'\"&,;}]{4,})",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    r"\bsk-[A-Za-z0-9_-]{20,}\b",
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b",
    # Telegram bot tokens, also inside /bot<token>/ and URL-encoded (`%3A` for the colon).
    r"(?<!\d)\d{6,12}(?::|%3[Aa])[A-Za-z0-9_-]{30,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)",  # user:password@ in URLs
)

# Names the key pattern matches that are clearly no secret when they hold a path: the
# working directories the shell sets (`PWD`, not `pwd=` in a URL, which may be a password).
NOT_SECRET_NAMES = frozenset({"PWD", "OLDPWD"})
# A known secret cut short (by an output cap) still hides this many leading characters or more:
# its prefix is redacted where a line or the text ends with it.
CUT_SECRET_MIN = 8

# The prefilter: what every match of a built-in pattern contains, one entry per pattern
# above (in order). Change a pattern, change its literals here: the property tests compare
# `text` with `slow_text` on strings built around every shape.
#
# An ASCII string is tested with `in` (C-speed substring search): lowercased, an ASCII string
# holds a (?i) keyword exactly when the original matches it case-insensitively.
_ASCII_NAMES = ("bearer", "token", "basic")  # 1
_ASCII_KEYS = ("passw", "pwd", "secret", "key", "token")  # 2, which also needs "=" or ":"
_ASCII_CASED = ("AKIA", "sk-", "xox", "-----BEGIN ")  # 3, 5, 6, 8 (4, 7, 9: regexes)
_GITHUB = re.compile(r"gh[pousr]_")  # 4
_TELEGRAM = re.compile(r"(?::|%3[Aa])[A-Za-z0-9_-]{30}")  # 7, its tail
_URL_USER = re.compile(r"://[^/\s:@]+:[^/\s@]+@")  # 9, without its look-arounds
# Any other string (rare: non-ASCII text) goes through one regex with the patterns' own (?i),
# so Unicode case folding (the Kelvin sign matches "k", long s "s") stays the same.
_UNICODE = re.compile(
    r"(?i:bearer|token|basic|passw|pwd|secret|key)|AKIA|gh[pousr]_|sk-|xox"
    r"|(?::|%3[Aa])[A-Za-z0-9_-]{30}"
    r"|-----BEGIN |://[^/\s:@]+:[^/\s@]+@"
)
# Strings up to this long are cached: keys, names, statuses, short prose repeat from step to
# step; long command output rarely does, and would make the cache's memory unbounded.
_CACHED_LENGTH = 512
_CACHE_SIZE = 2048
# Exact types that hold no string: `data` keeps them as they are, as its full path would.
_NO_TEXT = frozenset({int, float, bool, type(None)})


def _replace(match: re.Match[str]) -> str:
    if "secret" in match.re.groupindex and match.group("secret") is not None:
        if match.group("name") in NOT_SECRET_NAMES and match.group("secret").startswith("/"):
            return match.group(0)  # `PWD=/srv/app`: a path the shell sets, not a password
        start, end = match.span("secret")
        whole_start = match.start()
        text = match.group(0)
        return text[: start - whole_start] + REDACTED + text[end - whole_start :]
    return REDACTED


def may_hold_builtin(value: str) -> bool:
    """False only when no built-in pattern can match anywhere in `value` (a necessary
    condition of each pattern fails); True says nothing for certain."""
    if not value.isascii():
        return _UNICODE.search(value) is not None
    lowered = value.lower()
    if any(name in lowered for name in _ASCII_NAMES):
        return True
    colon = ":" in value
    if (colon or "=" in value) and any(key in lowered for key in _ASCII_KEYS):
        return True
    if any(literal in value for literal in _ASCII_CASED):
        return True
    if "gh" in value and _GITHUB.search(value):
        return True
    if ("%3" in value or colon) and _TELEGRAM.search(value) is not None:
        return True
    return colon and "@" in value and _URL_USER.search(value) is not None


class Redactor:
    """Replaces secrets (configured patterns and known secret values) with a marker."""

    def __init__(self, patterns: Iterable[str] = (), secret_values: Iterable[str] = ()) -> None:
        # The built-in shapes run as one alternation: one pass over each string, not nine.
        self._builtin = re.compile("|".join(f"(?:{_scoped(p)})" for p in BUILTIN_PATTERNS))
        # Configured patterns are arbitrary regexes: no prefilter can vouch for them.
        self._configured = [re.compile(p) for p in patterns]
        known = {v for v in secret_values if len(v) >= 4}
        # A secret also travels encoded: in a URL, base64, or a JSON string.
        self._values = tuple(sorted({e for v in known for e in encodings(v)}, key=len))
        # What any match contains: the value, or the first CUT_SECRET_MIN characters of one
        # cut short (the prefilter's literal test).
        self._literals = tuple({v[:CUT_SECRET_MIN] for v in self._values})
        # Longest first, so a value wins over its own prefix; then values cut short.
        self._value_pattern = (
            re.compile(
                "|".join(re.escape(v) for v in reversed(self._values))
                + "".join(f"|{_cut(v)}" for v in reversed(self._values))
            )
            if self._values
            else None
        )
        self._cached = lru_cache(maxsize=_CACHE_SIZE)(self._fresh)

    def text(self, value: str) -> str:
        """Return `value` with every secret (and U+0000) replaced."""
        if "\x00" in value:
            value = value.replace("\x00", NUL_REPLACEMENT)
        if len(value) < 4:  # too short to hold any secret shape or value
            return value
        if len(value) <= _CACHED_LENGTH:
            return self._cached(value)
        return self._fresh(value)

    def slow_text(self, value: str) -> str:
        """`text` without the prefilter and the cache: every pattern over `value`, the
        definition `text` must agree with (the tests and bench/redaction.py compare them)."""
        value = value.replace("\x00", NUL_REPLACEMENT)
        if len(value) < 4:
            return value
        return self._apply(value, builtin=True)

    def data(self, value: Any) -> Any:
        """Redact every string inside a JSON-like structure (keys included).

        A container's plain strings and numbers are handled in place, without a call of
        their own: those calls were most of the walk's cost (a step's decision and outcome
        hold a few dozen leaves). Anything else, subclasses included, takes the full path."""
        if isinstance(value, str):
            return self.text(value)
        text, data = self.text, self.data
        if isinstance(value, dict):
            return {
                text(k) if type(k) is str else data(k): (
                    text(v) if type(v) is str else v if type(v) in _NO_TEXT else data(v)
                )
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [
                text(v) if type(v) is str else v if type(v) in _NO_TEXT else data(v) for v in value
            ]
        return value

    def _fresh(self, value: str) -> str:
        return self._apply(value, builtin=may_hold_builtin(value))

    def _apply(self, value: str, builtin: bool) -> str:
        """The patterns in order, each on the previous one's result; the built-in shapes
        only when `builtin` (skipping them is exact when none can match)."""
        if builtin:
            value = self._builtin.sub(_replace, value)
        for pattern in self._configured:
            value = pattern.sub(_replace, value)
        # A literal that is not in the string cannot match: `in` is far cheaper than a search.
        if self._value_pattern is not None and any(v in value for v in self._literals):
            value = self._value_pattern.sub(_replace, value)
        return value


def encodings(secret: str) -> list[str]:
    """The forms a secret value travels in: as is, URL-encoded (a path or query), base64 (a
    header, a config blob; with and without padding, standard and URL-safe alphabets) and
    escaped inside a JSON string."""
    raw = secret.encode()
    forms = {
        secret,
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode()
        forms.update((text, text.rstrip("=")))
    return [form for form in forms if len(form) >= 4]


def _cut(value: str) -> str:
    """A regex for `value` cut short after at least CUT_SECRET_MIN characters, where a line or
    the text ends (an output cap cuts there, before its marker line)."""
    if len(value) <= CUT_SECRET_MIN:
        return re.escape(value) + r"(?=\n|\Z)"
    tail = ""
    for char in reversed(value[CUT_SECRET_MIN:]):
        tail = f"(?:{re.escape(char)}{tail})?"
    return re.escape(value[:CUT_SECRET_MIN]) + tail + r"(?=\n|\Z)"


def _scoped(pattern: str) -> str:
    """Turn a leading global `(?i)` into a scoped `(?i:...)` so patterns can be joined."""
    if pattern.startswith("(?i)"):
        return f"(?i:{pattern[4:]})"
    return pattern
