"""The timers of a pending approval request, on both engines: it reminds the people who may
decide it, then escalates (its `escalate_to` become deciders), then expires; each hop is made
once however many processes sweep the store, and expiry never counts as consent (it stops the
run, or rolls its completed steps back first).

Real RunServices over a real SQLite file and a real PostgreSQL schema (LOOM_OPS_TEST_PG_DSN).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.errors import DeciderRefused
from agent.records import (
    ApprovalStatus,
    Checkpoint,
    Decision,
    Delay,
    Origin,
    RunLimits,
    RunStatus,
)
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import RunStore
from tests.cli_helpers import REPO, cli_env
from tests.support import open_service, raw_rows, write_runbook

CHAT = -100101

TIMERS = """\
id: timers
title: Timers drill
triggers: [timers drill]
approvers: [group:oncall]
four_eyes: true
approval_timeout: 600
escalation:
  remind_after: 0.05s
  escalate_after: 0.1s
  escalate_to: [group:leads]
steps:
  - id: look
    title: Look
    note: looking
  - id: act
    title: Act
    run: echo act
    approval: required
"""

ROLLBACK_ON_EXPIRY = """\
id: expiry-rollback
title: Expiry rolls back
triggers: [expiry rollback drill]
approvers: [group:oncall]
approval_timeout: 0.3
on_expiry: rollback
escalation:
  remind_after: 0
steps:
  - id: drain
    title: Drain the node
    note: draining
    rollback:
      note: undrain the node
  - id: look
    title: Look
    note: nothing to undo
  - id: act
    title: Act
    run: echo act
    approval: required
  - id: after
    title: After
    note: done
"""

STOP_ON_EXPIRY = (
    ROLLBACK_ON_EXPIRY.replace("on_expiry: rollback", "on_expiry: stop")
    .replace("id: expiry-rollback", "id: expiry-stop")
    .replace("[expiry rollback drill]", "[expiry stop drill]")
)

# tester starts runs and is in both groups (four eyes must still bar them after escalation);
# sam and dana are on call (dana has no name the chat knows), lee and kim lead (kim: CLI only).
PEOPLE = """\
people:
  - name: tester
    cli: tester
    groups: [oncall, leads]
  - name: sam
    cli: sam
    telegram: 100000001
    groups: [oncall]
  - name: dana
    telegram: 100000066
    groups: [oncall]
  - name: lee
    cli: lee
    telegram: 100000002
    groups: [leads]
  - name: kim
    cli: kim
    groups: [leads]
"""


@pytest.fixture
def settings(workspace: Path, db_url: str) -> Settings:
    write_runbook(workspace, "timers", TIMERS)
    write_runbook(workspace, "expiry-rollback", ROLLBACK_ON_EXPIRY)
    write_runbook(workspace, "expiry-stop", STOP_ON_EXPIRY)
    (workspace / "people.yaml").write_text(PEOPLE)
    return Settings(_env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester")


@pytest.fixture
async def other(settings: Settings) -> AsyncIterator[RunService]:
    """A second process's service over the same database (its own connections)."""
    svc = RunService(await RunStore.open(settings.db), settings)
    try:
        yield svc
    finally:
        await svc.close()


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait (polling) until `check` holds: a timer's moment to come, not a timing assert."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the timer never came"
        await asyncio.sleep(0.02)


async def _start_in_chat(service: RunService, run_id: str, message: str) -> None:
    origin = Origin(kind="telegram", chat_id=CHAT)
    run = await service.start(run_id, message, requested_by="cli:tester", origin=origin)
    assert run.status == RunStatus.WAITING_APPROVAL


async def _both_hops_due(service: RunService) -> bool:
    return len(await service.store.due_approval_hops()) == 2


async def _overdue(service: RunService) -> bool:
    return bool(await service.store.overdue_approval_ids())


