"""Parsing a request: free incident text plus `key=value` words that become runbook params.

`runbook=<id>` is not a param: it names the runbook outright (no matching on the text).
"""

from __future__ import annotations

import re
import shlex

from agent.errors import RequestError
from agent.records import record

PARAM_WORD = re.compile(r"^([a-z_][a-z0-9_]{0,31})=(.*)$", re.DOTALL)
MAX_REQUEST_BYTES = 4096
# The one `key=value` word that is not a runbook param: it names the runbook to run.
RUNBOOK_KEY = "runbook"


@record
class ParsedRequest:
    """The words of a request split into incident text and params."""

    text: str
    params: dict[str, str]
    runbook: str | None = None  # from `runbook=<id>`: the runbook named outright


def parse_request(message: str) -> ParsedRequest:
    """Split `message` into text and `key=value` params; quotes group words (`note="a b"`)."""
    try:
        size = len(message.encode("utf-8"))
    except UnicodeEncodeError:
        raise RequestError("message is not valid UTF-8") from None
    if size > MAX_REQUEST_BYTES:
        raise RequestError(f"message is longer than {MAX_REQUEST_BYTES} bytes")
    if "\x00" in message:
        raise RequestError("message contains a NUL character")
    try:
        words = shlex.split(message, posix=True)
    except ValueError as exc:  # unbalanced quotes
        raise RequestError(f"cannot parse message: {exc}") from None
    text_words: list[str] = []
    params: dict[str, str] = {}
    for word in words:
        match = PARAM_WORD.match(word)
        if match is None:
            text_words.append(word)
            continue
        key, value = match.group(1), match.group(2)
        if key in params:
            raise RequestError(f"parameter {key!r} is given twice")
        params[key] = value
    runbook = params.pop(RUNBOOK_KEY, None)
    return ParsedRequest(text=" ".join(text_words), params=params, runbook=runbook)
