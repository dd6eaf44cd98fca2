"""Rows to records: the column lists the store selects, and how each row becomes a record."""

from __future__ import annotations

import json
from typing import Any

from agent.records import (
    TERMINAL_STATUSES,
    ApiTokenRecord,
    ApprovalKind,
    ApprovalRecord,
    ApprovalStatus,
    ApprovalVote,
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
from agent.store.database import Row

TERMINAL = frozenset(str(status) for status in TERMINAL_STATUSES)


# One encoder for every row: `json.dumps` with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(data: Any) -> str:
    return _ENCODER.encode(data)


EVENT_COLUMNS = "seq, run_id, idx, ts, type, data, prev_hash, hash, key_id"


def event_from_row(row: Row) -> EventRecord:
    return EventRecord(
        seq=row["seq"],
        run_id=row["run_id"],
        idx=row["idx"],
        ts=row["ts"],
        type=row["type"],
        data=event_data(row["data"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
        key_id=row["key_id"],
    )


def event_data(raw: str) -> dict[str, Any]:
    """An event's data; text that is no longer JSON (a damaged or tampered journal) is kept as
    it is, so the hash check reports it instead of the reader crashing."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {"_undecodable": raw}
    return data if isinstance(data, dict) else {"_undecodable": raw}


# The run's row, and its pinned runbook kept apart (a step rewrites the row, never the runbook).
SELECT_RUNS = (
    "SELECT id, parent_id, role, status, request, requested_by, origin, runbook_id, runbook, "
    "params, checkpoint, limits, summary, error, lease_owner, lease_expires_at, created_at, "
    "updated_at, finished_at, lease_epoch, policy, effects, run_no, event_count, last_hash, "
    "key_id, not_before "
    "FROM runs LEFT JOIN run_runbooks ON run_runbooks.run_id = runs.id"
)


def run_from_row(row: Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        parent_id=row["parent_id"],
        role=row["role"],
        status=RunStatus(row["status"]),
        request=row["request"],
        requested_by=row["requested_by"],
        origin=Origin.from_json(row["origin"]),
        runbook_id=row["runbook_id"],
        runbook=json.loads(row["runbook"]) if row["runbook"] else None,
        params=json.loads(row["params"]) if row["params"] else {},
        checkpoint=Checkpoint.from_json(row["checkpoint"]),
        limits=RunLimits.from_json(row["limits"]),
        summary=row["summary"],
        error=row["error"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        lease_epoch=row["lease_epoch"],
        policy=row["policy"],
        effects=Effects.from_json(row["effects"]) if row["effects"] else None,
        run_no=row["run_no"],
        event_count=row["event_count"],
        last_hash=row["last_hash"],
        key_id=row["key_id"],
        not_before=row["not_before"],
    )


# A call's arguments and outcome are its journal's `tool_intent` and `tool_outcome` events,
# found by the chain positions its row keeps (each payload is stored once). The event's type
# is part of the lookup: a position that names any other event reads as nothing.
CALL_COLUMNS = (
    "call_key, run_id, turn, position, tool, step_id, attempt, status, intent_at, outcome_at, "
    "duration_ms, repeatable, attempt_info, "
    "(SELECT data FROM events WHERE events.run_id = tool_calls.run_id "
    "AND events.idx = tool_calls.intent_idx AND events.type = 'tool_intent') AS intent, "
    "(SELECT data FROM events WHERE events.run_id = tool_calls.run_id "
    "AND events.idx = tool_calls.outcome_idx AND events.type = 'tool_outcome') AS outcome"
)


def call_from_row(row: Row) -> ToolCallRecord:
    return ToolCallRecord(
        call_key=row["call_key"],
        run_id=row["run_id"],
        turn=row["turn"],
        position=row["position"],
        tool=row["tool"],
        args=json.loads(row["intent"])["args"] if row["intent"] else {},
        step_id=row["step_id"],
        attempt=row["attempt"],
        status=row["status"],
        outcome=json.loads(row["outcome"])["outcome"] if row["outcome"] else None,
        intent_at=row["intent_at"],
        outcome_at=row["outcome_at"],
        duration_ms=row["duration_ms"],
        repeatable=bool(row["repeatable"]),
        attempt_info=json.loads(row["attempt_info"]) if row["attempt_info"] else None,
    )


# A policy turn is its `policy_turn` event: the journal stores each answer once.
TURN_COLUMNS = "run_id, ts, data"


def turn_from_row(row: Row) -> PolicyTurnRecord:
    data = json.loads(row["data"])
    return PolicyTurnRecord(
        run_id=row["run_id"],
        turn=data["turn"],
        policy=data["policy"],
        request_hash=data["request_hash"],
        response=data["response"],
        prompt_tokens=data.get("prompt_tokens", 0),
        completion_tokens=data.get("completion_tokens", 0),
        created_at=row["ts"],
    )


APPROVAL_COLUMNS = (
    "id, token, run_id, call_key, kind, step_id, action, reason, rollback, deciders, four_eyes, "
    "requested_by, status, decided_by, decided_at, note, created_at, deadline_at, number, mode, "
    "runs_on, evidence, required, remind_at, reminded_at, escalate_at, escalated_at, "
    "escalate_to, on_expiry"
)


def approval_from_row(row: Row) -> ApprovalRecord:
    return ApprovalRecord(
        id=row["id"],
        token=row["token"],
        run_id=row["run_id"],
        call_key=row["call_key"],
        kind=ApprovalKind(row["kind"]),
        step_id=row["step_id"],
        action=row["action"],
        reason=row["reason"],
        rollback=row["rollback"],
        deciders=json.loads(row["deciders"]),
        four_eyes=bool(row["four_eyes"]),
        requested_by=row["requested_by"],
        status=ApprovalStatus(row["status"]),
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
        note=row["note"],
        created_at=row["created_at"],
        deadline_at=row["deadline_at"],
        number=row["number"]
        if row["number"] is not None
        else row["id"],  # requests from before: their id
        mode=row["mode"],
        runs_on=row["runs_on"],
        evidence=json.loads(row["evidence"]) if row["evidence"] else [],
        required=row["required"],
        remind_at=row["remind_at"],
        reminded_at=row["reminded_at"],
        escalate_at=row["escalate_at"],
        escalated_at=row["escalated_at"],
        escalate_to=json.loads(row["escalate_to"]) if row["escalate_to"] else [],
        on_expiry=row["on_expiry"],
    )


VOTE_COLUMNS = "approval_id, person, decided_by, decision, note, decided_at"


def vote_from_row(row: Row) -> ApprovalVote:
    return ApprovalVote(
        approval_id=row["approval_id"],
        person=row["person"],
        decided_by=row["decided_by"],
        decision=row["decision"],
        note=row["note"],
        decided_at=row["decided_at"],
    )


TOKEN_COLUMNS = "name, person, created_at, revoked_at"  # never the hash: nothing shows it


def token_from_row(row: Row) -> ApiTokenRecord:
    return ApiTokenRecord(
        name=row["name"],
        person=row["person"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
