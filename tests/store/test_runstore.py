"""RunStore on real SQLite files: migrations, the hash-chained append-only journal, the outbox
written with the state it reports, and tool-call intents that are never written twice."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

import agent.store.migrations
from agent.chain import first_broken_link
from agent.errors import CallNotInFlight, LeaseLost, SchemaTooNew, StoreError
from agent.events import Audit, PolicyTurn
from agent.records import (
    ApprovalKind,
    ApprovalStatus,
    Checkpoint,
    Claim,
    Decision,
    Effects,
    Origin,
    RunLimits,
    RunStatus,
    VoteOutcome,
)
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import (
    CallResult,
    DecisionEffect,
    Drive,
    NewApproval,
    NewRun,
    NewToolCall,
    RunStore,
    StartedCall,
)
from agent.store.database import POSTGRES, SQLITE
from agent.store.sqlite import CHECKPOINT_EVERY
from bench.roundtrips import count_postgres, count_store
from bot.store import ChatStore
from tests.conftest import postgres_schema
from tests.support import LATENCY, open_service, raw_rows

MIGRATIONS_DIR = Path(str(agent.store.migrations.__file__)).parent
LATEST = max(int(p.name[:4]) for p in MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
OWNER = "otherhost:1:test"
CHAT_ID = -1001234567890


def _files(db: Path) -> dict[str, str]:
    """SHA-256 of the database file and any -wal / -shm beside it."""
    found = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = Path(f"{db}{suffix}")
        if path.exists():
            found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _schema(db: Path) -> list[tuple[str, str, str]]:
    """Every schema object of the file, to compare before and after."""
    return sorted(raw_rows(db, "SELECT type, name, COALESCE(sql, '') FROM sqlite_master"))


def _user_version(db: Path) -> int:
    """PRAGMA user_version of the file."""
    return int(raw_rows(db, "PRAGMA user_version")[0][0])


def _set_user_version(db: Path, version: int) -> None:
    """Stamp the file with a schema version, as a newer loom-ops would."""
    conn = sqlite3.connect(db)
    try:
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
def settings(workspace: Path, db_url: str) -> Settings:
    """Settings for a mock-LLM, dry-run service over a fresh database of either engine."""
    return Settings(_env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester")


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[RunStore]:
    """A fresh store over a new database of either engine."""
    opened = await RunStore.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


async def _new_run(
    store: RunStore, run_id: str, origin: Origin | None = None, effects: Effects | None = None
) -> None:
    """A queued crash-drill run."""
    await store.create_run(
        NewRun(
            id=run_id,
            role="runbook",
            request="crash drill",
            requested_by="cli:tester",
            origin=origin or Origin(),
            limits=RunLimits(max_steps=40, max_tool_calls=100, deadline_seconds=3600),
            effects=effects,
        )
    )


async def _claimed_run(store: RunStore, run_id: str, origin: Origin | None = None) -> Drive:
    """A run created and claimed by OWNER, ready for tool calls; returns its drive."""
    await _new_run(store, run_id, origin)
    return await store.claim_run(run_id, OWNER, 30, lambda _owner: False)


# -- migrations --------------------------------------------------------------------------------


async def test_a_fresh_database_reaches_the_latest_schema(tmp_path: Path) -> None:
    """A new file gets every migration; reopening it applies nothing and keeps the data."""
    db = tmp_path / "nested" / "dir" / "fresh.sqlite"
    store = await RunStore.open(db)
    try:
        assert await store.schema_version() == LATEST
        await _claimed_run(store, "keep")
    finally:
        await store.close()
    assert _user_version(db) == LATEST
    tables = {name for kind, name, _ in _schema(db) if kind == "table"}
    assert {"runs", "events", "tool_calls", "approvals", "outbox"} <= tables
    schema, events = _schema(db), raw_rows(db, "SELECT * FROM events")

    reopened = await RunStore.open(db)
    try:
        assert await reopened.schema_version() == LATEST
        assert (await reopened.get_run("keep")).status == RunStatus.RUNNING
    finally:
        await reopened.close()
    assert _schema(db) == schema
    assert raw_rows(db, "SELECT * FROM events") == events


async def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    """A file from a newer loom-ops raises SchemaTooNew with both versions; not a byte changes."""
    db = tmp_path / "newer.sqlite"
    store = await RunStore.open(db)
    await _claimed_run(store, "future")
    await store.close()
    _set_user_version(db, LATEST + 7)
    before = _files(db)

    with pytest.raises(SchemaTooNew) as caught:
        await RunStore.open(db)

    message = str(caught.value)
    assert str(db) in message and f"version {LATEST + 7}" in message
    assert f"the {LATEST} this loom-ops knows" in message and "upgrade loom-ops" in message
    assert isinstance(caught.value, StoreError)
    assert _files(db) == before
    assert _user_version(db) == LATEST + 7


async def test_a_newer_schema_in_rollback_journal_mode_is_left_untouched(tmp_path: Path) -> None:
    """A too-new file that is not in WAL mode must not be switched to WAL by a refused open."""
    db = tmp_path / "newer-delete-mode.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY)")
    conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    conn.commit()
    conn.close()
    before = db.read_bytes()

    with pytest.raises(SchemaTooNew):
        await RunStore.open(db)

    assert raw_rows(db, "PRAGMA journal_mode") == [("delete",)]
    assert db.read_bytes() == before


async def test_a_file_that_is_not_sqlite_is_a_store_error(tmp_path: Path) -> None:
    """Garbage in place of the database is a one-line StoreError, and the file is kept."""
    db = tmp_path / "notes.sqlite"
    db.write_text("these are my incident notes, not a database\n" * 50)
    before = db.read_bytes()

    with pytest.raises(StoreError, match="is not a loom-ops database") as caught:
        await RunStore.open(db)

    assert "\n" not in str(caught.value)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite"]


async def test_someone_elses_sqlite_database_is_refused_and_left_untouched(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('alice')")
    conn.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match=r"not a loom-ops database \(it has tables users\)"):
        await RunStore.open(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


async def test_wal_and_foreign_keys_are_on(tmp_path: Path) -> None:
    """The file is in WAL mode; the store's own connection enforces foreign keys."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    try:
        assert raw_rows(store.label, "PRAGMA journal_mode") == [("wal",)]
        # Per-connection settings can only be read on the store's own connection.
        row = await store.db.read(lambda c: c.execute("PRAGMA foreign_keys").fetchone())
        assert tuple(row) == (1,)
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            await store.db.transaction(
                lambda c: c.execute(
                    "INSERT INTO events (run_id, idx, ts, type, data, prev_hash, hash) "
                    "VALUES ('no-such-run', 1, 0, 'x', '{}', '', '')"
                )
            )
    finally:
        await store.close()


