"""Secret redaction: applied by the kernel to everything it journals or shows a policy."""

from __future__ import annotations

import re
from collections.abc import Iterable
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


def _replace(match: re.Match[str]) -> str:
    if "secret" in match.re.groupindex and match.group("secret") is not None:
        start, end = match.span("secret")
        whole_start = match.start()
        text = match.group(0)
        return text[: start - whole_start] + REDACTED + text[end - whole_start :]
    return REDACTED


class Redactor:
    """Replaces secrets (configured patterns and known secret values) with a marker."""

    def __init__(self, patterns: Iterable[str] = (), secret_values: Iterable[str] = ()) -> None:
        # The built-in shapes run as one alternation: one pass over each string, not nine.
        builtin = "|".join(f"(?:{_scoped(p)})" for p in BUILTIN_PATTERNS)
        compiled = [re.compile(builtin), *(re.compile(p) for p in patterns)]
        values = sorted({v for v in secret_values if len(v) >= 4}, key=len, reverse=True)
        if values:
            compiled.append(re.compile("|".join(re.escape(v) for v in values)))
        self._patterns = compiled

    def text(self, value: str) -> str:
        """Return `value` with every secret replaced."""
        if len(value) < 4:  # too short to hold any secret shape or value
            return value
        for pattern in self._patterns:
            value = pattern.sub(_replace, value)
        return value

    def data(self, value: Any) -> Any:
        """Redact every string inside a JSON-like structure (keys included)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.data(k): self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        return value


def _scoped(pattern: str) -> str:
    """Turn a leading global `(?i)` into a scoped `(?i:...)` so patterns can be joined."""
    if pattern.startswith("(?i)"):
        return f"(?i:{pattern[4:]})"
    return pattern
