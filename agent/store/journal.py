"""The journal: each run's chained events (see `agent.chain`), and the runs' global numbering."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from agent.errors import RunNotFound
from agent.events import Event
from agent.records import (
    ApprovalRecord,
    ApprovalVote,
    Claim,
    EventRecord,
    RunRecord,
    ToolCallRecord,
    record,
)
from agent.store.base import StoreBase
from agent.store.commands import Outcome
from agent.store.database import Connection
from agent.store.rows import (
    APPROVAL_COLUMNS,
    CALL_COLUMNS,
    EVENT_COLUMNS,
    SELECT_RUNS,
    VOTE_COLUMNS,
    approval_from_row,
    call_from_row,
    event_from_row,
    run_from_row,
    vote_from_row,
)

T = TypeVar("T")


@record
class AuditSnapshot:
    """Runs (in number order) and what their journal recorded, as of one moment."""

    counter: int  # the last run number handed out
    runs: tuple[RunRecord, ...]
    events: tuple[EventRecord, ...]  # in journal order (seq)
    approvals: tuple[ApprovalRecord, ...]
    votes: tuple[ApprovalVote, ...]
    calls: tuple[ToolCallRecord, ...]


@record
class AuditAnchor:
    """Where a store stands on audit keys: its run counter, the first run keyed from its
    first event (None: none yet), and whether any event is unkeyed."""

    counter: int
    first_keyed: int | None
    any_unkeyed: bool


class JournalStore(StoreBase):
    """Reading and appending a run's events."""

    async def audit_snapshot(self, run_id: str | None = None) -> AuditSnapshot:
        """What an audit compares, read in one snapshot (so a run written meanwhile is seen
        whole or not at all): the run and every run below it (`run_id`), or every run, with
        their events, approval requests, votes and tool calls, and the run counter."""

        def read(c: Connection) -> AuditSnapshot:
            runs = _runs(c, run_id)
            if run_id is not None and not runs:
                raise RunNotFound(f"unknown run id {run_id!r}")
            scope, params = _scope(run_id)
            events = c.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE {scope.format('run_id')} ORDER BY seq",
                params,
            ).fetchall()
            approvals = c.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE {scope.format('run_id')} "
                "ORDER BY id",
                params,
            ).fetchall()
            votes = c.execute(
                f"SELECT {VOTE_COLUMNS} FROM approval_votes WHERE approval_id IN "
                f"(SELECT id FROM approvals WHERE {scope.format('run_id')}) "
                "ORDER BY approval_id, decided_at",
                params,
            ).fetchall()
            calls = c.execute(
                f"SELECT {CALL_COLUMNS} FROM tool_calls WHERE {scope.format('run_id')} "
                "ORDER BY run_id, turn, position",
                params,
            ).fetchall()
            return AuditSnapshot(
                counter=_counter(c),
                runs=tuple(runs),
                events=tuple(event_from_row(r) for r in events),
                approvals=tuple(approval_from_row(r) for r in approvals),
                votes=tuple(vote_from_row(r) for r in votes),
                calls=tuple(call_from_row(r) for r in calls),
            )

        return await self._snapshot(read)

    async def audit_anchor(self) -> AuditAnchor:
        """What doctor needs to tell an operator which run number the key is in force from:
        the run counter, the first run whose first event is keyed, and whether any event is
        unkeyed (read once by doctor, never on a verify)."""

        def read(c: Connection) -> AuditAnchor:
            first = c.execute(
                "SELECT MIN(runs.run_no) AS first FROM runs JOIN events "
                "ON events.run_id = runs.id AND events.idx = 1 WHERE events.key_id IS NOT NULL"
            ).fetchone()
            unkeyed = c.execute("SELECT 1 FROM events WHERE key_id IS NULL LIMIT 1").fetchone()
            return AuditAnchor(_counter(c), first["first"], unkeyed is not None)

        return await self._snapshot(read)

    async def _snapshot(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` over one snapshot on either engine: PostgreSQL's reads are one repeatable-
        read transaction already; on SQLite each statement would see the file as it is then,
        so a deferred transaction holds one WAL snapshot for all of them."""
        if self.dialect.name != "sqlite":
            return await self._read(fn)

        def held(c: Connection) -> T:
            c.execute("BEGIN")
            try:
                return fn(c)
            finally:
                c.execute("COMMIT")

        return await self._read(held)

    async def _note(self, claim: Claim, event: Event, earlier: Outcome | None = None) -> None:
        """Append one event of a drive's own (through `Drive.note`), fenced by its claim."""
        now = time.time()

        def append(conn: Connection) -> None:
            self._fence(conn, claim, earlier)
            self._append_events(conn, claim.run_id, [event], now)

        await self._transaction(append)

    async def list_events(
        self, run_id: str, after_seq: int = 0, limit: int | None = None
    ) -> list[EventRecord]:
        """A run's journal in order, optionally after a sequence number."""
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND seq > ? ORDER BY seq"
        params: tuple[Any, ...] = (run_id, after_seq)
        if limit is not None:
            sql += " LIMIT ?"
            params = (*params, limit)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [event_from_row(row) for row in rows]

    async def last_event(self, run_id: str) -> EventRecord | None:
        """The run's newest event (by its chain position), or None for an empty journal."""
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY idx DESC LIMIT 1"
        row = await self._read(lambda c: c.execute(sql, (run_id,)).fetchone())
        return event_from_row(row) if row is not None else None

    async def list_tree_events(
        self, run_id: str, after_seq: int = 0, limit: int = 500
    ) -> list[EventRecord]:
        """The journal of a run and every run below it, in the order it was written."""
        rows = await self._read(
            lambda c: c.execute(
                "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
                "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
                f"SELECT {EVENT_COLUMNS} FROM events "
                "WHERE run_id IN (SELECT id FROM tree) AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, after_seq, limit),
            ).fetchall()
        )
        return [event_from_row(row) for row in rows]

    # -- live processes ----------------------------------------------------------------------


_SUBTREE = (
    "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
    "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
)


def _scope(run_id: str | None) -> tuple[str, tuple[Any, ...]]:
    """A condition on a run id column (`{}`): in the run's subtree, or true for every run."""
    if run_id is None:
        return "1 = 1", ()
    return "{} IN (" + _SUBTREE + "SELECT id FROM tree)", (run_id,)


def _runs(c: Connection, run_id: str | None) -> list[RunRecord]:
    """Every run, or the run and every run below it, in number order."""
    scope, params = _scope(run_id)
    rows = c.execute(
        f"{SELECT_RUNS} WHERE {scope.format('runs.id')} ORDER BY run_no, id", params
    ).fetchall()
    return [run_from_row(r) for r in rows]


def _counter(c: Connection) -> int:
    row = c.execute("SELECT last_run_no FROM run_counter WHERE id = 1").fetchone()
    return int(row["last_run_no"]) if row else 0
