"""RunStore: every SQL statement of loom-ops, over SQLite or PostgreSQL.

Each public method is one short transaction. A transaction runs as one function on a database
thread (`agent.database`), so statements of concurrent runs can never interleave inside each
other's transactions, and a step costs one thread hop per commit. Nothing here awaits the
network or a subprocess. The SQL is written once for both engines (`?` placeholders); the
dialect spells the few expressions that differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.database import (
    JOURNAL_CHANNEL,
    OUTBOX_CHANNEL,
    RUNS_CHANNEL,
    Connection,
    Database,
    Leadership,
    SchemaTooNew,
    StoreError,
    is_postgres_url,
    sqlite_path,
)
from agent.journal import canonical_json, event_hash
from agent.records import (
    TERMINAL_STATUSES,
    ApprovalKind,
    ApprovalRecord,
    ApprovalStatus,
    Checkpoint,
    Claim,
    Effects,
    EventRecord,
    Origin,
    PolicyTurnRecord,
    ProcessRecord,
    RunLimits,
    RunRecord,
    RunStatus,
    ToolCallRecord,
)

T = TypeVar("T")

UPDATE_MEMORY = 7 * 24 * 3600.0  # seconds a handled Telegram update id is remembered

__all__ = ["SchemaTooNew", "StoreError"]  # re-exported: callers catch them from here


class RunNotFound(StoreError):
    """No run has that id."""


class RunExists(StoreError):
    """A run with that id exists already."""


class RunBusy(StoreError):
    """Another live process holds the run's lease."""


class RunNotRunnable(StoreError):
    """The run's status does not allow driving it now."""


class LeaseLost(StoreError):
    """This process no longer owns the run (cancelled, or taken over after a lease expiry)."""


class ApprovalNotFound(StoreError):
    """No approval request matches."""


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class NewChild:
    """A child run a delegate call starts: its role and, when known, its pinned runbook."""

    role: str
    pin: RunbookPin | None = None


@dataclass(frozen=True)
class NewEvent:
    """An event to append to a run's chain inside a transaction."""

    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class NewPolicyTurn:
    """A policy answer to journal before it is used."""

    turn: int
    policy: str
    request_hash: str
    response: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class NewToolCall:
    """The intent of one tool call."""

    call_key: str
    turn: int
    position: int
    tool: str
    args: dict[str, Any]
    step_id: str | None
    repeatable: bool = False  # safe to run again if it is found in doubt


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class RunbookPin:
    """The runbook (and resolved params) a run commits to; later steps must come from it."""

    runbook_id: str
    runbook: dict[str, Any]
    params: dict[str, Any]


@dataclass(frozen=True)
class StartedCall:
    """A committed intent: its attempt number, and the instant (wall clock) after which its
    side effect must not start, because the lease may have passed to another process."""

    attempt: int
    spawn_before: float


@dataclass(frozen=True)
class DecisionEffect:
    """What a decision does to the gated call and the run, applied in the decision's transaction."""

    call_status: str | None  # new tool_calls.status, or None to leave it
    call_outcome: dict[str, Any] | None
    run_status: RunStatus
    checkpoint: Checkpoint | None
    error: str | None = None


@dataclass(frozen=True)
class OutboxMessage:
    """A message a run must get to a chat."""

    id: int
    run_id: str | None
    target: dict[str, Any]
    kind: str
    payload: dict[str, Any]
    attempts: int
    created_at: float = 0.0
    next_attempt_at: float = 0.0  # after a failed attempt: not before this time
    parts_sent: int = 0  # of a message sent in parts, how many went out already


# Histogram bucket bounds (seconds) of /metrics: tool call durations, approval waits.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600)
WAIT_BUCKETS = (10, 60, 300, 900, 1800, 3600, 14400)


class JournalWatch:
    """What `RunStore.watch_journal` hands out: an event set on new journal entries of the
    watched runs; `add` watches one more (a child run that appeared)."""

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self.runs: set[str] = set()
        self.changed = asyncio.Event()

    def add(self, run_id: str) -> None:
        """Watch this run too."""
        if run_id not in self.runs:
            self.runs.add(run_id)
            self._store._journal_waiters.setdefault(run_id, set()).add(self)

    async def wait(self, timeout: float) -> None:
        """Return when a watched run was written since the last `wait`, or after `timeout`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.changed.wait()
        self.changed.clear()


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counts and histograms of the whole store: (label, cumulative bucket counts, count, sum)."""

    runs_by_status: dict[str, int]
    tool_durations: list[tuple[str, list[int], int, float]]
    approval_waits: list[tuple[str, list[int], int, float]]
    prompt_tokens: int
    completion_tokens: int


_TERMINAL = frozenset(str(status) for status in TERMINAL_STATUSES)


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


