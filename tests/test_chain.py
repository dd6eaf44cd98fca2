"""The keyed audit chain on both engines: an attacker who can write the store but lacks the
audit key cannot rewrite a run, strip its MACs, edit the rows the views read, empty or delete a
run, or cut a child run short unnoticed; runs are numbered without gaps, even under concurrent
creation; an old unkeyed store upgrades and still verifies, as unkeyed, from the run number
the operator anchors the key at; a rotated key still verifies; a live store verifies intact;
the keys are never stored, and are redacted as they are used."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.chain import AuditKey, Keyring, canonical_json, event_hash, verify_chain
from agent.records import Checkpoint, Decision, Origin, RunLimits, RunStatus
from agent.redaction import Redactor
from agent.service.runs import RunService
from agent.settings import SecretStr, Settings
from agent.store import NewRun, RunStore
from agent.views.summary import render_summary, summary_of
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
    """A keyed, mock-LLM, dry-run service's settings over a fresh database of either engine,
    keyed from its first run on (what doctor tells the operator to record)."""
    return Settings(
        _env_file=None,
        db=db_url,
        workspace=workspace,
        mock_llm=True,
        user="tester",
        audit_key=KEY,
        audit_keyed_since=1,
    )


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

    [report] = (await service.verify_audit("victim")).runs
    assert not report.intact
    if strip_key_ids:  # every link verifies as plain; the key is in force since run #1
        assert "MACs were stripped" in (report.problem or "")
    else:  # the very first link is no HMAC under the key
        assert report.broken is not None and report.broken.idx == 1
    assert (await service.verify_audit("first")).intact
    verdict = await service.verify_all_audit()
    assert [r.run_id for r in verdict.runs if not r.intact] == ["victim"]
    assert verdict.numbering.intact


async def test_a_deleted_run_is_a_gap_in_the_numbering(
    service: RunService, settings: Settings
) -> None:
    for run_id in ("r1", "r2", "r3"):
        await service.start(run_id, LATENCY)
    runs = {r.id: r.run_no for r in (await service.store.audit_snapshot()).runs}
    assert runs == {"r1": 1, "r2": 2, "r3": 3}

    raw_rows(settings.db, "DELETE FROM outbox WHERE run_id = 'r2'")
    raw_rows(settings.db, "DELETE FROM tool_calls WHERE run_id = 'r2'")
    raw_rows(settings.db, "DELETE FROM approvals WHERE run_id = 'r2'")
    raw_rows(settings.db, "DELETE FROM run_runbooks WHERE run_id = 'r2'")
    _behind_the_triggers(settings.db, ("DELETE FROM events WHERE run_id = 'r2'", ()))
    raw_rows(settings.db, "DELETE FROM runs WHERE id = 'r2'")

    verdict = await service.verify_all_audit()
    assert all(r.intact for r in verdict.runs) and len(verdict.runs) == 2
    assert verdict.numbering.missing == [2]
    assert verdict.numbering.problems() == ["run number(s) 2 missing: runs were deleted"]


async def test_the_newest_run_deleted_shows_against_the_counter(
    service: RunService, settings: Settings
) -> None:
    for run_id in ("r1", "r2"):
        await service.start(run_id, LATENCY)
    for table in ("outbox", "tool_calls", "approvals", "run_runbooks"):
        raw_rows(settings.db, f"DELETE FROM {table} WHERE run_id = 'r2'")
    _behind_the_triggers(settings.db, ("DELETE FROM events WHERE run_id = 'r2'", ()))
    raw_rows(settings.db, "DELETE FROM runs WHERE id = 'r2'")
    numbering = (await service.verify_all_audit()).numbering
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
        snapshot = await store.audit_snapshot()
        counter, runs = snapshot.counter, snapshot.runs
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

    # The key comes in: doctor reads where the store stands, and names the number to record.
    keyed = settings.model_copy(update={"audit_keyed_since": None})
    anchor = await RunService.audit_anchor(keyed)
    assert anchor is not None and (anchor.counter, anchor.first_keyed) == (2, None)
    assert anchor.any_unkeyed
    service = await RunService.open(keyed)  # with a key: migrates, then writes keyed
    try:
        runs = {r.id: r.run_no for r in (await service.store.audit_snapshot()).runs}
        assert runs == {"older": 1, "old": 2}  # numbered in creation order
        await _finished(service, "new")
        # Unanchored, a verifier with the key cannot tell old unkeyed runs from stripped ones.
        [old] = (await service.verify_audit("old")).runs
        assert not old.intact and not old.problems and "--keyed-since" in (old.unverified or "")
        [old] = (await service.verify_audit("old", keyed_since=3)).runs
        assert old.intact and old.unkeyed == old.events == 2 and old.key_id is None
        [new] = (await service.verify_audit("new", keyed_since=3)).runs
        assert new.intact and new.unkeyed == 0 and new.key_id == AuditKey.of(KEY).id
        assert new.run_no == 3
        assert (await service.verify_all_audit(keyed_since=3)).intact  # old runs precede it
        assert (await RunService.audit_anchor(keyed)).first_keyed == 3  # type: ignore[union-attr]
    finally:
        await service.close()
    unkeyed = settings.model_copy(update={"audit_key": None, "audit_keyed_since": None})
    service = await RunService.open(unkeyed)
    try:
        assert (await service.verify_audit("old")).intact  # no key needed for unkeyed runs
        [new] = (await service.verify_audit("new")).runs  # not verified, and says why
        assert not new.intact and not new.problems
        assert "written with audit key k:" in (new.unverified or "")
        assert "set LOOM_OPS_AUDIT_KEY" in (new.unverified or "")
    finally:
        await service.close()


async def test_verifying_with_another_key_names_both(
    service: RunService, settings: Settings
) -> None:
    await service.start("k", LATENCY)
    run = await service.get("k")
    events = await service.events("k")
    other = AuditKey.of(OTHER_KEY)
    report = verify_chain(run, events, Keyring(other))
    assert not report.intact and not report.problems  # not verified, not "tampered"
    message = report.unverified or ""
    assert f"written with key {AuditKey.of(KEY).id}, which the verifier does not hold" in message
    assert f"(it holds {other.id})" in message and "\n" not in message


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
    key_file.write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\r\n")  # as Notepad saves it
    assert Settings(_env_file=None, audit_key_file=key_file).audit_secret() == AuditKey.of(KEY)
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
        assert last == (
            f"audit: run #1, tree of 4 runs, {report.events} events, head {report.head[:16]} "
            f"(key {key_id})"
        )
        published = last.split(" head ")[1].split()[0]
        assert (await service.verify_audit(run_id, published)).intact


# -- rows the views read, against the journal -------------------------------------------------


def _published(tree_text: str) -> str:
    """The head the audit summary publishes (its last line: `… head HEX (key …)`)."""
    last = tree_text.rstrip().splitlines()[-1]
    assert last.startswith("audit: run #"), last
    return last.split(" head ")[1].split()[0]


async def _summary_head(service: RunService, run_id: str) -> str:
    return _published(render_summary(summary_of(await service.run_tree(run_id, calls=True))))


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        (
            "UPDATE approvals SET decided_by = 'cli:mallory' WHERE run_id = 'victim'",
            "approvals[1].decided_by is 'cli:mallory' but the journal recorded 'cli:oncall'",
        ),
        (
            "UPDATE approvals SET status = 'rejected' WHERE run_id = 'victim'",
            "approvals[1].status is 'rejected' but the journal recorded 'approved'",
        ),
        (
            "UPDATE runs SET requested_by = 'cli:mallory' WHERE id = 'victim'",
            "runs[victim].requested_by is 'cli:mallory' but the journal recorded 'cli:tester'",
        ),
        (
            "UPDATE runs SET request = 'nothing to see' WHERE id = 'victim'",
            "runs[victim].request is 'nothing to see' but the journal recorded",
        ),
        (
            "UPDATE runs SET status = 'failed', error = 'it broke' WHERE id = 'victim'",
            "runs[victim].status is 'failed' but the journal recorded 'succeeded'",
        ),
        (
            "UPDATE approval_votes SET decided_by = 'cli:mallory' "
            "WHERE approval_id IN (SELECT id FROM approvals WHERE run_id = 'victim')",
            "approval_votes of approvals[1] hold cli:mallory",
        ),
        (
            "UPDATE tool_calls SET status = 'error' WHERE run_id = 'victim' AND step_id = "
            "(SELECT MIN(step_id) FROM tool_calls WHERE run_id = 'victim' AND status = 'ok')",
            ".status is 'error' but the journal recorded 'ok'",
        ),
        (
            # The row's arguments are its intent event's: pointed at the last call's, the
            # first call reads them.
            "UPDATE tool_calls SET intent_idx = (SELECT MAX(intent_idx) FROM tool_calls "
            "WHERE run_id = 'victim') WHERE run_id = 'victim' AND intent_idx = "
            "(SELECT MIN(intent_idx) FROM tool_calls WHERE run_id = 'victim')",
            ".args is ",
        ),
        (
            "UPDATE tool_calls SET outcome_idx = (SELECT MAX(outcome_idx) FROM tool_calls "
            "WHERE run_id = 'victim') WHERE run_id = 'victim' AND outcome_idx = "
            "(SELECT MIN(outcome_idx) FROM tool_calls WHERE run_id = 'victim')",
            ".outcome is ",
        ),
    ],
    ids=[
        "decider",
        "decision",
        "requester",
        "request",
        "run-status",
        "vote",
        "step-result",
        "step-args",
        "step-outcome",
    ],
)
async def test_a_row_the_views_read_changed_behind_the_journal_is_named(
    service: RunService, settings: Settings, sql: str, named: str
) -> None:
    """The MACs cover the journal; the summary reads rows. A row that no longer says what
    the journal recorded is TAMPERED, row and field named, even against the published head."""
    await _finished(service, "victim")
    published = await _summary_head(service, "victim")
    assert (await service.verify_audit("victim", published)).intact

    raw_rows(settings.db, sql)

    report = await service.verify_audit("victim", published)
    assert not report.intact and report.published_problem is None  # the journal is whole
    [run] = report.runs
    assert any(named in problem for problem in run.problems), run.problems
    verdict = await service.verify_all_audit()
    assert [r.run_id for r in verdict.runs if not r.intact] == ["victim"]


async def test_a_child_run_cut_short_does_not_end_at_the_published_tree_head(
    service: RunService, settings: Settings
) -> None:
    """A supervised run's approvals are journaled in its executor child: the summary publishes
    the head of the whole tree, so cutting the child's tail (its row wound back to match) is
    caught against it."""
    await service.start("inc", LATENCY, role="supervisor")
    await service.decide("inc", Decision.APPROVE, "cli:oncall")
    assert (await service.get("inc")).status == RunStatus.SUCCEEDED
    text = render_summary(summary_of(await service.run_tree("inc", calls=True)))
    assert "audit: run #1, tree of 4 runs, " in text
    published = _published(text)
    assert (await service.verify_audit("inc", published)).intact
    tree = await service.run_tree("inc", calls=False, events=True)
    [child] = {e.run_id for e in tree.events if e.type == "approval_decided"}
    assert child != "inc"

    rows = raw_rows(
        settings.db, "SELECT idx, hash FROM events WHERE run_id = ? ORDER BY idx", (child,)
    )
    keep = rows[:-1]  # its last event (its end) removed, its row wound back to the one before
    _behind_the_triggers(
        settings.db, ("DELETE FROM events WHERE run_id = ? AND idx > ?", (child, len(keep)))
    )
    raw_rows(
        settings.db,
        "UPDATE runs SET event_count = ?, last_hash = ? WHERE id = ?",
        (len(keep), keep[-1][1], child),
    )

    report = await service.verify_audit("inc", published)
    assert not report.intact
    assert report.published_problem is not None
    assert f"the published head {published} is not this tree's" in report.published_problem
    assert len(report.runs) == 4  # the tree verified is the whole tree, not the root alone


async def test_an_emptied_run_kept_as_a_row_is_found(
    service: RunService, settings: Settings
) -> None:
    """Deleting a run but keeping its row (so its number is no gap) leaves a run with no
    run_created event: that is no run loom-ops writes."""
    for run_id in ("r1", "r2", "r3"):
        await _finished(service, run_id)
    for table in ("outbox", "tool_calls", "approval_votes", "approvals", "run_runbooks"):
        where = "run_id = 'r2'"
        if table == "approval_votes":
            where = "approval_id IN (SELECT id FROM approvals WHERE run_id = 'r2')"
        raw_rows(settings.db, f"DELETE FROM {table} WHERE {where}")
    _behind_the_triggers(settings.db, ("DELETE FROM events WHERE run_id = 'r2'", ()))
    raw_rows(
        settings.db,
        "UPDATE runs SET event_count = 0, last_hash = '', key_id = NULL, request = 'drill', "
        "status = 'cancelled' WHERE id = 'r2'",
    )

    verdict = await service.verify_all_audit()
    bad = {r.run_id: r for r in verdict.runs if not r.intact}
    assert list(bad) == ["r2"]
    assert "it has no events" in (bad["r2"].problem or "")


async def test_a_run_whose_first_events_were_removed_is_found(
    service: RunService, settings: Settings
) -> None:
    """An unkeyed run before the key's anchor can be recomputed, but not without its start."""
    unkeyed = settings.model_copy(update={"audit_key": None, "audit_keyed_since": None})
    plain = await RunService.open(unkeyed)
    try:
        await _finished(plain, "old")
        rows = raw_rows(
            settings.db,
            "SELECT seq, idx, ts, type, data FROM events WHERE run_id = 'old' ORDER BY idx",
        )
        prev, statements = "", [("DELETE FROM events WHERE seq = ?", (rows[0][0],))]
        for seq, idx, ts, type_, data in rows[1:]:  # renumbered from 1, recomputed
            digest = event_hash(prev, "old", idx - 1, ts, type_, canonical_json(json.loads(data)))
            statements.append(
                (
                    "UPDATE events SET idx = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                    (idx - 1, prev, digest, seq),
                )
            )
            prev = digest
        statements.append(
            (
                "UPDATE runs SET event_count = ?, last_hash = ? WHERE id = 'old'",
                (len(rows) - 1, prev),
            )
        )
        _behind_the_triggers(settings.db, *statements)
        [report] = (await plain.verify_audit("old")).runs
    finally:
        await plain.close()
    assert not report.intact
    assert "its journal starts with run_claimed (#1), not run_created" in (report.problem or "")


