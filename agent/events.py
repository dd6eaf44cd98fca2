"""The journal's vocabulary: every event type, its typed payload, and the one parser.

Writers build a typed event (`ToolIntent(...)`) and the store journals its `data()`; readers
turn a stored `EventRecord` back into one with `parse`, and match on the class. A journal
written by another version may hold an unknown type or miss a field: `parse` never raises, it
returns `UnknownEvent` with the raw data, so explain, trace and the chat still show the rest.
"""

from __future__ import annotations

from dataclasses import field, fields
from enum import StrEnum
from typing import Any, ClassVar

from agent.records import EventRecord, record


class EventType(StrEnum):
    """The type of a journal event, as stored in `events.type`."""

    RUN_CREATED = "run_created"
    RUN_CLAIMED = "run_claimed"
    RUN_INTERRUPTED = "run_interrupted"
    RUN_FINISHED = "run_finished"
    POLICY_TURN = "policy_turn"
    TOOL_INTENT = "tool_intent"
    TOOL_OUTCOME = "tool_outcome"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_DECIDED = "approval_decided"
    APPROVAL_VOTED = "approval_voted"
    APPROVAL_EXPIRED = "approval_expired"
    APPROVAL_REMINDED = "approval_reminded"
    APPROVAL_ESCALATED = "approval_escalated"
    CHILDREN_STARTED = "children_started"
    WAITING_FOR_SIBLING = "waiting_for_sibling"
    WAITING_FOR_EARLIER_ATTEMPT = "waiting_for_earlier_attempt"
    AUDIT = "audit"
    ALERT_RECEIVED = "alert_received"
    ALERT_UPDATED = "alert_updated"
    ALERT_RESOLVED = "alert_resolved"
    ALERT_SILENCED = "alert_silenced"


@record
class Event:
    """A typed journal payload; `data()` is what the journal stores and hashes."""

    type: ClassVar[EventType]

    def data(self) -> dict[str, Any]:
        """The payload as stored: every field, by name."""
        return dict(self.__dict__)


@record
class RunCreated(Event):
    """A run was created (a root by a person, a child by its parent's delegate call)."""

    type: ClassVar[EventType] = EventType.RUN_CREATED
    role: str
    request: str
    requested_by: str
    origin: dict[str, Any]
    limits: dict[str, Any]
    parent_id: str | None = None
    policy: str | None = None
    effects: dict[str, Any] | None = None
    runbook_id: str | None = None


@record
class RunClaimed(Event):
    """A process took the run's lease at `epoch` (from a dead owner, when `taken_over_from`)."""

    type: ClassVar[EventType] = EventType.RUN_CLAIMED
    owner: str
    epoch: int = 0
    taken_over_from: str | None = None

    def data(self) -> dict[str, Any]:
        """Without `taken_over_from` when nobody was displaced."""
        data = {"owner": self.owner, "epoch": self.epoch}
        if self.taken_over_from is not None:
            data["taken_over_from"] = self.taken_over_from
        return data


@record
class RunInterrupted(Event):
    """The drive stopped without an end (a policy outage, a lost lease); resume goes on."""

    type: ClassVar[EventType] = EventType.RUN_INTERRUPTED
    error: str


@record
class RunFinished(Event):
    """The run ended with `status`; `summary` is the policy's narrative, `error` the cause."""

    type: ClassVar[EventType] = EventType.RUN_FINISHED
    status: str
    summary: str | None = None
    error: str | None = None
    by: str | None = None  # who cancelled it

    def data(self) -> dict[str, Any]:
        """A cancel names who cancelled (it has no summary); any other end has a summary."""
        if self.by is not None:
            return {"status": self.status, "by": self.by, "error": self.error}
        return {"status": self.status, "summary": self.summary, "error": self.error}


@record
class PolicyTurn(Event):
    """The policy's answer for one turn, journaled before the kernel acts on it."""

    type: ClassVar[EventType] = EventType.POLICY_TURN
    turn: int
    policy: str
    request_hash: str
    response: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0


@record
class ToolIntent(Event):
    """A tool call is about to run (attempt `attempt`); committed before its effect."""

    type: ClassVar[EventType] = EventType.TOOL_INTENT
    call_key: str
    tool: str
    args: dict[str, Any]
    step_id: str | None = None
    attempt: int = 1


@record
class ToolOutcome(Event):
    """What a tool call came to: `status` ok, error, refused, skipped, cancelled…"""

    type: ClassVar[EventType] = EventType.TOOL_OUTCOME
    call_key: str
    status: str
    outcome: Any = None
    attempt: int | None = None
    duration_ms: float | None = None

    def data(self) -> dict[str, Any]:
        """Without the attempt and duration a decision's outcome does not have."""
        data: dict[str, Any] = {
            "call_key": self.call_key,
            "status": self.status,
            "outcome": self.outcome,
        }
        if self.attempt is not None:
            data["attempt"] = self.attempt
        if self.duration_ms is not None:
            data["duration_ms"] = self.duration_ms
        return data


