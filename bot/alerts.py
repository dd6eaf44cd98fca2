"""Alert cards in the incident chat: what fired, the runbook and params loom-ops proposes,
and [▶ Start] [Ignore] [Silence 1h]; and what a tap on them does.

A card is sent through the outbox (kind `alert`) once and edited in place as its incident
changes (a re-fire, the resolve, a start, an ignore, a silence), always rendered from the
store. Its buttons carry the incident's number and a choice (`al:<id>:s`); a tap is judged
again in the store, so buttons keep working after a restart and a stale one changes nothing.
Who may tap: whoever may start the runbook (`starters`; without them, anyone in the chat).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable

from markupsafe import Markup
from telegram import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    Update,
    User,
)
from telegram.ext import Application, CallbackQueryHandler, ContextTypes

from agent.errors import LoomOpsError
from agent.records import AlertState
from agent.service.alerts import AlertCard, AlertService
from agent.service.runs import RunService
from bot.messages import clip, hhmm, status_words

log = logging.getLogger(__name__)

CALLBACK_PREFIX = "al"
START, IGNORE, SILENCE = "s", "i", "m"
_CALLBACK = re.compile(rf"^{CALLBACK_PREFIX}:([0-9]{{1,15}}):([{START}{IGNORE}{SILENCE}])$")
MAX_ANSWER_CHARS = 200
SHOWN_LABELS = 6  # labels a card lists (the rest are in the trace)


def callback_data(incident_id: int, choice: str) -> str:
    """A card button's payload: `al:<incident>:<choice>` (at most 64 bytes)."""
    return f"{CALLBACK_PREFIX}:{incident_id}:{choice}"


def parse_callback_data(data: str) -> tuple[int, str] | None:
    """(incident id, choice) of a card button, or None for anything else."""
    match = _CALLBACK.match(data)
    return (int(match.group(1)), match.group(2)) if match else None


def card_text(card: AlertCard, now: float) -> str:
    """The card as it stands: what fired, what is proposed, and what became of it."""
    incident = card.incident
    firing = "resolved" if incident.status == "resolved" else f"{incident.firing} firing"
    lines = [
        Markup("🚨 <b>{}</b> — {} (since {})").format(
            incident.alertname, firing, hhmm(incident.first_at)
        )
    ]
    labels = [f"{k}={v}" for k, v in sorted(incident.labels.items()) if k != "alertname"]
    if labels:
        lines.append(Markup("<code>{}</code>").format(clip(" ".join(labels[:SHOWN_LABELS]), 300)))
    summary = incident.annotations.get("summary") or incident.annotations.get("description")
    if summary:
        lines.append(Markup("<i>{}</i>").format(clip(summary, 300)))
    params = " ".join(f"{k}={v}" for k, v in sorted(incident.params.items())) or "none"
    lines += [
        "",
        Markup("Runbook: <b>{}</b> — {}").format(
            incident.runbook_id, clip(card.runbook_title, 120)
        ),
        Markup("Params: <code>{}</code>").format(clip(params, 300)),
    ]
    lines += _what_happened(card)
    return str(Markup("\n").join(lines))


def _what_happened(card: AlertCard) -> list[Markup]:
    incident = card.incident
    lines: list[Markup] = []
    decided = hhmm(incident.decided_at) if incident.decided_at else ""
    match incident.state:
        case AlertState.PROPOSED if incident.is_open and incident.start_refused:
            lines.append(
                Markup(
                    "Not started on its own: {}. Nothing runs until someone taps ▶ Start."
                ).format(clip(incident.start_refused, 200))
            )
        case AlertState.PROPOSED if incident.is_open:
            lines.append(Markup("Nothing runs until someone taps ▶ Start."))
        case AlertState.PROPOSED:
            lines.append(Markup("Not started."))
        case AlertState.IGNORED:
            lines.append(
                Markup("Ignored by {} at {}.").format(card.name(incident.decided_by or ""), decided)
            )
        case AlertState.STARTED:
            who = (
                "on its own (start: auto)"
                if incident.decided_by == "auto"
                else f"by {card.name(incident.decided_by or '')}"
            )
            status = f": {status_words(card.run.status)}" if card.run else ""
            lines.append(
                Markup("▶ Started {} at {}: run <code>{}</code>{}.").format(
                    who, decided, incident.run_id, status
                )
            )
    if incident.notifications > 1 and incident.status == "firing":
        lines.append(
            Markup("Fired again at {}: {} alert(s) firing ({} notifications).").format(
                hhmm(incident.last_at), incident.firing, incident.notifications
            )
        )
    if incident.silence_id and incident.silenced_until:
        lines.append(
            Markup("🔕 Silenced by {} until {} (silence <code>{}</code>).").format(
                card.name(incident.silenced_by or ""),
                hhmm(incident.silenced_until),
                incident.silence_id,
            )
        )
    if incident.resolved_at is not None and incident.status == "resolved":
        lines.append(Markup("✅ {}").format(resolved_line(card)))
    return ["", *lines] if lines else []