# -- the anchor of the key comes from outside the store ----------------------------------------


async def test_stripping_every_keyed_run_is_caught_with_the_key(
    service: RunService, settings: Settings
) -> None:
    """Stripped MACs on every keyed run leave the store no keyed run to go by: the anchor the
    operator recorded says they must be keyed; without one, a key holder accepts none."""
    await _finished(service, "first")
    await _finished(service, "victim")
    for run_id in ("first", "victim"):
        _rewrite_without_the_key(settings.db, run_id, strip_key_ids=True)

    verdict = await service.verify_all_audit()  # anchored at run #1 (the setting)
    assert not verdict.intact
    for report in verdict.runs:
        assert "its first event is unkeyed though the key is in force since run #1" in (
            report.problem or ""
        )
    unanchored = settings.model_copy(update={"audit_keyed_since": None})
    other = await RunService.open(unanchored)
    try:
        [victim] = (await other.verify_audit("victim")).runs
        assert not victim.intact and "--keyed-since" in (victim.unverified or "")
        assert not (await other.verify_all_audit()).intact
    finally:
        await other.close()


async def test_a_key_set_while_a_run_waits_leaves_untouched_older_runs_intact(
    settings: Settings,
) -> None:
    """The key comes in while run #1 waits: #1 goes on keyed, #2 finished before the key. With
    the anchor doctor names (the next run number), both verify intact and unkeyed in part."""
    plain = settings.model_copy(update={"audit_key": None, "audit_keyed_since": None})
    svc = await RunService.open(plain)
    try:
        await svc.start("waiting", LATENCY)  # run #1: waits for approval
        await _finished(svc, "done-before-key")  # run #2
    finally:
        await svc.close()
    unanchored = settings.model_copy(update={"audit_keyed_since": None})
    anchor = await RunService.audit_anchor(unanchored)
    assert anchor is not None and anchor.counter == 2 and anchor.first_keyed is None
    keyed = settings.model_copy(update={"audit_keyed_since": anchor.counter + 1})
    svc = await RunService.open(keyed)  # the key is set and the service restarted
    try:
        await svc.decide("waiting", Decision.APPROVE, "cli:oncall")  # run #1 goes on, keyed
        await _finished(svc, "after-key")  # run #3
        verdict = await svc.verify_all_audit()
        assert verdict.intact, [r.problem for r in verdict.runs]
        unkeyed = {r.run_id: (r.unkeyed, r.events) for r in verdict.runs}
        assert 0 < unkeyed["waiting"][0] < unkeyed["waiting"][1]
        assert unkeyed["done-before-key"][0] == unkeyed["done-before-key"][1]
        assert unkeyed["after-key"][0] == 0
    finally:
        await svc.close()


