"""The store's plumbing: transactions, wake-ups, and the writes every aggregate shares
(appending to a run's journal, fencing a drive's claim, queueing what a chat must hear)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.chain import AuditKey, canonical_json, event_link
from agent.errors import CallNotInFlight, LeaseLost, RunNotFound
from agent.events import Event, ToolOutcome
from agent.records import ChatNotice, Checkpoint, Claim, Origin, RunRecord, RunStatus
from agent.store.commands import CallResult, NewToolCall, Outcome, RunbookPin
from agent.store.database import (
    JOURNAL_CHANNEL,
    OUTBOX_CHANNEL,
    RUNS_CHANNEL,
    Connection,
    Database,
    Leadership,
)
from agent.store.rows import dumps

T = TypeVar("T")


# Events go in as one multi-row INSERT (a step appends two or three): on PostgreSQL each row
# of an executemany is a statement of its own, each costing the client as much as a round trip
# saves. Bounded well under SQLite's 32,766 parameters (8 per row).
_EVENTS_PER_INSERT = 100


@functools.lru_cache(maxsize=_EVENTS_PER_INSERT)
def _insert_events(count: int) -> str:
    """The INSERT of `count` journal rows."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * count)
    return (
        f"INSERT INTO events (run_id, idx, ts, type, data, prev_hash, hash, key_id) VALUES {values}"
    )


@functools.lru_cache(maxsize=256)
def _origin(text: str) -> Origin:
    """A run's origin from its row (few distinct ones, parsed once each: every step asks)."""
    return Origin.from_json(text)


class JournalWatch:
    """What `RunStore.watch_journal` hands out: an event set on new journal entries of the
    watched runs; `add` watches one more (a child run that appeared)."""

    def __init__(self, store: StoreBase) -> None:
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


class _StaleHead(Exception):
    """The run head kept for a drive's next write (by its claim or last step) no longer
    matches the run's row (another write came between): the transaction runs again, reading
    the row."""


@dataclass
class RunHead:
    """What a transaction reads of a run's row once: its chain head, where it came from, and
    who holds its lease (as of the transaction's start)."""

    event_count: int
    last_hash: str
    run_no: int | None  # None until the run's first event is written
    origin: str
    parent_id: str | None
    lease_owner: str | None
    lease_epoch: int
    status: str
    lease_expires_at: float | None
    # Written by the transaction but not yet journaled: the next append takes them along.
    carried_events: list[Event] = field(default_factory=list)
    carried_updates: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> RunHead:
        """A copy without what a transaction carried: the head a next transaction starts
        from (`dataclasses.replace` without its per-call look at the fields)."""
        return RunHead(**{**self.__dict__, "carried_events": [], "carried_updates": {}})