HOLD_THE_WRITE_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


async def test_a_write_waits_off_the_event_loop_for_another_processs_lock(
    tmp_path: Path,
) -> None:
    """A transaction that finds the file locked by another process waits for the lock (it
    does not fail with "database is locked"), and the event loop goes on meanwhile."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_THE_WRITE_LOCK, store.label, "0.5",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"locked\n"
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        written = await store.db.transaction(
            lambda c: c.execute("UPDATE run_counter SET last_run_no = last_run_no").rowcount,
            brief=True,
        )
        ticker.cancel()
        assert written == 1
        assert await holder.wait() == 0  # the holder committed first: the write waited
        assert ticks >= 10, f"the event loop was blocked while the write waited ({ticks} ticks)"
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        await store.close()


async def test_the_wal_is_checkpointed_without_sqlites_automatic_checkpoint(
    tmp_path: Path,
) -> None:
    """SQLite's automatic checkpoint is off on the store's connection (it would run inside a
    commit on the event loop); the store checkpoints on its own thread, so the WAL stays
    about CHECKPOINT_EVERY commits long however many commits there are."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    wal = Path(f"{store.label}-wal")

    def commit(c: Any) -> None:
        c.execute("UPDATE run_counter SET last_run_no = last_run_no + 1")

    try:
        row = await store.db.read(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone())
        assert tuple(row) == (0,)
        for _ in range(CHECKPOINT_EVERY - 1):
            await store.db.transaction(commit, brief=True)
        before_any_checkpoint = wal.stat().st_size
        for _ in range(10 * CHECKPOINT_EVERY):
            await store.db.transaction(commit, brief=True)
        # Without checkpoints the WAL would be about 11 times as long.
        assert wal.stat().st_size <= 2.5 * before_any_checkpoint
    finally:
        await store.close()


# -- the journal -------------------------------------------------------------------------------


async def _finished_run(settings: Settings, run_id: str) -> None:
    """A real run, approved and finished, in the settings' database file."""
    async with open_service(settings) as service:
        await service.start(run_id, LATENCY)
        result = await service.decide(run_id, Decision.APPROVE, "cli:oncall")
        assert result.run.status == RunStatus.SUCCEEDED


async def test_a_real_runs_chain_verifies(settings: Settings) -> None:
    """Every event links to the one before it; idx counts from 1; the run row holds the head."""
    await _finished_run(settings, "chain")
    async with open_service(settings) as service:
        events = await service.store.list_events("chain")
    assert first_broken_link(events) is None
    assert [e.idx for e in events] == list(range(1, len(events) + 1))
    assert events[0].prev_hash == "" and events[0].type == "run_created"
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))
    head = raw_rows(settings.db, "SELECT event_count, last_hash FROM runs WHERE id = 'chain'")
    assert head == [(len(events), events[-1].hash)]


def _is_postgres(db: str) -> bool:
    return db.startswith("postgresql://")


async def test_events_are_append_only(settings: Settings) -> None:
    """UPDATE, DELETE (and TRUNCATE) on events are refused by triggers, whoever connects."""
    await _finished_run(settings, "locked")
    refused = (psycopg.Error, sqlite3.DatabaseError)
    for sql in (
        "UPDATE events SET data = '{}' WHERE run_id = 'locked' AND idx = 3",
        "DELETE FROM events WHERE run_id = 'locked' AND idx = 3",
        "DELETE FROM events",
        *(["TRUNCATE events CASCADE"] if _is_postgres(settings.db) else []),
    ):
        with pytest.raises(refused, match="append-only"):
            raw_rows(settings.db, sql)
    async with open_service(settings) as service:
        assert first_broken_link(await service.store.list_events("locked")) is None


