"""What a store command takes (and what some return): frozen records of one write each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any

from agent.events import Event
from agent.records import ApprovalKind, Checkpoint, Effects, Origin, RunLimits, RunStatus, record


@record
class NewRun:
    """What it takes to create a run."""

    id: str
    role: str
    request: str
    requested_by: str
    origin: Origin
    limits: RunLimits
    parent_id: str | None = None
    policy: str | None = None  # what drives it: "mock" or "openai:<model>"
    effects: Effects | None = None  # what it may do live, fixed at start


@record
class NewChild:
    """A child run a delegate call starts: its role and, when known, its pinned runbook."""

    role: str
    pin: RunbookPin | None = None


@record
class NewToolCall:
    """The intent of one tool call."""

    call_key: str
    turn: int
    position: int
    tool: str
    args: dict[str, Any]
    step_id: str | None
    repeatable: bool = False  # safe to run again if it is found in doubt


@record
class NewApproval:
    """An approval request to open."""

    call_key: str
    kind: ApprovalKind
    step_id: str | None
    action: str
    reason: str
    rollback: str | None
    deciders: list[str]
    four_eyes: bool
    requested_by: str
    deadline_at: float
    mode: str | None = None  # "live" or "dry-run"
    runs_on: str | None = None  # where the action runs: "this host (vm)", "any worker"
    evidence: list[str] = field(default_factory=list)  # the last lines of steps already run
    required: int = 1  # approvals by distinct people it needs (the step's `approval:` rule)
    # Its hops before the deadline (None: none), whom it escalates to, and what expiry does.
    remind_at: float | None = None
    escalate_at: float | None = None
    escalate_to: list[str] = field(default_factory=list)
    on_expiry: str = "stop"


@record
class RunbookPin:
    """The runbook (and resolved params) a run commits to; later steps must come from it."""

    runbook_id: str
    runbook: dict[str, Any]
    params: dict[str, Any]


@record
class StartedCall:
    """A committed intent: its attempt number, and the instant (wall clock) after which its
    side effect must not start, because the lease may have passed to another process."""

    attempt: int
    spawn_before: float


@record
class DecisionEffect:
    """What a decision does to the gated call and the run, applied in the decision's transaction."""

    call_status: str | None  # new tool_calls.status, or None to leave it
    call_outcome: dict[str, Any] | None
    run_status: RunStatus
    checkpoint: Checkpoint | None
    error: str | None = None


@record
class CallResult:
    """What a tool call came to, as the store records it: its status and outcome, how long
    it took, the runbook it pinned (read_runbook), and events of its own (an audit entry)."""

    status: str
    outcome: dict[str, Any]
    duration_ms: float
    pin: RunbookPin | None = None
    events: Sequence[Event] = ()


@record
class Outcome:
    """The outcome of a call attempt in flight, with the checkpoint after it: what a drive
    commits at the head of its next write when the call is safe to repeat."""

    call: NewToolCall
    attempt: int
    result: CallResult
    checkpoint: Checkpoint