class RunStore:
    """The durable store of runs and everything they did."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.dialect = db.dialect
        # Set after a commit that queued chat messages, so a sender in this process delivers
        # them at once instead of polling the table (other processes: see `follow_others`).
        self.outbox_ready = asyncio.Event()
        # Set after a commit that made a run runnable, so a worker claims it at once.
        self.runs_ready = asyncio.Event()
        # What the transaction on this database thread queued; read after its commit.
        self._queued = threading.local()
        # Readers waiting for new journal events of some runs (SSE streams), by run id; a
        # commit wakes the waiters of the runs it appended to, and only those.
        self._journal_waiters: dict[str, set[JournalWatch]] = {}
        self._runs_written: set[str] = set()  # filled on a database thread
        self._runs_written_lock = threading.Lock()
        self._last_seq_seen = 0

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str | Path, pool_size: int = 4) -> RunStore:
        """Open the database a setting names, creating it or bringing its schema up to date:
        `postgresql://…` is PostgreSQL; a path or `sqlite:///path` is a SQLite file."""
        url = str(url)
        if is_postgres_url(url):
            from agent.postgres_db import PostgresDatabase

            return cls(await PostgresDatabase.open(url, pool_size))
        from agent.sqlite_db import SqliteDatabase

        try:
            path = sqlite_path(url)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        return cls(await SqliteDatabase.open(path))

    @property
    def label(self) -> str:
        """The database's name for people: a file path, or a URL without its password."""
        return self.db.label

    async def close(self) -> None:
        """Close the database."""
        await self.db.close()

    async def __aenter__(self) -> RunStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def schema_version(self) -> int:
        """The schema version the database is at."""
        return await self.db.schema_version()

    # -- plumbing --------------------------------------------------------------------------

    async def _transaction(self, fn: Callable[[Connection], T], durable: bool = False) -> T:
        """Run `fn` as one transaction, then wake what its commit concerns in this process.

        `durable` makes the commit (and every one before it) survive a power cut before this
        returns. `fn` may run more than once (a PostgreSQL serialization conflict): it only
        touches the database and this store's wake-up flags.
        """
        queued = self._queued

        def run(conn: Connection) -> tuple[T, bool, bool]:
            queued.outbox = queued.runs = False  # a re-run starts afresh
            return fn(conn), queued.outbox, queued.runs

        result, outbox, runs = await self.db.transaction(run, durable=durable)
        if outbox:
            self.outbox_ready.set()
        if runs:
            self.runs_ready.set()
        self._wake_journal_waiters()
        return result

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        return await self.db.read(fn)

    def _announce_runnable(self, conn: Connection) -> None:
        """In a transaction that queued a run: wake workers here and elsewhere at commit."""
        self._queued.runs = True
        self.db.notify(conn, RUNS_CHANNEL)

    async def follow_others(self) -> None:
        """Until cancelled: wake this process's workers, senders and journal readers when
        another process commits (PostgreSQL's LISTEN; on SQLite, the callers poll)."""
        await self.db.listen(self._on_notice)

    def leadership(self, name: str) -> Leadership:
        """The right to be the one process sharing this store that does `name`."""
        return self.db.leadership(name)

    def _on_notice(self, channel: str, payload: str) -> None:
        if channel == RUNS_CHANNEL:
            self.runs_ready.set()
        elif channel == OUTBOX_CHANNEL:
            self.outbox_ready.set()
        elif channel == JOURNAL_CHANNEL:
            self._wake_journal_waiters([payload] if payload else list(self._journal_waiters))

    def _wake_journal_waiters(self, run_ids: Iterable[str] | None = None) -> None:
        if run_ids is None:
            with self._runs_written_lock:
                run_ids, self._runs_written = self._runs_written, set()
        for run_id in run_ids:
            for watch in self._journal_waiters.get(run_id, ()):
                watch.changed.set()

    @contextlib.contextmanager
    def watch_journal(self, run_ids: Iterable[str]) -> Iterator[JournalWatch]:
        """Watch runs' journals for the whole block: `changed` is set by every commit (in
        this process, or seen by `notice_other_writers`) that appends to a watched run, so
        a write between a reader's look and its wait is never missed."""
        watch = JournalWatch(self)
        for run_id in run_ids:
            watch.add(run_id)
        try:
            yield watch
        finally:
            for run_id in watch.runs:
                waiters = self._journal_waiters.get(run_id)
                if waiters is not None:
                    waiters.discard(watch)
                    if not waiters:
                        del self._journal_waiters[run_id]

    async def notice_other_writers(self) -> None:
        """Wake the watchers of runs another process appended events to since the last look."""
        since = self._last_seq_seen

        def look(c: Connection) -> tuple[int, list[str]]:
            latest = c.execute("SELECT MAX(seq) FROM events").fetchone()[0] or 0
            if latest == since:
                return latest, []
            rows = c.execute("SELECT DISTINCT run_id FROM events WHERE seq > ?", (since,))
            return latest, [row[0] for row in rows]

        self._last_seq_seen, written = await self._read(look)
        # Writes of this process were woken at commit; waking their watchers again only
        # costs them one more look.
        self._wake_journal_waiters(written)

    def _append_events(
        self,
        conn: Connection,
        run_id: str,
        events: Sequence[NewEvent],
        now: float,
        run_updates: dict[str, Any] | None = None,
    ) -> None:
        """Append events to a run's chain and apply `run_updates` to its row (a drive's
        transaction checked its lease first, with `_fence`)."""
        # Locked first: two appends to one run at once conflict here (one runs again), not
        # on the journal's (run_id, idx) key after both computed the same next link.
        row = conn.execute(
            "SELECT event_count, last_hash FROM runs WHERE id = ?" + self.dialect.for_update,
            (run_id,),
        ).fetchone()
        if row is None:
            raise RunNotFound(f"unknown run id {run_id!r}")
        count, prev = row
        rows = []
        for event in events:
            count += 1
            data_json = canonical_json(event.data)
            digest = event_hash(prev, run_id, count, now, event.type, data_json)
            rows.append((run_id, count, now, event.type, data_json, prev, digest))
            prev = digest
        if rows:
            conn.executemany(
                "INSERT INTO events (run_id, idx, ts, type, data, prev_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # A rolled-back transaction leaves a stale entry: a spurious wake, nothing worse.
            with self._runs_written_lock:  # this runs on a database thread
                self._runs_written.add(run_id)
            self.db.notify(conn, JOURNAL_CHANNEL, run_id)
        updates = {"event_count": count, "last_hash": prev, "updated_at": now}
        updates.update(run_updates or {})
        if updates.get("status") == RunStatus.QUEUED:
            self._announce_runnable(conn)
        assignments = ", ".join(f"{column} = ?" for column in updates)
        conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*updates.values(), run_id))

    def _fence(self, conn: Connection, claim: Claim) -> float:
        """First in every transaction of a run's drive: go on only while the claim (its owner
        at its epoch) still holds the lease; returns when the lease expires.

        Checked before anything is written, so a drive that lost its run stops with LeaseLost
        rather than colliding with the new owner's rows (and on PostgreSQL the row lock makes a
        takeover committed meanwhile a conflict, and the re-run sees it). The epoch makes a
        stale drive fail even where the same owner claimed the run again since."""
        row = conn.execute(
            "SELECT lease_owner, lease_epoch, status, lease_expires_at FROM runs WHERE id = ?"
            + self.dialect.for_update,
            (claim.run_id,),
        ).fetchone()
        if row is None:
            raise RunNotFound(f"unknown run id {claim.run_id!r}")
        owner, epoch, status, expires = row
        if owner != claim.owner or epoch != claim.epoch or status != RunStatus.RUNNING:
            raise LeaseLost(
                f"run {claim.run_id} is no longer driven by this claim (status {status}, "
                f"epoch {epoch}, ours {claim.epoch})"
            )
        return float(expires or 0.0)

    def _park(
        self,
        conn: Connection,
        run_id: str,
        events: Sequence[NewEvent],
        now: float,
        status: RunStatus,
        checkpoint: Checkpoint,
    ) -> None:
        """In the caller's transaction (fenced): a waiting run keeps its checkpoint and lets go
        of its lease, so it holds no process until something wakes it."""
        self._append_events(
            conn,
            run_id,
            events,
            now,
            {
                "status": status,
                "checkpoint": checkpoint.to_json(),
                "lease_owner": None,
                "lease_expires_at": None,
            },
        )

    def _enqueue_outbox(
        self,
        conn: Connection,
        run_id: str,
        kind: str,
        payload: dict[str, Any],
        now: float,
    ) -> None:
        """Queue a chat message in the caller's transaction when the run's tree came from a chat.

        The end of a child run is not a summary of its own: it refreshes the root's progress
        message. Progress messages name the root, whose one message is edited in place.
        """
        row = conn.execute("SELECT origin, parent_id FROM runs WHERE id = ?", (run_id,)).fetchone()
        origin = Origin.from_json(row[0])
        if origin.chat_id is None:
            return
        target = _dumps({"chat_id": origin.chat_id, "thread_id": origin.thread_id})

        def insert(kind: str, payload: dict[str, Any]) -> None:
            conn.execute(
                "INSERT INTO outbox (run_id, target, kind, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, target, kind, _dumps(payload), now),
            )

        is_root = row[1] is None
        if kind in ("run_finished", "progress"):
            # A progress entry only says "show the tree's state again"; the message is rendered
            # from the store when it is sent, so one waiting entry per tree is enough.
            root_id = self._root_id(conn, run_id)
            waiting = conn.execute(
                "SELECT 1 FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL "
                "AND claimed_at IS NULL AND kind = 'progress' "
                # Locked: a sender claiming it meanwhile conflicts, and this queues anew.
                f"AND {self.dialect.json_text('payload', 'root_id')} = ?" + self.dialect.for_update,
                (root_id,),
            ).fetchone()
            if waiting is None:  # the progress message shows a run's end too
                insert("progress", {"root_id": root_id, "run_id": run_id, **payload})
        if kind != "progress" and (kind != "run_finished" or is_root):
            insert(kind, payload)  # only the root's end is a summary of its own
        self._queued.outbox = True
        self.db.notify(conn, OUTBOX_CHANNEL)

    @staticmethod
    def _root_id(conn: Connection, run_id: str) -> str:
        """The root of the run's tree (the run itself when it has no parent)."""
        root = run_id
        while True:
            row = conn.execute("SELECT parent_id FROM runs WHERE id = ?", (root,)).fetchone()
            if row is None:
                raise RunNotFound(f"unknown run id {run_id!r}")
            if row[0] is None:
                return root
            root = row[0]

    @staticmethod
    def _touch_family(conn: Connection, run_id: str) -> None:
        """In a transaction that reads siblings' states to decide a wake-up: write the parent's
        row first. Two such transactions of one family (two children ending at once, or one
        ending while the other starts waiting for it) then conflict instead of each missing
        the other's end (write skew on PostgreSQL's snapshots; SQLite runs one at a time)."""
        conn.execute(
            "UPDATE runs SET updated_at = updated_at WHERE id = "
            "(SELECT parent_id FROM runs WHERE id = ?)",
            (run_id,),
        )

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
        if row is None or row[0] is None or row[1] is None:
            return
        parent_id, call_key = row
        parent = conn.execute(
            "SELECT status, checkpoint FROM runs WHERE id = ?", (parent_id,)
        ).fetchone()
        if parent is None or parent[0] != RunStatus.WAITING_CHILDREN:
            return
        children = conn.execute(
            "SELECT id, role, status, summary, error FROM runs WHERE spawned_by = ? ORDER BY id",
            (call_key,),
        ).fetchall()
        if any(child[2] not in _TERMINAL for child in children):
            return
        outcome = {
            "children": [
                {"run_id": c[0], "role": c[1], "status": c[2], "summary": c[3], "error": c[4]}
                for c in children
            ]
        }
        conn.execute(
            "UPDATE tool_calls SET status = 'ok', outcome = ?, outcome_at = ? "
            "WHERE call_key = ? AND status = 'intent'",
            (_dumps(outcome), now, call_key),
        )
        checkpoint = Checkpoint.from_json(parent[1])
        advanced = Checkpoint(**{**checkpoint.__dict__, "call": checkpoint.call + 1})
        self._append_events(
            conn,
            parent_id,
            [NewEvent("tool_outcome", {"call_key": call_key, "status": "ok", "outcome": outcome})],
            now,
            {"status": RunStatus.QUEUED, "checkpoint": advanced.to_json()},
        )

    async def await_sibling(
        self,
        claim: Claim,
        call: NewToolCall,
        role: str,
        checkpoint: Checkpoint,
        turn: NewPolicyTurn | None = None,
    ) -> dict[str, Any] | None:
        """Commit the intent of waiting for the sibling of `role`; park the run unless it ended.

        Returns the sibling's result when it has ended already (the caller records it as the
        call's outcome), else None: the run now waits, and the sibling's end wakes it.
        """
        now = time.time()
        run_id = claim.run_id

        def wait(conn: Connection) -> dict[str, Any] | None:
            self._fence(conn, claim)
            self._touch_family(conn, run_id)
            sibling = self._sibling(conn, run_id, role)
            events = []
            if turn is not None:
                events.append(self._insert_policy_turn(conn, run_id, turn, now))
            known = conn.execute(
                "SELECT 1 FROM tool_calls WHERE call_key = ?", (call.call_key,)
            ).fetchone()
            if known is None:  # a resumed wait keeps the intent it already has
                events.append(self._insert_intent(conn, run_id, call, now))
            if sibling is None or sibling["status"] in _TERMINAL:
                self._append_events(
                    conn,
                    run_id,
                    events,
                    now,
                    {"checkpoint": checkpoint.to_json()},
                )
                return sibling or {"run_id": None, "role": role, "status": "absent"}
            events.append(NewEvent("waiting_for_sibling", {"run_id": sibling["run_id"]}))
            self._park(conn, run_id, events, now, RunStatus.WAITING_CHILDREN, checkpoint)
            return None

        return await self._transaction(wait, durable=True)

    @staticmethod
    def _sibling(conn: Connection, run_id: str, role: str) -> dict[str, Any] | None:
        """The run of `role` started by the same delegate call as `run_id`."""
        row = conn.execute(
            "SELECT s.id, s.role, s.status, s.summary, s.error FROM runs r "
            "JOIN runs s ON s.spawned_by = r.spawned_by AND s.id != r.id "
            "WHERE r.id = ? AND r.spawned_by IS NOT NULL AND s.role = ? ORDER BY s.id LIMIT 1",
            (run_id, role),
        ).fetchone()
        if row is None:
            return None
        keys = ("run_id", "role", "status", "summary", "error")
        return dict(zip(keys, row, strict=True))

    def _wake_waiting_siblings(self, conn: Connection, run_id: str, now: float) -> None:
        """In the caller's transaction: a run ended; wake the siblings that wait for it."""
        row = conn.execute("SELECT spawned_by, role FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None or row[0] is None:
            return
        waiting = conn.execute(
            "SELECT r.id, r.checkpoint, c.call_key FROM runs r JOIN tool_calls c "
            "ON c.run_id = r.id AND c.tool = 'await_sibling' AND c.status = 'intent' "
            "WHERE r.spawned_by = ? AND r.id != ? AND r.status = 'waiting_children'",
            (row[0], run_id),
        ).fetchall()
        for waiter_id, checkpoint_json, call_key in waiting:
            sibling = self._sibling(conn, waiter_id, row[1])
            if sibling is None or sibling["run_id"] != run_id:
                continue
            conn.execute(
                "UPDATE tool_calls SET status = 'ok', outcome = ?, outcome_at = ? "
                "WHERE call_key = ?",
                (_dumps(sibling), now, call_key),
            )
            checkpoint = Checkpoint.from_json(checkpoint_json)
            advanced = Checkpoint(**{**checkpoint.__dict__, "call": checkpoint.call + 1})
            event = NewEvent(
                "tool_outcome", {"call_key": call_key, "status": "ok", "outcome": sibling}
            )
            self._append_events(
                conn,
                waiter_id,
                [event],
                now,
                {"status": RunStatus.QUEUED, "checkpoint": advanced.to_json()},
            )

    async def open_children(
        self,
        claim: Claim,
        call: NewToolCall,
        children: Sequence[NewChild],
        checkpoint: Checkpoint,
        turn: NewPolicyTurn | None = None,
    ) -> list[str]:
        """Start child runs for a delegate call and park the parent until they all end.

        A role delegated twice in one parent gets the next free id (`…:sub:verifier-2`).
        """
        now = time.time()
        parent_id = claim.run_id

        def open_(conn: Connection) -> list[str]:
            self._fence(conn, claim)
            parent = conn.execute(
                "SELECT request, requested_by, origin, limits, policy, effects FROM runs "
                "WHERE id = ?",
                (parent_id,),
            ).fetchone()
            if parent is None:
                raise RunNotFound(f"unknown run id {parent_id!r}")
            events = []
            if turn is not None:
                events.append(self._insert_policy_turn(conn, parent_id, turn, now))
            events.append(self._insert_intent(conn, parent_id, call, now))
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
                    "runbook, params, policy, effects) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        child_id,
                        parent_id,
                        child.role,
                        parent[0],
                        parent[1],
                        parent[2],
                        Checkpoint().to_json(),
                        parent[3],
                        now,
                        now,
                        call.call_key,
                        child.pin.runbook_id if child.pin else None,
                        _dumps(child.pin.runbook) if child.pin else None,
                        _dumps(child.pin.params) if child.pin else "{}",
                        parent[4],  # a child is driven like its parent,
                        parent[5],  # and acts on the world as it does
                    ),
                )
                self._append_events(
                    conn,
                    child_id,
                    [
                        NewEvent(
                            "run_created",
                            {
                                "role": child.role,
                                "request": parent[0],
                                "requested_by": parent[1],
                                "origin": json.loads(parent[2]),
                                "limits": json.loads(parent[3]),
                                "parent_id": parent_id,
                                "runbook_id": child.pin.runbook_id if child.pin else None,
                            },
                        )
                    ],
                    now,
                )
                ids.append(child_id)
            self._announce_runnable(conn)
            events.append(NewEvent("children_started", {"call_key": call.call_key, "runs": ids}))
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

    # -- runs ------------------------------------------------------------------------------

    async def create_run(self, new: NewRun) -> RunRecord:
        """Create a queued run; raises RunExists for a duplicate id."""
        now = time.time()

        def create(conn: Connection) -> None:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (new.id,)).fetchone():
                raise RunExists(f"run id {new.id!r} exists already")
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
            event = NewEvent(
                "run_created",
                {
                    "role": new.role,
                    "request": new.request,
                    "requested_by": new.requested_by,
                    "origin": new.origin.__dict__,
                    "limits": new.limits.__dict__,
                    "parent_id": new.parent_id,
                    "policy": new.policy,
                    "effects": new.effects.__dict__ if new.effects else None,
                },
            )
            self._append_events(conn, new.id, [event], now)
            self._announce_runnable(conn)
            if new.parent_id is None:  # the chat's progress message for this run starts here
                self._enqueue_outbox(conn, new.id, "progress", {"event": "started"}, now)

        await self._transaction(create, durable=True)
        return await self.get_run(new.id)

    async def get_run(self, run_id: str) -> RunRecord:
        """The run with that id; raises RunNotFound."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
        )
        if row is None:
            raise RunNotFound(f"unknown run id {run_id!r}")
        return _run_from_row(row)

    async def child_runs(self, run_id: str) -> list[RunRecord]:
        """The runs a run started, oldest first."""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE parent_id = ? ORDER BY created_at, id",
                (run_id,),
            ).fetchall()
        )
        return [_run_from_row(row) for row in rows]

    async def list_runs(
        self, status: RunStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[RunRecord]:
        """Runs, newest first, optionally of one status."""
        if status is None:
            sql = f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
            params: tuple[Any, ...] = (limit, offset)
        else:
            sql = (
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = ? "
                "ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
            )
            params = (str(status), limit, offset)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [_run_from_row(row) for row in rows]

    async def claim_run(
        self,
        run_id: str,
        owner: str,
        ttl: float,
        owner_is_dead: Callable[[str], bool],
    ) -> RunRecord:
        """Take the lease of a runnable run at the next epoch and mark it running.

        A queued run is free; a running run is free when its lease expired or its owner is known
        dead. Anything else raises RunBusy, RunNotRunnable or RunNotFound.
        """
        now = time.time()

        def claim(conn: Connection) -> None:
            row = conn.execute(
                "SELECT status, lease_owner, lease_expires_at, lease_epoch FROM runs WHERE id = ?"
                + self.dialect.for_update,
                (run_id,),
            ).fetchone()
            if row is None:
                raise RunNotFound(f"unknown run id {run_id!r}")
            status, holder, expires, epoch = RunStatus(row[0]), row[1], row[2], row[3]
            takeover = None
            if status == RunStatus.RUNNING:
                if holder == owner:
                    pass
                elif holder is None or (expires or 0) < now or owner_is_dead(holder):
                    takeover = holder
                else:
                    raise RunBusy(
                        f"run {run_id} is being driven by {holder} (lease until "
                        f"{time.strftime('%H:%M:%S', time.gmtime(expires or 0))} UTC)"
                    )
            elif status != RunStatus.QUEUED:
                raise RunNotRunnable(f"run {run_id} is {status}, not runnable")
            self._take_lease(conn, run_id, owner, epoch + 1, now, ttl, takeover)

        await self._transaction(claim)
        return await self.get_run(run_id)

    def _take_lease(
        self,
        conn: Connection,
        run_id: str,
        owner: str,
        epoch: int,
        now: float,
        ttl: float,
        taken_from: str | None,
    ) -> Claim:
        """In a claiming transaction: mark the run running under `owner`'s lease at `epoch`."""
        data: dict[str, Any] = {"owner": owner, "epoch": epoch}
        if taken_from is not None:
            data["taken_over_from"] = taken_from
        self._append_events(
            conn,
            run_id,
            [NewEvent("run_claimed", data)],
            now,
            {
                "status": RunStatus.RUNNING,
                "lease_owner": owner,
                "lease_epoch": epoch,
                "lease_expires_at": now + ttl,
                "not_before": None,
            },
        )
        return Claim(run_id, owner, epoch)

    async def claim_runnable(self, owner: str, ttl: float, limit: int) -> list[Claim]:
        """Claim up to `limit` runs nobody drives (queued, or running with an expired lease),
        oldest first, and mark them running under `owner`'s lease: what a worker takes.

        Rows another transaction holds are skipped (PostgreSQL's SKIP LOCKED), so workers
        claiming at once take different runs instead of queueing behind each other.
        """
        now = time.time()

        def claim(conn: Connection) -> list[Claim]:
            rows = conn.execute(
                "SELECT id, status, lease_owner, lease_epoch FROM runs "
                "WHERE (status = 'queued' AND (not_before IS NULL OR not_before <= ?)) "
                "OR (status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < ?)) "
                f"ORDER BY created_at, id LIMIT ?{self.dialect.skip_locked}",
                (now, now, limit),
            ).fetchall()
            claims = []
            for run_id, status, holder, epoch in rows:
                taken_from = holder if status == RunStatus.RUNNING else None
                claims.append(
                    self._take_lease(conn, run_id, owner, epoch + 1, now, ttl, taken_from)
                )
            return claims

        if limit < 1:
            return []
        return await self._transaction(claim)

    async def renew_lease(self, claim: Claim, ttl: float) -> bool:
        """Extend the lease; False when this claim lost it."""

        def renew(conn: Connection) -> bool:
            cursor = conn.execute(
                "UPDATE runs SET lease_expires_at = ? WHERE id = ? AND lease_owner = ? "
                "AND lease_epoch = ? AND status = 'running'",
                (time.time() + ttl, claim.run_id, claim.owner, claim.epoch),
            )
            return cursor.rowcount == 1

        return await self._transaction(renew)

    async def release_lease(self, claim: Claim, retry_after: float | None = None) -> None:
        """Give the lease back, leaving a running run queued for whoever comes next (workers
        wait `retry_after` seconds before they claim it; an explicit resume does not)."""
        not_before = time.time() + retry_after if retry_after is not None else None

        def release(conn: Connection) -> None:
            conn.execute(
                "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, not_before = ?, "
                "status = CASE status WHEN 'running' THEN 'queued' ELSE status END "
                "WHERE id = ? AND lease_owner = ? AND lease_epoch = ?",
                (not_before, claim.run_id, claim.owner, claim.epoch),
            )
            self._announce_runnable(conn)

        await self._transaction(release)

    async def runnable_run_ids(
        self, owner_is_dead: Callable[[str], bool], due_only: bool = False
    ) -> list[str]:
        """Runs a process may pick up: queued ones, and running ones whose owner is gone.
        `due_only` leaves out queued runs asked to wait (`not_before`, after an outage)."""
        now = time.time()
        rows = await self._read(
            lambda c: c.execute(
                "SELECT id, status, lease_owner, lease_expires_at, not_before FROM runs "
                "WHERE status IN ('queued', 'running') ORDER BY created_at"
            ).fetchall()
        )
        picked = []
        for run_id, status, holder, expires, not_before in rows:
            if status == RunStatus.QUEUED and due_only and (not_before or 0) > now:
                continue
            if status == RunStatus.QUEUED or (
                holder is None or (expires or 0) < now or owner_is_dead(holder)
            ):
                picked.append(run_id)
        return picked

    async def finish_run(
        self,
        claim: Claim,
        status: RunStatus,
        checkpoint: Checkpoint,
        summary: str | None,
        error: str | None,
        turn: NewPolicyTurn | None = None,
    ) -> None:
        """End a run in a final status; journals the last policy turn if it was not yet."""
        now = time.time()
        run_id = claim.run_id

        def finish(conn: Connection) -> None:
            self._fence(conn, claim)
            events = []
            if turn is not None:
                events.append(self._insert_policy_turn(conn, run_id, turn, now))
            events.append(
                NewEvent(
                    "run_finished", {"status": str(status), "summary": summary, "error": error}
                )
            )
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
                conn, run_id, "run_finished", {"status": str(status), "summary": summary}, now
            )
            self._wake_parent(conn, run_id, now)

        await self._transaction(finish, durable=True)

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
                        "approval_decided",
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
                    [NewEvent("run_finished", {"status": "cancelled", "by": by, "error": None})],
                    now,
                    {
                        "status": RunStatus.CANCELLED,
                        "finished_at": now,
                        "error": f"cancelled by {by}",
                        "lease_owner": None,
                        "lease_expires_at": None,
                    },
                )
                self._enqueue_outbox(conn, target, "run_finished", {"status": "cancelled"}, now)
                cancelled.append(target)
            self._wake_parent(conn, run_id, now)
            return cancelled

        return await self._transaction(cancel, durable=True)

    @staticmethod
    def _insert_intent(
        conn: Connection, run_id: str, call: NewToolCall, now: float, info: str | None = None
    ) -> NewEvent:
        """Insert a call's first intent; returns the event that journals it."""
        conn.execute(
            "INSERT INTO tool_calls (run_id, call_key, turn, position, tool, args, step_id, "
            "attempt, status, intent_at, repeatable, attempt_info) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'intent', ?, ?, ?)",
            (
                run_id,
                call.call_key,
                call.turn,
                call.position,
                call.tool,
                _dumps(call.args),
                call.step_id,
                now,
                int(call.repeatable),
                info,
            ),
        )
        return _intent_event(call, 1)

    # -- policy turns ----------------------------------------------------------------------

    @staticmethod
    def _insert_policy_turn(
        conn: Connection, run_id: str, turn: NewPolicyTurn, now: float
    ) -> NewEvent:
        conn.execute(
            "INSERT INTO llm_calls (run_id, turn, policy, request_hash, response, prompt_tokens, "
            "completion_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                turn.turn,
                turn.policy,
                turn.request_hash,
                _dumps(turn.response),
                turn.prompt_tokens,
                turn.completion_tokens,
                now,
            ),
        )
        return NewEvent(
            "policy_turn",
            {
                "turn": turn.turn,
                "policy": turn.policy,
                "request_hash": turn.request_hash,
                "response": turn.response,
                "prompt_tokens": turn.prompt_tokens,
                "completion_tokens": turn.completion_tokens,
            },
        )

    async def get_policy_turn(self, run_id: str, turn: int) -> PolicyTurnRecord | None:
        """The journaled policy answer of one turn, if there is one."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_TURN_COLUMNS} FROM llm_calls WHERE run_id = ? AND turn = ?",
                (run_id, turn),
            ).fetchone()
        )
        return _turn_from_row(row) if row else None

    async def list_policy_turns(self, run_id: str) -> list[PolicyTurnRecord]:
        """Every journaled policy answer of a run, in order."""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_TURN_COLUMNS} FROM llm_calls WHERE run_id = ? ORDER BY turn", (run_id,)
            ).fetchall()
        )
        return [_turn_from_row(row) for row in rows]

    # -- tool calls ------------------------------------------------------------------------

    async def begin_tool_call(
        self,
        claim: Claim,
        call: NewToolCall,
        checkpoint: Checkpoint,
        turn: NewPolicyTurn | None = None,
        rerun: bool = False,
        durable: bool = True,
        attempt_info: dict[str, Any] | None = None,
    ) -> StartedCall:
        """Commit the intent of a call (and the policy turn that proposed it) under the claim;
        returns the attempt and the instant its side effect must have started by.

        This is the fence right before a side effect: it proves the claim still holds the
        lease, and the lease's expiry is the spawn deadline (after it, another process may
        take the run over). `attempt_info` (where the attempt may act) is recorded with the
        deadline added. A call a human marked for retry, or an in-doubt call (`rerun`), gets
        a new attempt; any other call that already has an intent or an outcome is refused,
        so nothing runs twice by accident. `durable` (the default) syncs the intent to disk
        before the call runs; a call that is safe to repeat may skip that sync.
        """
        now = time.time()
        run_id = claim.run_id

        def begin(conn: Connection) -> StartedCall:
            spawn_before = self._fence(conn, claim)
            info = None
            if attempt_info is not None:
                info = _dumps({**attempt_info, "spawn_before": spawn_before})
            events = []
            if turn is not None:
                events.append(self._insert_policy_turn(conn, run_id, turn, now))
            row = conn.execute(
                "SELECT status, attempt FROM tool_calls WHERE call_key = ?", (call.call_key,)
            ).fetchone()
            if row is None:
                attempt = 1
                events.append(self._insert_intent(conn, run_id, call, now, info))
            elif row[0] == "retry" or (rerun and row[0] == "intent"):
                attempt = row[1] + 1
                conn.execute(
                    "UPDATE tool_calls SET status = 'intent', attempt = ?, intent_at = ?, "
                    "attempt_info = ? WHERE call_key = ?",
                    (attempt, now, info, call.call_key),
                )
                events.append(_intent_event(call, attempt))
            else:
                raise StoreError(f"tool call {call.call_key} is already {row[0]}; not run again")
            # The checkpoint moves with the intent so that it never lags the journaled turn.
            self._append_events(
                conn,
                run_id,
                events,
                now,
                {"checkpoint": checkpoint.to_json()},
            )
            return StartedCall(attempt, spawn_before)

        return await self._transaction(begin, durable=durable)

    async def finish_tool_call(
        self,
        claim: Claim,
        call_key: str,
        attempt: int,
        status: str,
        outcome: dict[str, Any],
        duration_ms: float,
        checkpoint: Checkpoint,
        pin: RunbookPin | None = None,
        extra_events: Sequence[NewEvent] = (),
    ) -> None:
        """Commit a call's outcome together with the run's next checkpoint."""
        now = time.time()
        run_id = claim.run_id

        def finish(conn: Connection) -> None:
            self._fence(conn, claim)
            cursor = conn.execute(
                "UPDATE tool_calls SET status = ?, outcome = ?, outcome_at = ?, duration_ms = ? "
                "WHERE call_key = ? AND attempt = ? AND status = 'intent'",
                (status, _dumps(outcome), now, duration_ms, call_key, attempt),
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"tool call {call_key} attempt {attempt} is not in flight here")
            updates: dict[str, Any] = {"checkpoint": checkpoint.to_json()}
            if pin is not None:
                updates.update(
                    runbook_id=pin.runbook_id,
                    runbook=_dumps(pin.runbook),
                    params=_dumps(pin.params),
                )
            event = NewEvent(
                "tool_outcome",
                {
                    "call_key": call_key,
                    "attempt": attempt,
                    "status": status,
                    "outcome": outcome,
                    "duration_ms": round(duration_ms, 3),
                },
            )
            self._append_events(conn, run_id, [event, *extra_events], now, updates)
            tool, step_id = conn.execute(
                "SELECT tool, step_id FROM tool_calls WHERE call_key = ?", (call_key,)
            ).fetchone()
            progress = {"run_id": run_id, "tool": tool, "step_id": step_id, "status": status}
            self._enqueue_outbox(conn, run_id, "progress", progress, now)

        await self._transaction(finish)

    async def close_cancelled_call(self, run_id: str, call_key: str) -> bool:
        """Record that a cancelled run's call in flight was stopped; only for a cancelled run.

        A run taken over by another process keeps the call in doubt instead: its new owner
        decides what happens to it.
        """
        now = time.time()

        def close(conn: Connection) -> bool:
            row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row[0] != RunStatus.CANCELLED:
                return False
            outcome = {"cancelled": True, "may_have_run": True}
            row = conn.execute(
                "SELECT attempt FROM tool_calls WHERE call_key = ? AND status = 'intent'",
                (call_key,),
            ).fetchone()
            if row is None:  # no intent committed, or an outcome was recorded after all
                return False
            attempt = row[0]
            conn.execute(
                "UPDATE tool_calls SET status = 'cancelled', outcome = ?, outcome_at = ? "
                "WHERE call_key = ?",
                (_dumps(outcome), now, call_key),
            )
            event = NewEvent(
                "tool_outcome",
                {
                    "call_key": call_key,
                    "attempt": attempt,
                    "status": "cancelled",
                    "outcome": outcome,
                },
            )
            self._append_events(conn, run_id, [event], now)
            return True

        return await self._transaction(close, durable=True)

    async def get_tool_call(self, call_key: str) -> ToolCallRecord | None:
        """One tool call by its idempotency key."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_CALL_COLUMNS} FROM tool_calls WHERE call_key = ?", (call_key,)
            ).fetchone()
        )
        return _call_from_row(row) if row else None

    async def list_tool_calls(self, run_id: str) -> list[ToolCallRecord]:
        """A run's tool calls in the order they were proposed."""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_CALL_COLUMNS} FROM tool_calls WHERE run_id = ? ORDER BY turn, position",
                (run_id,),
            ).fetchall()
        )
        return [_call_from_row(row) for row in rows]

    # -- approvals -------------------------------------------------------------------------

    async def open_approval(
        self,
        claim: Claim,
        approval: NewApproval,
        checkpoint: Checkpoint,
        call: NewToolCall | None = None,
        turn: NewPolicyTurn | None = None,
    ) -> ApprovalRecord:
        """Open a request and park the run: one transaction, so no request is ever lost.

        `call` is the await_approval call that asked (journaled as intent); an in-doubt request
        has none. The run's lease is released: a waiting run holds no process.
        """
        now = time.time()
        token = secrets.token_urlsafe(12)
        run_id = claim.run_id

        def open_(conn: Connection) -> int:
            self._fence(conn, claim)
            number = self._next_request_number(conn, run_id)
            events = []
            if turn is not None:
                events.append(self._insert_policy_turn(conn, run_id, turn, now))
            if call is not None:
                events.append(self._insert_intent(conn, run_id, call, now))
            cursor = conn.execute(
                "INSERT INTO approvals (token, run_id, call_key, kind, step_id, action, reason, "
                "rollback, deciders, four_eyes, requested_by, status, created_at, deadline_at, "
                "number, mode, runs_on, evidence) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?) "
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
                    _dumps(approval.deciders),
                    int(approval.four_eyes),
                    approval.requested_by,
                    now,
                    approval.deadline_at,
                    number,
                    approval.mode,
                    approval.runs_on,
                    _dumps(approval.evidence),
                ),
            )
            approval_id = int(cursor.fetchone()[0])
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
            }
            # The token works like a password for buttons: chats get it, the journal does not.
            journaled = {k: v for k, v in payload.items() if k != "token"}
            events.append(NewEvent("approval_requested", journaled))
            self._park(conn, run_id, events, now, RunStatus.WAITING_APPROVAL, checkpoint)
            self._enqueue_outbox(conn, run_id, "approval_request", payload, now)
            return approval_id

        approval_id = await self._transaction(open_, durable=True)
        return await self.get_approval(approval_id)

    def _next_request_number(self, conn: Connection, run_id: str) -> int:
        """In an opening transaction: the next request number of the run's incident (its
        tree), counted from 1. The root's row is locked first, so two requests of one tree
        opened at once get different numbers."""
        root = self._root_id(conn, run_id)
        conn.execute("SELECT id FROM runs WHERE id = ?" + self.dialect.for_update, (root,))
        row = conn.execute(
            "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
            "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
            "SELECT COUNT(*) FROM approvals WHERE run_id IN (SELECT id FROM tree)",
            (root,),
        ).fetchone()
        return int(row[0]) + 1

    async def get_approval_by_number(self, run_id: str, number: int) -> ApprovalRecord:
        """The request numbered `number` in the incident (tree) `run_id` belongs to."""

        def find(conn: Connection) -> Sequence[Any] | None:
            root = self._root_id(conn, run_id)
            return conn.execute(
                "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
                "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals "
                "WHERE run_id IN (SELECT id FROM tree) AND number = ?",
                (root, number),
            ).fetchone()

        row = await self._read(find)
        if row is None:
            raise ApprovalNotFound(f"run {run_id} has no request #{number}")
        return _approval_from_row(row)

    async def get_approval(self, approval_id: int) -> ApprovalRecord:
        """One approval request by id."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (approval_id,)
            ).fetchone()
        )
        if row is None:
            raise ApprovalNotFound(f"no approval request {approval_id}")
        return _approval_from_row(row)

    async def get_approval_by_token(self, token: str) -> ApprovalRecord:
        """One approval request by its opaque token."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE token = ?", (token,)
            ).fetchone()
        )
        if row is None:
            raise ApprovalNotFound("no such approval request")
        return _approval_from_row(row)

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
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals {where} ORDER BY id", params
            ).fetchall()
        )
        return [_approval_from_row(row) for row in rows]

    async def approved_gate_counts(self, run_id: str) -> Counter[str]:
        """How many attempts people allowed of each step of a run: approvals of its gate, and
        "retry" decisions on its in-doubt attempts (each good for one attempt)."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT step_id, COUNT(*) FROM approvals WHERE run_id = ? "
                "AND status = 'approved' AND step_id IS NOT NULL GROUP BY step_id",
                (run_id,),
            ).fetchall()
        )
        return Counter({row[0]: row[1] for row in rows})

    async def decide_approval(
        self,
        approval_id: int,
        status: ApprovalStatus,
        decided_by: str,
        note: str | None,
        effect: DecisionEffect,
    ) -> bool:
        """Record a decision if none was made yet, and apply its effect, atomically.

        Returns False (and changes nothing) when the request was already decided: the first
        decision wins.
        """
        now = time.time()

        def decide(conn: Connection) -> bool:
            row = conn.execute(
                "SELECT run_id, call_key, number FROM approvals WHERE id = ?", (approval_id,)
            ).fetchone()
            if row is None:
                raise ApprovalNotFound(f"no approval request {approval_id}")
            run_id, call_key, number = row
            # The deadline is checked here, in the deciding transaction: a decision that
            # arrives late expires the request instead, whatever the caller checked before.
            if self._expire_if_overdue(conn, approval_id, now):
                return False
            cursor = conn.execute(
                "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, note = ? "
                "WHERE id = ? AND status = 'pending'",
                (str(status), decided_by, now, note, approval_id),
            )
            if cursor.rowcount != 1:
                return False
            if effect.call_status is not None:
                conn.execute(
                    "UPDATE tool_calls SET status = ?, outcome = COALESCE(?, outcome), "
                    "outcome_at = ? WHERE call_key = ?",
                    (
                        effect.call_status,
                        _dumps(effect.call_outcome) if effect.call_outcome is not None else None,
                        now,
                        call_key,
                    ),
                )
            events = [
                NewEvent(
                    "approval_decided",
                    {
                        "approval_id": approval_id,
                        "number": number,
                        "call_key": call_key,
                        "decision": str(status),
                        "decided_by": decided_by,
                        "note": note,
                    },
                )
            ]
            if effect.call_status is not None and effect.call_outcome is not None:
                events.append(
                    NewEvent(
                        "tool_outcome",
                        {
                            "call_key": call_key,
                            "status": effect.call_status,
                            "outcome": effect.call_outcome,
                        },
                    )
                )
            updates: dict[str, Any] = {"status": str(effect.run_status)}
            if effect.checkpoint is not None:
                updates["checkpoint"] = effect.checkpoint.to_json()
            if effect.run_status.is_terminal:
                updates["finished_at"] = now
                updates["error"] = effect.error
                events.append(
                    NewEvent(
                        "run_finished", {"status": str(effect.run_status), "error": effect.error}
                    )
                )
            self._append_events(conn, run_id, events, now, updates)
            self._enqueue_outbox(
                conn,
                run_id,
                "approval_decided",
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
                    conn, run_id, "run_finished", {"status": str(effect.run_status)}, now
                )
                self._wake_parent(conn, run_id, now)
            return True

        return await self._transaction(decide, durable=True)

    async def expire_approval(self, approval_id: int) -> bool:
        """Expire a pending request past its deadline and end its run as expired."""
        now = time.time()
        return await self._transaction(
            lambda conn: self._expire_if_overdue(conn, approval_id, now), durable=True
        )

    def _expire_if_overdue(self, conn: Connection, approval_id: int, now: float) -> bool:
        """In the caller's transaction: expire the request if it is pending and overdue."""
        row = conn.execute(
            "SELECT run_id FROM approvals WHERE id = ? AND status = 'pending' AND deadline_at <= ?",
            (approval_id, now),
        ).fetchone()
        if row is None:
            return False
        run_id = row[0]
        conn.execute(
            "UPDATE approvals SET status = 'expired', decided_at = ? WHERE id = ?",
            (now, approval_id),
        )
        error = "approval request expired without a decision"
        self._append_events(
            conn,
            run_id,
            [
                NewEvent("approval_expired", {"approval_id": approval_id}),
                NewEvent("run_finished", {"status": "expired", "error": error}),
            ],
            now,
            {"status": RunStatus.EXPIRED, "finished_at": now, "error": error},
        )
        self._enqueue_outbox(conn, run_id, "approval_expired", {"approval_id": approval_id}, now)
        self._enqueue_outbox(conn, run_id, "run_finished", {"status": "expired"}, now)
        self._wake_parent(conn, run_id, now)
        return True

    async def next_approval_deadline(self) -> float | None:
        """The earliest deadline of a pending approval request, if any."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT MIN(deadline_at) FROM approvals WHERE status = 'pending'"
            ).fetchone()
        )
        return row[0]

    async def overdue_approval_ids(self) -> list[int]:
        """Pending requests whose deadline has passed."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT id FROM approvals WHERE status = 'pending' AND deadline_at <= ? "
                "ORDER BY id",
                (time.time(),),
            ).fetchall()
        )
        return [row[0] for row in rows]

    # -- journal ---------------------------------------------------------------------------

    async def chain_head(self, run_id: str) -> tuple[str, int]:
        """The hash and length the run recorded for its own chain."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT last_hash, event_count FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
        )
        if row is None:
            raise RunNotFound(f"unknown run id {run_id!r}")
        return row[0], row[1]

    async def append_event(
        self, run_id: str, type_: str, data: dict[str, Any], claim: Claim | None = None
    ) -> None:
        """Append one event outside any other change (e.g. a note from a front end); a drive
        passes its `claim`, and writes nothing once it lost the lease (LeaseLost)."""
        now = time.time()

        def append(conn: Connection) -> None:
            if claim is not None:
                self._fence(conn, claim)
            self._append_events(conn, run_id, [NewEvent(type_, data)], now)

        await self._transaction(append)

    async def interrupt_run(self, claim: Claim, reason: str, retry_after: float) -> bool:
        """Journal why a drive stopped and hand the run back, queued for whoever claims it
        after `retry_after` seconds; fenced, so a driver that lost its lease writes nothing
        (False)."""
        now = time.time()

        def interrupt(conn: Connection) -> bool:
            try:
                self._fence(conn, claim)
            except LeaseLost:
                return False
            self._append_events(
                conn,
                claim.run_id,
                [NewEvent("run_interrupted", {"error": reason})],
                now,
                {
                    "status": RunStatus.QUEUED,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "not_before": now + retry_after,
                },
            )
            return True

        return await self._transaction(interrupt)

    async def list_events(
        self, run_id: str, after_seq: int = 0, limit: int | None = None
    ) -> list[EventRecord]:
        """A run's journal in order, optionally after a sequence number."""
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE run_id = ? AND seq > ? ORDER BY seq"
        params: tuple[Any, ...] = (run_id, after_seq)
        if limit is not None:
            sql += " LIMIT ?"
            params = (*params, limit)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [_event_from_row(row) for row in rows]

    async def list_tree_events(
        self, run_id: str, after_seq: int = 0, limit: int = 500
    ) -> list[EventRecord]:
        """The journal of a run and every run below it, in the order it was written."""
        rows = await self._read(
            lambda c: c.execute(
                "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
                "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
                f"SELECT {_EVENT_COLUMNS} FROM events "
                "WHERE run_id IN (SELECT id FROM tree) AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, after_seq, limit),
            ).fetchall()
        )
        return [_event_from_row(row) for row in rows]

    # -- live processes ----------------------------------------------------------------------

    async def beat_process(self, owner: str, kind: str, drives_runs: bool) -> None:
        """Register a long-running process serving this store, or renew its heartbeat."""
        now = time.time()
        await self._transaction(
            lambda c: c.execute(
                "INSERT INTO processes (owner, kind, drives_runs, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner) DO UPDATE SET "
                "heartbeat_at = excluded.heartbeat_at",
                (owner, kind, int(drives_runs), now, now),
            )
        )

    async def forget_process(self, owner: str) -> None:
        """A process stops serving the store (a clean exit)."""
        await self._transaction(
            lambda c: c.execute("DELETE FROM processes WHERE owner = ?", (owner,))
        )

    async def list_processes(self) -> list[ProcessRecord]:
        """Every registered process, live or not (see `heartbeat_at`), newest first; rows of
        processes gone for a day are dropped."""
        now = time.time()

        def listing(c: Connection) -> list[ProcessRecord]:
            c.execute("DELETE FROM processes WHERE heartbeat_at < ?", (now - 86400,))
            rows = c.execute(
                "SELECT owner, kind, drives_runs, started_at, heartbeat_at FROM processes "
                "ORDER BY started_at DESC"
            ).fetchall()
            return [
                ProcessRecord(
                    owner=row[0],
                    kind=row[1],
                    drives_runs=bool(row[2]),
                    started_at=row[3],
                    heartbeat_at=row[4],
                )
                for row in rows
            ]

        return await self._transaction(listing)

    async def count_active_roots(self) -> int:
        """Runs started by a front end (roots) with a run of their tree queued or running; a
        tree that only waits for a human holds nothing and is not counted."""
        row = await self._read(
            lambda c: c.execute(
                "WITH RECURSIVE up(id, parent_id) AS ("
                "SELECT id, parent_id FROM runs WHERE status IN ('queued', 'running') UNION "
                "SELECT r.id, r.parent_id FROM runs r JOIN up ON r.id = up.parent_id) "
                "SELECT COUNT(*) FROM up WHERE parent_id IS NULL"
            ).fetchone()
        )
        return int(row[0])

    async def metrics_snapshot(self) -> MetricsSnapshot:
        """Aggregates for /metrics, computed from the store (so every process agrees)."""
        bounds = ", ".join(
            f"SUM(CASE WHEN duration_ms <= {b * 1000:g} THEN 1 ELSE 0 END)"
            for b in DURATION_BUCKETS
        )
        wait_bounds = ", ".join(
            f"SUM(CASE WHEN decided_at - created_at <= {b:g} THEN 1 ELSE 0 END)"
            for b in WAIT_BUCKETS
        )

        def snapshot(c: Connection) -> MetricsSnapshot:
            runs = dict(c.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
            tools = [
                (row[0], list(row[1:-2]), row[-2], row[-1])
                for row in c.execute(
                    f"SELECT tool, {bounds}, COUNT(*), COALESCE(SUM(duration_ms), 0) / 1000.0 "
                    "FROM tool_calls WHERE duration_ms IS NOT NULL GROUP BY tool"
                ).fetchall()
            ]
            waits = [
                (row[0], list(row[1:-2]), row[-2], row[-1])
                for row in c.execute(
                    f"SELECT status, {wait_bounds}, COUNT(*), "
                    "COALESCE(SUM(decided_at - created_at), 0) FROM approvals "
                    "WHERE decided_at IS NOT NULL GROUP BY status"
                ).fetchall()
            ]
            tokens = c.execute(
                "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
                "FROM llm_calls"
            ).fetchone()
            return MetricsSnapshot(runs, tools, waits, int(tokens[0]), int(tokens[1]))

        return await self._read(snapshot)

    # -- outbox ----------------------------------------------------------------------------

    async def undelivered_messages(
        self, limit: int = 100, chat_id: int | None = None
    ) -> list[OutboxMessage]:
        """Messages still to deliver (of one chat), oldest first, backoffs included: a chat's
        messages go out in order, so one waiting out a backoff holds back those behind it."""
        sql = (
            "SELECT id, run_id, target, kind, payload, attempts, created_at, next_attempt_at, "
            "parts_sent FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
        )
        params: tuple[Any, ...] = ()
        if chat_id is not None:
            sql += f" AND {self.dialect.json_int('target', 'chat_id')} = ?"
            params = (chat_id,)
        sql += " ORDER BY id LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, (*params, limit)).fetchall())
        return [
            OutboxMessage(
                id=row[0],
                run_id=row[1],
                target=json.loads(row[2]),
                kind=row[3],
                payload=json.loads(row[4]),
                attempts=row[5],
                created_at=row[6],
                next_attempt_at=row[7],
                parts_sent=row[8],
            )
            for row in rows
        ]

    async def pending_chat_ids(self) -> list[int]:
        """The chats that have messages still to deliver."""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT DISTINCT {self.dialect.json_int('target', 'chat_id')} FROM outbox "
                "WHERE delivered_at IS NULL AND failed_at IS NULL"
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def mark_delivered(self, message_id: int, chat_message_id: int | None) -> bool:
        """Record a delivery once; False if it was already recorded."""
        return await self.mark_all_delivered([message_id], chat_message_id) == 1

    async def drop_stale_progress(self, before: float) -> int:
        """Give up the progress edits queued before `before` and not sent: the chat they edit
        is gone (a restarted sandbox starts an empty page). Requests and summaries stay."""
        return await self._transaction(
            lambda c: (
                c.execute(
                    "UPDATE outbox SET delivered_at = ? WHERE delivered_at IS NULL "
                    "AND kind = 'progress' AND created_at < ?",
                    (time.time(), before),
                ).rowcount
            )
        )

    async def mark_all_delivered(
        self, message_ids: Sequence[int], chat_message_id: int | None
    ) -> int:
        """Record that one chat message delivered these entries (progress rows coalesce into
        one edit); returns how many were not recorded before."""
        now = time.time()

        def mark(conn: Connection) -> int:
            cursor = conn.executemany(
                "UPDATE outbox SET delivered_at = ?, message_id = ? "
                "WHERE id = ? AND delivered_at IS NULL",
                [(now, chat_message_id, message_id) for message_id in message_ids],
            )
            return cursor.rowcount

        return await self._transaction(mark, durable=True)

    async def claim_messages(self, message_ids: Sequence[int]) -> None:
        """Mark entries as being sent: a change committed from now on queues its own entry
        instead of joining one whose message is already rendered."""
        now = time.time()
        await self._transaction(
            lambda c: c.executemany(
                "UPDATE outbox SET claimed_at = ? WHERE id = ?", [(now, i) for i in message_ids]
            ),
        )

    async def record_part_sent(self, message_id: int, parts_sent: int) -> None:
        """Record that the first `parts_sent` parts of an entry went out (never sent again)."""
        await self._transaction(
            lambda c: c.execute(
                "UPDATE outbox SET parts_sent = ? WHERE id = ? AND parts_sent < ?",
                (parts_sent, message_id, parts_sent),
            ),
            durable=True,
        )

    async def record_delivery_failure(
        self, message_id: int, error: str, retry_at: float | None
    ) -> None:
        """Count a failed attempt: retry it at `retry_at`, or give up on it when that is None."""
        now = time.time()

        def record(conn: Connection) -> None:
            # Two statements, not `CASE WHEN ? IS NULL`: PostgreSQL cannot type a bare NULL.
            then = "failed_at = ?" if retry_at is None else "next_attempt_at = ?"
            conn.execute(
                f"UPDATE outbox SET attempts = attempts + 1, last_error = ?, {then} "
                "WHERE id = ? AND delivered_at IS NULL",
                (error[:500], now if retry_at is None else retry_at, message_id),
            )

        await self._transaction(record)

    async def claim_chat(self, chat_id: int, owner: str, ttl: float) -> bool:
        """Take or extend the lease on delivering a chat's messages; False while another
        live instance holds it. One deliverer per chat keeps the chat's messages in order."""
        now = time.time()

        def claim(conn: Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO chat_leases (chat_id, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (chat_id) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE chat_leases.owner = excluded.owner OR chat_leases.expires_at < ?",
                (chat_id, owner, now + ttl, now),
            )
            return cursor.rowcount == 1

        return await self._transaction(claim)

    async def release_chat(self, chat_id: int, owner: str) -> None:
        """Give a chat's delivery lease back (any instance may take the chat at once)."""
        await self._transaction(
            lambda c: c.execute(
                "DELETE FROM chat_leases WHERE chat_id = ? AND owner = ?", (chat_id, owner)
            ),
        )

    async def first_sight_of_update(
        self, bot_id: int, update_id: int, digest: str | None = None
    ) -> bool:
        """Record that a Telegram update is being handled; False if it was taken before (by
        this or another instance), so no update is handled twice.

        With `digest` (of the update's content), a known id with other content is a new
        update: a Bot API that restarts its numbering reuses ids, while a redelivery repeats
        the content too. A row recorded without a digest counts as other content."""
        now = time.time()

        def record(conn: Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO telegram_updates (bot_id, update_id, digest, received_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (bot_id, update_id) DO NOTHING",
                (bot_id, update_id, digest, now),
            )
            new = cursor.rowcount == 1
            if not new and digest is not None:
                # The id is known: new only if its content differs (the row then remembers
                # this content, so a redelivery of it is caught in turn).
                cursor = conn.execute(
                    "UPDATE telegram_updates SET digest = ?, received_at = ? "
                    "WHERE bot_id = ? AND update_id = ? AND (digest IS NULL OR digest != ?)",
                    (digest, now, bot_id, update_id, digest),
                )
                new = cursor.rowcount == 1
            if update_id % 500 == 0:  # Telegram redelivers for a day at most: keep a week
                conn.execute(
                    "DELETE FROM telegram_updates WHERE bot_id = ? AND received_at < ?",
                    (bot_id, now - UPDATE_MEMORY),
                )
            return new

        return await self._transaction(record, durable=True)

    async def approval_message_id(self, approval_id: int) -> int | None:
        """The chat message that carries an approval request's buttons, once delivered."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT message_id FROM outbox WHERE kind = 'approval_request' "
                f"AND {self.dialect.json_int('payload', 'approval_id')} = ? "
                "AND message_id IS NOT NULL",
                (approval_id,),
            ).fetchone()
        )
        return row[0] if row else None

    async def progress_message(self, root_id: str) -> tuple[int, float] | None:
        """The message showing a run tree's progress, and when it was last sent or edited."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT message_id, delivered_at FROM outbox "
                "WHERE kind = 'progress' "
                f"AND {self.dialect.json_text('payload', 'root_id')} = ? "
                "AND message_id IS NOT NULL ORDER BY delivered_at DESC, id DESC LIMIT 1",
                (root_id,),
            ).fetchone()
        )
        return (row[0], row[1]) if row else None

    # -- chat users ------------------------------------------------------------------------

    async def remember_chat_user(self, identity: str, display: str) -> None:
        """Record how a chat identity (`telegram:<id>`) is shown to people, e.g. `@alice`."""
        now = time.time()
        await self._transaction(
            lambda c: c.execute(
                "INSERT INTO chat_users (identity, display, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (identity) DO UPDATE SET display = excluded.display, "
                "updated_at = excluded.updated_at WHERE chat_users.display != excluded.display",
                (identity, display, now),
            ),
        )

    async def chat_user_names(self, identities: Iterable[str]) -> dict[str, str]:
        """How each known identity is shown; unknown identities are left out."""
        wanted = sorted(set(identities))
        if not wanted:
            return {}
        marks = ", ".join("?" for _ in wanted)
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT identity, display FROM chat_users WHERE identity IN ({marks})", wanted
            ).fetchall()
        )
        return dict(rows)

    async def list_chat_runs(
        self, chat_id: int, limit: int = 10, active: bool = False
    ) -> list[RunRecord]:
        """The runs a chat started (roots only), newest first; only unfinished ones if
        `active`."""
        unfinished = "AND finished_at IS NULL " if active else ""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE parent_id IS NULL "
                f"AND {self.dialect.json_int('origin', 'chat_id')} = ? {unfinished}"
                "ORDER BY created_at DESC, id LIMIT ?",
                (chat_id, limit),
            ).fetchall()
        )
        return [_run_from_row(row) for row in rows]


