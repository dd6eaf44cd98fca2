"""Verifying the audit trail: each run's chain (`agent.chain`), the rows every view reads
checked against the journal events that recorded them, the head of a run's tree, and the
global run numbering, all over one snapshot of the store.

The MACs cover the journal only; the summary, `status`, `explain` and the trace read rows
(`runs`, `approvals`, `approval_votes`, `tool_calls`). Each fact those rows hold that an event
recorded when it was written is compared with that event here, so a store writer who edits a
row (a decider, who asked, a status, a step's result) is named, row and field, instead of
being shown as fact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from agent.chain import (
    ChainReport,
    Keyring,
    NumberingReport,
    check_numbering,
    journal_tree_head,
    published_mismatch,
    verify_chain,
)
from agent.events import EventType
from agent.records import (
    ApprovalRecord,
    ApprovalStatus,
    ApprovalVote,
    EventRecord,
    RunRecord,
    ToolCallRecord,
    record,
)
from agent.store.journal import AuditSnapshot

# Tool call statuses a tool_outcome event records; `intent` and `retry` (a person asked for
# another attempt) are states between outcomes, with no event of their own.
_BETWEEN_OUTCOMES = frozenset({"intent", "retry"})


@record
class TreeReport:
    """The verdict on a run and every run below it: each run's, and the tree's head (what a
    summary or an export published) compared with a published one when given."""

    run_id: str
    runs: tuple[ChainReport, ...]  # in number order
    head: str  # the tree's head as the journal says
    published: str | None = None
    published_problem: str | None = None
    keyed: bool = False  # the verifier held an audit key

    @property
    def intact(self) -> bool:
        """True when every run is intact and the tree ends at the published head (given)."""
        return self.published_problem is None and all(r.intact for r in self.runs)

    @property
    def events(self) -> int:
        """Events in the tree's journal."""
        return sum(r.events for r in self.runs)


@record
class StoreReport:
    """The verdict on every run of a store, and on its run numbering."""

    runs: tuple[ChainReport, ...]
    numbering: NumberingReport

    @property
    def intact(self) -> bool:
        """True when every run is intact and no run number is missing."""
        return self.numbering.intact and all(r.intact for r in self.runs)


def audit_tree(
    snapshot: AuditSnapshot,
    run_id: str,
    keys: Keyring,
    keyed_since: int | None,
    published: str | None = None,
) -> TreeReport:
    """Verify the run `run_id` and every run below it (a run the keys held cannot judge is
    reported as such, the others still judged)."""
    reports = _audit_runs(snapshot, keys, keyed_since)
    head = journal_tree_head(snapshot.runs, snapshot.events)
    mismatch = published_mismatch(snapshot.runs, snapshot.events, published) if published else None
    return TreeReport(run_id, reports, head, published, mismatch, bool(keys.keys))


def audit_store(snapshot: AuditSnapshot, keys: Keyring, keyed_since: int | None) -> StoreReport:
    """Verify every run of the store and its numbering (a verdict per run: one that cannot
    be judged with the keys held says so and the rest are still judged)."""
    reports = _audit_runs(snapshot, keys, keyed_since)
    return StoreReport(reports, check_numbering(snapshot.runs, snapshot.counter))


def _audit_runs(
    snapshot: AuditSnapshot, keys: Keyring, keyed_since: int | None
) -> tuple[ChainReport, ...]:
    events = _by_run(snapshot.events)
    approvals: dict[str, list[ApprovalRecord]] = defaultdict(list)
    for approval in snapshot.approvals:
        approvals[approval.run_id].append(approval)
    votes: dict[int, list[ApprovalVote]] = defaultdict(list)
    for vote in snapshot.votes:
        votes[vote.approval_id].append(vote)
    calls: dict[str, list[ToolCallRecord]] = defaultdict(list)
    for call in snapshot.calls:
        calls[call.run_id].append(call)
    reports = []
    for run in snapshot.runs:
        journal = events.get(run.id, [])
        report = verify_chain(run, journal, keys, keyed_since)
        found = row_problems(run, journal, approvals[run.id], votes, calls[run.id])
        reports.append(replace(report, problems=(*report.problems, *found)))
    return tuple(reports)


