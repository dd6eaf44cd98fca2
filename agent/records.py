"""The rows the store hands out: runs, tool calls, approvals, events; and `record`, the
decorator of every frozen dataclass in loom-ops."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from typing import Any, TypeVar, dataclass_transform

_Record = TypeVar("_Record", bound=type)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: _Record) -> _Record:
    """`dataclass(frozen=True)`, with the same `==`, hash and repr, taken from three shared
    functions instead of code compiled for each class.

    Python 3.11 compiles six methods for each frozen dataclass, about half a millisecond a
    class, and `loom-ops approve` alone imports 73 of them. `__init__` and the frozen
    `__setattr__`/`__delattr__` are still the dataclass's own. A method the class body
    defines is kept, as `dataclass` keeps it."""
    body = dict(cls.__dict__)
    made = dataclass(frozen=True, eq=False, repr=False)(cls)
    every = fields(made)
    # Static: a lambda read off an instance would be bound to it.
    made._record_compared = staticmethod(_values([f.name for f in every if f.compare]))
    made._record_hashed = staticmethod(
        _values([f.name for f in every if (f.compare if f.hash is None else f.hash)])
    )
    made._record_shown = tuple(f.name for f in every if f.repr)
    if "__eq__" not in body:
        made.__eq__ = _record_eq
    # A body defining only `__eq__` has `__hash__ = None` set by Python: not a choice.
    if "__hash__" not in body or (body["__hash__"] is None and "__eq__" in body):
        made.__hash__ = _record_hash
    if "__repr__" not in body:
        made.__repr__ = _record_repr
    return made


def _values(names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """The named attributes of an object as a tuple, whatever their number."""
    if len(names) >= 2:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _record_eq(self: Any, other: Any) -> Any:
    # As a dataclass compares: the same class, then the compared fields as one tuple.
    if other.__class__ is not self.__class__:
        return NotImplemented
    values = self._record_compared
    return values(self) == values(other)


def _record_hash(self: Any) -> int:
    return hash(self._record_hashed(self))


def _record_repr(self: Any) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._record_shown)
    return f"{self.__class__.__qualname__}({shown})"


class RunStatus(StrEnum):
    """Where a run is in its life; the last five are final."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    WAITING_CHILDREN = "waiting_children"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        """True once nothing can change the run any more."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.REJECTED,
        RunStatus.CANCELLED,
        RunStatus.EXPIRED,
    }
)


# A person's identity on a front end: `cli:alice`, `telegram:12345`, `api:sam-laptop`, and the
# same shape names a group: `group:oncall`.
IDENTITY_PATTERN = r"[a-z][a-z0-9_]*:\S+"


class ApprovalStatus(StrEnum):
    """An approval request is decided once: when its approvals are all in, or at the first
    reject."""

    PENDING = "pending"
    APPROVED = "approved"
    SKIPPED = "skipped"  # in-doubt requests only: treat the step as done, do not run it again
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class Hop(StrEnum):
    """A step a pending approval request takes before its deadline: remind its deciders,
    then escalate (add its `escalate_to` as deciders)."""

    REMIND = "remind"
    ESCALATE = "escalate"


class VoteOutcome(StrEnum):
    """What one person's decision on a request does under its rule (`required` approvals by
    distinct people): counted toward it, already counted (nothing changes), completes it, or
    ends it at once (a reject, which makes the rule impossible, or an in-doubt skip)."""

    COUNTED = "counted"
    ALREADY_COUNTED = "already_counted"
    COMPLETES = "completes"
    ENDS = "ends"


class ApprovalKind(StrEnum):
    """A gate before a risky step, or a human call on a step that may or may not have run."""

    GATE = "gate"
    IN_DOUBT = "in_doubt"