def _behind_the_triggers(db: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Run `sql` on events with the append-only triggers out of the way, as an attacker with
    the database's owner rights could."""
    if _is_postgres(db):
        raw_rows(db, "ALTER TABLE events DISABLE TRIGGER USER")
        raw_rows(db, sql, params)
        return
    conn = sqlite3.connect(db)
    try:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("DROP TRIGGER events_no_delete")
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


async def test_tampering_with_one_event_is_found_exactly_there(settings: Settings) -> None:
    """Edit one event's data behind the triggers' back: the chain breaks at that event."""
    await _finished_run(settings, "tampered")
    await _finished_run(settings, "bystander")
    target = raw_rows(
        settings.db,
        "SELECT seq, idx FROM events WHERE run_id = 'tampered' AND type = 'approval_decided'",
    )[0]
    edit = (
        "UPDATE events SET data = jsonb_set(data::jsonb, '{decided_by}', '\"cli:mallory\"')::text"
        if _is_postgres(settings.db)
        else "UPDATE events SET data = json_set(data, '$.decided_by', 'cli:mallory')"
    )
    _behind_the_triggers(settings.db, edit + " WHERE seq = ?", (target[0],))

    async with open_service(settings) as service:
        broken = first_broken_link(await service.store.list_events("tampered"))
        assert broken is not None
        assert (broken.seq, broken.idx) == tuple(target)
        assert broken.data["decided_by"] == "cli:mallory"
        assert first_broken_link(await service.store.list_events("bystander")) is None


async def test_deleting_an_event_breaks_the_chain_at_the_gap(settings: Settings) -> None:
    """A removed event (triggers dropped) shows as a break at the event after the gap."""
    await _finished_run(settings, "gap")
    _behind_the_triggers(settings.db, "DELETE FROM events WHERE run_id = 'gap' AND idx = 4")
    async with open_service(settings) as service:
        broken = first_broken_link(await service.store.list_events("gap"))
    assert broken is not None and broken.idx == 5


# -- the outbox --------------------------------------------------------------------------------


def _outbox(db: str, run_id: str) -> list[tuple[str, float, str]]:
    """(kind, created_at, target) of a run's outbox rows but progress refreshes, in order."""
    return raw_rows(
        db,
        "SELECT kind, created_at, target FROM outbox WHERE run_id = ? AND kind != 'progress' "
        "ORDER BY id",
        (run_id,),
    )


def _json_text(db: str, column: str, key: str) -> str:
    dialect = POSTGRES if _is_postgres(db) else SQLITE
    return dialect.json_text(column, key)


def _progress(db: str, root_id: str) -> list[dict[str, Any]]:
    """Payloads of the progress rows of a run tree, in order."""
    rows = raw_rows(
        db,
        "SELECT payload FROM outbox WHERE kind = 'progress' "
        f"AND {_json_text(db, 'payload', 'root_id')} = ? ORDER BY id",
        (root_id,),
    )
    return [json.loads(row[0]) for row in rows]


async def test_a_chat_run_writes_its_messages_with_its_state(settings: Settings) -> None:
    """approval_request, approval_decided and run_finished are queued in the very transactions
    that open the request, record the decision and end the run (same timestamps)."""
    chat = Origin(kind="telegram", chat_id=42, thread_id=7)
    async with open_service(settings) as service:
        await service.start("chat", LATENCY, origin=chat, requested_by="telegram:5")
        pending = await service.pending_approval("chat")
        assert pending is not None
        rows = _outbox(settings.db, "chat")
        assert [(kind, ts) for kind, ts, _ in rows] == [("approval_request", pending.created_at)]
        assert rows[0][2] == '{"chat_id":42,"thread_id":7}'
        queued = [
            m
            for m in await ChatStore(service.store.db).undelivered_messages()
            if m.kind != "progress"
        ]
        assert [m.kind for m in queued] == ["approval_request"]
        assert queued[0].payload["token"] == pending.token
        assert queued[0].payload["action"] == pending.action
        assert queued[0].target == {"chat_id": 42, "thread_id": 7}

        result = await service.decide("chat", Decision.APPROVE, "telegram:100000001")

        approval, run = result.approval, result.run
        assert run.status == RunStatus.SUCCEEDED
        assert [(kind, ts) for kind, ts, _ in _outbox(settings.db, "chat")] == [
            ("approval_request", pending.created_at),
            ("approval_decided", approval.decided_at),
            ("run_finished", run.finished_at),
        ]
        decided = [
            m
            for m in await ChatStore(service.store.db).undelivered_messages()
            if m.kind != "progress"
        ][1]
        assert decided.payload["decided_by"] == "telegram:100000001"
        # Progress rows only ask for the progress message to be shown again: while one waits
        # undelivered, later step outcomes and the run's end add no more.
        assert _progress(settings.db, "chat") == [
            {"root_id": "chat", "run_id": "chat", "event": "started"}
        ]

        await service.start("again", LATENCY, origin=chat, requested_by="telegram:5")
        shown = [
            m.id
            for m in await ChatStore(service.store.db).undelivered_messages()
            if m.kind == "progress"
        ]
        assert len(shown) == 2  # one per run tree: "chat" and "again"
        await ChatStore(service.store.db).mark_all_delivered(shown, 1001)
        await service.decide("again", Decision.APPROVE, "telegram:100000001")
        [waiting] = [
            m
            for m in await ChatStore(service.store.db).undelivered_messages()
            if m.kind == "progress"
        ]
        assert waiting.payload["root_id"] == "again"
        assert waiting.payload["step_id"] == "scale-out"  # the first outcome after the gate


async def test_a_rejection_queues_decision_and_end_together(settings: Settings) -> None:
    """A rejection ends the run in the decision's transaction: both messages share its time."""
    async with open_service(settings) as service:
        await service.start("nope", LATENCY, origin=Origin(kind="telegram", chat_id=42))
        result = await service.decide("nope", Decision.REJECT, "cli:oncall", "no")
        rows = _outbox(settings.db, "nope")
        assert [kind for kind, _, _ in rows] == [
            "approval_request",
            "approval_decided",
            "run_finished",
        ]
        assert rows[1][1] == rows[2][1] == result.approval.decided_at == result.run.finished_at


async def test_delivery_is_recorded_once(settings: Settings) -> None:
    """mark_delivered succeeds once per message; a delivered message is not offered again."""
    async with open_service(settings) as service:
        await service.start("once", LATENCY, origin=Origin(kind="telegram", chat_id=42))
        [message] = [
            m
            for m in await ChatStore(service.store.db).undelivered_messages()
            if m.kind == "approval_request"
        ]

        first, second = await asyncio.gather(
            ChatStore(service.store.db).mark_delivered(message.id, 1001),
            ChatStore(service.store.db).mark_delivered(message.id, 1002),
        )

        assert sorted([first, second]) == [False, True]
        assert not await ChatStore(service.store.db).mark_delivered(message.id, 1003)
        assert message.id not in [
            m.id for m in await ChatStore(service.store.db).undelivered_messages()
        ]
        delivered = raw_rows(
            settings.db, "SELECT message_id, delivered_at FROM outbox WHERE id = ?", (message.id,)
        )
        assert delivered[0][0] == (1001 if first else 1002) and delivered[0][1] is not None


async def test_a_cli_run_queues_no_messages(service: RunService, settings: Settings) -> None:
    """A run with no chat behind it writes nothing to the outbox, whatever happens to it."""
    await service.start("quiet", LATENCY)
    await service.decide("quiet", Decision.APPROVE, "cli:oncall")
    await service.start("quieter", LATENCY)
    await service.cancel("quieter", "cli:oncall")
    assert raw_rows(settings.db, "SELECT COUNT(*) FROM outbox") == [(0,)]
    assert await ChatStore(service.store.db).undelivered_messages() == []


async def test_giving_up_on_an_outbox_entry_works_on_postgresql() -> None:
    """The sender gives an entry up (Forbidden, BadRequest, a chat no longer served, too many
    network failures) with `record_delivery_failure(id, error, None)`: on PostgreSQL too the
    entry is marked failed and its chat has nothing pending (else the chat's drain task dies
    on it and every poll starts again on the same head-of-line entry)."""
    with postgres_schema() as url:
        store = await RunStore.open(url)
        try:
            await store.create_run(
                NewRun(
                    id="r-chat",
                    role="runbook",
                    request=LATENCY,
                    requested_by="cli:tester",
                    origin=Origin(kind="telegram", chat_id=CHAT_ID),
                    limits=RunLimits(max_steps=10, max_tool_calls=10, deadline_seconds=600),
                )
            )
            [entry] = await ChatStore(store.db).undelivered_messages(chat_id=CHAT_ID)
            await ChatStore(store.db).record_delivery_failure(
                entry.id, "Forbidden: bot was blocked", None
            )
            assert await ChatStore(store.db).undelivered_messages(chat_id=CHAT_ID) == []
            assert await ChatStore(store.db).pending_chat_ids() == []
        finally:
            await store.close()


@pytest.mark.parametrize("configured", ["", "local", "remote_apply"])
async def test_only_a_durable_transaction_waits_for_postgresqls_wal_flush(configured: str) -> None:
    """A durable commit (a run's creation, a side effect's intent) waits for the server's WAL
    flush, as the operator configured it (here in the URL; the server's `on` when not);
    every other one (a step's) does not."""
    with postgres_schema() as url:
        if configured:
            url += quote(f" -csynchronous_commit={configured}")
        store = await RunStore.open(url, pool_size=1)  # one connection: all run on it

        def setting(conn: Any) -> str:
            return str(conn.execute("SHOW synchronous_commit").fetchone()[0])

        try:
            durable = configured or "on"
            assert await store.db.transaction(setting, durable=True) == durable
            assert await store.db.transaction(setting) == "off"
            assert await store.db.transaction(setting, durable=True) == durable
        finally:
            await store.close()


async def test_only_a_process_with_journal_readers_listens_to_other_processes_steps() -> None:
    """On PostgreSQL every commit that journals notifies. A process serving journal readers
    (the HTTP API's streams) is woken by another process's step; one without (a worker, the
    bot) does not listen to the journal, so no step of any run wakes it, while a run queued
    by the same commit still does."""
    with postgres_schema() as url:
        writer, reader, worker = [await RunStore.open(url) for _ in range(3)]
        listening = [
            asyncio.create_task(reader.follow_others(journal=True)),
            asyncio.create_task(worker.follow_others(journal=False)),
        ]
        try:
            for listener in (reader, worker):  # each reports its channels once it listens
                await asyncio.wait_for(listener.runs_ready.wait(), 10)
                listener.runs_ready.clear()
            with reader.watch_journal(["r-1"]) as read, worker.watch_journal(["r-1"]) as work:
                await _new_run(writer, "r-1")  # journals the run and queues it, one commit
                await asyncio.wait_for(read.changed.wait(), 10)
                await asyncio.wait_for(worker.runs_ready.wait(), 10)
                worker.runs_ready.clear()
                # Notices arrive in commit order: once the next commit's is in, had the worker
                # listened to the journal, r-1's notice would have set its watch.
                await _new_run(writer, "r-2")
                await asyncio.wait_for(worker.runs_ready.wait(), 10)
                assert not work.changed.is_set()
        finally:
            for task in listening:
                task.cancel()
            await asyncio.gather(*listening, return_exceptions=True)
            for opened in (writer, reader, worker):
                await opened.close()


# -- tool call intents -------------------------------------------------------------------------


def _intent(key: str = "t#0.0") -> NewToolCall:
    """The intent of one non-idempotent step call."""
    return NewToolCall(key, 0, 0, "execute_step", {"step_id": "append-one"}, "append-one")


async def test_a_second_intent_for_the_same_call_is_refused(store: RunStore) -> None:
    """One intent per call; a rerun (idempotent, in doubt) gets a new attempt; a finished call
    is never begun again; a refusal writes nothing."""
    claim = await _claimed_run(store, "t")
    assert (await claim.begin_call(_intent(), Checkpoint())).attempt == 1
    events = len(await store.list_events("t"))

    with pytest.raises(StoreError, match="begun already"):
        await claim.begin_call(_intent(), Checkpoint())
    assert len(await store.list_events("t")) == events
    record = await store.get_tool_call("t#0.0")
    assert record is not None and (record.attempt, record.status) == (1, "intent")

    assert (await claim.begin_call(_intent(), Checkpoint(), rerun=True)).attempt == 2
    await claim.finish_call(
        _intent("t#0.0"), 2, CallResult("ok", {"done": True}, 1.0), Checkpoint()
    )
    with pytest.raises(StoreError, match="begun already"):
        await claim.begin_call(_intent(), Checkpoint())
    with pytest.raises(StoreError, match="already ok"):
        await claim.begin_call(_intent(), Checkpoint(), rerun=True)
    record = await store.get_tool_call("t#0.0")
    assert record is not None and (record.attempt, record.status) == (2, "ok")
    assert first_broken_link(await store.list_events("t")) is None


async def test_a_call_a_human_marked_for_retry_gets_one_new_attempt(store: RunStore) -> None:
    """An in-doubt call decided `retry` may be begun once more, and only once."""
    claim = await _claimed_run(store, "r")
    await claim.begin_call(_intent("r#0.0"), Checkpoint())
    approval = await claim.open_approval(
        NewApproval(
            call_key="r#0.0",
            kind=ApprovalKind.IN_DOUBT,
            step_id="append-one",
            action="append one",
            reason="may or may not have run",
            rollback=None,
            deciders=["cli:approver"],
            four_eyes=False,
            requested_by="cli:tester",
            deadline_at=time.time() + 60,
        ),
        Checkpoint(),
    )
    assert (await store.get_run("r")).status == RunStatus.WAITING_APPROVAL
    retry = DecisionEffect("retry", None, RunStatus.QUEUED, None)
    decided = await store.decide_approval(
        approval.id,
        ApprovalStatus.APPROVED,
        "cli:approver",
        None,
        retry,
        person="cli:approver",
        outcome=VoteOutcome.COMPLETES,
        counted=(),
    )
    assert decided.changed and decided.run.status == RunStatus.QUEUED
    record = await store.get_tool_call("r#0.0")
    assert record is not None and record.status == "retry"

    again = await store.claim_run("r", OWNER, 30, lambda _owner: False)
    assert (await again.begin_call(_intent("r#0.0"), Checkpoint(), fresh=False)).attempt == 2
    with pytest.raises(StoreError, match="already intent"):
        await again.begin_call(_intent("r#0.0"), Checkpoint(), fresh=False)
    with pytest.raises(LeaseLost):  # the earlier claim is fenced out, by its epoch
        await claim.finish_call(_intent("r#0.0"), 2, CallResult("ok", {}, 1.0), Checkpoint())


async def test_a_decision_past_the_deadline_is_not_recorded(store: RunStore) -> None:
    """The deadline is the first decision: once it passed, a decision must not be recorded."""
    claim = await _claimed_run(store, "slow")
    await claim.begin_call(_intent("slow#0.0"), Checkpoint())
    approval = await claim.open_approval(
        NewApproval(
            call_key="slow#0.0",
            kind=ApprovalKind.GATE,
            step_id="append-two",
            action="append two",
            reason="gate",
            rollback=None,
            deciders=["cli:approver"],
            four_eyes=False,
            requested_by="cli:tester",
            deadline_at=time.time() - 1,  # already past
        ),
        Checkpoint(),
    )
    approve = DecisionEffect("ok", {"approved": True}, RunStatus.QUEUED, Checkpoint(call=1))
    recorded = await store.decide_approval(
        approval.id,
        ApprovalStatus.APPROVED,
        "cli:approver",
        None,
        approve,
        person="cli:approver",
        outcome=VoteOutcome.COMPLETES,
        counted=(),
    )
    assert not recorded.changed
    assert recorded.approval.status == ApprovalStatus.EXPIRED  # the deadline decided it


async def test_a_drive_that_lost_its_lease_interrupts_nothing(store: RunStore) -> None:
    """A stale driver (its LLM call timed out after another process took the run over) must
    not journal `run_interrupted` nor hand back a run it no longer holds; the holder can."""
    stale = await _claimed_run(store, "i")
    holder = await store.claim_run("i", "otherhost:2:new", 30, lambda _owner: True)
    events = len(await store.list_events("i"))

    assert not await stale.interrupt("LLM timed out", 5)
    with pytest.raises(LeaseLost):
        await stale.note(Audit("stale"))
    assert len(await store.list_events("i")) == events
    assert (await store.get_run("i")).lease_owner == "otherhost:2:new"

    assert await holder.interrupt("LLM timed out", 5)
    run = await store.get_run("i")
    assert (run.status, run.lease_owner) == (RunStatus.QUEUED, None)
    assert (await store.list_events("i"))[-1].type == "run_interrupted"


async def test_stale_progress_edits_are_dropped_and_requests_kept(store: RunStore) -> None:
    """A restarted sandbox drops the progress edits queued before it started (their chat is
    gone); approval requests and summaries still go out."""
    claim = await _claimed_run(store, "s", Origin(kind="telegram", chat_id=42))
    await claim.begin_call(_intent("s#0.0"), Checkpoint())
    await claim.finish_call(_intent("s#0.0"), 1, CallResult("ok", {}, 1.0), Checkpoint())
    kinds = [m.kind for m in await ChatStore(store.db).undelivered_messages()]
    assert "progress" in kinds
    cutoff = time.time()
    await claim.finish(RunStatus.SUCCEEDED, Checkpoint(), "done", None)
    assert await ChatStore(store.db).drop_stale_progress(before=cutoff) >= 1
    left = await ChatStore(store.db).undelivered_messages()
    assert [m.kind for m in left if m.created_at < cutoff and m.kind == "progress"] == []
    assert "run_finished" in [m.kind for m in left]


async def test_a_pinned_runbook_moves_out_of_the_run_row_when_the_schema_is_upgraded(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written before the runbook left the run's row (schema 11) keeps every run's
    pinned runbook and params through the upgrade, and its runs go on from there."""
    from agent.store import postgres, sqlite

    for engine in (sqlite, postgres):
        shipped = engine.migrations(engine.MIGRATIONS)
        monkeypatch.setattr(
            engine, "migrations", lambda _pkg, shipped=shipped: [m for m in shipped if m[0] <= 11]
        )
    await (await RunStore.open(db_url)).close()  # the schema as an older loom-ops left it
    runbook = {"id": "disk", "steps": [{"id": "look", "title": "Look", "note": "df"}]}
    raw_rows(
        db_url,
        "INSERT INTO runs (id, role, status, request, requested_by, origin, runbook_id, "
        "runbook, params, checkpoint, limits, created_at, updated_at, lease_owner, "
        "lease_expires_at, lease_epoch) VALUES ('pinned', 'runbook', 'running', 'disk full', "
        "'cli:tester', ?, 'disk', ?, ?, ?, ?, 0, 0, ?, ?, 1)",
        (
            Origin().to_json(),
            json.dumps(runbook),
            json.dumps({"mount": "/var"}),
            Checkpoint().to_json(),
            RunLimits(max_steps=40, max_tool_calls=100, deadline_seconds=3600).to_json(),
            OWNER,
            time.time() + 60,
        ),
    )
    monkeypatch.undo()

    store = await RunStore.open(db_url)
    try:
        assert await store.schema_version() >= 12
        run = await store.get_run("pinned")
        assert (run.runbook_id, run.runbook, run.params) == ("disk", runbook, {"mount": "/var"})
        drive = await store.drive(Claim.of(run))
        await drive.finish(RunStatus.SUCCEEDED, Checkpoint(), "done", None)
        assert (await store.get_run("pinned")).runbook == runbook
    finally:
        await store.close()


def _old_run(db_url: str, status: str) -> None:
    """Run 'old' as a database at an older schema holds it (no journal yet)."""
    raw_rows(
        db_url,
        "INSERT INTO runs (id, role, status, request, requested_by, origin, checkpoint, limits, "
        "created_at, updated_at) VALUES ('old', 'runbook', ?, 'disk full', 'cli:tester', ?, ?, "
        "?, 0, 0)",
        (
            status,
            Origin().to_json(),
            Checkpoint().to_json(),
            RunLimits(max_steps=40, max_tool_calls=100, deadline_seconds=3600).to_json(),
        ),
    )


async def test_policy_answers_leave_their_own_table_when_the_schema_is_upgraded(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written while answers were also kept in `llm_calls` (schema 12) loses that
    copy on upgrade: each answer is read from its journal event, and every run keeps its token
    totals for the metrics."""
    from agent.store import postgres, sqlite

    for engine in (sqlite, postgres):
        shipped = engine.migrations(engine.MIGRATIONS)
        monkeypatch.setattr(
            engine, "migrations", lambda _pkg, shipped=shipped: [m for m in shipped if m[0] <= 12]
        )
    await (await RunStore.open(db_url)).close()  # the schema as an older loom-ops left it
    _old_run(db_url, "succeeded")
    for turn in (0, 1):
        answer = {"calls": [], "final": f"answer {turn}"}
        raw_rows(
            db_url,
            "INSERT INTO llm_calls (run_id, turn, policy, request_hash, response, "
            "prompt_tokens, completion_tokens, created_at) VALUES ('old', ?, 'llm', 'h', ?, "
            "100, 20, 0)",
            (turn, json.dumps(answer)),
        )
        data = {"turn": turn, "policy": "llm", "request_hash": "h", "response": answer,
                "prompt_tokens": 100, "completion_tokens": 20}  # fmt: skip
        raw_rows(
            db_url,
            "INSERT INTO events (run_id, idx, ts, type, data, prev_hash, hash) "
            "VALUES ('old', ?, 5, 'policy_turn', ?, '', '')",
            (turn + 1, json.dumps(data)),
        )
    monkeypatch.undo()

    store = await RunStore.open(db_url)
    try:
        tables = {row[0] for row in raw_rows(db_url, _TABLES[store.dialect.name])}
        assert "llm_calls" not in tables
        answer = await store.get_policy_turn("old", 1)
        assert answer is not None
        assert (answer.turn, answer.response["final"], answer.prompt_tokens) == (1, "answer 1", 100)
        assert [t.turn for t in await store.list_policy_turns("old")] == [0, 1]
        assert (await store.metrics_snapshot()).prompt_tokens == 200
    finally:
        await store.close()


async def test_call_arguments_and_outcomes_leave_their_row_when_the_schema_is_upgraded(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written while `tool_calls` also held each call's arguments and outcome
    loses that copy on upgrade: each is read from the call's last intent and outcome events,
    a retried call's included, and a call in flight again keeps its last outcome. An outcome
    journaled with U+0000 in it (before the journal kept it out), which PostgreSQL's JSON
    types refuse, neither stops the upgrade nor the metrics."""
    from agent.store import postgres, sqlite

    for engine in (sqlite, postgres):
        shipped = engine.migrations(engine.MIGRATIONS)
        payloads = next(i for i, (_, sql) in enumerate(shipped) if "DROP COLUMN args" in sql)
        older = shipped[:payloads]
        monkeypatch.setattr(engine, "migrations", lambda _pkg, older=older: older)
    await (await RunStore.open(db_url)).close()  # the schema as an older loom-ops left it
    _old_run(db_url, "running")
    first, second = "old#0.0", "old#1.0"
    failed = {"exit": 1, "stderr": "bad\x00byte"}  # journaled before U+0000 was kept out
    journal = [  # (type, data): the first call once, the second failed, retried, in flight
        ("tool_intent", {"call_key": first, "tool": "read_runbook", "args": {"id": "disk"}}),
        ("tool_outcome", {"call_key": first, "status": "ok", "outcome": {"steps": 2}}),
        ("tool_intent", {"call_key": second, "tool": "execute_step", "args": {"step_id": "a"}}),
        ("tool_outcome", {"call_key": second, "status": "error", "outcome": failed}),
        ("tool_intent", {"call_key": second, "tool": "execute_step", "args": {"step_id": "a"}}),
    ]
    for idx, (kind, data) in enumerate(journal, start=1):
        raw_rows(
            db_url,
            "INSERT INTO events (run_id, idx, ts, type, data, prev_hash, hash) "
            "VALUES ('old', ?, 5, ?, ?, '', '')",
            (idx, kind, json.dumps(data)),
        )
    for key, turn, tool, args, attempt, status, outcome in (
        (first, 0, "read_runbook", {"id": "disk"}, 1, "ok", {"steps": 2}),
        (second, 1, "execute_step", {"step_id": "a"}, 2, "intent", failed),
    ):
        raw_rows(
            db_url,
            "INSERT INTO tool_calls (run_id, call_key, turn, position, tool, args, step_id, "
            "attempt, status, outcome, intent_at) VALUES ('old', ?, ?, 0, ?, ?, ?, ?, ?, ?, 5)",
            (key, turn, tool, json.dumps(args), args.get("step_id"), attempt, status,
             json.dumps(outcome)),
        )  # fmt: skip
    monkeypatch.undo()

    store = await RunStore.open(db_url)
    try:
        read = {c.call_key: c for c in await store.list_tool_calls("old")}
        assert (read[first].args, read[first].status, read[first].outcome) == (
            {"id": "disk"},
            "ok",
            {"steps": 2},
        )
        assert (read[second].args, read[second].attempt, read[second].outcome) == (
            {"step_id": "a"},
            2,
            failed,
        )
        assert raw_rows(
            db_url, "SELECT call_key, intent_idx, outcome_idx FROM tool_calls ORDER BY call_key"
        ) == [(first, 1, 2), (second, 5, 4)]
        columns = {row[0] for row in raw_rows(db_url, _COLUMNS[store.dialect.name])}
        assert not {"args", "outcome"} & columns, columns
        scraped = await store.metrics_snapshot()  # folds the old journal, the NUL included
        counted = scraped.counters["tool_calls"]
        assert (scraped.journal_backlog, sum(counted.values())) == (0, 2), counted
    finally:
        await store.close()


_COLUMNS = {
    SQLITE.name: "SELECT name FROM pragma_table_info('tool_calls')",
    POSTGRES.name: "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = 'tool_calls'",
}

_TABLES = {
    SQLITE.name: "SELECT name FROM sqlite_master WHERE type = 'table'",
    POSTGRES.name: "SELECT table_name FROM information_schema.tables "
    "WHERE table_schema = current_schema()",
}


async def test_a_turn_has_one_journaled_answer(store: RunStore) -> None:
    """A second answer for a turn already answered is refused with everything written with it;
    the run's token totals count each answer once."""
    drive = await _claimed_run(store, "once")
    answer = PolicyTurn(turn=0, policy="mock", request_hash="h", response={}, prompt_tokens=7)
    await drive.begin_call(_intent("once#0.0"), Checkpoint(), turn=answer)
    events = await store.list_events("once")

    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)):
        await drive.begin_call(
            NewToolCall("once#0.1", 0, 1, "execute_step", {}, None), Checkpoint(), turn=answer
        )

    assert await store.list_events("once") == events
    assert [t.turn for t in await store.list_policy_turns("once")] == [0]
    assert (await store.metrics_snapshot()).prompt_tokens == 7


async def test_a_created_run_is_what_the_store_then_reads(store: RunStore) -> None:
    """create_run returns the run it wrote without reading it back: the same record a read
    gives, field for field."""
    created = await store.create_run(
        NewRun(
            id="fresh",
            role="runbook",
            request="disk full on web-1",
            requested_by="cli:tester",
            origin=Origin(kind="telegram", chat_id=42, thread_id=7),
            limits=RunLimits(max_steps=5, max_tool_calls=7, deadline_seconds=60),
            policy="mock",
            effects=Effects(shell=True, mcp=False, checks=True),
        )
    )
    assert created == await store.get_run("fresh")


# -- outcomes that wait for the drive's next write ----------------------------------------------


def _repeatable(key: str, position: int = 0) -> NewToolCall:
    """A call safe to run again (a read), whose outcome may wait for the next write."""
    return NewToolCall(key, 0, position, "read_runbook", {}, None, repeatable=True)


async def test_outcomes_held_for_the_next_write_keep_the_chain_and_every_call(
    store: RunStore,
) -> None:
    """Four outcomes each committed with the next call's intent, the last with the run's end:
    every call holds its outcome, in order, and the hash chain verifies."""
    drive = await _claimed_run(store, "c")
    for i in range(4):
        call = _repeatable(f"c#0.{i}", i)
        started = await drive.begin_call(call, Checkpoint(call=i), durable=False)
        drive.defer_outcome(call, started.attempt, CallResult("ok", {"i": i}, 1.0), Checkpoint())
    await drive.finish(RunStatus.SUCCEEDED, Checkpoint(call=4), "done", None)

    events = await store.list_events("c")
    assert first_broken_link(events) is None
    assert (await store.get_run("c")).event_count == len(events)
    calls = await store.list_tool_calls("c")
    assert [(c.call_key, c.status, c.outcome) for c in calls] == [
        (f"c#0.{i}", "ok", {"i": i}) for i in range(4)
    ]
    kinds = [e.type for e in events if e.type in ("tool_intent", "tool_outcome")]
    assert kinds == ["tool_intent", "tool_outcome"] * 4  # each outcome before the next intent


async def test_handing_a_run_back_writes_the_outcome_it_held(store: RunStore) -> None:
    """A process shutting down hands its run back: the outcome it held is written first, so
    the call is not found in doubt by whoever resumes the run."""
    drive = await _claimed_run(store, "h")
    call = _repeatable("h#0.0")
    started = await drive.begin_call(call, Checkpoint(), durable=False)
    drive.defer_outcome(call, started.attempt, CallResult("ok", {"read": 1}, 1.0), Checkpoint())
    await drive.release()
    record = await store.get_tool_call("h#0.0")
    assert record is not None and (record.status, record.outcome) == ("ok", {"read": 1})
    assert (await store.get_run("h")).status == RunStatus.QUEUED


async def test_a_steps_checks_refuse_a_wrong_write_and_wait_for_no_answer_of_their_own(
    store: RunStore,
) -> None:
    """A step's writes check themselves: an outcome for an attempt no longer in flight is
    refused with CallNotInFlight, and a call begun anew that is begun already is refused;
    each refusal writes nothing. On PostgreSQL the checks run on the server, and the drive's
    first step starts from the run head its claim left (see the next test), so the step
    waits for one answer: its commit's."""
    drive = await _claimed_run(store, "c")
    first, second = _repeatable("c#0.0"), _repeatable("c#0.1", 1)
    counts = count_store(store.db)
    uncount = count_postgres(counts)
    try:
        started = await drive.begin_call(first, Checkpoint(), durable=False)
    finally:
        uncount()
    assert counts.total_calls == 1
    if store.dialect == POSTGRES:
        assert counts.total_wire == 1, counts.lines(1)
    drive.defer_outcome(first, started.attempt, CallResult("ok", {}, 1.0), Checkpoint(call=1))
    await drive.begin_call(second, Checkpoint(call=1), durable=False)
    events = await store.list_events("c")

    with pytest.raises(CallNotInFlight, match=r"c#0\.0 attempt 1 is not in flight"):
        await drive.finish_call(first, 1, CallResult("failed", {}, 1.0), Checkpoint(call=2))
    with pytest.raises(StoreError, match=r"c#0\.1 was begun already"):
        await drive.begin_call(second, Checkpoint(call=2), durable=False)
    assert await store.list_events("c") == events
    record = await store.get_tool_call("c#0.0")
    assert record is not None and record.status == "ok"
    assert first_broken_link(events) is None


async def test_a_drives_step_starts_from_the_head_its_last_step_left_until_the_row_moves(
    store: RunStore, db_url: str
) -> None:
    """A claim and each step of its drive keep the run head they leave, and the drive's next
    write starts from it: on PostgreSQL a step waits only for its commit, with a deadline no
    earlier than the drive's last renewal. When another write moved the run's row since
    (another process's; here a note under the same claim), the step reads the row and the
    chain goes on unbroken; when another process took the run over, the step is refused
    with LeaseLost and writes nothing."""
    drive = await _claimed_run(store, "k")
    calls = [_repeatable(f"k#0.{n}", n) for n in range(4)]

    async def step(n: int) -> tuple[StartedCall, int]:
        counts = count_store(store.db)
        uncount = count_postgres(counts)
        try:
            started = await drive.begin_call(calls[n], Checkpoint(call=n), durable=False)
        finally:
            uncount()
        result = CallResult("ok", {"n": n}, 1.0)
        drive.defer_outcome(calls[n], started.attempt, result, Checkpoint(call=n + 1))
        return started, counts.total_wire

    first_trips = (await step(0))[1]
    await drive.renew(600)
    started, trips = await step(1)
    assert started.spawn_before >= time.time() + 590
    if store.dialect == POSTGRES:
        assert (first_trips, trips) == (1, 1)

    other = await RunStore.open(db_url)
    try:
        await Drive(other, drive.claim, drive.run).note(Audit("meanwhile"))
        await step(2)
        events = await store.list_events("k")
        assert [e.type for e in events[-3:]] == ["audit", "tool_outcome", "tool_intent"]
        assert first_broken_link(events) is None

        await other.claim_run("k", "otherhost:2:new", 30, lambda _owner: True)
        events = await store.list_events("k")
        with pytest.raises(LeaseLost):
            await step(3)
        assert await store.list_events("k") == events
        assert await store.get_tool_call("k#0.3") is None
    finally:
        await other.close()


async def test_a_claim_takes_only_runs_its_process_may_act(store: RunStore) -> None:
    """A process claims, and lists as runnable, only runs that do live nothing its settings
    forbid; a run from before effects were recorded is anyone's."""
    runs = {
        "dry": Effects(),
        "shell": Effects(shell=True),
        "mcp": Effects(mcp=True),
        "checks": Effects(checks=True),
        "all": Effects(shell=True, mcp=True, checks=True),
        "older": None,
    }
    for run_id, effects in runs.items():
        await _new_run(store, run_id, effects=effects)
    processes = {
        Effects(): {"dry", "older"},
        Effects(shell=True): {"dry", "shell", "older"},
        Effects(mcp=True, checks=True): {"dry", "mcp", "checks", "older"},
        Effects(shell=True, mcp=True, checks=True): set(runs),
    }
    for effects, acted in processes.items():
        listed = await store.runnable_run_ids(lambda _owner: False, effects=effects)
        assert set(listed) == acted, effects
    assert set(await store.runnable_run_ids(lambda _owner: False)) == set(runs)
    claimed = await store.claim_runnable(OWNER, 30, 10, Effects(shell=True))
    assert {claim.run_id for claim in claimed} == {"dry", "shell", "older"}
    claimed = await store.claim_runnable(OWNER, 30, 10, Effects(shell=True))
    assert claimed == []  # what is left needs MCP or live checks
    claimed = await store.claim_runnable(OWNER, 30, 10, Effects(shell=True, mcp=True, checks=True))
    assert {claim.run_id for claim in claimed} == {"mcp", "checks", "all"}


async def test_a_batch_claims_drive_starts_from_the_claimed_row_unless_it_went_stale(
    store: RunStore,
) -> None:
    """A worker's batch claim reads each run as it claims it: the drive of a claim starts
    from that row without reading it again. A claim this process took again since (a
    parent driving its child here), or one whose lease expired (another process may have
    taken the run), is read anew and refused with LeaseLost before anything is asked."""
    for run_id in ("b1", "b2", "b3"):
        await _new_run(store, run_id)
    dry = Effects()
    first, again = await store.claim_runnable(OWNER, 30, 2, dry)
    [expiring] = await store.claim_runnable(OWNER, 0.1, 1, dry)
    counts = count_store(store.db)
    drive = await store.drive(first)
    assert counts.total_calls == 0
    assert (drive.run.status, drive.run.lease_owner, drive.run.lease_epoch) == (
        RunStatus.RUNNING,
        OWNER,
        first.epoch,
    )
    await store.claim_run("b2", OWNER, 30, lambda _owner: False)  # this process, again
    with pytest.raises(LeaseLost):
        await store.drive(again)
    await asyncio.sleep(0.2)  # the lease expires: another process takes the run
    await store.claim_run("b3", "otherhost:2:new", 30, lambda _owner: False)
    with pytest.raises(LeaseLost):
        await store.drive(expiring)
    taken = await store.get_run("b3")
    assert (taken.status, taken.lease_owner) == (RunStatus.RUNNING, "otherhost:2:new")
    await drive.finish(RunStatus.SUCCEEDED, Checkpoint(), "done", None)
    assert drive.ended == await store.get_run("b1")
    assert drive.ended is not None and drive.ended.status == RunStatus.SUCCEEDED


async def test_an_outcome_a_lost_claim_could_not_write_stays_unsaved(store: RunStore) -> None:
    """Another process took the run over: the old drive's interrupt writes nothing, says so,
    and keeps its outcome as unsaved (the failpoint of a saved outcome does not fire)."""
    drive = await _claimed_run(store, "t")
    saved: list[int] = []
    drive.on_saved = lambda: saved.append(1)
    call = _repeatable("t#0.0")
    started = await drive.begin_call(call, Checkpoint(), durable=False)
    drive.defer_outcome(call, started.attempt, CallResult("ok", {}, 1.0), Checkpoint())
    await store.claim_run("t", "otherhost:2:new", 30, lambda _owner: True)

    assert await drive.interrupt("the model timed out", 30) is False
    assert saved == [] and drive.unsaved is not None
    record = await store.get_tool_call("t#0.0")
    assert record is not None and record.status == "intent"


async def test_a_cancelled_run_keeps_the_result_of_a_call_that_had_ended(store: RunStore) -> None:
    """Cancelled between a call's end and the drive's next write: the run's journal gets the
    call's real result, not "may have run"."""
    drive = await _claimed_run(store, "z")
    call = _repeatable("z#0.0")
    started = await drive.begin_call(call, Checkpoint(), durable=False)
    result = CallResult("error", {"exit": 1, "stderr": "boom"}, 1.0)
    drive.defer_outcome(call, started.attempt, result, Checkpoint())
    await store.cancel_run("z", "cli:tester")
    with pytest.raises(LeaseLost):
        await drive.note(Audit("late"))
    held = drive.unsaved
    assert held is not None

    assert await store.close_cancelled_call("z", held.call.call_key, held.result)
    record = await store.get_tool_call("z#0.0")
    assert record is not None
    assert (record.status, record.outcome) == ("error", {"exit": 1, "stderr": "boom"})


async def test_the_last_event_is_the_newest_of_the_run_alone(service: RunService) -> None:
    await service.start("first", LATENCY)
    await service.start("second", LATENCY)
    for run_id in ("first", "second"):
        journal = await service.events(run_id)
        assert await service.last_event(run_id) == journal[-1]
        assert journal[-1].run_id == run_id and journal[-1].idx == len(journal)
    assert await service.last_event("nobody") is None