def _by_run(events: Sequence[EventRecord]) -> dict[str, list[EventRecord]]:
    grouped: dict[str, list[EventRecord]] = defaultdict(list)
    for event in events:
        grouped[event.run_id].append(event)
    return grouped


def row_problems(
    run: RunRecord,
    events: Sequence[EventRecord],
    approvals: Sequence[ApprovalRecord],
    votes: dict[int, list[ApprovalVote]],
    calls: Sequence[ToolCallRecord],
) -> list[str]:
    """Every fact the run's rows hold that differs from the journal event that recorded it,
    one line each naming the row and the field."""
    found = _run_row(run, events)
    found += _approval_rows(run, events, approvals, votes)
    found += _call_rows(events, calls)
    return found


def _differs(row: str, field: str, stored: Any, journaled: Any) -> str:
    return (
        f"{row}.{field} is {_shown(stored)} but the journal recorded {_shown(journaled)}: "
        "the row was changed behind the store's back"
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _run_row(run: RunRecord, events: Sequence[EventRecord]) -> list[str]:
    """The run's row against its run_created and run_finished events."""
    found: list[str] = []
    row = f"runs[{run.id}]"
    created = next((e for e in events if e.type == EventType.RUN_CREATED), None)
    if created is not None:
        for field in ("role", "request", "requested_by", "parent_id"):
            if field in created.data and getattr(run, field) != created.data[field]:
                found.append(_differs(row, field, getattr(run, field), created.data[field]))
    finished = [e for e in events if e.type == EventType.RUN_FINISHED]
    if not finished:
        if run.status.is_terminal:
            found.append(
                f"{row}.status is {str(run.status)!r} but the journal never recorded the run's "
                "end: the row was changed behind the store's back"
            )
        return found
    end = finished[-1].data
    if str(run.status) != end.get("status"):
        found.append(_differs(row, "status", str(run.status), end.get("status")))
    if "by" in end:  # a cancel: the row says who
        error = f"cancelled by {end['by']}"
        if run.error != error:
            found.append(_differs(row, "error", run.error, error))
    else:
        if run.error != end.get("error"):
            found.append(_differs(row, "error", run.error, end.get("error")))
        if "summary" in end and run.summary != end["summary"]:
            found.append(_differs(row, "summary", run.summary, end["summary"]))
    return found


def _approval_rows(
    run: RunRecord,
    events: Sequence[EventRecord],
    approvals: Sequence[ApprovalRecord],
    votes: dict[int, list[ApprovalVote]],
) -> list[str]:
    """Each approval request's row (what it asked, who decided what) and its votes against
    the approval events of its run."""
    found: list[str] = []
    asked: dict[int, dict[str, Any]] = {}
    decided: dict[int, dict[str, Any]] = {}
    voted: dict[int, list[str]] = defaultdict(list)
    expired: set[int] = set()
    cancelled_by: str | None = None
    for event in events:
        data, approval_id = event.data, event.data.get("approval_id")
        match event.type:
            case EventType.APPROVAL_REQUESTED:
                asked[approval_id] = data
            case EventType.APPROVAL_DECIDED:
                decided[approval_id] = data
            case EventType.APPROVAL_VOTED:
                voted[approval_id].append(data.get("decided_by"))
            case EventType.APPROVAL_EXPIRED:
                expired.add(approval_id)
            case EventType.RUN_FINISHED if data.get("status") == "cancelled":
                cancelled_by = data.get("by")
    rows = {a.id: a for a in approvals}
    for approval_id in asked.keys() - rows.keys():
        found.append(
            f"approvals[{approval_id}] of run {run.id} is missing, though the journal recorded "
            "the request: its row was deleted"
        )
    for approval in approvals:
        row = f"approvals[{approval.id}]"
        request = asked.get(approval.id)
        if request is None:
            found.append(
                f"{row} (run {run.id}) has no approval_requested event: the row was inserted "
                "behind the store's back"
            )
            continue
        for field in ("step_id", "action", "number"):
            # A request from before numbering has none journaled (its row shows its id).
            if field == "number" and request.get(field) is None:
                continue
            if field in request and getattr(approval, field) != request[field]:
                found.append(_differs(row, field, getattr(approval, field), request[field]))
        found += _decision(row, approval, decided.get(approval.id), approval.id in expired,
                           cancelled_by)  # fmt: skip
        counted = sorted(v.decided_by for v in votes.get(approval.id, []))
        final = decided.get(approval.id, {}).get("decided_by")
        journaled = voted[approval.id]
        # Every vote row is a vote or the final decision the journal recorded; requests
        # decided before votes were kept have a decision and no vote row, which is fine.
        extra = [who for who in counted if who not in journaled and who != final]
        missing = [who for who in journaled if who not in counted]
        if extra:
            found.append(
                f"approval_votes of {row} hold {', '.join(extra)}, whom the journal never "
                "recorded deciding: the rows were changed behind the store's back"
            )
        if missing:
            found.append(
                f"approval_votes of {row} lack {', '.join(missing)}, whose vote the journal "
                "recorded: the rows were changed behind the store's back"
            )
    return found


def _decision(
    row: str,
    approval: ApprovalRecord,
    decided: dict[str, Any] | None,
    expired: bool,
    cancelled_by: str | None,
) -> list[str]:
    """An approval's status and decider against the event that ended the request."""
    if decided is not None:
        found = []
        if str(approval.status) != decided.get("decision"):
            found.append(_differs(row, "status", str(approval.status), decided.get("decision")))
        if approval.decided_by != decided.get("decided_by"):
            found.append(_differs(row, "decided_by", approval.decided_by, decided["decided_by"]))
        if approval.note != decided.get("note"):
            found.append(_differs(row, "note", approval.note, decided.get("note")))
        return found
    if expired:
        expected, by = ApprovalStatus.EXPIRED, None
    elif cancelled_by is not None and approval.status == ApprovalStatus.CANCELLED:
        expected, by = ApprovalStatus.CANCELLED, cancelled_by
    else:
        expected, by = ApprovalStatus.PENDING, None
    found = []
    if approval.status != expected:
        found.append(_differs(row, "status", str(approval.status), str(expected)))
    if approval.decided_by != by:
        found.append(_differs(row, "decided_by", approval.decided_by, by))
    return found


def _call_rows(events: Sequence[EventRecord], calls: Sequence[ToolCallRecord]) -> list[str]:
    """Each tool call's arguments, status and outcome (a step's result in every view) against
    the last tool_intent and tool_outcome events recorded for it (the row finds its arguments
    and outcome by chain position: one pointed elsewhere reads another call's)."""
    found: list[str] = []
    intended = {e.data.get("call_key"): e.data for e in events if e.type == EventType.TOOL_INTENT}
    outcomes = {e.data.get("call_key"): e.data for e in events if e.type == EventType.TOOL_OUTCOME}
    keys = {call.call_key for call in calls}
    for call_key in sorted(k for k in intended.keys() - keys if k):
        found.append(
            f"tool_calls[{call_key}] is missing, though the journal recorded its intent: its "
            "row was deleted"
        )
    for call in calls:
        row = f"tool_calls[{call.call_key}]"
        if call.call_key not in intended:
            found.append(
                f"{row} has no tool_intent event: the row was inserted behind the store's back"
            )
            continue
        if call.args != intended[call.call_key].get("args"):
            found.append(_differs(row, "args", call.args, intended[call.call_key].get("args")))
        if call.status in _BETWEEN_OUTCOMES:
            continue
        outcome = outcomes.get(call.call_key)
        if outcome is None:
            found.append(
                f"{row}.status is {call.status!r} but the journal recorded no outcome for it: "
                "the row was changed behind the store's back"
            )
            continue
        if call.status != outcome.get("status"):
            found.append(_differs(row, "status", call.status, outcome.get("status")))
        if call.outcome != outcome.get("outcome"):
            found.append(_differs(row, "outcome", call.outcome, outcome.get("outcome")))
    return found
