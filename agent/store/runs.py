"""Runs: create, read, list, finish and cancel."""

from __future__ import annotations

import time
from typing import Any

from agent.errors import RunExists, RunNotFound, RunNotRunnable, TooManyRuns
from agent.events import PolicyTurn, RunCreated, RunFinished
from agent.records import ChatNotice, Checkpoint, Claim, RunRecord, RunStatus
from agent.store.base import RunHead, StoreBase
from agent.store.commands import NewRun, Outcome
from agent.store.database import Connection
from agent.store.rows import SELECT_RUNS, run_from_row


class RunsStore(StoreBase):
    """The runs aggregate."""

    async def create_run(self, new: NewRun, max_active: int | None = None) -> RunRecord:
        """Create a queued run; raises RunExists for a duplicate id, and TooManyRuns when
        `max_active` incidents are active already (counted in the creating transaction, which
        every process's creations serialize on: the run counter's row)."""
        now = time.time()

        def create(conn: Connection) -> RunHead:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (new.id,)).fetchone():
                raise RunExists(f"run id {new.id!r} exists already")
            if max_active is not None and _active_roots(conn) >= max_active:
                raise TooManyRuns(
                    f"{max_active} active run(s), the limit (LOOM_OPS_MAX_ACTIVE_RUNS); "
                    "try again shortly"
                )
            if (
                new.parent_id is not None
                and not conn.execute("SELECT 1 FROM runs WHERE id = ?", (new.parent_id,)).fetchone()
            ):
                raise RunNotFound(f"unknown parent run id {new.parent_id!r}")
            # DO NOTHING: the same id created by another process at this moment is RunExists
            # (on PostgreSQL a conflict with a row this snapshot cannot see runs this again).
            inserted = conn.execute(
                "INSERT INTO runs (id, parent_id, role, status, request, requested_by, origin, "
                "checkpoint, limits, created_at, updated_at, policy, effects) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (
                    new.id,
                    new.parent_id,
                    new.role,
                    RunStatus.QUEUED,
                    new.request,
                    new.requested_by,
                    new.origin.to_json(),
                    Checkpoint().to_json(),
                    new.limits.to_json(),
                    now,
                    now,
                    new.policy,
                    new.effects.to_json() if new.effects else None,
                ),
            )
            if inserted.rowcount != 1:
                raise RunExists(f"run id {new.id!r} exists already")
            event = RunCreated(
                role=new.role,
                request=new.request,
                requested_by=new.requested_by,
                origin=new.origin.__dict__,
                limits=new.limits.__dict__,
                parent_id=new.parent_id,
                policy=new.policy,
                effects=new.effects.__dict__ if new.effects else None,
            )
            self._append_events(conn, new.id, [event], now)
            self._announce_runnable(conn)
            if new.parent_id is None:  # the chat's progress message for this run starts here
                self._enqueue_outbox(conn, new.id, ChatNotice.PROGRESS, {"event": "started"}, now)
            return self._head(conn, new.id)  # its global number and chain, as just written

        head = await self._transaction(create, durable=True)
        # What the transaction wrote, not read back: a new run holds nothing else yet.
        return RunRecord(
            id=new.id,
            parent_id=new.parent_id,
            role=new.role,
            status=RunStatus.QUEUED,
            request=new.request,
            requested_by=new.requested_by,
            origin=new.origin,
            runbook_id=None,
            runbook=None,
            params={},
            checkpoint=Checkpoint(),
            limits=new.limits,
            summary=None,
            error=None,
            lease_owner=None,
            lease_expires_at=None,
            created_at=now,
            updated_at=now,
            finished_at=None,
            policy=new.policy,
            effects=new.effects,
            run_no=head.run_no,
            event_count=head.event_count,
            last_hash=head.last_hash,
            key_id=self.audit_key.id if self.audit_key else None,
        )

    async def count_active_roots(self) -> int:
        """Runs started by a front end (roots) with a run of their tree queued or running; a
        tree that only waits for a human holds nothing and is not counted."""
        return await self._read(_active_roots)

    async def get_run(self, run_id: str) -> RunRecord:
        """The run with that id; raises RunNotFound."""
        row = await self._read(
            lambda c: c.execute(f"{SELECT_RUNS} WHERE id = ?", (run_id,)).fetchone()
        )
        if row is None:
            raise RunNotFound(f"unknown run id {run_id!r}")
        return run_from_row(row)

    async def child_runs(self, run_id: str) -> list[RunRecord]:
        """The runs a run started, oldest first."""
        rows = await self._read(
            lambda c: c.execute(
                f"{SELECT_RUNS} WHERE parent_id = ? ORDER BY created_at, id",
                (run_id,),
            ).fetchall()
        )
        return [run_from_row(row) for row in rows]

    async def list_runs(
        self, status: RunStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[RunRecord]:
        """Runs, newest first, optionally of one status."""
        if status is None:
            sql = f"{SELECT_RUNS} ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
            params: tuple[Any, ...] = (limit, offset)
        else:
            sql = f"{SELECT_RUNS} WHERE status = ? ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
            params = (str(status), limit, offset)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [run_from_row(row) for row in rows]

    async def _finish(
        self,
        claim: Claim,
        status: RunStatus,
        checkpoint: Checkpoint,
        summary: str | None,
        error: str | None,
        turn: PolicyTurn | None = None,
        earlier: Outcome | None = None,
    ) -> RunRecord:
        """End a run in a final status; journals the last policy turn if it was not yet.
        Returns the run as it ended."""
        now = time.time()
        run_id = claim.run_id

        def finish(conn: Connection) -> RunRecord:
            self._fence(conn, claim, earlier)
            events = []
            if turn is not None:
                events.append(turn)
            events.append(RunFinished(str(status), summary=summary, error=error))
            self._append_events(
                conn,
                run_id,
                events,
                now,
                {
                    "status": str(status),
                    "checkpoint": checkpoint.to_json(),
                    "summary": summary,
                    "error": error,
                    "finished_at": now,
                    "lease_owner": None,
                    "lease_expires_at": None,
                },
            )
            self._enqueue_outbox(
                conn,
                run_id,
                ChatNotice.RUN_FINISHED,
                {"status": str(status), "summary": summary},
                now,
            )
            if self._head(conn, run_id).parent_id is not None:  # a root has no family to wake
                self._wake_parent(conn, run_id, now)
            return run_from_row(conn.execute(f"{SELECT_RUNS} WHERE id = ?", (run_id,)).fetchone())

        return await self._transaction(finish, durable=True)

    async def cancel_run(self, run_id: str, by: str) -> list[str]:
        """Cancel a run that has not finished, and every unfinished run below it, in one
        transaction; pending approvals are closed with them. Returns the cancelled ids."""
        now = time.time()

        def cancel(conn: Connection) -> list[str]:
            row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(f"unknown run id {run_id!r}")
            if RunStatus(row[0]).is_terminal:
                raise RunNotRunnable(f"run {run_id} is already {row[0]}")
            tree = conn.execute(
                "WITH RECURSIVE tree(id, depth) AS (SELECT ?, 0 UNION ALL "
                "SELECT r.id, t.depth + 1 FROM runs r JOIN tree t ON r.parent_id = t.id) "
                "SELECT tree.id FROM tree JOIN runs USING (id) "
                "WHERE runs.status NOT IN ('succeeded', 'failed', 'rejected', 'cancelled', "
                "'expired') ORDER BY depth DESC",
                (run_id,),
            ).fetchall()
            cancelled = []
            for (target,) in tree:  # children first, so no parent is woken on the way
                pending = conn.execute(
                    "SELECT id FROM approvals WHERE run_id = ? AND status = 'pending'", (target,)
                ).fetchall()
                conn.execute(
                    "UPDATE approvals SET status = 'cancelled', decided_by = ?, decided_at = ? "
                    "WHERE run_id = ? AND status = 'pending'",
                    (by, now, target),
                )
                for (approval_id,) in pending:  # its message must lose its buttons too
                    self._enqueue_outbox(
                        conn,
                        target,
                        ChatNotice.APPROVAL_DECIDED,
                        {
                            "approval_id": approval_id,
                            "decision": "cancelled",
                            "decided_by": by,
                            "decided_at": now,
                            "note": None,
                        },
                        now,
                    )
                self._append_events(
                    conn,
                    target,
                    [RunFinished("cancelled", by=by)],
                    now,
                    {
                        "status": RunStatus.CANCELLED,
                        "finished_at": now,
                        "error": f"cancelled by {by}",
                        "lease_owner": None,
                        "lease_expires_at": None,
                    },
                )
                self._enqueue_outbox(
                    conn, target, ChatNotice.RUN_FINISHED, {"status": "cancelled"}, now
                )
                cancelled.append(target)
            self._wake_parent(conn, run_id, now)
            return cancelled

        return await self._transaction(cancel, durable=True)

    async def list_chat_runs(
        self, chat_id: int, limit: int = 10, active: bool = False
    ) -> list[RunRecord]:
        """The runs a chat started (roots only), newest first; only unfinished ones if
        `active`."""
        unfinished = "AND finished_at IS NULL " if active else ""
        rows = await self._read(
            lambda c: c.execute(
                f"{SELECT_RUNS} WHERE parent_id IS NULL "
                f"AND {self.dialect.json_int('origin', 'chat_id')} = ? {unfinished}"
                "ORDER BY created_at DESC, id LIMIT ?",
                (chat_id, limit),
            ).fetchall()
        )
        return [run_from_row(row) for row in rows]


def _active_roots(conn: Connection) -> int:
    """In a transaction or a read: the roots with a run of their tree queued or running."""
    row = conn.execute(
        "WITH RECURSIVE up(id, parent_id) AS ("
        "SELECT id, parent_id FROM runs WHERE status IN ('queued', 'running') UNION "
        "SELECT r.id, r.parent_id FROM runs r JOIN up ON r.id = up.parent_id) "
        "SELECT COUNT(*) AS active FROM up WHERE parent_id IS NULL"
    ).fetchone()
    return int(row["active"])