_EVENT_COLUMNS = "seq, run_id, idx, ts, type, data, prev_hash, hash"


def _event_from_row(row: Sequence[Any]) -> EventRecord:
    return EventRecord(
        seq=row[0],
        run_id=row[1],
        idx=row[2],
        ts=row[3],
        type=row[4],
        data=_event_data(row[5]),
        prev_hash=row[6],
        hash=row[7],
    )


def _event_data(raw: str) -> dict[str, Any]:
    """An event's data; text that is no longer JSON (a damaged or tampered journal) is kept as
    it is, so the hash check reports it instead of the reader crashing."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {"_undecodable": raw}
    return data if isinstance(data, dict) else {"_undecodable": raw}


def _intent_event(call: NewToolCall, attempt: int) -> NewEvent:
    return NewEvent(
        "tool_intent",
        {
            "call_key": call.call_key,
            "tool": call.tool,
            "args": call.args,
            "step_id": call.step_id,
            "attempt": attempt,
        },
    )


_RUN_COLUMNS = (
    "id, parent_id, role, status, request, requested_by, origin, runbook_id, runbook, params, "
    "checkpoint, limits, summary, error, lease_owner, lease_expires_at, created_at, updated_at, "
    "finished_at, lease_epoch, policy, effects"
)


def _run_from_row(row: Sequence[Any]) -> RunRecord:
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


_CALL_COLUMNS = (
    "call_key, run_id, turn, position, tool, args, step_id, attempt, status, outcome, intent_at, "
    "outcome_at, duration_ms, repeatable, attempt_info"
)


def _call_from_row(row: Sequence[Any]) -> ToolCallRecord:
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


_TURN_COLUMNS = (
    "run_id, turn, policy, request_hash, response, prompt_tokens, completion_tokens, created_at"
)


def _turn_from_row(row: Sequence[Any]) -> PolicyTurnRecord:
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


_APPROVAL_COLUMNS = (
    "id, token, run_id, call_key, kind, step_id, action, reason, rollback, deciders, four_eyes, "
    "requested_by, status, decided_by, decided_at, note, created_at, deadline_at, number, mode, "
    "runs_on, evidence"
)


def _approval_from_row(row: Sequence[Any]) -> ApprovalRecord:
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
