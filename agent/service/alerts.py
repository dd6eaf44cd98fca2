"""AlertService: what front ends call with an alert notification or a tap on its card.

A notification is matched against the runbooks' `alerts` routes (the first route of the first
runbook, in catalog order, that matches the group's labels), its params rendered from the
alert, and recorded as its group's incident (one open incident, so one run, per group). An
`auto` route starts the run at once; an `ask` route leaves it to the incident chat, whose card
offers Start, Ignore and (with LOOM_OPS_ALERTMANAGER_URL) Silence 1h. A notification no
runbook answers is logged and counted, never journaled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import httpx

from agent.errors import (
    ErrorKind,
    LoomOpsError,
    ParamError,
    RenderError,
    RunExists,
    RunNotFound,
    ServiceError,
)
from agent.events import ToolIntent, ToolOutcome, parse
from agent.records import (
    AlertIncident,
    AlertNotice,
    AlertState,
    Origin,
    RunRecord,
    RunTree,
)
from agent.service.runs import RunService
from agent.store.alerts import UNMATCHED, Intake, NewAlert

if TYPE_CHECKING:  # the runbook model is loaded with the catalog, on first use
    from agent.runbook.model import AlertRoute, Runbook

log = logging.getLogger(__name__)

SILENCE_SECONDS = 3600
ALERTMANAGER_TIMEOUT = 10.0
# A run id is this, a digest of the group's key, and the incident's number: `al-3f9a1b-12`.
RUN_PREFIX = "al-"


@dataclass(frozen=True)
class AlertAnswer:
    """What came of one notification, for the sender: an outcome word, one line, and the
    incident, runbook and run it concerns."""

    outcome: str  # opened, updated, resolved, unchanged, unmatched or refused
    message: str
    incident_id: int | None = None
    runbook_id: str | None = None
    run_id: str | None = None
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Mitigation:
    """The last gated step (one a person approved) that succeeded before the alert
    resolved: what mitigated it, as the post-mortem counts it."""

    step_id: str
    title: str
    at: float


@dataclass(frozen=True)
class AlertCard:
    """What an alert card shows: the incident, its runbook's title, its run (once started),
    the step that mitigated it (once resolved), and how people are named."""

    incident: AlertIncident
    runbook_title: str
    run: RunRecord | None
    mitigation: Mitigation | None
    names: dict[str, str]
    can_silence: bool

    def name(self, identity: str) -> str:
        """How people know an identity (`@bob`); an unknown one as it is."""
        return self.names.get(identity, identity)


def notice_digest(notice: AlertNotice) -> str:
    """A digest of what a notification says (its alerts with their status and times, its
    labels and annotations): the same webhook delivered twice has the same digest."""
    content = {
        "status": notice.status,
        "labels": dict(notice.labels),
        "annotations": dict(notice.annotations),
        "alerts": sorted(
            [
                alert.fingerprint,
                alert.status,
                dict(alert.labels),
                dict(alert.annotations),
                alert.starts_at,
                alert.ends_at,
            ]
            for alert in notice.alerts
        ),
    }
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def group_digest(notice: AlertNotice) -> str:
    """The store's key of a notification's group: its source and the sender's group key."""
    return hashlib.sha256(f"{notice.source}\x00{notice.group_key}".encode()).hexdigest()


