"""The run tree: children, siblings, and what a child's end does to its parent."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from agent.errors import RunNotFound
from agent.events import ChildrenStarted, PolicyTurn, RunCreated, ToolOutcome, WaitingForSibling
from agent.records import Checkpoint, Claim, RunRecord, RunStatus, RunTree
from agent.store.base import StoreBase
from agent.store.commands import NewChild, NewToolCall, Outcome
from agent.store.database import Connection
from agent.store.people import names_in
from agent.store.rows import (
    APPROVAL_COLUMNS,
    CALL_COLUMNS,
    EVENT_COLUMNS,
    SELECT_RUNS,
    TERMINAL,
    approval_from_row,
    call_from_row,
    event_from_row,
    run_from_row,
)


class TreeStore(StoreBase):
    """Parents, children and siblings of runs."""

    def _wake_parent(self, conn: Connection, run_id: str, now: float) -> None:
        """In the caller's transaction: when a child ends, wake its parent if it was the last.

        The parent's delegate call gets its outcome (every child's status and summary) and the
        parent is queued again, in the same transaction as the child's end.
        """
        self._touch_family(conn, run_id)
        self._wake_waiting_siblings(conn, run_id, now)
        row = conn.execute(
            "SELECT parent_id, spawned_by FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None or row["parent_id"] is None or row["spawned_by"] is None:
            return
        parent_id, call_key = row["parent_id"], row["spawned_by"]
        parent = conn.execute(
            "SELECT status, checkpoint FROM runs WHERE id = ?", (parent_id,)
        ).fetchone()
        if parent is None or parent[0] != RunStatus.WAITING_CHILDREN:
            return
        children = conn.execute(
            "SELECT id, role, status, summary, error FROM runs WHERE spawned_by = ? ORDER BY id",
            (call_key,),
        ).fetchall()
        if any(child[2] not in TERMINAL for child in children):
            return
        outcome = {
            "children": [
                {"run_id": c[0], "role": c[1], "status": c[2], "summary": c[3], "error": c[4]}
                for c in children
            ]
        }
        checkpoint = Checkpoint.from_json(parent[1])
        advanced = Checkpoint(**{**checkpoint.__dict__, "call": checkpoint.call + 1})
        (idx,) = self._append_events(
            conn,
            parent_id,
            [ToolOutcome(call_key, "ok", outcome)],
            now,
            {"status": RunStatus.QUEUED, "checkpoint": advanced.to_json()},
        )
        conn.execute(
            "UPDATE tool_calls SET status = 'ok', outcome_idx = ?, outcome_at = ? "
            "WHERE call_key = ? AND status = 'intent'",
            (idx, now, call_key),
        )

    async def _await_sibling(
        self,
        claim: Claim,
        call: NewToolCall,
        role: str,
        checkpoint: Checkpoint,
        turn: PolicyTurn | None = None,
        earlier: Outcome | None = None,
    ) -> dict[str, Any] | None:
        """Commit the intent of waiting for the sibling of `role`; park the run unless it ended.

        Returns the sibling's result when it has ended already (the caller records it as the
        call's outcome), else None: the run now waits, and the sibling's end wakes it.
        """
        now = time.time()
        run_id = claim.run_id

        def wait(conn: Connection) -> dict[str, Any] | None:
            self._fence(conn, claim, earlier)
            self._touch_family(conn, run_id)
            sibling = self._sibling(conn, run_id, role)
            events = []
            if turn is not None:
                events.append(turn)
            known = conn.execute(
                "SELECT 1 FROM tool_calls WHERE call_key = ?", (call.call_key,)
            ).fetchone()
            if known is None:  # a resumed wait keeps the intent it already has
                self._write_intent(conn, run_id, call, now, False, None, events)
            if sibling is None or sibling["status"] in TERMINAL:
                self._append_events(
                    conn,
                    run_id,
                    events,
                    now,
                    {"checkpoint": checkpoint.to_json()},
                )
                return sibling or {"run_id": None, "role": role, "status": "absent"}
            events.append(WaitingForSibling(sibling["run_id"]))
            self._park(conn, run_id, events, now, RunStatus.WAITING_CHILDREN, checkpoint)
            return None

        return await self._transaction(wait, durable=True)

    @staticmethod
    def _sibling(conn: Connection, run_id: str, role: str) -> dict[str, Any] | None:
        """The run of `role` started by the same delegate call as `run_id`."""
        row = conn.execute(
            "SELECT s.id AS run_id, s.role, s.status, s.summary, s.error FROM runs r "
            "JOIN runs s ON s.spawned_by = r.spawned_by AND s.id != r.id "
            "WHERE r.id = ? AND r.spawned_by IS NOT NULL AND s.role = ? ORDER BY s.id LIMIT 1",
            (run_id, role),
        ).fetchone()
        if row is None:
            return None
        return {key: row[key] for key in ("run_id", "role", "status", "summary", "error")}

    def _wake_waiting_siblings(self, conn: Connection, run_id: str, now: float) -> None:
        """In the caller's transaction: a run ended; wake the siblings that wait for it."""
        row = conn.execute("SELECT spawned_by, role FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None or row["spawned_by"] is None:
            return
        waiting = conn.execute(
            "SELECT r.id, r.checkpoint, c.call_key FROM runs r JOIN tool_calls c "
            "ON c.run_id = r.id AND c.tool = 'await_sibling' AND c.status = 'intent' "
            "WHERE r.spawned_by = ? AND r.id != ? AND r.status = 'waiting_children'",
            (row["spawned_by"], run_id),
        ).fetchall()
        for waiter in waiting:
            waiter_id, call_key = waiter["id"], waiter["call_key"]
            checkpoint_json = waiter["checkpoint"]
            sibling = self._sibling(conn, waiter_id, row["role"])
            if sibling is None or sibling["run_id"] != run_id:
                continue
            checkpoint = Checkpoint.from_json(checkpoint_json)
            advanced = Checkpoint(**{**checkpoint.__dict__, "call": checkpoint.call + 1})
            event = ToolOutcome(call_key, "ok", sibling)
            (idx,) = self._append_events(
                conn,
                waiter_id,
                [event],
                now,
                {"status": RunStatus.QUEUED, "checkpoint": advanced.to_json()},
            )
            conn.execute(
                "UPDATE tool_calls SET status = 'ok', outcome_idx = ?, outcome_at = ? "
                "WHERE call_key = ?",
                (idx, now, call_key),
            )

    async def _open_children(
        self,
        claim: Claim,
        call: NewToolCall,
        children: Sequence[NewChild],
        checkpoint: Checkpoint,
        turn: PolicyTurn | None = None,
        earlier: Outcome | None = None,
    ) -> list[str]:
        """Start child runs for a delegate call and park the parent until they all end.

        A role delegated twice in one parent gets the next free id (`…:sub:verifier-2`).
        """
        now = time.time()
        parent_id = claim.run_id

        def open_(conn: Connection) -> list[str]:
            self._fence(conn, claim, earlier)
            parent = conn.execute(
                "SELECT request, requested_by, origin, limits, policy, effects FROM runs "
                "WHERE id = ?",
                (parent_id,),
            ).fetchone()
            if parent is None:
                raise RunNotFound(f"unknown run id {parent_id!r}")
            events = []
            if turn is not None:
                events.append(turn)
            self._write_intent(conn, parent_id, call, now, False, None, events)
            ids = []
            for child in children:
                base = f"{parent_id}:sub:{child.role}"
                child_id, n = base, 1
                while conn.execute("SELECT 1 FROM runs WHERE id = ?", (child_id,)).fetchone():
                    n += 1
                    child_id = f"{base}-{n}"
                conn.execute(
                    "INSERT INTO runs (id, parent_id, role, status, request, requested_by, "
                    "origin, checkpoint, limits, created_at, updated_at, spawned_by, runbook_id, "
                    "policy, effects) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        child_id,
                        parent_id,
                        child.role,
                        parent["request"],
                        parent["requested_by"],
                        parent["origin"],
                        Checkpoint().to_json(),
                        parent["limits"],
                        now,
                        now,
                        call.call_key,
                        child.pin.runbook_id if child.pin else None,
                        parent["policy"],  # a child is driven like its parent,
                        parent["effects"],  # and acts on the world as it does
                    ),
                )
                if child.pin is not None:
                    self._pin_runbook(conn, child_id, child.pin)
                self._append_events(
                    conn,
                    child_id,
                    [
                        RunCreated(
                            role=child.role,
                            request=parent["request"],
                            requested_by=parent["requested_by"],
                            origin=json.loads(parent["origin"]),
                            limits=json.loads(parent["limits"]),
                            parent_id=parent_id,
                            runbook_id=child.pin.runbook_id if child.pin else None,
                        )
                    ],
                    now,
                )
                ids.append(child_id)
            self._announce_runnable(conn)
            events.append(ChildrenStarted(call.call_key, ids))
            self._park(conn, parent_id, events, now, RunStatus.WAITING_CHILDREN, checkpoint)
            return ids

        return await self._transaction(open_, durable=True)

    async def subtree_ids(self, run_id: str) -> list[str]:
        """The run and every run below it (never its parent or siblings)."""
        rows = await self._read(
            lambda c: c.execute(
                "WITH RECURSIVE tree(id, depth) AS (SELECT ?, 0 UNION ALL "
                "SELECT r.id, t.depth + 1 FROM runs r JOIN tree t ON r.parent_id = t.id) "
                "SELECT id FROM tree ORDER BY depth, id",
                (run_id,),
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def tree_ids(self, run_id: str) -> list[str]:
        """The root of the run's tree, then every run below it (parents before children)."""
        return await self.subtree_ids(await self.root_id(run_id))

    async def root_id(self, run_id: str) -> str:
        """The root of the run's tree; raises RunNotFound."""
        return await self._read(lambda conn: self._root_id(conn, run_id))

    async def read_tree(self, run_id: str, calls: bool = True, events: bool = False) -> RunTree:
        """The run and every run below it, with their approval requests, their tool calls
        (unless `calls` is False) and journals (if `events`), and the names of the people they
        name: one read, so every part shows the same moment. Raises RunNotFound."""
        below = (
            "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
            "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
        )
        among = "run_id IN (SELECT id FROM tree)"

        def read(conn: Connection) -> RunTree:
            rows = conn.execute(
                f"{below}{SELECT_RUNS} WHERE id IN (SELECT id FROM tree) ORDER BY created_at, id",
                (run_id,),
            ).fetchall()
            runs = _parents_first(run_id, [run_from_row(row) for row in rows])
            approvals = [
                approval_from_row(row)
                for row in conn.execute(
                    f"{below}SELECT {APPROVAL_COLUMNS} FROM approvals WHERE {among} ORDER BY id",
                    (run_id,),
                )
            ]
            found_calls = []
            if calls:
                order = {run.id: n for n, run in enumerate(runs)}
                found_calls = sorted(
                    (
                        call_from_row(row)
                        for row in conn.execute(
                            f"{below}SELECT {CALL_COLUMNS} FROM tool_calls WHERE {among}",
                            (run_id,),
                        )
                    ),
                    key=lambda call: (order[call.run_id], call.turn, call.position),
                )
            found_events = []
            if events:
                found_events = [
                    event_from_row(row)
                    for row in conn.execute(
                        f"{below}SELECT {EVENT_COLUMNS} FROM events WHERE {among} ORDER BY seq",
                        (run_id,),
                    )
                ]
            identities = [run.requested_by for run in runs]
            for approval in approvals:
                identities += [approval.requested_by, approval.decided_by or "", *approval.deciders]
            texts = [text for run in runs for text in (run.error, run.summary) if text]
            return RunTree(
                tuple(runs),
                tuple(approvals),
                tuple(found_calls),
                tuple(found_events),
                names_in(conn, identities, texts),
            )

        return await self._read(read)

    # -- runs ------------------------------------------------------------------------------


def _parents_first(root_id: str, runs: list[RunRecord]) -> list[RunRecord]:
    """`runs` (oldest first) from the root down: each run's children after it, level by level,
    oldest first; raises RunNotFound when the root is not among them."""
    children: dict[str | None, list[RunRecord]] = {}
    for run in runs:
        children.setdefault(run.parent_id, []).append(run)
    root = next((run for run in runs if run.id == root_id), None)
    if root is None:
        raise RunNotFound(f"unknown run id {root_id!r}")
    ordered = [root]
    for run in ordered:  # grows while it is walked: breadth first
        ordered.extend(children.get(run.id, []))
    return ordered
