"""The rows the store hands out: runs, tool calls, approvals, events. Plain frozen dataclasses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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

    @property
    def is_waiting(self) -> bool:
        """True while the run waits for a human or for its children."""
        return self in (RunStatus.WAITING_APPROVAL, RunStatus.WAITING_CHILDREN)


TERMINAL_STATUSES = frozenset(
    {
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.REJECTED,
        RunStatus.CANCELLED,
        RunStatus.EXPIRED,
    }
)


class ApprovalStatus(StrEnum):
    """An approval request is decided once: the first decision wins."""

    PENDING = "pending"
    APPROVED = "approved"
    SKIPPED = "skipped"  # in-doubt requests only: treat the step as done, do not run it again
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class ApprovalKind(StrEnum):
    """A gate before a risky step, or a human call on a step that may or may not have run."""

    GATE = "gate"
    IN_DOUBT = "in_doubt"


@dataclass(frozen=True)
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
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        """Parse what `to_json` wrote."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Origin:
    """Where a run came from, so what it says can reach the same place."""

    kind: str = "cli"  # "cli", "http", "telegram"
    chat_id: int | None = None
    thread_id: int | None = None

    def to_json(self) -> str:
        """Serialize for the runs table."""
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Origin:
        """Parse what `to_json` wrote."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Effects:
    """What a run may do to the world, fixed when it starts: live commands, live MCP tools,
    live health checks (each off is a dry run of that kind)."""

    shell: bool = False
    mcp: bool = False
    checks: bool = False

    def to_json(self) -> str:
        """Serialize for the runs table."""
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Effects:
        """Parse what `to_json` wrote."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class RunLimits:
    """Budgets of one run, fixed when it starts."""

    max_steps: int
    max_tool_calls: int
    deadline_seconds: float

    def to_json(self) -> str:
        """Serialize for the runs table."""
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RunLimits:
        """Parse what `to_json` wrote."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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

    @property
    def in_doubt(self) -> bool:
        """Intent committed, no outcome: the call may or may not have happened."""
        return self.status == "intent"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ProcessRecord:
    """A long-running process serving the store, as its last heartbeat left it."""

    owner: str  # its lease owner id: host, pid, boot, PID namespace, start time
    kind: str  # serve, telegram, serve+telegram, worker
    drives_runs: bool  # it claims and drives runnable runs (not a --no-worker front end)
    started_at: float
    heartbeat_at: float


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