@record
class Delay:
    """When a hop of an approval request comes: a share of its timeout (`50%`), or seconds
    after it was opened (`10m`, `90s`, `600`); `Delay.parse` reads both, and `0` or an empty
    text is no hop (None)."""

    seconds: float | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, value: object) -> Delay | None:
        """The delay `value` says (a number is seconds); ValueError naming the forms."""
        if isinstance(value, bool):
            raise ValueError(DELAY_FORMS)
        if isinstance(value, int | float):
            return _delay_seconds(float(value))
        if not isinstance(value, str):
            raise ValueError(DELAY_FORMS)
        text = value.strip().lower()
        if text in ("", "0", "none", "off"):
            return None
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ValueError(DELAY_FORMS) from None
            if not 0 < percent < 100:
                raise ValueError(f"{value!r}: a share of the deadline is between 0% and 100%")
            return cls(fraction=percent / 100)
        match = DELAY_PATTERN.fullmatch(text)
        if match is None:
            raise ValueError(f"{value!r}: {DELAY_FORMS}")
        return _delay_seconds(float(match[1]) * DELAY_UNITS[match[2] or "s"])

    def after(self, opened_at: float, timeout: float) -> float | None:
        """When the hop comes for a request opened at `opened_at` that expires `timeout`
        seconds later; None when that is not before its deadline."""
        offset = self.seconds if self.seconds is not None else (self.fraction or 0) * timeout
        return opened_at + offset if offset < timeout else None

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return f"{self.seconds:g}s"


DELAY_FORMS = "a delay is a share of the deadline like 50%, or a duration like 90s, 10m or 1h"
DELAY_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*([smh]?)")
DELAY_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _delay_seconds(seconds: float) -> Delay | None:
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(DELAY_FORMS)
    return Delay(seconds=seconds) if seconds > 0 else None


# The roles of a supervisor's child runs, in the order the team works: plan, execute, verify.
CHILD_ROLES = ("planner", "executor", "verifier")


class Decision(StrEnum):
    """What a decider can say: approve (retry, for an in-doubt step), skip, or reject (abort)."""

    APPROVE = "approve"
    SKIP = "skip"
    REJECT = "reject"


class ChatNotice(StrEnum):
    """What a chat must hear about a run: the kind of an outbox entry. The store queues one
    with the change it tells of; the bot renders it from the store when it sends it. A
    separate vocabulary from the journal's event types: which news a chat gets is the chat's."""

    APPROVAL_REQUEST = "approval_request"  # ask the deciders, with buttons
    APPROVAL_DECIDED = "approval_decided"  # edit the request: who decided, and when
    APPROVAL_VOTED = "approval_voted"  # edit the request: one more approval, buttons kept
    APPROVAL_EXPIRED = "approval_expired"  # edit the request: nobody decided in time
    # A hop of a pending request: the card says so (buttons kept) and a reply mentions who
    # may decide; the same kinds go to an approver's private chat, as a message of its own.
    APPROVAL_REMINDED = "approval_reminded"
    APPROVAL_ESCALATED = "approval_escalated"
    PROGRESS = "progress"  # show the tree's state again (one message per tree, edited)
    RUN_FINISHED = "run_finished"  # the root run's summary
    ALERT = "alert"  # show an alert incident's card: sent once, then edited in place
    # Close the forum topic the bot opened for a run tree: queued by the bot itself once the
    # tree's last word is out, so a crash or a failed call is retried like any message.
    TOPIC_CLOSE = "topic_close"


# The runs table's small JSON columns; one encoder, as `json.dumps` with options builds a new
# one per call (a checkpoint is written with every step).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


@record
class Checkpoint:
    """Where a run's loop stands: the policy turn, the next call in it, budgets spent."""

    turn: int = 0
    call: int = 0
    steps_used: int = 0
    tool_calls_used: int = 0
    active_seconds: float = 0.0
    phase: str = "policy"  # "policy", or "rollback" after a rejection that asks for one

    def to_json(self) -> str:
        """Serialize for the runs table."""
        return _compact_json(self.__dict__)

    def moved(self, **changes: Any) -> Checkpoint:
        """A copy with `changes`: `dataclasses.replace` without its per-call look at the
        fields (the loop moves its checkpoint several times a step)."""
        return Checkpoint(**{**self.__dict__, **changes})

    @property
    def at_start(self) -> bool:
        """No policy turn taken yet. The checkpoint moves in the transaction that journals a
        turn, a call or an approval request, so such a run has none of them to read back."""
        return self.turn == 0 and self.call == 0 and self.steps_used == 0

    def rolling_back(self) -> Checkpoint:
        """Where a run resumes to roll its completed steps back (after a reject or an
        expiry that asks for it): a turn of its own, the kernel's rollback plan."""
        return self.moved(turn=self.turn + 1, call=0, phase="rollback")

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        """Parse what `to_json` wrote."""
        return cls(**json.loads(text))


