"""Approval requests: open, decide, remind, escalate, expire."""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from agent.errors import ApprovalNotFound
from agent.events import (
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalReminded,
    ApprovalRequested,
    ApprovalVoted,
    Event,
    PolicyTurn,
    RunFinished,
    ToolOutcome,
)
from agent.records import (
    ApprovalInRun,
    ApprovalKind,
    ApprovalRecord,
    ApprovalStatus,
    ApprovalVote,
    ChatNotice,
    Checkpoint,
    Claim,
    Hop,
    RunRecord,
    RunStatus,
    VoteOutcome,
    record,
)
from agent.store.base import StoreBase
from agent.store.commands import DecisionEffect, NewApproval, NewToolCall, Outcome
from agent.store.database import Connection
from agent.store.people import names_in
from agent.store.rows import (
    APPROVAL_COLUMNS,
    SELECT_RUNS,
    VOTE_COLUMNS,
    approval_from_row,
    dumps,
    run_from_row,
    vote_from_row,
)


@record
class HopMade:
    """What a hop wrote: whether this call made it (else it was made already, or the
    request is no longer pending), the request as it is now, and whom it reached privately."""

    made: bool
    approval: ApprovalRecord
    privately: list[str]


@record
class Decided:
    """What a decision wrote: whether it was recorded (a late one expires the request
    instead; one judged on votes that changed meanwhile is `stale`), and the request, its
    run and its votes as they are after it."""

    changed: bool
    approval: ApprovalRecord
    run: RunRecord
    votes: tuple[ApprovalVote, ...] = ()
    stale: bool = False