def _events(db: str, run_id: str, event_type: str) -> list[dict[str, Any]]:
    rows = raw_rows(
        db,
        "SELECT data FROM events WHERE run_id = ? AND type = ? ORDER BY seq",
        (run_id, event_type),
    )
    return [json.loads(row[0]) for row in rows]


def _outbox(db: str, kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    rows = raw_rows(db, "SELECT target, payload FROM outbox WHERE kind = ? ORDER BY id", (kind,))
    return [(json.loads(target), json.loads(payload)) for target, payload in rows]


async def test_two_services_sweeping_one_store_remind_and_escalate_once(
    service: RunService, other: RunService, settings: Settings
) -> None:
    """Both processes sweep the same due request at once, and again: one reminder and one
    escalation are journaled and queued, whoever made them."""
    await _start_in_chat(service, "inc-1", "timers drill")
    await _until(lambda: _both_hops_due(service))

    for _ in range(2):
        await asyncio.gather(service.sweep_approvals(), other.sweep_approvals())

    (reminded,) = _events(settings.db, "inc-1", "approval_reminded")
    (escalated,) = _events(settings.db, "inc-1", "approval_escalated")
    # The requester is barred by four eyes, so never reminded; the others by their chat
    # identity where they have one.
    assert reminded["mentioned"] == ["telegram:100000066", "telegram:100000001"]
    assert escalated["escalate_to"] == ["group:leads"]
    assert escalated["mentioned"] == ["cli:kim", "telegram:100000002"]
    reminders = _outbox(settings.db, "approval_reminded")
    escalations = _outbox(settings.db, "approval_escalated")
    assert [target["chat_id"] for target, _ in reminders] == [CHAT]
    assert [target["chat_id"] for target, _ in escalations] == [CHAT]
    (approval,) = await service.store.list_approvals("inc-1")
    assert approval.reminded_at is not None and approval.escalated_at is not None
    assert await service.store.due_approval_hops() == []


async def test_a_private_reminder_goes_only_to_who_started_the_bot(
    service: RunService, settings: Settings
) -> None:
    """sam wrote to the bot privately, dana never did: the reminder mentions both in the
    incident chat, and is queued for sam's private chat only."""
    raw_rows(
        settings.db,
        "INSERT INTO chat_users (identity, display, updated_at, private_chat_at) "
        "VALUES ('telegram:100000001', '@sam', 0, 0)",
    )
    await _start_in_chat(service, "inc-1", "timers drill")
    await _until(lambda: _both_hops_due(service))

    await service.sweep_approvals()

    queued = _outbox(settings.db, "approval_reminded")
    assert [target for target, _ in queued] == [
        {"chat_id": CHAT, "thread_id": None},
        {"chat_id": 100000001, "private": True},
    ]
    assert queued[0][1]["mentions"] == [
        {"identity": "telegram:100000066", "display": None},
        {"identity": "telegram:100000001", "display": "@sam"},
    ]
    (reminded,) = _events(settings.db, "inc-1", "approval_reminded")
    assert reminded["privately"] == ["telegram:100000001"]


async def test_escalation_adds_deciders_but_four_eyes_still_bars_the_requester(
    service: RunService,
) -> None:
    """lee (a lead, not on call) is refused before the escalation and decides after it;
    tester (a lead too) requested the run, and four eyes still bars them."""
    await _start_in_chat(service, "inc-1", "timers drill")
    with pytest.raises(DeciderRefused, match="may not decide this request"):
        await service.decide("inc-1", Decision.APPROVE, "cli:lee")

    await _until(lambda: _both_hops_due(service))
    await service.sweep_approvals()

    with pytest.raises(DeciderRefused, match="four eyes"):
        await service.decide("inc-1", Decision.APPROVE, "cli:tester")
    result = await service.decide("inc-1", Decision.APPROVE, "cli:lee")
    assert result.changed and result.approval.status == ApprovalStatus.APPROVED
    assert result.run.status == RunStatus.SUCCEEDED


async def test_no_hop_is_made_for_a_request_decided_before_it(
    service: RunService, settings: Settings
) -> None:
    """Hops found due, then the request decided before they are made: nothing is journaled."""
    await _start_in_chat(service, "inc-1", "timers drill")
    await _until(lambda: _both_hops_due(service))
    due = await service.store.due_approval_hops()
    await service.decide("inc-1", Decision.APPROVE, "cli:sam")

    for approval_id, hop in due:
        assert not await service.make_hop(approval_id, hop)
        assert not (await service.store.make_hop(approval_id, hop, [])).made

    assert _events(settings.db, "inc-1", "approval_reminded") == []
    assert _events(settings.db, "inc-1", "approval_escalated") == []


async def test_expiry_with_on_expiry_rollback_rolls_back_and_ends_the_run_expired(
    service: RunService, settings: Settings
) -> None:
    """Nobody decides: the gated step never runs, the completed step with a rollback is
    rolled back, and the run ends expired (not rejected, never succeeded)."""
    await _start_in_chat(service, "inc-1", "expiry rollback drill")
    await _until(lambda: _overdue(service))

    assert await service.sweep_approvals() == 1

    run = await service.get("inc-1")
    assert run.status == RunStatus.EXPIRED
    assert run.error == (
        "approval request expired without a decision; rolled back 1 of 1 step(s) (drain)"
    )
    calls = await service.store.list_tool_calls("inc-1")
    rollbacks = [(c.step_id, c.status) for c in calls if c.tool == "rollback_step"]
    assert rollbacks == [("drain", "ok")]
    # The gated step, and what follows it, never ran.
    assert [c.step_id for c in calls if c.tool == "execute_step"] == ["drain", "look"]
    (gate,) = [c for c in calls if c.tool == "await_approval"]
    assert gate.outcome is not None and gate.outcome["approved"] is False
    (expired,) = _events(settings.db, "inc-1", "approval_expired")
    assert expired["on_expiry"] == "rollback"
    assert [e["status"] for e in _events(settings.db, "inc-1", "run_finished")] == ["expired"]


async def test_a_rollback_on_expiry_a_process_may_not_act_is_left_for_one_that_may(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A live run's request expires in a process without LOOM_OPS_ALLOW_SHELL: the expiry
    is recorded, and the rollback it queues is left, with a warning that says what it waits
    for, to a process that may act it, which rolls back."""
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live) as starter:
        await _start_in_chat(starter, "inc-1", "expiry-rollback")
    async with open_service(settings) as dry:
        await _until(lambda: _overdue(dry))
        with caplog.at_level("WARNING", logger="agent.service.runs"):
            assert await dry.sweep_approvals() == 1
        left = await dry.get("inc-1")
    assert left.status == RunStatus.QUEUED, left
    assert (
        "run inc-1 is queued to roll back; the run waits for a process with "
        "LOOM_OPS_ALLOW_SHELL=1: no live process that drives runs has it"
    ) in caplog.text
    assert _events(settings.db, "inc-1", "run_claimed")[1:] == []  # only the starter's
    async with open_service(live) as resumer:
        assert [r.id for r in await resumer.recover()] == ["inc-1"]
        run = await resumer.get("inc-1")
    assert run.status == RunStatus.EXPIRED, run
    assert run.error == (
        "approval request expired without a decision; rolled back 1 of 1 step(s) (drain)"
    )


async def test_expiry_never_approves_and_a_late_approval_changes_nothing(
    service: RunService, settings: Settings
) -> None:
    """`on_expiry: stop`: the run ends expired with nothing rolled back, and an approval
    arriving after the deadline does not run the gated step."""
    await _start_in_chat(service, "inc-1", "expiry stop drill")
    pending = await service.pending_approval("inc-1")
    assert pending is not None
    await _until(lambda: _overdue(service))

    # The card's button, tapped late: the deciding transaction expires the request instead.
    late = await service.decide("inc-1", Decision.APPROVE, "cli:sam", approval_token=pending.token)

    assert not late.changed
    assert (await service.get("inc-1")).status == RunStatus.EXPIRED
    calls = await service.store.list_tool_calls("inc-1")
    assert [c.step_id for c in calls if c.tool == "execute_step"] == ["drain", "look"]
    assert [c for c in calls if c.tool == "rollback_step"] == []
    (expired,) = _events(settings.db, "inc-1", "approval_expired")
    assert expired["on_expiry"] == "stop"


async def test_a_late_approval_of_a_rollback_on_expiry_request_rolls_back_instead(
    service: RunService, settings: Settings
) -> None:
    """A tap arriving after the deadline, before any sweep: the deciding transaction expires
    the request, and the run rolls back and ends expired; the gated step never runs."""
    await _start_in_chat(service, "inc-1", "expiry rollback drill")
    pending = await service.pending_approval("inc-1")
    assert pending is not None
    await _until(lambda: _overdue(service))

    late = await service.decide("inc-1", Decision.APPROVE, "cli:sam", approval_token=pending.token)

    assert not late.changed and late.approval.status == ApprovalStatus.EXPIRED
    run = await service.get("inc-1")
    assert run.status == RunStatus.EXPIRED
    calls = await service.store.list_tool_calls("inc-1")
    assert [c.step_id for c in calls if c.tool == "execute_step"] == ["drain", "look"]
    assert [c.step_id for c in calls if c.tool == "rollback_step"] == ["drain"]


PLAIN = """\
id: plain
title: No escalation block
triggers: [plain drill]
approvers: [group:oncall]
approval_timeout: 600
steps:
  - id: act
    title: Act
    run: echo act
    approval: required
"""


async def test_settings_time_the_hops_of_a_runbook_that_says_nothing(
    workspace: Path, db_url: str
) -> None:
    """LOOM_OPS_REMIND_AFTER / ESCALATE_AFTER / ESCALATE_TO apply where a runbook has no
    `escalation:` block: the request's timers are at those delays of its deadline."""
    write_runbook(workspace, "plain", PLAIN)
    settings = Settings(
        _env_file=None,
        db=db_url,
        workspace=workspace,
        mock_llm=True,
        user="tester",
        remind_after="25%",
        escalate_after="5m",
        escalate_to="group:leads",
    )
    service = RunService(await RunStore.open(db_url), settings)
    try:
        await service.start("inc-1", "plain drill", requested_by="cli:tester")
        (approval,) = await service.store.list_approvals("inc-1")
    finally:
        await service.close()
    opened = approval.deadline_at - 600
    assert approval.remind_at == pytest.approx(opened + 150, abs=0.001)
    assert approval.escalate_at == pytest.approx(opened + 300, abs=0.001)
    assert approval.escalate_to == ["group:leads"]
    assert approval.on_expiry == "stop"


async def test_a_request_opened_before_the_upgrade_has_no_hops_and_still_expires(
    db_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request written by the previous schema (21) reads with no timers after the upgrade:
    it is never reminded, and still expires at its deadline, as before."""
    from agent.store import postgres, sqlite

    for engine in (sqlite, postgres):
        shipped = engine.migrations(engine.MIGRATIONS)
        monkeypatch.setattr(
            engine, "migrations", lambda _pkg, shipped=shipped: [m for m in shipped if m[0] <= 21]
        )
    await (await RunStore.open(db_url)).close()  # the schema as the previous version left it
    now = time.time()
    limits = RunLimits(max_steps=40, max_tool_calls=100, deadline_seconds=3600)
    raw_rows(
        db_url,
        "INSERT INTO runs (id, role, status, request, requested_by, origin, checkpoint, limits, "
        "created_at, updated_at) VALUES ('old', 'runbook', 'waiting_approval', 'old drill', "
        "'cli:tester', ?, ?, ?, ?, ?)",
        (Origin().to_json(), Checkpoint().to_json(), limits.to_json(), now, now),
    )
    raw_rows(
        db_url,
        "INSERT INTO approvals (token, run_id, call_key, kind, step_id, action, reason, "
        "rollback, deciders, four_eyes, requested_by, status, created_at, deadline_at, number) "
        "VALUES ('tok', 'old', 'old:0:0', 'gate', 'act', 'echo act', 'why', NULL, '[]', 0, "
        "'cli:tester', 'pending', ?, ?, 1)",
        (now, now + 0.2),
    )
    monkeypatch.undo()

    service = RunService(await RunStore.open(db_url), settings)
    try:
        (approval,) = await service.store.list_approvals("old")
        assert (approval.remind_at, approval.escalate_at, approval.on_expiry) == (
            None,
            None,
            "stop",
        )
        assert await service.store.next_approval_timer() == pytest.approx(now + 0.2)
        await _until(lambda: _overdue(service))
        assert await service.sweep_approvals() == 1
        assert (await service.get("old")).status == RunStatus.EXPIRED
        assert _events(db_url, "old", "approval_reminded") == []
    finally:
        await service.close()


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"remind_after": "soon"}, "remind_after", "'soon': a delay is a share of the deadline"),
        ({"remind_after": "100%"}, "remind_after", "between 0% and 100%"),
        ({"escalate_after": "75%"}, "escalate_to", "set LOOM_OPS_ESCALATE_AFTER and"),
        ({"escalate_to": "group:leads"}, "escalate_to", "LOOM_OPS_ESCALATE_TO together"),
    ],
)
def test_bad_escalation_settings_are_refused_with_the_setting_named(
    values: dict[str, str], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, **values)  # type: ignore[arg-type]
    (error,) = info.value.errors()
    assert error["loc"] == (field,) and message in error["msg"]


def test_escalation_settings_default_to_a_reminder_at_half_the_deadline() -> None:
    settings = Settings(_env_file=None)
    assert settings.remind_delay == Delay(fraction=0.5)
    assert settings.escalate_delay is None and settings.escalate_to == []
    off = Settings(_env_file=None, remind_after="0", escalate_after="90s", escalate_to="cli:x")
    assert off.remind_delay is None
    assert off.escalate_delay == Delay(seconds=90.0) and off.escalate_to == ["cli:x"]


OPEN = """\
id: open
title: Anyone may decide
triggers: [open drill]
approval_timeout: 600
steps:
  - id: act
    title: Act
    run: echo act
    approval: required
"""


async def _open_service(db_url: str, workspace: Path, **values: Any) -> RunService:
    """A service over `db_url` whose settings say `values` (escalation, approvers)."""
    settings = Settings(
        _env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester", **values
    )
    return RunService(await RunStore.open(db_url), settings)


async def test_escalating_a_request_anyone_may_decide_keeps_it_open(
    db_url: str, settings: Settings
) -> None:
    """A runbook without `approvers` escalates by LOOM_OPS_ESCALATE_TO: the leads are told,
    and sam (on call, not a lead), who could decide before, still decides after it."""
    write_runbook(settings.workspace, "open", OPEN)
    service = await _open_service(
        db_url,
        settings.workspace,
        remind_after="0",
        escalate_after="0.1s",
        escalate_to="group:leads",
    )
    try:
        await _start_in_chat(service, "inc-1", "open drill")
        await _until(lambda: _one_hop_due(service))
        assert await service.sweep_approvals() == 1

        (escalated,) = _events(db_url, "inc-1", "approval_escalated")
        assert escalated["mentioned"] == ["cli:kim", "telegram:100000002", "cli:tester"]
        result = await service.decide("inc-1", Decision.APPROVE, "cli:sam")
        assert result.changed and result.approval.status == ApprovalStatus.APPROVED
        assert result.run.status == RunStatus.SUCCEEDED
    finally:
        await service.close()


async def _one_hop_due(service: RunService) -> bool:
    return len(await service.store.due_approval_hops()) == 1


async def test_a_refusal_after_an_escalation_that_added_nobody_names_no_empty_list(
    service: RunService, settings: Settings
) -> None:
    """A runbook escalating to its own approvers adds nobody: a lead is refused with the
    runbook's list alone, not an empty "escalated to"."""
    same = (
        TIMERS.replace("id: timers", "id: timers-same")
        .replace("[timers drill]", "[same group drill]")
        .replace("escalate_to: [group:leads]", "escalate_to: [group:oncall]")
    )
    write_runbook(settings.workspace, "timers-same", same)
    await _start_in_chat(service, "inc-1", "same group drill")
    await _until(lambda: _both_hops_due(service))
    await service.sweep_approvals()

    with pytest.raises(DeciderRefused) as refused:
        await service.decide("inc-1", Decision.APPROVE, "cli:lee")
    assert str(refused.value).endswith(
        "may not decide this request (runbook approvers: group:oncall)"
    )


async def test_an_escalation_never_reaches_people_the_global_approvers_bar(
    db_url: str, settings: Settings
) -> None:
    """LOOM_OPS_APPROVERS=group:oncall bars the leads the runbook escalates to: the
    escalation mentions none of them, nor writes to lee, who started the bot, privately;
    and lee is still refused."""
    service = await _open_service(db_url, settings.workspace, approvers=["group:oncall"])
    try:
        raw_rows(
            db_url,
            "INSERT INTO chat_users (identity, display, updated_at, private_chat_at) "
            "VALUES ('telegram:100000002', '@lee', 0, 0)",
        )
        await _start_in_chat(service, "inc-1", "timers drill")
        await _until(lambda: _both_hops_due(service))
        await service.sweep_approvals()

        (escalated,) = _events(db_url, "inc-1", "approval_escalated")
        assert escalated["mentioned"] == [] and escalated["privately"] == []
        assert [target for target, _ in _outbox(db_url, "approval_escalated")] == [
            {"chat_id": CHAT, "thread_id": None}
        ]
        with pytest.raises(DeciderRefused, match="LOOM_OPS_APPROVERS"):
            await service.decide("inc-1", Decision.APPROVE, "telegram:100000002")
    finally:
        await service.close()


def _loom_ops(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`loom-ops ARGS` as a process of its own over the tests' store and workspace."""
    env = cli_env(
        LOOM_OPS_DB=settings.db,
        LOOM_OPS_WORKSPACE=str(settings.workspace),
        LOOM_OPS_MOCK_LLM="1",
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [sys.executable, "-m", "agent.frontends.cli", *args],
        cwd=settings.workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


async def test_listing_runs_records_an_expiry_and_leaves_its_rollback_to_a_driver(
    service: RunService, settings: Settings
) -> None:
    """`loom-ops runs` and `loom-ops status` past an `on_expiry: rollback` deadline record
    the expiry and drive nothing: the run waits, queued, for whoever drives runs (here
    `loom-ops resume`), which rolls it back and ends it expired."""
    await _start_in_chat(service, "inc-1", "expiry rollback drill")
    await _until(lambda: _overdue(service))

    for args in (("runs", "--json"), ("status", "--run-id", "inc-1", "--json")):
        await asyncio.to_thread(_loom_ops, settings, *args)

        (approval,) = await service.store.list_approvals("inc-1")
        assert approval.status == ApprovalStatus.EXPIRED
        assert (await service.get("inc-1")).status == RunStatus.QUEUED
        calls = await service.store.list_tool_calls("inc-1")
        assert [c for c in calls if c.tool == "rollback_step"] == []

    await asyncio.to_thread(_loom_ops, settings, "resume", "--run-id", "inc-1", "--json")

    run = await service.get("inc-1")
    assert run.status == RunStatus.EXPIRED
    calls = await service.store.list_tool_calls("inc-1")
    assert [(c.step_id, c.status) for c in calls if c.tool == "rollback_step"] == [("drain", "ok")]
