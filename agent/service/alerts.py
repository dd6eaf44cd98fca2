"""AlertService: what front ends call with an alert notification or a tap on its card.

A notification is matched against the runbooks' `alerts` routes (the first route of the first
runbook, in catalog order, that matches the group's labels), its params rendered from the
alert, and recorded as its group's incident (one open incident, so one run, per group). An
`auto` route starts the run at once; an `ask` route leaves it to the incident chat, whose card
offers Start, Ignore and (with LOOM_OPS_ALERTMANAGER_URL) Silence 1h. A notification no
runbook answers is logged and counted, never journaled.

A run gets exactly its route's rendered params: its request names the runbook and each
param, every value quoted, and the alert's name only as quoted text no parser reads as a
param. An `auto` start that is refused (its starters, its request, the active-run cap)
leaves the incident proposed with the reason, so a person can still start it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shlex
import time
from collections.abc import Mapping
from dataclasses import field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import httpx

from agent.errors import (
    ErrorKind,
    LoomOpsError,
    ParamError,
    RenderError,
    RequestError,
    RunExists,
    RunNotFound,
    ServiceError,
    TooManyRuns,
)
from agent.records import (
    AlertIncident,
    AlertNotice,
    AlertState,
    Origin,
    RunRecord,
    record,
)
from agent.runbook.request import parse_request
from agent.service.runs import RunService
from agent.store.alerts import UNMATCHED, Intake, NewAlert
from agent.views.mitigation import Mitigation, mitigation_of

if TYPE_CHECKING:  # the runbook model is loaded with the catalog, on first use
    from agent.runbook.model import AlertRoute, Runbook

log = logging.getLogger(__name__)

SILENCE_SECONDS = 3600
ALERTMANAGER_TIMEOUT = 10.0  # seconds for the whole silence call, however the server drips
MAX_ALERT_TEXT = 200  # characters of the alert's name a run's request quotes
REFUSED = "refused"  # the outcome of a notification whose run may not start
# A run id is this, a digest of the group's key, and the incident's number: `al-3f9a1b-12`.
RUN_PREFIX = "al-"


@record
class AlertAnswer:
    """What came of one notification, for the sender: an outcome word, one line, and the
    incident, runbook and run it concerns."""

    outcome: str  # opened, updated, resolved, unchanged, unmatched or refused
    message: str
    incident_id: int | None = None
    runbook_id: str | None = None
    run_id: str | None = None
    params: dict[str, str] = field(default_factory=dict)


@record
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
        of a new incident whose route says `start: auto` (as `caller`); a start refused
        leaves the incident proposed and answers `refused` with the reason."""
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
            request = run_request(runbook.id, params, notice.alertname)
        except (RenderError, ParamError, RequestError) as exc:
            log.warning("alert %s cannot start %s: %s", notice.alertname, runbook.id, exc)
            return AlertAnswer(
                REFUSED,
                f"runbook {runbook.id} answers this alert, but {exc}",
                runbook_id=runbook.id,
            )
        # What can be checked before the incident is recorded as started by its route.
        refusal = self._start_refusal(request, caller) if route.start == "auto" else None
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
                refusal=refusal,
            )
        )
        incident = receipt.incident
        if incident is None:
            return AlertAnswer(str(receipt.intake), "resolved; no incident of it was open")
        refused = refusal if receipt.intake == Intake.OPENED and refusal else None
        if incident.state == AlertState.STARTED:
            try:
                await self._ensure_run(incident, caller)
            except (ServiceError, TooManyRuns) as exc:
                refused = _first_line(exc)
                log.warning("alert incident #%s: the run did not start: %s", incident.id, refused)
                incident = await self._store.alert_start_refused(incident.id, refused)
        return AlertAnswer(
            REFUSED if refused else str(receipt.intake),
            _refused(incident, refused) if refused else _said(receipt.intake, incident),
            incident_id=incident.id,
            runbook_id=incident.runbook_id,
            run_id=incident.run_id if incident.state == AlertState.STARTED else None,
            params=dict(incident.params),  # exactly the run's: run_request checks it
        )

    def _start_refusal(self, request: str, caller: str) -> str | None:
        """Why `caller` may not start `request` on an `auto` route (its starters), if not."""
        try:
            self._runs.check_starter(request, caller)
        except ServiceError as exc:
            return _first_line(exc)
        return None

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

    async def may_silence(self, incident_id: int, chat_id: int, person: str) -> AlertIncident:
        """The incident, when `person` (who may start its runbook) may silence it now;
        ServiceError (not configured, forbidden, already silenced) otherwise."""
        if not self._settings.alertmanager_url:
            raise ServiceError("LOOM_OPS_ALERTMANAGER_URL is not set: no silences from here")
        incident = await self.incident(incident_id, chat_id)
        self._runs.check_starter(_request(incident), person)
        if incident.silenced_until is not None and incident.silenced_until > time.time():
            raise ServiceError(
                f"already silenced by {incident.silenced_by}", kind=ErrorKind.CONFLICT
            )
        return incident

    async def silence(self, incident_id: int, chat_id: int, person: str) -> AlertIncident:
        """Silence the incident's alert group in Alertmanager for an hour, created by
        `person` (see may_silence), and record it. Alertmanager gets ALERTMANAGER_TIMEOUT
        seconds in all; no store transaction is open while it is asked."""
        incident = await self.may_silence(incident_id, chat_id, person)
        url = self._settings.alertmanager_url or ""
        now = time.time()
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
            # httpx's timeout is per read: a server dripping bytes would hold it for ever.
            async with (
                asyncio.timeout(ALERTMANAGER_TIMEOUT),
                httpx.AsyncClient(timeout=ALERTMANAGER_TIMEOUT) as client,
            ):
                answer = await client.post(f"{url.rstrip('/')}/api/v2/silences", json=body)
            answer.raise_for_status()
            silence_id = str(answer.json()["silenceID"])
        except TimeoutError:
            raise ServiceError(
                f"Alertmanager at {url} did not answer within {ALERTMANAGER_TIMEOUT:g} s",
                kind=ErrorKind.UNAVAILABLE,
            ) from None
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
                    mitigation = mitigation_of(tree, before=incident.resolved_at)
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