class StoreBase:
    """A database plus the wake-ups its commits send; every aggregate store extends it."""

    def __init__(self, db: Database, audit_key: AuditKey | None = None) -> None:
        self.db = db
        # What the journal's links are MACs under (None: plain hashes); never stored.
        self.audit_key = audit_key
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
        self._runs_written: set[str] = set()  # filled where a transaction runs (a thread)
        self._runs_written_lock = threading.Lock()
        self._last_seq_seen = 0
        # Runs a worker's batch claimed, as the claiming transaction left them, by run id:
        # the drive of each starts from that row instead of reading it again (see
        # ClaimsStore.drive); a later claim of the run by this process drops it.
        self._claimed_runs: dict[str, RunRecord] = {}
        # The run head each claim or drive's last step left, by run id, with the claim: the
        # drive's next write starts from it instead of reading the row (see `_fence`).
        self._kept_heads: dict[str, tuple[Claim, RunHead]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The database's name for people: a file path, or a URL without its password."""
        return self.db.label

    async def close(self) -> None:
        """Close the database."""
        await self.db.close()

    async def __aenter__(self) -> StoreBase:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def schema_version(self) -> int:
        """The schema version the database is at."""
        return await self.db.schema_version()

    # -- plumbing --------------------------------------------------------------------------

    async def _transaction(
        self, fn: Callable[[Connection], T], durable: bool = False, brief: bool = False
    ) -> T:
        """Run `fn` as one transaction, then wake what its commit concerns in this process.

        `durable` makes the commit (and every one before it) survive a power cut before this
        returns; `brief` (a step's bounded writes) lets SQLite run it on the event loop's
        thread. `fn` may run more than once (a PostgreSQL serialization conflict, a SQLite
        lock another process holds): it only touches the database and this store's wake-up
        flags.
        """
        queued = self._queued

        def run(conn: Connection) -> tuple[T, bool, bool, list[tuple[Claim, RunHead]]]:
            queued.outbox = queued.runs = False  # a re-run starts afresh
            queued.heads = {}
            queued.keep = []
            result = fn(conn)
            for run_id, head in queued.heads.items():
                if head.carried_events or head.carried_updates:  # nothing appended after them
                    self._append_events(conn, run_id, [], time.time())
            kept = [(claim, queued.heads[claim.run_id].copy()) for claim in queued.keep]
            return result, queued.outbox, queued.runs, kept

        try:
            result, outbox, runs, kept = await self.db.transaction(
                run, durable=durable, brief=brief
            )
        except _StaleHead:  # `_fence` dropped the kept head: this time it reads the row
            result, outbox, runs, kept = await self.db.transaction(
                run, durable=durable, brief=brief
            )
        self._kept_heads.update((claim.run_id, (claim, head)) for claim, head in kept)
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

    async def follow_others(self, journal: bool) -> None:
        """Until cancelled: wake this process's workers and senders, and with `journal` its
        journal readers, when another process commits (PostgreSQL's LISTEN; on SQLite, the
        callers poll). Every step notifies the journal: a process without readers (a worker,
        the bot) does not listen to it, so no step of any run wakes it."""
        channels = [RUNS_CHANNEL, OUTBOX_CHANNEL, *([JOURNAL_CHANNEL] if journal else [])]
        await self.db.listen(self._on_notice, channels)

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
        events: Sequence[Event],
        now: float,
        run_updates: dict[str, Any] | None = None,
    ) -> range:
        """Append events to a run's chain and apply `run_updates` to its row (a drive's
        transaction checked its lease first, with `_fence`); returns the chain positions
        `events` took (after any carried ones)."""
        first = self._next_idx(conn, run_id)
        taken = range(first, first + len(events))
        head = self._head(conn, run_id)
        if head.carried_events or head.carried_updates:
            events = [*head.carried_events, *events]
            run_updates = {**head.carried_updates, **(run_updates or {})}
            head.carried_events, head.carried_updates = [], {}
            carried = run_updates.get("checkpoint")
            if isinstance(carried, Checkpoint):  # not replaced by a later one: write it now
                run_updates["checkpoint"] = carried.to_json()
        updates: dict[str, Any] = {}
        if head.run_no is None and events:  # the run's first event: it takes its number now
            head.run_no = updates["run_no"] = self._next_run_no(conn)
        key = self.audit_key
        key_id = key.id if key else None
        count, prev = head.event_count, head.last_hash
        rows = []
        for event in events:
            count += 1
            data_json = canonical_json(event.data())
            digest = event_link(key, prev, run_id, head.run_no, count, now, event.type, data_json)
            rows.append((run_id, count, now, event.type, data_json, prev, digest, key_id))
            prev = digest
        for start in range(0, len(rows), _EVENTS_PER_INSERT):
            chunk = rows[start : start + _EVENTS_PER_INSERT]
            conn.execute(_insert_events(len(chunk)), [value for row in chunk for value in row])
        if rows:
            updates["key_id"] = key_id
            # This process's readers are woken after the commit; other processes' by the
            # database (PostgreSQL: migration 0025). A rolled-back transaction leaves a stale
            # entry: a spurious wake, nothing worse.
            with self._runs_written_lock:  # this runs on a database thread
                self._runs_written.add(run_id)
        head.event_count, head.last_hash = count, prev
        updates.update({"event_count": count, "last_hash": prev, "updated_at": now})
        updates.update(run_updates or {})
        if updates.get("status") == RunStatus.QUEUED:
            self._announce_runnable(conn)
        assignments = ", ".join(f"{column} = ?" for column in updates)
        conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*updates.values(), run_id))
        return taken

    def _next_idx(self, conn: Connection, run_id: str) -> int:
        """In a transaction: the chain position the next event appended to the run takes
        (the first of the next `_append_events`, after the events it carries)."""
        head = self._head(conn, run_id)
        return head.event_count + len(head.carried_events) + 1

    @staticmethod
    def _next_run_no(conn: Connection) -> int:
        """In the transaction creating a run: the next global run number. The counter row is
        written in that transaction, so a rollback gives its number back (no gap), and only
        run creations wait for its lock, never event appends."""
        row = conn.execute(
            "UPDATE run_counter SET last_run_no = last_run_no + 1 WHERE id = 1 "
            "RETURNING last_run_no"
        ).fetchone()
        return int(row["last_run_no"])

    def _head(self, conn: Connection, run_id: str) -> RunHead:
        """The run's row as this transaction holds it, read (and on PostgreSQL locked) once.

        Locked first: two appends to one run at once conflict here (one runs again), not on
        the journal's (run_id, idx) key after both computed the same next link. Later reads in
        the same transaction reuse it; `_append_events` keeps its chain head current."""
        heads: dict[str, RunHead] = self._queued.heads
        head = heads.get(run_id)
        if head is None:
            row = conn.execute(
                "SELECT event_count, last_hash, run_no, origin, parent_id, lease_owner, "
                "lease_epoch, status, lease_expires_at FROM runs WHERE id = ?"
                + self.dialect.for_update,
                (run_id,),
            ).fetchone()
            if row is None:
                raise RunNotFound(f"unknown run id {run_id!r}")
            head = heads[run_id] = RunHead(
                event_count=row["event_count"],
                last_hash=row["last_hash"],
                run_no=row["run_no"],
                origin=row["origin"],
                parent_id=row["parent_id"],
                lease_owner=row["lease_owner"],
                lease_epoch=row["lease_epoch"],
                status=row["status"],
                lease_expires_at=row["lease_expires_at"],
            )
        return head

    def _fence(
        self,
        conn: Connection,
        claim: Claim,
        earlier: Outcome | None = None,
        step: bool = False,
        lease_floor: float = 0.0,
    ) -> float:
        """First in every transaction of a run's drive: go on only while the claim (its owner
        at its epoch) still holds the lease; returns when the lease expires (at least
        `lease_floor`, the expiry the drive's last renewal proved).

        Checked before anything is written, so a drive that lost its run stops with LeaseLost
        rather than colliding with the new owner's rows (and on PostgreSQL the row lock makes a
        takeover committed meanwhile a conflict, and the re-run sees it). The epoch makes a
        stale drive fail even where the same owner claimed the run again since.

        A claim, and a `step` (a call's intent or outcome, which leave the run's status and
        lease as they are), keep the run head they leave for the drive's next write. That
        write starts from it instead of reading the row: its first statement checks on the
        row that nothing changed since (owner, epoch, status, and the journal's length, which
        every other write to the run moves), without waiting for an answer. If something did,
        the transaction runs again and reads the row. No other write keeps a head.

        `earlier` is the outcome of the drive's last call, when it was safe to repeat and so
        waited to ride along with this transaction (one commit per step instead of two)."""
        kept = self._kept_heads.pop(claim.run_id, None)
        if step:
            self._queued.keep.append(claim)
        if kept is not None and kept[0] == claim:
            head = self._reuse_head(conn, claim, kept[1])
        else:
            head = self._head(conn, claim.run_id)
            owner, epoch, status = head.lease_owner, head.lease_epoch, head.status
            if owner != claim.owner or epoch != claim.epoch or status != RunStatus.RUNNING:
                raise LeaseLost(
                    f"run {claim.run_id} is no longer driven by this claim (status {status}, "
                    f"epoch {epoch}, ours {claim.epoch})"
                )
        expires = head.lease_expires_at = max(float(head.lease_expires_at or 0.0), lease_floor)
        if earlier is not None:
            self._write_outcome(
                conn, claim.run_id, earlier.call, earlier.attempt, earlier.result,
                earlier.checkpoint, time.time(), carry=True,
            )  # fmt: skip
        return expires

    def _forget_head(self, claim: Claim) -> None:
        """Drop the run head kept for this claim's next write (its drive is over): a run
        cancelled or taken over elsewhere is never fenced here again to drop it."""
        kept = self._kept_heads.get(claim.run_id)
        if kept is not None and kept[0] == claim:
            self._kept_heads.pop(claim.run_id, None)

    def _reuse_head(self, conn: Connection, claim: Claim, kept: RunHead) -> RunHead:
        """In a drive's write: take the head its claim or last step left as this
        transaction's, after a check (the transaction's first statement, which also locks the
        row) that the row is still as it was left; else the transaction fails with
        `_StaleHead`."""
        head = self._queued.heads[claim.run_id] = kept.copy()
        self.db.expect(
            conn,
            "UPDATE runs SET updated_at = updated_at WHERE id = ? AND lease_owner = ? "
            "AND lease_epoch = ? AND status = ? AND event_count = ?",
            (claim.run_id, claim.owner, claim.epoch, RunStatus.RUNNING, head.event_count),
            1,
            _StaleHead,
        )
        return head

    def _write_outcome(
        self,
        conn: Connection,
        run_id: str,
        call: NewToolCall,
        attempt: int,
        result: CallResult,
        checkpoint: Checkpoint,
        now: float,
        carry: bool = False,
    ) -> None:
        """In the caller's (fenced) transaction: record the outcome of the attempt in flight,
        journal it, and move the run's checkpoint with it; with `carry`, the journal entry and
        the run's row wait for the transaction's next append (one row update, not two)."""
        gone = f"tool call {call.call_key} attempt {attempt} is not in flight"
        # The outcome event goes first in the run's next append (carried or now).
        self.db.expect(
            conn,
            "UPDATE tool_calls SET status = ?, outcome_idx = ?, outcome_at = ?, duration_ms = ? "
            "WHERE call_key = ? AND attempt = ? AND status = 'intent'",
            (
                result.status,
                self._next_idx(conn, run_id),
                now,
                result.duration_ms,
                call.call_key,
                attempt,
            ),
            1,
            lambda: CallNotInFlight(gone),
        )
        # Carried, the checkpoint is serialized only if no later write replaces it.
        updates: dict[str, Any] = {"checkpoint": checkpoint if carry else checkpoint.to_json()}
        if result.pin is not None:
            updates["runbook_id"] = result.pin.runbook_id
            self._pin_runbook(conn, run_id, result.pin)
        outcome = ToolOutcome(
            call.call_key, result.status, result.outcome, attempt, round(result.duration_ms, 3)
        )
        if carry:
            head = self._head(conn, run_id)
            head.carried_events += [outcome, *result.events]
            head.carried_updates.update(updates)
        else:
            self._append_events(conn, run_id, [outcome, *result.events], now, updates)
        progress = {
            "run_id": run_id,
            "tool": call.tool,
            "step_id": call.step_id,
            "status": result.status,
        }
        self._enqueue_outbox(conn, run_id, ChatNotice.PROGRESS, progress, now)

    @staticmethod
    def _pin_runbook(conn: Connection, run_id: str, pin: RunbookPin) -> None:
        """In the caller's transaction: keep the runbook (and params) the run commits to, in
        its own row (a step rewrites the run's row; it never copies the runbook)."""
        conn.execute(
            "INSERT INTO run_runbooks (run_id, runbook, params) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id) DO UPDATE SET runbook = excluded.runbook, "
            "params = excluded.params",
            (run_id, dumps(pin.runbook), dumps(pin.params)),
        )

    def _park(
        self,
        conn: Connection,
        run_id: str,
        events: Sequence[Event],
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
        kind: ChatNotice,
        payload: dict[str, Any],
        now: float,
        private_chats: Sequence[int] = (),
    ) -> None:
        """Queue a chat message in the caller's transaction when the run's tree came from a chat,
        and to each of `private_chats` (a person's own chat with the bot) wherever it came from.

        The end of a child run is not a summary of its own: it refreshes the root's progress
        message. Progress messages name the root, whose one message is edited in place. A
        private chat is the only chat outside the served ones the bot writes to, and only an
        approval request's reminder or escalation goes there (see bot.outbox).
        """
        head = self._head(conn, run_id)
        origin = _origin(head.origin)

        def insert(kind: ChatNotice, payload: dict[str, Any], to: str | None = None) -> None:
            if to is None:  # the run's own chat
                to = dumps({"chat_id": origin.chat_id, "thread_id": origin.thread_id})
            conn.execute(
                "INSERT INTO outbox (run_id, target, kind, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, to, kind, dumps(payload), now),
            )

        def privately_and_wake() -> None:
            for chat_id in private_chats:
                insert(kind, payload, dumps({"chat_id": chat_id, "private": True}))
            self._queued.outbox = True
            self.db.notify(conn, OUTBOX_CHANNEL)

        if origin.chat_id is None:
            if private_chats:
                privately_and_wake()
            return

        is_root = head.parent_id is None
        if kind in (ChatNotice.RUN_FINISHED, ChatNotice.PROGRESS):
            # A progress entry only says "show the tree's state again"; the message is rendered
            # from the store when it is sent, so one waiting entry per tree is enough.
            root_id = run_id if is_root else self._root_id(conn, head.parent_id)
            waiting = conn.execute(
                "SELECT 1 FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL "
                f"AND claimed_at IS NULL AND kind = '{ChatNotice.PROGRESS}' "
                # Locked: a sender claiming it meanwhile conflicts, and this queues anew.
                f"AND {self.dialect.json_text('payload', 'root_id')} = ?" + self.dialect.for_update,
                (root_id,),
            ).fetchone()
            if waiting is None:  # the progress message shows a run's end too
                insert(ChatNotice.PROGRESS, {"root_id": root_id, "run_id": run_id, **payload})
        if kind != ChatNotice.PROGRESS and (kind != ChatNotice.RUN_FINISHED or is_root):
            insert(kind, payload)  # only the root's end is a summary of its own
        privately_and_wake()

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