class ApprovalsStore(StoreBase):
    """Requests for a person's decision."""

    async def _open_approval(
        self,
        claim: Claim,
        approval: NewApproval,
        checkpoint: Checkpoint,
        call: NewToolCall | None = None,
        turn: PolicyTurn | None = None,
        earlier: Outcome | None = None,
    ) -> ApprovalRecord:
        """Open a request and park the run: one transaction, so no request is ever lost.

        `call` is the await_approval call that asked (journaled as intent); an in-doubt request
        has none. The run's lease is released: a waiting run holds no process.
        """
        now = time.time()
        token = secrets.token_urlsafe(12)
        run_id = claim.run_id

        def open_(conn: Connection) -> int:
            self._fence(conn, claim, earlier)
            number = self._next_request_number(conn, run_id)
            events = []
            if turn is not None:
                events.append(turn)
            if call is not None:
                self._write_intent(conn, run_id, call, now, False, None, events)
            cursor = conn.execute(
                "INSERT INTO approvals (token, run_id, call_key, kind, step_id, action, reason, "
                "rollback, deciders, four_eyes, requested_by, status, created_at, deadline_at, "
                "number, mode, runs_on, evidence, required, remind_at, escalate_at, escalate_to, "
                "on_expiry) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', "
                "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                (
                    token,
                    run_id,
                    approval.call_key,
                    str(approval.kind),
                    approval.step_id,
                    approval.action,
                    approval.reason,
                    approval.rollback,
                    dumps(approval.deciders),
                    int(approval.four_eyes),
                    approval.requested_by,
                    now,
                    approval.deadline_at,
                    number,
                    approval.mode,
                    approval.runs_on,
                    dumps(approval.evidence),
                    approval.required,
                    approval.remind_at,
                    approval.escalate_at,
                    dumps(approval.escalate_to),
                    approval.on_expiry,
                ),
            )
            approval_id = int(cursor.fetchone()["id"])
            payload = {
                "approval_id": approval_id,
                "number": number,
                "mode": approval.mode,
                "runs_on": approval.runs_on,
                "evidence": approval.evidence,
                "token": token,
                "kind": str(approval.kind),
                "step_id": approval.step_id,
                "action": approval.action,
                "reason": approval.reason,
                "rollback": approval.rollback,
                "deciders": approval.deciders,
                "deadline_at": approval.deadline_at,
                "required": approval.required,
                "remind_at": approval.remind_at,
                "escalate_at": approval.escalate_at,
                "escalate_to": approval.escalate_to,
                "on_expiry": approval.on_expiry,
            }
            # The token works like a password for buttons: chats get it, the journal does not.
            journaled = {k: v for k, v in payload.items() if k != "token"}
            events.append(ApprovalRequested(**journaled))
            self._park(conn, run_id, events, now, RunStatus.WAITING_APPROVAL, checkpoint)
            self._enqueue_outbox(conn, run_id, ChatNotice.APPROVAL_REQUEST, payload, now)
            return approval_id

        approval_id = await self._transaction(open_, durable=True)
        self.approval_opened.set()  # its timers may come before the sweeper's next look
        return await self.get_approval(approval_id)

    @functools.cached_property
    def approval_opened(self) -> asyncio.Event:
        """Set when this process opens a request: the approval timers' sweeper looks again."""
        return asyncio.Event()

    def _next_request_number(self, conn: Connection, run_id: str) -> int:
        """In an opening transaction: the next request number of the run's incident (its
        tree), counted from 1. The root's row is locked first, so two requests of one tree
        opened at once get different numbers."""
        root = self._root_id(conn, run_id)
        conn.execute("SELECT id FROM runs WHERE id = ?" + self.dialect.for_update, (root,))
        row = conn.execute(
            "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
            "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
            "SELECT COUNT(*) AS requests FROM approvals WHERE run_id IN (SELECT id FROM tree)",
            (root,),
        ).fetchone()
        return int(row["requests"]) + 1

    async def get_approval_by_number(self, run_id: str, number: int) -> ApprovalRecord:
        """The request numbered `number` in the incident (tree) `run_id` belongs to."""

        def find(conn: Connection) -> Sequence[Any] | None:
            root = self._root_id(conn, run_id)
            return conn.execute(
                "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
                "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
                f"SELECT {APPROVAL_COLUMNS} FROM approvals "
                "WHERE run_id IN (SELECT id FROM tree) AND number = ?",
                (root, number),
            ).fetchone()

        row = await self._read(find)
        if row is None:
            raise ApprovalNotFound(f"run {run_id} has no request #{number}")
        return approval_from_row(row)

    async def get_approval(self, approval_id: int) -> ApprovalRecord:
        """One approval request by id."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (approval_id,)
            ).fetchone()
        )
        if row is None:
            raise ApprovalNotFound(f"no approval request {approval_id}")
        return approval_from_row(row)

    async def approval_in_run(
        self, approval_id: int | None = None, token: str | None = None
    ) -> ApprovalInRun:
        """One approval request, by id or by its opaque token, with its run, that run's
        ancestry and the names of the people it names: one read. Raises ApprovalNotFound."""
        if token is not None:
            where, key, missing = "token = ?", token, "no such approval request"
        else:
            where, key, missing = "id = ?", approval_id, f"no approval request {approval_id}"

        def read(conn: Connection) -> ApprovalInRun:
            row = conn.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE {where}", (key,)
            ).fetchone()
            if row is None:
                raise ApprovalNotFound(missing)
            approval = approval_from_row(row)
            run = run_from_row(
                conn.execute(f"{SELECT_RUNS} WHERE id = ?", (approval.run_id,)).fetchone()
            )
            lineage = [run.id]
            parent = run.parent_id
            while parent is not None:
                lineage.append(parent)
                up = conn.execute("SELECT parent_id FROM runs WHERE id = ?", (parent,)).fetchone()
                parent = up["parent_id"] if up is not None else None
            votes = _votes(conn, approval.id)
            identities = [run.requested_by, approval.decided_by or "", *approval.deciders]
            identities += [vote.decided_by for vote in votes]
            return ApprovalInRun(
                approval, run, tuple(lineage), names_in(conn, identities), tuple(votes)
            )

        return await self._read(read)

    async def list_approvals(
        self, run_id: str | None = None, status: ApprovalStatus | None = None
    ) -> list[ApprovalRecord]:
        """Approval requests, oldest first, filtered by run and/or status."""
        clauses, params = [], []
        if run_id is not None:
            clauses.append("run_id = ?")
            params.append(run_id)
        if status is not None:
            clauses.append("status = ?")
            params.append(str(status))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals {where} ORDER BY id", params
            ).fetchall()
        )
        return [approval_from_row(row) for row in rows]

    async def approved_gate_counts(self, run_id: str) -> Counter[str]:
        """How many attempts people allowed of each step of a run: approvals of its gate, and
        "retry" decisions on its in-doubt attempts (each good for one attempt)."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT step_id, COUNT(*) AS approved FROM approvals WHERE run_id = ? "
                "AND status = 'approved' AND step_id IS NOT NULL GROUP BY step_id",
                (run_id,),
            ).fetchall()
        )
        return Counter({row["step_id"]: row["approved"] for row in rows})

    async def approval_votes(self, approval_id: int) -> list[ApprovalVote]:
        """The decisions counted on a request so far, oldest first."""
        return await self._read(lambda conn: _votes(conn, approval_id))

    async def decide_approval(
        self,
        approval_id: int,
        status: ApprovalStatus,
        decided_by: str,
        note: str | None,
        effect: DecisionEffect,
        *,
        person: str,
        outcome: VoteOutcome,
        counted: Sequence[str],
        approvals: int = 1,
    ) -> Decided:
        """Record `person`'s decision as `outcome` (counted, completes or ends) and apply
        its effect, atomically; returns the request, its run and its votes as the transaction
        left them, so nothing reads them again.

        `counted` is the votes the outcome was judged on, by the person each is stored under;
        `approvals` how many of them count under the people file in force, this one included
        (what `approval_voted` journals). When the request's votes are not exactly those any
        more (someone voted meanwhile), nothing is written and `stale` says to judge again.
        Not recorded either (`changed` False) when the request was already decided, or when
        its deadline passed, which expires it instead.
        """
        now = time.time()

        def decide(conn: Connection) -> Decided:
            changed, stale = record(conn)
            approval = approval_from_row(
                conn.execute(
                    f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (approval_id,)
                ).fetchone()
            )
            run = run_from_row(
                conn.execute(f"{SELECT_RUNS} WHERE id = ?", (approval.run_id,)).fetchone()
            )
            return Decided(changed, approval, run, tuple(_votes(conn, approval_id)), stale)

        def record(conn: Connection) -> tuple[bool, bool]:
            # Locked first: deciders of one request take turns, so the count read below is
            # the one this decision is judged against (two last approvals cannot both
            # complete it, nor one complete it after a reject).
            row = conn.execute(
                "SELECT run_id, call_key, number, status, required FROM approvals WHERE id = ?"
                + self.dialect.for_update,
                (approval_id,),
            ).fetchone()
            if row is None:
                raise ApprovalNotFound(f"no approval request {approval_id}")
            run_id, call_key, number = row["run_id"], row["call_key"], row["number"]
            # The deadline is checked here, in the deciding transaction: a decision that
            # arrives late expires the request instead, whatever the caller checked before.
            if (
                self._expire_if_overdue(conn, approval_id, now) is not None
                or row["status"] != "pending"
            ):
                return False, False
            # A pending request holds approvals only (a reject ends it).
            if sorted(v.person for v in _votes(conn, approval_id)) != sorted(counted):
                return False, True
            # One row per person: a vote stored under this name that no longer counts (its
            # identity is now another person's, or may decide no more) gives way to this one;
            # the journal keeps both.
            conn.execute(
                f"INSERT INTO approval_votes ({VOTE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (approval_id, person) DO UPDATE SET decided_by = excluded.decided_by, "
                "decision = excluded.decision, note = excluded.note, "
                "decided_at = excluded.decided_at",
                (approval_id, person, decided_by, _vote_decision(status), note, now),
            )
            if outcome == VoteOutcome.COUNTED:
                # A new version of the request's row: a decider waiting on its lock (on
                # PostgreSQL) must then start again from a snapshot that holds this vote.
                conn.execute(
                    "UPDATE approvals SET required = required WHERE id = ?", (approval_id,)
                )
                voted = ApprovalVoted(
                    approval_id=approval_id,
                    decided_by=decided_by,
                    approvals=approvals,
                    required=row["required"],
                    number=number,
                    note=note,
                )
                self._append_events(conn, run_id, [voted], now)
                self._enqueue_outbox(
                    conn,
                    run_id,
                    ChatNotice.APPROVAL_VOTED,
                    {"approval_id": approval_id, "decided_by": decided_by, "approvals": approvals},
                    now,
                )
                return True, False
            conn.execute(
                "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, note = ? "
                "WHERE id = ?",
                (str(status), decided_by, now, note, approval_id),
            )
            events: list[Event] = [
                ApprovalDecided(
                    approval_id=approval_id,
                    number=number,
                    call_key=call_key,
                    decision=str(status),
                    decided_by=decided_by,
                    note=note,
                )
            ]
            if effect.call_status is not None and effect.call_outcome is not None:
                events.append(ToolOutcome(call_key, effect.call_status, effect.call_outcome))
            updates: dict[str, Any] = {"status": str(effect.run_status)}
            if effect.checkpoint is not None:
                updates["checkpoint"] = effect.checkpoint.to_json()
            if effect.run_status.is_terminal:
                updates["finished_at"] = now
                updates["error"] = effect.error
                events.append(RunFinished(str(effect.run_status), error=effect.error))
            taken = self._append_events(conn, run_id, events, now, updates)
            if effect.call_status is not None:
                # A new outcome is the event after the decision; a retry keeps the last one.
                outcome_idx = taken[1] if effect.call_outcome is not None else None
                conn.execute(
                    "UPDATE tool_calls SET status = ?, outcome_idx = COALESCE(?, outcome_idx), "
                    "outcome_at = ? WHERE call_key = ?",
                    (effect.call_status, outcome_idx, now, call_key),
                )
            self._enqueue_outbox(
                conn,
                run_id,
                ChatNotice.APPROVAL_DECIDED,
                {
                    "approval_id": approval_id,
                    "decision": str(status),
                    "decided_by": decided_by,
                    "decided_at": now,
                    "note": note,
                },
                now,
            )
            if effect.run_status.is_terminal:
                self._enqueue_outbox(
                    conn, run_id, ChatNotice.RUN_FINISHED, {"status": str(effect.run_status)}, now
                )
                self._wake_parent(conn, run_id, now)
            return True, False

        return await self._transaction(decide, durable=True)

    async def expire_approval(self, approval_id: int) -> RunRecord | None:
        """Expire a pending request past its deadline and end its run as expired (or queue
        it to roll back); returns the run as the expiry left it, None when the request was
        not pending and overdue."""
        now = time.time()

        def expire(conn: Connection) -> RunRecord | None:
            run_id = self._expire_if_overdue(conn, approval_id, now)
            if run_id is None:
                return None
            return run_from_row(conn.execute(f"{SELECT_RUNS} WHERE id = ?", (run_id,)).fetchone())

        return await self._transaction(expire, durable=True)

    def _expire_if_overdue(self, conn: Connection, approval_id: int, now: float) -> str | None:
        """In the caller's transaction: expire the request if it is pending and overdue;
        returns its run's id if it did."""
        row = conn.execute(
            "SELECT run_id, call_key, kind, on_expiry FROM approvals "
            "WHERE id = ? AND status = 'pending' AND deadline_at <= ?",
            (approval_id, now),
        ).fetchone()
        if row is None:
            return None
        run_id = row["run_id"]
        conn.execute(
            "UPDATE approvals SET status = 'expired', decided_at = ? WHERE id = ?",
            (now, approval_id),
        )
        expired = {"approval_id": approval_id}
        if row["on_expiry"] == "rollback" and row["kind"] == str(ApprovalKind.GATE):
            # Never consent: the gated call's outcome says no, and the run goes back to the
            # kernel to roll its completed steps back, which then ends it as expired.
            outcome = {"approved": False, "expired": True, "decided_at": now}
            head = conn.execute("SELECT checkpoint FROM runs WHERE id = ?", (run_id,)).fetchone()
            checkpoint = Checkpoint.from_json(head["checkpoint"]).rolling_back()
            _, outcome_idx = self._append_events(
                conn,
                run_id,
                [
                    ApprovalExpired(approval_id, on_expiry="rollback"),
                    ToolOutcome(row["call_key"], "ok", outcome),
                ],
                now,
                {"status": RunStatus.QUEUED, "checkpoint": checkpoint.to_json()},
            )
            conn.execute(
                "UPDATE tool_calls SET status = 'ok', outcome_idx = ?, outcome_at = ? "
                "WHERE call_key = ?",
                (outcome_idx, now, row["call_key"]),
            )
            self._enqueue_outbox(conn, run_id, ChatNotice.APPROVAL_EXPIRED, expired, now)
            return run_id
        error = "approval request expired without a decision"
        self._append_events(
            conn,
            run_id,
            [
                ApprovalExpired(approval_id),
                RunFinished("expired", error=error),
            ],
            now,
            {"status": RunStatus.EXPIRED, "finished_at": now, "error": error},
        )
        self._enqueue_outbox(conn, run_id, ChatNotice.APPROVAL_EXPIRED, expired, now)
        self._enqueue_outbox(conn, run_id, ChatNotice.RUN_FINISHED, {"status": "expired"}, now)
        self._wake_parent(conn, run_id, now)
        return run_id

    async def next_approval_timer(self) -> float | None:
        """The earliest timer of a pending request still to go off, if any: a reminder or an
        escalation not made yet, or a deadline."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT MIN(CASE WHEN remind_at IS NOT NULL AND reminded_at IS NULL "
                "THEN remind_at ELSE deadline_at END) AS remind, "
                "MIN(CASE WHEN escalate_at IS NOT NULL AND escalated_at IS NULL "
                "THEN escalate_at ELSE deadline_at END) AS escalate "
                "FROM approvals WHERE status = 'pending'"
            ).fetchone()
        )
        timers = [at for at in (row["remind"], row["escalate"]) if at is not None]
        return min(timers) if timers else None

    async def due_approval_hops(self) -> list[tuple[int, Hop]]:
        """Pending requests (not overdue) with a hop due now and not made yet, each hop as
        (request id, hop), oldest request first, a reminder before an escalation."""
        now = time.time()
        rows = await self._read(
            lambda c: c.execute(
                "SELECT id, remind_at <= ? AND reminded_at IS NULL AS remind, "
                "escalate_at <= ? AND escalated_at IS NULL AS escalate FROM approvals "
                "WHERE status = 'pending' AND deadline_at > ? AND ("
                "(remind_at <= ? AND reminded_at IS NULL) OR "
                "(escalate_at <= ? AND escalated_at IS NULL)) ORDER BY id",
                (now, now, now, now, now),
            ).fetchall()
        )
        due: list[tuple[int, Hop]] = []
        for row in rows:
            due += [(row["id"], hop) for hop in Hop if row[str(hop)]]
        return due

    async def make_hop(self, approval_id: int, hop: Hop, mentioned: Sequence[str]) -> HopMade:
        """Make `hop` of a pending request, once, in one transaction: record it, journal it
        (`approval_reminded`, or `approval_escalated`, which adds `escalate_to` to its
        deciders unless anyone could decide it already), and queue its news: a reply in the
        run's chat mentioning `mentioned` (identities), and a private message to each of them
        who started the bot.

        Several processes may try the same hop: the one whose UPDATE finds it not made yet
        makes it; the others (and a request decided, expired or overdue meanwhile) get
        `made` False and change nothing. Returns the request as the transaction left it."""
        now = time.time()
        at, planned = (
            ("reminded_at", "remind_at") if hop == Hop.REMIND else ("escalated_at", "escalate_at")
        )

        def make(conn: Connection) -> HopMade:
            changed = conn.execute(
                f"UPDATE approvals SET {at} = ? WHERE id = ? AND status = 'pending' "
                f"AND {at} IS NULL AND {planned} <= ? AND deadline_at > ?",
                (now, approval_id, now, now),
            )
            row = conn.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (approval_id,)
            ).fetchone()
            if row is None:
                raise ApprovalNotFound(f"no approval request {approval_id}")
            approval = approval_from_row(row)
            if changed.rowcount != 1:
                return HopMade(False, approval, [])
            privately = _private_chats(conn, mentioned)
            event: Event
            if hop == Hop.REMIND:
                event = ApprovalReminded(approval_id, approval.number, list(mentioned), privately)
                kind = ChatNotice.APPROVAL_REMINDED
            else:
                event = ApprovalEscalated(
                    approval_id,
                    approval.number,
                    approval.escalate_to,
                    list(mentioned),
                    privately,
                )
                kind = ChatNotice.APPROVAL_ESCALATED
            self._append_events(conn, approval.run_id, [event], now)
            names = names_in(conn, mentioned)
            payload = {
                "approval_id": approval_id,
                "mentions": [{"identity": i, "display": names.get(i)} for i in mentioned],
            }
            private_chats = [int(identity.partition(":")[2]) for identity in privately]
            self._enqueue_outbox(conn, approval.run_id, kind, payload, now, private_chats)
            return HopMade(True, approval, privately)

        return await self._transaction(make, durable=True)

    async def overdue_approval_ids(self) -> list[int]:
        """Pending requests whose deadline has passed."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT id FROM approvals WHERE status = 'pending' AND deadline_at <= ? "
                "ORDER BY id",
                (time.time(),),
            ).fetchall()
        )
        return [row["id"] for row in rows]