@record
class ApprovalRequested(Event):
    """A person's decision was asked for (the chat's token is never journaled)."""

    type: ClassVar[EventType] = EventType.APPROVAL_REQUESTED
    approval_id: int
    kind: str
    action: str
    reason: str
    deadline_at: float
    number: int | None = None
    step_id: str | None = None
    rollback: str | None = None
    deciders: list[str] = field(default_factory=list)
    mode: str | None = None
    runs_on: str | None = None
    evidence: list[str] = field(default_factory=list)
    required: int = 1  # approvals by distinct people it needs
    # Its timers before the deadline (None: none), whom it escalates to, what expiry does.
    remind_at: float | None = None
    escalate_at: float | None = None
    escalate_to: list[str] = field(default_factory=list)
    on_expiry: str = "stop"


@record
class ApprovalDecided(Event):
    """A person approved or rejected request `number`."""

    type: ClassVar[EventType] = EventType.APPROVAL_DECIDED
    approval_id: int
    decision: str
    decided_by: str
    number: int | None = None
    call_key: str | None = None
    note: str | None = None


@record
class ApprovalVoted(Event):
    """A person approved request `number`, which needs more approvals: `approvals` of
    `required` are in (the approval that completes it is an ApprovalDecided)."""

    type: ClassVar[EventType] = EventType.APPROVAL_VOTED
    approval_id: int
    decided_by: str
    approvals: int
    required: int
    number: int | None = None
    note: str | None = None


@record
class ApprovalExpired(Event):
    """Nobody decided before the deadline (never consent)."""

    type: ClassVar[EventType] = EventType.APPROVAL_EXPIRED
    approval_id: int
    # What expiry did (the runbook's `on_expiry`): "stop", or "rollback" (completed steps
    # are rolled back, then the run ends as expired). Never consent either way.
    on_expiry: str = "stop"


@record
class ApprovalReminded(Event):
    """Request `number` was still pending at its reminder time: `mentioned` (the identities
    of the people who may decide it) were reminded in its chat, `privately` also in their
    private chats with the bot."""

    type: ClassVar[EventType] = EventType.APPROVAL_REMINDED
    approval_id: int
    number: int
    mentioned: list[str]
    privately: list[str]


@record
class ApprovalEscalated(Event):
    """Request `number` was still pending at its escalation time: `escalate_to` (groups or
    identities) became deciders too; `mentioned` are the people that added."""

    type: ClassVar[EventType] = EventType.APPROVAL_ESCALATED
    approval_id: int
    number: int
    escalate_to: list[str]
    mentioned: list[str]
    privately: list[str]


@record
class ChildrenStarted(Event):
    """A delegate call started these child runs."""

    type: ClassVar[EventType] = EventType.CHILDREN_STARTED
    call_key: str
    runs: list[str]


@record
class WaitingForSibling(Event):
    """The run waits for a sibling started by the same delegate call."""

    type: ClassVar[EventType] = EventType.WAITING_FOR_SIBLING
    run_id: str


@record
class WaitingForEarlierAttempt(Event):
    """Before a retry: the run waits until an earlier attempt can no longer act."""

    type: ClassVar[EventType] = EventType.WAITING_FOR_EARLIER_ATTEMPT
    call_key: str
    attempt: int
    until: float


@record
class Audit(Event):
    """An audit entry the verifier recorded."""

    type: ClassVar[EventType] = EventType.AUDIT
    entry: str


@record
class AlertReceived(Event):
    """The run answers an alert group: what fired, when it was first notified (`first_at`,
    Unix seconds), which route started it and who (`auto`: the route, on its own)."""

    type: ClassVar[EventType] = EventType.ALERT_RECEIVED
    incident_id: int
    source: str
    alertname: str
    status: str
    firing: int
    labels: dict[str, str]
    annotations: dict[str, str]
    first_at: float
    started_by: str
    start: str  # the route's `start`: auto or ask


@record
class AlertUpdated(Event):
    """The alert group fired again (new alerts, or a re-fire) while the run is open."""

    type: ClassVar[EventType] = EventType.ALERT_UPDATED
    incident_id: int
    firing: int
    notifications: int
    received_at: float


@record
class AlertResolved(Event):
    """The alert group resolved (`resolved_at`, Unix seconds) while the run is open."""

    type: ClassVar[EventType] = EventType.ALERT_RESOLVED
    incident_id: int
    resolved_at: float


@record
class AlertSilenced(Event):
    """A person silenced the alert group in Alertmanager (`silence_id`) until `until`."""

    type: ClassVar[EventType] = EventType.ALERT_SILENCED
    incident_id: int
    silence_id: str
    by: str
    until: float


@record
class UnknownEvent:
    """An event this version cannot read (another version's type, a damaged payload)."""

    type: str
    raw: dict[str, Any]


KNOWN: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        RunCreated,
        RunClaimed,
        RunInterrupted,
        RunFinished,
        PolicyTurn,
        ToolIntent,
        ToolOutcome,
        ApprovalRequested,
        ApprovalDecided,
        ApprovalVoted,
        ApprovalExpired,
        ApprovalReminded,
        ApprovalEscalated,
        ChildrenStarted,
        WaitingForSibling,
        WaitingForEarlierAttempt,
        Audit,
        AlertReceived,
        AlertUpdated,
        AlertResolved,
        AlertSilenced,
    )
}


def parse(record: EventRecord) -> Event | UnknownEvent:
    """The typed payload of a stored event; `UnknownEvent` when it cannot be read as one."""
    cls = KNOWN.get(record.type)
    if cls is None:
        return UnknownEvent(record.type, record.data)
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in record.data.items() if k in names})
    except TypeError:  # a required field is missing
        return UnknownEvent(record.type, record.data)
