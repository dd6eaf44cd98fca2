"""Alert incidents: one per alert group while it is open, the notifications it received, its
card in the incident chat and what people decided on it.

One incident, one run: the incident's `open_key` is its group's key while it is open, and
unique, so two deliveries of a new group at once open one incident (on PostgreSQL the later
transaction conflicts with the earlier one's row and runs again, finding it). Its run id is
fixed when it opens. A notification whose content any incident of its group received before
(a redelivered webhook, however late) is known by its digest and changes nothing; one without
the sender's start times (a generic alert) is a redelivery only while the group's latest
incident has received it and still says what it says, since nothing else tells a re-fire after
a resolve from a repeat. What happens
to an incident while its run is open is journaled on that run, in the same transaction; once
the run has ended its journal is left as its summary published it, and the incident row keeps
the rest (the resolve time).
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from agent.errors import ErrorKind, StoreError
from agent.events import AlertReceived, AlertResolved, AlertSilenced, AlertUpdated, Event
from agent.records import AlertIncident, AlertNotice, AlertState, ChatNotice, record
from agent.store.base import StoreBase
from agent.store.database import OUTBOX_CHANNEL, Connection, Row
from agent.store.people import names_in
from agent.store.rows import TERMINAL, dumps

INCIDENT_COLUMNS = (
    "id, source, group_key, alertname, labels, annotations, matchers, runbook_id, params, "
    "start_mode, state, status, firing, notifications, run_id, chat_id, card_message_id, "
    "first_at, last_at, resolved_at, decided_by, decided_at, silence_id, silenced_by, "
    "silenced_until, closed_at, start_refused"
)
# The counter /metrics shows as loom_ops_alerts_received_total{outcome}.
ALERTS_COUNTER = "alerts_received"
UNMATCHED = "unmatched"  # its outcome for a notification no runbook answers


class Intake(StrEnum):
    """What one notification did: opened an incident, updated or resolved an open one, or
    nothing (seen before)."""

    OPENED = "opened"
    UPDATED = "updated"
    RESOLVED = "resolved"
    UNCHANGED = "unchanged"


@record
class NewAlert:
    """One notification to record: the notice, a digest of its content, its group's key
    (a digest), and the incident it opens if its group has none open."""

    notice: AlertNotice
    digest: str
    group_key: str
    runbook_id: str
    params: dict[str, str]
    start_mode: str  # auto or ask
    chat_id: int | None
    run_prefix: str  # the run id is the prefix and the incident's number
    refusal: str | None = None  # why an `auto` start may not happen: it opens proposed


@record
class AlertReceipt:
    """What a notification did (`intake`), and the incident as it stands after it (None:
    a resolve of a group no incident was ever opened for)."""

    intake: Intake
    incident: AlertIncident | None


def incident_from_row(row: Row) -> AlertIncident:
    """An alert_incidents row (INCIDENT_COLUMNS) as a record."""
    return AlertIncident(
        id=row["id"],
        source=row["source"],
        group_key=row["group_key"],
        alertname=row["alertname"],
        labels=json.loads(row["labels"]),
        annotations=json.loads(row["annotations"]),
        matchers=json.loads(row["matchers"]),
        runbook_id=row["runbook_id"],
        params=json.loads(row["params"]),
        start_mode=row["start_mode"],
        state=AlertState(row["state"]),
        status=row["status"],
        firing=row["firing"],
        notifications=row["notifications"],
        run_id=row["run_id"],
        chat_id=row["chat_id"],
        card_message_id=row["card_message_id"],
        first_at=row["first_at"],
        last_at=row["last_at"],
        resolved_at=row["resolved_at"],
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
        silence_id=row["silence_id"],
        silenced_by=row["silenced_by"],
        silenced_until=row["silenced_until"],
        closed_at=row["closed_at"],
        start_refused=row["start_refused"],
    )


def _redelivered(new: NewAlert, seen: int, latest: AlertIncident) -> bool:
    """Whether a notification whose content incident `seen` of its group received before is
    that delivery again (it changes nothing), given the group's latest incident.

    A dated notification (its alerts' start times are in its digest) is, however late. An
    undated one that fires again after its incident was resolved is a new firing."""
    if new.notice.dated:
        return True
    return seen == latest.id and latest.status == new.notice.status


class AlertsStore(StoreBase):
    """The alert_incidents aggregate (with its notifications)."""

    async def receive_alert(self, new: NewAlert) -> AlertReceipt:
        """Record one notification: a new incident for a group with none open, else an update
        or resolve of the open one (journaled on its run while the run is open); content seen
        before changes nothing. The incident's card is queued for its chat with any change."""
        now = time.time()

        def receive(conn: Connection) -> AlertReceipt:
            latest = self._latest_incident(conn, new.group_key)
            seen = self._seen_by(conn, new.group_key, new.digest)
            if latest is not None and seen is not None and _redelivered(new, seen, latest):
                self._count(conn, Intake.UNCHANGED)
                return AlertReceipt(Intake.UNCHANGED, self._incident(conn, seen))
            current = latest if latest is not None and latest.is_open else None
            if current is not None and new.notice.status == "firing":
                run_status = self._run_status(conn, current.run_id)
                if current.state == AlertState.STARTED and run_status in TERMINAL:
                    # Its run has ended: a new firing is a new incident, with a run of its own.
                    self._close(conn, current.id, now)
                    current = None
            if current is None:
                if new.notice.status != "firing":  # nothing open to resolve: note it only
                    self._count(conn, Intake.UNCHANGED)
                    if latest is None:
                        return AlertReceipt(Intake.UNCHANGED, None)
                    self._note_notification(conn, latest.id, new, now)
                    return AlertReceipt(Intake.UNCHANGED, self._incident(conn, latest.id))
                return self._open(conn, new, now)
            return self._update(conn, current, new, now)

        return await self._transaction(receive)

    def _open(self, conn: Connection, new: NewAlert, now: float) -> AlertReceipt:
        notice = new.notice
        auto = new.start_mode == "auto" and new.refusal is None
        state = AlertState.STARTED if auto else AlertState.PROPOSED
        row = conn.execute(
            "INSERT INTO alert_incidents (source, group_key, open_key, alertname, labels, "
            "annotations, matchers, runbook_id, params, start_mode, state, status, firing, "
            "notifications, run_id, chat_id, first_at, last_at, decided_by, decided_at, "
            "start_refused) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, '', ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING id",
            (
                notice.source,
                new.group_key,
                new.group_key,
                notice.alertname,
                dumps(dict(notice.labels)),
                dumps(dict(notice.annotations)),
                dumps(dict(notice.matchers)),
                new.runbook_id,
                dumps(new.params),
                new.start_mode,
                state,
                notice.status,
                notice.firing,
                new.chat_id,
                now,
                now,
                "auto" if state == AlertState.STARTED else None,
                now if state == AlertState.STARTED else None,
                new.refusal,
            ),
        ).fetchone()
        if row is None:  # SQLite runs one writer at a time; PostgreSQL runs this again
            raise StoreError("this alert group's incident was opened meanwhile; try again")
        incident_id = row["id"]
        conn.execute(
            "UPDATE alert_incidents SET run_id = ? WHERE id = ?",
            (f"{new.run_prefix}{incident_id}", incident_id),
        )
        self._note_notification(conn, incident_id, new, now)
        self._count(conn, Intake.OPENED)
        incident = self._incident(conn, incident_id)
        self._queue_card(conn, incident, now)
        return AlertReceipt(Intake.OPENED, incident)

    def _update(
        self, conn: Connection, current: AlertIncident, new: NewAlert, now: float
    ) -> AlertReceipt:
        notice = new.notice
        resolved = notice.status == "resolved"
        run_open = self._run_status(conn, current.run_id) not in (None, *TERMINAL)
        # Resolved, it is closed unless its run is open: a re-fire then still belongs to the run.
        closes = resolved and not run_open
        conn.execute(
            "UPDATE alert_incidents SET status = ?, firing = ?, labels = ?, annotations = ?, "
            "notifications = notifications + 1, last_at = ?, resolved_at = ?, closed_at = ?, "
            "open_key = ? WHERE id = ?",
            (
                notice.status,
                notice.firing,
                dumps(dict(notice.labels)),
                dumps(dict(notice.annotations)),
                now,
                now if resolved else None,
                now if closes else None,
                None if closes else current.group_key,
                current.id,
            ),
        )
        self._note_notification(conn, current.id, new, now)
        incident = self._incident(conn, current.id)
        if run_open:
            event: Event
            if resolved:
                event = AlertResolved(current.id, now)
            else:
                event = AlertUpdated(current.id, notice.firing, incident.notifications, now)
            self._append_events(conn, current.run_id, [event], now)
        intake = Intake.RESOLVED if resolved else Intake.UPDATED
        self._count(conn, intake)
        self._queue_card(conn, incident, now)
        return AlertReceipt(intake, incident)

    async def alert_run_started(self, incident_id: int, by: str) -> AlertIncident:
        """The incident's run exists now (started by `by`, or `auto`): journal what it
        answers as the run's alert_received (once), and mark the incident started; a repeat
        changes nothing."""
        now = time.time()

        def started(conn: Connection) -> AlertIncident:
            incident = self._incident(conn, incident_id)
            changed = incident.state == AlertState.PROPOSED
            if changed:
                conn.execute(
                    "UPDATE alert_incidents SET state = ?, decided_by = ?, decided_at = ? "
                    "WHERE id = ?",
                    (AlertState.STARTED, by, now, incident_id),
                )
                incident = self._incident(conn, incident_id)
            journaled = conn.execute(
                "SELECT 1 FROM events WHERE run_id = ? AND type = ?",
                (incident.run_id, AlertReceived.type.value),
            ).fetchone()
            if journaled is None:
                changed = True
                event = AlertReceived(
                    incident_id=incident.id,
                    source=incident.source,
                    alertname=incident.alertname,
                    status=incident.status,
                    firing=incident.firing,
                    labels=dict(incident.labels),
                    annotations=dict(incident.annotations),
                    first_at=incident.first_at,
                    started_by=incident.decided_by or by,
                    start=incident.start_mode,
                )
                self._append_events(conn, incident.run_id, [event], now)
            if changed:  # else a repeat (a redelivery, a second tap): nothing to say
                self._queue_card(conn, incident, now)
            return incident

        return await self._transaction(started)

    async def alert_start_refused(self, incident_id: int, reason: str) -> AlertIncident:
        """The incident's `auto` start was refused (`reason`): it is proposed again, with the
        reason, so its card offers Start to a person; unchanged when its run exists (another
        delivery started it) or a person decided it meanwhile."""
        now = time.time()

        def refused(conn: Connection) -> AlertIncident:
            changed = conn.execute(
                "UPDATE alert_incidents SET state = ?, decided_by = NULL, decided_at = NULL, "
                "start_refused = ? WHERE id = ? AND state = ? AND decided_by = 'auto' "
                "AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = alert_incidents.run_id)",
                (AlertState.PROPOSED, reason, incident_id, AlertState.STARTED),
            )
            incident = self._incident(conn, incident_id)
            if changed.rowcount == 1:
                self._queue_card(conn, incident, now)
            return incident

        return await self._transaction(refused)

    async def ignore_alert(self, incident_id: int, by: str) -> AlertIncident | None:
        """Close a proposed incident's card as ignored by `by` (the incident stays open until
        its group resolves, so its notifications post no new card); None when it is not
        proposed any more (started or ignored meanwhile)."""
        now = time.time()

        def ignore(conn: Connection) -> AlertIncident | None:
            changed = conn.execute(
                "UPDATE alert_incidents SET state = ?, decided_by = ?, decided_at = ? "
                "WHERE id = ? AND state = ?",
                (AlertState.IGNORED, by, now, incident_id, AlertState.PROPOSED),
            )
            if changed.rowcount != 1:
                return None
            incident = self._incident(conn, incident_id)
            self._queue_card(conn, incident, now)
            return incident

        return await self._transaction(ignore)

    async def record_silence(
        self, incident_id: int, silence_id: str, by: str, until: float
    ) -> AlertIncident:
        """Record the Alertmanager silence `by` created for the incident's group (journaled on
        its run while the run is open)."""
        now = time.time()

        def record(conn: Connection) -> AlertIncident:
            conn.execute(
                "UPDATE alert_incidents SET silence_id = ?, silenced_by = ?, silenced_until = ? "
                "WHERE id = ?",
                (silence_id, by, until, incident_id),
            )
            incident = self._incident(conn, incident_id)
            if self._run_status(conn, incident.run_id) not in (None, *TERMINAL):
                event = AlertSilenced(incident_id, silence_id, by, until)
                self._append_events(conn, incident.run_id, [event], now)
            self._queue_card(conn, incident, now)
            return incident

        return await self._transaction(record)

    async def record_alert_card(self, incident_id: int, message_id: int) -> None:
        """Remember which chat message is the incident's card (later changes edit it)."""
        await self._transaction(
            lambda c: c.execute(
                "UPDATE alert_incidents SET card_message_id = ? WHERE id = ?",
                (message_id, incident_id),
            )
        )

    async def alert_incident(self, incident_id: int) -> AlertIncident:
        """The incident with that id; StoreError (not found) when there is none."""
        return await self._read(lambda c: self._incident(c, incident_id))

    async def alert_incident_of_run(self, run_id: str) -> AlertIncident | None:
        """The incident a run answers, if it answers one."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {INCIDENT_COLUMNS} FROM alert_incidents WHERE run_id = ?", (run_id,)
            ).fetchone()
        )
        return incident_from_row(row) if row else None

    async def display_names(self, identities: list[str]) -> dict[str, str]:
        """How people know each identity (`@bob`); unknown ones are left out."""
        return await self._read(lambda c: names_in(c, identities))

    # -- in a transaction ----------------------------------------------------------------

    @staticmethod
    def _incident(conn: Connection, incident_id: int) -> AlertIncident:
        row = conn.execute(
            f"SELECT {INCIDENT_COLUMNS} FROM alert_incidents WHERE id = ?", (incident_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no alert incident #{incident_id}", kind=ErrorKind.NOT_FOUND)
        return incident_from_row(row)

    def _latest_incident(self, conn: Connection, group_key: str) -> AlertIncident | None:
        row = conn.execute(
            f"SELECT {INCIDENT_COLUMNS} FROM alert_incidents WHERE group_key = ? "
            "ORDER BY id DESC LIMIT 1" + self.dialect.for_update,
            (group_key,),
        ).fetchone()
        return incident_from_row(row) if row else None

    @staticmethod
    def _seen_by(conn: Connection, group_key: str, digest: str) -> int | None:
        """The incident of the group that received this content before, if one did."""
        row = conn.execute(
            "SELECT n.incident_id FROM alert_notifications n "
            "JOIN alert_incidents i ON i.id = n.incident_id "
            "WHERE n.digest = ? AND i.group_key = ? ORDER BY n.incident_id DESC LIMIT 1",
            (digest, group_key),
        ).fetchone()
        return row["incident_id"] if row else None

    @staticmethod
    def _note_notification(conn: Connection, incident_id: int, new: NewAlert, now: float) -> None:
        conn.execute(
            "INSERT INTO alert_notifications (incident_id, digest, status, firing, received_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (incident_id, new.digest, new.notice.status, new.notice.firing, now),
        )

    @staticmethod
    def _run_status(conn: Connection, run_id: str) -> str | None:
        row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        return row["status"] if row else None

    @staticmethod
    def _close(conn: Connection, incident_id: int, now: float) -> None:
        conn.execute(
            "UPDATE alert_incidents SET open_key = NULL, closed_at = ? WHERE id = ?",
            (now, incident_id),
        )

    @staticmethod
    def _count(conn: Connection, outcome: str) -> None:
        conn.execute(
            "INSERT INTO metric_counters (name, labels, value) VALUES (?, ?, 1) "
            "ON CONFLICT (name, labels) DO UPDATE SET value = metric_counters.value + 1",
            (ALERTS_COUNTER, dumps({"outcome": outcome})),
        )

    def _queue_card(self, conn: Connection, incident: AlertIncident, now: float) -> None:
        """Queue the incident's card (sent once, then edited) for its chat, if it has one."""
        if incident.chat_id is None:
            return
        target = dumps({"chat_id": incident.chat_id, "thread_id": None})
        payload: dict[str, Any] = {"incident_id": incident.id}
        conn.execute(
            "INSERT INTO outbox (run_id, target, kind, payload, created_at) VALUES (?, ?, ?, ?, ?)",
            (None, target, ChatNotice.ALERT, dumps(payload), now),
        )
        self._queued.outbox = True
        self.db.notify(conn, OUTBOX_CHANNEL)

    async def count_unmatched_alert(self) -> None:
        """Count a notification no runbook answers (it is logged, not journaled)."""
        await self._transaction(lambda c: self._count(c, UNMATCHED))
