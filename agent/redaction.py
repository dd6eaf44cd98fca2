"""Secret redaction: applied by the kernel to everything it journals or shows a policy.

Invariant: `Redactor.text(s) == Redactor.slow_text(s)` for every string `s`. `slow_text` runs
every pattern over the string; `text` first asks a prefilter, which only answers "no built-in
shape can match here" when that is certain (each shape needs a literal the string lacks), and
keeps recent answers for short strings in a bounded cache. Most strings a run journals (keys,
tool names, statuses, dry-run argv) hold no secret, so they cost a few substring tests, or a
cache hit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

REDACTED = "[REDACTED]"

# Shapes of credentials that show up in command output and URLs often enough to catch by default.
# A pattern with a `secret` group has only that group replaced, so the key name stays readable.
# Runs of name characters are bounded ({0,40}) so a long word cannot make matching quadratic.
BUILTIN_PATTERNS = (
    r"(?i)\b(?:bearer|token|basic)\s+[A-Za-z0-9._~+/=-]{12,}",
    r"(?i)[A-Za-z0-9_.-]{0,40}(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|token)"
    r"[A-Za-z0-9_.-]{0,40}[\"']?\s*[=:]\s*[\"']?(?P<secret>[^\s'\"&,;}]{4,})",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    r"\bsk-[A-Za-z0-9_-]{20,}\b",
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b",
    r"(?<!\d)\d{6,12}:[A-Za-z0-9_-]{30,}",  # Telegram bot tokens, also inside /bot<token>/
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)",  # user:password@ in URLs
)

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
_TELEGRAM = re.compile(r":[A-Za-z0-9_-]{30}")  # 7, its tail: a literal first is a fast scan
_URL_USER = re.compile(r"://[^/\s:@]+:[^/\s@]+@")  # 9, without its look-arounds
# Any other string (rare: non-ASCII text) goes through one regex with the patterns' own (?i),
# so Unicode case folding (the Kelvin sign matches "k", long s "s") stays the same.
_UNICODE = re.compile(
    r"(?i:bearer|token|basic|passw|pwd|secret|key)|AKIA|gh[pousr]_|sk-|xox|:[A-Za-z0-9_-]{30}"
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
    return colon and (
        _TELEGRAM.search(value) is not None
        or ("@" in value and _URL_USER.search(value) is not None)
    )


class Redactor:
    """Replaces secrets (configured patterns and known secret values) with a marker."""

    def __init__(self, patterns: Iterable[str] = (), secret_values: Iterable[str] = ()) -> None:
        # The built-in shapes run as one alternation: one pass over each string, not nine.
        self._builtin = re.compile("|".join(f"(?:{_scoped(p)})" for p in BUILTIN_PATTERNS))
        # Configured patterns are arbitrary regexes: no prefilter can vouch for them.
        self._configured = [re.compile(p) for p in patterns]
        self._values = tuple(sorted({v for v in secret_values if len(v) >= 4}, key=len))
        # Longest first, so a value wins over its own prefix.
        self._value_pattern = (
            re.compile("|".join(re.escape(v) for v in reversed(self._values)))
            if self._values
            else None
        )
        self._cached = lru_cache(maxsize=_CACHE_SIZE)(self._fresh)

    def text(self, value: str) -> str:
        """Return `value` with every secret replaced."""
        if len(value) < 4:  # too short to hold any secret shape or value
            return value
        if len(value) <= _CACHED_LENGTH:
            return self._cached(value)
        return self._fresh(value)

    def slow_text(self, value: str) -> str:
        """`text` without the prefilter and the cache: every pattern over `value`, the
        definition `text` must agree with (the tests and bench/redaction.py compare them)."""
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
        if self._value_pattern is not None and any(v in value for v in self._values):
            value = self._value_pattern.sub(_replace, value)
        return value


def _scoped(pattern: str) -> str:
    """Turn a leading global `(?i)` into a scoped `(?i:...)` so patterns can be joined."""
    if pattern.startswith("(?i)"):
        return f"(?i:{pattern[4:]})"
    return pattern
