"""The keyed audit chain on both engines: an attacker who can write the store but lacks the
audit key cannot rewrite a run, strip its MACs or delete a run unnoticed; runs are numbered
without gaps, even under concurrent creation; an old unkeyed store upgrades and still
verifies, as unkeyed; the key is never stored, and is redacted."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.chain import AuditKey, canonical_json, event_hash, verify_chain
from agent.errors import AuditKeyError
from agent.records import Checkpoint, Decision, Origin, RunLimits, RunStatus
from agent.redaction import Redactor
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import NewRun, RunStore
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    chat_bench,
    confirm_run,
    keyboard_data,
    run_id_of,
    summaries,
    wait_for,
    wait_for_approval,
)
from tests.support import LATENCY, raw_rows

KEY = "audit-key-for-tests-0123456789"
OTHER_KEY = "another-audit-key-9876543210"


@pytest.fixture
def settings(workspace: Path, db_url: str) -> Settings:
    """A keyed, mock-LLM, dry-run service's settings over a fresh database of either engine."""
    return Settings(
        _env_file=None,
        db=db_url,
        workspace=workspace,
        mock_llm=True,
        user="tester",
        audit_key=KEY,
    )


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[RunService]:
    svc = await RunService.open(settings)
    try:
        yield svc
    finally:
        await svc.close()


async def _finished(service: RunService, run_id: str) -> None:
    await service.start(run_id, LATENCY)
    result = await service.decide(run_id, Decision.APPROVE, "cli:oncall")
    assert result.run.status == RunStatus.SUCCEEDED


def _is_postgres(db: str) -> bool:
    return db.startswith("postgresql://")


