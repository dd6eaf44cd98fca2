"""`/run` with free text: the runbook it would run, confirmed by a person before anything runs.

`/run <runbook id> …` or `runbook=<id>` names the runbook outright and starts at once. Any
other text is matched against the runbooks (the mock policy's matcher, best first) and answered
with a card: the runbook, its parameters and what it does, with [▶ Start] [✖ Cancel] (or one
button per candidate when several match). The card is a reply to the `/run` message, and its
buttons carry only an opaque key of the runbook id (`rs:<key>`): on a tap, the request is read
again from the `/run` message Telegram sends along, so a card works after a restart and needs
no table. The run id is derived from the `/run` message the card answers, so a second tap, or
a tap on a second card of the same `/run` (its update handled again), finds the run the first
started.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import field

from markupsafe import Markup

from agent.errors import RequestError
from agent.records import record
from agent.runbook.matching import exact_runbook, rank_runbooks
from agent.runbook.model import Runbook, RunbookCatalog, Step
from agent.runbook.request import parse_request
from bot.messages import clip

CALLBACK_PREFIX = "rs"
CANCEL_KEY = "x"
# Candidates a card offers when several runbooks match.
MAX_CHOICES = 3
KEY_CHARS = 12
# 48 bits of hash in a run id: a collision (which only costs the next attempt's id) stays
# rare after millions of `/run` messages, and `tg-` + 12 hex digits is still easy to type.
RUN_ID_HEX = 12
# Ids a `/run` tries, each after another run turned out to hold the one before.
START_ATTEMPTS = 5


@record
class Choice:
    """One runbook a request could run, with its parameters resolved."""

    runbook: Runbook
    params: dict[str, str | int | bool]
    given: frozenset[str]  # the params the person typed (the rest are defaults)

    @property
    def key(self) -> str:
        """The opaque key its Start button carries."""
        return runbook_key(self.runbook.id)


@record
class StartPlan:
    """What a `/run` text leads to: a start at once, a card to confirm, or why neither."""

    exact: bool = False  # names its runbook outright: start at once
    choices: list[Choice] = field(default_factory=list)
    problem: str | None = None  # one line for the person when nothing can start


def runbook_key(runbook_id: str) -> str:
    """A short opaque key of a runbook id (ids may be longer than a button's 64 bytes)."""
    return hashlib.sha256(runbook_id.encode("utf-8")).hexdigest()[:KEY_CHARS]


def plan_start(catalog: RunbookCatalog, text: str) -> StartPlan:
    """Read a `/run` text: exact when it names a runbook (first word or `runbook=<id>`),
    else the matching runbooks whose params fit, best first."""
    try:
        parsed = parse_request(text)
    except RequestError as exc:
        return StartPlan(problem=f"Cannot start the run: {exc}")
    if parsed.runbook is not None or exact_runbook(catalog, parsed) is not None:
        return StartPlan(exact=True)  # an unknown `runbook=` id is refused by the start
    ranked = rank_runbooks(catalog, parsed.text or text)
    if not ranked:
        known = ", ".join(sorted(catalog.runbooks)) or "none"
        return StartPlan(
            problem=f"No runbook matches {clip(parsed.text or text, 80)!r}. Name one: "
            f"/run <runbook id> [key=value …] (known: {known}; /runbooks lists them)."
        )
    choices: list[Choice] = []
    problems: list[str] = []
    for runbook in ranked:
        try:
            params = runbook.resolve_params(parsed.params)
        except ValueError as exc:  # ParamError: this runbook does not take these params
            problems.append(str(exc))
            continue
        choices.append(Choice(runbook, params, frozenset(parsed.params)))
        if len(choices) == MAX_CHOICES:
            break
    if not choices:
        return StartPlan(problem=f"Cannot start the run: {problems[0]}")
    return StartPlan(choices=choices)


def start_message(text: str, runbook_id: str) -> str:
    """The request a confirmed start runs: the person's words, with the runbook named
    outright, so the run does what the card said whatever matches the words later."""
    return f"{text} runbook={runbook_id}"


def start_run_id(chat_id: int, message_id: int, message_date: int, attempt: int) -> str:
    """The run id a `/run` message starts, at once or through any of its cards: one id for
    every handling of the message and every tap (a second one finds the first one's run);
    `attempt` moves past an id some other run has taken."""
    seed = f"{chat_id}:{message_id}:{message_date}:{attempt}".encode()
    return f"tg-{hashlib.sha256(seed).hexdigest()[:RUN_ID_HEX]}"


def callback_data(key: str) -> str:
    """A card button's payload: `rs:<key>` (at most 64 bytes, meaningless without the card)."""
    data = f"{CALLBACK_PREFIX}:{key}"
    assert len(data.encode()) <= 64
    return data


def parse_callback_data(data: str) -> str | None:
    """The key a card button carries (a runbook key, or CANCEL_KEY), or None."""
    prefix, _, key = data.partition(":")
    if prefix != CALLBACK_PREFIX:
        return None
    if key == CANCEL_KEY or (len(key) == KEY_CHARS and all(c in "0123456789abcdef" for c in key)):
        return key
    return None


def card_buttons(plan: StartPlan) -> list[list[tuple[str, str]]]:
    """(label, callback_data) rows: Start (one per candidate when several) and Cancel."""
    cancel = ("✖ Cancel", callback_data(CANCEL_KEY))
    if len(plan.choices) == 1:
        return [[("▶ Start", callback_data(plan.choices[0].key)), cancel]]
    rows = [
        [(clip(f"▶ {n}. {c.runbook.id}", 60), callback_data(c.key))]
        for n, c in enumerate(plan.choices, start=1)
    ]
    return [*rows, [cancel]]


Mode = Callable[[Step], str]


def card_text(plan: StartPlan, request: str, asked_by: str, mode_of: Mode) -> str:
    """The card: the runbook (or the candidates), its params, what it does and whether it
    acts for real; only a tap starts it."""
    lines: list[Markup] = []
    if len(plan.choices) == 1:
        lines.append(Markup("▶ <b>Start this runbook?</b> Nothing runs until you tap Start."))
    else:
        lines.append(
            Markup("❓ <b>Which runbook?</b> Several match; nothing runs until you pick one.")
        )
    for number, choice in enumerate(plan.choices, start=1):
        prefix = "" if len(plan.choices) == 1 else f"{number}. "
        lines += ["", *_describe(choice, prefix, mode_of)]
    lines += [
        "",
        Markup("Asked by {}: <i>{}</i>").format(asked_by, clip(request, 300)),
        Markup("Next time, <code>/run {} …</code> starts it at once.").format(
            plan.choices[0].runbook.id
        ),
    ]
    return str(Markup("\n").join(lines))


def _describe(choice: Choice, prefix: str, mode_of: Mode) -> list[Markup]:
    runbook = choice.runbook
    steps = runbook.steps
    gated = sum(1 for step in steps if step.needs_approval)
    acting = [s for s in steps if s.action_kind in ("run", "mcp")]
    live = [s for s in acting if mode_of(s) == "live"]
    if live:
        mode = Markup("🔴 <b>LIVE</b>: {} of {} steps act for real").format(len(live), len(steps))
    else:
        mode = Markup("🧪 <b>DRY-RUN</b>: nothing is executed for real")
    given = [f"{k}={choice.params[k]}" for k in sorted(choice.params) if k in choice.given]
    default = [f"{k}={choice.params[k]}" for k in sorted(choice.params) if k not in choice.given]
    params = Markup(" ").join(Markup("<code>{}</code>").format(p) for p in given)
    if default:
        shown = clip(" ".join(default), 300)
        params += Markup("{}defaults: <code>{}</code>").format("; " if given else "", shown)
    return [
        Markup("{}<b>{}</b> — {}").format(prefix, runbook.id, clip(runbook.title, 120)),
        Markup("Params: {}").format(params or "none"),
        Markup("{} steps, {} · {}").format(len(steps), _gated(gated), mode),
    ]


def _gated(count: int) -> str:
    if count == 0:
        return "none needs approval"
    return f"{count} needs approval" if count == 1 else f"{count} need approval"
