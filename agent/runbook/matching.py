"""Which runbook a request means: the one it names outright, or the best match of its words
against each runbook's id, triggers and title. Pure functions of the catalog and the request:
the mock policy plans with them, the CLI and the chat use them to say what a request will run
before anything starts."""

from __future__ import annotations

import re

from agent.errors import RequestError
from agent.runbook.model import Runbook, RunbookCatalog
from agent.runbook.request import ParsedRequest

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def match_runbook(catalog: RunbookCatalog, text: str) -> Runbook | None:
    """The runbook whose id, triggers and title best match the request text, if any."""
    ranked = rank_runbooks(catalog, text)
    return ranked[0] if ranked else None


def rank_runbooks(catalog: RunbookCatalog, text: str) -> list[Runbook]:
    """Every runbook that matches the request text at all, best match first (ties by id)."""
    lowered = text.lower()
    words = _words(text)
    scored: list[tuple[int, str]] = []
    for runbook in catalog.runbooks.values():
        score = 0
        if runbook.id in lowered:
            score += 100
        for trigger in runbook.triggers:
            trigger_words = _words(trigger)
            if trigger_words and (trigger.lower() in lowered or trigger_words <= words):
                score += 10 * len(trigger_words)
        # Title words count only when they carry meaning ("latency", not "the").
        score += len({w for w in _words(runbook.title) if len(w) >= 4} & words)
        if score > 0:
            scored.append((score, runbook.id))
    scored.sort(reverse=True)
    return [catalog.runbooks[runbook_id] for _, runbook_id in scored]


def exact_runbook(catalog: RunbookCatalog, parsed: ParsedRequest) -> Runbook | None:
    """The runbook a request names outright: `runbook=<id>`, or an id as its first word.

    None when it only describes an incident: then the runbook is a guess (`match_runbook`),
    which is never enough to start live actions without a person confirming it."""
    if parsed.runbook is not None:
        return catalog.runbooks.get(parsed.runbook)
    words = parsed.text.split(maxsplit=1)
    return catalog.runbooks.get(words[0]) if words else None


def choose_runbook(catalog: RunbookCatalog, parsed: ParsedRequest, request: str) -> Runbook:
    """The runbook a request names (`runbook=<id>`, or an id as its first word) or, failing
    that, matches best; raises RequestError (one line) for an unknown id or no match."""
    if parsed.runbook is not None:
        runbook = catalog.runbooks.get(parsed.runbook)
        if runbook is None:
            known = ", ".join(sorted(catalog.runbooks)) or "none"
            raise RequestError(f"unknown runbook {parsed.runbook[:80]!r} (known: {known})")
        return runbook
    # An id as the first word wins outright, as exact_runbook promises (no scoring).
    runbook = exact_runbook(catalog, parsed) or match_runbook(catalog, parsed.text or request)
    if runbook is None:
        raise RequestError(_no_match(parsed.text or request, catalog))
    return runbook


def _no_match(text: str, catalog: RunbookCatalog) -> str:
    known = ", ".join(sorted(catalog.runbooks)) or "none"
    message = f"no runbook matches {text[:80]!r} (known: {known})"
    if catalog.errors:
        message += f"; {len(catalog.errors)} invalid runbook file(s), first: {catalog.errors[0]}"
    return message