@record
class Origin:
    """Where a run came from, so what it says can reach the same place."""

    kind: str = "cli"  # "cli", "http", "telegram"
    chat_id: int | None = None
    thread_id: int | None = None
    message_id: int | None = None  # the chat message that asked for the run (a `/run`)

    def to_json(self) -> str:
        """Serialize for the runs table."""
        return _compact_json(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Origin:
        """Parse what `to_json` wrote."""
        return cls(**json.loads(text))


@record
class Effects:
    """What a run may do to the world, fixed when it starts: live commands, live MCP tools,
    live health checks (each off is a dry run of that kind)."""

    shell: bool = False
    mcp: bool = False
    checks: bool = False

    def to_json(self) -> str:
        """Serialize for the runs table."""
        return _compact_json(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Effects:
        """Parse what `to_json` wrote."""
        return cls(**json.loads(text))

    @property
    def live(self) -> tuple[str, ...]:
        """The kinds done live: `shell`, `mcp`, `checks`."""
        return tuple(kind for kind, on in self.__dict__.items() if on)

    def lacking(self, run: Effects | None) -> tuple[str, ...]:
        """The kinds a run with the `run` effects does live and a process with these may not;
        none for a run from before effects were recorded."""
        return tuple(kind for kind in run.live if not getattr(self, kind)) if run else ()


@record
class RunLimits:
    """Budgets of one run, fixed when it starts."""

    max_steps: int
    max_tool_calls: int
    deadline_seconds: float

    def to_json(self) -> str:
        """Serialize for the runs table."""
        return _compact_json(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> RunLimits:
        """Parse what `to_json` wrote."""
        return cls(**json.loads(text))


@record
class RunRecord:
    """One run as stored."""

    id: str
    parent_id: str | None
    role: str
    status: RunStatus
    request: str
    requested_by: str
    origin: Origin
    runbook_id: str | None
    runbook: dict[str, Any] | None
    params: dict[str, Any]
    checkpoint: Checkpoint
    limits: RunLimits
    summary: str | None
    error: str | None
    lease_owner: str | None
    lease_expires_at: float | None
    created_at: float
    updated_at: float
    finished_at: float | None
    lease_epoch: int = 0  # grows with every claim of the lease
    policy: str | None = None  # what drives it ("mock", "openai:<model>"); None: the configured
    effects: Effects | None = None  # live or dry-run, per kind; None (older runs): the process's
    run_no: int | None = (
        None  # global number, from 1 in creation order (audit: a gap is a deletion)
    )
    event_count: int = 0  # length of its journal's chain, as the run recorded it
    last_hash: str = ""  # head of that chain (an HMAC when keyed)
    key_id: str | None = None  # id of the audit key its last event was written with (None: unkeyed)
    not_before: float | None = None  # queued, handed back to be tried again no sooner

    def due(self, now: float) -> bool:
        """True unless it was handed back to be tried again later than `now` (an outage)."""
        return self.not_before is None or self.not_before <= now


@record
class Claim:
    """The right to drive one run: its owner at one epoch of the lease. Every write of a drive
    is fenced by it, so a driver that lost its lease, even to a later claim by the same owner,
    writes and starts nothing."""

    run_id: str
    owner: str
    epoch: int

    @classmethod
    def of(cls, run: RunRecord) -> Claim:
        """The claim a run record shows; raises ValueError when nobody holds its lease."""
        if run.lease_owner is None:
            raise ValueError(f"run {run.id} has no lease")
        return cls(run.id, run.lease_owner, run.lease_epoch)


@record
class ToolCallRecord:
    """One tool call: its intent, and its outcome once recorded."""

    call_key: str
    run_id: str
    turn: int
    position: int
    tool: str
    args: dict[str, Any]
    step_id: str | None
    attempt: int
    status: str  # intent | retry | ok | error | refused | skipped
    outcome: dict[str, Any] | None
    intent_at: float
    outcome_at: float | None
    duration_ms: float | None
    repeatable: bool = False  # judged at intent time: safe to run again when in doubt
    attempt_info: dict[str, Any] | None = None  # where the latest attempt may act, and until when


@record
class ApprovalRecord:
    """One approval request and, once made, its decision."""

    id: int
    token: str
    run_id: str
    call_key: str
    kind: ApprovalKind
    step_id: str | None
    action: str
    reason: str
    rollback: str | None
    deciders: list[str]
    four_eyes: bool
    requested_by: str
    status: ApprovalStatus
    decided_by: str | None
    decided_at: float | None
    note: str | None
    created_at: float
    deadline_at: float
    number: int = 0  # within its incident (the run tree): #1, #2, what people type
    mode: str | None = None  # "live" or "dry-run"
    runs_on: str | None = None  # where the action runs
    evidence: list[str] = field(default_factory=list)  # the last lines of steps already run
    required: int = 1  # approvals by distinct people the request needs
    # Its hops before the deadline (None: none planned / not made yet), and what expiry does.
    remind_at: float | None = None
    reminded_at: float | None = None
    escalate_at: float | None = None
    escalated_at: float | None = None
    escalate_to: list[str] = field(default_factory=list)  # deciders added at escalate_at
    on_expiry: str = "stop"  # or "rollback": completed steps are rolled back, then expired

    @property
    def all_deciders(self) -> list[str]:
        """Who may decide now: the deciders, and those it escalated to once it did; empty
        (anyone the global list admits) for a request open to anyone, escalated or not, since
        escalation only ever adds deciders."""
        if self.escalated_at is None or not self.deciders:
            return list(self.deciders)
        return [*self.deciders, *(e for e in self.escalate_to if e not in self.deciders)]


@record
class ApprovalVote:
    """One person's decision on a request, counted once per person (whichever identity)."""

    approval_id: int
    person: str  # the people file's name, or the identity nobody mapped
    decided_by: str  # the identity that decided
    decision: str  # approve, skip or reject
    note: str | None
    decided_at: float


@record
class ProcessRecord:
    """A long-running process serving the store, as its last heartbeat left it."""

    owner: str  # its lease owner id: host, pid, boot, PID namespace, start time
    kind: str  # serve, telegram, serve+telegram, worker
    drives_runs: bool  # it claims and drives runnable runs (not a --no-worker front end)
    started_at: float
    heartbeat_at: float
    effects: Effects | None = None  # what it may act live; None: a process of an older version

    def may_act(self, run: Effects | None) -> bool:
        """Whether it may drive a run with the `run` effects to its end (an older process
        does not say what it may act: it is taken to act everything, as it would try to)."""
        return self.effects is None or not self.effects.lacking(run)


@record
class ApiTokenRecord:
    """A person's API token as stored: never the token itself, only what is shown of it."""

    name: str  # decisions made with it are recorded as `api:<name>`
    person: str  # a name of the people file
    created_at: float
    revoked_at: float | None

    @property
    def identity(self) -> str:
        """The identity requests made with this token act as."""
        return f"api:{self.name}"


@record
class EventRecord:
    """One journal entry; `hash` covers `prev_hash` and the entry itself."""

    seq: int
    run_id: str
    idx: int
    ts: float
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = ""
    hash: str = ""
    key_id: str | None = None  # the audit key `hash` is an HMAC under (None: a plain SHA-256)


@record
class PolicyTurnRecord:
    """A policy's answer for one turn, journaled before it is used."""

    run_id: str
    turn: int
    policy: str
    request_hash: str
    response: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    created_at: float


# A chat identity as the bot records a person (`telegram:<user id>`); also found inside free
# text (an error, a summary), where people should read the person's name instead.
CHAT_IDENTITY = re.compile(r"\btelegram:-?[0-9]+\b")


@record
class RunTree:
    """A run and every run below it, read in one snapshot: the runs (the run asked for first,
    then each run's children, oldest first), their approval requests (by id), their tool calls
    and journal events when asked for, and how people know the identities they name."""

    runs: tuple[RunRecord, ...]
    approvals: tuple[ApprovalRecord, ...] = ()
    calls: tuple[ToolCallRecord, ...] = ()  # each run's in the order proposed, runs in order
    events: tuple[EventRecord, ...] = ()  # in journal order (seq)
    names: Mapping[str, str] = field(default_factory=dict)  # identity -> `@alice`

    @property
    def root(self) -> RunRecord:
        """The run the tree was read for."""
        return self.runs[0]

    @property
    def children(self) -> tuple[RunRecord, ...]:
        """Every run below the root."""
        return self.runs[1:]

    @property
    def pending(self) -> list[ApprovalRecord]:
        """The requests still waiting for a decision, oldest first."""
        return [a for a in self.approvals if a.status == ApprovalStatus.PENDING]

    def calls_of(self, run_id: str) -> list[ToolCallRecord]:
        """One run's tool calls, in the order they were proposed."""
        return [call for call in self.calls if call.run_id == run_id]

    def events_of(self, run_id: str) -> list[EventRecord]:
        """One run's journal, in order."""
        return [event for event in self.events if event.run_id == run_id]

    def approvals_of(self, run_id: str) -> list[ApprovalRecord]:
        """One run's approval requests, oldest first."""
        return [approval for approval in self.approvals if approval.run_id == run_id]

    def name(self, identity: str) -> str:
        """How people know an identity (`@alice`); an unknown one as it is."""
        return self.names.get(identity, identity)


@record
class ApprovalInRun:
    """An approval request read with the run it stops, that run's ancestry, and how people
    know the identities it names, in one snapshot."""

    approval: ApprovalRecord
    run: RunRecord
    lineage: tuple[str, ...]  # the run's id, its parent's, ... up to the root of its tree
    names: Mapping[str, str] = field(default_factory=dict)
    votes: tuple[ApprovalVote, ...] = ()  # the decisions counted so far, oldest first

    @property
    def root_id(self) -> str:
        """The root of the tree the request belongs to (its incident)."""
        return self.lineage[-1]

    def name(self, identity: str) -> str:
        """How people know an identity (`@alice`); an unknown one as it is."""
        return self.names.get(identity, identity)


@record
class AlertItem:
    """One alert of a notification: its fingerprint, status, labels, annotations and the
    sender's RFC 3339 start and end times."""

    fingerprint: str
    status: str  # firing or resolved
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: str | None = None
    ends_at: str | None = None


@record
class AlertNotice:
    """One alert notification as loom-ops reads it, whoever sent it: the group it is about
    (`group_key`, the sender's), its status, the labels and annotations the group shares, the
    labels a silence of it matches, and its alerts."""

    source: str  # alertmanager, grafana or generic
    group_key: str
    status: str  # firing or resolved
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    matchers: Mapping[str, str]
    alerts: tuple[AlertItem, ...]

    @property
    def alertname(self) -> str:
        """The group's alert name (`alertname`), or `alert` when the alerts differ."""
        return self.labels.get("alertname") or "alert"

    @property
    def firing(self) -> int:
        """How many of its alerts are firing."""
        return sum(1 for alert in self.alerts if alert.status == "firing")

    @property
    def dated(self) -> bool:
        """Whether its alerts carry the sender's start times (Alertmanager's and Grafana's
        do; a generic alert does not), which tell a re-fire from a redelivery."""
        return any(alert.starts_at is not None for alert in self.alerts)


class AlertState(StrEnum):
    """What the incident chat (or an `auto` route) made of an alert incident."""

    PROPOSED = "proposed"  # its card asks whether to start the runbook
    STARTED = "started"  # its run is started (by a tap, or on its own)
    IGNORED = "ignored"  # a person closed the card


@record
class AlertIncident:
    """One alert group's incident: the runbook and params it proposes, its run (the id is
    fixed when it opens), where its card is, and what happened to it, in Unix seconds."""

    id: int
    source: str
    group_key: str  # a digest of the sender's group key
    alertname: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    matchers: Mapping[str, str]  # what a silence matches
    runbook_id: str
    params: Mapping[str, str]
    start_mode: str  # the route's `start`: auto or ask
    state: AlertState
    status: str  # firing or resolved, as last notified
    firing: int
    notifications: int  # distinct notifications received
    run_id: str
    chat_id: int | None
    card_message_id: int | None
    first_at: float
    last_at: float
    resolved_at: float | None
    decided_by: str | None
    decided_at: float | None
    silence_id: str | None
    silenced_by: str | None
    silenced_until: float | None
    closed_at: float | None
    start_refused: str | None = None  # why its `auto` start was refused (then proposed)

    @property
    def is_open(self) -> bool:
        """True while a notification of its group belongs to it."""
        return self.closed_at is None
