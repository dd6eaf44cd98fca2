"""Rows to records: the column lists the store selects, and how each row becomes a record."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agent.records import (
    TERMINAL_STATUSES,
    ApprovalKind,
    ApprovalRecord,
    ApprovalStatus,
    Checkpoint,
    Effects,
    EventRecord,
    Origin,
    PolicyTurnRecord,
    RunLimits,
    RunRecord,
    RunStatus,
    ToolCallRecord,
)

TERMINAL = frozenset(str(status) for status in TERMINAL_STATUSES)


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


EVENT_COLUMNS = "seq, run_id, idx, ts, type, data, prev_hash, hash"


def event_from_row(row: Sequence[Any]) -> EventRecord:
    return EventRecord(
        seq=row[0],
        run_id=row[1],
        idx=row[2],
        ts=row[3],
        type=row[4],
        data=event_data(row[5]),
        prev_hash=row[6],
        hash=row[7],
    )


def event_data(raw: str) -> dict[str, Any]:
    """An event's data; text that is no longer JSON (a damaged or tampered journal) is kept as
    it is, so the hash check reports it instead of the reader crashing."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {"_undecodable": raw}
    return data if isinstance(data, dict) else {"_undecodable": raw}


RUN_COLUMNS = (
    "id, parent_id, role, status, request, requested_by, origin, runbook_id, runbook, params, "
    "checkpoint, limits, summary, error, lease_owner, lease_expires_at, created_at, updated_at, "
    "finished_at, lease_epoch, policy, effects"
)


def run_from_row(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        id=row[0],
        parent_id=row[1],
        role=row[2],
        status=RunStatus(row[3]),
        request=row[4],
        requested_by=row[5],
        origin=Origin.from_json(row[6]),
        runbook_id=row[7],
        runbook=json.loads(row[8]) if row[8] else None,
        params=json.loads(row[9]) if row[9] else {},
        checkpoint=Checkpoint.from_json(row[10]),
        limits=RunLimits.from_json(row[11]),
        summary=row[12],
        error=row[13],
        lease_owner=row[14],
        lease_expires_at=row[15],
        created_at=row[16],
        updated_at=row[17],
        finished_at=row[18],
        lease_epoch=row[19],
        policy=row[20],
        effects=Effects.from_json(row[21]) if row[21] else None,
    )


CALL_COLUMNS = (
    "call_key, run_id, turn, position, tool, args, step_id, attempt, status, outcome, intent_at, "
    "outcome_at, duration_ms, repeatable, attempt_info"
)


def call_from_row(row: Sequence[Any]) -> ToolCallRecord:
    return ToolCallRecord(
        call_key=row[0],
        run_id=row[1],
        turn=row[2],
        position=row[3],
        tool=row[4],
        args=json.loads(row[5]),
        step_id=row[6],
        attempt=row[7],
        status=row[8],
        outcome=json.loads(row[9]) if row[9] else None,
        intent_at=row[10],
        outcome_at=row[11],
        duration_ms=row[12],
        repeatable=bool(row[13]),
        attempt_info=json.loads(row[14]) if row[14] else None,
    )


TURN_COLUMNS = (
    "run_id, turn, policy, request_hash, response, prompt_tokens, completion_tokens, created_at"
)


def turn_from_row(row: Sequence[Any]) -> PolicyTurnRecord:
    return PolicyTurnRecord(
        run_id=row[0],
        turn=row[1],
        policy=row[2],
        request_hash=row[3],
        response=json.loads(row[4]),
        prompt_tokens=row[5],
        completion_tokens=row[6],
        created_at=row[7],
    )


APPROVAL_COLUMNS = (
    "id, token, run_id, call_key, kind, step_id, action, reason, rollback, deciders, four_eyes, "
    "requested_by, status, decided_by, decided_at, note, created_at, deadline_at, number, mode, "
    "runs_on, evidence"
)


def approval_from_row(row: Sequence[Any]) -> ApprovalRecord:
    return ApprovalRecord(
        id=row[0],
        token=row[1],
        run_id=row[2],
        call_key=row[3],
        kind=ApprovalKind(row[4]),
        step_id=row[5],
        action=row[6],
        reason=row[7],
        rollback=row[8],
        deciders=json.loads(row[9]),
        four_eyes=bool(row[10]),
        requested_by=row[11],
        status=ApprovalStatus(row[12]),
        decided_by=row[13],
        decided_at=row[14],
        note=row[15],
        created_at=row[16],
        deadline_at=row[17],
        number=row[18] if row[18] is not None else row[0],  # requests from before: their id
        mode=row[19],
        runs_on=row[20],
        evidence=json.loads(row[21]) if row[21] else [],
    )