# -- keys: rotation, several findings, redaction -------------------------------------------------


async def test_a_rotated_key_still_verifies_with_the_previous_keys(
    settings: Settings,
) -> None:
    """Runs written under a key that was rotated away verify with it named in
    LOOM_OPS_AUDIT_PREVIOUS_KEYS; without it, those runs are reported (not verified) and the
    others are still judged."""
    await _write_with(settings, KEY, "before")
    await _write_with(settings, OTHER_KEY, "after")
    rotated = settings.model_copy(
        update={"audit_key": SecretStr(OTHER_KEY), "audit_previous_keys": SecretStr(KEY)}
    )
    svc = await RunService.open(rotated)
    try:
        verdict = await svc.verify_all_audit()
        assert verdict.intact, [r.problem for r in verdict.runs]
    finally:
        await svc.close()
    forgot = settings.model_copy(update={"audit_key": SecretStr(OTHER_KEY)})
    svc = await RunService.open(forgot)
    try:
        verdict = await svc.verify_all_audit()
        by_run = {r.run_id: r for r in verdict.runs}
        assert by_run["after"].intact
        before = by_run["before"]
        assert not before.intact and not before.problems
        assert f"written with key {AuditKey.of(KEY).id}" in (before.unverified or "")
        assert "LOOM_OPS_AUDIT_PREVIOUS_KEYS" in (before.unverified or "")
    finally:
        await svc.close()


