"""Which runbook a request means: the one it names outright, or the best match of its words
against each runbook's id, triggers and title. Pure functions of the catalog and the request:
the mock policy plans with them, the service, the CLI and the chat use them to say what a
request will run before anything starts."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from agent.errors import RequestError
from agent.records import record
from agent.runbook.model import Runbook, RunbookCatalog
from agent.runbook.request import ParsedRequest, parse_request

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
        return runbook_named(catalog, parsed.runbook)
    words = parsed.text.split(maxsplit=1)
    # The first word only as written: a sentence's capital ("Restart is what everyone
    # says, but …") would otherwise name a one-word id out of prose and start it live.
    return catalog.runbooks.get(words[0]) if words else None


def runbook_named(catalog: RunbookCatalog, name: str) -> Runbook | None:
    """The runbook a `runbook=<id>` word names, in any case: `runbook=Disk-Almost-Full`
    names disk-almost-full (ids are lowercase ASCII slugs, so no two differ only in case).
    Only ASCII folds: a lookalike such as the Kelvin sign, which lowercases to `k`, names
    nothing."""
    return catalog.runbooks.get(name.lower() if name.isascii() else name)


@record
class Guess:
    """What a request that names no runbook would run: the runbook its words match best (None
    when none does), with its params resolved (the defaults filled in)."""

    runbook: Runbook | None
    params: dict[str, str | int | bool]

    def named(self) -> str:
        """The request that names exactly this guess: the runbook's id, then every param."""
        assert self.runbook is not None
        return " ".join(shlex.quote(word) for word in [self.runbook.id, *self._param_words()])

    def params_text(self) -> str:
        """The params as `key=value` words, or "no params"."""
        return " ".join(self._param_words()) or "no params"

    def _param_words(self) -> list[str]:
        return [f"{k}={_param_text(v)}" for k, v in self.params.items()]


def guess_of(catalog: RunbookCatalog, request: str) -> Guess | None:
    """None when the request names a runbook of the catalog outright; else what a start from
    its words would guess. A live run never starts from a guess unless a person confirmed it
    (ParamError, a ValueError, for params the guessed runbook refuses)."""
    parsed = parse_request(request)
    if exact_runbook(catalog, parsed) is not None:
        return None
    runbook = match_runbook(catalog, parsed.text or request)
    if runbook is None:
        return Guess(None, {})
    return Guess(runbook, runbook.resolve_params(parsed.params))


def live_guess_refusal(
    live: Sequence[str], catalog: RunbookCatalog, request: str
) -> tuple[str, Guess] | None:
    """With a live switch on (`live`, the settings that make it so) and a request that names
    no runbook: why the start is refused, in front-end-neutral words (a front end adds how to
    name the runbook or confirm the guess in its own terms), and the guess; else None."""
    guess = guess_of(catalog, request) if live else None
    if guess is None:
        return None
    said = f"{' '.join(request.split())[:60]!r}"
    if guess.runbook is None:
        known = ", ".join(sorted(catalog.runbooks)) or "none"
        why = (
            f"not starting a live run ({', '.join(live)}): {said} names no runbook (known: {known})"
        )
    else:
        why = (
            f"not starting a live run ({', '.join(live)}) from a guess: {said} matched runbook "
            f"{guess.runbook.id} with {guess.params_text()}"
        )
    return why, guess


def _param_text(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def choose_runbook(catalog: RunbookCatalog, parsed: ParsedRequest, request: str) -> Runbook:
    """The runbook a request names (`runbook=<id>`, or an id as its first word) or, failing
    that, matches best; raises RequestError (one line) for an unknown id or no match."""
    if parsed.runbook is not None:
        runbook = runbook_named(catalog, parsed.runbook)
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