def _behind_the_triggers(db: str, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Write events with the append-only triggers out of the way, as the database's owner can."""
    if _is_postgres(db):
        raw_rows(db, "ALTER TABLE events DISABLE TRIGGER USER")
        for sql, params in statements:
            raw_rows(db, sql, params)
        return
    conn = sqlite3.connect(db)
    try:
        conn.execute("DROP TRIGGER IF EXISTS events_no_update")
        conn.execute("DROP TRIGGER IF EXISTS events_no_delete")
        for sql, params in statements:
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def _rewrite_without_the_key(db: str, run_id: str, strip_key_ids: bool) -> None:
    """The attack of issue 17: change the decider, recompute every link of the run with the
    keyless formula anyone can read in agent/chain.py, and the run's recorded head. With
    `strip_key_ids` the events also lose their key ids, posing as an unkeyed run."""
    rows = raw_rows(
        db,
        "SELECT seq, idx, ts, type, data, key_id FROM events WHERE run_id = ? ORDER BY idx",
        (run_id,),
    )
    prev, statements = "", []
    for seq, idx, ts, type_, data, key_id in rows:
        data = canonical_json(json.loads(data.replace("cli:oncall", "cli:mallory")))
        digest = event_hash(prev, run_id, idx, ts, type_, data)
        statements.append(
            (
                "UPDATE events SET data = ?, prev_hash = ?, hash = ?, key_id = ? WHERE seq = ?",
                (data, prev, digest, None if strip_key_ids else key_id, seq),
            )
        )
        prev = digest
    statements.append(
        (
            "UPDATE runs SET last_hash = ?, key_id = ? WHERE id = ?",
            (prev, None if strip_key_ids else rows[-1][5], run_id),
        )
    )
    _behind_the_triggers(db, *statements)


@pytest.mark.parametrize("strip_key_ids", [False, True], ids=["key-ids-kept", "key-ids-stripped"])
async def test_a_run_rewritten_without_the_key_is_found_tampered(
    service: RunService, settings: Settings, strip_key_ids: bool
) -> None:
    await _finished(service, "first")
    await _finished(service, "victim")
    assert (await service.verify_audit("victim")).intact

    _rewrite_without_the_key(settings.db, "victim", strip_key_ids)

    report = await service.verify_audit("victim")
    assert not report.intact
    if strip_key_ids:  # every link verifies as plain; the run before it was keyed
        assert "MACs were stripped" in (report.problem or "")
    else:  # the very first link is no HMAC under the key
        assert report.broken is not None and report.broken.idx == 1
    assert (await service.verify_audit("first")).intact
    reports, numbering = await service.verify_all_audit()
    assert [r.run_id for r in reports if not r.intact] == ["victim"]
    assert numbering.intact


async def test_a_deleted_run_is_a_gap_in_the_numbering(
    service: RunService, settings: Settings
) -> None:
    for run_id in ("r1", "r2", "r3"):
        await service.start(run_id, LATENCY)
    runs = {r.id: r.run_no for r in (await service.store.numbered_runs())[1]}
    assert runs == {"r1": 1, "r2": 2, "r3": 3}

    raw_rows(settings.db, "DELETE FROM outbox WHERE run_id = 'r2'")
    raw_rows(settings.db, "DELETE FROM tool_calls WHERE run_id = 'r2'")
    raw_rows(settings.db, "DELETE FROM approvals WHERE run_id = 'r2'")
    raw_rows(settings.db, "DELETE FROM run_runbooks WHERE run_id = 'r2'")
    _behind_the_triggers(settings.db, ("DELETE FROM events WHERE run_id = 'r2'", ()))
    raw_rows(settings.db, "DELETE FROM runs WHERE id = 'r2'")

    reports, numbering = await service.verify_all_audit()
    assert all(r.intact for r in reports) and len(reports) == 2
    assert numbering.missing == [2]
    assert numbering.problems() == ["run number(s) 2 missing: runs were deleted"]


async def test_the_newest_run_deleted_shows_against_the_counter(
    service: RunService, settings: Settings
) -> None:
    for run_id in ("r1", "r2"):
        await service.start(run_id, LATENCY)
    for table in ("outbox", "tool_calls", "approvals", "run_runbooks"):
        raw_rows(settings.db, f"DELETE FROM {table} WHERE run_id = 'r2'")
    _behind_the_triggers(settings.db, ("DELETE FROM events WHERE run_id = 'r2'", ()))
    raw_rows(settings.db, "DELETE FROM runs WHERE id = 'r2'")
    _, numbering = await service.verify_all_audit()
    assert not numbering.intact and numbering.counter == 2 and numbering.highest == 1


async def test_runs_created_at_once_are_numbered_without_a_gap(db_url: str) -> None:
    """Concurrent creations wait for (on PostgreSQL: conflict over and retry) the counter's
    row; a retried or rolled-back creation gives its number back, unlike a sequence."""
    store = await RunStore.open(db_url, pool_size=4, audit_key=AuditKey.of(KEY))
    try:
        limits = RunLimits(max_steps=40, max_tool_calls=100, deadline_seconds=3600)
        made = await asyncio.gather(
            *(
                store.create_run(NewRun(f"c{i}", "runbook", "drill", "cli:t", Origin(), limits))
                for i in range(16)
            )
        )
        assert sorted(r.run_no for r in made) == list(range(1, 17))
        counter, runs = await store.numbered_runs()
        assert counter == 16 and {r.id: r.run_no for r in runs} == {r.id: r.run_no for r in made}
        assert all(r.key_id == AuditKey.of(KEY).id for r in runs)
    finally:
        await store.close()


def _v15_run(db_url: str, run_id: str, created_at: float) -> None:
    """A run as loom-ops before schema 17 wrote it: plain SHA-256 links, no key, no number."""
    limits = RunLimits(max_steps=40, max_tool_calls=100, deadline_seconds=3600)
    prev = ""
    events = [("run_created", {"role": "runbook"}), ("run_finished", {"status": "succeeded"})]
    raw_rows(
        db_url,
        "INSERT INTO runs (id, role, status, request, requested_by, origin, checkpoint, limits, "
        "created_at, updated_at) VALUES (?, 'runbook', 'succeeded', 'disk full', 'cli:tester', "
        "?, ?, ?, ?, ?)",
        (run_id, Origin().to_json(), Checkpoint().to_json(), limits.to_json(), created_at, 0),
    )
    for idx, (type_, data) in enumerate(events, start=1):
        data_json = canonical_json(data)
        digest = event_hash(prev, run_id, idx, 1.5, type_, data_json)
        raw_rows(
            db_url,
            "INSERT INTO events (run_id, idx, ts, type, data, prev_hash, hash) "
            "VALUES (?, ?, 1.5, ?, ?, ?, ?)",
            (run_id, idx, type_, data_json, prev, digest),
        )
        prev = digest
    raw_rows(
        db_url,
        "UPDATE runs SET event_count = ?, last_hash = ? WHERE id = ?",
        (len(events), prev, run_id),
    )


async def test_an_old_unkeyed_store_upgrades_and_verifies_as_unkeyed(
    settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.store import postgres, sqlite

    with monkeypatch.context() as patch:
        for engine in (sqlite, postgres):
            shipped = engine.migrations(engine.MIGRATIONS)
            patch.setattr(
                engine, "migrations", lambda _p, shipped=shipped: [m for m in shipped if m[0] <= 15]
            )
        await (await RunStore.open(db_url)).close()  # the schema as loom-ops 0015 left it
    _v15_run(db_url, "older", created_at=10)
    _v15_run(db_url, "old", created_at=20)

    service = await RunService.open(settings)  # with a key: migrates, then writes keyed
    try:
        runs = {r.id: r.run_no for r in (await service.store.numbered_runs())[1]}
        assert runs == {"older": 1, "old": 2}  # numbered in creation order
        old = await service.verify_audit("old")
        assert old.intact and old.unkeyed == old.events == 2 and old.key_id is None
        await _finished(service, "new")
        new = await service.verify_audit("new")
        assert new.intact and new.unkeyed == 0 and new.key_id == AuditKey.of(KEY).id
        assert new.run_no == 3
        reports, numbering = await service.verify_all_audit()
        assert all(r.intact for r in reports) and numbering.intact  # old runs precede the key
    finally:
        await service.close()
    unkeyed = settings.model_copy(update={"audit_key": None})
    service = await RunService.open(unkeyed)
    try:
        assert (await service.verify_audit("old")).intact  # no key needed for unkeyed runs
        with pytest.raises(AuditKeyError, match="set LOOM_OPS_AUDIT_KEY"):
            await service.verify_audit("new")
    finally:
        await service.close()


async def test_verifying_with_another_key_names_both(
    service: RunService, settings: Settings
) -> None:
    await service.start("k", LATENCY)
    run = await service.get("k")
    events = await service.events("k")
    other = AuditKey.of(OTHER_KEY)
    with pytest.raises(AuditKeyError) as refused:
        verify_chain(run, events, other)
    message = str(refused.value)
    assert f"written with key {AuditKey.of(KEY).id}, you gave {other.id}" in message
    assert "\n" not in message


async def test_the_audit_key_is_never_stored_and_is_redacted(
    service: RunService, settings: Settings
) -> None:
    await _finished(service, "secretive")
    tables = ["runs", "events", "tool_calls", "approvals", "outbox", "run_counter"]
    for table in tables:
        assert KEY not in repr(raw_rows(settings.db, f"SELECT * FROM {table}")), table
    redactor = Redactor(settings.redact_patterns, settings.secret_values())
    assert KEY not in redactor.text(f"the key is {KEY} here")
    assert KEY not in repr(settings.audit_secret())


def test_an_audit_key_file_is_read_and_checked(tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_text(KEY + "\n")
    from_file = Settings(_env_file=None, audit_key_file=key_file)
    assert from_file.audit_secret() == AuditKey.of(KEY)
    with pytest.raises(ValueError, match="cannot read"):
        Settings(_env_file=None, audit_key_file=tmp_path / "missing.key")
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(_env_file=None, audit_key="short")
    with pytest.raises(ValueError, match="not both"):
        Settings(_env_file=None, audit_key=KEY, audit_key_file=key_file)


async def test_the_chat_summary_ends_with_the_head_it_publishes(
    workspace: Path, tmp_path: Path
) -> None:
    """The real bot against the Bot API stand-in: the audit summary a run's end posts ends
    with the run's number, length, head and key id; verifying against that head passes."""
    keyed = Settings(
        _env_file=None,
        db=str(tmp_path / "bot.sqlite"),
        workspace=workspace,
        mock_llm=True,
        user="tester",
        audit_key=KEY,
    )
    async with chat_bench(keyed) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, LATENCY)
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
        standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        [summary] = summaries(standin, INCIDENTS, run_id)
        last = summary["text"].rstrip().splitlines()[-1]
        report = await service.verify_audit(run_id)
        key_id = AuditKey.of(KEY).id
        assert (
            last == f"audit: run #1, {report.events} events, head {report.head[:16]} (key {key_id})"
        )
        published = last.split(" head ")[1].split()[0]
        assert (await service.verify_audit(run_id, published)).intact