def resolved_line(card: AlertCard) -> str:
    """`resolved at 05:12, 3 min after the scale-out (step scale)`, or after it fired."""
    incident = card.incident
    resolved = incident.resolved_at or incident.last_at
    if card.mitigation is not None:
        after = _minutes(resolved - card.mitigation.ts)
        what = card.mitigation.title or card.mitigation.step_id
        return (
            f"Resolved at {hhmm(resolved)}, {after} after {what} (step {card.mitigation.step_id})."
        )
    return f"Resolved at {hhmm(resolved)}, {_minutes(resolved - incident.first_at)} after it fired."


def _minutes(seconds: float) -> str:
    minutes = round(max(0.0, seconds) / 60)
    return "under a minute" if minutes < 1 else f"{minutes} min"


def card_buttons(card: AlertCard) -> InlineKeyboardMarkup | None:
    """Start and Ignore while the card asks; Silence 1h while it fires unsilenced (with
    LOOM_OPS_ALERTMANAGER_URL); none once nothing is left to decide."""
    incident = card.incident
    row = []
    if incident.state == AlertState.PROPOSED and incident.is_open:
        row += [
            InlineKeyboardButton("▶ Start", callback_data=callback_data(incident.id, START)),
            InlineKeyboardButton("Ignore", callback_data=callback_data(incident.id, IGNORE)),
        ]
    silenced = incident.silenced_until is not None and incident.silenced_until > time.time()
    if card.can_silence and incident.status == "firing" and incident.is_open and not silenced:
        row.append(
            InlineKeyboardButton("🔕 Silence 1h", callback_data=callback_data(incident.id, SILENCE))
        )
    return InlineKeyboardMarkup([row]) if row else None


class AlertTaps:
    """The handler of alert card buttons, over the service; `remember` records how a
    Telegram user is shown and gives their identity (the chat's handlers' own)."""

    def __init__(
        self,
        service: RunService,
        allowed_chat_ids: frozenset[int],
        remember: Callable[[User], Awaitable[str]],
    ) -> None:
        self._alerts = AlertService(service)
        self._allowed = allowed_chat_ids
        self._remember = remember

    def register(self, application: Application) -> None:  # type: ignore[type-arg]
        """Add the handler (before the catch-all button handler)."""
        application.add_handler(
            CallbackQueryHandler(self.tap, pattern=f"^{CALLBACK_PREFIX}:[0-9]+:")
        )

    async def tap(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A tap on an alert card: answered with what it did, or why it did nothing."""
        query = update.callback_query
        assert query is not None
        try:
            text, alert, silencing = await self._judge(query)
        except LoomOpsError as exc:
            log.info("alert card tap by telegram:%s refused: %s", query.from_user.id, exc)
            text, alert, silencing = str(exc), True, None
        # Answered before Alertmanager is asked: a slow one must not make the tap too old.
        await query.answer(clip(text, MAX_ANSWER_CHARS), show_alert=alert)
        if silencing is not None:
            await silencing()

    async def _judge(
        self, query: CallbackQuery
    ) -> tuple[str, bool, Callable[[], Awaitable[None]] | None]:
        """What to answer the tap, whether as an alert, and the silence still to ask for."""
        card = query.message if isinstance(query.message, Message) else None
        parsed = parse_callback_data(query.data or "")
        if card is None or card.chat.id not in self._allowed or parsed is None:
            return "This chat is not served by this loom-ops bot.", True, None
        incident_id, choice = parsed
        identity = await self._remember(query.from_user)
        chat_id = card.chat.id
        if choice == START:
            run = await self._alerts.start(incident_id, chat_id, identity)
            return f"Started: run {run.id}.", False, None
        if choice == IGNORE:
            await self._alerts.ignore(incident_id, chat_id, identity)
            return "Ignored; nothing was started.", False, None
        await self._alerts.may_silence(incident_id, chat_id, identity)
        silencing = functools.partial(self._silence, card, incident_id, identity)
        return "Asking Alertmanager to silence it for 1 h…", False, silencing

    async def _silence(self, card: Message, incident_id: int, identity: str) -> None:
        """Ask Alertmanager for the silence: the card is edited with it (through the
        outbox); a failure is said in a reply to the card."""
        try:
            await self._alerts.silence(incident_id, card.chat.id, identity)
        except LoomOpsError as exc:
            log.info("silence of alert incident #%s failed: %s", incident_id, exc)
            await card.reply_text(clip(f"🔕 Not silenced: {exc}", MAX_ANSWER_CHARS))