class AlertService:
    """Alert intake and the incident chat's decisions, over one RunService."""

    def __init__(self, runs: RunService) -> None:
        self._runs = runs
        self._store = runs.store
        self._settings = runs.settings

    async def receive(self, notice: AlertNotice, caller: str) -> AlertAnswer:
        """Record one notification from `caller` (the webhook's identity) and start the run
        of a new incident whose route says `start: auto` (as `caller`)."""
        match = self._route(notice)
        if match is None:
            log.info(
                "no runbook answers alert %s (%s, %s)",
                notice.alertname,
                notice.source,
                _labels(notice.labels),
            )
            await self._store.count_unmatched_alert()
            return AlertAnswer(
                UNMATCHED, f"no runbook answers this alert ({_labels(notice.labels, 200)})"
            )
        runbook, route = match
        try:
            params = await asyncio.to_thread(route.render_params, notice.labels, notice.annotations)
            runbook.resolve_params(params)
        except (RenderError, ParamError) as exc:
            log.warning("alert %s cannot start %s: %s", notice.alertname, runbook.id, exc)
            return AlertAnswer(
                "refused",
                f"runbook {runbook.id} answers this alert, but {exc}",
                runbook_id=runbook.id,
            )
        chat_id = self._settings.alert_chat()
        if route.start == "ask" and chat_id is None:
            log.warning(
                "alert %s: no incident chat to ask (TELEGRAM_ALERT_CHAT_ID)", notice.alertname
            )
        group = group_digest(notice)
        receipt = await self._store.receive_alert(
            NewAlert(
                notice=notice,
                digest=notice_digest(notice),
                group_key=group,
                runbook_id=runbook.id,
                params=params,
                start_mode=route.start,
                chat_id=chat_id,
                run_prefix=f"{RUN_PREFIX}{group[:6]}-",
            )
        )
        incident = receipt.incident
        if incident is None:
            return AlertAnswer(str(receipt.intake), "resolved; no incident of it was open")
        if incident.state == AlertState.STARTED:
            await self._ensure_run(incident, caller)
        return AlertAnswer(
            str(receipt.intake),
            _said(receipt.intake, incident),
            incident_id=incident.id,
            runbook_id=incident.runbook_id,
            run_id=incident.run_id if incident.state == AlertState.STARTED else None,
            params=dict(incident.params),
        )

    def _route(self, notice: AlertNotice) -> tuple[Runbook, AlertRoute] | None:
        """The first runbook (catalog order) with a route matching the group's labels."""
        for runbook in self._runs.catalog().runbooks.values():
            route = runbook.alert_route(notice.labels)
            if route is not None:
                return runbook, route
        return None

    async def _ensure_run(self, incident: AlertIncident, requester: str) -> RunRecord:
        """The started incident's run, created now if it is not yet (an `auto` start, or a
        start a crash interrupted), and its alert journaled on it."""
        try:
            run = await self._runs.get(incident.run_id)
        except RunNotFound:
            try:
                run = await self._runs.start(
                    incident.run_id,
                    _request(incident),
                    role="runbook",
                    requested_by=requester,
                    origin=Origin(kind="alert", chat_id=incident.chat_id),
                    wait=False,
                    capped=True,
                )
            except RunExists:  # another delivery started it a moment ago
                run = await self._runs.get(incident.run_id)
        await self._store.alert_run_started(incident.id, incident.decided_by or requester)
        return run

    # -- the incident chat ------------------------------------------------------------------

    async def incident(self, incident_id: int, chat_id: int | None = None) -> AlertIncident:
        """An incident (of chat `chat_id` when given); ServiceError (not found) otherwise."""
        try:
            incident = await self._store.alert_incident(incident_id)
        except LoomOpsError as exc:
            raise ServiceError(str(exc), kind=ErrorKind.NOT_FOUND) from None
        if chat_id is not None and incident.chat_id != chat_id:
            raise ServiceError("no such alert in this chat", kind=ErrorKind.NOT_FOUND)
        return incident

    async def incident_of_run(self, run_id: str) -> AlertIncident | None:
        """The alert incident a run answers (its first notification, resolve and silence
        times), if it answers one."""
        return await self._store.alert_incident_of_run(run_id)

    async def start(self, incident_id: int, chat_id: int, person: str) -> RunRecord:
        """Start a proposed incident's run as `person` (who must be allowed to start its
        runbook); a second start finds the run the first one started."""
        incident = await self.incident(incident_id, chat_id)
        if incident.state == AlertState.IGNORED:
            raise ServiceError(
                f"ignored by {incident.decided_by}; nothing started", kind=ErrorKind.CONFLICT
            )
        if incident.state == AlertState.PROPOSED and not incident.is_open:
            raise ServiceError(
                "this alert resolved before anyone started it", kind=ErrorKind.CONFLICT
            )
        self._runs.check_starter(_request(incident), person)
        return await self._ensure_run(incident, person)

    async def ignore(self, incident_id: int, chat_id: int, person: str) -> AlertIncident:
        """Close a proposed incident's card as ignored by `person` (who may start it)."""
        incident = await self.incident(incident_id, chat_id)
        self._runs.check_starter(_request(incident), person)
        ignored = await self._store.ignore_alert(incident.id, person)
        if ignored is None:
            now = await self.incident(incident_id)
            raise ServiceError(f"already {now.state} by {now.decided_by}", kind=ErrorKind.CONFLICT)
        return ignored

    async def silence(self, incident_id: int, chat_id: int, person: str) -> AlertIncident:
        """Silence the incident's alert group in Alertmanager for an hour, created by
        `person` (who may start its runbook), and record it. No store transaction is open
        while Alertmanager is asked."""
        url = self._settings.alertmanager_url
        if not url:
            raise ServiceError("LOOM_OPS_ALERTMANAGER_URL is not set: no silences from here")
        incident = await self.incident(incident_id, chat_id)
        self._runs.check_starter(_request(incident), person)
        now = time.time()
        if incident.silenced_until is not None and incident.silenced_until > now:
            raise ServiceError(
                f"already silenced by {incident.silenced_by}", kind=ErrorKind.CONFLICT
            )
        until = now + SILENCE_SECONDS
        body = {
            "matchers": [
                {"name": name, "value": value, "isRegex": False, "isEqual": True}
                for name, value in sorted(incident.matchers.items())
            ],
            "startsAt": _rfc3339(now),
            "endsAt": _rfc3339(until),
            "createdBy": person,
            "comment": f"loom-ops: silenced from the incident chat: {incident.alertname} "
            f"(alert incident #{incident.id}, runbook {incident.runbook_id})",
        }
        try:
            async with httpx.AsyncClient(timeout=ALERTMANAGER_TIMEOUT) as client:
                answer = await client.post(f"{url.rstrip('/')}/api/v2/silences", json=body)
            answer.raise_for_status()
            silence_id = str(answer.json()["silenceID"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ServiceError(
                f"Alertmanager at {url} did not create the silence: {_first_line(exc)}",
                kind=ErrorKind.UNAVAILABLE,
            ) from None
        return await self._store.record_silence(incident.id, silence_id, person, until)

    async def record_card(self, incident_id: int, message_id: int) -> None:
        """Remember the chat message that is the incident's card."""
        await self._store.record_alert_card(incident_id, message_id)

    async def card(self, incident_id: int) -> AlertCard:
        """What the incident's card shows now."""
        incident = await self.incident(incident_id)
        try:
            title = self._runs.catalog().get(incident.runbook_id).title
        except (KeyError, LoomOpsError):
            title = ""
        run: RunRecord | None = None
        mitigation = None
        identities = [i for i in (incident.decided_by, incident.silenced_by) if i]
        names: dict[str, str] = {}
        if incident.state == AlertState.STARTED:
            try:
                tree = await self._runs.run_tree(incident.run_id, calls=False, events=True)
            except RunNotFound:
                tree = None
            if tree is not None:
                run = tree.root
                names = dict(tree.names)
                if incident.resolved_at is not None:
                    mitigation = _mitigation(tree, incident.resolved_at)
        if any(identity not in names for identity in identities):
            names.update(await self._store.display_names(identities))
        return AlertCard(
            incident=incident,
            runbook_title=title,
            run=run,
            mitigation=mitigation,
            names=names,
            can_silence=bool(self._settings.alertmanager_url),
        )


def _request(incident: AlertIncident) -> str:
    """The request an incident's run runs: its runbook named outright, with its params."""
    params = " ".join(f"{name}={shlex.quote(value)}" for name, value in incident.params.items())
    return f"runbook={incident.runbook_id} {params} alert: {incident.alertname}".replace("  ", " ")


def _mitigation(tree: RunTree, before: float) -> Mitigation | None:
    """The last gated step (`approval` other than none) that succeeded before `before`,
    from the tree's journal."""
    intents: dict[str, ToolIntent] = {}
    found: Mitigation | None = None
    runbooks = {run.id: run.runbook or {} for run in tree.runs}
    for record in tree.events:
        if record.ts > before:
            break
        event = parse(record)
        if isinstance(event, ToolIntent):
            intents[event.call_key] = event
        elif isinstance(event, ToolOutcome) and event.status == "ok":
            intent = intents.get(event.call_key)
            if intent is None or intent.tool != "execute_step" or not intent.step_id:
                continue
            steps = runbooks.get(record.run_id, {}).get("steps") or []
            step = next((s for s in steps if s.get("id") == intent.step_id), None)
            if step is None or step.get("approval", "none") == "none":
                continue  # a read, or a step nobody had to approve: not what mitigated it
            found = Mitigation(intent.step_id, str(step.get("title") or ""), record.ts)
    return found


def _said(intake: Intake, incident: AlertIncident) -> str:
    """One line for the sender about what a notification did."""
    run = f"run {incident.run_id}" if incident.state == AlertState.STARTED else "no run yet"
    match intake:
        case Intake.OPENED if incident.state == AlertState.STARTED:
            return f"incident #{incident.id}: {incident.runbook_id} started ({run})"
        case Intake.OPENED:
            return f"incident #{incident.id}: {incident.runbook_id} proposed to the chat"
        case Intake.UPDATED:
            return f"incident #{incident.id} updated: {incident.firing} firing ({run})"
        case Intake.RESOLVED:
            return f"incident #{incident.id} resolved ({run})"
        case _:
            return f"incident #{incident.id}: seen before; nothing changed"


def _labels(labels: Mapping[str, str], limit: int = 120) -> str:
    text = " ".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