async def _write_with(settings: Settings, key: str, run_id: str) -> None:
    svc = await RunService.open(settings.model_copy(update={"audit_key": SecretStr(key)}))
    try:
        await _finished(svc, run_id)
    finally:
        await svc.close()


def test_audit_keys_are_redacted_as_they_are_used(tmp_path: Path) -> None:
    """A key given with spaces or a newline is used stripped: the stripped value is what
    must never show. Previous keys are redacted too."""
    settings = Settings(
        _env_file=None, audit_key=f"  {KEY} \n", audit_previous_keys=f" {OTHER_KEY} , "
    )
    assert settings.audit_secret() == AuditKey.of(KEY)
    redactor = Redactor(settings.redact_patterns, settings.secret_values())
    said = redactor.text(f"key {KEY} and {OTHER_KEY}.")
    assert KEY not in said and OTHER_KEY not in said
    with pytest.raises(ValueError, match="each previous audit key must be at least 16"):
        Settings(_env_file=None, audit_previous_keys=f"{OTHER_KEY},short")


# -- one snapshot ---------------------------------------------------------------------------


async def test_verify_on_a_live_store_never_says_tampered(service: RunService) -> None:
    """Runs written while they are verified: each verdict reads one snapshot, so an untouched
    run is never TAMPERED (its row and its events were read at one moment)."""
    checks, findings = 0, []

    async def verifier(run_id: str, stop: asyncio.Event) -> None:
        nonlocal checks
        while not stop.is_set():
            report = await service.verify_audit(run_id)
            checks += 1
            findings.extend(r.problem for r in report.runs if not r.intact)
            await asyncio.sleep(0)

    for n in range(4):
        run_id, stop = f"live{n}", asyncio.Event()
        await service.start(run_id, LATENCY, wait=False)
        task = asyncio.create_task(verifier(run_id, stop))
        await wait_until_waiting(service, run_id)
        await service.decide(run_id, Decision.APPROVE, "cli:oncall", wait=True)
        stop.set()
        await task
    assert checks > 4 and findings == []


async def wait_until_waiting(service: RunService, run_id: str) -> None:
    """Until the run waits for a person (polled: the run is driven in this process)."""
    for _ in range(2000):
        if (await service.get(run_id)).status == RunStatus.WAITING_APPROVAL:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} never waited for approval")


async def test_a_count_mismatch_is_worded_by_its_direction(
    service: RunService, settings: Settings
) -> None:
    await _finished(service, "r")
    raw_rows(settings.db, "UPDATE runs SET event_count = event_count - 1 WHERE id = 'r'")
    [report] = (await service.verify_audit("r")).runs
    assert "events were added behind the store's back" in (report.problem or "")
    assert "removed" not in (report.problem or "")