def run_request(runbook_id: str, params: Mapping[str, str], alertname: str) -> str:
    """The request a run of the alert runs: `runbook=<id>`, each param with its value quoted,
    and the alert's name as one quoted word of text (`'alert: HighLatency'`, never a param:
    a param word cannot hold a colon before its `=`). RequestError when the request would
    not give the run exactly these params (one too long, say)."""
    words = [f"runbook={shlex.quote(runbook_id)}"]
    words += [f"{name}={shlex.quote(value)}" for name, value in params.items()]
    words.append(shlex.quote(f"alert: {' '.join(alertname.split())[:MAX_ALERT_TEXT]}"))
    request = " ".join(words)
    parsed = parse_request(request)
    if parsed.runbook != runbook_id or parsed.params != dict(params):
        raise RequestError(f"the params {_labels(params)} do not make a request of their own")
    return request


def _request(incident: AlertIncident) -> str:
    """The request an incident's run runs (see run_request)."""
    return run_request(incident.runbook_id, incident.params, incident.alertname)


def _said(intake: Intake, incident: AlertIncident) -> str:
    """One line for the sender about what a notification did."""
    run = f"run {incident.run_id}" if incident.state == AlertState.STARTED else "no run yet"
    match intake:
        case Intake.OPENED if incident.state == AlertState.STARTED:
            return f"incident #{incident.id}: {incident.runbook_id} started ({run})"
        case Intake.OPENED if incident.chat_id is None:
            return (
                f"incident #{incident.id}: {incident.runbook_id} proposed, but no chat can start "
                "it: set TELEGRAM_ALERT_CHAT_ID, or give its route start: auto"
            )
        case Intake.OPENED:
            return f"incident #{incident.id}: {incident.runbook_id} proposed to the chat"
        case Intake.UPDATED:
            return f"incident #{incident.id} updated: {incident.firing} firing ({run})"
        case Intake.RESOLVED:
            return f"incident #{incident.id} resolved ({run})"
        case _:
            return f"incident #{incident.id}: seen before; nothing changed"


def _refused(incident: AlertIncident, reason: str) -> str:
    """One line for the sender about an `auto` start that was refused."""
    where = (
        "proposed to the chat"
        if incident.chat_id is not None
        else "no chat can start it (set TELEGRAM_ALERT_CHAT_ID)"
    )
    return f"incident #{incident.id}: {incident.runbook_id} not started: {reason}; {where}"


def _labels(labels: Mapping[str, str], limit: int = 120) -> str:
    text = " ".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