def _private_chats(conn: Connection, identities: Sequence[str]) -> list[str]:
    """In the caller's transaction: those of `identities` (chat identities) whose person
    wrote to the bot in a private chat, so a private message can reach them."""
    wanted = sorted({i for i in identities if i.startswith("telegram:")})
    if not wanted:
        return []
    marks = ", ".join("?" for _ in wanted)
    rows = conn.execute(
        f"SELECT identity FROM chat_users WHERE identity IN ({marks}) "
        "AND private_chat_at IS NOT NULL",
        wanted,
    ).fetchall()
    started = {row["identity"] for row in rows}
    return [i for i in identities if i in started]


def _votes(conn: Connection, approval_id: int) -> list[ApprovalVote]:
    """In the caller's transaction: the decisions counted on a request, oldest first."""
    rows = conn.execute(
        f"SELECT {VOTE_COLUMNS} FROM approval_votes WHERE approval_id = ? "
        "ORDER BY decided_at, person",
        (approval_id,),
    ).fetchall()
    return [vote_from_row(row) for row in rows]


def _vote_decision(status: ApprovalStatus) -> str:
    """How a vote records the decision that made `status`."""
    return {
        ApprovalStatus.APPROVED: "approve",
        ApprovalStatus.SKIPPED: "skip",
        ApprovalStatus.REJECTED: "reject",
    }[status]
